"""A linear layer fused with cross-entropy: ``F.cross_entropy(F.linear(input, W, b), target)``
without the ``N x V`` logits.

The LM head of a large-vocabulary model spends most of its memory on logits it only
needs for a moment: ``N x V`` of them (16384 x 256000 bf16 is 8 GB), then as many
again for their gradient. Here they are made one block at a time, in one buffer
that every block reuses, and consumed at once.

Two ways to cut the work, chosen from a memory budget for that buffer:

* **Chunks of rows over the whole vocabulary** (``C x V``), one matmul pass::

      for each chunk of C rows:
          logits  = x_c @ W.T (+ b)                  cuBLAS / the CPU BLAS
          loss, and d loss / d logits written over the logits (cross_entropy_fused_)
          grad_x_c  = grad_logits @ W                its rows of grad_input
          grad_W   += grad_logits.T @ x_c            (fp32 for fp16/bf16 weights)
          grad_b   += grad_logits.sum(0)

  Three matmuls per chunk, as many as ``F.linear`` forward and backward.

* **Blocks of rows x classes** (``R x K``), two passes per chunk of rows: the first
  makes each block's logits and its statistics (``cross_entropy_forward`` on a
  vocabulary slice), merged into the rows' ``lse``; the second makes them again and
  writes their gradient over them (``cross_entropy_backward_into_``) for the same
  three gradient updates. One matmul more per block, but every matmul has ``R``
  (1024 or so) rows: a BLAS runs a ``[C, D] x [D, V]`` product several times slower
  per row when ``C`` is 32 than when it is 1024 (measured on the CPU development
  machines with MKL, see ``_FUSED_MIN_ROWS``), so when the budget only fits a few
  rows of the whole vocabulary, blocks are faster despite the extra matmul.

* **All rows x blocks of classes** (``N x K``), the same two passes with a single
  chunk of every row: each class block's weight gradient is then one matmul over
  all the rows, written once in the weight's dtype (the matmul accumulates in fp32
  inside; cuBLAS's reduced-precision split-K reductions are turned off for it).
  This is the CUDA fp16/bf16 default when the weight is trained: the other plans
  sum the weight gradient over chunks of rows, which wants an fp32 ``[V, D]``
  accumulator (2.4 GB for 256000 x 2304 -- twice the bf16 gradient) and a read and
  write of it per chunk. (Without a weight gradient, whole-row chunks: the
  all-rows plan would only add a matmul pass.)

When a gradient is wanted and the reduction is 'mean' or 'sum', the forward pass
computes it (either way) and backward only scales it by the upstream scalar. When it
cannot be computed ahead -- ``reduction='none'`` (its upstream is per row), a second
backward through the same graph, or no gradient wanted in forward -- forward keeps
only per-row statistics (``lse``, ``mass``: O(N)) and backward makes the logits again.

The chunk plan (rows, classes) per block::

    chunk_size=C (an int)           C rows over the whole vocabulary
    chunk_size=(R, K)               R rows x K classes
    chunk_size=(None, K)            all rows x K classes
    None: from the budget B bytes   (FUSED_CE_LINEAR_CHUNK_MB MiB if set, else
                                     _DEFAULT_BUDGET_MB for the device type)
        CUDA fp16/bf16, when the    all rows x K = B // (N * s) classes (a
        weight's gradient is wanted: multiple of 64, >= 128), K fixed per call
        else C = B // (V * s)       whole-vocabulary chunks if C >= _FUSED_MIN_ROWS
                                    (rounded down to a multiple of 8),
        else R = _BLOCK_ROWS,       K = B // (R * s) (a multiple of 64, >= 128)

with ``s`` the logits' element size in the compute dtype (the input's, except fp16/
bf16 on the CPU, which compute in fp32: the CPU BLAS has no fp32-accumulating fp16/
bf16 matmul). The plan the ops receive depends on V, the dtype and the device only,
not on N, so torch.compile sees constants; the all-rows plan's K, which depends on
N, is settled inside the op. The buffer is at most ``min(rows, N) x classes`` -- over
the budget only where the floor of 128 classes binds (all rows: N > B / (128 s)).

Precision: the logits are computed in the input's dtype, as ``F.linear`` does (CPU
fp16/bf16: in fp32, more accurate). Gradients that sum over chunks or blocks
accumulate in fp32 for fp16/bf16, and each is rounded to its dtype once, after the
upstream scale -- but for the weight's in the all-rows plan, which has no sum over
chunks: it is rounded once when made, and once more if the upstream gradient is a
scalar other than 1 (as a ``loss * s`` before ``backward()``).

The ops (torch.library custom ops, so torch.compile and opcheck see them):

* ``fused_ce::linear_cross_entropy_fused`` -- the training path of 'mean'/'sum': the
  summed objective ``sum_i row_scale_i * loss_i + z_scale_i * lse_i**2`` and its
  gradients;
* ``fused_ce::linear_cross_entropy_forward`` -- per-row ``(loss, lse, mass)``;
* ``fused_ce::linear_cross_entropy_backward`` -- the gradients for per-row
  coefficients ``p_coef``, ``t_coef`` (see ops.py), used by the other two's backward.

For a vocabulary shard (tensor parallelism), :class:`Head` takes ``vocab_start`` and
``vocab_total``, and :func:`shard_statistics` / :func:`shard_gradients` run the
same loops on the shard's rows of the weight.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import (
    _as_rows,
    _check_device,
    _check_extras,
    _check_reduction,
    _nan_if_empty,
    _reduce,
    _row_scales,
    _Rows,
)
from .ops import _gradient_by_formula, accumulate_dtype

CHUNK_ENV = "FUSED_CE_LINEAR_CHUNK_MB"

# The default budget of the logits buffer, in MiB, per device type.
#   cuda: 256 MiB -- fp16/bf16 (all rows): 16384 classes of 8192 rows; fp32: 256
#         rows of a 256k vocabulary. Enough for cuBLAS to run near its peak, and
#         small next to the weight gradient (1.1 GB for 256000 x 2304 bf16). Not yet
#         tuned on a GPU for the all-rows plan.
#   cpu:  3 MiB -- blocks of 1024 rows x 768 classes at V = 32000 fp32. Measured on
#         4096 x 256 x 32000 fp32, fwd+bwd, 2 threads, best of 7 interleaved, against
#         torch's chunked F.linear_cross_entropy (8 MiB of workspace): blocks of
#         1024 x 512 (2 MiB) 1.29x, 1024 x 768 1.29x, 1024 x 896 1.33x; whole rows
#         need 256 of them (31 MiB) for ~1.5x. Larger blocks also mean fewer
#         parallel regions (6 per block: 2 matmuls and a kernel per pass, 2 more
#         matmuls), which count when the cores are shared: ~1000 per step here, as
#         many as torch's chunked path, against ~1500 at 2 MiB.
_DEFAULT_BUDGET_MB = {"cuda": 256.0, "cpu": 3.0}

# Whole-vocabulary chunks need at least this many rows; below, blocks of classes.
# Measured with MKL on the CPU development machines (AMD EPYC, 1 thread, D=256,
# V=32000), GFLOP/s of the three matmuls of a chunk of C rows:
#       C:      32    64    128    256
#   x @ W.T     44    58     72     87
#   G @ W       66    79     87     92
#   G.T @ x     59    91    100    101
# cuBLAS keeps a [C, V] x [V, D] product busy from a few hundred rows.
_FUSED_MIN_ROWS = {"cuda": 128, "cpu": 128}
# A plan's rows: one chunk of every row, classes per block from the budget and N
# (settled in the op, see Head.planned).
ALL_ROWS = -1
_BLOCK_ROWS = {"cuda": 2048, "cpu": 1024}
_MIN_BLOCK_CLASSES = 128
_ROW_ALIGN = 8
_CLASS_ALIGN = 64


# --------------------------------------------------------------------------- the chunk plan


def compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype of the logits buffer and its matmuls: the input's, except fp16/bf16 on the CPU (fp32)."""
    if device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def chunk_plan(
    num_classes: int, dtype: torch.dtype, device: torch.device, chunk_size=None, weight_grad: bool = True
) -> tuple[int, int]:
    """(rows, classes) per block of logits (see the module docstring for the rule).

    ``weight_grad``: whether the weight's gradient is wanted -- the all-rows plan
    is there to make it without an fp32 accumulator; without it, it would only add
    a matmul pass.
    """
    if chunk_size is not None:
        return _explicit_plan(chunk_size, num_classes)
    key = _device_key(device)
    itemsize = compute_dtype(dtype, device).itemsize
    budget = _budget_bytes(key)
    if key == "cuda" and dtype in (torch.float16, torch.bfloat16) and weight_grad:
        return ALL_ROWS, -1
    rows = budget // (num_classes * itemsize)
    if rows >= _FUSED_MIN_ROWS[key]:
        return _align_down(rows, _ROW_ALIGN), num_classes
    block_rows = _BLOCK_ROWS[key]
    return block_rows, min(_block_classes(budget, block_rows, itemsize), num_classes)


