"""Non-finite inputs and ignored rows: PyTorch's loss and gradients, NaN and inf positions included.

* non-finite logits (NaN, +-inf, masked and fully masked rows, in counted, ignored and
  zero-weight rows) and non-finite probability targets, on every execution path (two
  documented differences are pinned as such);
* every target ignored, on every path and with the extras.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from utils import PATHS, assert_same_as_torch, run_path

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
