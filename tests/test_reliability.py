"""Reliability: bad and non-finite inputs, determinism, resource safety, precision, scale.

What each case does is listed in the README's reliability section; the tests here pin
it. They complement test_bad_input.py (argument checks), test_cross_entropy.py (the
parity grid) and test_properties.py (random problems):

* non-finite logits (NaN, +-inf, masked and fully masked rows, in counted, ignored and
  zero-weight rows) and non-finite probability targets give PyTorch's loss and
  gradients, NaN and inf positions included, on every execution path (two documented
  differences are pinned as such);
* every target ignored, on every path and with the extras;
* the in-place gradient works on every layout of the logits, and refuses what it
  cannot do (a leaf or a view of one, rows that share memory) before it writes anything;
* z_loss / softcap / ignore_index values out of range, and dtype conversions
  PyTorch does not do;
* forward and backward are bitwise reproducible, run to run and across thread counts
  (per-row values and gradients);
* no memory growth over thousands of calls; correct results from several threads;
* float16/bfloat16 no less accurate than PyTorch, and finite where PyTorch overflows;
* more than 2**31 logits (slow: --slow or FUSED_CE_SLOW=1).
"""

from __future__ import annotations

import gc
import math
import os
import threading

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.reference import cross_entropy_reference

PATHS = ["forward", "fused", "inplace", "return_lse"]


def run_path(fn, x, target, path, upstream=None, device=None, **kwargs):
    """Loss (detached) and d(loss . upstream)/dx on one execution path of fused_ce.

    forward: no grad (the two-pass kernels' forward); fused: the gradient is computed in
    the forward pass; inplace: ... and written over the logits (an intermediate tensor);
    return_lse: the two-pass path (statistics forward, gradient in backward).
    `fn` may be F.cross_entropy, for which every path is the plain call. With `device`,
    the inputs are moved there and the results back to the CPU.
    """
    if device is not None:
        x, target = x.to(device), target.to(device)
        upstream = None if upstream is None else upstream.to(device)
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        loss, grad = run_path(fn, x, target, path, upstream, **kwargs)
        return loss.cpu(), None if grad is None else grad.cpu()
    is_fused = fn is fused_ce.cross_entropy
    leaf = x.detach().clone().requires_grad_(path != "forward")
    with torch.set_grad_enabled(path != "forward"):
        inp = leaf * 1 if path == "inplace" else leaf
        extra = {}
        if is_fused and path == "inplace":
            extra["inplace_backward"] = True
        if is_fused and path == "return_lse":
            extra["return_lse"] = True
        if not is_fused and not target.is_floating_point():
            target = target.long()
        out = fn(inp, target, **kwargs, **extra)
        loss = out[0] if isinstance(out, tuple) else out
    if path == "forward":
        return loss, None
    u = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, u)
    return loss.detach(), grad


def assert_same_as_torch(actual, expected, what, rtol=2e-5, atol=2e-6):
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().nonzero().tolist()}, PyTorch's at {expected.isnan().nonzero().tolist()}"
    )
    assert torch.equal(actual == math.inf, expected == math.inf), f"{what}: +inf at other positions than PyTorch's"
    assert torch.equal(actual == -math.inf, expected == -math.inf), f"{what}: -inf at other positions than PyTorch's"
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# -- non-finite logits ------------------------------------------------------------------------

# Each case poisons row 0 of a (4, 9) problem whose target row 0 is class 2 (row 3 is
# ignored); the other rows stay finite.
NON_FINITE = {
    "nan_off_target": lambda x: x[0].index_fill_(0, torch.tensor([5]), math.nan),
    "nan_at_target": lambda x: x[0].index_fill_(0, torch.tensor([2]), math.nan),
    "pos_inf_off_target": lambda x: x[0].index_fill_(0, torch.tensor([5]), math.inf),
    "pos_inf_at_target": lambda x: x[0].index_fill_(0, torch.tensor([2]), math.inf),
    "neg_inf_off_target": lambda x: x[0].index_fill_(0, torch.tensor([5, 7]), -math.inf),  # vocabulary masking
    "neg_inf_at_target": lambda x: x[0].index_fill_(0, torch.tensor([2]), -math.inf),  # loss +inf
    "all_neg_inf": lambda x: x[0].fill_(-math.inf),
    "all_pos_inf": lambda x: x[0].fill_(math.inf),
    "nan_in_every_counted_row": lambda x: x[:3].fill_(math.nan),  # (the ignored row: see below)
}
OPTIONS = {
    "plain": {},
    "smoothing": dict(label_smoothing=0.1),
    "weight": dict(weight=torch.tensor([0.5, 1.0, 2.0, 1.5, 0.7, 1.1, 0.9, 1.3, 0.8])),
    "probs": dict(probs=True),
}