def _explicit_plan(chunk_size, num_classes: int) -> tuple[int, int]:
    def positive(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if positive(chunk_size):
        return chunk_size, num_classes
    if isinstance(chunk_size, (tuple, list)) and len(chunk_size) == 2:
        rows, classes = chunk_size
        if (rows is None or positive(rows)) and positive(classes):
            return ALL_ROWS if rows is None else rows, min(classes, num_classes)
    raise ValueError(
        "chunk_size must be None, a positive int (rows per chunk) or a pair (rows, classes) of positive ints "
        f"(rows may be None: all of them), got {chunk_size!r}"
    )


def _block_classes(budget: int, rows: int, itemsize: int) -> int:
    """Classes per block of ``rows`` rows in the budget: a multiple of 64, at least 128."""
    return max(_MIN_BLOCK_CLASSES, _align_down(budget // (rows * itemsize), _CLASS_ALIGN))


def _device_key(device: torch.device) -> str:
    """The device type's entry in the plan tables (other accelerators: CUDA's)."""
    return device.type if device.type in _DEFAULT_BUDGET_MB else "cuda"


def grad_weight_dtype(weight_dtype: torch.dtype, chunk_rows: int) -> torch.dtype:
    """The dtype in which the ops return the weight's gradient for a plan with ``chunk_rows``.

    The accumulation dtype when it sums over chunks of rows; the weight's own in the
    all-rows plan, where each class block's gradient is one matmul.
    """
    return weight_dtype if chunk_rows == ALL_ROWS else accumulate_dtype(weight_dtype)


def _align_down(n: int, multiple: int) -> int:
    return int(n - n % multiple if n >= multiple else max(n, 1))


def _budget_bytes(device_type: str) -> int:
    text = os.environ.get(CHUNK_ENV, "").strip()
    if not text:
        return int(_DEFAULT_BUDGET_MB[device_type] * 2**20)
    try:
        mib = float(text)
    except ValueError:
        raise ValueError(f"{CHUNK_ENV} must be a number of MiB, got {text!r}") from None
    if not mib > 0:
        raise ValueError(f"{CHUNK_ENV} must be > 0 MiB, got {text!r}")
    return int(mib * 2**20)


# --------------------------------------------------------------------------- the loops


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
            budget = _budget_bytes(_device_key(self.input.device))
            classes = _block_classes(budget, rows, itemsize)
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
        return (target, weight, h.ignore_index, h.label_smoothing, h.softcap) + vocab


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
                # Only the all-rows plan writes fp16/bf16 here; elsewhere out is fp32
                # and this does nothing.
                with _fp32_reductions(out):
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


def _mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out = a @ b; out may be fp32 for fp16/bf16 operands (CUDA), or fp16/bf16 for fp32 ones (CPU)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    elif out.dtype == torch.float32 and _fp32_output_support(a.device, a.dtype)[0]:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    else:  # rounded once, as F.linear's gradient (a block-sized transient)
        out.copy_(torch.mm(a, b))


_REDUCED_PRECISION_FLAGS = {
    torch.float16: "allow_fp16_reduced_precision_reduction",
    torch.bfloat16: "allow_bf16_reduced_precision_reduction",
}


@contextlib.contextmanager
def _fp32_reductions(out: Tensor):
    """Keeps cuBLAS from adding the parts of a split fp16/bf16 matmul in that dtype.

    torch lets it by default (``torch.backends.cuda.matmul.allow_bf16_reduced_
    precision_reduction``); for a weight gradient written in bf16 in one matmul
    (the all-rows plan), that would round its sum more than once.
    """
    flag = _REDUCED_PRECISION_FLAGS.get(out.dtype)
    matmul = torch.backends.cuda.matmul
    if out.device.type != "cuda" or flag is None or not getattr(matmul, flag, False):
        yield
        return
    setattr(matmul, flag, False)
    try:
        yield
    finally:
        setattr(matmul, flag, True)


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


def _row_statistics(blocks: _Blocks, rows: slice, out: tuple[Tensor, Tensor, Tensor]) -> None:
    """(loss, lse, mass) of a chunk of rows over every class block, into ``out`` (views [r])."""
    for k, classes in enumerate(blocks.class_blocks()):
        stats = torch.ops.fused_ce.cross_entropy_forward(blocks.logits(rows, classes), *blocks.op_args(rows, classes))
        if k == 0:
            for whole, part in zip(out, stats):
                whole.copy_(part)
        else:
            _merge_(out, stats)


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


def shard_statistics(head: Head) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row ``(loss, lse, mass)`` ``[N]`` over the head's classes (see ``cross_entropy_forward``).

    For a shard they are its partial statistics, which merge across shards (see
    fused_ce/distributed.py).
    """
    head = head.in_compute_dtype().planned()
    acc = accumulate_dtype(head.input.dtype)
    out = tuple(head.input.new_empty(head.num_rows, dtype=acc) for _ in range(3))
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


def fused_objective_and_gradients(
    head: Head, row_scale: Tensor, z_scale: Tensor | None, needs: tuple[bool, bool, bool]
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The training path: ``sum_i row_scale_i * loss_i + z_scale_i * lse_i**2`` and its gradients.

    Whole rows: one matmul pass, each chunk's logits overwritten by their gradient
    (``cross_entropy_fused_``) and absorbed at once. Blocks of classes: per chunk of
    rows, a statistics pass then a gradient pass. Needs the whole vocabulary (the
    gradient needs each row's full lse). Returns ``(objective [], lse [N], mass [N],
    grad_input, grad_weight, grad_bias)``, the gradients as :func:`shard_gradients`'.
    """
    if head.vocab_total not in (-1, head.num_classes):
        raise ValueError("the fused path needs the whole vocabulary; for a shard use shard_statistics/shard_gradients")
    weight_dtype = grad_weight_dtype(head.weight.dtype, head.rows)
    head = head.in_compute_dtype().planned()
    acc = accumulate_dtype(head.input.dtype)
    loss, lse, mass = (head.input.new_empty(head.num_rows, dtype=acc) for _ in range(3))
    objective = head.input.new_zeros((), dtype=acc)
    grads = _Gradients(head, needs, weight_dtype)
    blocks = _Blocks(head)
    with _no_autocast(head):
        for rows in blocks.row_chunks():
            _fused_rows(blocks, rows, grads, row_scale, z_scale, (objective, loss, lse, mass))
    return (objective, lse, mass) + grads.result()


def _fused_rows(blocks: _Blocks, rows: slice, grads: _Gradients, row_scale, z_scale, out) -> None:
    """One chunk of rows of fused_objective_and_gradients: into ``out`` = (objective [], loss, lse, mass [N])."""
    head = blocks.head
    objective, loss, lse, mass = out
    scale, z = row_scale[rows], None if z_scale is None else z_scale[rows]
    if head.whole_rows:
        classes = blocks.class_blocks()[0]
        logits = blocks.logits(rows, classes)
        target, weight, *options = blocks.op_args(rows, classes)
        obj, lse[rows], mass[rows] = torch.ops.fused_ce.cross_entropy_fused_(logits, target, weight, scale, z, *options)
        grads.add(rows, classes, logits)
    else:
        _row_statistics(blocks, rows, (loss[rows], lse[rows], mass[rows]))
        # The objective and coefficients of the fused kernel (common/ce_math.h).
        obj, t_coef, p_coef = scale * loss[rows], scale, scale * mass[rows]
        if z is not None:
            z_term = torch.where(z == 0, 0.0, z * lse[rows])
            obj = obj + z_term * lse[rows]
            p_coef = p_coef + 2 * z_term
        _row_gradients(blocks, rows, grads, lse[rows], p_coef, t_coef)
    objective += obj.sum()


# --------------------------------------------------------------------------- the ops


def _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, rows, classes):
    return Head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, rows,
                classes=classes)


@torch.library.custom_op("fused_ce::linear_cross_entropy_forward", mutates_args=())
def _forward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk_rows: int,
    chunk_classes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, mass) ``[N]`` of ``cross_entropy_forward(input @ linear_weight.T + linear_bias)``."""
    head = _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap,
                 chunk_rows, chunk_classes)
    return shard_statistics(head)


@torch.library.custom_op("fused_ce::linear_cross_entropy_backward", mutates_args=())
def _backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    lse: Tensor,
    p_coef: Tensor,
    t_coef: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk_rows: int,
    chunk_classes: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (input [N, D], weight [V, D], bias [V]; accumulation dtype, empty if not asked for)
    of the loss terms with the per-row coefficients p_coef, t_coef (see ops.py)."""
    head = _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap,
                 chunk_rows, chunk_classes)
    needs = (input_grad, weight_grad, bias_grad and linear_bias is not None)
    return shard_gradients(head, lse, p_coef, t_coef, needs)


