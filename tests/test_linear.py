"""fused_ce.linear_cross_entropy against F.cross_entropy(F.linear(...)) and a float64 reference.

The reference composes torch ops in float64 on the very same (rounded) inputs:
``F.linear`` then the loss (``cross_entropy_reference``, which also soft-caps), plus
the z-loss term. Losses and the gradients of input, linear_weight and linear_bias
are compared with it. float32/float64 results must be close; float16/bfloat16 ones
are held to PyTorch's own accuracy: their error against float64 may be at most
twice the error of the same composition of torch ops at that dtype (``F.linear``
then ``F.cross_entropy``), plus a tiny floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from utils import dtype_id, max_error

import fused_ce
import fused_ce.linear.api
import fused_ce.linear.loops
import fused_ce.linear.plan
from fused_ce.linear import LinearCrossEntropyLoss, chunk_plan, linear_cross_entropy
from fused_ce.linear.loops import Head, fused_objective_and_gradients, shard_gradients, shard_statistics
from fused_ce.linear.plan import ALL_ROWS, CHUNK_ENV
from fused_ce.reference import cross_entropy_reference, torch_cross_entropy

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
IGNORE = -100

# float32: the matmuls (D terms) and the loss kernel's 20-ulp exp; gradients of the
# weight sum over N rows. float64: summation order only.
TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}

# Named option sets; "ignore" marks every third row (from the second on).
OPTIONS = {
    "plain": dict(),
    "bias": dict(bias=True),
    "weight_smoothing_ignore": dict(weight=True, ignore=True, label_smoothing=0.2),
    "ignore_class": dict(ignore=True, ignore_index=0),
    "bias_zloss_softcap": dict(bias=True, z_loss=1e-3, softcap=4.0),
    "weight_zloss_ignore": dict(weight=True, ignore=True, z_loss=1e-2),
    "probs_weight_smoothing": dict(probs=True, weight=True, label_smoothing=0.1),
}




def make_problem(option: str, batch_shape, hidden: int, num_classes: int, dtype=torch.float32, device="cpu"):
    """input (*batch, D), linear_weight (V, D), target, and the keyword arguments of `option`."""
    spec = OPTIONS[option]
    x = torch.randn(*batch_shape, hidden, device=device).to(dtype)
    # Logits with a spread of about 3 nats.
    w = (3 * torch.randn(num_classes, hidden, device=device) / hidden**0.5).to(dtype)
    kwargs = {}
    if spec.get("probs"):
        target = (2 * torch.randn(*batch_shape, num_classes, device=device)).softmax(-1).to(dtype)
    else:
        target = torch.randint(0, num_classes, tuple(batch_shape), device=device)
        if spec.get("ignore"):
            ignore_index = spec.get("ignore_index", IGNORE)
            if "ignore_index" in spec:
                kwargs["ignore_index"] = ignore_index
            target.view(-1)[1::3] = ignore_index
    if spec.get("bias"):
        kwargs["linear_bias"] = torch.randn(num_classes, device=device).to(dtype)
    if spec.get("weight"):
        kwargs["weight"] = (torch.rand(num_classes, device=device) + 0.5).to(dtype)
    for key in ("label_smoothing", "z_loss", "softcap"):
        if key in spec:
            kwargs[key] = spec[key]
    return x, w, target, kwargs


def composed_loss(x, w, target, *, linear_bias=None, weight=None, reduction="mean", ignore_index=IGNORE,
                  label_smoothing=0.0, z_loss=0.0, softcap=None, chunk_size=None, reference=False):
    """F.linear, then the loss, as torch ops: in float64 (reference=True) or at the inputs' dtype."""
    logits = F.linear(x, w, linear_bias)
    kwargs = dict(weight=weight, ignore_index=ignore_index, label_smoothing=label_smoothing)
    class_dim_logits = logits.movedim(-1, 1) if logits.dim() > 2 else logits
    class_dim_target = target.movedim(-1, 1) if target.is_floating_point() and target.dim() > 2 else target
    compose = cross_entropy_reference if reference else torch_cross_entropy
    return compose(class_dim_logits, class_dim_target, reduction=reduction, softcap=softcap, z_loss=z_loss, **kwargs)


def _to64(t):
    return t.detach().to(torch.float64) if isinstance(t, torch.Tensor) and t.is_floating_point() else t


