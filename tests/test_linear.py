"""fused_ce.linear_cross_entropy against F.cross_entropy(F.linear(...)), torch's own, and a float64 reference.

Losses and the gradients of input, linear_weight and linear_bias over a grid of shapes,
dtypes and options (tests/linear_problems.py has the problems and the references);
autograd: backward twice, double backward, gradcheck.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
import fused_ce.linear.api
import fused_ce.linear.loops
import fused_ce.linear.plan
from fused_ce.linear import LinearCrossEntropyLoss, linear_cross_entropy
from linear_problems import (
    DTYPES,
    IGNORE,
    OPTIONS,
    REDUCTIONS,
    TOLERANCES,
    assert_as_accurate_as_torch,
    check_against_reference,
    composed_loss,
    loss_and_grads,
    make_problem,
    random_upstream,
    reference_loss_and_grads,
)
from utils import dtype_id, max_error

# -- parity grid ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("chunk_size", [None, 5, (8, 24), (None, 24)],
                         ids=["chunk_auto", "rows5", "blocks8x24", "allrows24"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(device, dtype, chunk_size, option, reduction):
    # N = 37 rows in chunks of 5 (the last one short) over the whole vocabulary, in
    # blocks of 8 rows x 24 classes (two passes; V = 131: the last block short), or
    # all rows x 24 classes (the weight's gradient written once, in its dtype).
    x, w, target, kwargs = make_problem(option, (37,), 24, 131, dtype, device)
    check_against_reference(x, w, target, reduction, dict(kwargs, chunk_size=chunk_size))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "bias_zloss_softcap", "probs_weight_smoothing"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_batch_time_input(device, dtype, option, reduction):
    # (B, T, D) hidden states with (B, T) targets; 'none' gives (B, T).
    x, w, target, kwargs = make_problem(option, (3, 7), 16, 50, dtype, device)
    check_against_reference(x, w, target, reduction, dict(kwargs, chunk_size=4))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "bias", "probs_weight_smoothing"])
def test_unbatched_input(device, option, reduction):
    # input (D) with a 0-d class index (or a (V) probability vector).
    x, w, target, kwargs = make_problem(option, (), 12, 30, torch.float64, device)
    check_against_reference(x, w, target, reduction, kwargs)


@pytest.mark.parametrize(
    "chunk_size", [1, 3, 8, 64, (1, 1), (4, 10), (64, 30), (5, 77), (5, 500), (None, 1), (None, 10), (None, 500)],
    ids=str,
)
def test_chunk_sizes(device, chunk_size):
    # Chunks of one row, chunks that do not divide N, one chunk larger than N; blocks
    # of one logit, blocks that do not divide N or V, and blocks of the whole
    # vocabulary; all rows x one class, x blocks that do not divide V, x all of V.
    x, w, target, kwargs = make_problem("weight_smoothing_ignore", (21,), 16, 77, torch.float64, device)
    check_against_reference(x, w, target, "mean", dict(kwargs, chunk_size=chunk_size))


@pytest.mark.parametrize("num_classes", [1, 2, 3000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_vocabulary_sizes(device, dtype, num_classes):
    x, w, target, kwargs = make_problem("bias", (19,), 32, num_classes, dtype, device)
    check_against_reference(x, w, target, "mean", dict(kwargs, chunk_size=6))


def test_low_precision_errors_on_average_no_worse_than_torch(device):
    # The statistical form of assert_as_accurate_as_torch: over many small bf16 problems
    # (where single draws vary most), fused_ce's mean error against float64 is within
    # 1.25x of PyTorch's, for the loss and every gradient (30 draws still vary by ~15%).
    sums = torch.zeros(2, 4, dtype=torch.float64)  # [fused_ce, torch] x [loss, input, weight, bias]
    for seed in range(30):
        torch.manual_seed(seed)
        x, w, target, kwargs = make_problem("bias", (19,), 32, 2, torch.bfloat16, device)
        kwargs = dict(kwargs, reduction="mean")
        upstream = random_upstream((), device)
        expected = reference_loss_and_grads(x, w, target, upstream, kwargs)
        ours = loss_and_grads(linear_cross_entropy, x, w, target, upstream, dict(kwargs, chunk_size=6))
        theirs = loss_and_grads(composed_loss, x, w, target, upstream, kwargs)
        for k, (got, want) in enumerate(((ours, expected), (theirs, expected))):
            values, exp_values = (got[0], *got[1]), (want[0], *want[1])
            sums[k] += torch.tensor([max_error(a, e) for a, e in zip(values, exp_values)])
    assert bool((sums[0] <= 1.25 * sums[1]).all()), f"mean errors, fused_ce {sums[0] / 30} vs torch {sums[1] / 30}"


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "bias_zloss_softcap", "probs_weight_smoothing"])
def test_empty_batch(device, option, reduction):
    # N = 0: 'none' is empty, 'sum' 0 and 'mean' NaN, as in PyTorch; zero gradients.
    x, w, target, kwargs = make_problem(option, (0,), 8, 11, torch.float64, device)
    check_against_reference(x, w, target, reduction, kwargs)
    _, grads = loss_and_grads(linear_cross_entropy, x, w, target, torch.ones(()), dict(kwargs, reduction="sum"))
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_every_target_ignored(device, dtype, reduction):
    # 'mean' is 0 / 0 = NaN, 'sum' 0; no gradient flows (PyTorch's is zero, not NaN).
    x, w, target, kwargs = make_problem("bias_zloss_softcap", (9,), 8, 13, dtype, device)
    target.fill_(IGNORE)
    kwargs["weight"] = torch.rand(13, device=device).to(dtype) + 0.5
    upstream = random_upstream(target.shape if reduction == "none" else (), device)
    torch_kwargs = dict(kwargs, reduction=reduction)
    expected, expected_grads = loss_and_grads(composed_loss, x, w, target, upstream, torch_kwargs)
    loss, grads = loss_and_grads(linear_cross_entropy, x, w, target, upstream, torch_kwargs)
    torch.testing.assert_close(loss, expected, equal_nan=True, rtol=0, atol=0)
    for g, e in zip(grads, expected_grads):
        assert bool((g == 0).all()) and bool((e == 0).all())


def test_non_contiguous_operands(device):
    # A transposed view of the weight (a tied embedding stored [D, V]), strided input rows.
    x, w, target, kwargs = make_problem("bias", (10,), 16, 40, torch.float64, device)
    wide = torch.randn(10, 40, device=device, dtype=torch.float64)
    wide[:, 3:19] = x
    x = wide[:, 3:19]
    w = w.t().contiguous().t()
    assert not x.is_contiguous() and not w.is_contiguous()
    check_against_reference(x, w, target, "mean", dict(kwargs, chunk_size=3))


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.uint8])
def test_integer_targets(device, target_dtype):
    x, w, target, _ = make_problem("plain", (12,), 8, 20, torch.float32, device)
    got = linear_cross_entropy(x, w, target.to(target_dtype), reduction="none")
    torch.testing.assert_close(got, linear_cross_entropy(x, w, target, reduction="none"))


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("chunk_size", [5, (8, 24), (None, 24)], ids=["rows5", "blocks8x24", "allrows24"])
def test_low_precision_logits_with_fp32_accumulation(monkeypatch, chunk_size, reduction):
    # The CUDA fp16/bf16 path on the CPU: bf16 logits and matmuls, gradients summed
    # in fp32 (all rows, CUDA's default plan: the weight's made in bf16 once per
    # class block). This torch's CPU matmuls cannot write fp32 from bf16, so this
    # covers the fallback (bf16 products, added in fp32) an older torch takes on CUDA.
    for module in (fused_ce.linear.plan, fused_ce.linear.loops, fused_ce.linear.api):
        monkeypatch.setattr(module, "compute_dtype", lambda dtype, device: dtype)
    x, w, target, kwargs = make_problem("bias_zloss_softcap", (37,), 24, 131, torch.bfloat16, "cpu")
    check_against_reference(x, w, target, reduction, dict(kwargs, chunk_size=chunk_size))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_autocast(device, reduction):
    # Under autocast F.linear runs in the autocast dtype and F.cross_entropy in fp32;
    # so does the fused op (bf16 logits, fp32 loss), and gradients reach the fp32 leaves.
    dtype = torch.bfloat16
    x, w, target, kwargs = make_problem("bias", (21,), 16, 40, torch.float32, device)
    upstream = random_upstream(target.shape if reduction == "none" else (), device)
    kwargs = dict(kwargs, reduction=reduction, chunk_size=(8, 16))
    with torch.autocast(device, dtype=dtype):
        loss, grads = loss_and_grads(linear_cross_entropy, x, w, target, upstream, kwargs)
        torch_loss, torch_grads = loss_and_grads(composed_loss, x, w, target, upstream,
                                                 {k: v for k, v in kwargs.items() if k != "chunk_size"})
    assert loss.dtype == torch_loss.dtype == torch.float32
    expected, expected_grads = reference_loss_and_grads(
        x.to(dtype), w.to(dtype), target, upstream, dict(kwargs, linear_bias=kwargs["linear_bias"].to(dtype))
    )
    for name, got, torch_value, exp in zip(("loss", "grad input", "grad weight", "grad bias"), (loss, *grads),
                                           (torch_loss, *torch_grads), (expected, *expected_grads)):
        assert got.dtype == torch_value.dtype, name
        assert_as_accurate_as_torch(got, torch_value, exp, name)


# -- agreement with torch's own linear_cross_entropy -------------------------------------------

HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyLoss")
requires_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch >= 2.13 has F.linear_cross_entropy")


@requires_torch_lce
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "bias", "weight_smoothing_ignore", "probs_weight_smoothing"])
def test_matches_torch_linear_cross_entropy(device, option, reduction):
    x, w, target, kwargs = make_problem(option, (17,), 16, 45, torch.float64, device)
    if option.startswith("probs") and reduction == "none":
        reduction = "sum"
    kwargs = dict(kwargs, reduction=reduction)
    upstream = random_upstream(target.shape[:1] if reduction == "none" else (), device).double()
    expected, expected_grads = loss_and_grads(F.linear_cross_entropy, x, w, target, upstream, kwargs)
    loss, grads = loss_and_grads(linear_cross_entropy, x, w, target, upstream, kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


@requires_torch_lce
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_module_matches_torch_module(device, bias, reduction):
    kwargs = dict(bias=bias, reduction=reduction, label_smoothing=0.1, weight=torch.rand(30, device=device) + 0.5)
    expected_module = torch.nn.LinearCrossEntropyLoss(16, 30, device=device, **kwargs)
    module = LinearCrossEntropyLoss(16, 30, device=device, **kwargs)
    module.load_state_dict(expected_module.state_dict())
    assert set(module.state_dict()) == set(expected_module.state_dict())
    x = torch.randn(11, 16, device=device)
    target = torch.randint(0, 30, (11,), device=device)
    expected, loss = expected_module(x, target), module(x, target)
    upstream = torch.randn(expected.shape, device=device)
    expected.backward(upstream)
    loss.backward(upstream)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, expected_module.get_parameter(name).grad, rtol=2e-5, atol=2e-6)
    assert "num_classes=30" in repr(module)


def test_module_options(device):
    module = LinearCrossEntropyLoss(8, 12, bias=True, z_loss=1e-3, softcap=5.0, chunk_size=3, device=device)
    x = torch.randn(7, 8, device=device)
    target = torch.randint(0, 12, (7,), device=device)
    expected = linear_cross_entropy(
        x, module.linear.weight, target, linear_bias=module.linear.bias, z_loss=1e-3, softcap=5.0
    )
    torch.testing.assert_close(module(x, target), expected)
    with pytest.raises(NotImplementedError, match="out_features"):
        LinearCrossEntropyLoss(8, 12, out_features=(2,))


# -- autograd: backward twice, double backward, gradcheck -------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_backward_twice_with_retain_graph(device, dtype, reduction):
    # The second backward through the same graph must add the same gradients again
    # (the first one handed its precomputed buffers on).
    x, w, target, kwargs = make_problem("bias_zloss_softcap", (13,), 8, 21, dtype, device)
    kwargs = dict(kwargs, reduction=reduction, chunk_size=4)

    def twice(fn):
        params = [x.clone().requires_grad_(True), w.clone().requires_grad_(True),
                  kwargs["linear_bias"].clone().requires_grad_(True)]
        loss = fn(params[0], params[1], target, **dict(kwargs, linear_bias=params[2]))
        upstream = torch.linspace(0.5, 2.0, loss.numel(), device=device).reshape(loss.shape).to(loss.dtype)
        loss.backward(upstream, retain_graph=True)
        first = [p.grad.clone() for p in params]
        loss.backward(upstream)
        return first, [p.grad for p in params]

    first, total = twice(linear_cross_entropy)
    for a, b in zip(first, total):
        torch.testing.assert_close(b.float(), 2 * a.float(), rtol=2e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
    if dtype == torch.float32:
        def torch_loss(*args, chunk_size=None, **kw):
            return composed_loss(*args, **kw)

        expected_first, _ = twice(torch_loss)
        for a, e in zip(first, expected_first):
            torch.testing.assert_close(a, e, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["bias_zloss_softcap", "weight_smoothing_ignore", "probs_weight_smoothing"])
def test_gradcheck(device, option, reduction):
    x, w, target, kwargs = make_problem(option, (6,), 5, 9, torch.float64, device)
    bias = kwargs.pop("linear_bias", None)
    inputs = (x.requires_grad_(True), w.requires_grad_(True))
    if bias is not None:
        inputs += (bias.requires_grad_(True),)

    def fn(*params):
        b = params[2] if len(params) > 2 else None
        return linear_cross_entropy(params[0], params[1], target, linear_bias=b, reduction=reduction, chunk_size=4,
                                    **kwargs)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_double_backward(device, reduction):
    # create_graph=True (gradient penalties, Hessian-vector products): second
    # derivatives as F.cross_entropy(F.linear(...))'s.
    x, w, target, kwargs = make_problem("bias_zloss_softcap", (5,), 4, 7, torch.float64, device)
    kwargs = dict(kwargs, reduction=reduction)

    def second_derivatives(fn):
        params = [x.clone().requires_grad_(True), w.clone().requires_grad_(True)]
        loss = fn(params[0], params[1], target, **kwargs)
        upstream = torch.linspace(0.5, 1.5, loss.numel(), device=device, dtype=loss.dtype).reshape(loss.shape)
        grads = torch.autograd.grad(loss, params, upstream, create_graph=True)
        probe = sum((g * torch.linspace(-1, 1, g.numel(), device=device, dtype=g.dtype).reshape(g.shape)).sum()
                    for g in grads)
        return torch.autograd.grad(probe, params)

    expected = second_derivatives(lambda *a, **k: composed_loss(*a, reference=True, **k))
    got = second_derivatives(linear_cross_entropy)
    for g, e in zip(got, expected):
        assert bool(e.abs().max() > 1e-3)
        torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-10)


def test_gradients_only_where_required(device):
    # Only the weight requires grad (a frozen trunk): no input gradient is computed or returned.
    x, w, target, kwargs = make_problem("bias", (9,), 8, 15, torch.float32, device)
    w.requires_grad_(True)
    loss = linear_cross_entropy(x, w, target, **kwargs)
    loss.backward()
    assert w.grad is not None and x.grad is None and kwargs["linear_bias"].grad is None
    with torch.no_grad():
        assert not linear_cross_entropy(x, w, target, **kwargs).requires_grad


def test_probability_target_gradient_is_refused(device):
    x, w, target, kwargs = make_problem("probs_weight_smoothing", (4,), 8, 6, torch.float32, device)
    with pytest.raises(NotImplementedError, match="probability targets"):
        linear_cross_entropy(x, w, target.requires_grad_(True), **kwargs)


def test_ignore_index_none_is_torch_default(device):
    x, w, target, _ = make_problem("plain", (6,), 8, 10, torch.float32, device)
    target[0] = IGNORE
    torch.testing.assert_close(
        linear_cross_entropy(x, w, target, ignore_index=None), linear_cross_entropy(x, w, target)
    )


def test_exported_from_package():
    # The package exports what this module defines, once __init__ lists it.
    if hasattr(fused_ce, "linear_cross_entropy"):
        assert fused_ce.linear_cross_entropy is linear_cross_entropy
        assert fused_ce.LinearCrossEntropyLoss is LinearCrossEntropyLoss


def test_no_process_wide_matmul_flag_is_touched(device, monkeypatch):
    # The all-rows plan's bf16 weight gradient is summed in fp32 by an fp32-output matmul
    # per call; flipping torch.backends.cuda.matmul's reduced-precision flags instead
    # would change the precision of any other thread's matmuls in that window.
    written = []

    class Recorder:
        def __init__(self, matmul):
            object.__setattr__(self, "_matmul", matmul)

        def __getattr__(self, name):
            return getattr(self._matmul, name)

        def __setattr__(self, name, value):
            written.append(name)
            setattr(self._matmul, name, value)

    monkeypatch.setattr(torch.backends.cuda, "matmul", Recorder(torch.backends.cuda.matmul))
    for dtype in (torch.bfloat16, torch.float32):
        x, w, target, _ = make_problem("plain", (64,), 16, 300, dtype, device)
        w.requires_grad_(True)
        linear_cross_entropy(x, w, target, chunk_size=(None, 128)).backward()
        assert w.grad is not None
    assert written == []


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shift", [True, 1, 3])
def test_shift_is_next_token_prediction_without_slicing(device, shift, reduction):
    # Position t of each sequence predicts the class at t + shift, as the caller would
    # get by slicing hidden[:, :-shift] and target[:, shift:] (a copy of the hidden states).
    x, w, target, kwargs = make_problem("weight_zloss_ignore", (3, 9), 8, 40, torch.float32, device)
    k = int(shift)
    upstream = random_upstream((3, 9 - k) if reduction == "none" else (), device)
    got, got_grads = loss_and_grads(lambda *a, **kw: linear_cross_entropy(*a, shift=shift, **kw), x, w, target,
                                    upstream, dict(kwargs, reduction=reduction))
    xs = x.detach().requires_grad_(True)
    ws = w.detach().requires_grad_(True)
    want = linear_cross_entropy(xs[:, :-k], ws, target[:, k:], reduction=reduction, **kwargs)
    want_grads = torch.autograd.grad(want, (xs, ws), upstream)
    torch.testing.assert_close(got, want.detach(), **TOLERANCES[torch.float32])
    for g, wg in zip(got_grads, want_grads):
        torch.testing.assert_close(g, wg, **TOLERANCES[torch.float32])


def test_shift_past_the_sequence_counts_nothing(device):
    x, w, target, _ = make_problem("plain", (2, 3), 8, 10, torch.float32, device)
    assert linear_cross_entropy(x, w, target, shift=3, reduction="none").shape == (2, 0)
    assert linear_cross_entropy(x, w, target, shift=5).isnan()
    with pytest.raises(ValueError, match="shift"):
        linear_cross_entropy(x, w, target, shift=-1)
    with pytest.raises(ValueError, match="shift"):
        linear_cross_entropy(x[0, 0], w, target[0, 0], shift=1)
