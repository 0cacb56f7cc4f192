"""The in-place gradient (inplace_backward=True): every layout of the logits, and the refusals.

It refuses what it cannot do (a leaf or a view of one, rows that share memory) before
it writes anything.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce

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
