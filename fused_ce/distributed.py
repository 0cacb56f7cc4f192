"""Cross-entropy over a vocabulary sharded across the ranks of a process group.

In tensor (vocabulary) parallel training each rank holds a contiguous slice of the
classes, in rank order -- the columns ``[vocab_start, vocab_start + V_s)`` of the
logits, or the matching rows of the LM head's weight -- and nobody holds a full row.
Each rank's kernel computes per-row statistics of its slice (``ops.py``)::

    loss_s = sum_{c in s} T_c (lse_s - z_c),   lse_s = logsumexp_{c in s} z_c,   mass_s = sum_{c in s} T_c

with the target distribution ``T`` over the *full* vocabulary (a target in another
slice adds no one-hot entry here; label smoothing spreads over every class). They
merge exactly into the full row's, with ``M = max_s lse_s`` as a shared reference so
that every term is >= 0 (no cancellation)::

    lse  = M + log sum_s exp(lse_s - M)
    loss = sum_s (loss_s + mass_s (M - lse_s)) + mass (lse - M),   mass = sum_s mass_s

and the gradient restricted to a slice is the backward op on that slice with the
global ``lse`` and ``mass``, so backward needs no communication at all (except the
input gradient of the fused linear head, which is a sum over ranks by nature).

Communication, per call: the statistics are O(N), whatever the vocabulary size.
Merging needs a reference every rank shares (a sum of ``exp(lse_s - R)`` over ranks
overflows or underflows unless ``R`` is near ``max_s lse_s``, and no rank knows that
alone), so there are two ways to do it:

* ``all_gather`` (the default up to ``_ALL_GATHER_MAX_RANKS`` ranks): every rank
  sends its ``3N`` values (+1 with class weights) and merges all ``P`` of them
  locally. One collective, and every rank computes bitwise the same loss.
* ``all_reduce``: a MAX all-reduce of ``lse_s`` (``N`` values), then one SUM
  all-reduce of ``[exp(lse_s - M), loss_s + mass_s (M - lse_s), mass_s]`` (``3N``).
  Two latency-bound collectives, but the bytes do not grow with ``P``.

At the sizes of a training step (N ~ 10^4 rows: 100-200 KB of statistics) a
collective costs its latency, not its bytes, so one all_gather beats two
all-reduces within a node; the all-reduce pair wins only when ``P`` is large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from .functional import _check_device, _check_extras, _check_reduction, _nan_if_empty, _safe_inverse
from .linear import Head, chunk_plan, shard_gradients, shard_statistics
from .ops import accumulate_dtype

# Up to this many ranks the statistics travel in one all_gather (P * 3N values);
# beyond, in a MAX and a SUM all-reduce (4N values, two latencies). See the module
# docstring; the crossover depends on the interconnect, 8 is one NVLink domain.
_ALL_GATHER_MAX_RANKS = 8


@dataclass(frozen=True)
class _Plan:
    """Everything about a call that is not a tensor: the group, the slice, the options."""

    group: dist.ProcessGroup | None
    world_size: int
    vocab_start: int
    vocab_total: int
    ignore_index: int
    label_smoothing: float
    softcap: float  # 0 = off, as the ops take it

    @property
    def op_options(self) -> tuple:
        """The trailing arguments of the fused_ce ops."""
        return (self.ignore_index, self.label_smoothing, self.softcap, self.vocab_start, self.vocab_total)


# ---------------------------------------------------------------------------------
# Arguments and the vocabulary layout


def _group_layout(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``, with messages in user terms."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() first "
            "(torchrun sets up its environment), or use fused_ce.cross_entropy for logits that are not sharded"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _vocab_range(local_size: int, rank: int, world_size: int, group, device, vocab_sizes, vocab_start, vocab_total):
    """(vocab_start, vocab_total) of this rank's slice: from the arguments, or found with one all_gather."""
    if vocab_sizes is not None:
        if vocab_start is not None or vocab_total is not None:
            raise ValueError("pass either vocab_sizes or vocab_start and vocab_total, not both")
        sizes = [int(s) for s in vocab_sizes]
        if len(sizes) != world_size:
            raise ValueError(f"vocab_sizes must have one entry per rank of the group ({world_size}), got {len(sizes)}")
        if any(s <= 0 for s in sizes):
            raise ValueError(f"vocab_sizes must be positive, got {sizes}")
        if sizes[rank] != local_size:
            raise ValueError(
                f"vocab_sizes[{rank}] = {sizes[rank]}, but this rank (rank {rank} of the group) holds "
                f"{local_size} classes"
            )
        return sum(sizes[:rank]), sum(sizes)
    if (vocab_start is None) != (vocab_total is None):
        raise ValueError("vocab_start and vocab_total must be given together (or neither, or vocab_sizes instead)")
    if vocab_start is not None:
        start, total = int(vocab_start), int(vocab_total)
        if not (0 <= start and start + local_size <= total):
            raise ValueError(
                f"this rank's classes [vocab_start, vocab_start + {local_size}) = [{start}, {start + local_size}) "
                f"must lie within [0, vocab_total) = [0, {total})"
            )
        if world_size == 1 and (start, total) != (0, local_size):
            raise ValueError(f"a group of one rank must hold every class: vocab_start 0, vocab_total {local_size}")
        return start, total
    if world_size == 1:
        return 0, local_size
    # Discovery: one tiny collective, and a host synchronisation (the slice bounds
    # are op arguments). Pass vocab_sizes or vocab_start/vocab_total to avoid both.
    mine = torch.tensor([local_size], dtype=torch.int64, device=device)
    gathered = torch.empty(world_size, dtype=torch.int64, device=device)
    _all_gather(gathered, mine, group)
    sizes = gathered.tolist()
    return sum(sizes[:rank]), sum(sizes)


