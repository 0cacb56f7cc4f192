"""The vocabulary-parallel functions and their autograd (see :mod:`fused_ce.distributed`)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _checks as checks
from .._reduce import CountedRows, reduce_losses, result_dtype
from .._rows import as_rows, target_rows
from .._stats import make_stats
from ..linear.loops import Head, shard_gradients, shard_statistics
from ..linear.plan import chunk_plan
from ..ops import accumulate_dtype
from .merge import (
    Plan,
    backward_coefficients,
    denominator_of,
    make_plan,
    merge,
    merge_prediction,
    owned_target_weight,
    slice_statistics,
)


def _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap, temperature=1.0, logit_scale=1.0):
    """Checks the loss options as fused_ce.cross_entropy does; returns the soft-cap as the ops take it."""
    checks.check_positive(temperature, "temperature")
    checks.check_positive(logit_scale, "logit_scale")
    checks.check_reduction(reduction)
    checks.check_z_loss(z_loss)
    checks.check_label_smoothing(label_smoothing)
    checks.check_ignore_index(ignore_index)
    return checks.softcap_option(softcap)


def _target_rows(target, source: Tensor, name: str) -> Tensor:
    """Class indices of ``source``'s batch shape (classes last), as int64 rows."""
    checks.check_tensor(target, "target")
    checks.check_target_device(target, source.device, name)
    return target_rows(target, batch_shape=source.shape[:-1], probs_shape=source.shape, class_dim=-1, probs_dtype=None,
                       probs_allowed=False)


def _class_weight(weight, local_size: int, source: Tensor, name: str):
    return checks.class_weight(weight, local_size, source.device, accumulate_dtype(source.dtype), name,
                               holds="this rank's slice of the class weights")


def _counted(rows: Tensor, plan: Plan, denominator: Tensor) -> CountedRows:
    valid = rows != plan.ignore_index
    return CountedRows(valid, valid.sum(), denominator)


def _result(loss, lse, predicted, rows, counted, reduction, z_loss, batch_shape, out_dtype, return_stats):
    """The reduced loss, or with return_stats its CrossEntropyStats (the prediction already merged across ranks)."""
    out = reduce_losses(loss, lse, counted, reduction, z_loss, batch_shape, out_dtype)
    return make_stats(out, lse, predicted, rows, counted, reduction, z_loss, batch_shape) if return_stats else out


class _VocabParallelRows(torch.autograd.Function):
    """Logits slice [N, V_s] -> the full rows' (loss [N], lse [N]) and the 'mean' denominator."""

    @staticmethod
    def forward(ctx, logits, rows, weight, plan):
        loss, lse, mass, target_weight, predicted = slice_statistics(logits, rows, weight, plan)
        denominator = denominator_of(rows, plan, target_weight)
        predicted = rows.new_empty(0) if predicted is None else predicted
        ctx.save_for_backward(logits, rows, weight, lse, mass)
        ctx.plan = plan
        ctx.mark_non_differentiable(denominator, predicted)
        return loss, lse, denominator, predicted

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_lse, _g_denominator, _g_predicted):
        logits, rows, weight, lse, mass = ctx.saved_tensors
        p_coef, t_coef = backward_coefficients(g_loss, g_lse, mass)
        grad = torch.ops.fused_ce.cross_entropy_backward(
            logits, rows, weight, lse, p_coef, t_coef, *ctx.plan.op_options
        )
        return grad, None, None, None


def _head(x, weight, bias, rows, class_weight, plan: Plan, chunk: tuple[int, int]) -> Head:
    """The chunked linear + cross-entropy problem of this rank's slice (fused_ce.linear.loops).

    chunk: (rows, classes) per block."""
    return Head(x, weight, bias, rows, class_weight, plan.ignore_index, plan.label_smoothing, plan.softcap, chunk[0],
                plan.vocab_start, plan.vocab_total, classes=chunk[1], logit_scale=plan.logit_scale,
                temperature=plan.temperature, stats=plan.stats)