def loss_and_grads(fn, x, w, target, upstream, kwargs):
    """fn's loss and the gradients of (loss . upstream) w.r.t. input, weight and bias (if any)."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    kwargs = dict(kwargs)
    params = [x, w]
    if kwargs.get("linear_bias") is not None:
        kwargs["linear_bias"] = kwargs["linear_bias"].detach().requires_grad_(True)
        params.append(kwargs["linear_bias"])
    loss = fn(x, w, target, **kwargs)
    grads = torch.autograd.grad(loss, params, upstream.to(loss.dtype))
    return loss.detach(), grads


def reference_loss_and_grads(x, w, target, upstream, kwargs):
    kwargs64 = {k: _to64(v) for k, v in kwargs.items() if k != "chunk_size"}
    fn = lambda *a, **k: composed_loss(*a, reference=True, **k)
    return loss_and_grads(fn, _to64(x), _to64(w), _to64(target), _to64(upstream), kwargs64)



def assert_as_accurate_as_torch(actual, torch_value, expected, what):
    """Error vs float64 <= 2 x the composed torch ops' error at that dtype + two units in the last place
    of the result's dtype (at least 1e-6 relative: float32 results of bf16 math under autocast).

    The floor: the weight and bias gradients are sums over rows of gradient entries
    that both sides round to the dtype, so one draw of PyTorch's error can be far below
    its typical size (on an H200, a 19-row bf16 bias gradient: PyTorch 0.3 ulp from
    float64, fused_ce 1.7). That fused_ce is at least as accurate *on average* is
    test_low_precision_errors_on_average_no_worse_than_torch's.
    """
    assert torch.equal(actual.isnan().cpu(), expected.isnan().cpu()), f"{what}: NaN pattern differs"
    finite = ~expected.isnan()
    scale = float(expected[finite].abs().max()) if bool(finite.any()) else 0.0
    floor = max(1e-6, 2 * torch.finfo(actual.dtype).eps) * scale + 1e-8
    error, torch_error = max_error(actual, expected), max_error(torch_value, expected)
    assert error <= 2 * torch_error + floor, (
        f"{what}: max error {error:.3g} vs float64, PyTorch's own error at this dtype is {torch_error:.3g}"
    )


def random_upstream(loss_shape, device):
    # Not ones: a wrong per-row scale shows.
    return torch.randn(loss_shape, device=device)


def check_against_reference(x, w, target, reduction, kwargs):
    """Loss and gradients of linear_cross_entropy vs float64 (and the torch composition at low precision)."""
    dtype = x.dtype
    kwargs = dict(kwargs, reduction=reduction)
    loss_shape = target.shape[: x.dim() - 1] if reduction == "none" else ()
    upstream = random_upstream(loss_shape, x.device)
    x_before, w_before = x.clone(), w.clone()
    expected, expected_grads = reference_loss_and_grads(x, w, target, upstream, kwargs)
    loss, grads = loss_and_grads(linear_cross_entropy, x, w, target, upstream, kwargs)

    assert torch.equal(x, x_before) and torch.equal(w, w_before), "the inputs were modified"
    assert loss.dtype == dtype and loss.shape == expected.shape
    names = ("loss", "grad input", "grad linear_weight", "grad linear_bias")
    for g, e in zip(grads, expected_grads):
        assert g.dtype == dtype and g.shape == e.shape
    if dtype in LOW_PRECISION:
        torch_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
        torch_loss, torch_grads = loss_and_grads(composed_loss, x, w, target, upstream, torch_kwargs)
        for name, got, torch_value, exp in zip(names, (loss, *grads), (torch_loss, *torch_grads),
                                               (expected, *expected_grads)):
            assert_as_accurate_as_torch(got, torch_value, exp, name)
    else:
        tol = TOLERANCES[dtype]
        for name, got, exp in zip(names, (loss, *grads), (expected, *expected_grads)):
            torch.testing.assert_close(got.double(), exp, equal_nan=True, **tol, msg=lambda m, n=name: f"{n}: {m}")


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
        options = (kwargs.get("ignore_index", IGNORE), kwargs.get("label_smoothing", 0.0), kwargs.get("softcap") or 0.0,
                   rows, classes)
        option = f"{option}-rows{rows}-classes{classes}-{dtype_id(dtype)}"
        x.requires_grad_(True)
        w.requires_grad_(True)
        if bias is not None:
            bias.requires_grad_(True)
        head = (x, w, bias, target, weight)
        samples.append((f"forward-{option}", torch.ops.fused_ce.linear_cross_entropy_forward.default, head + options))
        row_scale = torch.rand(7, device=device)
        z_scale = torch.rand(7, device=device) if "zloss" in option else None
        needs = (True, True, bias is not None)
        samples.append(
            (f"fused-{option}", torch.ops.fused_ce.linear_cross_entropy_fused.default,
             head + (row_scale, z_scale) + options + needs)
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


@pytest.mark.parametrize(
    "make_args, error, match",
    [
        (lambda x, w, t: (x.double(), w, t), TypeError, "linear_weight must have input's dtype"),
        (lambda x, w, t: (x, w[:, :-1], t), ValueError, "in_features"),
        (lambda x, w, t: (x, w.reshape(w.shape[0], 2, -1), t), NotImplementedError, "2-D"),
        (lambda x, w, t: (x, w, t[:-1]), ValueError, "batch shape"),
        (lambda x, w, t: (x, w, t.float()), ValueError, "class probabilities must have shape"),
        (lambda x, w, t: (x.long(), w, t), TypeError, "floating point"),
        (lambda x, w, t: (x[0, 0], w, t), ValueError, "scalar"),
    ],
    ids=["dtype", "in_features", "k_dim_weight", "target_shape", "probs_shape", "int_input", "scalar_input"],
)
def test_bad_input(device, make_args, error, match):
    x, w, target, _ = make_problem("plain", (6,), 8, 10, torch.float32, device)
    with pytest.raises(error, match=match):
        linear_cross_entropy(*make_args(x, w, target))


def test_bad_options(device):
    x, w, target, _ = make_problem("plain", (6,), 8, 10, torch.float32, device)
    with pytest.raises(ValueError, match="linear_bias must have shape"):
        linear_cross_entropy(x, w, target, linear_bias=torch.zeros(3, device=device))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(x, w, target, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight must have shape"):
        linear_cross_entropy(x, w, target, weight=torch.ones(3, device=device))
    with pytest.raises(ValueError, match="z_loss"):
        linear_cross_entropy(x, w, target, z_loss=-1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, target, chunk_size=0)
    if device == "cpu":  # CUDA gives that row NaN instead (see fused_ce.set_target_validation)
        with pytest.raises(IndexError, match="out of range"):
            linear_cross_entropy(x, w, torch.full_like(target, 10))


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
