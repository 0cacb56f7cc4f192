"""return_stats=True: the per-token statistics tracked in the loss's own pass."""

from __future__ import annotations

import math

import pytest
import torch

import fused_ce
from utils import run_path

PATHS = ["forward", "fused", "inplace"]


def _problem(seed=0, n=12, v=50, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, v, generator=g)).to(dtype)
    target = torch.randint(0, v, (n,), generator=g)
    target[::4] = -100
    target[1] = int(x[1].float().argmax())  # at least one hit
    return x.to(device), target.to(device)


def _stats(x, target, path, **kwargs):
    """The stats of one call on one execution path (the loss's gradient taken as run_path does)."""
    leaf = x.detach().clone().requires_grad_(path != "forward")
    with torch.set_grad_enabled(path != "forward"):
        inp = leaf * 1 if path == "inplace" else leaf
        stats = fused_ce.cross_entropy(inp, target, return_stats=True, inplace_backward=path == "inplace", **kwargs)
    grad = None if path == "forward" else torch.autograd.grad(stats.loss.sum(), leaf)[0]
    return stats, grad


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("kwargs", [{}, dict(z_loss=1e-2, label_smoothing=0.1), dict(softcap=2.0, temperature=0.5),
                                    dict(reduction="none"), dict(reduction="sum", weight=torch.rand(50) + 0.5)],
                         ids=["plain", "zloss_smoothing", "softcap_temperature", "none", "sum_weight"])
def test_loss_and_gradient_bitwise_unchanged(device, path, kwargs):
    x, target = _problem(device=device)
    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    stats, grad = _stats(x, target, path, **kwargs)
    loss, want_grad = run_path(fused_ce.cross_entropy, x, target, path, **kwargs)
    assert torch.equal(stats.loss.detach(), loss)
    if grad is not None:
        assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("v", [50, 3001, 20000])  # on CUDA: a warp, 256 and 512 threads per row
def test_predicted_is_torch_argmax_and_accuracy_counts_the_counted_rows(device, path, dtype, v):
    x, target = _problem(dtype=dtype, v=v, device=device)
    x[2, 7] = x[2, v - 9] = x[2].max() + 1  # a tie: the lower index
    x[3, :] = -math.inf  # all masked: 0, as torch.argmax
    x[5, v - 11] = math.nan  # a NaN is the largest; the first
    x[5, 30] = math.nan
    x[6, 40:] = -math.inf
    x[7, :] = x[7].max()  # all tied: 0
    stats, _ = _stats(x, target, path)
    assert stats.predicted.dtype == torch.long
    assert torch.equal(stats.predicted, torch.argmax(x, dim=1))
    counted = target != -100
    want = ((torch.argmax(x, 1) == target) & counted).sum() / counted.sum()
    assert stats.accuracy.dtype == torch.float32
    torch.testing.assert_close(stats.accuracy, want.float())


def test_lse_and_z_loss_part(device):
    x, target = _problem(v=300, device=device)
    stats = fused_ce.cross_entropy(x, target, z_loss=1e-2, temperature=2.0, return_stats=True)
    torch.testing.assert_close(stats.lse, torch.logsumexp(x / 2.0, 1))
    without = fused_ce.cross_entropy(x, target, temperature=2.0)
    torch.testing.assert_close(stats.z_loss, stats.loss - without)
    none = fused_ce.cross_entropy(x, target, z_loss=1e-2, reduction="none", return_stats=True)
    assert none.z_loss.shape == target.shape and bool((none.z_loss[target == -100] == 0).all())


def test_layouts_and_edge_cases():
    x = torch.randn(2, 7, 3)  # (N, C, d1): classes in dimension 1
    target = torch.randint(0, 7, (2, 3))
    stats = fused_ce.cross_entropy(x, target, return_stats=True, reduction="none")
    assert torch.equal(stats.predicted, x.argmax(1)) and stats.lse.shape == (2, 3)
    probs = fused_ce.cross_entropy(torch.randn(4, 5), torch.rand(4, 5).softmax(1), return_stats=True)
    assert math.isnan(probs.accuracy.item())
    ignored = fused_ce.cross_entropy(torch.randn(3, 5), torch.full((3,), -100), return_stats=True)
    assert math.isnan(ignored.accuracy.item()) and math.isnan(ignored.loss.item())
    empty = fused_ce.cross_entropy(torch.randn(0, 5), torch.zeros(0, dtype=torch.long), return_stats=True)
    assert empty.predicted.shape == (0,) and math.isnan(empty.accuracy.item())
    with pytest.raises(ValueError, match="return_stats"):
        fused_ce.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), return_stats=True,
                               return_lse=True)


def test_compile_fullgraph():
    torch._dynamo.reset()
    x, target = _problem()
    compiled = torch.compile(lambda a, b: fused_ce.cross_entropy(a, b, return_stats=True), fullgraph=True,
                             backend="aot_eager")
    got = compiled(x.requires_grad_(True), target)
    want = fused_ce.cross_entropy(x, target, return_stats=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, equal_nan=True)
    torch._dynamo.reset()


def test_opcheck_of_the_stats_overloads():
    x, target = _problem()
    rows = torch.ones(12)
    options = (-100, 0.1, 0.0, 0, -1, 1.0, 2.0)
    torch.library.opcheck(torch.ops.fused_ce.cross_entropy_forward.stats, (x.requires_grad_(True), target, None,
                                                                            *options))
    torch.library.opcheck(torch.ops.fused_ce.cross_entropy_fused.stats, (x, target, None, rows, None, *options))


@pytest.mark.parametrize("chunk_size", [None, 3, (4, 16), (None, 32)], ids=["default", "rows3", "blocks", "allrows"])
@pytest.mark.parametrize("grad", [False, True])
def test_linear_cross_entropy(device, chunk_size, grad):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(3, 6, 8, generator=g).to(device).requires_grad_(grad)
    w = torch.randn(40, 8, generator=g).to(device).requires_grad_(grad)
    target = torch.randint(0, 40, (3, 6), generator=g).to(device)
    target[0] = -100
    with torch.set_grad_enabled(grad):
        stats = fused_ce.linear_cross_entropy(h, w, target, chunk_size=chunk_size, z_loss=1e-3, return_stats=True)
        loss = fused_ce.linear_cross_entropy(h, w, target, chunk_size=chunk_size, z_loss=1e-3)
    logits = (h @ w.T).detach()
    assert torch.equal(stats.loss.detach(), loss.detach())
    assert torch.equal(stats.predicted, logits.argmax(-1))
    torch.testing.assert_close(stats.lse, torch.logsumexp(logits, -1))
    counted = target != -100
    torch.testing.assert_close(stats.accuracy, ((logits.argmax(-1) == target) & counted).sum() / counted.sum())
    if grad:
        (g_with,) = torch.autograd.grad(stats.loss, h)
        (g_without,) = torch.autograd.grad(loss, h)
        assert torch.equal(g_with, g_without)


def test_linear_shift_keeps_the_predicting_positions():
    h, w = torch.randn(2, 5, 8), torch.randn(30, 8)
    target = torch.randint(0, 30, (2, 5))
    stats = fused_ce.linear_cross_entropy(h, w, target, shift=1, reduction="none", return_stats=True)
    assert stats.loss.shape == stats.predicted.shape == stats.lse.shape == (2, 4)
    assert torch.equal(stats.predicted, (h @ w.T)[:, :-1].argmax(-1))
