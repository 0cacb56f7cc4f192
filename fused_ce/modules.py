"""``torch.nn`` module wrappers of the fused_ce functions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .functional import cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for :class:`torch.nn.CrossEntropyLoss`, backed by :func:`fused_ce.cross_entropy`.

    The same positional arguments as torch's (``weight, size_average, ignore_index,
    reduce, reduction, label_smoothing``), checked at the first call as torch does;
    fused_ce's extras (``z_loss``, ``softcap``, ``loss_dtype``) are keyword-only.
    The class ``weight`` is a buffer.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int = -100,
        reduce: bool | None = None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        loss_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            from torch.nn import _reduction

            reduction = _reduction.legacy_get_string(size_average, reduce)
        self.register_buffer("weight", weight)
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.loss_dtype = loss_dtype

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            loss_dtype=self.loss_dtype,
        )

    def extra_repr(self) -> str:
        extras = "".join(
            f", {name}={getattr(self, name)!r}"
            for name, default in (("z_loss", 0.0), ("softcap", None), ("loss_dtype", None))
            if getattr(self, name) != default
        )
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}{extras}"
        )


__all__ = ["CrossEntropyLoss"]