@torch.library.custom_op("fused_ce::linear_cross_entropy_fused", mutates_args=())
def _fused_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    row_scale: Tensor,
    z_scale: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    chunk_rows: int,
    chunk_classes: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(objective [], lse [N], mass [N], grad_input, grad_weight, grad_bias): see fused_objective_and_gradients."""
    head = _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap,
                 chunk_rows, chunk_classes)
    needs = (input_grad, weight_grad, bias_grad and linear_bias is not None)
    return fused_objective_and_gradients(head, row_scale, z_scale, needs)


def _grad_fakes(input, linear_weight, linear_bias, chunk_rows, needs):
    acc = accumulate_dtype(input.dtype)
    shapes = (input.shape, linear_weight.shape, linear_weight.shape[:1])
    dtypes = (acc, grad_weight_dtype(linear_weight.dtype, chunk_rows) if needs[1] else acc, acc)
    needs = (needs[0], needs[1], needs[2] and linear_bias is not None)
    return tuple(input.new_empty(s if need else (0,), dtype=d) for s, d, need in zip(shapes, dtypes, needs))


@_forward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, chunk_rows,
      chunk_classes):
    acc = accumulate_dtype(input.dtype)
    return tuple(input.new_empty(input.shape[0], dtype=acc) for _ in range(3))


@_backward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, lse, p_coef, t_coef, ignore_index, label_smoothing, softcap,
      chunk_rows, chunk_classes, input_grad, weight_grad, bias_grad):
    return _grad_fakes(input, linear_weight, linear_bias, chunk_rows, (input_grad, weight_grad, bias_grad))


@_fused_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, row_scale, z_scale, ignore_index, label_smoothing, softcap,
      chunk_rows, chunk_classes, input_grad, weight_grad, bias_grad):
    acc = accumulate_dtype(input.dtype)
    rows = tuple(input.new_empty(input.shape[0], dtype=acc) for _ in range(2))
    return (input.new_empty((), dtype=acc),) + rows + _grad_fakes(
        input, linear_weight, linear_bias, chunk_rows, (input_grad, weight_grad, bias_grad)
    )


# --------------------------------------------------------------------------- autograd


def _in_dtypes(grads, inputs, needs):
    """The gradients in their inputs' dtypes (None where not needed)."""
    return tuple(g.to(x.dtype) if need else None for g, x, need in zip(grads, inputs, needs))


