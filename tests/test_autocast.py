"""One rule for the loss's dtype under torch.autocast, on every public function.

``F.cross_entropy`` runs in float32 under autocast, so its loss is float32 whatever the
logits' dtype; fused_ce's functions return float32 there too (the kernels still read
fp16/bf16 logits as they are), and outside autocast the input's dtype, unless
``loss_dtype`` asks for another. The linear functions run their matmuls in autocast's
dtype, as ``F.linear`` would.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce

LOW = [torch.bfloat16, torch.float16]


def _autocast(device, dtype):
    return torch.autocast(device, dtype=dtype)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_cross_entropy_and_focal_loss(device, dtype, reduction):
    logits = torch.randn(9, 31, device=device).to(dtype)
    target = torch.randint(0, 31, (9,), device=device)
    with _autocast(device, dtype):
        want_dtype = F.cross_entropy(logits, target, reduction=reduction).dtype
        ce = fused_ce.cross_entropy(logits, target, reduction=reduction)
        focal = fused_ce.focal_loss(logits, target, reduction=reduction)
    assert want_dtype == torch.float32
    assert ce.dtype == focal.dtype == torch.float32
    # The same numbers as asking for float32 outside autocast.
    assert torch.equal(ce, fused_ce.cross_entropy(logits, target, reduction=reduction, loss_dtype=torch.float32))
    assert torch.equal(focal, fused_ce.focal_loss(logits, target, reduction=reduction, loss_dtype=torch.float32))
    # Outside autocast: the input's dtype, as F.cross_entropy.
    assert fused_ce.cross_entropy(logits, target, reduction=reduction).dtype == dtype


def test_float64_is_left_alone(device):
    logits = torch.randn(4, 7, device=device, dtype=torch.float64)
    target = torch.randint(0, 7, (4,), device=device)
    with _autocast(device, torch.bfloat16):
        assert fused_ce.cross_entropy(logits, target).dtype == torch.float64
        assert fused_ce.entropy(logits).dtype == torch.float64


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_cross_entropy(device, reduction):
    x = torch.randn(11, 8, device=device, requires_grad=True)
    w = torch.randn(40, 8, device=device, requires_grad=True)
    target = torch.randint(0, 40, (11,), device=device)
    with _autocast(device, torch.bfloat16):
        loss = fused_ce.linear_cross_entropy(x, w, target, reduction=reduction)
        want_dtype = F.cross_entropy(F.linear(x, w), target, reduction=reduction).dtype
    assert loss.dtype == want_dtype == torch.float32
    cast_first = fused_ce.linear_cross_entropy(x.bfloat16(), w.bfloat16(), target, reduction=reduction,
                                               loss_dtype=torch.float32)
    assert torch.equal(loss, cast_first)


def test_loss_dtype_must_be_a_floating_dtype():
    logits, target = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    for bad in (torch.int32, "float32"):
        with pytest.raises(fused_ce.ArgumentTypeError, match="loss_dtype"):
            fused_ce.cross_entropy(logits, target, loss_dtype=bad)
