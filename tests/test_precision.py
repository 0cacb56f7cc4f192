"""Precision and scale.

* float16/bfloat16 no less accurate than PyTorch, and finite where PyTorch overflows;
* more than 2**31 logits (slow: --slow or FUSED_CE_SLOW=1).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.reference import cross_entropy_reference
from utils import run_path

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