def non_finite_problem(case, option, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=gen).to(dtype)
    NON_FINITE[case](x)
    kwargs = dict(OPTIONS[option])
    if kwargs.pop("probs", False):
        target = torch.randn(4, 9, generator=gen).softmax(1).to(dtype)
    else:
        target = torch.tensor([2, 0, 8, -100])
    if "weight" in kwargs:
        kwargs["weight"] = kwargs["weight"].to(dtype)
    return x, target, kwargs


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_non_finite_logits_match_torch(device, case, option, path, reduction):
    # NaN and +-inf logits give PyTorch's loss and gradient on every path, NaN and
    # inf positions included: NaN spreads to its row (and to 'mean'/'sum'), a -inf
    # logit under a target with mass on it gives +inf, masking elsewhere is harmless.
    x, target, kwargs = non_finite_problem(case, option)
    kwargs["reduction"] = reduction
    upstream = torch.linspace(0.5, 1.5, 4) if reduction == "none" else None
    loss, grad = run_path(fused_ce.cross_entropy, x, target, path, upstream, device=device, **kwargs)
    t_loss, t_grad = run_path(
        F.cross_entropy, x, target, "fused" if path != "forward" else "forward", upstream, device=device, **kwargs
    )
    assert_same_as_torch(loss, t_loss, "loss")
    if grad is not None:
        assert_same_as_torch(grad, t_grad, "gradient")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", ["nan_off_target", "pos_inf_off_target", "all_neg_inf"])
def test_non_finite_logits_in_an_ignored_row(device, case, reduction, path):
    # An ignored row adds 0 to the loss whatever its logits hold, but PyTorch's
    # gradient of that row is NaN when its logits are (log_softmax's backward
    # multiplies exp(NaN) by 0): the same on every path, whatever the upstream.
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([2, 0, 8, -100])
    NON_FINITE[case](x[3:])  # poisons row 3, the ignored one
    for upstream in (None, torch.linspace(0.5, 1.5, 4)):
        if reduction != "none" and upstream is not None:
            upstream = torch.tensor(0.75)
        loss, grad = run_path(fused_ce.cross_entropy, x, target, path, upstream, device=device, reduction=reduction)
        t_loss, t_grad = run_path(F.cross_entropy, x, target, "fused" if path != "forward" else "forward", upstream,
                                  device=device, reduction=reduction)
        what = f"upstream {'1' if upstream is None else 'not 1'}"
        assert_same_as_torch(loss, t_loss, f"loss, {what}")
        if grad is not None:
            assert_same_as_torch(grad, t_grad, f"gradient, {what}")


@pytest.mark.parametrize("path", PATHS)
def test_nan_logits_under_a_zero_weight_target(device, path):
    # A target whose class weight is 0 contributes 0 * log_softmax: PyTorch gives NaN
    # for that row when its logits are NaN (unlike an ignored row, it is not skipped).
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    x[1, 4] = math.nan
    target = torch.tensor([0, 1, 2])
    weight = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])
    for reduction in ("none", "sum"):
        loss, grad = run_path(
            fused_ce.cross_entropy, x, target, path, device=device, reduction=reduction, weight=weight
        )
        t_loss, t_grad = run_path(F.cross_entropy, x, target, "fused" if path != "forward" else "forward",
                                  device=device, reduction=reduction, weight=weight)
        assert_same_as_torch(loss, t_loss, f"loss ({reduction})")
        if grad is not None:
            assert_same_as_torch(grad, t_grad, f"gradient ({reduction})")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_zero_weight_class_with_minus_inf_logit(device, path, smoothing):
    # A documented difference from PyTorch: a class weighted 0 adds exactly 0 to the
    # loss (0 log 0 = 0, as xlogy), also where its logit is -inf -- the target's or,
    # with label smoothing, any class's. PyTorch computes 0 * inf = NaN there.
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(5))
    x[0, 2] = -math.inf  # row 0: the target's logit
    x[1, 4] = -math.inf  # row 1: another class, weighted 0
    weight = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    target = torch.tensor([2, 1])
    loss, grad = run_path(
        fused_ce.cross_entropy, x, target, path, device=device, weight=weight, label_smoothing=smoothing,
        reduction="none",
    )
    finite = x.clone()
    finite[0, 2] = finite[1, 4] = -1e4  # the same problem with the limit taken
    want = F.cross_entropy(finite, target, weight=weight, label_smoothing=smoothing, reduction="none")
    torch.testing.assert_close(loss, want)
    assert F.cross_entropy(x, target, weight=weight, label_smoothing=smoothing, reduction="none")[0].isnan()
    if grad is not None:
        assert grad.isfinite().all()


@pytest.mark.parametrize("path", PATHS)
def test_full_label_smoothing_with_minus_inf_at_the_target(device, path):
    # A documented difference from PyTorch. With label_smoothing = 1 the target is the
    # uniform distribution (1/C on every class, the one-hot part has weight 0), so a
    # -inf logit anywhere in the row makes the loss +inf. fused_ce gives +inf
    # wherever the -inf is; PyTorch gives +inf off the target but NaN at it (its
    # one-hot term is 0 * inf). Both agree for label_smoothing < 1.
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    x[0, 2] = -math.inf
    x[1, 4] = -math.inf
    target = torch.tensor([2, 1])
    loss, grad = run_path(fused_ce.cross_entropy, x, target, path, device=device, label_smoothing=1.0, reduction="none")
    assert loss.tolist() == [math.inf, math.inf]
    t_loss = F.cross_entropy(x, target, label_smoothing=1.0, reduction="none")
    assert t_loss[1] == math.inf  # off the target PyTorch agrees
    if grad is not None:
        # d loss / d x_c = softmax_c - 1/C: finite, and 0 - 1/6 at the -inf logits.
        expected = torch.softmax(x, 1) - 1.0 / 6
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["forward", "fused", "return_lse"])
@pytest.mark.parametrize("bad", ["nan", "negative"])
def test_nan_or_negative_probability_targets_match_torch(device, path, bad):
    # Probability targets are not validated (that would cost a sync); a NaN or a
    # negative entry gives what PyTorch gives (NaN, or a value of the formula) in its
    # row only.
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    target = torch.randn(3, 7, generator=torch.Generator().manual_seed(5)).softmax(1)
    target[1, 3] = {"nan": math.nan, "negative": -2.0}[bad]
    loss, grad = run_path(fused_ce.cross_entropy, x, target, path, device=device, reduction="none")
    t_loss, t_grad = run_path(F.cross_entropy, x, target, "fused" if path != "forward" else "forward",
                              device=device, reduction="none")
    assert_same_as_torch(loss, t_loss, "loss")
    if grad is not None:
        assert_same_as_torch(grad, t_grad, "gradient")


