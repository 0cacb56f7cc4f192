"""Every layout the public functions accept, mapped onto the rows the kernels read.

The kernels read logits ``[N, C]`` with unit stride along classes (any row stride)
and a target per row: ``[N]`` int64 class indices or ``[N, C]`` probabilities. Here:
``F.cross_entropy``'s layouts (``(C)``, ``(N, C)``, ``(N, C, d1, ..., dk)``: classes
in dimension 1) and classes-last layouts (``(..., C)``: the linear and
vocabulary-parallel paths, entropy).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import ArgumentError, ArgumentTypeError, check_tensor


def with_unit_class_stride(rows: Tensor) -> Tensor:
    """rows ``[N, C]``, copied only if a non-empty tensor has no unit stride along classes."""
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        return rows.contiguous()
    return rows


def as_rows(t: Tensor, class_dim: int) -> Tensor:
    """``t`` with ``class_dim`` moved last, flattened to rows ``[N, C]`` with unit class stride.

    A view where the layout allows ((C), (N, C), (..., C) with unit class stride);
    otherwise one copy (e.g. ``(N, C, d1, ...)``, classes not contiguous).
    """
    moved = t.movedim(class_dim, -1)
    return with_unit_class_stride(moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1]))


def target_rows(
    target,
    *,
    batch_shape: torch.Size,
    probs_shape: torch.Size,
    class_dim: int,
    probs_dtype: torch.dtype | None,
    ignore_index_given: bool = False,
    probs_allowed: bool = True,
) -> Tensor:
    """The target as rows: ``[N]`` int64 class indices, or ``[N, C]`` probabilities.

    Class indices must have ``batch_shape``; probabilities ``probs_shape`` (the
    logits' own, classes in ``class_dim``), converted to ``probs_dtype``.
    ``ignore_index_given``: the caller set an ignore_index that probability targets
    cannot take (PyTorch refuses it).
    """
    check_tensor(target, "target")
    if target.is_floating_point():
        if not probs_allowed:
            raise ArgumentTypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
        if ignore_index_given:
            raise ArgumentError("ignore_index is not supported for floating point target (class probabilities)")
        if target.shape != probs_shape:
            raise ArgumentError(
                f"target: class probabilities must have shape {tuple(probs_shape)}, the logits' shape, "
                f"got {tuple(target.shape)}"
            )
        return as_rows(target.to(probs_dtype), class_dim)
    if target.dtype == torch.bool or target.dtype.is_complex:
        raise ArgumentTypeError(
            "target must hold class indices (an integer dtype) or class probabilities (floating point), "
            f"got {target.dtype}"
        )
    if target.shape != batch_shape:
        raise ArgumentError(
            f"target must have shape {tuple(batch_shape)}, the logits' batch shape (class indices for logits of "
            f"shape {tuple(probs_shape)}), got {tuple(target.shape)}"
        )
    return target.reshape(-1).long()
