"""slice_cross_entropy: the parts of a vocabulary cut into slices sum to the full loss and gradient."""

from __future__ import annotations

import itertools

import pytest
import torch

import fused_ce
from fused_ce.reference import torch_cross_entropy

SLICES = [0, 7, 8, 30]  # uneven, one of a single class


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("options", [{}, dict(label_smoothing=0.2), dict(softcap=3.0), dict(ignore_index=5)],
                         ids=["plain", "smoothing", "softcap", "ignore_class"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_parts_sum_to_the_full_loss_and_gradient(device, dtype, options, reduction):
    full = (3 * torch.randn(4, 6, SLICES[-1], device=device, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, SLICES[-1], (4, 6), device=device)
    target[0, :3] = options.get("ignore_index", -100)
    x = full.detach().requires_grad_(True)
    cap = options.get("softcap")
    z = (cap * torch.tanh(x.double() / cap)) if cap else x.double()  # the caller's own lse of the rest
    total = 0
    for start, stop in itertools.pairwise(SLICES):
        rest = torch.cat([z[..., :start], z[..., stop:]], dim=-1)
        lse_rest = torch.logsumexp(rest, dim=-1) if rest.shape[-1] else torch.full(z.shape[:-1], -torch.inf)
        total = total + fused_ce.slice_cross_entropy(
            x[..., start:stop], target, lse_rest, vocab_start=start, vocab_total=SLICES[-1], reduction=reduction,
            loss_dtype=torch.float64, **options,
        )
    x_ref = full.detach().double().requires_grad_(True)
    want = torch_cross_entropy(x_ref.movedim(-1, 1), target, reduction=reduction, **options)
    tol = dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(total, want, **tol)
    upstream = torch.rand_like(want)
    (got_grad,) = torch.autograd.grad(total, x, upstream)
    (want_grad,) = torch.autograd.grad(want, x_ref, upstream)
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_grad.double(), want_grad, **grad_tol)


def test_bad_slice_arguments():
    logits, target, rest = torch.randn(3, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3)
    with pytest.raises(ValueError, match="vocab_total"):
        fused_ce.slice_cross_entropy(logits, target, rest, vocab_start=2, vocab_total=5)
    with pytest.raises(ValueError, match="lse_rest must have shape"):
        fused_ce.slice_cross_entropy(logits, target, rest[:2], vocab_start=0, vocab_total=8)
    with pytest.raises(TypeError, match="class indices"):
        fused_ce.slice_cross_entropy(logits, logits, rest, vocab_start=0, vocab_total=8)