@pytest.mark.parametrize("at_row_max", [False, True], ids=["elsewhere", "at_row_max"])
def test_infinite_probability_target(device, at_row_max):
    # A documented difference: an infinite target probability makes its row's loss
    # non-finite, as in PyTorch, but where that entry sits at the row's largest logit
    # fused_ce gives NaN (its loss is mass * log(sum) + sum_c T_c (max - z_c), and
    # inf * 0 there) while PyTorch gives +inf. The other rows are unaffected.
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    target = torch.randn(3, 7, generator=torch.Generator().manual_seed(5)).softmax(1)
    column = int(x[1].argmax()) if at_row_max else int(x[1].argmin())
    target[1, column] = math.inf
    loss = fused_ce.cross_entropy(x.to(device), target.to(device), reduction="none").cpu()
    expected = F.cross_entropy(x, target, reduction="none")
    assert expected[1] == math.inf
    assert bool(loss[1].isnan()) if at_row_max else loss[1] == math.inf
    torch.testing.assert_close(loss[[0, 2]], expected[[0, 2]])


# -- every row ignored, on every path ---------------------------------------------------------


@pytest.mark.parametrize("extras", [{}, dict(z_loss=1e-3), dict(softcap=5.0), dict(label_smoothing=0.2)], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("path", PATHS)
def test_every_row_ignored_on_every_path(device, path, reduction, extras):
    # 'mean' is 0 / 0 = NaN, 'sum' 0, 'none' zeros, as in PyTorch; the gradient is
    # exactly zero (no NaN from the empty mean), including the z-loss's.
    x = 3 * torch.randn(5, 11, generator=torch.Generator().manual_seed(6))
    target = torch.full((5,), -100)
    loss, grad = run_path(fused_ce.cross_entropy, x, target, path, device=device, reduction=reduction, **extras)
    if reduction == "mean":
        assert bool(loss.isnan())
    else:
        assert torch.equal(loss, torch.zeros_like(loss))
    if grad is not None:
        assert torch.equal(grad, torch.zeros_like(x)), f"gradient {grad}"
    if not extras.get("z_loss") and not extras.get("softcap"):
        t_loss = F.cross_entropy(x, target, reduction=reduction, **extras)
        torch.testing.assert_close(loss, t_loss, equal_nan=True, rtol=0, atol=0)


# -- the in-place gradient refuses before it writes ------------------------------------------


@pytest.mark.parametrize("what", ["leaf", "view_of_leaf"])
def test_inplace_backward_refuses_a_leaf_before_writing(device, what):
    # A leaf that requires grad (test_extras.py checks the error), or a slice of one
    # (e.g. of a parameter: not itself a leaf, but writing into it overwrites the
    # leaf), must be refused before anything is written, as PyTorch's in-place ops do.
    leaf = torch.randn(4, 9, device=device, requires_grad=True)
    before = leaf.detach().clone()
    logits = leaf if what == "leaf" else leaf[:, :7]
    with pytest.raises((ValueError, RuntimeError), match=r"leaf"):
        fused_ce.cross_entropy(logits, torch.tensor([1, 2, 3, 4], device=device), inplace_backward=True)
    assert torch.equal(leaf.detach(), before), "the leaf was overwritten although the call raised"


def test_inplace_backward_on_rows_that_share_memory_raises_and_leaves_them_intact(device):
    # Rows expanded from one row (stride 0) cannot each hold their own gradient.
    base = torch.randn(1, 7, device=device, requires_grad=True)
    shared = base * 1
    before = shared.detach().clone()
    with pytest.raises(ValueError, match=r"inplace_backward.*share memory"):
        fused_ce.cross_entropy(shared.expand(4, 7), torch.tensor([1, 2, 3, 4], device=device), inplace_backward=True)
    assert torch.equal(shared.detach(), before), "the logits were overwritten although the call raised"


def test_inplace_backward_on_overlapping_rows_raises_and_leaves_them_intact(device):
    # unfold() rows that overlap (row stride 2 < 7 classes): one row's gradient would
    # overwrite the next row's logits while they are read.
    base = torch.randn(20, device=device, requires_grad=True)
    flat = base * 1
    rows = flat.unfold(0, 7, 2)  # [7, 7], stride (2, 1)
    before = flat.detach().clone()
    with pytest.raises(ValueError, match=r"inplace_backward.*share memory"):
        fused_ce.cross_entropy(rows, torch.arange(7, device=device) % 7, inplace_backward=True)
    assert torch.equal(flat.detach(), before), "the logits were overwritten although the call raised"


def test_inplace_backward_accepts_padded_rows(device):
    # Rows with a stride beyond the class count (a padded buffer) share no memory.
    base = torch.randn(4, 10, device=device, requires_grad=True)
    padded = (base * 1)[:, :7]
    target = torch.tensor([1, 2, 3, 4], device=device)
    expected = torch.func.grad(lambda x: torch.nn.functional.cross_entropy(x, target))(padded.detach().clone())
    fused_ce.cross_entropy(padded, target, inplace_backward=True).backward()
    torch.testing.assert_close(base.grad[:, :7], expected)


def test_inplace_backward_without_grad_leaves_the_logits_intact():
    # Nothing to differentiate (no_grad, or logits that do not require grad): the
    # option does nothing; the logits keep their values and the loss is PyTorch's.
    x = torch.randn(4, 7)
    target = torch.tensor([1, 2, 3, 4])
    before = x.clone()
    with torch.no_grad():
        loss = fused_ce.cross_entropy(x, target, inplace_backward=True)
    loss2 = fused_ce.cross_entropy(x, target, inplace_backward=True)
    assert torch.equal(x, before)
    torch.testing.assert_close(loss, F.cross_entropy(x, target))
    torch.testing.assert_close(loss2, F.cross_entropy(x, target))


# Layouts of the logits an in-place gradient must handle: (shape of the leaf, view).
INPLACE_LAYOUTS = {
    "rows": ((6, 11), lambda b: b),
    "wide_slice": ((6, 20), lambda b: b[:, 3:14]),
    "every_other_row": ((12, 11), lambda b: b[::2]),
    "transposed": ((11, 6), lambda b: b.t()),
    "k_dim": ((3, 11, 2, 2), lambda b: b),
    "k_dim_channels_last": ((3, 2, 2, 11), lambda b: b.movedim(-1, 1)),
    "k_dim_one_position": ((2, 11, 1), lambda b: b),
    "k_dim_channels_last_one_position": ((2, 1, 11), lambda b: b.movedim(-1, 1)),
    "k_dim_channels_last_one_sample": ((1, 3, 11), lambda b: b.movedim(-1, 1)),
    "k_dim_channels_last_two_classes": ((1, 2, 2), lambda b: b.movedim(-1, 1)),
    "unbatched": ((11,), lambda b: b),
    "unbatched_strided": ((22,), lambda b: b[::2]),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("layout", list(INPLACE_LAYOUTS))
def test_inplace_backward_on_every_layout(device, layout, reduction):
    # Whatever the layout of the logits (views, K-dimensional, channels-last), the
    # in-place path gives F.cross_entropy's loss and gradient; where the rows are not a
    # view of the input the gradient goes through a copy, but it must not fail.
    shape, view = INPLACE_LAYOUTS[layout]
    gen = torch.Generator().manual_seed(20)
    base = torch.randn(shape, generator=gen).to(device)
    x = view(base)
    class_dim = 0 if x.dim() == 1 else 1
    batch = x.shape[:class_dim] + x.shape[class_dim + 1 :]
    target = torch.randint(0, x.shape[class_dim], batch, generator=gen).to(device)
    upstream = torch.rand(batch if reduction == "none" else (), generator=gen).to(device) + 0.5

    results = []
    for fn, extra in ((fused_ce.cross_entropy, dict(inplace_backward=True)), (F.cross_entropy, {})):
        leaf = base.clone().requires_grad_(True)
        loss = fn(view(leaf * 1), target, reduction=reduction, label_smoothing=0.1, **extra)
        (grad,) = torch.autograd.grad(loss, leaf, upstream)
        results.append((loss.detach(), grad))
    (loss, grad), (t_loss, t_grad) = results
    torch.testing.assert_close(loss, t_loss, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(grad, t_grad, rtol=2e-5, atol=2e-6)


# -- extras and arguments that test_bad_input.py does not cover ------------------------------


# (test_extras.py covers -1, nan, inf and "0.1" for both.)
@pytest.mark.parametrize("z_loss", [-1e-4, -math.inf, True, None], ids=repr)
def test_z_loss_invalid(z_loss):
    with pytest.raises(ValueError, match=r"z_loss must be a finite number >= 0"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), z_loss=z_loss)


@pytest.mark.parametrize("softcap", [0, -math.inf, True, "30"], ids=repr)
def test_softcap_invalid(softcap):
    # None turns the soft-cap off; 0 is not a synonym (a cap of 0 is meaningless).
    with pytest.raises(ValueError, match=r"softcap must be None or a finite number > 0"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), softcap=softcap)


@pytest.mark.parametrize("ignore_index", [2**63, -(2**63) - 1], ids=str)
def test_ignore_index_outside_int64(ignore_index):
    with pytest.raises(ValueError, match=r"ignore_index must fit in int64"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), ignore_index=ignore_index)