class _VocabParallelLinearRows(torch.autograd.Function):
    """Input [N, H] and a weight slice [V_s, H] -> the full rows' (loss, lse) and the denominator.

    No N x V_s buffer: fused_ce.linear's chunk loops run the rows through the matmul
    and the statistics kernel in forward and, after the merge, through the matmul
    and the backward kernel again in backward, whose results the input, weight and
    bias gradients absorb chunk by chunk.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, rows, class_weight, plan, chunk, reduce_input_grad):
        # Autocast was applied by the caller (the casts stay outside, differentiable);
        # forward and backward must compute the very same logits.
        with torch.autocast(x.device.type, enabled=False):
            loss_s, lse_s, mass_s, *prediction = shard_statistics(_head(x, weight, bias, rows, class_weight, plan,
                                                                        chunk))
        extra = None if class_weight is None else owned_target_weight(rows, class_weight, plan)
        loss, lse, mass, target_weight = merge(loss_s, lse_s, mass_s, extra, plan)
        denominator = denominator_of(rows, plan, target_weight)
        predicted = merge_prediction(*prediction, plan) if plan.stats else rows.new_empty(0)
        ctx.save_for_backward(x, weight, bias, rows, class_weight, lse, mass)
        ctx.plan, ctx.chunk, ctx.reduce_input_grad = plan, chunk, reduce_input_grad
        ctx.mark_non_differentiable(denominator, predicted)
        return loss, lse, denominator, predicted

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_lse, _g_denominator, _g_predicted):
        x, weight, bias, rows, class_weight, lse, mass = ctx.saved_tensors
        plan = ctx.plan
        needs = tuple(ctx.needs_input_grad[:3])
        p_coef, t_coef = backward_coefficients(g_loss, g_lse, mass)
        with torch.autocast(x.device.type, enabled=False):
            head = _head(x, weight, bias, rows, class_weight, plan, ctx.chunk)
            grad_x, grad_w, grad_b = shard_gradients(head, lse, p_coef, t_coef, needs)
        # (In the accumulation dtype; each is rounded to its operand's dtype once.)
        grad_x = grad_x.to(x.dtype) if needs[0] else None
        if needs[0] and ctx.reduce_input_grad and plan.world_size > 1:
            # The input is replicated: its gradient is the sum of every rank's part. It
            # is summed in the input's dtype, as a surrounding tensor-parallel layer
            # would (reduce_input_grad=False) -- the two give the same result.
            dist.all_reduce(grad_x, group=plan.group)
        grad_w = grad_w.to(weight.dtype) if needs[1] else None
        grad_b = grad_b.to(bias.dtype) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits_shard: Tensor,
    target: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    vocab_sizes: Sequence[int] | None = None,
    vocab_start: int | None = None,
    vocab_total: int | None = None,
    loss_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    return_stats: bool = False,
) -> Tensor:
    """Cross-entropy of logits whose classes are sharded across the ranks of ``group``.

    Every rank of ``group`` calls this with its own slice of the logits: rank ``r``
    holds the classes ``[vocab_start_r, vocab_start_r + V_r)`` of the full vocabulary
    of ``V = sum_r V_r`` classes, contiguous and in rank order (sizes may differ).
    Each rank gets the same value ``F.cross_entropy`` would give on the full logits
    (with ``z_loss`` and ``softcap`` as :func:`fused_ce.cross_entropy` defines them),
    and backward gives each rank its slice of the full gradient, with no further
    communication.

    Args:
        logits_shard: this rank's logits, ``(N, V_r)`` or ``(B, T, V_r)`` -- any
            ``(..., V_r)``: the classes are the *last* dimension (unlike
            ``F.cross_entropy``'s ``(N, C, d1, ...)``); float32, float64, float16
            or bfloat16.
        target: class indices into the full vocabulary, ``logits_shard.shape[:-1]``,
            the same on every rank; or ``ignore_index``.
        group: the process group across which the vocabulary is sharded (default:
            the world). Any backend: NCCL for CUDA tensors, gloo for CPU tensors.
        weight: optional class weights: this rank's slice, shape ``(V_r,)``.
        ignore_index, reduction, label_smoothing: as in ``F.cross_entropy``
            (label smoothing spreads over all ``V`` classes).
        z_loss: adds ``z_loss * lse**2`` per non-ignored row (``lse`` of the full
            row); under ``'mean'`` averaged over the non-ignored rows, unweighted.
        softcap: if set, logits are soft-capped to ``softcap * tanh(x / softcap)``.
        vocab_sizes: every rank's ``V_r``, in rank order; or
        vocab_start, vocab_total: this rank's first class and ``V``. Either spares
            the discovery of the layout (one small all_gather and, on CUDA, a host
            synchronisation per call); without them it is found each call.
        loss_dtype: the result's dtype, as :func:`fused_ce.cross_entropy`'s (default:
            the logits', float32 for fp16/bf16 under autocast).
        temperature, logit_scale: as :func:`fused_ce.cross_entropy`'s: the loss of
            ``softcap(logit_scale * logits) / temperature``, inside the kernels.
        return_stats: return a :class:`fused_ce.CrossEntropyStats`, as
            :func:`fused_ce.cross_entropy`'s, the same on every rank: the prediction is
            each rank's argmax merged across ranks (one more all_gather of 2N values).

    Returns:
        The loss: a scalar, or ``logits_shard.shape[:-1]`` for ``'none'``; the same on
        every rank.

    Communication per call: one all_gather of ``3N`` values (``3N + 1`` with
    ``weight``) from each rank, in float32 (float64 for float64 logits), whatever
    ``V`` is; above ``ALL_GATHER_MAX_RANKS`` ranks, a MAX all-reduce of ``N`` and a
    SUM all-reduce of ``3N`` (``+1``) values instead. Backward: none. Memory: the
    logits are kept for backward (no copy), plus a few per-row vectors.
    """
    cap = _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap, temperature, logit_scale)
    checks.check_floating(logits_shard, "logits_shard")
    if logits_shard.dim() == 0 or logits_shard.shape[-1] == 0:
        raise checks.ArgumentError(
            f"logits_shard must have a non-empty class dimension last, got shape {tuple(logits_shard.shape)}"
        )
    checks.check_device(logits_shard.device)
    local_size = logits_shard.shape[-1]
    batch_shape = logits_shard.shape[:-1]
    rows = _target_rows(target, logits_shard, "logits_shard")
    class_weight = _class_weight(weight, local_size, logits_shard, "weight")
    plan = make_plan(local_size, group, logits_shard.device, vocab_sizes, vocab_start, vocab_total, ignore_index,
                      label_smoothing, cap, logit_scale, temperature,
                     return_stats)

    logits = as_rows(logits_shard, -1)
    loss, lse, denominator, predicted = _VocabParallelRows.apply(logits, rows, class_weight, plan)
    out_dtype = result_dtype(logits_shard.dtype, logits_shard.device.type, loss_dtype)
    return _result(loss, lse, predicted, rows, _counted(rows, plan, denominator), reduction, z_loss, batch_shape,
                   out_dtype, return_stats)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,
    weight_shard: Tensor,
    target: Tensor,
    *,
    bias_shard: Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    class_weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | tuple[int | None, int] | None = None,
    reduce_input_grad: bool = True,
    vocab_sizes: Sequence[int] | None = None,
    vocab_start: int | None = None,
    vocab_total: int | None = None,
    loss_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    return_stats: bool = False,
) -> Tensor:
    """``vocab_parallel_cross_entropy(F.linear(input, weight_shard, bias_shard), target)`` without the logits.

    The LM head's weight is sharded by vocabulary rows across ``group``: rank ``r``
    holds rows ``[vocab_start_r, vocab_start_r + V_r)`` of the ``(V, H)`` weight, in
    rank order (sizes may differ). No rank materialises its ``(N, V_r)`` logits:
    forward runs blocks of rows x classes through the matmul and the statistics
    kernel (the loops and the chunk plan of :mod:`fused_ce.linear`); after the one
    collective of per-row statistics, backward recomputes each block's logits and
    turns them into gradients of ``input``, ``weight_shard`` and ``bias_shard``.
    Extra memory: one block buffer, the gradients (fp32 for fp16/bf16 operands until
    they are rounded once; the weight's in its dtype in the all-rows plan) and O(N)
    statistics. Compute: four matmuls per block against three for ``F.linear``
    forward and backward,
    because the gradient needs the full rows' ``lse``, known only after the merge
    (the single-device :func:`fused_ce.linear_cross_entropy` computes it in forward).

    The input's gradient: ``input`` is replicated, so the full gradient is the sum
    over ranks of each rank's part (``grad_logits_r @ weight_r``).

    * ``reduce_input_grad=True`` (default): backward all-reduces it (one SUM of
      ``N x H`` values), so every rank's ``input.grad`` is the full gradient, as
      when the input is the output of replicated layers.
    * ``reduce_input_grad=False``: backward leaves this rank's partial sum, for a
      surrounding tensor-parallel layer that all-reduces the input gradient itself
      (Megatron's ``copy_to_tensor_model_parallel_region`` in front of a
      column-parallel LM head does). Reducing twice would count it ``P`` times.

    Under ``torch.autocast`` the matmuls run in autocast's dtype, as ``F.linear``'s
    would (the statistics are float32 regardless); gradients reach float32
    parameters through the casts as usual.

    Args:
        input: ``(N, H)`` or ``(B, T, H)`` (any ``(..., H)``), the same on every rank.
        weight_shard: ``(V_r, H)``, the input's dtype and device.
        target: class indices into the full vocabulary, ``input.shape[:-1]``.
        bias_shard: optional ``(V_r,)``.
        class_weight: optional class weights, this rank's slice ``(V_r,)``
            (``F.cross_entropy``'s ``weight``; named so to tell it from the head's).
        chunk_size: as :func:`fused_ce.linear_cross_entropy`'s, for ``V_r`` classes:
            rows per chunk, ``(rows, classes)`` or ``(None, classes)`` per block, or
            None for :func:`fused_ce.linear.chunk_plan`'s rule (``FUSED_CE_LINEAR_CHUNK_MB``).
        The other arguments are those of :func:`vocab_parallel_cross_entropy`.

    Returns:
        The loss (dtype as :func:`vocab_parallel_cross_entropy`'s), the same on every
        rank (shape ``input.shape[:-1]`` for ``'none'``).
    """
    cap = _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap, temperature, logit_scale)
    checks.check_floating(input, "input")
    checks.check_floating(weight_shard, "weight_shard")
    if torch.is_autocast_enabled(input.device.type):
        # The matmul in autocast's dtype, as F.linear would run it; the casts stay
        # outside the Function, so the gradients reach fp32 parameters as usual.
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight_shard = input.to(dtype), weight_shard.to(dtype)
        bias_shard = bias_shard.to(dtype) if isinstance(bias_shard, Tensor) else bias_shard
    if input.dim() == 0:
        raise checks.ArgumentError("input must have a feature dimension last: (N, H) or (B, T, H), got a scalar")
    hidden = input.shape[-1]
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden or weight_shard.shape[0] == 0:
        raise checks.ArgumentError(
            f"weight_shard must have shape (V_r, H) = (this rank's classes, {hidden}), got {tuple(weight_shard.shape)}"
        )
    if weight_shard.dtype != input.dtype or weight_shard.device != input.device:
        raise checks.ArgumentError(
            f"weight_shard must have the input's dtype and device ({input.dtype}, {input.device}), "
            f"got {weight_shard.dtype}, {weight_shard.device}"
        )
    local_size = weight_shard.shape[0]
    if bias_shard is not None and (
        not isinstance(bias_shard, Tensor)
        or bias_shard.shape != (local_size,)
        or bias_shard.dtype != input.dtype
        or bias_shard.device != input.device
    ):
        raise checks.ArgumentError(
            f"bias_shard must be None or a ({local_size},) tensor with the input's dtype and device"
        )
    checks.check_device(input.device)
    batch_shape = input.shape[:-1]
    rows = _target_rows(target, input, "input")
    cw = _class_weight(class_weight, local_size, input, "class_weight")
    plan = make_plan(local_size, group, input.device, vocab_sizes, vocab_start, vocab_total, ignore_index,
                      label_smoothing, cap, logit_scale, temperature,
                     return_stats)

    x = input.reshape(math.prod(batch_shape), hidden)
    chunk = chunk_plan(local_size, input.dtype, input.device, chunk_size,
                       weight_grad=torch.is_grad_enabled() and weight_shard.requires_grad)
    loss, lse, denominator, predicted = _VocabParallelLinearRows.apply(
        x, weight_shard, bias_shard, rows, cw, plan, chunk, bool(reduce_input_grad)
    )
    out_dtype = result_dtype(input.dtype, input.device.type, loss_dtype)
    return _result(loss, lse, predicted, rows, _counted(rows, plan, denominator), reduction, z_loss, batch_shape,
                   out_dtype, return_stats)