def _recomputed_gradients(ctx, p_coef: Tensor, t_coef: Tensor, needs) -> tuple:
    """Chunked gradients for per-row coefficients, in the inputs' dtypes."""
    input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors[:6]
    grads = _backward_op(
        input, linear_weight, linear_bias, target, weight, lse, p_coef.contiguous(), t_coef.contiguous(),
        *ctx.options, *ctx.plan, *needs,
    )
    return _in_dtypes(grads, (input, linear_weight, linear_bias), needs)


def _differentiable_gradients(ctx, loss_coef: Tensor, lse_coef_fn, needs) -> tuple:
    """create_graph=True: the gradients as differentiable torch ops, through the full logits.

    Correct, not fast (it materialises N x V), like ops.py's double-backward path.
    """
    input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors[:6]
    logits = F.linear(input, linear_weight, linear_bias)
    options = ctx.options + (0, -1)
    grad_logits = _gradient_by_formula(logits, target, weight, options, loss_coef, lse_coef_fn)
    grads = (grad_logits @ linear_weight, grad_logits.t() @ input, grad_logits.sum(0))
    return tuple(g if need else None for g, need in zip(grads, needs))


def _needs(ctx) -> tuple[bool, bool, bool]:
    return tuple(bool(n) for n in ctx.needs_input_grad[:3])


