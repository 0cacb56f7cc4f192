"""The loops of the linear path: blocks of logits made by a matmul, consumed at once.

A :class:`Head` is one linear + cross-entropy problem in rows (possibly a vocabulary
shard). Its logits are made block by block (:mod:`fused_ce.linear.plan`) in one
reused buffer, and each block goes through the fused kernels:

* whole rows, gradient wanted (``fused_objective_and_gradients``): per chunk of rows,
  ``logits = x_c @ W.T (+ b)``, then loss and ``d loss / d logits`` written over the
  logits (``cross_entropy_fused_``), absorbed at once by ``grad_x_c = G @ W``,
  ``grad_W += G.T @ x_c``, ``grad_b += G.sum(0)``: three matmuls, as many as
  ``F.linear`` forward and backward;
* blocks of classes: per chunk of rows, a statistics pass (``cross_entropy_forward``
  on each vocabulary slice, merged into the rows' lse), then a gradient pass that
  makes each block's logits again (``cross_entropy_backward_``): one matmul more;
* statistics only (``shard_statistics``) and gradients for given per-row coefficients
  (``shard_gradients``): the two halves, for backward and for vocabulary shards.

Gradients that sum over chunks or blocks accumulate in fp32 for fp16/bf16 and are
rounded once, after the upstream scale -- but for the weight's in the all-rows plan,
which has no sum over chunks: rounded once when made (through an fp32-output
matmul), and once more if the upstream gradient is a scalar other than 1.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..ops import accumulate_dtype
from .plan import ALL_ROWS, block_classes, budget_bytes, compute_dtype, device_key, grad_weight_dtype


@dataclass(frozen=True)
class Head:
    """One linear + cross-entropy problem, in rows, possibly on a shard of the vocabulary.

    Shapes: ``input [N, D]``; ``weight [V, D]`` and ``bias [V]`` (or None) in the
    input's dtype; ``target [N]`` int64 class indices (global: in
    ``[0, vocab_total)``) or ``[N, V]`` probabilities of this shard's classes;
    ``class_weight [V]`` (this shard's) in the accumulation dtype, or None. The
    weight's rows are the classes ``[vocab_start, vocab_start + V)`` of
    ``vocab_total`` (-1: all of them, ``V``). Blocks of logits are ``rows x
    classes`` (``classes`` -1: all of the head's; see :func:`chunk_plan`).
    """

    input: Tensor
    weight: Tensor
    bias: Tensor | None
    target: Tensor
    class_weight: Tensor | None
    ignore_index: int
    label_smoothing: float
    softcap: float
    rows: int
    vocab_start: int = 0
    vocab_total: int = -1
    classes: int = -1
    logit_scale: float = 1.0  # the logits the loss sees: softcap(logit_scale * z) / temperature
    temperature: float = 1.0
    stats: bool = False  # also each row's argmax over the head's classes, and that logit

    @property
    def num_rows(self) -> int:
        return self.input.shape[0]

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def block_classes(self) -> int:
        """Classes per block of logits."""
        return self.num_classes if self.classes < 0 else min(self.classes, self.num_classes)

    @property
    def all_rows(self) -> bool:
        """The all-rows plan (``rows`` ALL_ROWS): one chunk of every row."""
        return self.rows == ALL_ROWS

    def planned(self) -> Head:
        """The all-rows plan made concrete: ``rows`` N, and ``classes`` from the budget if -1."""
        if not self.all_rows:
            return self
        rows = max(self.num_rows, 1)
        classes = self.classes
        if classes < 0:
            itemsize = compute_dtype(self.input.dtype, self.input.device).itemsize
            budget = budget_bytes(device_key(self.input.device))
            classes = block_classes(budget, rows, itemsize)
        return replace(self, rows=rows, classes=classes)

    @property
    def whole_rows(self) -> bool:
        """One block holds whole rows of this head's classes (the one-pass fused path)."""
        return self.block_classes == self.num_classes

    def in_compute_dtype(self) -> Head:
        """The same problem with the matmul operands in the compute dtype (CPU fp16/bf16: fp32)."""
        dtype = compute_dtype(self.input.dtype, self.input.device)
        if dtype == self.input.dtype:
            return self
        target = self.target.to(dtype) if self.target.is_floating_point() else self.target
        bias = None if self.bias is None else self.bias.to(dtype)
        return replace(self, input=self.input.to(dtype), weight=self.weight.to(dtype), bias=bias, target=target)


class _Blocks:
    """The blocks of a head's logits: chunks of rows x blocks of classes, and the buffer they share.

    One buffer serves every block: on the CPU a fresh large buffer costs its page
    faults (first touch) each time, more than the loss kernel.
    """

    def __init__(self, head: Head):
        self.head = head
        rows, classes = min(head.rows, head.num_rows), head.block_classes
        self.buffer = head.input.new_empty(rows * classes)

    def row_chunks(self):
        """slice(start, stop) of the rows, chunk by chunk."""
        n, step = self.head.num_rows, self.head.rows
        return [slice(start, min(start + step, n)) for start in range(0, n, step)]

    def class_blocks(self):
        """slice(start, stop) of the head's classes, block by block."""
        v, step = self.head.num_classes, self.head.block_classes
        return [slice(start, min(start + step, v)) for start in range(0, v, step)]

    def logits(self, rows: slice, classes: slice) -> Tensor:
        """``input[rows] @ weight[classes].T + bias[classes]`` into the buffer: contiguous ``[r, c]``."""
        h = self.head
        x, w = h.input[rows], h.weight[classes]
        out = self.buffer[: x.shape[0] * w.shape[0]].view(x.shape[0], w.shape[0])
        if h.bias is None:
            torch.mm(x, w.t(), out=out)
        else:
            torch.addmm(h.bias[classes], x, w.t(), out=out)
        return out

    def op_args(self, rows: slice, classes: slice) -> tuple:
        """(target, class weight, *options) of the cross-entropy ops for one block."""
        h = self.head
        target = h.target[rows, classes] if h.target.is_floating_point() else h.target[rows]
        weight = None if h.class_weight is None else h.class_weight[classes]
        if h.whole_rows:
            vocab = (h.vocab_start, h.vocab_total)
        else:
            total = h.vocab_total if h.vocab_total >= 0 else h.num_classes
            vocab = (h.vocab_start + classes.start, total)
        return (target, weight, h.ignore_index, h.label_smoothing, h.softcap) + vocab + (h.logit_scale, h.temperature)


class _Gradients:
    """The gradients of input ``[N, D]``, weight ``[V, D]`` and bias ``[V]``, block by block.

    They are kept in the accumulation dtype (fp32 for fp16/bf16), so that the sums
    over blocks lose nothing and the result is rounded once, after the upstream
    scale; on CUDA fp16/bf16 the matmuls write fp32 directly (cuBLAS ``out_dtype``),
    elsewhere the operands already have the accumulation dtype. The weight's, when
    each class block's is one matmul over all rows, is ``weight_dtype``
    (:func:`grad_weight_dtype`).
    """

    def __init__(self, head: Head, needs: tuple[bool, bool, bool], weight_dtype: torch.dtype):
        self.head = head
        acc = accumulate_dtype(head.input.dtype)
        x, w = head.input, head.weight
        self.input = x.new_empty(x.shape, dtype=acc) if needs[0] else None
        self.weight = w.new_empty(w.shape, dtype=weight_dtype) if needs[1] else None
        self.bias = w.new_zeros(w.shape[0], dtype=acc) if needs[2] else None

    def add(self, rows: slice, classes: slice, grad_logits: Tensor) -> None:
        """Adds the contribution of one block whose logits' gradient is ``grad_logits [r, c]``.

        The first block of each row chunk and the first chunk of each class block
        write instead of adding: no pass to zero-fill the gradients.
        """
        h = self.head
        if self.input is not None:
            out, w = self.input[rows], h.weight[classes]
            if classes.start == 0:
                _mm(grad_logits, w, out=out)
            else:
                _addmm_(out, grad_logits, w)
        if self.weight is not None:
            out, x = self.weight[classes], h.input[rows]
            if rows.start == 0:  # the first chunk (the only one of the all-rows plan)
                _mm(grad_logits.t(), x, out=out)
            else:
                _addmm_(out, grad_logits.t(), x)
        if self.bias is not None:
            self.bias[classes] += grad_logits.sum(0, dtype=self.bias.dtype)

    def result(self) -> tuple[Tensor, Tensor, Tensor]:
        """(input, weight, bias) gradients; an empty tensor for each one not asked for."""
        if self.weight is not None and self.head.num_rows == 0:
            self.weight.zero_()
        acc = accumulate_dtype(self.head.input.dtype)
        # A distinct empty tensor each: a custom op's outputs may not alias one another.
        grads = (self.input, self.weight, self.bias)
        return tuple(self.head.input.new_empty(0, dtype=acc) if g is None else g for g in grads)


# The fp32 scratch of a weight gradient written in fp16/bf16 (the all-rows plan):
# made in row blocks of at most this many bytes, each rounded once into the result.
_FP32_SCRATCH_BYTES = 64 * 2**20
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b, summed in fp32 for fp16/bf16 operands and rounded once to out's dtype.

    out may be fp32 for fp16/bf16 operands (CUDA: cuBLAS writes fp32), fp16/bf16 for
    fp32 operands (CPU), or fp16/bf16 for operands of its own dtype (the all-rows
    plan's weight gradient on CUDA). The last is made through an fp32-output matmul
    and rounded once -- per call, rather than by turning off cuBLAS's reduced-precision
    split-K reductions process-wide, which would change every other thread's matmuls.
    """
    mm_ok, _ = _fp32_output_support(a.device, a.dtype)
    if out.dtype == a.dtype and (a.dtype not in _LOW_PRECISION or not mm_ok):
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and mm_ok:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif out.dtype == a.dtype:  # fp16/bf16 result of fp16/bf16 operands, through fp32
        step = max(1, _FP32_SCRATCH_BYTES // (4 * max(out.shape[1], 1)))
        for i in range(0, out.shape[0], step):
            out[i : i + step].copy_(torch.mm(a[i : i + step], b, out_dtype=torch.float32))
    else:  # rounded once, as F.linear's gradient (a block-sized transient)
        out.copy_(torch.mm(a, b))


def _addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b; acc may be fp32 for fp16/bf16 operands (CUDA)."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    mm_ok, addmm_ok = _fp32_output_support(a.device, a.dtype)
    if addmm_ok:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        return
    # Row blocks of acc through a scratch no larger than a's block.
    step = max(1, a.numel() // max(1, b.shape[1]))
    for i in range(0, acc.shape[0], step):
        part = torch.mm(a[i : i + step], b, out_dtype=acc.dtype) if mm_ok else torch.mm(a[i : i + step], b)
        acc[i : i + step] += part


@functools.cache
def _fp32_output_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, bool]:
    """Whether ``mm`` and ``addmm`` into an fp32 accumulator take ``out_dtype=float32`` here.

    CUDA has them (cuBLAS accumulates in fp32 and writes fp32); some torch versions
    lack them or want ``addmm``'s ``self`` in the operands' dtype. Probed once with
    empty tensors: nothing is launched.
    """
    a = torch.empty(0, 1, device=device, dtype=dtype)
    b = torch.empty(1, 1, device=device, dtype=dtype)
    acc = torch.empty(0, 1, device=device, dtype=torch.float32)
    support = []
    for call in (lambda: torch.mm(a, b, out_dtype=torch.float32, out=acc),
                 lambda: torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)):
        try:
            call()
            support.append(True)
        except (RuntimeError, TypeError, NotImplementedError):
            support.append(False)
    return support[0], support[1]


def _times(a: Tensor, b: Tensor) -> Tensor:
    """a * b, but 0 where a is 0 (a block of -inf logits: 0 * inf)."""
    return torch.where(a == 0, 0.0, a * b)


def _merge_(total: tuple[Tensor, Tensor, Tensor], part: tuple[Tensor, Tensor, Tensor]) -> None:
    """Folds a class block's (loss, lse, mass) into the running ones of its rows, in place.

    loss = sum_s (loss_s + mass_s (lse - lse_s)): the running sum is kept relative
    to the running lse, and moved when it grows (every term is >= 0).
    """
    loss, lse, mass = total
    part_loss, part_lse, part_mass = part
    merged = torch.logaddexp(lse, part_lse)
    loss += _times(mass, merged - lse) + part_loss + _times(part_mass, merged - part_lse)
    mass += part_mass
    lse.copy_(merged)


def _take_better_(best: tuple[Tensor, Tensor], part: tuple[Tensor, Tensor]) -> None:
    """Folds a later class block's (argmax, max logit) into the running ones, in place: a larger
    logit wins, a NaN is the largest, ties keep the earlier (lower) class, as torch.argmax."""
    index, value = best
    part_index, part_value = part
    better = (part_value > value) | (part_value.isnan() & ~value.isnan())
    index.copy_(torch.where(better, part_index, index))
    value.copy_(torch.where(better, part_value, value))


def _row_statistics(blocks: _Blocks, rows: slice, out: tuple[Tensor, ...]) -> None:
    """(loss, lse, mass[, argmax, max logit]) of a chunk of rows over every class block, into ``out`` (views [r])."""
    op = torch.ops.fused_ce.cross_entropy_forward
    for k, classes in enumerate(blocks.class_blocks()):
        logits = blocks.logits(rows, classes)
        if blocks.head.stats:
            *stats, index, value = op.stats(logits, *blocks.op_args(rows, classes))
            prediction = (index + classes.start, value)
        else:
            stats, prediction = op(logits, *blocks.op_args(rows, classes)), ()
        if k == 0:
            for whole, part in zip(out, (*stats, *prediction)):
                whole.copy_(part)
        else:
            _merge_(out[:3], stats)
            if prediction:
                _take_better_(out[3:], prediction)


def _row_gradients(blocks: _Blocks, rows: slice, grads: _Gradients, lse, p_coef, t_coef) -> None:
    """The gradients of a chunk of rows with the given per-row coefficients (views [r]), block by block."""
    for classes in blocks.class_blocks():
        logits = blocks.logits(rows, classes)
        target, weight, *options = blocks.op_args(rows, classes)
        # The block's logits are overwritten by their gradient (the buffer is ours).
        torch.ops.fused_ce.cross_entropy_backward_(logits, target, weight, lse, p_coef, t_coef, *options)
        grads.add(rows, classes, logits)


def _no_autocast(head: Head):
    """The loops compute in the operands' dtypes: autocast (if on) applied to the operands already."""
    return torch.autocast(head.input.device.type, enabled=False)


def shard_statistics(head: Head) -> tuple[Tensor, ...]:
    """Per-row ``(loss, lse, mass)`` ``[N]`` over the head's classes (see ``cross_entropy_forward``);
    with ``head.stats`` also ``(argmax, max logit)`` (the argmax among the head's classes).

    For a shard they are its partial statistics, which merge across shards (see
    fused_ce/distributed).
    """
    head = head.in_compute_dtype().planned()
    out = _row_outputs(head)
    blocks = _Blocks(head)
    with _no_autocast(head):
        for rows in blocks.row_chunks():
            _row_statistics(blocks, rows, tuple(t[rows] for t in out))
    return out


def shard_gradients(
    head: Head, lse: Tensor, p_coef: Tensor, t_coef: Tensor, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of the loss terms with per-row coefficients, with respect to input, weight, bias.

    The logits' gradient of row i is ``p_coef_i * softmax - t_coef_i * T`` (ops.py),
    with the full row's ``lse`` ``[N]``. Returns ``(grad_input [N, D], grad_weight
    [V, D], grad_bias [V])`` in the accumulation dtype (grad_weight: see
    :func:`grad_weight_dtype`), an empty tensor for each one ``needs`` leaves out.
    For a shard, grad_input is this shard's part of a sum.
    """
    weight_dtype = grad_weight_dtype(head.weight.dtype, head.rows)
    head = head.in_compute_dtype().planned()
    grads = _Gradients(head, needs, weight_dtype)
    blocks = _Blocks(head)
    with _no_autocast(head):
        for rows in blocks.row_chunks():
            _row_gradients(blocks, rows, grads, lse[rows], p_coef[rows], t_coef[rows])
    return grads.result()


def _row_outputs(head: Head) -> tuple[Tensor, ...]:
    """Empty per-row (loss, lse, mass[, argmax, max logit]) [N] for a head's loops to fill."""
    acc = accumulate_dtype(head.input.dtype)
    out = tuple(head.input.new_empty(head.num_rows, dtype=acc) for _ in range(3))
    if head.stats:
        out += (head.input.new_empty(head.num_rows, dtype=torch.long), head.input.new_empty(head.num_rows, dtype=acc))
    return out


def fused_objective_and_gradients(
    head: Head, row_scale: Tensor, z_scale: Tensor | None, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training path: ``sum_i row_scale_i * loss_i + z_scale_i * lse_i**2`` and its gradients.

    Whole rows: one matmul pass, each chunk's logits overwritten by their gradient
    (``cross_entropy_fused_``) and absorbed at once. Blocks of classes: per chunk of
    rows, a statistics pass then a gradient pass. Needs the whole vocabulary (the
    gradient needs each row's full lse). Returns ``(objective [], lse [N], mass [N],
    grad_input, grad_weight, grad_bias)``, the gradients as :func:`shard_gradients`',
    and with ``head.stats`` ``(argmax [N], max logit [N])`` after them.
    """
    if head.vocab_total not in (-1, head.num_classes):
        raise ValueError("the fused path needs the whole vocabulary; for a shard use shard_statistics/shard_gradients")
    weight_dtype = grad_weight_dtype(head.weight.dtype, head.rows)
    head = head.in_compute_dtype().planned()
    acc = accumulate_dtype(head.input.dtype)
    loss, lse, mass, *prediction = _row_outputs(head)
    objective = head.input.new_zeros((), dtype=acc)
    grads = _Gradients(head, needs, weight_dtype)
    blocks = _Blocks(head)
    with _no_autocast(head):
        for rows in blocks.row_chunks():
            _fused_rows(blocks, rows, grads, row_scale, z_scale, (objective, loss, lse, mass, *prediction))
    return (objective, lse, mass) + grads.result() + tuple(prediction)


def _fused_rows(blocks: _Blocks, rows: slice, grads: _Gradients, row_scale, z_scale, out) -> None:
    """One chunk of rows of fused_objective_and_gradients: into ``out`` = (objective [], loss, lse, mass
    [, argmax, max logit] [N])."""
    head = blocks.head
    objective, loss, lse, mass, *prediction = out
    scale, z = row_scale[rows], None if z_scale is None else z_scale[rows]
    if head.whole_rows:
        classes = blocks.class_blocks()[0]
        logits = blocks.logits(rows, classes)
        target, weight, *options = blocks.op_args(rows, classes)
        op = torch.ops.fused_ce.cross_entropy_fused_
        if head.stats:
            obj, lse[rows], mass[rows], prediction[0][rows], prediction[1][rows] = op.stats(
                logits, target, weight, scale, z, *options)
        else:
            obj, lse[rows], mass[rows] = op(logits, target, weight, scale, z, *options)
        grads.add(rows, classes, logits)
    else:
        _row_statistics(blocks, rows, (loss[rows], lse[rows], mass[rows], *(t[rows] for t in prediction)))
        # The objective and coefficients of the fused kernel (common/ce_math.h).
        obj, t_coef, p_coef = scale * loss[rows], scale, scale * mass[rows]
        if z is not None:
            z_term = torch.where(z == 0, 0.0, z * lse[rows])
            obj = obj + z_term * lse[rows]
            p_coef = p_coef + 2 * z_term
        _row_gradients(blocks, rows, grads, lse[rows], p_coef, t_coef)
    objective += obj.sum()
