"""fused_ce.distillation_loss against its float64 reference, F.kl_div, and the op machinery."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.ops import distill_grad_by_formula
from fused_ce.reference import distillation_reference
from utils import dtype_id

KINDS = ["forward_kl", "reverse_kl", "jsd"]
REDUCTIONS = ["none", "mean", "sum", "batchmean"]
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
    torch.float16: dict(rtol=5e-3, atol=1e-3),
}


def _problem(shape, dtype, device, masked=False):
    g = torch.Generator().manual_seed(sum(shape))
    student = (2 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    teacher = (3 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype).to(device)
    target = torch.randint(0, shape[-1], shape[:-1], generator=g).to(device)
    if masked:
        target.view(-1)[::3] = -100
    return student, teacher, target


def _loss_and_grad(fn, student, teacher, upstream, **kwargs):
    x = student.detach().requires_grad_(True)
    loss = fn(x, teacher, **kwargs)
    (grad,) = torch.autograd.grad(loss, x, upstream.to(loss.dtype))
    return loss.detach(), grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
def test_matches_reference(device, dtype, kind, reduction):
    student, teacher, target = _problem((3, 5, 300), dtype, device, masked=True)
    kwargs = dict(kind=kind, temperature=1.7, target=target, reduction=reduction, beta=0.3)
    upstream = torch.rand(target.shape if reduction == "none" else (), dtype=torch.float64, device=device)
    got, got_grad = _loss_and_grad(fused_ce.distillation_loss, student, teacher, upstream, **kwargs)
    want, want_grad = _loss_and_grad(distillation_reference, student.double(), teacher.double(), upstream, **kwargs)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])
    torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[dtype])


@pytest.mark.parametrize("alpha", [0.3, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_hard_label_mix(device, alpha, reduction):
    student, teacher, target = _problem((7, 50), torch.float64, device, masked=True)
    kwargs = dict(kind="jsd", target=target, alpha=alpha, reduction=reduction)
    upstream = torch.rand(target.shape if reduction == "none" else (), dtype=torch.float64, device=device)
    got, got_grad = _loss_and_grad(fused_ce.distillation_loss, student, teacher, upstream, **kwargs)
    want, want_grad = _loss_and_grad(distillation_reference, student, teacher, upstream, **kwargs)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    torch.testing.assert_close(got_grad, want_grad, **TOLERANCES[torch.float64])


def test_forward_kl_is_kl_div_of_log_softmaxes(device):
    student, teacher, _ = _problem((16, 1000), torch.float32, device)
    for temperature in (1.0, 2.0):
        want = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        log_target=True, reduction="batchmean")
        got = fused_ce.distillation_loss(student, teacher, temperature=temperature, reduction="batchmean")
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_vocabulary(device, kind):
    # -inf in both rows (a masked vocabulary entry) adds nothing; a teacher -inf where the
    # student has mass is fine for the forward KL (q = 0 there); +inf results where the
    # divergence is infinite, as the float64 formulas say.
    student, teacher, _ = _problem((4, 40), torch.float64, device)
    student[:, :5] = teacher[:, :5] = -math.inf
    teacher[1, 10:20] = -math.inf
    student[2, 20] = -math.inf
    ones = torch.ones(4, dtype=torch.float64, device=device)
    got, got_grad = _loss_and_grad(fused_ce.distillation_loss, student, teacher, ones, kind=kind, reduction="none")
    want = distillation_reference(student, teacher, kind=kind, reduction="none")
    # (autograd through the reference's where() turns -inf into NaN: the closed-form gradient instead)
    want_grad = distill_grad_by_formula(student, teacher, ones, KINDS.index(kind), 0.5, 1.0)
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCES[torch.float64])
    finite = torch.isfinite(want)
    torch.testing.assert_close(got_grad[finite], want_grad[finite], **TOLERANCES[torch.float64])
    assert bool((got_grad[:, :5] == 0).all())


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_and_gradgradcheck(device, kind):
    student, teacher, target = _problem((3, 9), torch.float64, device, masked=True)
    x = student.requires_grad_(True)
    fn = lambda s: fused_ce.distillation_loss(s, teacher, kind=kind, temperature=1.5, target=target, alpha=0.2)
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


def test_opcheck(device):
    student, teacher, _ = _problem((5, 33), torch.float32, device)
    student.requires_grad_(True)
    for kind in range(3):
        torch.library.opcheck(torch.ops.fused_ce.distill_forward.default, (student, teacher, kind, 0.4, 2.0))


def test_compile_fullgraph(device):
    torch._dynamo.reset()
    student, teacher, target = _problem((6, 70), torch.float32, device, masked=True)
    compiled = torch.compile(fused_ce.distillation_loss, fullgraph=True, backend="aot_eager")
    for temperature in (1.0, 2.0):
        want, want_grad = _loss_and_grad(fused_ce.distillation_loss, student, teacher, torch.tensor(1.0),
                                         kind="jsd", target=target, temperature=temperature)
        got, got_grad = _loss_and_grad(compiled, student, teacher, torch.tensor(1.0), kind="jsd", target=target,
                                       temperature=temperature)
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(got_grad, want_grad)
    torch._dynamo.reset()


def test_no_grad_reaches_the_teacher():
    student, teacher, _ = _problem((3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match="teacher_logits requires grad"):
        fused_ce.distillation_loss(student, teacher.requires_grad_(True))
    with torch.no_grad():  # no grad mode: nothing to refuse
        fused_ce.distillation_loss(student, teacher)


@pytest.mark.parametrize(
    "kwargs, match",
    [(dict(kind="kl"), "kind"), (dict(kind="jsd", beta=1.0), "beta"), (dict(temperature=0.0), "temperature"),
     (dict(reduction="avg"), "reduction"), (dict(alpha=0.5), "needs target"), (dict(alpha=2.0), "alpha")],
)
def test_bad_arguments(kwargs, match):
    student, teacher, _ = _problem((3, 8), torch.float32, "cpu")
    with pytest.raises(ValueError, match=match):
        fused_ce.distillation_loss(student, teacher, **kwargs)
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        fused_ce.distillation_loss(student, teacher[:, :4])


def test_empty_inputs(device):
    for shape in ((0, 10), (2, 0, 10), (3, 0)):
        student = torch.randn(shape, device=device, requires_grad=True)
        loss = fused_ce.distillation_loss(student, torch.randn(shape, device=device), reduction="sum")
        loss.backward()
        assert loss.item() == 0 and student.grad.shape == student.shape
