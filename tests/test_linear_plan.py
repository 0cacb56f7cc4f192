"""The linear path's machinery: the shard-level loops, the custom ops (opcheck, torch.compile),
the chunk plan and its memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_ce.linear import chunk_plan, linear_cross_entropy
from fused_ce.linear.loops import Head, fused_objective_and_gradients, shard_gradients, shard_statistics
from fused_ce.linear.plan import ALL_ROWS, CHUNK_ENV
from linear_problems import (
    IGNORE,
    composed_loss,
    make_problem,
)
from utils import dtype_id

# -- the shard-level loops (fused_ce/distributed.py builds on them) ----------------------------


def _head(x, w, b, target, class_weight, rows, classes, vocab_start=0, vocab_total=-1):
    return Head(x, w, b, target, class_weight, IGNORE, 0.1, 0.0, rows, vocab_start, vocab_total, classes)


@pytest.mark.parametrize("option", ["weight_smoothing_ignore", "probs_weight_smoothing"])
@pytest.mark.parametrize("plan", [(4, -1), (4, 7), (50, 1000)], ids=["rows4", "blocks4x7", "one_block"])
def test_shards_merge_into_the_whole(device, plan, option):
    # Two shards of the classes: their statistics merge into the whole rows', and
    # their gradients (with the whole rows' lse) add up to the whole one.
    x, w, target, kwargs = make_problem(option, (13,), 8, 29, torch.float64, device)
    bias = torch.randn(29, device=device, dtype=torch.float64)
    cw = kwargs["weight"]
    whole = _head(x, w, bias, target, cw, *plan)
    loss, lse, mass = shard_statistics(whole)

    cut = 12
    parts = []
    for classes in (slice(0, cut), slice(cut, 29)):
        t = target[:, classes] if target.is_floating_point() else target
        parts.append(_head(x, w[classes], bias[classes], t, cw[classes], *plan, classes.start, 29))
    stats = [shard_statistics(h) for h in parts]
    merged_lse = torch.logsumexp(torch.stack([st[1] for st in stats]), 0)
    merged_loss = sum(st[0] + st[2] * (merged_lse - st[1]) for st in stats)
    merged_mass = sum(st[2] for st in stats)
    torch.testing.assert_close(merged_lse, lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged_mass, mass, rtol=1e-12, atol=1e-12)

    t_coef = torch.rand(13, device=device, dtype=torch.float64)
    p_coef = t_coef * mass + 0.01 * lse
    needs = (True, True, True)
    gi, gw, gb = shard_gradients(whole, lse, p_coef, t_coef, needs)
    part_grads = [shard_gradients(h, lse, p_coef, t_coef, needs) for h in parts]
    torch.testing.assert_close(part_grads[0][0] + part_grads[1][0], gi, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g[1] for g in part_grads]), gw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([g[2] for g in part_grads]), gb, rtol=1e-12, atol=1e-12)

    # And the whole head's statistics and gradients are the composed torch ops'.
    x_ = x.clone().requires_grad_(True)
    w_ = w.clone().requires_grad_(True)
    b_ = bias.clone().requires_grad_(True)
    logits = F.linear(x_, w_, b_)
    expected_lse = torch.logsumexp(logits, 1)
    expected_loss = composed_loss(x, w, target, linear_bias=bias, weight=cw, label_smoothing=0.1, reduction="none",
                                  reference=True)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-12)
    # d/d logits of sum_i t_i loss_i + 0.01 * lse_i (p_coef = t * mass + 0.01 * lse is the
    # coefficient of 0.01/2 * lse**2): check through autograd.
    objective = (t_coef * composed_loss(x_, w_, target, linear_bias=b_, weight=cw, label_smoothing=0.1,
                                        reduction="none", reference=True)).sum() + 0.005 * expected_lse.square().sum()
    expected = torch.autograd.grad(objective, (x_, w_, b_))
    for got, exp in zip((gi, gw, gb), expected):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)


def test_whole_vocabulary_needed_for_the_fused_path(device):
    x, w, target, _ = make_problem("plain", (4,), 8, 10, torch.float32, device)
    head = _head(x, w[:5], None, target, None, 2, -1, 0, 10)
    with pytest.raises(ValueError, match="whole vocabulary"):
        fused_objective_and_gradients(head, torch.ones(4, device=device), None, (True, True, False))


# -- the ops: opcheck and torch.compile ---------------------------------------------------------


def _op_samples(device):
    """(name, op, args) for the three ops: index/probability targets, bias, weight, softcap."""
    samples = []
    # Chunks of 3 rows over whole rows (classes -1), or blocks of 3 rows x 5 classes.
    # Rows ALL_ROWS (-1): one chunk of all rows, classes given or (-1) from the budget;
    # its weight gradient has the weight's dtype.
    for option, rows, classes, dtype in (
        ("bias_zloss_softcap", 3, -1, torch.float32),
        ("weight_smoothing_ignore", 3, 5, torch.float32),
        ("probs_weight_smoothing", 3, 5, torch.float32),
        ("bias_zloss_softcap", 3, 4, torch.float32),
        ("bias_zloss_softcap", ALL_ROWS, 4, torch.bfloat16),
        ("weight_smoothing_ignore", ALL_ROWS, -1, torch.float32),
    ):
        x, w, target, kwargs = make_problem(option, (7,), 6, 11, dtype, device)
        bias = kwargs.get("linear_bias")
        weight = kwargs.get("weight")
        # (ignore_index, label_smoothing, softcap, logit_scale, temperature, chunk_rows, chunk_classes)
        options = (kwargs.get("ignore_index", IGNORE), kwargs.get("label_smoothing", 0.0), kwargs.get("softcap") or 0.0,
                   1.0 if dtype == torch.bfloat16 else 0.8, 1.0 if rows == ALL_ROWS else 1.6, rows, classes)
        option = f"{option}-rows{rows}-classes{classes}-{dtype_id(dtype)}"
        x.requires_grad_(True)
        w.requires_grad_(True)
        if bias is not None:
            bias.requires_grad_(True)
        head = (x, w, bias, target, weight)
        with_stats = rows != ALL_ROWS  # the argmax outputs, on and off
        samples.append((f"forward-{option}", torch.ops.fused_ce.linear_cross_entropy_forward.default,
                        head + options + (with_stats,)))
        row_scale = torch.rand(7, device=device)
        z_scale = torch.rand(7, device=device) if "zloss" in option else None
        needs = (True, True, bias is not None)
        samples.append(
            (f"fused-{option}", torch.ops.fused_ce.linear_cross_entropy_fused.default,
             head + (row_scale, z_scale) + options + needs + (not with_stats,))
        )
        detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in head)
        lse = torch.randn(7, device=device)
        coef = torch.randn(7, device=device)
        samples.append(
            (f"backward-{option}", torch.ops.fused_ce.linear_cross_entropy_backward.default,
             detached + (lse, coef * 1.5, coef) + options + needs)
        )
    return samples


OP_SAMPLE_NAMES = [name for name, _, _ in _op_samples("cpu")]


@pytest.mark.parametrize("sample", OP_SAMPLE_NAMES)
def test_opcheck(device, sample):
    _, op, args = next(s for s in _op_samples(device) if s[0] == sample)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize(
    "reduction, option, backend",
    [
        ("mean", "bias_zloss_softcap", "aot_eager"),
        ("sum", "weight_smoothing_ignore", "aot_eager"),
        ("none", "probs_weight_smoothing", "aot_eager"),
        ("mean", "weight_smoothing_ignore", "inductor"),
    ],
)
def test_compile_fullgraph_matches_eager(device, reduction, option, backend):
    torch._dynamo.reset()

    def step(x, w, target, bias, weight):
        loss = linear_cross_entropy(x, w, target, linear_bias=bias, weight=weight, reduction=reduction, chunk_size=4,
                                    **{k: v for k, v in kwargs.items() if k not in ("linear_bias", "weight")})
        return loss.sum() if reduction == "none" else loss

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    for n in (9, 14):  # a second batch size: recompilation or dynamic shapes
        x, w, target, kwargs = make_problem(option, (n,), 8, 19, torch.float32, device)
        bias, weight = kwargs.get("linear_bias"), kwargs.get("weight")
        results = []
        for fn in (step, compiled):
            xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            loss = fn(xs, ws, target, bias, weight)
            loss.backward()
            results.append((loss.detach(), xs.grad, ws.grad))
        for got, expected in zip(results[1], results[0]):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    torch._dynamo.reset()


def test_compile_backward_twice(device):
    # Under torch.compile the precomputed gradients are scaled out of place, so a
    # second backward through the same graph is still right.
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, w, t: linear_cross_entropy(x, w, t, chunk_size=4), fullgraph=True,
                             backend="aot_eager")
    x, w, target, _ = make_problem("plain", (10,), 8, 17, torch.float32, device)
    w.requires_grad_(True)
    loss = compiled(x, w, target)
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()
    torch.testing.assert_close(w.grad, 2 * first)
    torch._dynamo.reset()


# -- chunk size, memory, bad input ---------------------------------------------------------------


def test_chunk_plan_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(CHUNK_ENV, raising=False)
    assert chunk_plan(1000, torch.float32, cpu, chunk_size=7) == (7, 1000)
    assert chunk_plan(1000, torch.float32, cpu, chunk_size=(7, 300)) == (7, 300)
    assert chunk_plan(1000, torch.float32, cpu, chunk_size=(7, 3000)) == (7, 1000)
    assert chunk_plan(1000, torch.float32, cpu, chunk_size=(None, 300)) == (ALL_ROWS, 300)
    assert chunk_plan(1000, torch.float32, cpu, chunk_size=[None, 3000]) == (ALL_ROWS, 1000)
    # CUDA fp16/bf16: all rows, the classes per block settled in the op from N.
    assert chunk_plan(256000, torch.bfloat16, cuda) == (ALL_ROWS, -1)
    assert chunk_plan(1000, torch.float16, cuda) == (ALL_ROWS, -1)
    # ... when the weight's gradient is wanted; without it, whole rows as below.
    assert chunk_plan(256000, torch.bfloat16, cuda, weight_grad=False) == (256 * 2**20 // 512000 // 8 * 8, 256000)
    # A budget of B MiB: whole rows, B * 2**20 // (V * element size) of them (a
    # multiple of 8) if that is at least 128 ...
    monkeypatch.setenv(CHUNK_ENV, "1")
    assert chunk_plan(1000, torch.float32, cpu) == (2**20 // 4000 // 8 * 8, 1000)
    assert chunk_plan(1000, torch.bfloat16, cpu) == (2**20 // 4000 // 8 * 8, 1000)  # CPU bf16 computes in fp32
    assert chunk_plan(1000, torch.float32, cuda) == (2**20 // 4000 // 8 * 8, 1000)
    # ... else blocks of 1024 rows (CPU; 2048 on CUDA) x a multiple of 64 classes.
    assert chunk_plan(32000, torch.float32, cpu) == (1024, 2**20 // (1024 * 4) // 64 * 64)
    assert chunk_plan(32000, torch.float32, cuda) == (2048, 2**20 // (2048 * 4) // 64 * 64)
    assert chunk_plan(32000, torch.float32, cpu)[1] >= 128
    monkeypatch.setenv(CHUNK_ENV, "0.01")
    assert chunk_plan(300, torch.float32, cpu) == (1024, 128)  # at least 128 classes per block
    assert chunk_plan(100, torch.float32, cpu) == (1024, 100)
    monkeypatch.delenv(CHUNK_ENV)
    # The defaults: 3 MiB on the CPU, 256 MiB on CUDA.
    assert chunk_plan(32000, torch.float32, cpu) == (1024, 768)
    assert chunk_plan(6000, torch.float32, cpu) == (128, 6000)
    assert chunk_plan(256000, torch.float32, cuda) == (256, 256000)
    for bad in ("0", "-1", "lots"):
        monkeypatch.setenv(CHUNK_ENV, bad)
        for dtype, device in ((torch.float32, cpu), (torch.bfloat16, cuda)):
            with pytest.raises(ValueError, match=CHUNK_ENV):
                chunk_plan(1000, dtype, device)
    for bad in (0, -3, 2.5, True, (4,), (4, 0), (4, 5, 6), (None, None), (None, 0), (4, None)):
        with pytest.raises(ValueError, match="chunk_size"):
            chunk_plan(1000, torch.float32, cpu, chunk_size=bad)


def test_all_rows_plan_classes_from_budget(monkeypatch):
    # The all-rows plan's classes per block: budget // (N * element size), a
    # multiple of 64, at least 128, at most V; settled when the op runs.
    monkeypatch.setenv(CHUNK_ENV, "1")

    def planned(n, v, classes=-1, dtype=torch.float32):
        x, w = torch.zeros(n, 4, dtype=dtype), torch.zeros(v, 4, dtype=dtype)
        head = Head(x, w, None, torch.zeros(n, dtype=torch.long), None, IGNORE, 0.0, 0.0, ALL_ROWS, classes=classes)
        head = head.planned()
        return head.rows, head.block_classes

    assert planned(100, 5000) == (100, 2**20 // (100 * 4) // 64 * 64)
    assert planned(100, 5000, dtype=torch.bfloat16) == (100, 2**20 // (100 * 4) // 64 * 64)  # CPU: fp32 blocks
    assert planned(100, 1000) == (100, 1000)
    assert planned(10**5, 5000) == (10**5, 128)
    assert planned(0, 5000) == (1, 5000)
    assert planned(100, 5000, classes=7) == (100, 7)


def test_default_plan_memory_on_cuda(cuda_device, monkeypatch):
    # bf16 on CUDA, default plan (all rows x 8 blocks of 8192 classes in a 64 MiB
    # budget): beyond the bf16 gradients, the block buffer and the fp32 input-gradient
    # accumulator -- not the fp32 [V, D] weight accumulator of the other plans (64 MiB).
    monkeypatch.setenv(CHUNK_ENV, "64")
    n, d, v = 4096, 256, 65536
    x = torch.randn(n, d, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, d, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,), device=cuda_device)
    linear_cross_entropy(x, w, target).backward()  # warm-up: cuBLAS workspaces
    x.grad = w.grad = None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(x, w, target).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert w.grad.dtype == torch.bfloat16
    mib = 2**20
    allowed = (x.numel() + w.numel()) * 2 + 64 * mib + x.numel() * 4 + 16 * mib
    assert peak <= allowed, f"peak {peak / mib:.0f} MiB, allowed {allowed / mib:.0f} MiB"


def test_no_full_logits_on_cuda(cuda_device):
    # The point of the op: peak memory far below the N x V logits.
    n, d, v = 4096, 256, 32768
    x = torch.randn(n, d, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(v, d, device=cuda_device, dtype=torch.bfloat16, requires_grad=True)
    target = torch.randint(0, v, (n,), device=cuda_device)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(x, w, target, chunk_size=256).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    logits_bytes = n * v * 2
    grads_bytes = (x.numel() + w.numel()) * 2 + w.numel() * 4  # .grad, and the fp32 weight accumulator
    assert peak < grads_bytes + logits_bytes // 8, f"peak {peak / 2**20:.0f} MiB"
