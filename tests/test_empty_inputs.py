"""Zero-size inputs, in every layout PyTorch accepts, on every public function.

No rows (N = 0), an empty spatial dimension (d1 = 0 in (N, C, d1)), and views whose
class dimension has no unit stride (a transposed or sliced empty tensor): the result is
PyTorch's ('none' empty, 'sum' 0, 'mean' NaN) and backward gives an empty gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import fused_ce

REDUCTIONS = ("none", "mean", "sum")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _layouts(device, dtype):
    """Empty logits in F.cross_entropy's layouts: name -> (logits, class-index target shape)."""
    def make(*shape):
        return torch.randn(shape, device=device).to(dtype)

    return {
        "rows": (make(0, 7), (0,)),
        "transposed": (make(7, 0).t(), (0,)),
        "sliced_classes": (make(0, 14)[:, ::2], (0,)),
        "rows_sliced": (make(4, 7)[4:], (0,)),
        "no_positions": (make(3, 7, 0), (3, 0)),
        "no_rows_with_positions": (make(0, 7, 5), (0, 5)),
        "positions_sliced": (make(3, 14, 4)[:, ::2, :0], (3, 0)),
    }


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cross_entropy(device, dtype, kind, reduction):
    for name, (logits, target_shape) in _layouts(device, dtype).items():
        if kind == "index":
            target = torch.zeros(target_shape, dtype=torch.long, device=device)
        else:
            target = torch.rand(logits.shape, device=device).to(dtype).transpose(0, -1).contiguous().transpose(0, -1)
        x = logits.detach().requires_grad_(True)
        got = fused_ce.cross_entropy(x, target, reduction=reduction)
        want = F.cross_entropy(logits.float(), target if kind == "index" else target.float(), reduction=reduction)
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.float(), want, equal_nan=True, msg=name)
        got.sum().backward()
        assert x.grad.shape == x.shape, name


@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_training_path(device, inplace):
    for name, (logits, target_shape) in _layouts(device, torch.float32).items():
        leaf = logits.detach().requires_grad_(True)
        x = leaf * 1.0  # not a leaf: inplace_backward may write over it
        loss = fused_ce.cross_entropy(x, torch.zeros(target_shape, dtype=torch.long, device=device),
                                      inplace_backward=inplace, reduction="sum")
        loss.backward()
        assert loss.item() == 0 and leaf.grad.shape == leaf.shape, name


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_loss(device, reduction):
    for name, (logits, target_shape) in _layouts(device, torch.float32).items():
        x = logits.detach().requires_grad_(True)
        got = fused_ce.focal_loss(x, torch.zeros(target_shape, dtype=torch.long, device=device), gamma=0.5,
                                  reduction=reduction)
        assert got.shape == (target_shape if reduction == "none" else ()), name
        if reduction != "none":
            assert math.isnan(got.item()) if reduction == "mean" else got.item() == 0, name
        got.sum().backward()
        assert x.grad.shape == x.shape, name


def test_entropy(device):
    for logits in (torch.randn(0, 9, device=device), torch.randn(9, 0, device=device).t(),
                   torch.randn(0, 18, device=device)[:, ::2], torch.randn(2, 0, 9, device=device)):
        x = logits.requires_grad_(True) if logits.is_leaf else logits.detach().requires_grad_(True)
        got = fused_ce.entropy(x)
        assert got.shape == x.shape[:-1]
        got.sum().backward()
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy(device, dtype, reduction):
    cases = {
        "no_rows": (torch.randn(0, 6), torch.randn(11, 6), torch.zeros(0, dtype=torch.long)),
        "no_positions": (torch.randn(2, 0, 6), torch.randn(11, 6), torch.zeros(2, 0, dtype=torch.long)),
        "no_features": (torch.randn(4, 0), torch.randn(11, 0), torch.zeros(4, dtype=torch.long)),
        "no_rows_no_classes": (torch.randn(0, 6), torch.randn(0, 6), torch.zeros(0, dtype=torch.long)),
        "sliced_rows": (torch.randn(4, 12)[4:, ::2], torch.randn(11, 6), torch.zeros(0, dtype=torch.long)),
    }
    for name, (x, w, target) in cases.items():
        x = x.to(device=device, dtype=dtype).requires_grad_(True)
        w = w.to(device=device, dtype=dtype).requires_grad_(True)
        target = target.to(device)
        got = fused_ce.linear_cross_entropy(x, w, target, reduction=reduction)
        logits = F.linear(x.float(), w.float())
        want = F.cross_entropy(logits.reshape(math.prod(x.shape[:-1]), w.shape[0]), target.reshape(-1),
                               reduction=reduction)
        torch.testing.assert_close(got.float().reshape(-1), want.reshape(-1), equal_nan=True, atol=1e-2, rtol=1e-2,
                                   msg=name)
        got.sum().backward()
        assert x.grad.shape == x.shape and w.grad.shape == w.shape, name
