"""The merge of vocabulary-slice statistics across the ranks of a process group.

See :mod:`fused_ce.distributed` for the math. This module finds each rank's slice of
the vocabulary (:func:`make_plan`), runs the one collective of per-row statistics and
merges them into the full rows' (:func:`merge`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import ArgumentError

# Up to this many ranks the statistics travel in one all_gather (P * 3N values);
# beyond, in a MAX and a SUM all-reduce (4N values, two latencies). See the module
# docstring; the crossover depends on the interconnect, 8 is one NVLink domain.
ALL_GATHER_MAX_RANKS = 8


@dataclass(frozen=True)
class Plan:
    """Everything about a call that is not a tensor: the group, the slice, the options."""

    group: dist.ProcessGroup | None
    world_size: int
    vocab_start: int
    vocab_total: int
    ignore_index: int
    label_smoothing: float
    softcap: float  # 0 = off, as the ops take it
    logit_scale: float = 1.0
    temperature: float = 1.0
    stats: bool = False  # also the rows' prediction (return_stats)

    @property
    def op_options(self) -> tuple:
        """The trailing arguments of the fused_ce ops."""
        return (self.ignore_index, self.label_smoothing, self.softcap, self.vocab_start, self.vocab_total,
                self.logit_scale, self.temperature)


def _group_layout(group) -> tuple[int, int]:
    """(rank, world size) of this process in ``group``, with messages in user terms."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group() first "
            "(torchrun sets up its environment), or use fused_ce.cross_entropy for logits that are not sharded"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ArgumentError("group: this process is not a member of the given process group")
    return rank, dist.get_world_size(group)


def _vocab_range(local_size: int, rank: int, world_size: int, group, device, vocab_sizes, vocab_start, vocab_total):
    """(vocab_start, vocab_total) of this rank's slice: from the arguments, or found with one all_gather."""
    if vocab_sizes is not None:
        if vocab_start is not None or vocab_total is not None:
            raise ArgumentError("pass either vocab_sizes or vocab_start and vocab_total, not both")
        sizes = [int(s) for s in vocab_sizes]
        if len(sizes) != world_size:
            raise ArgumentError(
                f"vocab_sizes must have one entry per rank of the group ({world_size}), got {len(sizes)}"
            )
        if any(s <= 0 for s in sizes):
            raise ArgumentError(f"vocab_sizes must be positive, got {sizes}")
        if sizes[rank] != local_size:
            raise ArgumentError(
                f"vocab_sizes[{rank}] = {sizes[rank]}, but this rank (rank {rank} of the group) holds "
                f"{local_size} classes"
            )
        return sum(sizes[:rank]), sum(sizes)
    if (vocab_start is None) != (vocab_total is None):
        raise ArgumentError("vocab_start and vocab_total must be given together (or neither, or vocab_sizes instead)")
    if vocab_start is not None:
        start, total = int(vocab_start), int(vocab_total)
        if not (start >= 0 and start + local_size <= total):
            raise ArgumentError(
                f"this rank's classes [vocab_start, vocab_start + {local_size}) = [{start}, {start + local_size}) "
                f"must lie within [0, vocab_total) = [0, {total})"
            )
        if world_size == 1 and (start, total) != (0, local_size):
            raise ArgumentError(f"a group of one rank must hold every class: vocab_start 0, vocab_total {local_size}")
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


def make_plan(local_size, group, device, vocab_sizes, vocab_start, vocab_total, ignore_index, label_smoothing, cap,
              logit_scale=1.0, temperature=1.0, stats=False):
    rank, world_size = _group_layout(group)
    start, total = _vocab_range(local_size, rank, world_size, group, device, vocab_sizes, vocab_start, vocab_total)
    return Plan(group, world_size, start, total, ignore_index, float(label_smoothing), cap, logit_scale * 1.0,
                temperature * 1.0, bool(stats))


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


def merge(loss_s: Tensor, lse_s: Tensor, mass_s: Tensor, extra: Tensor | None, plan: Plan):
    """The full rows' (loss, lse, mass) [N] from this rank's slice statistics, and the sum of `extra` over ranks.

    `extra` is one value per rank that only needs summing (the class weight of the
    targets this slice owns: the 'mean' denominator with class weights).
    """
    n = loss_s.shape[0]
    extras = [] if extra is None else [extra.reshape(1).to(loss_s.dtype)]
    if plan.world_size == 1:
        loss, lse, mass = _merge_stacked(loss_s[None], lse_s[None], mass_s[None])
        return loss, lse, mass, extra
    if plan.world_size <= ALL_GATHER_MAX_RANKS:
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


def owned_target_weight(rows: Tensor, weight: Tensor, plan: Plan) -> Tensor:
    """Sum of weight[y_i] over the non-ignored rows whose target class lies in this slice."""
    local = rows - plan.vocab_start
    owned = (rows != plan.ignore_index) & (local >= 0) & (local < weight.shape[0])
    w = weight.gather(0, local.clamp(0, weight.shape[0] - 1))
    return torch.where(owned, w, torch.zeros_like(w)).sum()


def slice_statistics(logits: Tensor, rows: Tensor, weight: Tensor | None, plan: Plan):
    """(loss, lse, mass) of the merged rows, the global target weight and, with plan.stats, the rows'
    prediction (else None), from this rank's logits slice."""
    op = torch.ops.fused_ce.cross_entropy_forward
    loss_s, lse_s, mass_s, *prediction = (op.stats if plan.stats else op)(logits, rows, weight, *plan.op_options)
    extra = None if weight is None else owned_target_weight(rows, weight, plan)
    predicted = merge_prediction(*prediction, plan) if plan.stats else None
    return (*merge(loss_s, lse_s, mass_s, extra, plan), predicted)


def merge_prediction(index: Tensor, value: Tensor, plan: Plan) -> Tensor:
    """The full rows' argmax [N] from each rank's (argmax within its slice, that logit): the largest
    logit, a NaN the largest, ties to the lowest class -- the lowest rank, as slices are in rank
    order -- as torch.argmax over the full rows. One all_gather of 2N values (float64: exact for
    both the logits and the class indices)."""
    global_index = index + plan.vocab_start
    if plan.world_size == 1:
        return global_index
    packed = torch.stack([value.to(torch.float64), global_index.to(torch.float64)]).reshape(-1)
    gathered = packed.new_empty(plan.world_size * packed.numel())
    _all_gather(gathered, packed, plan.group)
    gathered = gathered.view(plan.world_size, 2, -1)
    best_rank = gathered[:, 0].argmax(0, keepdim=True)  # torch.argmax: a NaN is the max; ties, the first
    return gathered[:, 1].gather(0, best_rank).squeeze(0).long()


def denominator_of(rows: Tensor, plan: Plan, target_weight: Tensor | None) -> Tensor:
    """The 'mean' denominator: the non-ignored rows, or their targets' total class weight."""
    return (rows != plan.ignore_index).sum() if target_weight is None else target_weight


def backward_coefficients(g_loss: Tensor, g_lse: Tensor, mass: Tensor) -> tuple[Tensor, Tensor]:
    """(p_coef, t_coef) of the backward op for upstream gradients on the rows' loss and lse."""
    g_loss = g_loss.to(mass.dtype)
    return (g_loss * mass + g_lse.to(mass.dtype)).contiguous(), g_loss.contiguous()
