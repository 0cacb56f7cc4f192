"""fused_ce.cross_entropy against F.cross_entropy and the float64 reference.

Losses and input gradients are compared with ``cross_entropy_reference`` evaluated
in float64 on the very same (rounded) inputs. float32/float64 results must be
close to it; float16/bfloat16 results are held to PyTorch's own accuracy: their
error against float64 may be at most twice the error F.cross_entropy makes at that
dtype, plus a tiny floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.reference import cross_entropy_reference
from utils import dtype_id, max_error

REDUCTIONS = ["none", "mean", "sum"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)

# fp32: the kernels use a 20-ulp exp and fp32 sums over up to 128k classes.
# fp64: float64 arithmetic throughout, so only summation-order noise is allowed.
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-10, atol=1e-12),
}

# Named option sets. "ignore" marks every third row (from the second on) with
# ignore_index; N = 1 then keeps its one row, and every-row-ignored has its own test.
OPTIONS = {
    "plain": dict(),
    "weight": dict(weight=True),
    "ignore": dict(ignore=True),
    "ignore_class": dict(ignore=True, ignore_index=0),  # an ignore_index that is a real class
    "smoothing": dict(label_smoothing=0.1),
    "weight_smoothing_ignore": dict(weight=True, ignore=True, label_smoothing=0.2),
    "probs": dict(probs=True),
    "probs_smoothing": dict(probs=True, label_smoothing=0.15),
    "probs_weight_smoothing": dict(probs=True, weight=True, label_smoothing=0.3),
}




def make_problem(option: str, shape, dtype=torch.float32, device="cpu", target_dtype=torch.int64):
    """Logits of `shape` (class dim 0 for 1-D, else 1), a target and the keyword arguments of `option`."""
    spec = OPTIONS[option]
    class_dim = 0 if len(shape) == 1 else 1
    num_classes = shape[class_dim]
    batch_shape = tuple(shape[:class_dim]) + tuple(shape[class_dim + 1 :])
    # Spread of about 3 nats: neither near-uniform nor one-hot predictions.
    x = (3 * torch.randn(shape, device=device)).to(dtype)
    kwargs = {}
    if spec.get("probs"):
        target = (2 * torch.randn(shape, device=device)).softmax(class_dim).to(dtype)
    else:
        target = torch.randint(0, num_classes, batch_shape, device=device)
        if spec.get("ignore"):
            ignore_index = spec.get("ignore_index", -100)
            if "ignore_index" in spec:
                kwargs["ignore_index"] = ignore_index
            target.view(-1)[1::3] = ignore_index
        target = target.to(target_dtype)
    if spec.get("weight"):
        kwargs["weight"] = (torch.rand(num_classes, device=device) + 0.5).to(dtype)
    if "label_smoothing" in spec:
        kwargs["label_smoothing"] = spec["label_smoothing"]
    return x, target, kwargs


def _to64(t):
    if t is None or not t.is_floating_point():
        return t
    return t.detach().to(torch.float64)


def loss_and_grad(fn, x, target, upstream, reduction, kwargs):
    """fn's loss and d(loss . upstream)/dx, with x kept in its own layout (strides)."""
    xg = x.detach().requires_grad_(True)
    loss = fn(xg, target, reduction=reduction, **kwargs)
    (grad,) = torch.autograd.grad(loss, xg, upstream)
    return loss.detach(), grad


