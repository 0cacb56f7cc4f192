"""fused_ce.linear_distillation_loss against distillation_reference of eager F.linear logits, in float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.linear.distill import distill_op
from fused_ce.reference import distillation_reference
from utils import dtype_id

KINDS = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["none", "mean", "sum", "batchmean"]
# Against float64: the matmuls round in the input's dtype (bf16/fp16 logits), the kernels sum in fp32.
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
    torch.bfloat16: dict(rtol=3e-2, atol=1e-2),
}


def _problem(batch, dims, classes, dtype, device, masked=True, bias=True):
    """(student (h, W, b), teacher (h, W, b), target) with the student's leaves requiring grad."""
    g = torch.Generator().manual_seed(sum(batch) + classes)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)

    student = [randn(*batch, dims[0]), randn(classes, dims[0], scale=dims[0] ** -0.5),
               randn(classes, scale=0.5) if bias else None]
    teacher = (randn(*batch, dims[1]), randn(classes, dims[1], scale=2 * dims[1] ** -0.5),
               randn(classes, scale=0.5) if bias else None)
    for t in student:
        if t is not None:
            t.requires_grad_(True)
    target = torch.randint(0, classes, batch, generator=g).to(device)
    if masked:
        target.view(-1)[::4] = -100
    return student, teacher, target


def _reference(student, teacher, **kwargs):
    """distillation_reference of the float64 logits of both heads."""
    def logits(h, w, b):
        return F.linear(h.double(), w.double(), None if b is None else b.double())

    return distillation_reference(logits(*student), logits(*teacher), **kwargs)


def _fused(student, teacher, **kwargs):
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    return fused_ce.linear_distillation_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, **kwargs)


def _grads(loss, student, upstream):
    leaves = [t for t in student if t is not None]
    return torch.autograd.grad(loss, leaves, upstream.to(loss.dtype))


@pytest.mark.parametrize("alpha", [0.0, 0.25])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_matches_reference(device, dtype, kind, reduction, alpha):
    student, teacher, target = _problem((3, 7), (24, 40), 203, dtype, device)
    kwargs = dict(kind=kind, beta=0.3, temperature=1.5, target=target, alpha=alpha, reduction=reduction)
    got = _fused(student, teacher, chunk_size=8, **kwargs)  # chunks of 8 rows over 21: a ragged last one
    want = _reference(student, teacher, **kwargs)
    assert got.dtype == dtype and got.shape == want.shape
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got.double(), want, **tol)
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    for g, w in zip(_grads(got, student, upstream), _grads(want, student, upstream)):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w.double(), **tol)


@pytest.mark.parametrize("chunk_size", [None, 1, 5, 64])
def test_chunking_changes_nothing_but_rounding(device, chunk_size):
    student, teacher, target = _problem((20,), (16, 16), 130, torch.float32, device, bias=False)
    got = _fused(student, teacher, target=target, alpha=0.5, chunk_size=chunk_size)
    want = _fused(student, teacher, target=target, alpha=0.5, chunk_size=20)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(_grads(got, student, torch.tensor(1.0)), _grads(want, student, torch.tensor(1.0))):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(device, kind, reduction):
    student, teacher, target = _problem((5,), (4, 3), 9, torch.float64, device)
    (ht, wt, bt) = teacher

    def fn(hs, ws, bs):
        return fused_ce.linear_distillation_loss(hs, ws, ht, wt, student_bias=bs, teacher_bias=bt, kind=kind,
                                                 temperature=0.7, target=target, alpha=0.3, reduction=reduction,
                                                 chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(student))


def test_second_backward_recomputes(device):
    """retain_graph: the first backward hands its buffers on, the second makes them again."""
    student, teacher, target = _problem((6,), (8, 8), 50, torch.float64, device)
    loss = _fused(student, teacher, target=target, alpha=0.5)
    first = torch.autograd.grad(loss, student, retain_graph=True)
    second = torch.autograd.grad(loss, student, torch.tensor(3.0, dtype=torch.float64, device=device))
    for a, b in zip(first, second):
        torch.testing.assert_close(3 * a, b)


def test_only_some_leaves_need_grad(device):
    student, teacher, target = _problem((6,), (8, 8), 50, torch.float64, device)
    hs, ws, bs = student
    hs.requires_grad_(False)
    loss = _fused((hs, ws, bs), teacher, target=target)
    gw, gb = torch.autograd.grad(loss, (ws, bs))
    want = torch.autograd.grad(_reference((hs, ws, bs), teacher, target=target), (ws, bs))
    torch.testing.assert_close(gw, want[0])
    torch.testing.assert_close(gb, want[1])


def test_no_grad_mode_and_no_bias(device):
    student, teacher, target = _problem((2, 3), (8, 4), 33, torch.float32, device, bias=False)
    with torch.no_grad():
        got = _fused(student, teacher, kind="reverse_kl", target=target, reduction="sum")
    torch.testing.assert_close(got.double(), _reference(student, teacher, kind="reverse_kl", target=target,
                                                        reduction="sum").detach(), **TOLERANCES[torch.float32])


