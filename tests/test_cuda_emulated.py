"""The CUDA kernels, run on the CPU.

tests/cuda_emulator compiles the kernels of csrc/cuda as host C++ with a small shim in
which every CUDA thread is a std::thread (shuffles and __syncthreads through barriers),
and launches them through csrc/cuda/run.cuh as a GPU would. That checks every variant
(csrc/cuda/variants.h) and every option combination (csrc/cuda/options.h) -- row splits
around 16-byte alignment, vector heads and tails, every threads-per-row mapping, the
merges across threads, the target's entry written after the row, NaN rows for bad
targets -- on machines without a GPU, against the CPU kernels (which the other tests
hold to float64 references). Real-GPU behaviour (memory model, speed) is covered by the
CUDA tests on a GPU machine.
"""

import os
import pathlib

import pytest
import torch

import fused_ce  # noqa: F401 -- registers the CPU ops used as the reference here

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The streaming variants the dispatch table chooses by V (32: a warp per row).
STREAMING = ("stream32", "stream256", "stream512")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Every option combination of csrc/cuda/options.h, (target kind, weights, smoothing,
# soft-cap); class-index targets with weights and no smoothing run the one-hot kernels
# (their weight is read once per row), probability targets take smoothing at run time.
OPTIONS = [
    (kind, weighted, smoothing, softcap)
    for kind in ("index", "probs")
    for smoothing in (0.0, 0.1)
    for softcap in (0.0, 4.0)
    for weighted in (False, True)
]


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


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    y[1 % n] = -100  # an ignored row
    return y


def _copy_with_layout(t):
    """A copy of t with its strides and storage offset: its rows as (un)aligned as t's."""
    storage = torch.empty(t.untyped_storage().nbytes() // t.element_size(), dtype=t.dtype)
    return storage.as_strided(t.shape, t.stride(), t.storage_offset()).copy_(t)


def _compare(emulator, logits, target, weight, smoothing, softcap, variant, keep_rows=True, logit_map=(1.0, 1.0)):
    """Forward, backward (with zero, negative and positive coefficients), the fused kernel out
    of place and in place, and (keep_rows) backward_into_'s kept rows, against the CPU kernels;
    the fused gradient against the recomputed one, bit for bit. logit_map: (logit_scale,
    temperature)."""
    ignore = -100
    scale, temperature = logit_map
    emulated = dict(logit_scale=scale, temperature=temperature)
    cpu = dict(vocab_start=0, vocab_total=-1, logit_scale=scale, temperature=temperature)
    dtype = logits.dtype
    tol = _tolerance(dtype)
    got = emulator.forward(logits, target, weight, ignore, smoothing, softcap, 0, -1, variant, **emulated)
    want = torch.ops.fused_ce.cross_entropy_forward(logits, target, weight, ignore, smoothing, softcap, **cpu)
    for name, g, w in zip(("loss", "lse", "mass"), got, want):
        torch.testing.assert_close(g, w, **tol, equal_nan=True, msg=lambda m, name=name: f"{name}: {m}")
    # The argmax in the same pass: the CPU kernels' (torch.argmax's ties), nothing else changed.
    with_argmax = emulator.forward(
        logits, target, weight, ignore, smoothing, softcap, 0, -1, variant, **emulated, with_argmax=True
    )
    want_stats = torch.ops.fused_ce.cross_entropy_forward.stats(
        logits, target, weight, ignore, smoothing, softcap, **cpu
    )
    _assert_argmax(with_argmax[3:], want_stats[3:], dtype)
    _assert_bitwise(with_argmax[:3], got)

    n = logits.shape[0]
    acc = _acc(dtype)
    p_coef = torch.randn(n, dtype=acc)
    t_coef = torch.randn(n, dtype=acc)
    p_coef[0] = t_coef[0] = 0.0  # a row no gradient flows into
    if n > 2:
        p_coef[2] = 0.0  # only the target term
    lse = want[1]
    got_grad = emulator.backward(
        logits, target, weight, lse, p_coef, t_coef, ignore, smoothing, softcap, 0, -1, variant, None, None, **emulated
    )
    want_grad = torch.ops.fused_ce.cross_entropy_backward(
        logits, target, weight, lse, p_coef, t_coef, ignore, smoothing, softcap, **cpu
    )
    torch.testing.assert_close(got_grad, want_grad, **tol, equal_nan=True)

    # The fused kernel (gradient in the forward pass), out of place and over the logits.
    row_scale = torch.rand(n, dtype=acc)
    z_scale = torch.rand(n, dtype=acc) * 1e-2
    want = torch.ops.fused_ce.cross_entropy_fused(
        logits, target, weight, row_scale, z_scale, ignore, smoothing, softcap, **cpu
    )
    want_stats = torch.ops.fused_ce.cross_entropy_fused.stats(
        logits, target, weight, row_scale, z_scale, ignore, smoothing, softcap, **cpu
    )
    got = emulator.fused(logits, target, weight, row_scale, z_scale, ignore, smoothing, softcap, 0, -1, variant, False,
                         **emulated)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol, equal_nan=True)
    # Over the logits, and with the argmax: its batch is read again before the gradient
    # overwrites it; the other outputs the same bits.
    x = _copy_with_layout(logits)
    in_place = emulator.fused(x, target, weight, row_scale, z_scale, ignore, smoothing, softcap, 0, -1, variant, True,
                              **emulated, with_argmax=True)
    assert in_place[3].data_ptr() == x.data_ptr()
    _assert_bitwise(in_place[:4], got)
    _assert_argmax(in_place[4:], want_stats[4:], dtype)
    # The backward of the fused op recomputes rows with the coefficients ops.py forms (here
    # with an upstream of 1): the same gradient bits as the fused kernel wrote.
    _, f_lse, f_mass, f_grad = got
    recomputed = emulator.backward(
        logits, target, weight, f_lse, row_scale * f_mass + 2 * z_scale * f_lse, row_scale, ignore, smoothing,
        softcap, 0, -1, variant, None, None, **emulated,
    )
    assert torch.equal(recomputed.view(torch.uint8), f_grad.view(torch.uint8)), "fused and recomputed gradients differ"

    if not keep_rows:
        return
    # Rows whose upstream is 1 keep what the buffer holds; the others are recomputed.
    keep = torch.where(torch.arange(n) % 2 == 0, 1.0, 0.5).to(acc)
    held = torch.full_like(logits, 7.0)
    got_grad = emulator.backward(
        logits, target, weight, lse, p_coef, t_coef, ignore, smoothing, softcap, 0, -1, variant, keep, held, **emulated
    )
    torch.testing.assert_close(got_grad[0::2], held[0::2])
    torch.testing.assert_close(got_grad[1::2], want_grad[1::2], **tol, equal_nan=True)


def _assert_argmax(got, want, dtype):
    """(argmax, max_logit) of the kernels against the CPU kernels': the same columns."""
    assert torch.equal(got[0], want[0]), f"argmax {got[0].tolist()} != {want[0].tolist()}"
    torch.testing.assert_close(got[1], want[1], **_tolerance(dtype), equal_nan=True)


def _assert_bitwise(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g.view(torch.uint8), w.view(torch.uint8)), "changed by the argmax"


def _check_options(emulator, logits, variant, options=OPTIONS):
    n, v = logits.shape
    acc = _acc(logits.dtype)
    weight = (torch.rand(v, dtype=torch.float64) + 0.5).to(acc)
    for i, (kind, weighted, smoothing, softcap) in enumerate(options):
        target = _targets(kind, n, v, logits.dtype)
        _compare(emulator, logits, target, weight if weighted else None, smoothing, softcap, variant, keep_rows=i == 0)


def _some_options(i, every=3):
    """Every `every`-th option combination, starting at i: over `every` consecutive cases
    (shapes, layouts) each combination runs once (the emulator runs a thread per CUDA thread:
    every combination on every case would take most of an hour on two cores)."""
    return OPTIONS[i % every :: every]


# Each vocabulary size with a layout: whole vectors, a scalar head, a scalar tail, both;
# 9001: rows long enough for the batched loads of for_each_owned (kReadBatch = 4
# vectors per thread: 4 x 512 threads x 4 floats = 8192 elements a round at 512 threads).
SHAPES = [(1, "contiguous"), (7, "unaligned"), (33, "padded_rows"), (300, "unaligned"), (1025, "contiguous"),
          (1025, "padded_rows"), (9001, "unaligned")]


@pytest.mark.parametrize("variant", STREAMING)
@pytest.mark.parametrize("case", range(len(SHAPES)))
def test_float32_every_option_mapping_and_layout(emulator, variant, case):
    v, layout = SHAPES[case]
    torch.manual_seed(v * 7 + len(variant))
    _check_options(emulator, _logits(6, v, torch.float32, layout), variant, _some_options(case + len(variant)))


@pytest.mark.parametrize("v, layout", [(7, "unaligned"), (9001, "unaligned"), (33000, "padded_rows")], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_thousand_threads_per_row(emulator, dtype, v, layout):
    # The 1024-thread variant (for measuring): merges across 32 warps; V = 33000 has a
    # batched round of 4 x 1024 vectors (32768 bf16 elements) and two rounds of the write
    # loop's 2 x 1024.
    torch.manual_seed(v)
    options = [("index", False, 0.0, 0.0), ("index", True, 0.1, 0.0), ("probs", False, 0.0, 3.0)]
    _check_options(emulator, _logits(3, v, dtype, layout), "stream1024", options)


@pytest.mark.parametrize("variant", STREAMING)
@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("v", [7, 1025, 17000])  # 17000: a round of batched 8-element packs at 512 threads
def test_other_dtypes(emulator, variant, dtype, v):
    torch.manual_seed(v + len(variant))
    for i, layout in enumerate(("contiguous", "unaligned")):
        _check_options(emulator, _logits(5, v, dtype, layout), variant, _some_options(v + i + len(variant), every=4))


@pytest.mark.parametrize("variant", STREAMING)
def test_out_of_range_target_gives_a_nan_row_only(emulator, variant):
    logits = torch.randn(4, 40)
    target = torch.tensor([3, 40, -1, 7])  # rows 1 and 2 are out of range (and not ignore_index)
    for smoothing in (0.0, 0.1):
        loss, lse, mass = emulator.forward(logits, target, None, -100, smoothing, 0.0, 0, -1, variant)
        assert loss[1:3].isnan().all() and lse[1:3].isnan().all() and mass[1:3].isnan().all()
        good = torch.tensor([0, 3])
        want = torch.ops.fused_ce.cross_entropy_forward(logits[good], target[good], None, -100, smoothing, 0.0)
        torch.testing.assert_close(loss[good], want[0])
        grad = emulator.backward(
            logits, target, None, lse, torch.ones(4), torch.ones(4), -100, smoothing, 0.0, 0, -1, variant, None, None
        )
        assert grad[1:3].isnan().all()
        assert grad[good].isfinite().all()


@pytest.mark.parametrize("variant", STREAMING)
def test_non_finite_logits_match_the_cpu_kernels(emulator, variant):
    v = 50
    logits = torch.randn(6, v)
    logits[0, 3] = float("-inf")  # masked class: fine, unless the target puts mass on it
    logits[1, :] = float("-inf")  # every class masked: NaN, as in PyTorch
    logits[2, 7] = float("nan")
    logits[3, 9] = float("inf")
    logits[4, :] = float("nan")
    logits[5, :40] = float("-inf")  # the row's first batches are all -inf
    target = torch.tensor([3, 0, 1, 2, 4, 45])
    for smoothing in (0.0, 0.1):
        _compare(emulator, logits, target, None, smoothing, 0.0, variant)
    probs = torch.softmax(torch.randn(6, v), 1)
    _compare(emulator, logits, probs, None, 0.0, 0.0, variant)


def _argmax_rows(v, dtype, layout):
    """Rows whose argmax is decided by torch.argmax's rules (the lowest column among ties, the
    first NaN, +inf above all) at columns that fall to different threads, batches and (for the
    single-read variant) CTAs: the first elements (the scalar head of unaligned rows), the last
    (the tail), neighbours, columns far apart; with the column each rule picks."""
    logits = _logits(12, v, dtype, layout)
    top, last, mid = 50.0, v - 1, v // 2
    cases = [
        ((2, mid), top, 2),  # a tie across threads (and CTAs)
        ((mid, mid + 1), top, mid),  # neighbours: one vector or two lanes
        ((0, last), top, 0),  # the head against the tail
        ((last,), top, last),
        ((mid + 7, 3), float("nan"), 3),  # the first NaN wins
        ((last - 1, mid), float("inf"), mid),
        ((1, mid + 3), float("nan"), 1),
    ]
    want = []
    for i, (columns, value, column) in enumerate(cases):
        logits[i, list(columns)] = value
        want.append(column)
    logits[7, :] = float("-inf")  # no finite max: column 0, as torch.argmax
    want.append(0)
    logits[8, :] = float("-inf")
    logits[8, last - 2] = -1e30
    want.append(last - 2)
    logits[9, :] = 1.0  # all tied
    want.append(0)
    logits[10, :] = float("nan")
    want.append(0)
    logits[11, : v - 3] = float("-inf")  # the max in the last few columns
    want.append(int(logits[11].float().argmax()))
    return logits, torch.tensor(want)


def _check_argmax_rows(emulator, logits, want, variant):
    n, v = logits.shape
    target = torch.randint(0, v, (n,))
    for smoothing, softcap in ((0.0, 0.0), (0.1, 0.0), (0.0, 3.0)):
        args = (logits, target, None, -100, smoothing, softcap)
        got = emulator.forward(*args, 0, -1, variant, with_argmax=True)
        cpu = torch.ops.fused_ce.cross_entropy_forward.stats(*args)
        fused = emulator.fused(_copy_with_layout(logits), target, None, torch.ones(n), None, -100, smoothing,
                               softcap, 0, -1, variant, True, with_argmax=True)
        for argmax, max_logit in (got[3:], fused[4:]):
            _assert_argmax((argmax, max_logit), cpu[3:], logits.dtype)
            if softcap == 0.0:
                assert torch.equal(argmax, want), f"argmax {argmax.tolist()} != {want.tolist()}"
    # The soft-cap saturates: 60 and 80 both map to 3.0 (tanh rounds to 1), a tie the raw
    # logits do not have.
    capped = logits[:1].clone()
    capped[0, :] = 0.0
    capped[0, [v - 1, v // 2]] = torch.tensor([80.0, 60.0], dtype=logits.dtype)
    got = emulator.forward(capped, target[:1], None, -100, 0.0, 3.0, 0, -1, variant, with_argmax=True)
    assert got[3].tolist() == [v // 2]


@pytest.mark.parametrize("variant", STREAMING + ("stream1024",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_argmax_ties_and_non_finite_rows(emulator, variant, dtype):
    torch.manual_seed(0)
    logits, want = _argmax_rows(3001, dtype, "unaligned")
    _check_argmax_rows(emulator, logits, want, variant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_read_argmax_across_the_cluster(small_smem, dtype):
    w = 16 // torch.tensor([], dtype=dtype).element_size()
    v = 2 * CTA_VECTORS * w + 3  # a cluster of 3 CTAs
    assert small_smem.resolved_variant("single_read", v, "forward", 16 // w) == "single_read"
    torch.manual_seed(1)
    logits, want = _argmax_rows(v, dtype, "unaligned")
    _check_argmax_rows(small_smem, logits, want, "single_read")


@pytest.mark.parametrize("variant", STREAMING + ("single_read",))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("logit_map", [(0.25, 1.0), (1.0, 0.7), (3.0, 1.9)], ids=str)
def test_logit_scale_and_temperature(emulator, variant, dtype, softcap, logit_map):
    """softcap(logit_scale * x) / temperature in the mapped loops (the soft-cap's instantiations), as the CPU."""
    torch.manual_seed(7)
    for kind, smoothing, v, layout in [("index", 0.0, 7, "unaligned"), ("index", 0.1, 1025, "padded_rows"),
                                       ("probs", 0.0, 300, "contiguous")]:
        logits = _logits(5, v, dtype, layout)
        target = _targets(kind, 5, v, dtype)
        _compare(emulator, logits, target, None, smoothing, softcap, variant, logit_map=logit_map)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("variant", STREAMING + ("stream1024",))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_kernels(emulator, variant, dtype, temperature):
    torch.manual_seed(len(variant))
    for v, layout in [(7, "unaligned"), (1025, "contiguous"), (300, "padded_rows")]:
        logits = _logits(5, v, dtype, layout)
        logits[0, 2] = float("-inf")  # a zero probability
        grad_entropy = torch.randn(5, dtype=_acc(dtype))
        grad_entropy[1] = 0.0
        entropy, lse, grad = emulator.entropy(logits, grad_entropy, variant, temperature)
        want_entropy, want_lse = torch.ops.fused_ce.entropy_forward(logits, temperature)
        want_grad = torch.ops.fused_ce.entropy_backward(logits, want_entropy, want_lse, grad_entropy, temperature)
        torch.testing.assert_close(entropy, want_entropy, **_tolerance(dtype))
        torch.testing.assert_close(lse, want_lse, **_tolerance(dtype))
        torch.testing.assert_close(grad, want_grad, **_tolerance(dtype))


@pytest.mark.parametrize("variant", STREAMING)
def test_vocabulary_slices(emulator, variant):
    # Each slice of a vocabulary, with global targets (some in other slices) and
    # smoothing over the whole vocabulary, as the CPU kernels compute it.
    torch.manual_seed(len(variant))
    v = 61
    logits = torch.randn(6, v)
    target = torch.tensor([0, 60, -100, 25, 40, 3])
    for start, stop in [(0, 20), (20, 45), (45, 61)]:
        part = logits[:, start:stop]
        for smoothing in (0.0, 0.1):
            got = emulator.forward(part, target, None, -100, smoothing, 0.0, start, v, variant)
            want = torch.ops.fused_ce.cross_entropy_forward(part, target, None, -100, smoothing, 0.0, start, v)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **_tolerance(torch.float32))


def test_bitwise_reproducible(emulator):
    torch.manual_seed(0)
    logits = _logits(4, 9001, torch.bfloat16, "unaligned")
    target = _targets("index", 4, 9001, torch.bfloat16)
    row_scale = torch.rand(4)
    first = emulator.fused(logits, target, None, row_scale, None, -100, 0.0, 0.0, 0, -1, "stream512", False)
    again = emulator.fused(logits, target, None, row_scale, None, -100, 0.0, 0.0, 0, -1, "stream512", False)
    for a, b in zip(first, again):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_unknown_variant_is_refused(emulator):
    with pytest.raises(RuntimeError, match="must be one of stream32, stream256, stream512, stream1024, single_read"):
        emulator.forward(torch.randn(2, 5), torch.tensor([0, 1]), None, -100, 0.0, 0.0, 0, -1, "stream64")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v, layout", [(7, "unaligned"), (1025, "padded_rows"), (9001, "unaligned")], ids=str)
def test_scale_rows(emulator, dtype, v, layout):
    # Rows times their scale, rounded once; rows whose scale is exactly 1 untouched
    # (bitwise: 7 rows in a grid of 3 blocks, so the grid-stride loop comes round).
    torch.manual_seed(v)
    acc = _acc(dtype)
    rows = _logits(7, v, dtype, layout)
    scale = torch.tensor([0.5, 1.0, -3.0, 1.0, 1e-3, 2.0, 1.0], dtype=acc)
    want = (rows.to(acc) * scale[:, None]).to(dtype)
    before = rows.clone()
    emulator.scale_rows(rows, scale)
    torch.testing.assert_close(rows, want, rtol=0, atol=0)
    assert torch.equal(rows[scale == 1], before[scale == 1])


# The single-read variant (csrc/cuda/single_read.cuh) with a small share of shared memory
# per CTA, so that short rows already need clusters: 32 vectors of 16 bytes a CTA (256
# bf16 or 128 float32 elements) beside its scratch. V at the boundaries of one CTA, of a
# cluster of 2, and of the largest cluster (8); past it the streaming kernels run.
CTA_VECTORS = 32


def _single_read_cases(elements_per_vector):
    per_cta = CTA_VECTORS * elements_per_vector
    return [
        (1, "contiguous", 1), (7, "unaligned", 1), (per_cta, "contiguous", 1), (per_cta + 1, "unaligned", 1),
        (per_cta + elements_per_vector, "contiguous", 2), (2 * per_cta + 3, "padded_rows", 3),
        (5 * per_cta - 1, "unaligned", 5), (8 * per_cta + elements_per_vector - 1, "unaligned", 8),
        (8 * per_cta + elements_per_vector, "contiguous", 0),  # 0: too long for 8 CTAs: streaming
    ]


@pytest.fixture
def small_smem(emulator):
    emulator.set_single_read_smem(emulator.single_read_scratch_bytes() + 16 * CTA_VECTORS)
    yield emulator
    emulator.set_single_read_smem(113 * 1024)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("case", range(9))
def test_single_read_at_cluster_boundaries(small_smem, dtype, case):
    emulator = small_smem
    w = 16 // torch.tensor([], dtype=dtype).element_size()
    v, layout, cluster = _single_read_cases(w)[case]
    for pass_ in ("forward", "fused"):
        want = "single_read" if cluster else "stream256"
        assert emulator.resolved_variant("single_read", v, pass_, 16 // w) == want
    assert emulator.resolved_variant("single_read", v, "backward", 16 // w) in STREAMING  # reads once anyway
    torch.manual_seed(v)
    # (A cluster of 8 is 4096 threads on the CPU: fewer rows and combinations there.)
    rows, every = (3, 4) if cluster < 5 else (2, 6)
    _check_options(emulator, _logits(rows, v, dtype, layout), "single_read", _some_options(case, every=every))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_single_read_other_dtypes(small_smem, dtype):
    torch.manual_seed(3)
    for i, (v, layout) in enumerate([(7, "unaligned"), (300, "padded_rows"), (1000, "unaligned")]):
        _check_options(small_smem, _logits(3, v, dtype, layout), "single_read", _some_options(i, every=3))


def test_single_read_non_finite_and_bad_targets(small_smem):
    v = 600  # a cluster of 3 bf16 CTAs
    logits = torch.randn(6, v).bfloat16()
    logits[0, 3] = float("-inf")
    logits[1, :] = float("-inf")
    logits[2, 7] = float("nan")
    logits[3, 500] = float("inf")
    logits[4, :550] = float("-inf")
    target = torch.tensor([3, 0, 1, 2, 580, 599])
    for smoothing in (0.0, 0.1):
        _compare(small_smem, logits, target, None, smoothing, 0.0, "single_read", keep_rows=smoothing == 0)
    target[5] = v + 5  # out of range: a NaN row, the others as they were
    loss, lse, mass = small_smem.forward(logits, target, None, -100, 0.0, 0.0, 0, -1, "single_read")
    assert loss[5].isnan() and lse[5].isnan() and mass[5].isnan() and loss[:5].isfinite().any()
    got = small_smem.fused(logits, target, None, torch.ones(6), None, -100, 0.0, 0.0, 0, -1, "single_read", False)
    assert got[3][5].isnan().all() and got[3][0].isfinite().all()


def test_single_read_vocabulary_slices(small_smem):
    torch.manual_seed(1)
    v = 700
    logits = torch.randn(4, v)
    target = torch.tensor([0, 699, -100, 350])
    for start, stop in [(0, 300), (300, 700)]:
        part = logits[:, start:stop]
        got = small_smem.forward(part, target, None, -100, 0.1, 0.0, start, v, "single_read")
        want = torch.ops.fused_ce.cross_entropy_forward(part, target, None, -100, 0.1, 0.0, start, v)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **_tolerance(torch.float32))
