"""The chunk plan of the linear path: how the ``N x V`` logits are cut into blocks.

A budget ``B`` bytes for the one logits buffer every block reuses
(``FUSED_CE_LINEAR_CHUNK_MB`` MiB if set, else ``_DEFAULT_BUDGET_MB`` for the device
type) gives the (rows, classes) of a block::

    chunk_size=C (an int)           C rows over the whole vocabulary
    chunk_size=(R, K)               R rows x K classes
    chunk_size=(None, K)            all rows x K classes
    None:
        CUDA fp16/bf16, when the    all rows x K = B // (N * s) classes (a
        weight's gradient is wanted: multiple of 64, >= 128), K fixed per call
        else C = B // (V * s)       whole-vocabulary chunks if C >= _FUSED_MIN_ROWS
                                    (rounded down to a multiple of 8),
        else R = _BLOCK_ROWS,       K = B // (R * s) (a multiple of 64, >= 128)

with ``s`` the logits' element size in the compute dtype (the input's, except fp16/
bf16 on the CPU, which compute in fp32: the CPU BLAS has no fp32-accumulating fp16/
bf16 matmul). The plan the ops receive depends on V, the dtype and the device only,
not on N, so torch.compile sees constants; the all-rows plan's K, which depends on
N, is settled inside the op (:meth:`fused_ce.linear.loops.Head.planned`). The buffer
is at most ``min(rows, N) x classes`` -- over the budget only where the floor of 128
classes binds (all rows: N > B / (128 s)).

Why three shapes: whole-vocabulary chunks need one matmul pass; blocks of classes
need two (statistics, then gradients, as each row's lse must be known first) but keep
every matmul ``R`` rows tall, which a BLAS needs to run near its peak; the all-rows
plan makes each class block's weight gradient one matmul over every row, written
once in bf16 -- no fp32 ``V x D`` accumulator (2.4 GB at 256000 x 2304).
"""

from __future__ import annotations

import os

import torch

from .._checks import ArgumentError
from ..ops import accumulate_dtype

CHUNK_ENV = "FUSED_CE_LINEAR_CHUNK_MB"

# The default budget of the logits buffer, in MiB, per device type.
#   cuda: 256 -- fp16/bf16 (all rows): 16384 classes of 8192 rows; fp32: 256 rows of
#         a 256k vocabulary. Enough for cuBLAS to run near its peak, small next to the
#         weight gradient (issue 14 sweeps it on an H200).
#   cpu:  3 -- blocks of 1024 rows x 768 classes at V = 32000 fp32; 1.29x torch's
#         chunked F.linear_cross_entropy there (bench/results/cpu-2026-11-28/README.md).
_DEFAULT_BUDGET_MB = {"cuda": 256.0, "cpu": 3.0}

# Whole-vocabulary chunks need at least this many rows; below, blocks of classes.
# MKL on the CPU development machines runs a [C, D] x [D, V] product 2x slower per
# row at C = 32 than at 256 (GFLOP/s table: bench/results/cpu-2026-11-28/README.md);
# cuBLAS keeps such a product busy from a few hundred rows.
_FUSED_MIN_ROWS = {"cuda": 128, "cpu": 128}
# linear_distillation_loss's chunks are whole rows, so they must be tall enough on their
# own: on the CPU development machine (2-core EPYC, MKL, 2048 x 256 x 32000 fp32, both
# heads, forward; bench/results/cpu-2026-11-30/linear_distill_chunk_sweep.log, two idle
# runs) chunks of 128 / 256 / 512 / 1024 rows took 1190-1225 / 1018-1098 / 926-1136 /
# 1035-1196 ms; under load from a parallel build the small chunks suffered far more
# (3676 / 2997 / 1735 / 1781 ms).
_DISTILL_MIN_ROWS = {"cuda": 128, "cpu": 512}
# A plan's rows: one chunk of every row, classes per block from the budget and N.
ALL_ROWS = -1
_BLOCK_ROWS = {"cuda": 2048, "cpu": 1024}
_MIN_BLOCK_CLASSES = 128
_ROW_ALIGN = 8
_CLASS_ALIGN = 64


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
    key = device_key(device)
    itemsize = compute_dtype(dtype, device).itemsize
    budget = budget_bytes(key)
    if key == "cuda" and dtype in (torch.float16, torch.bfloat16) and weight_grad:
        return ALL_ROWS, -1
    rows = budget // (max(num_classes, 1) * itemsize)
    if rows >= _FUSED_MIN_ROWS[key]:
        return _align_down(rows, _ROW_ALIGN), num_classes
    block_rows = _BLOCK_ROWS[key]
    return block_rows, min(block_classes(budget, block_rows, itemsize), num_classes)


def distill_chunk_rows(num_classes: int, dtype: torch.dtype, device: torch.device, chunk_size=None) -> int:
    """Rows per chunk of :func:`fused_ce.linear_distillation_loss`: whole rows of the vocabulary.

    The divergence needs each row whole (both rows' lse before any term), so its
    chunks are rows only: ``chunk_size`` if given, else as many as fit three
    ``[rows, V]`` buffers (student logits, teacher logits, gradient) in the budget,
    rounded down to a multiple of 8 but at least ``_DISTILL_MIN_ROWS`` (below that the
    matmuls, not memory, are what costs).
    """
    if chunk_size is not None:
        if isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1:
            return chunk_size
        raise ArgumentError(f"chunk_size must be None or a positive int (rows per chunk), got {chunk_size!r}")
    key = device_key(device)
    itemsize = compute_dtype(dtype, device).itemsize
    rows = budget_bytes(key) // (3 * max(num_classes, 1) * itemsize)
    return max(_DISTILL_MIN_ROWS[key], _align_down(rows, _ROW_ALIGN))


def _explicit_plan(chunk_size, num_classes: int) -> tuple[int, int]:
    def positive(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool) and n >= 1

    if positive(chunk_size):
        return chunk_size, num_classes
    if isinstance(chunk_size, (tuple, list)) and len(chunk_size) == 2:
        rows, classes = chunk_size
        if (rows is None or positive(rows)) and positive(classes):
            return ALL_ROWS if rows is None else rows, min(classes, num_classes)
    raise ArgumentError(
        "chunk_size must be None, a positive int (rows per chunk) or a pair (rows, classes) of positive ints "
        f"(rows may be None: all of them), got {chunk_size!r}"
    )


def block_classes(budget: int, rows: int, itemsize: int) -> int:
    """Classes per block of ``rows`` rows in the budget: a multiple of 64, at least 128."""
    return max(_MIN_BLOCK_CLASSES, _align_down(budget // (rows * itemsize), _CLASS_ALIGN))


def device_key(device: torch.device) -> str:
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


def budget_bytes(device_type: str) -> int:
    text = os.environ.get(CHUNK_ENV, "").strip()
    if not text:
        return int(_DEFAULT_BUDGET_MB[device_type] * 2**20)
    try:
        mib = float(text)
    except ValueError:
        raise ArgumentError(f"{CHUNK_ENV} must be a number of MiB, got {text!r}") from None
    if not mib > 0:
        raise ArgumentError(f"{CHUNK_ENV} must be > 0 MiB, got {text!r}")
    return int(mib * 2**20)