def test_label_smoothing_that_is_not_a_number():
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        fused_ce.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing="0.1")


@pytest.mark.parametrize("weight_dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_weight_of_another_floating_dtype_is_converted(weight_dtype):
    # PyTorch raises for a weight whose dtype differs from the logits'; fused_ce
    # converts it to its accumulation dtype, so the result is that of the converted weight.
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(7))
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    weight = (torch.rand(5, generator=torch.Generator().manual_seed(8)) + 0.5).to(weight_dtype)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, target, weight=weight)
    loss = fused_ce.cross_entropy(x, target, weight=weight)
    torch.testing.assert_close(loss, F.cross_entropy(x, target, weight=weight.float()), rtol=1e-5, atol=1e-6)


def test_probability_target_of_another_floating_dtype_is_converted():
    # The same for class probabilities: converted to the logits' dtype.
    x = torch.randn(6, 5, generator=torch.Generator().manual_seed(9))
    target = torch.randn(6, 5, generator=torch.Generator().manual_seed(10), dtype=torch.float64).softmax(1)
    loss = fused_ce.cross_entropy(x, target)
    torch.testing.assert_close(loss, F.cross_entropy(x, target.float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target_dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_out_of_range_narrow_integer_targets_raise(target_dtype):
    # Narrow integer targets are widened before the range check, not wrapped.
    target = torch.tensor([0, 200, 1], dtype=target_dtype)
    with pytest.raises(IndexError, match=r"target.*out of range"):
        fused_ce.cross_entropy(torch.randn(3, 5), target)


# -- determinism ------------------------------------------------------------------------------


def _all_paths(x, target, reduction, **kwargs):
    """(loss, lse or None, gradient or None) of every path, on fresh copies of x."""
    out = {}
    upstream = None
    if reduction == "none":
        upstream = torch.linspace(-1, 2, target.shape[0], device=x.device)
        upstream[::3] = 1.0  # rows with upstream exactly 1 keep the forward pass's gradient
    with torch.no_grad():
        out["forward"] = (fused_ce.cross_entropy(x, target, reduction=reduction, **kwargs), None, None)
    for path in ("fused", "inplace", "return_lse"):
        leaf = x.detach().clone().requires_grad_(True)
        inp = leaf * 1 if path == "inplace" else leaf
        res = fused_ce.cross_entropy(
            inp, target, reduction=reduction, inplace_backward=path == "inplace", return_lse=path == "return_lse",
            **kwargs,
        )
        loss, lse = res if path == "return_lse" else (res, None)
        u = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
        (grad,) = torch.autograd.grad(loss, leaf, u)
        out[path] = (loss.detach(), None if lse is None else lse.detach(), grad)
    return out


def _assert_bitwise(a, b, what):
    for path in a:
        for name, x, y in zip(("loss", "lse", "gradient"), a[path], b[path]):
            if x is None:
                continue
            assert x.dtype == y.dtype and x.shape == y.shape
            # NaN != NaN: compare the bits.
            same = torch.equal(x.view(torch.uint8) if x.dim() else x.reshape(1).view(torch.uint8),
                               y.view(torch.uint8) if y.dim() else y.reshape(1).view(torch.uint8))
            assert same, f"{what}: {path} {name} differs"


DETERMINISM_CASES = {
    # (N, V): many rows (row-parallel), a long row (several 2048-class blocks), K-dim
    "rows": ((3000, 37), {}),
    "long_rows": ((6, 20000), dict(label_smoothing=0.1, z_loss=1e-4)),
    "options": ((257, 1129), dict(label_smoothing=0.2, z_loss=1e-3, softcap=20.0, weighted=True)),
}


def _determinism_problem(case, dtype, device):
    (n, v), opts = DETERMINISM_CASES[case]
    gen = torch.Generator().manual_seed(11)
    x = (4 * torch.randn(n, v, generator=gen)).to(device=device, dtype=dtype)
    target = torch.randint(0, v, (n,), generator=gen).to(device)
    target[1::5] = -100
    kwargs = dict(opts)
    if kwargs.pop("weighted", False):
        kwargs["weight"] = (torch.rand(v, generator=gen) + 0.5).to(device=device, dtype=dtype)
    return x, target, kwargs


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_reproducible_run_to_run(device, dtype, case, reduction):
    x, target, kwargs = _determinism_problem(case, dtype, device)
    first = _all_paths(x, target, reduction, **kwargs)
    for _ in range(2):
        _assert_bitwise(first, _all_paths(x, target, reduction, **kwargs), "second run")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_bitwise_identical_across_thread_counts(case, reduction):
    # Each row is computed by one thread, start to end, so per-row values and every
    # gradient whose row coefficients are exact do not depend on the thread count.
    # Not asserted (and reported): the *reduced* loss of 'mean'/'sum' and, for a
    # weighted 'mean', the gradient (its denominator is a float sum of weights) are
    # torch.sum over N per-row values, whose order of summation depends on the
    # thread count once N exceeds torch's grain (32768 rows); F.cross_entropy's
    # own reductions do not. See the README.
    x, target, kwargs = _determinism_problem(case, torch.float32, "cpu")
    saved = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results[threads] = _all_paths(x, target, reduction, **kwargs)
    finally:
        torch.set_num_threads(saved)
    for threads in (2, 3):
        _assert_bitwise(results[1], results[threads], f"{threads} threads vs 1")


def test_per_row_values_identical_across_thread_counts_with_many_rows():
    # Beyond torch.sum's grain, per-row losses, lse and the 'sum' gradient are still
    # bitwise identical across thread counts (only the scalar reduction is not).
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(40000, 16, generator=gen)
    target = torch.randint(0, 16, (40000,), generator=gen)
    saved = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaf = x.clone().requires_grad_(True)
            loss, lse = fused_ce.cross_entropy(leaf, target, reduction="none", return_lse=True)
            (g_lse,) = torch.autograd.grad(loss.sum(), leaf)
            leaf = x.clone().requires_grad_(True)
            (g_fused,) = torch.autograd.grad(fused_ce.cross_entropy(leaf, target, reduction="sum"), leaf)
            results[threads] = (loss.detach(), lse.detach(), g_lse, g_fused)
    finally:
        torch.set_num_threads(saved)
    for name, a, b in zip(("loss", "lse", "two-pass gradient", "fused gradient"), results[1], results[2]):
        assert torch.equal(a, b), f"{name} differs between 1 and 2 threads"


# -- resource safety ------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): the latter reads __class__, which some lazy module
    # proxies answer with a deprecation warning.
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def _one_call_of_each_kind(i, x, target_index, target_probs, weight):
    path = PATHS[i % 4]
    target = target_probs if i % 7 == 0 else target_index
    kwargs = dict(reduction=("none", "mean", "sum")[i % 3], label_smoothing=0.1 * (i % 2), z_loss=1e-4 * (i % 5 == 0))
    if i % 2:
        kwargs["weight"] = weight
    if i % 3 == 0:
        kwargs["softcap"] = 15.0
    loss, grad = run_path(fused_ce.cross_entropy, x, target, path, **kwargs)
    return loss, grad


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux) to read the RSS")
def test_memory_does_not_grow_over_thousands_of_calls():
    # 2000 calls over every path and option. A leaked gradient buffer (32 x 500
    # floats = 64 KB) per call would add 128 MB; the live tensor count catches leaked
    # Python references (autograd graphs, saved tensors) exactly.
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(32, 500, generator=gen)
    target_index = torch.randint(0, 500, (32,), generator=gen)
    target_index[::9] = -100
    target_probs = torch.randn(32, 500, generator=gen).softmax(1)
    weight = torch.rand(500, generator=gen) + 0.5
    for i in range(300):  # warm-up: allocator caches, autograd and dispatcher state
        _one_call_of_each_kind(i, x, target_index, target_probs, weight)
    tensors_before, rss_before = _live_tensors(), _rss_bytes()
    for i in range(2000):
        _one_call_of_each_kind(i, x, target_index, target_probs, weight)
    tensors_after, rss_after = _live_tensors(), _rss_bytes()
    assert tensors_after <= tensors_before, f"live tensors {tensors_before} -> {tensors_after}"
    growth = rss_after - rss_before
    # Measured: < 2 MB (allocator arenas settling); a leak of one gradient per call is 128 MB.
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MB over 2000 calls"


def test_large_gradient_buffers_are_freed():
    # Gradients of >= 32 MB are allocated 2 MB-aligned for huge pages (not by
    # torch's allocator): each must be freed with its tensor. 24 calls of 32 MB each
    # would leak 768 MB.
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(8, 2**20, generator=gen)  # 32 MB of float32
    target = torch.randint(0, 2**20, (8,), generator=gen)
    for path in ("fused", "return_lse"):
        run_path(fused_ce.cross_entropy, x, target, path)
    rss_before = _rss_bytes()
    for i in range(24):
        _loss, grad = run_path(fused_ce.cross_entropy, x, target, ("fused", "return_lse")[i % 2])
        assert grad.shape == x.shape
        del grad
    growth = _rss_bytes() - rss_before
    assert growth < 200 * 2**20, f"RSS grew by {growth / 2**20:.0f} MB over 24 calls with 32 MB gradients"


def test_concurrent_calls_from_several_threads():
    # 4 Python threads x 60 calls each, on problems of every kind, at the same time as
    # each other: every result equals the one computed single-threaded beforehand.
    gen = torch.Generator().manual_seed(15)
    problems = []
    for k in range(12):
        n, v = (37, 3001) if k % 3 == 0 else (200, 129) if k % 3 == 1 else (5, 20000)
        x = (3 * torch.randn(n, v, generator=gen)).to(torch.bfloat16 if k % 4 == 3 else torch.float32)
        target = torch.randint(0, v, (n,), generator=gen)
        target[::4] = -100
        kwargs = dict(reduction=("none", "mean", "sum")[k % 3], label_smoothing=0.1 * (k % 2))
        if k % 5 == 0:
            kwargs.update(z_loss=1e-3, softcap=10.0)
        problems.append((x, target, PATHS[k % 4], kwargs))
    expected = [run_path(fused_ce.cross_entropy, x, t, path, **kw) for x, t, path, kw in problems]

    errors = []
    barrier = threading.Barrier(4)

    def worker(w):
        try:
            barrier.wait()
            for i in range(60):
                k = (w * 7 + i) % len(problems)
                x, t, path, kw = problems[k]
                loss, grad = run_path(fused_ce.cross_entropy, x, t, path, **kw)
                e_loss, e_grad = expected[k]
                if not torch.equal(loss, e_loss) or (grad is not None and not torch.equal(grad, e_grad)):
                    errors.append(f"thread {w}, call {i}: problem {k} ({path}) differs from the single-threaded result")
        except Exception as e:
            errors.append(f"thread {w}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, "\n".join(errors[:10])


# -- precision: float16 / bfloat16 against float64, case by case -------------------------------


def _errors(dtype, x, target, reduction, device="cpu", **kwargs):
    """(fused_ce's, PyTorch's) max error against float64, for the loss and the gradient.

    fused_ce and PyTorch run on `device` at `dtype`, the reference on the CPU."""
    upstream = None if reduction != "none" else torch.linspace(0.5, 1.5, x.shape[0])
    kw64 = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    e_loss, e_grad = run_path(cross_entropy_reference, x.double(), target.double() if target.is_floating_point()
                              else target, "fused", None if upstream is None else upstream.double(),
                              reduction=reduction, **kw64)
    f_loss, f_grad = run_path(
        fused_ce.cross_entropy, x, target, "fused", upstream, device, reduction=reduction, **kwargs
    )
    t_loss, t_grad = run_path(F.cross_entropy, x, target, "fused", upstream, device, reduction=reduction, **kwargs)

    def err(a, b):
        return float((a.double() - b).abs().max())

    losses = (f_loss, t_loss, e_loss)
    return losses, (err(f_loss, e_loss), err(t_loss, e_loss)), (err(f_grad, e_grad), err(t_grad, e_grad))


PRECISION_CASES = {
    # name: (dtype, N, V, logit scale, kwargs)
    "fp16_plain_32k": (torch.float16, 8, 32000, 3.0, {}),
    "bf16_plain_128k": (torch.bfloat16, 4, 128256, 3.0, {}),
    "fp16_probs_32k": (torch.float16, 8, 32000, 2.0, dict(probs=True)),
    "bf16_smoothing_32k": (torch.bfloat16, 8, 32000, 3.0, dict(label_smoothing=0.1)),
    "bf16_weight_smoothing": (torch.bfloat16, 64, 5000, 5.0, dict(label_smoothing=0.2, weighted=True)),
    "fp16_large_logits": (torch.float16, 16, 4000, 3000.0, {}),
    "bf16_large_logits": (torch.bfloat16, 16, 4000, 1e4, dict(label_smoothing=0.05)),
    "fp16_tiny_logits": (torch.float16, 16, 4000, 1e-3, dict(label_smoothing=0.05)),
}


def _precision_problem(dtype, n, v, scale, kwargs, seed=16):
    gen = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(n, v, generator=gen)).clamp(-6e4, 6e4).to(dtype)
    kwargs = dict(kwargs)
    if kwargs.pop("probs", False):
        target = (2 * torch.randn(n, v, generator=gen)).softmax(1).to(dtype)
    else:
        target = torch.randint(0, v, (n,), generator=gen)
    if kwargs.pop("weighted", False):
        kwargs["weight"] = (torch.rand(v, generator=gen) + 0.5).to(dtype)
    return x, target, kwargs


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("case", list(PRECISION_CASES))
def test_low_precision_no_worse_than_torch(device, case, reduction):
    dtype, n, v, scale, kwargs = PRECISION_CASES[case]
    x, target, kwargs = _precision_problem(dtype, n, v, scale, kwargs)
    (f_loss, _t_loss, e_loss), (loss_err, t_loss_err), (grad_err, t_grad_err) = _errors(
        dtype, x, target, reduction, device, **kwargs
    )
    representable = e_loss.abs() < torch.finfo(dtype).max  # a 'sum' may exceed float16's range
    assert bool(f_loss.isfinite()[representable].all())
    loss_floor = 1e-6 * float(e_loss.abs().max()) + 1e-8
    assert loss_err <= 2 * t_loss_err + loss_floor, f"loss error {loss_err:.3g}, PyTorch's {t_loss_err:.3g}"
    assert grad_err <= 2 * t_grad_err + _SUBNORMAL[dtype], f"gradient error {grad_err:.3g}, PyTorch's {t_grad_err:.3g}"


# The spacing of each dtype's subnormal numbers: the least absolute error near 0.
_SUBNORMAL = {d: torch.finfo(d).tiny * torch.finfo(d).eps for d in (torch.float16, torch.bfloat16)}


def _rounding_bound(expected: torch.Tensor, dtype) -> float:
    """A few units of `dtype`'s rounding of the largest value: what a correct result may be off by."""
    return 4 * torch.finfo(dtype).eps * float(expected.abs().max()) + 1e-6


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("num_classes", [8192, 32000, 128256])
def test_fp16_label_smoothing_large_vocabulary_stays_finite(device, num_classes, reduction):
    # PyTorch (CPU, torch 2.14) sums the smoothing term -sum_c log_softmax_c in float16:
    # for V >= ~8000 it exceeds 65504 and the loss is inf, although the loss itself is
    # about 10. fused_ce sums in float32 and must return the correct, finite loss.
    x, target, kwargs = _precision_problem(torch.float16, 4, num_classes, 1.0, dict(label_smoothing=0.1))
    (f_loss, t_loss, e_loss), (loss_err, _), (grad_err, t_grad_err) = _errors(
        torch.float16, x, target, reduction, device, **kwargs
    )
    assert bool(f_loss.isfinite().all()), f"fused_ce: {f_loss} (PyTorch: {t_loss})"
    assert loss_err <= _rounding_bound(e_loss, torch.float16), f"loss error {loss_err:.3g}"
    assert grad_err <= 2 * t_grad_err + _SUBNORMAL[torch.float16]


def test_fp16_mean_over_many_rows_stays_finite(device):
    # PyTorch's float16 'mean' sums the rows' losses in float16 before dividing: 8192
    # rows of loss ~10 overflow to inf. fused_ce reduces in float32.
    x, target, _ = _precision_problem(torch.float16, 8192, 64, 4.0, {})
    (f_loss, t_loss, e_loss), (loss_err, _), (grad_err, t_grad_err) = _errors(torch.float16, x, target, "mean", device)
    assert bool(f_loss.isfinite()), f"fused_ce: {f_loss} (PyTorch: {t_loss})"
    assert loss_err <= _rounding_bound(e_loss, torch.float16)
    assert grad_err <= 2 * t_grad_err + _SUBNORMAL[torch.float16]


def test_fp16_z_loss_with_large_logits_stays_finite(device):
    # The z-loss composed from PyTorch ops at float16 overflows (lse**2 > 65504 for
    # lse > 256); fused_ce computes it in float32 and is finite and accurate.
    gen = torch.Generator().manual_seed(17)
    x = (300 + torch.randn(8, 1000, generator=gen)).to(torch.float16)
    target = torch.randint(0, 1000, (8,), generator=gen)
    lse16 = torch.logsumexp(x, 1)
    assert not bool((lse16.square()).isfinite().all())  # the PyTorch composition overflows here
    leaf = x.detach().clone().to(device).requires_grad_(True)
    loss = fused_ce.cross_entropy(leaf, target.to(device), z_loss=1e-4)
    (grad,) = torch.autograd.grad(loss, leaf)
    loss, grad = loss.detach().cpu(), grad.cpu()
    x64 = x.double().requires_grad_(True)
    expected = cross_entropy_reference(x64, target) + 1e-4 * torch.logsumexp(x64, 1).square().mean()
    (expected_grad,) = torch.autograd.grad(expected, x64)
    assert bool(loss.isfinite())
    assert abs(float(loss) - float(expected.detach())) <= _rounding_bound(expected.detach(), torch.float16)
    assert float((grad.double() - expected_grad).abs().max()) <= _rounding_bound(expected_grad, torch.float16)


# -- scale: more than 2**31 logits ------------------------------------------------------------


@pytest.mark.slow
def test_more_than_2_31_logits(device):
    # bfloat16 16385 x 131072 = 2**31 + 131072 elements (4.3 GB): the last row starts at
    # element 2**31 exactly, where a 32-bit offset wraps. Checks the rows at both ends
    # and around 2**30 against float64, the 'mean' loss against a float64 mean computed
    # in chunks, and (in place, so no second 4.3 GB buffer) the gradient rows.
    n, v = 16385, 131072
    assert n * v > 2**31
    gen = torch.Generator(device=device).manual_seed(18)
    x = torch.empty(n, v, dtype=torch.bfloat16, device=device)
    chunk = 512
    for r in range(0, n, chunk):
        x[r : r + chunk] = (3 * torch.randn(min(chunk, n - r), v, generator=gen, device=device)).to(torch.bfloat16)
    target = torch.randint(0, v, (n,), generator=gen, device=device)
    target[7::11] = -100
    rows = [0, 1, 8191, 8192, n - 2, n - 1]

    with torch.no_grad():
        loss_rows = fused_ce.cross_entropy(x, target, reduction="none")
        loss_mean = fused_ce.cross_entropy(x, target, label_smoothing=0.1)
    x_rows = x[rows].double()
    expected_rows = cross_entropy_reference(x_rows, target[rows], reduction="none")
    torch.testing.assert_close(loss_rows[rows].double(), expected_rows, rtol=2**-7, atol=1e-2)

    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for r in range(0, n, chunk):
        t = target[r : r + chunk]
        total += cross_entropy_reference(x[r : r + chunk].double(), t, label_smoothing=0.1, reduction="sum")
        count += int((t != -100).sum())
    torch.testing.assert_close(loss_mean.double(), total / count, rtol=2**-7, atol=0)

    # The gradient, written over the logits: they must be a non-leaf tensor that
    # requires grad, made here by adding a 0-d leaf (a copy: 8.6 GB at the peak, then
    # the original is freed).
    logits = x + torch.zeros((), dtype=torch.bfloat16, device=device, requires_grad=True)
    del x
    loss = fused_ce.cross_entropy(logits, target, reduction="sum", inplace_backward=True)
    probs = torch.softmax(x_rows, 1)
    onehot = F.one_hot(target[rows].clamp(min=0), v).double() * (target[rows] != -100).double().unsqueeze(1)
    expected_grad = (probs - onehot) * (target[rows] != -100).double().unsqueeze(1)
    torch.testing.assert_close(logits.detach()[rows].double(), expected_grad, rtol=2**-7, atol=1e-4)
    assert bool(loss.isfinite())