def _forward_setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, *plan = inputs
    _loss, lse, mass = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, mass)
    ctx.options = (ignore_index, label_smoothing, softcap)
    ctx.plan = tuple(plan)
    ctx.mark_non_differentiable(mass)
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_loss, grad_lse, _grad_mass):
    if grad_loss is None and grad_lse is None:
        return (None,) * 10
    lse, mass = ctx.saved_tensors[5:7]
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype)
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    needs = _needs(ctx)
    if torch.is_grad_enabled():  # create_graph=True
        grads = _differentiable_gradients(ctx, grad_loss, lambda _: grad_lse, needs)
    else:
        grads = _recomputed_gradients(ctx, grad_loss * mass + grad_lse, grad_loss, needs)
    return grads + (None,) * 7


_forward_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)


def _fused_setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, row_scale, z_scale, ignore_index, label_smoothing, softcap,
     chunk_rows, chunk_classes, *_needs_flags) = inputs
    _objective, lse, mass, grad_input, grad_weight, grad_bias = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, mass, row_scale, z_scale)
    ctx.options = (ignore_index, label_smoothing, softcap)
    ctx.plan = (chunk_rows, chunk_classes)
    # Held outside save_for_backward (and detached, so no cycle through a grad_fn):
    # the first eager backward hands these very buffers on and drops them here.
    ctx.grads = [grad_input.detach(), grad_weight.detach(), grad_bias.detach()]
    ctx.mark_non_differentiable(lse, mass, grad_input, grad_weight, grad_bias)
    # Otherwise autograd hands backward zero-filled "gradients" of the gradient
    # outputs: an input- plus weight-sized transient in every backward.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_objective, _grad_lse, _grad_mass, _gi, _gw, _gb):
    needs = _needs(ctx)
    no_grads = (None,) * 12
    if grad_objective is None:
        return (None,) * 3 + no_grads
    input, linear_weight, linear_bias, target, weight, lse, mass, row_scale, z_scale = ctx.saved_tensors
    g = grad_objective.to(lse.dtype)
    if torch.is_grad_enabled():  # create_graph=True
        z_coef = None if z_scale is None else 2 * g * z_scale
        grads = _differentiable_gradients(
            ctx, g * row_scale, lambda lse_: 0 if z_coef is None else z_coef * lse_, needs
        )
        return grads + no_grads
    if ctx.grads is None:
        # A second backward through the same graph (retain_graph, gradcheck): the
        # first one handed the gradients on, so compute them afresh.
        t_coef = g * row_scale
        p_coef = t_coef * mass + (0 if z_scale is None else 2 * g * z_scale * lse)
        return _recomputed_gradients(ctx, p_coef, t_coef, needs) + no_grads
    return _scaled_gradients(ctx, g, (input, linear_weight, linear_bias), needs) + no_grads


