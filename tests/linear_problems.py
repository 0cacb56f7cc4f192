"""Problems and references the linear-path tests share (tests/test_linear*.py).

The reference composes torch ops in float64 on the very same (rounded) inputs:
``F.linear`` then the loss (``cross_entropy_reference``, which also soft-caps and adds
the z-loss term). float32/float64 results must be close; float16/bfloat16 ones are held
to PyTorch's own accuracy: their error against float64 may be at most twice the error
of the same composition of torch ops at that dtype, plus a tiny floor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_ce.linear import linear_cross_entropy
from fused_ce.reference import cross_entropy_reference, torch_cross_entropy
from utils import max_error

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