def _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap) -> float:
    """Checks the loss options as fused_ce.cross_entropy does; returns the soft-cap as the ops take it."""
    _check_reduction(reduction)
    cap = _check_extras(z_loss, softcap)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
        0.0 <= float(label_smoothing) <= 1.0
    ):
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    return cap


def _target_rows(target, source: Tensor, name: str) -> Tensor:
    """The target as int64 rows; it must have the shape of `source` (the tensor called `name`) without its last dim."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold class indices (an integer dtype), got {target.dtype}")
    if target.shape != source.shape[:-1]:
        raise ValueError(
            f"target must have shape {tuple(source.shape[:-1])} for {name} of shape {tuple(source.shape)}, "
            f"got {tuple(target.shape)}"
        )
    if target.device != source.device:
        raise ValueError(f"{name} and target must be on the same device, got {source.device} and {target.device}")
    return target.reshape(-1).long()


def _class_weight(weight, local_size: int, device, dtype: torch.dtype, name: str) -> Tensor | None:
    """This rank's slice of the class weights, in the accumulation dtype, or None."""
    if weight is None:
        return None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point Tensor or None")
    if weight.shape != (local_size,):
        raise ValueError(
            f"{name} must hold this rank's slice of the class weights, shape ({local_size},), got {tuple(weight.shape)}"
        )
    if weight.device != device:
        raise ValueError(f"{name} must be on the logits' device ({device}), got {weight.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(f"{name}: gradients with respect to class weights are not supported; pass .detach()")
    return weight.to(accumulate_dtype(dtype)).contiguous()


def _make_plan(local_size, group, device, vocab_sizes, vocab_start, vocab_total, ignore_index, label_smoothing, cap):
    rank, world_size = _group_layout(group)
    start, total = _vocab_range(local_size, rank, world_size, group, device, vocab_sizes, vocab_start, vocab_total)
    return _Plan(group, world_size, start, total, ignore_index, float(label_smoothing), cap)


# ---------------------------------------------------------------------------------
# The merge: one collective of O(N) values


def _all_gather(out: Tensor, inp: Tensor, group) -> None:
    # all_gather_single is all_gather_into_tensor's new name (torch >= 2.14).
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _merge_stacked(loss_s: Tensor, lse_s: Tensor, mass_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Merges the statistics of P slices, [P, N] each, into the full rows' (loss, lse, mass), [N] each."""
    top = lse_s.amax(0)  # NaN-propagating
    # Rows where every slice is empty (all logits -inf) keep lse = -inf, as logsumexp does.
    ref = torch.where(top == -math.inf, torch.zeros_like(top), top)
    lse = ref + torch.log(torch.exp(lse_s - ref).sum(0))
    mass = mass_s.sum(0)
    # mass_s = 0 (ignored rows, slices without target mass) must add 0 even if lse_s = -inf.
    gap = torch.where(mass_s == 0, torch.zeros_like(mass_s), mass_s * (ref - lse_s))
    loss = (loss_s + gap).sum(0) + torch.where(mass == 0, torch.zeros_like(mass), mass * (lse - ref))
    return loss, lse, mass


def _merge(loss_s: Tensor, lse_s: Tensor, mass_s: Tensor, extra: Tensor | None, plan: _Plan):
    """The full rows' (loss, lse, mass) [N] from this rank's slice statistics, and the sum of `extra` over ranks.

    `extra` is one value per rank that only needs summing (the class weight of the
    targets this slice owns: the 'mean' denominator with class weights).
    """
    n = loss_s.shape[0]
    extras = [] if extra is None else [extra.reshape(1).to(loss_s.dtype)]
    if plan.world_size == 1:
        loss, lse, mass = _merge_stacked(loss_s[None], lse_s[None], mass_s[None])
        return loss, lse, mass, extra
    if plan.world_size <= _ALL_GATHER_MAX_RANKS:
        packed = torch.cat([loss_s, lse_s, mass_s, *extras])
        gathered = packed.new_empty(plan.world_size * packed.shape[0])  # the flat form: gloo takes no other
        _all_gather(gathered, packed, plan.group)
        gathered = gathered.view(plan.world_size, packed.shape[0])
        stats = gathered[:, : 3 * n].view(plan.world_size, 3, n)
        loss, lse, mass = _merge_stacked(stats[:, 0], stats[:, 1], stats[:, 2])
        return loss, lse, mass, (gathered[:, 3 * n].sum() if extras else None)
    # Two all-reduces: the shared reference first, then the sums relative to it.
    top = lse_s.clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=plan.group)
    ref = torch.where(top == -math.inf, torch.zeros_like(top), top)
    gap = torch.where(mass_s == 0, torch.zeros_like(mass_s), mass_s * (ref - lse_s))
    packed = torch.cat([torch.exp(lse_s - ref), loss_s + gap, mass_s, *extras])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=plan.group)
    lse = ref + torch.log(packed[:n])
    mass = packed[2 * n : 3 * n]
    loss = packed[n : 2 * n] + torch.where(mass == 0, torch.zeros_like(mass), mass * (lse - ref))
    return loss, lse, mass, (packed[3 * n] if extras else None)


