"""temperature and logit_scale: the loss of softcap(logit_scale * x) / temperature, inside the kernels.

Every function that takes them against the float64 reference, on every execution path,
with the other options; gradcheck; the order "cap, then temperature".
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce
from fused_ce.reference import cross_entropy_reference, entropy_reference
from utils import PATHS, dtype_id, run_path

MAPS = {
    "temperature": dict(temperature=2.5),
    "cold": dict(temperature=0.4),
    "scale": dict(logit_scale=0.6),
    "scale_cap_temperature": dict(logit_scale=1.7, softcap=4.0, temperature=1.5),
}
TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-3),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("extras", [{}, dict(label_smoothing=0.1, z_loss=1e-3), dict(weight=True, ignore=True)],
                         ids=["plain", "smoothing_zloss", "weight_ignore"])
@pytest.mark.parametrize("logit_map", list(MAPS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=dtype_id)
def test_cross_entropy_matches_reference(device, dtype, logit_map, extras, path):
    g = torch.Generator().manual_seed(3)
    x = (3 * torch.randn(9, 70, generator=g, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, 70, (9,), generator=g)
    kwargs = dict(MAPS[logit_map], reduction="mean")
    extras = dict(extras)
    if extras.pop("weight", False):
        kwargs["weight"] = torch.rand(70, generator=g, dtype=torch.float64).add(0.5).to(
            torch.float64 if dtype == torch.float64 else torch.float32)
    if extras.pop("ignore", False):
        target[::3] = -100
    kwargs.update(extras)
    upstream = torch.tensor(0.7, dtype=torch.float64)
    loss, grad = run_path(fused_ce.cross_entropy, x, target, path, upstream, device=device, **kwargs)
    kw64 = {k: v.double() if torch.is_tensor(v) else v for k, v in kwargs.items()}
    want, want_grad = run_path(cross_entropy_reference, x.double(), target, "fused", upstream, **kw64)
    torch.testing.assert_close(loss.double(), want, **TOLERANCES[dtype])
    if grad is not None:
        torch.testing.assert_close(grad.double(), want_grad, **TOLERANCES[dtype])


def test_cap_then_temperature():
    # The documented order: the soft-cap acts on the scaled logits, the temperature divides its output.
    x, target = torch.randn(4, 30, dtype=torch.float64) * 8, torch.randint(0, 30, (4,))
    got = fused_ce.cross_entropy(x, target, softcap=5.0, temperature=2.0, logit_scale=1.5, reduction="none")
    want = F.cross_entropy(5.0 * torch.tanh(1.5 * x / 5.0) / 2.0, target, reduction="none")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_entropy(device, temperature):
    x = (torch.randn(7, 300, dtype=torch.float64) * 4).to(device).requires_grad_(True)
    got = fused_ce.entropy(x, temperature=temperature)
    torch.testing.assert_close(got, entropy_reference(x.detach(), temperature))
    assert torch.autograd.gradcheck(lambda t: fused_ce.entropy(t, temperature=temperature), (x[:3, :20].detach()
                                                                                          .clone().requires_grad_(),))


@pytest.mark.parametrize("logit_map", list(MAPS))
def test_linear_and_slices(device, logit_map):
    g = torch.Generator().manual_seed(5)
    h = torch.randn(2, 5, 8, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(40, 8, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    target = torch.randint(0, 40, (2, 5), generator=g).to(device)
    kwargs = MAPS[logit_map]
    got = fused_ce.linear_cross_entropy(h, w, target, chunk_size=(4, 16), **kwargs)
    want = cross_entropy_reference((h @ w.T).movedim(-1, 1), target, **kwargs)
    torch.testing.assert_close(got, want)
    gh, gw = torch.autograd.grad(got, (h, w))
    wh, ww = torch.autograd.grad(want, (h, w))
    torch.testing.assert_close(gh, wh)
    torch.testing.assert_close(gw, ww)
    # A vocabulary cut in two slices: lse_rest of the other's mapped logits.
    logits = (h @ w.T).detach()
    z = fused_ce.ops.mapped_logits(logits, kwargs.get("softcap", 0.0), kwargs.get("logit_scale", 1.0),
                                   kwargs.get("temperature", 1.0), torch.float64)
    parts = sum(
        fused_ce.slice_cross_entropy(logits[..., a:b], target, torch.logsumexp(torch.cat([z[..., :a], z[..., b:]], -1),
                                                                               -1),
                                     vocab_start=a, vocab_total=40, reduction="mean", **kwargs)
        for a, b in ((0, 13), (13, 40))
    )
    torch.testing.assert_close(parts, want.detach())


def test_gradcheck_every_path_and_option():
    x = torch.randn(4, 11, dtype=torch.float64, requires_grad=True)
    target = torch.tensor([0, 3, -100, 10])
    for kwargs in MAPS.values():
        fn = lambda t, kw=kwargs: fused_ce.cross_entropy(t * 1.0, target, z_loss=1e-2, label_smoothing=0.1, **kw)
        assert torch.autograd.gradcheck(fn, (x,))
        assert torch.autograd.gradgradcheck(fn, (x,))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_values(bad):
    x, target = torch.randn(3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        fused_ce.cross_entropy(x, target, temperature=bad)
    with pytest.raises(ValueError, match="logit_scale"):
        fused_ce.cross_entropy(x, target, logit_scale=bad)
    with pytest.raises(ValueError, match="temperature"):
        fused_ce.entropy(x, temperature=bad)
