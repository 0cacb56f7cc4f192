"""The training extras: the gradient-in-forward path, in-place gradients, z-loss,
soft-cap, return_lse, focal loss and entropy -- against float64 formulas
(fused_ce.reference), alone and combined with weight, ignore_index and label
smoothing, for every reduction and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.reference import cross_entropy_reference, entropy_reference, focal_loss_reference

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Option sets: each extra alone, then combined with F.cross_entropy's own options.
OPTIONS = {
    "z_loss": dict(z_loss=1e-2),
    "softcap": dict(softcap=4.0),
    "z_loss+softcap": dict(z_loss=1e-3, softcap=10.0),
    "all": dict(z_loss=1e-3, softcap=10.0, label_smoothing=0.1, weighted=True, ignore=True),
    "smoothing+ignore+z_loss": dict(z_loss=1e-2, label_smoothing=0.2, ignore=True),
}


def _problem(n, v, dtype, device, weighted=False, ignore=False, **extras):
    logits = (torch.randn(n, v, dtype=torch.float64) * 3).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), device=device)
    if ignore and n > 1:
        target[::3] = -100
    kwargs = dict(extras)
    if weighted:
        kwargs["weight"] = torch.rand(v, device=device, dtype=torch.float64).add_(0.5).to(
            torch.float64 if dtype == torch.float64 else torch.float32
        )
    return logits, target, kwargs


def _tolerance(dtype):
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-12),
        torch.float32: dict(rtol=1e-5, atol=1e-6),
        torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
        torch.float16: dict(rtol=4e-3, atol=4e-3),
    }[dtype]


def _loss_and_grad(fn, logits, target, reduction, kwargs, through_matmul=False):
    """The loss and d(loss)/d(logits) for a fixed upstream, for a leaf or for logits
    computed by a matmul (the in-place path needs the latter)."""
    x = logits.detach().clone().requires_grad_(True)
    inp = x * 1.0 if through_matmul else x
    loss = fn(inp, target, reduction=reduction, **kwargs)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    loss.backward(upstream.to(device=loss.device, dtype=loss.dtype))
    return loss.detach(), x.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("v", [7, 1128])
def test_extras_match_reference(device, v, dtype, option, reduction):
    logits, target, kwargs = _problem(37, v, dtype, device, **OPTIONS[option])
    got_loss, got_grad = _loss_and_grad(fused_ce.cross_entropy, logits, target, reduction, kwargs)
    want_loss, want_grad = _loss_and_grad(
        cross_entropy_reference, logits.double(), target, reduction, kwargs
    )
    torch.testing.assert_close(got_loss.double(), want_loss, **_tolerance(dtype))
    torch.testing.assert_close(got_grad.double(), want_grad, **_tolerance(dtype))
    # No gradient needed: the forward-only path gives the same loss.
    with torch.no_grad():
        loss = fused_ce.cross_entropy(logits, target, reduction=reduction, **kwargs)
    torch.testing.assert_close(loss.double(), want_loss, **_tolerance(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_inplace_backward_matches_out_of_place(device, dtype, option, reduction):
    extras = {} if option == "plain" else OPTIONS["all"]
    logits, target, kwargs = _problem(29, 300, dtype, device, **extras)
    want = _loss_and_grad(fused_ce.cross_entropy, logits, target, reduction, kwargs, through_matmul=True)
    got = _loss_and_grad(
        fused_ce.cross_entropy, logits, target, reduction, dict(kwargs, inplace_backward=True), through_matmul=True
    )
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    # Rows whose upstream is not 1 are scaled after rounding in place, once more.
    torch.testing.assert_close(got[1], want[1], **_tolerance(dtype))


def test_inplace_backward_writes_the_gradient_into_the_logits_buffer(device):
    h = torch.randn(16, 8, device=device, requires_grad=True)
    w = torch.randn(100, 8, device=device)
    target = torch.randint(0, 100, (16,), device=device)
    logits = h @ w.T
    version = logits._version
    loss = fused_ce.cross_entropy(logits, target, inplace_backward=True)
    assert logits._version > version  # autograd sees the buffer as modified
    expected = torch.softmax(h.detach() @ w.T, dim=1)
    expected[torch.arange(16), target] -= 1
    torch.testing.assert_close(logits.detach(), expected / 16, rtol=1e-5, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(h.grad, (expected / 16) @ w, rtol=1e-5, atol=1e-6)


def test_inplace_backward_refuses_a_leaf(device):
    logits = torch.randn(4, 9, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=r"inplace_backward.*leaf"):
        fused_ce.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), inplace_backward=True)


def test_inplace_backward_raises_when_another_backward_needs_the_logits(device):
    h = torch.randn(4, 3, device=device, requires_grad=True)
    logits = h @ torch.randn(7, 3, device=device).T
    other = (logits * logits).sum()  # mul saves its input: the logits
    loss = fused_ce.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + other).backward()


def test_inplace_backward_refuses_a_second_backward(device):
    h = torch.randn(4, 3, device=device, requires_grad=True)
    logits = h @ torch.randn(7, 3, device=device).T
    loss = fused_ce.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), inplace_backward=True)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"inplace_backward=True.*one"):
        loss.backward()


def test_inplace_backward_with_return_lse_is_refused(device):
    logits = torch.randn(4, 9, device=device) * 1.0
    with pytest.raises(ValueError, match=r"inplace_backward.*return_lse"):
        fused_ce.cross_entropy(logits, torch.zeros(4, dtype=torch.long, device=device), return_lse=True,
                               inplace_backward=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_return_lse_is_differentiable(device, kind, reduction):
    logits, target, kwargs = _problem(11, 40, torch.float64, device, softcap=5.0, z_loss=1e-2)
    if kind == "probs":
        target = torch.softmax(torch.randn(11, 40, dtype=torch.float64, device=device), 1)
    x = logits.clone().requires_grad_(True)
    loss, lse = fused_ce.cross_entropy(x, target, reduction=reduction, return_lse=True, **kwargs)
    (loss.sum() + (lse * torch.arange(11, device=device)).sum()).backward()
    xr = logits.clone().requires_grad_(True)
    want_loss, want_lse = cross_entropy_reference(xr, target, reduction=reduction, return_lse=True, **kwargs)
    (want_loss.sum() + (want_lse * torch.arange(11, device=device)).sum()).backward()
    torch.testing.assert_close(lse, want_lse)
    torch.testing.assert_close(x.grad, xr.grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_plain_backward_hands_on_the_forward_buffer(inplace, monkeypatch):
    # After loss.backward() (an upstream of exactly 1) the gradient reaching the
    # matmul is the very buffer the forward pass wrote: no copy, no pass.
    h = torch.randn(8, 5, requires_grad=True)
    logits = h @ torch.randn(50, 5).T
    written, reached = [], []
    fused_op = torch.ops.fused_ce.cross_entropy_fused

    def recording_fused_op(*args):
        out = fused_op(*args)
        written.append(out[3].data_ptr())
        return out

    monkeypatch.setattr(torch.ops.fused_ce, "cross_entropy_fused", recording_fused_op)
    logits.register_hook(lambda g: reached.append(g.data_ptr()))
    loss = fused_ce.cross_entropy(logits, torch.randint(0, 50, (8,)), inplace_backward=inplace)
    loss.backward()
    if inplace:
        assert reached == [logits.data_ptr()] and not written
    else:
        assert reached and reached == written


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fused_path_gradient_is_the_two_pass_gradient(device, reduction):
    # The same problem through both paths (grad in forward vs recompute in backward).
    logits, target, kwargs = _problem(23, 500, torch.float32, device, **OPTIONS["all"])
    fused = _loss_and_grad(fused_ce.cross_entropy, logits, target, reduction, kwargs)
    x = logits.clone().requires_grad_(True)
    loss, _ = fused_ce.cross_entropy(x, target, reduction=reduction, return_lse=True, **kwargs)  # two-pass path
    loss.backward(torch.linspace(0.5, 1.5, loss.numel(), device=device).reshape(loss.shape))
    torch.testing.assert_close(fused[0], loss.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], x.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs",
    [dict(z_loss=1e-2), dict(softcap=3.0), dict(z_loss=1e-2, softcap=3.0, label_smoothing=0.1, ignore_index=1)],
    ids=["z_loss", "softcap", "all"],
)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_extras(device, kwargs, reduction):
    logits = torch.randn(6, 9, dtype=torch.float64, device=device, requires_grad=True)
    target = torch.tensor([0, 1, 2, 3, 4, 1], device=device)
    fn = lambda x: fused_ce.cross_entropy(x, target, reduction=reduction, **kwargs)
    assert torch.autograd.gradcheck(fn, (logits,))
    assert torch.autograd.gradgradcheck(fn, (logits,))


@pytest.mark.parametrize("z_loss", [-1.0, float("nan"), float("inf"), "0.1"])
def test_bad_z_loss(z_loss):
    with pytest.raises(ValueError, match="z_loss"):
        fused_ce.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), z_loss=z_loss)


@pytest.mark.parametrize("softcap", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_softcap(softcap):
    with pytest.raises(ValueError, match="softcap"):
        fused_ce.cross_entropy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), softcap=softcap)


# ---- focal loss ----


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25, "per_class"])
@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.5, 1.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_focal_loss_matches_reference(device, dtype, gamma, alpha, reduction):
    logits, target, _ = _problem(31, 57, dtype, device, ignore=True)
    if alpha == "per_class":
        alpha = torch.rand(57, device=device)
    got_loss, got_grad = _loss_and_grad(
        fused_ce.focal_loss, logits, target, reduction, dict(gamma=gamma, alpha=alpha)
    )
    want_loss, want_grad = _loss_and_grad(
        focal_loss_reference, logits.double(), target, reduction, dict(gamma=gamma, alpha=alpha)
    )
    torch.testing.assert_close(got_loss.double(), want_loss, **_tolerance(dtype))
    torch.testing.assert_close(got_grad.double(), want_grad, **_tolerance(dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25, "per_class"])
@pytest.mark.parametrize("gamma", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_focal_loss_fractional_gamma_gradient_is_finite_where_p_t_is_one(device, dtype, gamma, alpha, reduction):
    # (1 - p_t)**gamma has an infinite derivative at p_t = 1 for gamma < 1, where the
    # focal loss itself is flat: an ignored row (loss 0) or a saturated one must get
    # the true gradient, 0, not 0 * inf = NaN over the whole row.
    logits, target, _ = _problem(12, 40, torch.float64, device, ignore=True)
    saturated = torch.arange(1, 12, 3, device=device)
    logits[saturated] = -1e4
    logits[saturated, target[saturated]] = 1e4  # p_t == 1 exactly, loss == 0
    logits = logits.to(dtype)
    alpha = torch.rand(40, device=device) if alpha == "per_class" else alpha
    loss, grad = _loss_and_grad(fused_ce.focal_loss, logits, target, reduction, dict(gamma=gamma, alpha=alpha))
    assert bool(torch.isfinite(grad).all()) and bool(torch.isfinite(loss).all())
    flat = target == -100
    flat[saturated] = True
    assert bool((grad[flat] == 0).all())
    # Elsewhere the float64 reference holds (its pow is finite there).
    upstream_rows = ~flat
    _want_loss, want_grad = _loss_and_grad(
        focal_loss_reference, logits.double(), target, reduction, dict(gamma=gamma, alpha=alpha)
    )
    torch.testing.assert_close(grad[upstream_rows].double(), want_grad[upstream_rows], **_tolerance(dtype))


def test_focal_loss_with_gamma_zero_is_cross_entropy(device):
    logits, target, _ = _problem(20, 30, torch.float32, device, ignore=True)
    torch.testing.assert_close(fused_ce.focal_loss(logits, target, gamma=0.0), F.cross_entropy(logits, target))


def test_focal_loss_gradcheck(device):
    logits = torch.randn(3, 5, 4, dtype=torch.float64, device=device, requires_grad=True)  # K-dim input
    target = torch.tensor([[0, 1, 2, -100], [4, 4, 0, 1], [2, 3, 1, 0]], device=device)
    alpha = torch.rand(5, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda x: fused_ce.focal_loss(x, target, gamma=2.0, alpha=alpha), (logits,))


@pytest.mark.parametrize(
    "kwargs, error",
    [(dict(gamma=-1.0), ValueError), (dict(alpha=torch.ones(3)), ValueError), (dict(alpha="x"), TypeError)],
    ids=["negative_gamma", "alpha_shape", "alpha_type"],
)
def test_focal_loss_bad_arguments(kwargs, error):
    with pytest.raises(error, match=r"gamma|alpha"):
        fused_ce.focal_loss(torch.randn(4, 5), torch.zeros(4, dtype=torch.long), **kwargs)


def test_focal_loss_refuses_probability_targets():
    with pytest.raises(TypeError, match="class-index"):
        fused_ce.focal_loss(torch.randn(4, 5), torch.softmax(torch.randn(4, 5), 1))


# ---- entropy ----


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (37, 7), (5, 3, 2049), (4, 32000)], ids=str)
def test_entropy_matches_reference(device, shape, dtype):
    logits = (torch.randn(shape, dtype=torch.float64) * 4).to(device=device, dtype=dtype).requires_grad_(True)
    h = fused_ce.entropy(logits)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    x = logits.detach().double().requires_grad_(True)
    want = entropy_reference(x)
    g = torch.rand_like(want)
    h.backward(g.to(h.dtype))
    want.backward(g)
    tol = _tolerance(dtype) if dtype in (torch.float32, torch.float64) else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h.double(), want.detach(), **tol)
    torch.testing.assert_close(logits.grad.double(), x.grad, **_tolerance(dtype))


def test_entropy_zero_probabilities_count_as_zero(device):
    logits = torch.tensor([[0.0, float("-inf"), 0.0], [5.0, float("-inf"), float("-inf")]], device=device)
    logits.requires_grad_(True)
    h = fused_ce.entropy(logits)
    torch.testing.assert_close(h, torch.tensor([2.0, 1.0], device=device).log().mul(torch.tensor([1.0, 0.0],
                                                                                                 device=device)))
    h.sum().backward()
    assert logits.grad.isfinite().all()


def test_entropy_gradcheck(device):
    x = torch.randn(4, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(fused_ce.entropy, (x,))
    assert torch.autograd.gradgradcheck(fused_ce.entropy, (x,))


def test_entropy_bad_input():
    with pytest.raises(TypeError, match="logits"):
        fused_ce.entropy(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="class"):
        fused_ce.entropy(torch.tensor(1.0))


def test_entropy_without_classes_is_zero():
    # A sum over no classes, as -xlogy(p, p).sum(-1) of an empty softmax.
    torch.testing.assert_close(fused_ce.entropy(torch.zeros(3, 0)), torch.zeros(3))


# ---- the new ops: opcheck and torch.compile ----


def _fused_samples(device):
    for dtype in (torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        logits = torch.randn(5, 13, device=device, dtype=dtype)
        target = torch.tensor([0, 3, -100, 12, 5], device=device)
        row_scale = torch.rand(5, device=device, dtype=acc)
        z_scale = torch.rand(5, device=device, dtype=acc) * 1e-2
        weight = torch.rand(13, device=device, dtype=acc)
        for w, z, cap in [(None, None, 0.0), (weight, z_scale, 3.0)]:
            yield logits, target, w, row_scale, z, -100, 0.1, cap


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_fused(device, requires_grad):
    for sample in _fused_samples(device):
        args = (sample[0].clone().requires_grad_(requires_grad),) + sample[1:]
        torch.library.opcheck(torch.ops.fused_ce.cross_entropy_fused.default, args)


def test_opcheck_mutating_ops(device):
    for sample in _fused_samples(device):
        torch.library.opcheck(torch.ops.fused_ce.cross_entropy_fused_.default, (sample[0].clone(),) + sample[1:])
        rows = sample[0].clone()
        torch.library.opcheck(torch.ops.fused_ce.scale_rows_.default, (rows, sample[3]))
        logits, target, weight, row_scale = sample[:4]
        _loss, lse, _mass = torch.ops.fused_ce.cross_entropy_forward(logits, target, weight, -100, 0.1, sample[7])
        grad = torch.zeros_like(logits)
        keep = torch.where(torch.arange(5, device=device) % 2 == 0, 1.0, 0.5).to(lse.dtype)
        torch.library.opcheck(
            torch.ops.fused_ce.cross_entropy_backward_into_.default,
            (grad, logits, target, weight, lse, row_scale, row_scale, keep, -100, 0.1, sample[7]),
        )


def test_opcheck_entropy(device):
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(6, 17, device=device, dtype=dtype, requires_grad=True)
        torch.library.opcheck(torch.ops.fused_ce.entropy_forward.default, (x,))


@pytest.mark.parametrize("inplace", [False, True])
def test_compile_training_step(device, inplace):
    torch._dynamo.reset()
    h = torch.randn(12, 6, device=device, requires_grad=True)
    w = torch.randn(40, 6, device=device)
    target = torch.randint(0, 40, (12,), device=device)
    target[0] = -100

    def step(h, w, target):
        logits = h @ w.T
        spread = fused_ce.entropy(h @ w.T).mean()  # its own logits: the in-place loss overwrites these
        loss = fused_ce.cross_entropy(
            logits, target, z_loss=1e-3, softcap=5.0, label_smoothing=0.1, inplace_backward=inplace
        )
        return loss + 0.1 * spread + fused_ce.focal_loss(h @ w.T, target)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c = compiled(h, w, target)
    loss_c.backward()
    grad_c, h.grad = h.grad, None
    loss_e = step(h, w, target)
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(grad_c, h.grad)
    torch._dynamo.reset()


def test_z_loss_under_mean_with_zero_total_weight(device):
    # Counted rows whose targets all weigh 0: the cross-entropy part is NaN (PyTorch's
    # 0 / 0) with a zero gradient (PyTorch's is NaN: a documented difference), while the
    # z-loss term, averaged over the 3 counted rows, keeps its gradient 2 z lse softmax / 3
    # -- as the float64 reference.
    x = torch.randn(4, 6, dtype=torch.float64)
    target = torch.tensor([2, 2, -100, 2])
    weight = torch.ones(6, dtype=torch.float64)
    weight[2] = 0
    z = 1e-2
    xs = x.to(device).float().requires_grad_(True)
    loss = fused_ce.cross_entropy(xs, target.to(device), weight=weight.float().to(device), z_loss=z)
    loss.backward()
    x64 = x.clone().requires_grad_(True)
    expected = cross_entropy_reference(x64, target, weight=weight, z_loss=z)
    expected.backward()
    assert bool(loss.isnan()) and bool(expected.isnan())
    lse = torch.logsumexp(x, -1, keepdim=True)
    by_hand = 2 * z * lse * torch.softmax(x, -1) / 3 * (target != -100).unsqueeze(1)
    torch.testing.assert_close(x64.grad, by_hand)
    torch.testing.assert_close(xs.grad.cpu().double(), by_hand, rtol=2e-5, atol=1e-7)