def _owned_target_weight(rows: Tensor, weight: Tensor, plan: _Plan) -> Tensor:
    """Sum of weight[y_i] over the non-ignored rows whose target class lies in this slice."""
    local = rows - plan.vocab_start
    owned = (rows != plan.ignore_index) & (local >= 0) & (local < weight.shape[0])
    w = weight.gather(0, local.clamp(0, weight.shape[0] - 1))
    return torch.where(owned, w, torch.zeros_like(w)).sum()


def _slice_statistics(logits: Tensor, rows: Tensor, weight: Tensor | None, plan: _Plan):
    """(loss, lse, mass) of the merged rows and the global target weight, from this rank's logits slice."""
    loss_s, lse_s, mass_s = torch.ops.fused_ce.cross_entropy_forward(logits, rows, weight, *plan.op_options)
    extra = None if weight is None else _owned_target_weight(rows, weight, plan)
    return _merge(loss_s, lse_s, mass_s, extra, plan)


def _denominator(rows: Tensor, plan: _Plan, target_weight: Tensor | None) -> Tensor:
    """The 'mean' denominator: the non-ignored rows, or their targets' total class weight."""
    return (rows != plan.ignore_index).sum() if target_weight is None else target_weight


def _backward_coefficients(g_loss: Tensor, g_lse: Tensor, mass: Tensor) -> tuple[Tensor, Tensor]:
    """(p_coef, t_coef) of the backward op for upstream gradients on the rows' loss and lse."""
    g_loss = g_loss.to(mass.dtype)
    return (g_loss * mass + g_lse.to(mass.dtype)).contiguous(), g_loss.contiguous()