def reference_loss_and_grad(x, target, upstream, reduction, kwargs):
    kwargs64 = {k: _to64(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return loss_and_grad(cross_entropy_reference, _to64(x), _to64(target), _to64(upstream), reduction, kwargs64)



def assert_nan_pattern(actual, expected, what):
    same = torch.equal(actual.isnan().cpu(), expected.isnan().cpu())
    assert same, f"{what}: NaN where the reference has none, or vice versa"


def assert_as_accurate_as_torch(actual, torch_value, expected, what):
    """At low precision: error vs float64 <= 2 x PyTorch's own error at that dtype + a tiny floor."""
    assert_nan_pattern(actual, expected, what)
    scale = float(expected[~expected.isnan()].abs().max()) if bool((~expected.isnan()).any()) else 0.0
    floor = 1e-6 * scale + 1e-8
    error, torch_error = max_error(actual, expected), max_error(torch_value, expected)
    assert error <= 2 * torch_error + floor, (
        f"{what}: max error {error:.3g} vs float64, PyTorch's own error at this dtype is {torch_error:.3g}"
    )


def output_shape(x, reduction):
    """The loss's shape: the batch shape (input without its class dim) for 'none', else ()."""
    if reduction != "none":
        return ()
    return () if x.dim() == 1 else x.shape[:1] + x.shape[2:]


def random_upstream(x, reduction):
    # A random upstream gradient (not ones) so a wrong per-row scale shows.
    return torch.randn(output_shape(x, reduction), device=x.device).to(x.dtype)


def check_against_reference(x, target, reduction, kwargs, compare_torch=True):
    """Loss and input gradient of fused_ce vs float64 (and F.cross_entropy's at low precision)."""
    dtype = x.dtype
    x_before = x.clone()
    upstream = random_upstream(x, reduction)
    expected, expected_grad = reference_loss_and_grad(x, target, upstream, reduction, kwargs)
    loss, grad = loss_and_grad(fused_ce.cross_entropy, x, target, upstream, reduction, kwargs)

    assert loss.dtype == dtype and grad.dtype == dtype
    assert loss.shape == expected.shape and grad.shape == x.shape
    assert torch.equal(x, x_before), "the input logits were modified"
    if dtype in LOW_PRECISION:
        torch_loss, torch_grad = loss_and_grad(F.cross_entropy, x, target, upstream, reduction, kwargs)
        assert_as_accurate_as_torch(loss, torch_loss, expected, "loss")
        assert_as_accurate_as_torch(grad, torch_grad, expected_grad, "gradient")
    else:
        tol = TOLERANCES[dtype]
        torch.testing.assert_close(loss.double(), expected, equal_nan=True, **tol, msg=lambda m: f"loss: {m}")
        torch.testing.assert_close(grad.double(), expected_grad, equal_nan=True, **tol, msg=lambda m: f"gradient: {m}")
        if compare_torch and dtype == torch.float32:
            # Direct parity too, at PyTorch's float32 tolerance loosened for the 20-ulp exp.
            torch_loss = F.cross_entropy(x, target, reduction=reduction, **kwargs)
            torch.testing.assert_close(loss, torch_loss, equal_nan=True, rtol=2e-5, atol=2e-5)


# -- the reference itself ------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("shape", [(37, 7), (1, 1), (5,), (3, 6, 4, 2), (0, 5)], ids=str)
def test_reference_matches_torch_in_float64(shape, option, reduction):
    # The float64 reference is only a yardstick if it is F.cross_entropy's semantics.
    if option == "ignore_class" and shape[0 if len(shape) == 1 else 1] == 1:
        option = "ignore"  # with one class, ignore_index=0 ignores everything: covered below
    x, target, kwargs = make_problem(option, shape, torch.float64)
    upstream = random_upstream(x, reduction)
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, x, target, upstream, reduction, kwargs)
    loss, grad = loss_and_grad(cross_entropy_reference, x, target, upstream, reduction, kwargs)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-12, atol=1e-13, equal_nan=True)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-13, equal_nan=True)


# -- parity grid ---------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("num_classes", [1, 7, 668, 1128])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference(device, dtype, num_classes, n, option, reduction):
    if option == "ignore_class" and num_classes == 1:
        option = "ignore"  # ignore_index=0 would ignore every row of a 1-class problem
    x, target, kwargs = make_problem(option, (n, num_classes), dtype, device)
    check_against_reference(x, target, reduction, kwargs)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("option", ["plain", "weight_smoothing_ignore", "probs_smoothing"])
@pytest.mark.parametrize("num_classes", [32000, 128256])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_matches_reference_large_vocabulary(device, dtype, num_classes, option, reduction):
    # Several kernel blocks per row, and the vocabularies of Llama 2 and Llama 3.
    x, target, kwargs = make_problem(option, (3, num_classes), dtype, device)
    check_against_reference(x, target, reduction, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_empty_batch(device, option, reduction):
    # N = 0: 'none' is empty, 'sum' is 0 and 'mean' is NaN (0 / 0), as in PyTorch.
    x, target, kwargs = make_problem(option, (0, 7), torch.float32, device)
    check_against_reference(x, target, reduction, kwargs)
    expected = F.cross_entropy(x, target, reduction=reduction, **kwargs)
    loss = fused_ce.cross_entropy(x, target, reduction=reduction, **kwargs)
    torch.testing.assert_close(loss, expected, equal_nan=True)


# -- layouts -------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "option", ["plain", "ignore_class", "weight_smoothing_ignore", "probs", "probs_weight_smoothing"]
)
@pytest.mark.parametrize("shape", [(4, 7, 3, 5), (2, 33, 6), (3, 5, 1, 2, 2)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=dtype_id)
def test_k_dimensional_input(device, dtype, shape, option, reduction):
    x, target, kwargs = make_problem(option, shape, dtype, device)
    check_against_reference(x, target, reduction, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "smoothing", "probs", "probs_weight_smoothing"])
@pytest.mark.parametrize("num_classes", [1, 9, 1500])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=dtype_id)
def test_unbatched_input(device, dtype, num_classes, option, reduction):
    # Input (C) with a 0-d class index, or a (C) probability vector.
    x, target, kwargs = make_problem(option, (num_classes,), dtype, device)
    check_against_reference(x, target, reduction, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "ignore", "ignore_class", "weight_smoothing_ignore"])
