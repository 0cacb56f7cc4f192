"""The training path of ``cross_entropy``: the loss and its gradient in one kernel.

When the logits require grad, ``cross_entropy_fused`` computes the per-row objective
``row_scale_i * loss_i + z_scale_i * lse_i**2`` (whose sum is the reduced loss) and
writes its gradient in the same pass: one read and one write of ``N x V``. Backward
then hands that buffer on (see ``ops.py``). With ``inplace_backward`` the gradient
overwrites the logits' own buffer (``cross_entropy_fused_``), so the step allocates
nothing of size ``N x V``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import ArgumentError
from ._reduce import CountedRows, reduce_objective, row_scales
from .ops import accumulate_dtype


def fused_loss(logits: Tensor, rows: Tensor, weight, counted: CountedRows, op_options: tuple, z_loss,
               reduction: str, batch_shape, dtype: torch.dtype, inplace, with_stats: bool = False):
    """The reduced loss through the training path; with_stats, also (lse [N], argmax [N]) of the same pass.

    ``op_options``: the ops' trailing options, ``(ignore_index, label_smoothing, softcap, vocab_start,
    vocab_total, logit_scale, temperature)``.
    ``inplace``: None, or (the tensor whose buffer the gradient overwrites, its class
    dimension): the input that the rows ``logits`` view, or ``logits`` itself when
    the rows are a copy.
    """
    acc = accumulate_dtype(logits.dtype)
    row_scale, z_scale = row_scales(counted, logits.shape[0], reduction, z_loss, logits.device, acc)
    args = (rows, weight, row_scale, z_scale, *op_options)
    if inplace is not None:
        objective, stats = _fused_inplace(*inplace, args, with_stats)
    else:
        op = torch.ops.fused_ce.cross_entropy_fused.stats if with_stats else torch.ops.fused_ce.cross_entropy_fused
        objective, lse, _mass, _grad, *prediction = op(logits, *args)
        stats = (lse, prediction[0]) if with_stats else None
    loss = reduce_objective(objective, counted, reduction, batch_shape, dtype)
    return (loss, *stats) if with_stats else loss


def check_inplace(input: Tensor) -> None:
    """Refuses, before anything is written, what autograd or the memory layout would not allow."""
    if input.is_leaf:
        raise ArgumentError(
            "inplace_backward=True would overwrite input with its gradient, but input is a leaf tensor "
            "that requires grad; use it on logits computed by the model (e.g. the output of the LM head)"
        )
    base = input._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ArgumentError(
            "inplace_backward=True would overwrite input with its gradient, but input is a view of a leaf "
            "tensor that requires grad"
        )
    if _may_overlap(input):
        raise ArgumentError(
            "inplace_backward=True needs input whose elements do not share memory (not, e.g., an expand() "
            "or rows from unfold()); pass input.contiguous() or use inplace_backward=False"
        )


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of t may share memory: its strides, smallest first, must each pass
    the farthest offset the smaller dimensions reach (a contiguous or padded layout does; an
    expand, stride 0, or overlapping unfold() rows do not). An empty tensor has nothing to share."""
    if t.numel() == 0:
        return False
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _rows_view(t: Tensor, class_dim: int) -> Tensor:
    """The rows [N, C] of t as _rows.as_rows makes them; a view when as_rows made one."""
    moved = t.movedim(class_dim, -1)
    return moved.reshape(math.prod(moved.shape[:-1]), moved.shape[-1])


def _fused_inplace(buffer: Tensor, class_dim: int, args, with_stats: bool):
    """cross_entropy_fused_ with autograd: the gradient overwrites the logits.

    A mutating op cannot carry torch.library autograd, and autograd lets a Function
    that modifies a view (the logits often are one) return only that view. So two
    Functions share the work: _GradIntoLogits runs the kernel, writing the gradient
    over the logits (marked dirty: their version counter is bumped, and another op's
    backward that saved them raises), and is the identity for autograd;
    _ObjectiveOf returns the objective, whose gradient with respect to that buffer is
    the buffer scaled by the upstream gradient.

    The Functions take the buffer itself, not a reshaped view of it: in-place work on
    a view makes autograd route the gradient through a CopySlices node, which copies it.
    """
    box: list[Tensor] = []  # the op's per-row outputs: objective, lse, (argmax)
    grad = _GradIntoLogits.apply(buffer, class_dim, box, with_stats, *args)
    return _ObjectiveOf.apply(box[0], grad, class_dim), (box[1], box[2]) if with_stats else None


class _GradIntoLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, class_dim, box, with_stats, *args):
        op = torch.ops.fused_ce.cross_entropy_fused_.stats if with_stats else torch.ops.fused_ce.cross_entropy_fused_
        objective, lse, _mass, *prediction = op(_rows_view(buffer, class_dim), *args)
        box.extend([objective, lse, *prediction[:1]])
        ctx.mark_dirty(buffer)
        ctx.num_args = len(args)
        return buffer

    @staticmethod
    def backward(ctx, grad):
        return (grad, None, None, None) + (None,) * ctx.num_args


class _ObjectiveOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, objective, grad, class_dim):
        ctx.save_for_backward(grad)
        ctx.class_dim = class_dim
        ctx.grad_buffer_used = False
        return objective.clone()

    @staticmethod
    def backward(ctx, grad_objective):
        if ctx.grad_buffer_used or torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) wrote the gradient over the logits, so it supports one "
                "first-order backward pass; for retain_graph=True, create_graph=True or gradcheck use "
                "inplace_backward=False"
            )
        ctx.grad_buffer_used = True
        (grad,) = ctx.saved_tensors
        # Only rows whose upstream gradient is not exactly 1 are scaled; with the
        # logits gone they cannot be recomputed, so in float16/bfloat16 such rows are
        # rounded twice (see the README).
        rows = _rows_view(grad, ctx.class_dim)
        torch.ops.fused_ce.scale_rows_(rows, grad_objective.to(accumulate_dtype(grad.dtype)))
        return None, grad, None