def _scaled_gradients(ctx, g: Tensor, inputs, needs) -> tuple:
    """The gradients computed in forward, times the scalar upstream gradient g, in the inputs' dtypes."""
    grads = ctx.grads
    if not _eager(g):
        # Traced (torch.compile, AOT): functional, so the saved buffers stay intact
        # for another backward.
        return tuple(gr.mul(g).to(x.dtype) if need else None for gr, x, need in zip(grads, inputs, needs))
    # Eager: hand the buffers on and drop our references, so that autograd's
    # AccumulateGrad can take them as .grad without a copy.
    ctx.grads = None
    out = []
    for gr, x, need in zip(grads, inputs, needs):
        if not need:
            out.append(None)
            continue
        # In place (the buffer is ours), rows whose scale is exactly 1 untouched
        # (decided on the device): after a plain loss.backward() this costs nothing.
        rows = gr if gr.dim() == 2 else gr.unsqueeze(1)  # input/weight [*, D]; bias [V]
        torch.ops.fused_ce.scale_rows_(rows, g.expand(rows.shape[0]))
        # fp16/bf16: rounded once, after the scale; the fp32 buffer is freed on return.
        out.append(gr if gr.dtype == x.dtype else gr.to(x.dtype))
    return tuple(out)


def _eager(t: Tensor) -> bool:
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)