def test_opcheck(device):
    student, teacher, target = _problem((6,), (8, 5), 40, torch.float32, device)
    div_scale = torch.rand(6, device=device)
    ce_scale = torch.rand(6, device=device)
    for ce, needs in ((None, (True, True, True)), (ce_scale, (False, True, False)), (ce_scale, (False,) * 3)):
        args = (*student, *teacher, target, div_scale, ce, 2, 0.4, 1.3, -100, 4, *needs)
        torch.library.opcheck(distill_op, args)


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    student, teacher, target = _problem((10,), (8, 8), 70, torch.float32, device)
    compiled = torch.compile(fused_ce.linear_distillation_loss, fullgraph=True, backend="aot_eager")
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    kwargs = dict(student_bias=bs, teacher_bias=bt, kind="jsd", target=target, alpha=0.2)
    got = compiled(hs, ws, ht, wt, **kwargs)
    want = fused_ce.linear_distillation_loss(hs, ws, ht, wt, **kwargs)
    torch.testing.assert_close(got, want)
    for g, w in zip(_grads(got, student, torch.tensor(1.0)), _grads(want, student, torch.tensor(1.0))):
        torch.testing.assert_close(g, w)
    torch._dynamo.reset()


def test_matches_distillation_loss_on_materialised_logits(device):
    student, teacher, target = _problem((4, 5), (16, 12), 97, torch.float32, device)
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    kwargs = dict(kind="forward_kl", temperature=2.0, target=target, alpha=0.1, reduction="batchmean")
    want = fused_ce.distillation_loss(F.linear(hs, ws, bs), F.linear(ht, wt, bt), **kwargs)
    torch.testing.assert_close(_fused(student, teacher, **kwargs), want, rtol=1e-5, atol=1e-6)


def test_empty_batch(device):
    for reduction, expect_nan in (("mean", True), ("batchmean", True), ("sum", False)):
        student, teacher, _ = _problem((0,), (4, 4), 10, torch.float32, device)
        loss = _fused(student, teacher, reduction=reduction)
        assert math.isnan(loss.item()) == expect_nan
        grads = _grads(loss, student, torch.tensor(1.0))
        assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, student))


def test_every_row_ignored_is_nan_with_zero_gradient(device):
    student, teacher, target = _problem((5,), (4, 4), 10, torch.float32, device)
    loss = _fused(student, teacher, target=torch.full_like(target, -100), alpha=0.5)
    assert math.isnan(loss.item())
    assert all(not g.any() for g in _grads(loss, student, torch.tensor(1.0)))


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda s, t: (s, (t[0].requires_grad_(True), *t[1:])), "teacher_input requires grad"),
        (lambda s, t: (s, (t[0], t[1].requires_grad_(True), t[2])), "teacher_weight requires grad"),
        (lambda s, t: (s, (t[0][:2], *t[1:])), "teacher_input must have student_input's batch shape"),
        (lambda s, t: (s, (t[0], t[1][:5], t[2][:5])), "teacher_weight must have student_weight's 10 classes"),
        (lambda s, t: (s, (t[0].double(), t[1].double(), t[2].double())), "teacher_input must have student_input's"),
        (lambda s, t: ((s[0], s[1].detach()[:, :2], s[2]), t), "student_input's last dimension"),
        (lambda s, t: ((s[0], s[1], s[2].detach()[:3]), t), "student_bias must have shape"),
        (lambda s, t: (s, (t[0], t[1], t[2][:3])), "teacher_bias must have shape"),
    ],
)
def test_bad_operands(change, match):
    student, teacher, _ = _problem((4,), (4, 6), 10, torch.float32, "cpu")
    student, teacher = change(student, [t.detach() for t in teacher])
    with pytest.raises((ValueError, TypeError), match=match):
        _fused(student, teacher)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(kind="kl"), "kind"), (dict(alpha=0.5), "needs target"), (dict(chunk_size=0), "chunk_size"),
     (dict(chunk_size=(4, 8)), "chunk_size"), (dict(reduction="avg"), "reduction"), (dict(temperature=-1.0),
                                                                                     "temperature")],
)
def test_bad_options(kwargs, match):
    student, teacher, _ = _problem((4,), (4, 6), 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        _fused(student, teacher, **kwargs)


def test_inputs_are_not_modified(device):
    student, teacher, target = _problem((6,), (8, 8), 50, torch.float32, device)
    before = [t.detach().clone() for t in (*student, *teacher, target)]
    loss = _fused(student, teacher, target=target, alpha=0.5)
    loss.backward()
    for t, b in zip((*student, *teacher, target), before):
        assert torch.equal(t.detach(), b)
