"""The reductions of per-row losses, shared by every public function (O(N) torch ops).

'mean' divides by the total class weight of the counted (non-ignored) rows -- the
number of rows for probability targets -- and is NaN when that is 0, as in PyTorch,
with a zero gradient. The z-loss term ``z_loss * lse**2`` is added per counted row,
and under 'mean' averaged over the counted rows, unweighted.

The dtype of a loss (:func:`result_dtype`) follows one rule for every function: the
input's dtype, as ``F.cross_entropy`` returns -- but float32 for float16/bfloat16
inputs under ``torch.autocast``, as autocast runs ``F.cross_entropy`` -- unless the
caller asks for a dtype (``loss_dtype=``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import ArgumentTypeError

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def result_dtype(input_dtype: torch.dtype, device_type: str, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype of a loss computed from logits of ``input_dtype`` (see the module docstring)."""
    if requested is not None:
        if not isinstance(requested, torch.dtype) or not requested.is_floating_point:
            raise ArgumentTypeError(f"loss_dtype must be None or a floating-point torch.dtype, got {requested!r}")
        return requested
    if input_dtype in _LOW_PRECISION and torch.is_autocast_enabled(device_type):
        return torch.float32
    return input_dtype


class CountedRows:
    """Which rows count toward a reduction, and the 'mean' denominator.

    ``valid``: bool ``[N]`` (None: every row counts, as for probability targets);
    ``count``: how many count; ``denominator``: 'mean''s divisor (their total class
    weight, or ``count``). Counts may be ints or 0-d tensors (kept on the device).
    """

    def __init__(self, valid: Tensor | None, count, denominator):
        self.valid, self.count, self.denominator = valid, count, denominator

    @classmethod
    def of_targets(cls, rows: Tensor, num_rows: int, weight: Tensor | None, ignore_index: int) -> CountedRows:
        """From class-index rows ``[N]`` (or ``[N, C]`` probabilities: every row counts)."""
        if rows.is_floating_point():
            return cls(None, num_rows, num_rows)
        valid = rows != ignore_index
        count = valid.sum()
        if weight is None or weight.shape[0] == 0:
            return cls(valid, count, count)
        target_weight = weight.gather(0, rows.clamp(0, weight.shape[0] - 1))
        return cls(valid, count, (target_weight * valid).sum())

    def mask(self, num_rows: int, device, dtype) -> Tensor:
        if self.valid is None:
            return torch.ones(num_rows, device=device, dtype=dtype)
        return self.valid.to(dtype)

    def masked_square(self, lse: Tensor) -> Tensor:
        """lse**2 on the rows that count, 0 elsewhere (also where an ignored row's lse is not finite)."""
        return lse.square() if self.valid is None else torch.where(self.valid, lse, 0.0).square()


def safe_inverse(denominator, dtype: torch.dtype):
    """1 / denominator, but 0 where it is 0: the loss of 'mean' is then NaN (added by
    nan_if_empty), as in PyTorch, while the gradient stays 0 -- as PyTorch's when every
    row is ignored; where counted rows all weigh 0 PyTorch's is NaN (a documented difference)."""
    if isinstance(denominator, int):
        return 0.0 if denominator == 0 else 1.0 / denominator
    d = denominator.to(dtype)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def nan_if_empty(total: Tensor, denominator) -> Tensor:
    if isinstance(denominator, int):
        return total + math.nan if denominator == 0 else total
    return total + torch.where(denominator == 0, math.nan, 0.0)


def z_loss_part(lse: Tensor, counted: CountedRows, reduction: str, z_loss) -> Tensor | None:
    """The z-loss term of the loss (per row for 'none'), or None without z-loss."""
    if not z_loss:
        return None
    rows = z_loss * counted.masked_square(lse)
    if reduction == "none":
        return rows
    total = rows.sum()
    return total * safe_inverse(counted.count, total.dtype) if reduction == "mean" else total


def reduce_losses(loss: Tensor, lse: Tensor, counted: CountedRows, reduction: str, z_loss, batch_shape,
                  dtype: torch.dtype) -> Tensor:
    """The reduced loss from per-row losses and lse (the statistics path), z-loss included."""
    z_part = z_loss_part(lse, counted, reduction, z_loss)
    if reduction == "none":
        out = loss if z_part is None else loss + z_part
        return out.reshape(batch_shape).to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = nan_if_empty(total * safe_inverse(counted.denominator, total.dtype), counted.denominator)
    if z_part is not None:
        total = total + z_part
    return total.to(dtype)


def row_scales(
    counted: CountedRows, num_rows: int, reduction: str, z_loss, device, dtype
) -> tuple[Tensor, Tensor | None]:
    """row_scale and z_scale [N] of the fused objective ``row_scale * loss + z_scale * lse**2``,
    whose sum is the reduced loss (the training path)."""
    mask = counted.mask(num_rows, device, dtype)
    row_scale = mask if reduction != "mean" else mask * safe_inverse(counted.denominator, dtype)
    z_scale = None
    if z_loss:
        z_scale = z_loss * mask if reduction != "mean" else (z_loss * safe_inverse(counted.count, dtype)) * mask
    return row_scale.contiguous(), z_scale


def reduce_objective(objective: Tensor, counted: CountedRows, reduction: str, batch_shape, dtype) -> Tensor:
    """The loss from the training path's per-row objective (already scaled for the reduction)."""
    if reduction == "none":
        return objective.reshape(batch_shape).to(dtype)
    total = objective.sum()
    if reduction == "mean":
        total = nan_if_empty(total, counted.denominator)
    return total.to(dtype)