@pytest.mark.parametrize("shape", [(37, 668), (2, 11, 3)], ids=str)
def test_int32_targets(device, shape, option, reduction):
    x, target, kwargs = make_problem(option, shape, torch.float32, device, target_dtype=torch.int32)
    assert target.dtype == torch.int32
    check_against_reference(x, target, reduction, kwargs, compare_torch=False)


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int8, torch.int16], ids=str)
def test_narrow_integer_targets(device, target_dtype):
    # Any integer dtype holds class indices (F.cross_entropy takes uint8 too).
    x = torch.randn(9, 7, device=device)
    target = torch.randint(0, 7, (9,), device=device)
    got = fused_ce.cross_entropy(x, target.to(target_dtype), reduction="none")
    torch.testing.assert_close(got, F.cross_entropy(x, target, reduction="none"))


def _wide_slice(x):
    # Rows whose stride is larger than the row: a slice of a wider tensor.
    wide = torch.randn(x.shape[0], x.shape[1] + 13, dtype=x.dtype, device=x.device)
    wide[:, 5 : 5 + x.shape[1]] = x
    return wide[:, 5 : 5 + x.shape[1]]


def _transposed(x):
    # Classes with a non-unit stride: a transposed view.
    return x.t().contiguous().t()


def _every_other_row(x):
    doubled = torch.randn(2 * x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    doubled[::2] = x
    return doubled[::2]


def _broadcast_row(x):
    # Row stride 0: every row is the same memory.
    return x[:1].expand_as(x)


LAYOUTS = {
    "wide_slice": _wide_slice,
    "transposed": _transposed,
    "every_other_row": _every_other_row,
    "broadcast_row": _broadcast_row,
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight_smoothing_ignore", "probs_weight_smoothing"])
@pytest.mark.parametrize("num_classes", [7, 1128])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=dtype_id)
def test_non_contiguous_input(device, dtype, layout, num_classes, option, reduction):
    x, target, kwargs = make_problem(option, (6, num_classes), dtype, device)
    x = LAYOUTS[layout](x)
    assert not x.is_contiguous()
    check_against_reference(x, target, reduction, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "ignore", "probs_smoothing"])
def test_non_contiguous_target(device, option, reduction):
    x, target, kwargs = make_problem(option, (8, 20), torch.float32, device)
    if target.is_floating_point():
        target = _transposed(target)
    else:
        target = torch.stack([target, torch.full_like(target, 99)], dim=1)[:, 0]
    assert not target.is_contiguous()
    check_against_reference(x, target, reduction, kwargs)


