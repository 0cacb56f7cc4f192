"""The CUDA kernels, run on the CPU.

tests/cuda_emulator compiles csrc/cuda/kernels.cuh as host C++ with a small shim
in which every CUDA thread is a std::thread (shuffles and __syncthreads through
barriers). That checks the kernels' indexing -- row splits around 16-byte
alignment, vector heads and tails, every threads-per-row mapping, the merges
across threads, NaN rows for bad targets -- on machines without a GPU, against
the CPU kernels (which the other tests hold to float64 references). Real-GPU
behaviour (memory model, speed) is covered by the CUDA tests on a GPU machine.
"""

import os
import pathlib

import pytest
import torch

import fused_ce  # noqa: F401 -- registers the CPU ops used as the reference here

ROOT = pathlib.Path(__file__).resolve().parent.parent
THREADS = (32, 256, 512)  # every mapping of csrc/cuda/kernels.cuh's threads_per_row
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    from torch.utils.cpp_extension import load

    build = os.environ.get("FUSED_CE_EMULATOR_BUILD") or str(tmp_path_factory.mktemp("cuda_emulator"))
    return load(
        "fused_ce_cuda_emulator",
        [str(ROOT / "tests" / "cuda_emulator" / "emulator.cpp")],
        extra_include_paths=[str(ROOT / "csrc"), str(ROOT / "tests" / "cuda_emulator")],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=build,
        verbose=False,
    )


def _tolerance(dtype):
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    if dtype == torch.float32:
        return {"rtol": 2e-5, "atol": 2e-6}
    # Both sides compute in fp32 and round once: at most one unit apart.
    return {"rtol": 1e-2, "atol": 1e-3}


def _logits(n, v, dtype, layout):
    if layout == "contiguous":
        return torch.randn(n, v, dtype=torch.float64).mul_(3).to(dtype)
    if layout == "unaligned":  # every row starts one element past a 16-byte boundary
        return torch.randn(n, v + 1, dtype=torch.float64).mul_(3).to(dtype)[:, 1:]
    assert layout == "padded_rows"  # row stride v + 3
    return torch.randn(n, v + 3, dtype=torch.float64).mul_(3).to(dtype)[:, :v]


def _targets(kind, n, v, dtype):
    if kind == "probs":
        q = torch.rand(n, v + 2, dtype=torch.float64)[:, 1 : v + 1]
        return (q / q.sum(1, keepdim=True)).to(dtype)
    y = torch.randint(0, v, (n,))
    y[1] = -100  # an ignored row
    return y