# ---------------------------------------------------------------------------------
# Autograd


class _VocabParallelRows(torch.autograd.Function):
    """Logits slice [N, V_s] -> the full rows' (loss [N], lse [N]) and the 'mean' denominator."""

    @staticmethod
    def forward(ctx, logits, rows, weight, plan):
        loss, lse, mass, target_weight = _slice_statistics(logits, rows, weight, plan)
        denominator = _denominator(rows, plan, target_weight)
        ctx.save_for_backward(logits, rows, weight, lse, mass)
        ctx.plan = plan
        ctx.mark_non_differentiable(denominator)
        return loss, lse, denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_lse, _g_denominator):
        logits, rows, weight, lse, mass = ctx.saved_tensors
        p_coef, t_coef = _backward_coefficients(g_loss, g_lse, mass)
        grad = torch.ops.fused_ce.cross_entropy_backward(
            logits, rows, weight, lse, p_coef, t_coef, *ctx.plan.op_options
        )
        return grad, None, None, None


def _head(x, weight, bias, rows, class_weight, plan: _Plan, chunk: tuple[int, int]) -> Head:
    """The chunked linear + cross-entropy problem of this rank's slice (fused_ce/linear.py); chunk = (rows, classes)."""
    return Head(x, weight, bias, rows, class_weight, plan.ignore_index, plan.label_smoothing, plan.softcap, chunk[0],
                plan.vocab_start, plan.vocab_total, classes=chunk[1])


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
            loss_s, lse_s, mass_s = shard_statistics(_head(x, weight, bias, rows, class_weight, plan, chunk))
        extra = None if class_weight is None else _owned_target_weight(rows, class_weight, plan)
        loss, lse, mass, target_weight = _merge(loss_s, lse_s, mass_s, extra, plan)
        denominator = _denominator(rows, plan, target_weight)
        ctx.save_for_backward(x, weight, bias, rows, class_weight, lse, mass)
        ctx.plan, ctx.chunk, ctx.reduce_input_grad = plan, chunk, reduce_input_grad
        ctx.mark_non_differentiable(denominator)
        return loss, lse, denominator

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss, g_lse, _g_denominator):
        x, weight, bias, rows, class_weight, lse, mass = ctx.saved_tensors
        plan = ctx.plan
        needs = tuple(ctx.needs_input_grad[:3])
        p_coef, t_coef = _backward_coefficients(g_loss, g_lse, mass)
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


def _reduce(loss: Tensor, lse: Tensor, rows: Tensor, denominator: Tensor, plan: _Plan, reduction: str,
            z_loss: float, batch_shape, dtype: torch.dtype) -> Tensor:
    """The reduction and the z-loss term (as fused_ce.cross_entropy defines them) on the merged rows."""
    valid = rows != plan.ignore_index
    z_rows = None
    if z_loss:
        # lse of ignored rows is masked before squaring (it may be inf), so neither it nor its gradient leak.
        z_rows = torch.where(valid, lse, torch.zeros_like(lse)).square()
    if reduction == "none":
        out = loss if z_rows is None else loss + z_loss * z_rows
        return out.reshape(batch_shape).to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = _nan_if_empty(total * _safe_inverse(denominator, total.dtype), denominator)
    if z_rows is not None:
        z_total = z_rows.sum()
        if reduction == "mean":
            z_total = z_total * _safe_inverse(valid.sum(), z_total.dtype)
        total = total + z_loss * z_total
    return total.to(dtype)


