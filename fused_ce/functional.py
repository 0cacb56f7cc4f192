"""The public functions of fused_ce, with ``torch.nn.functional.cross_entropy``'s semantics.

The kernels work on rows: logits ``[N, V]`` and per-row statistics. This module maps
every input layout ``F.cross_entropy`` accepts onto rows, checks arguments with
messages that name them, and applies the reductions (cheap O(N) work).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

_REDUCTIONS = ("none", "mean", "sum")
_INDEX_DTYPES = (torch.int64, torch.int32)

_validate_targets = os.environ.get("FUSED_CE_VALIDATE", "0") not in ("", "0")


def set_target_validation(enabled: bool) -> None:
    """Check class-index targets on CUDA tensors too, raising ``IndexError`` when one is out of range.

    On the CPU targets are always checked. On CUDA the check costs a host
    synchronisation, so by default it is off and a row whose target is out of range
    gets a NaN loss (and NaN gradient) instead; the kernels never read out of
    bounds. The environment variable ``FUSED_CE_VALIDATE=1`` turns it on at import.
    """
    global _validate_targets
    _validate_targets = bool(enabled)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        from .ops import cuda_kernels_available

        if not cuda_kernels_available():
            raise RuntimeError(
                "input is a CUDA tensor but this build of fused_ce has no CUDA kernels. Rebuild it with "
                "`FUSED_CE_CUDA=1 pip install --no-build-isolation -e .` (needs a CUDA build of torch and nvcc; "
                "set CUDA_HOME if nvcc is not found)"
            )
    elif device.type != "cpu":
        raise NotImplementedError(f"fused_ce runs on CPU and CUDA tensors, got a tensor on {device}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises IndexError for a class index outside [0, V) that is not ignore_index (syncs on CUDA)."""
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(target.reshape(-1)[position])
        raise IndexError(
            f"target: class index {value} (at flat position {position}) is out of range "
            f"[0, {num_classes}) and is not ignore_index ({ignore_index})"
        )


def _as_rows(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float):
    """Checks F.cross_entropy's arguments; returns (logits [N, V], target rows, weight, batch shape)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input (the logits) must be floating point, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk), got a scalar")
    if input.device != target.device:
        raise ValueError(f"input and target must be on the same device, got {input.device} and {target.device}")
    _check_device(input.device)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")

    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    if num_classes == 0:
        raise ValueError(f"input has an empty class dimension (shape {tuple(input.shape)})")
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]

    # Rows of logits: classes last with unit stride. (C) and (N, C) are views;
    # (N, C, d1, ..., dk) is transposed into one copy, as the kernels read rows.
    logits = input.movedim(class_dim, -1).reshape(-1, num_classes)
    if logits.stride(1) != 1 and num_classes > 1:
        logits = logits.contiguous()

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"target: class probabilities must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        rows = target.movedim(class_dim, -1).reshape(-1, num_classes).to(input.dtype)
        if rows.stride(1) != 1 and num_classes > 1:
            rows = rows.contiguous()
    else:
        if target.dtype not in _INDEX_DTYPES:
            raise TypeError(
                f"target must hold class indices (int64 or int32) or class probabilities (floating point), got {target.dtype}"
            )
        if target.shape != batch_shape:
            raise ValueError(
                f"target: class indices must have shape {tuple(batch_shape)} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        rows = target.reshape(-1).long()
        if target.device.type == "cpu" or _validate_targets:
            _check_target_range(rows, num_classes, ignore_index)

    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.shape != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), one entry per class, got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight must be on the input's device ({input.device}), got {weight.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "weight: gradients with respect to class weights are not supported (nor are they by "
                "F.cross_entropy); pass weight.detach()"
            )
        weight = weight.to(torch.float64 if input.dtype == torch.float64 else torch.float32).contiguous()
    return logits, rows, weight, batch_shape


def _reduce(loss: Tensor, reduction: str, denominator, batch_shape, dtype: torch.dtype) -> Tensor:
    if reduction == "none":
        return loss.reshape(batch_shape).to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total / denominator  # 0 / 0 = NaN when every target is ignored, as in PyTorch
    return total.to(dtype)


def cross_entropy(
    input: Tensor,  # noqa: A002 - F.cross_entropy's name
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    size_average: bool | None = None,
    reduce: bool | None = None,
) -> Tensor:
    """Cross-entropy between logits and targets: ``F.cross_entropy`` fused into one pass.

    Args:
        input: logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float32,
            float64, float16 or bfloat16 (read as they are, with float32 arithmetic;
            float64 with float64 arithmetic).
        target: class indices (int64 or int32) of shape ``()``, ``(N)`` or ``(N, d1, ..., dk)``
            in ``[0, C)`` or equal to ``ignore_index``; or class probabilities with the
            input's shape.
        weight: optional per-class rescaling weights of shape ``(C)``.
        ignore_index: a class-index target value whose rows add nothing to the loss and
            its gradient (nor to the ``mean`` denominator).
        reduction: ``'none'`` (per-element losses), ``'mean'`` (the sum divided by the
            total weight of the non-ignored targets, or by the number of rows for
            probability targets) or ``'sum'``.
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution
            over the ``C`` classes, as ``F.cross_entropy`` defines it.
        size_average, reduce: deprecated, as in ``F.cross_entropy``.

    Returns:
        The loss in the input's dtype: a scalar, or the batch shape for ``'none'``.

    Class-index targets out of range raise ``IndexError`` on the CPU; on CUDA they
    give NaN for that row unless :func:`set_target_validation` is on.
    """
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    _check_reduction(reduction)
    logits, rows, weight, batch_shape = _as_rows(input, target, weight, ignore_index, label_smoothing)
    loss, _lse, _mass = torch.ops.fused_ce.cross_entropy_forward(
        logits, rows, weight, ignore_index, float(label_smoothing), 0.0
    )
    denominator = None
    if reduction == "mean":
        if rows.is_floating_point():
            denominator = logits.shape[0]
        else:
            valid = rows != ignore_index
            if weight is None:
                denominator = valid.sum()
            else:
                denominator = (weight.gather(0, rows.clamp(0, logits.shape[1] - 1)) * valid).sum()
    return _reduce(loss, reduction, denominator, batch_shape, input.dtype)


__all__ = ["cross_entropy", "set_target_validation"]