def _compare(emulator, logits, target, weight, smoothing, softcap, threads):
    ignore = -100
    dtype = logits.dtype
    got = emulator.forward(logits, target, weight, ignore, smoothing, softcap, 0, -1, threads)
    want = torch.ops.fused_ce.cross_entropy_forward(logits, target, weight, ignore, smoothing, softcap)
    for name, g, w in zip(("loss", "lse", "mass"), got, want):
        torch.testing.assert_close(g, w, **_tolerance(dtype), equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")

    n = logits.shape[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    p_coef = torch.randn(n, dtype=acc)
    t_coef = torch.randn(n, dtype=acc)
    p_coef[0] = t_coef[0] = 0.0  # a row no gradient flows into
    lse = want[1]
    got_grad = emulator.backward(
        logits, target, weight, lse, p_coef, t_coef, ignore, smoothing, softcap, 0, -1, threads, None, None
    )
    want_grad = torch.ops.fused_ce.cross_entropy_backward(
        logits, target, weight, lse, p_coef, t_coef, ignore, smoothing, softcap
    )
    torch.testing.assert_close(got_grad, want_grad, **_tolerance(dtype), equal_nan=True)

    # The fused kernel (gradient in the forward pass), out of place and over the logits.
    row_scale = torch.rand(n, dtype=acc)
    z_scale = torch.rand(n, dtype=acc) * 1e-2
    want = torch.ops.fused_ce.cross_entropy_fused(
        logits, target, weight, row_scale, z_scale, ignore, smoothing, softcap
    )
    for inplace in (False, True):
        x = logits.clone() if inplace else logits
        got = emulator.fused(x, target, weight, row_scale, z_scale, ignore, smoothing, softcap, 0, -1, threads, inplace)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **_tolerance(dtype), equal_nan=True)
        if inplace:
            assert got[3].data_ptr() == x.data_ptr()

    # Rows whose upstream is 1 keep what the buffer holds; the others are recomputed.
    keep = torch.where(torch.arange(n) % 2 == 0, 1.0, 0.5).to(acc)
    held = torch.full_like(logits, 7.0)
    got_grad = emulator.backward(
        logits, target, weight, lse, p_coef, t_coef, ignore, smoothing, softcap, 0, -1, threads, keep, held
    )
    torch.testing.assert_close(got_grad[0::2], held[0::2])
    torch.testing.assert_close(got_grad[1::2], want_grad[1::2], **_tolerance(dtype), equal_nan=True)


# Each vocabulary size with a layout: whole vectors, a scalar head, a scalar tail, both;
# 9001: rows long enough for the batched loads of for_each_owned (kReadBatch = 4
# vectors per thread: 4 x 512 threads x 4 floats = 8192 elements a round at 512 threads).
SHAPES = [(1, "contiguous"), (7, "unaligned"), (33, "padded_rows"), (300, "unaligned"), (1025, "contiguous"),
          (1025, "padded_rows"), (9001, "unaligned")]


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("v, layout", SHAPES, ids=str)
def test_float32_every_mapping_and_layout(emulator, threads, v, layout):
    torch.manual_seed(v * 7 + threads)
    n = 6
    logits = _logits(n, v, torch.float32, layout)
    weight = torch.rand(v) + 0.5
    for kind, w, smoothing, softcap in [
        ("index", None, 0.0, 0.0),
        ("index", weight, 0.2, 0.0),
        ("index", None, 0.1, 4.0),
        ("probs", weight, 0.1, 0.0),
        ("probs", None, 0.0, 4.0),
    ]:
        _compare(emulator, logits, _targets(kind, n, v, torch.float32), w, smoothing, softcap, threads)


@pytest.mark.parametrize("v, layout", [(7, "unaligned"), (9001, "unaligned"), (33000, "padded_rows")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thousand_threads_per_row(emulator, dtype, v, layout):
    # The 1024-thread mapping (FUSED_CE_CUDA_THREADS_PER_ROW=1024, for measuring):
    # merges across 32 warps; V = 33000 has a batched round of 4 x 1024 vectors
    # (32768 bf16 elements) and two rounds of the write loop's 2 x 1024.
    torch.manual_seed(v)
    n = 3
    acc = torch.float32
    logits = _logits(n, v, dtype, layout)
    weight = (torch.rand(v) + 0.5).to(acc)
    _compare(emulator, logits, _targets("index", n, v, dtype), weight, 0.1, 0.0, 1024)
    _compare(emulator, logits, _targets("probs", n, v, dtype), None, 0.0, 3.0, 1024)


@pytest.mark.parametrize("threads", THREADS)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("v", [7, 1025, 17000])  # 17000: a round of batched 8-element packs at 512 threads
def test_other_dtypes(emulator, threads, dtype, v):
    torch.manual_seed(v + threads)
    n = 5
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight = (torch.rand(v) + 0.5).to(acc)
    for layout in ("contiguous", "unaligned"):
        logits = _logits(n, v, dtype, layout)
        _compare(emulator, logits, _targets("index", n, v, dtype), weight, 0.1, 0.0, threads)
        _compare(emulator, logits, _targets("probs", n, v, dtype), None, 0.0, 3.0, threads)


@pytest.mark.parametrize("threads", THREADS)
def test_out_of_range_target_gives_a_nan_row_only(emulator, threads):
    logits = torch.randn(4, 40)
    target = torch.tensor([3, 40, -1, 7])  # rows 1 and 2 are out of range (and not ignore_index)
    loss, lse, mass = emulator.forward(logits, target, None, -100, 0.0, 0.0, 0, -1, threads)
    assert loss[1:3].isnan().all() and lse[1:3].isnan().all() and mass[1:3].isnan().all()
    good = torch.tensor([0, 3])
    want = torch.ops.fused_ce.cross_entropy_forward(logits[good], target[good], None, -100, 0.0, 0.0)
    torch.testing.assert_close(loss[good], want[0])
    grad = emulator.backward(
        logits, target, None, lse, torch.ones(4), torch.ones(4), -100, 0.0, 0.0, 0, -1, threads, None, None
    )
    assert grad[1:3].isnan().all()
    assert grad[good].isfinite().all()


@pytest.mark.parametrize("threads", THREADS)
def test_non_finite_logits_match_the_cpu_kernels(emulator, threads):
    v = 50
    logits = torch.randn(5, v)
    logits[0, 3] = float("-inf")  # masked class: fine, unless the target puts mass on it
    logits[1, :] = float("-inf")  # every class masked: NaN, as in PyTorch
    logits[2, 7] = float("nan")
    logits[3, 9] = float("inf")
    target = torch.tensor([3, 0, 1, 2, 4])
    for smoothing in (0.0, 0.1):
        _compare(emulator, logits, target, None, smoothing, 0.0, threads)


@pytest.mark.parametrize("threads", THREADS + (1024,))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_kernels(emulator, threads, dtype):
    torch.manual_seed(threads)
    for v, layout in [(7, "unaligned"), (1025, "contiguous"), (300, "padded_rows")]:
        logits = _logits(5, v, dtype, layout)
        logits[0, 2] = float("-inf")  # a zero probability
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad_entropy = torch.randn(5, dtype=acc)
        grad_entropy[1] = 0.0
        entropy, lse, grad = emulator.entropy(logits, grad_entropy, threads)
        want_entropy, want_lse = torch.ops.fused_ce.entropy_forward(logits)
        want_grad = torch.ops.fused_ce.entropy_backward(logits, want_entropy, want_lse, grad_entropy)
        torch.testing.assert_close(entropy, want_entropy, **_tolerance(dtype))
        torch.testing.assert_close(lse, want_lse, **_tolerance(dtype))
        torch.testing.assert_close(grad, want_grad, **_tolerance(dtype))


@pytest.mark.parametrize("threads", THREADS)
def test_vocabulary_slices(emulator, threads):
    # Each slice of a vocabulary, with global targets (some in other slices) and
    # smoothing over the whole vocabulary, as the CPU kernels compute it.
    torch.manual_seed(threads)
    v = 61
    logits = torch.randn(6, v)
    target = torch.tensor([0, 60, -100, 25, 40, 3])
    for start, stop in [(0, 20), (20, 45), (45, 61)]:
        part = logits[:, start:stop]
        for smoothing in (0.0, 0.1):
            got = emulator.forward(part, target, None, -100, smoothing, 0.0, start, v, threads)
            want = torch.ops.fused_ce.cross_entropy_forward(part, target, None, -100, smoothing, 0.0, start, v)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **_tolerance(torch.float32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v, layout", [(7, "unaligned"), (1025, "padded_rows"), (9001, "unaligned")], ids=str)
def test_scale_rows(emulator, dtype, v, layout):
    # Rows times their scale, rounded once; rows whose scale is exactly 1 untouched
    # (bitwise: 7 rows in a grid of 3 blocks, so the grid-stride loop comes round).
    torch.manual_seed(v)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rows = _logits(7, v, dtype, layout)
    scale = torch.tensor([0.5, 1.0, -3.0, 1.0, 1e-3, 2.0, 1.0], dtype=acc)
    want = (rows.to(acc) * scale[:, None]).to(dtype)
    before = rows.clone()
    emulator.scale_rows(rows, scale)
    torch.testing.assert_close(rows, want, rtol=0, atol=0)
    assert torch.equal(rows[scale == 1], before[scale == 1])