# ---------------------------------------------------------------------------------
# Public API


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

    Returns:
        The loss in the logits' dtype: a scalar, or ``logits_shard.shape[:-1]`` for
        ``'none'``; the same on every rank.

    Communication per call: one all_gather of ``3N`` values (``3N + 1`` with
    ``weight``) from each rank, in float32 (float64 for float64 logits), whatever
    ``V`` is; above ``_ALL_GATHER_MAX_RANKS`` ranks, a MAX all-reduce of ``N`` and a
    SUM all-reduce of ``3N`` (``+1``) values instead. Backward: none. Memory: the
    logits are kept for backward (no copy), plus a few per-row vectors.
    """
    cap = _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap)
    if not isinstance(logits_shard, Tensor) or not logits_shard.is_floating_point():
        raise TypeError("logits_shard must be a floating-point Tensor")
    if logits_shard.dim() == 0 or logits_shard.shape[-1] == 0:
        raise ValueError(
            f"logits_shard must have a non-empty class dimension last, got shape {tuple(logits_shard.shape)}"
        )
    _check_device(logits_shard.device)
    local_size = logits_shard.shape[-1]
    batch_shape = logits_shard.shape[:-1]
    rows = _target_rows(target, logits_shard, "logits_shard")
    class_weight = _class_weight(weight, local_size, logits_shard.device, logits_shard.dtype, "weight")
    plan = _make_plan(local_size, group, logits_shard.device, vocab_sizes, vocab_start, vocab_total, ignore_index,
                      label_smoothing, cap)

    logits = logits_shard.reshape(-1, local_size)
    if logits.stride(1) != 1 and local_size > 1:
        logits = logits.contiguous()
    loss, lse, denominator = _VocabParallelRows.apply(logits, rows, class_weight, plan)
    return _reduce(loss, lse, rows, denominator, plan, reduction, z_loss, batch_shape, logits_shard.dtype)


def vocab_parallel_linear_cross_entropy(
    input: Tensor,  # noqa: A002 - F.linear's name
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
        The loss in the input's dtype, the same on every rank (shape
        ``input.shape[:-1]`` for ``'none'``).
    """
    cap = _check_options(reduction, label_smoothing, ignore_index, z_loss, softcap)
    for name, t in (("input", input), ("weight_shard", weight_shard)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point Tensor")
    if torch.is_autocast_enabled(input.device.type):
        # The matmul in autocast's dtype, as F.linear would run it; the casts stay
        # outside the Function, so the gradients reach fp32 parameters as usual.
        dtype = torch.get_autocast_dtype(input.device.type)
        input, weight_shard = input.to(dtype), weight_shard.to(dtype)
        bias_shard = bias_shard.to(dtype) if isinstance(bias_shard, Tensor) else bias_shard
    if input.dim() == 0:
        raise ValueError("input must have a feature dimension last: (N, H) or (B, T, H), got a scalar")
    hidden = input.shape[-1]
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden or weight_shard.shape[0] == 0:
        raise ValueError(
            f"weight_shard must have shape (V_r, H) = (this rank's classes, {hidden}), got {tuple(weight_shard.shape)}"
        )
    if weight_shard.dtype != input.dtype or weight_shard.device != input.device:
        raise ValueError(
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
        raise ValueError(f"bias_shard must be None or a ({local_size},) tensor with the input's dtype and device")
    _check_device(input.device)
    batch_shape = input.shape[:-1]
    rows = _target_rows(target, input, "input")
    cw = _class_weight(class_weight, local_size, input.device, input.dtype, "class_weight")
    plan = _make_plan(local_size, group, input.device, vocab_sizes, vocab_start, vocab_total, ignore_index,
                      label_smoothing, cap)

    x = input.reshape(-1, hidden)
    chunk = chunk_plan(local_size, input.dtype, input.device, chunk_size,
                       weight_grad=torch.is_grad_enabled() and weight_shard.requires_grad)
    loss, lse, denominator = _VocabParallelLinearRows.apply(
        x, weight_shard, bias_shard, rows, cw, plan, chunk, bool(reduce_input_grad)
    )
    return _reduce(loss, lse, rows, denominator, plan, reduction, z_loss, batch_shape, input.dtype)


__all__ = ["vocab_parallel_cross_entropy", "vocab_parallel_linear_cross_entropy"]
