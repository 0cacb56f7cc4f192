"""Property-based tests of the other public functions, on the problems of test_properties.

* ``focal_loss`` (gamma 0, fractional and > 1; alpha none, a float, per class) against
  its float64 reference;
* ``entropy`` against its float64 reference, in every layout;
* ``vocab_parallel_cross_entropy`` on a one-rank process group against
  ``fused_ce.cross_entropy`` on the same rows;
* every loss under ``torch.autocast``: float32, and the same numbers as
  ``loss_dtype=torch.float32``.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given
from hypothesis import strategies as st

import fused_ce
from fused_ce.reference import entropy_reference, focal_loss_reference
from test_properties import DEVICES, LOW_PRECISION, _examples, _view, assert_close64, materialize, problems


def _index_problems(**kwargs):
    return problems(**kwargs).filter(lambda p: p.target_kind == "index")


@DEVICES
@_examples(ci_budget=80)
@given(p=_index_problems(extras=False), gamma=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.0]),
       alpha=st.sampled_from([None, 0.25, "per_class"]))
def test_focal_loss_matches_reference(device, p, gamma, alpha):
    base, target, kwargs = materialize(p)
    ignore_index = kwargs.get("ignore_index", -100)
    if alpha == "per_class":
        alpha = torch.rand(p.num_classes, generator=torch.Generator().manual_seed(p.seed), dtype=torch.float64)
    results = []
    for x_base, a, dev in ((base, alpha, device), (base.double(), alpha, "cpu")):
        leaf = x_base.detach().clone().to(dev).requires_grad_(True)
        a = a.to(dev) if isinstance(a, torch.Tensor) else a
        fn = fused_ce.focal_loss if x_base is base else focal_loss_reference
        loss = fn(_view(leaf, p.shape, p.layout), target.to(dev), gamma=gamma, alpha=a, ignore_index=ignore_index,
                  reduction=p.reduction)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        results.append((loss.detach().cpu(), grad.cpu()))
    (loss, grad), (want_loss, want_grad) = results
    assert bool(torch.isfinite(grad).all()), "a non-finite gradient"
    # The reference's pow has no guard where p_t rounds to 1 (its gradient is NaN there);
    # compare where it is finite.
    finite = torch.isfinite(want_grad)
    magnitude = float(base.abs().max()) if base.numel() else 0.0
    assert_close64(loss, want_loss, "loss", magnitude)
    assert_close64(grad[finite], want_grad[finite], "gradient", magnitude)


@DEVICES
@_examples(ci_budget=60)
@given(p=problems(extras=False, paths=["fused"]))
def test_entropy_matches_reference(device, p):
    base, _target, _ = materialize(p)
    leaf = base.detach().clone().to(device).requires_grad_(True)
    logits = _view(leaf, p.shape, p.layout).movedim(p.class_dim, -1)  # entropy takes classes last
    value = fused_ce.entropy(logits)
    want = entropy_reference(_view(base.double(), p.shape, p.layout).movedim(p.class_dim, -1))
    assert value.shape == want.shape
    magnitude = float(base.abs().max()) if base.numel() else 0.0
    assert_close64(value.detach().cpu(), want, "entropy", magnitude)
    (grad,) = torch.autograd.grad(value.sum(), leaf)
    assert grad.shape == leaf.shape and bool(torch.isfinite(grad).all() or not torch.isfinite(base).all())


@pytest.fixture(scope="module")
def one_rank_group():
    if dist.is_initialized():
        pytest.skip("this process already belongs to a process group")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


@_examples(ci_budget=40)
@given(p=_index_problems())
def test_vocab_parallel_on_one_rank_is_cross_entropy(one_rank_group, p):
    base, target, kwargs = materialize(p)
    logits = _view(base, p.shape, p.layout).movedim(p.class_dim, -1)  # classes last
    kwargs.pop("reduction")
    got = fused_ce.vocab_parallel_cross_entropy(logits, target, group=one_rank_group, reduction=p.reduction, **kwargs)
    want = fused_ce.cross_entropy(logits.movedim(-1, 1) if logits.dim() > 2 else logits, target,
                                  reduction=p.reduction, **kwargs)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-6)


@DEVICES
@_examples(ci_budget=40)
@given(p=problems(dtypes=LOW_PRECISION, paths=["forward", "fused"]),
       function=st.sampled_from(["cross_entropy", "focal_loss", "linear_cross_entropy"]))
def test_every_loss_under_autocast_is_float32(device, p, function):
    base, target, kwargs = materialize(p)
    if function != "cross_entropy":
        if p.target_kind != "index":
            return
        kwargs = {k: v for k, v in kwargs.items() if k in ("reduction", "ignore_index")}
    x = _view(base.to(device), p.shape, p.layout)
    target, kwargs = target.to(device), {k: v.to(device) if torch.is_tensor(v) else v for k, v in kwargs.items()}

    def call(**extra):
        if function == "linear_cross_entropy":  # logits = x @ I: the head is the identity
            rows = x.movedim(p.class_dim, -1)
            eye = torch.eye(p.num_classes, device=device, dtype=x.dtype)
            return fused_ce.linear_cross_entropy(rows, eye, target, **kwargs, **extra)
        return getattr(fused_ce, function)(x, target, **kwargs, **extra)

    with torch.autocast(device, dtype=p.dtype):
        got = call()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, call(loss_dtype=torch.float32), rtol=0, atol=0, equal_nan=True)