# -- special values and options ------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "smoothing", "weight_smoothing_ignore"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_every_target_ignored(device, dtype, option, reduction):
    # 'mean' is 0 / 0 = NaN, 'sum' 0 and 'none' zeros, as in PyTorch; and no
    # gradient reaches the logits (PyTorch's is zero, not NaN, even for 'mean').
    x, target, kwargs = make_problem(option, (5, 11), dtype, device)
    target.fill_(kwargs.get("ignore_index", -100))
    upstream = random_upstream(x, reduction)
    expected, expected_grad = loss_and_grad(F.cross_entropy, x, target, upstream, reduction, kwargs)
    loss, grad = loss_and_grad(fused_ce.cross_entropy, x, target, upstream, reduction, kwargs)
    torch.testing.assert_close(loss, expected, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(grad, torch.zeros_like(x), rtol=0, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mean_with_zero_total_weight_is_nan(device, label_smoothing):
    # Only zero-weight targets: the 'mean' denominator is 0 and PyTorch gives NaN
    # (its one-hot part is 0 / 0) whatever the smoothing part's numerator is.
    x = torch.randn(4, 6, device=device)
    target = torch.tensor([2, 2, -100, 2], device=device)
    weight = torch.ones(6, device=device)
    weight[2] = 0
    expected = F.cross_entropy(x, target, weight=weight, label_smoothing=label_smoothing)
    loss = fused_ce.cross_entropy(x, target, weight=weight, label_smoothing=label_smoothing)
    assert bool(expected.isnan())
    assert bool(loss.isnan()), f"mean over a zero total weight gave {loss.item()}, PyTorch gives NaN"
    # The gradient: 0 here, NaN on PyTorch's counted rows (a documented difference).
    xs = x.clone().requires_grad_(True)
    fused_ce.cross_entropy(xs, target, weight=weight, label_smoothing=label_smoothing).backward()
    assert torch.equal(xs.grad, torch.zeros_like(x))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore", "probs"])
def test_full_label_smoothing(device, option, reduction):
    # label_smoothing = 1: the target is the uniform (weighted) distribution alone.
    x, target, kwargs = make_problem(option, (9, 13), torch.float32, device)
    kwargs["label_smoothing"] = 1.0
    check_against_reference(x, target, reduction, kwargs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scale", [1e-4, 1e3, 3e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_extreme_logit_scales(device, dtype, scale, reduction):
    # Near-uniform rows, and rows so peaked that exp overflows without the max shift.
    x = (scale * torch.randn(16, 300, device=device)).to(dtype)
    target = torch.randint(0, 300, (16,), device=device)
    target[:4] = x[:4].argmax(dim=1)  # confident and right: loss ~ 0, must keep its precision
    check_against_reference(x, target, reduction, dict(label_smoothing=0.05))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["plain", "weight", "ignore"])
def test_masked_logits(device, option, reduction):
    # Vocabulary masking with -inf (never on the target): finite loss, zero gradient there.
    x, target, kwargs = make_problem(option, (12, 50), torch.float32, device)
    mask = torch.rand(12, 50, device=device) < 0.3
    mask[torch.arange(12, device=device), target.clamp(min=0)] = False
    x = x.masked_fill(mask, float("-inf"))
    check_against_reference(x, target, reduction, kwargs)
    loss = fused_ce.cross_entropy(x, target, reduction=reduction, **kwargs)
    assert bool(loss.isfinite().all())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("option", ["probs", "probs_smoothing", "probs_weight_smoothing"])
@pytest.mark.parametrize("shape", [(6, 10), (3, 10, 4)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_probability_target_gradient(device, dtype, shape, option, reduction):
    # Soft targets that are themselves learned (a teacher) need d loss / d target.
    x, target, kwargs = make_problem(option, shape, dtype, device)
    upstream = random_upstream(x, reduction)

    def grads(fn, x, target, kw):
        x = x.detach().requires_grad_(True)
        target = target.detach().requires_grad_(True)
        loss = fn(x, target, reduction=reduction, **kw)
        return torch.autograd.grad(loss, (x, target), upstream.to(loss.dtype))

    kwargs64 = {k: _to64(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    expected_x, expected_t = grads(cross_entropy_reference, _to64(x), _to64(target), kwargs64)
    grad_x, grad_t = grads(fused_ce.cross_entropy, x, target, kwargs)
    assert grad_t.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(grad_x.to(torch.float64), expected_x, **tol)
    torch.testing.assert_close(grad_t.to(torch.float64), expected_t, **tol)


@pytest.mark.filterwarnings("ignore:size_average and reduce args will be deprecated")
@pytest.mark.parametrize(
    "size_average, reduce", [(None, False), (True, True), (False, True), (False, None), (True, None)]
)
def test_deprecated_size_average_and_reduce(device, size_average, reduce):
    x, target, kwargs = make_problem("weight_smoothing_ignore", (10, 8), torch.float32, device)
    expected = F.cross_entropy(x, target, size_average=size_average, reduce=reduce, **kwargs)
    loss = fused_ce.cross_entropy(x, target, size_average=size_average, reduce=reduce, **kwargs)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)


# -- the module ----------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "option", ["plain", "weight", "ignore_class", "weight_smoothing_ignore", "probs_weight_smoothing"]
)
def test_module_matches_torch_module(device, option, reduction):
    x, target, kwargs = make_problem(option, (11, 23), torch.float32, device)
    expected_fn = torch.nn.CrossEntropyLoss(reduction=reduction, **kwargs)
    module = fused_ce.CrossEntropyLoss(reduction=reduction, **kwargs)
    xe = x.clone().requires_grad_(True)
    xf = x.clone().requires_grad_(True)
    expected, loss = expected_fn(xe, target), module(xf, target)
    upstream = torch.randn(expected.shape, device=device)
    expected.backward(upstream)
    loss.backward(upstream)
    torch.testing.assert_close(loss, expected, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(xf.grad, xe.grad, rtol=2e-5, atol=2e-6)


def test_module_weight_is_a_buffer(device):
    # Like nn.CrossEntropyLoss: the weight moves with .to() and is saved in the state_dict.
    weight = torch.rand(5) + 0.5
    module = fused_ce.CrossEntropyLoss(weight=weight, ignore_index=3, label_smoothing=0.1)
    assert set(module.state_dict()) == set(torch.nn.CrossEntropyLoss(weight=weight).state_dict()) == {"weight"}
    module = module.to(device=device, dtype=torch.float16)
    assert module.weight.device.type == device and module.weight.dtype == torch.float16
    module = module.float()
    x = torch.randn(4, 5, device=device)
    target = torch.tensor([0, 3, 4, 1], device=device)
    expected = F.cross_entropy(x, target, weight=module.weight, ignore_index=3, label_smoothing=0.1)
    torch.testing.assert_close(module(x, target), expected, rtol=2e-5, atol=2e-6)
    assert "ignore_index=3" in repr(module) and "label_smoothing=0.1" in repr(module)