# --------------------------------------------------------------------------- the public API


def _autocast_operands(input, linear_weight, linear_bias):
    """(input, linear_weight, linear_bias, the loss's dtype), autocast applied as to F.linear + F.cross_entropy.

    Under torch.autocast the matmuls run in the autocast dtype, as F.linear's would
    (the casts are ordinary, differentiable ops), and the loss comes out in fp32, as
    autocast runs F.cross_entropy; otherwise everything keeps input's dtype.
    """
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias, getattr(input, "dtype", None)
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        # Autocast lowers float32 only (float64 stays as it is).
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t

    input, linear_weight, linear_bias = cast(input), cast(linear_weight), cast(linear_bias)
    low = input.dtype in (torch.float16, torch.bfloat16)
    return input, linear_weight, linear_bias, torch.float32 if low else input.dtype


def _check_linear(input, linear_weight, linear_bias) -> None:
    """The checks of F.linear's operands, in F.linear_cross_entropy's terms."""
    for name, t in (("input", input), ("linear_weight", linear_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have a feature dimension: shape (D), (N, D) or (B, T, D), got a scalar")
    if linear_weight.dim() != 2:
        raise NotImplementedError(
            f"linear_weight must be 2-D (num_classes, in_features), got shape {tuple(linear_weight.shape)} "
            "(the K-dimensional loss of F.linear_cross_entropy is not supported)"
        )
    num_classes, in_features = linear_weight.shape
    if input.shape[-1] != in_features:
        raise ValueError(
            f"input's last dimension ({input.shape[-1]}) must equal linear_weight's in_features ({in_features})"
        )
    if num_classes == 0:
        raise ValueError("linear_weight has no rows: the number of classes is 0")
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have input's dtype ({input.dtype}), got {linear_weight.dtype}")
    if linear_weight.device != input.device:
        raise ValueError(
            f"input and linear_weight must be on the same device, got {input.device} and {linear_weight.device}"
        )
    if linear_bias is not None:
        if not isinstance(linear_bias, Tensor):
            raise TypeError(f"linear_bias must be a Tensor or None, got {type(linear_bias).__name__}")
        if linear_bias.shape != (num_classes,):
            raise ValueError(f"linear_bias must have shape ({num_classes},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have input's dtype ({input.dtype}), got {linear_bias.dtype}")
        if linear_bias.device != input.device:
            raise ValueError(f"linear_bias must be on input's device ({input.device}), got {linear_bias.device}")
    _check_device(input.device)


def _target_rows(target, batch_shape, num_classes: int) -> Tensor:
    """target flattened to rows: [N] class indices or [N, V] probabilities (shapes checked)."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        expected = (*batch_shape, num_classes)
        if target.shape != expected:
            raise ValueError(f"target: class probabilities must have shape {expected}, got {tuple(target.shape)}")
        return target.reshape(-1, num_classes)
    if target.shape != batch_shape:
        raise ValueError(
            f"target: class indices must have input's batch shape {tuple(batch_shape)}, got {tuple(target.shape)}"
        )
    return target.reshape(-1)


def _rows_of(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing):
    """Checks the arguments; returns (x [N, D], target rows, class weight, batch shape, _Rows)."""
    _check_linear(input, linear_weight, linear_bias)
    num_classes, in_features = linear_weight.shape
    batch_shape = input.shape[:-1]
    rows = _target_rows(target, batch_shape, num_classes)
    x = input.reshape(-1, in_features)
    # F.cross_entropy's checks of target, weight and options (_as_rows), on a
    # stand-in for the logits [N, V] that costs one row (stride 0 along N). Its
    # dtype is the compute dtype, which probability targets are converted to.
    stand_in = x.new_empty(1, num_classes, dtype=compute_dtype(input.dtype, input.device)).expand(x.shape[0], -1)
    _, rows, weight, _ = _as_rows(stand_in, rows, weight, ignore_index, label_smoothing)
    return x, rows, weight, batch_shape, _Rows(stand_in, rows, weight, ignore_index)


def linear_cross_entropy(
    input: Tensor,  # noqa: A002 - torch's name
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | tuple[int | None, int] | None = None,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    The arguments and results of ``torch.nn.functional.linear_cross_entropy`` (and of
    :func:`fused_ce.cross_entropy` for the extra options), computed block by block of
    logits in one reused buffer (see the module docstring): the ``N x V`` logits never
    exist.

    Args:
        input: ``(D)``, ``(N, D)`` or ``(B, T, D)`` (any leading batch shape), float32,
            float64, float16 or bfloat16.
        linear_weight: ``(V, D)``, the classifier (LM head) weight, input's dtype.
        target: class indices (any integer dtype) of input's batch shape -- ``()``,
            ``(N)``, ``(B, T)`` -- in ``[0, V)`` or ``ignore_index``; or class
            probabilities of shape ``(*batch, V)``.
        linear_bias: optional ``(V)`` bias, input's dtype.
        weight: optional per-class rescaling weights ``(V)``.
        reduction: ``'none'`` (the batch shape), ``'mean'`` (over the total weight of
            the non-ignored targets; rows for probability targets) or ``'sum'``.
        ignore_index: a class-index target value that adds nothing (None: -100, as
            torch's default).
        label_smoothing: in ``[0, 1]``, as ``F.cross_entropy``.
        z_loss: adds ``z_loss * lse**2`` per non-ignored row (see :func:`fused_ce.cross_entropy`).
        softcap: soft-caps the logits to ``softcap * tanh(logits / softcap)`` first.
        chunk_size: rows per chunk (over the whole vocabulary), or a pair (rows,
            classes) per block, rows None for all of them; None picks them from a
            memory budget (module docstring; environment variable
            ``FUSED_CE_LINEAR_CHUNK_MB``).

    Returns:
        The loss in input's dtype (float32 under autocast, as ``F.cross_entropy``'s):
        a scalar, or input's batch shape for ``'none'``.

    When a gradient is wanted and the reduction is ``'mean'`` or ``'sum'``, forward
    computes the loss and every gradient, and backward only scales them by the
    upstream scalar; otherwise backward makes the logits again, block by block.
    Gradients with respect to class weights and probability targets are not supported.
    """
    _check_reduction(reduction)
    cap = _check_extras(z_loss, softcap)
    if ignore_index is None:
        ignore_index = -100
    input, linear_weight, linear_bias, out_dtype = _autocast_operands(input, linear_weight, linear_bias)
    x, rows, class_weight, batch_shape, info = _rows_of(
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing
    )
    if target.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "target: gradients with respect to probability targets are not supported by linear_cross_entropy; "
            "pass target.detach(), or use fused_ce.cross_entropy on the logits"
        )
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
    )
    plan = chunk_plan(linear_weight.shape[0], input.dtype, input.device, chunk_size, weight_grad=needs[1])
    args = (x, linear_weight, linear_bias, rows, class_weight)
    options = (ignore_index, float(label_smoothing), cap, *plan)
    acc = accumulate_dtype(input.dtype)

    if any(needs) and reduction != "none":
        row_scale, z_scale = _row_scales(info, reduction, z_loss, input.device, acc)
        objective, *_ = _fused_op(*args, row_scale, z_scale, *options, *needs)
        if reduction == "mean":
            objective = _nan_if_empty(objective, info.denominator)
        return objective.to(out_dtype)

    loss, lse, _mass = _forward_op(*args, *options)
    return _reduce(loss, lse, info, reduction, z_loss, batch_shape, out_dtype)


class LinearCrossEntropyLoss(nn.Module):
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss`, backed by :func:`linear_cross_entropy`.

    Like torch's, the module owns the classifier: ``self.linear``, a
    :class:`torch.nn.Linear` ``(in_features -> num_classes)``, and ``forward(input,
    target)`` returns the loss of ``self.linear(input)``. The class ``weight`` is a
    buffer. ``z_loss``, ``softcap`` and ``chunk_size`` are fused_ce's extras;
    ``out_features`` (torch's K-dimensional loss) must be ``()``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | tuple[int | None, int] | None = None,
    ) -> None:
        super().__init__()
        if tuple(out_features) != ():
            raise NotImplementedError("out_features (the K-dimensional loss) is not supported; it must be ()")
        _check_reduction(reduction)
        if weight is not None and weight.shape != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = ()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size

    def forward(self, input: Tensor, target: Tensor) -> Tensor:  # noqa: A002 - torch's name
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"chunk_size={self.chunk_size}"
        )


__all__ = ["LinearCrossEntropyLoss", "chunk_plan", "linear_cross_entropy"]
