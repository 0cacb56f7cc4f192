"""PyTorch's own samples for ``nn.functional.cross_entropy`` (its OpInfo), through fused_ce.

``torch.testing._internal.common_methods_invocations`` holds the inputs PyTorch tests
``F.cross_entropy`` with: every layout, reduction, weights, ignore_index, probability
targets. Each goes through both functions; values and gradients must agree.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_ce

common_methods_invocations = pytest.importorskip(
    "torch.testing._internal.common_methods_invocations", reason="needs expecttest (pip install -e .[test])"
)

OPINFO = next(op for op in common_methods_invocations.op_db if op.name == "nn.functional.cross_entropy")
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=4e-3, atol=4e-3),
}


def _samples(device, dtype):
    return list(OPINFO.sample_inputs(device, dtype, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_opinfo_samples_forward_and_backward(device, dtype):
    samples = _samples(device, dtype)
    assert samples, "PyTorch's OpInfo gave no samples"
    for i, sample in enumerate(samples):
        what = f"sample {i}: input {tuple(sample.input.shape)}, kwargs {sample.kwargs}"
        x = sample.input.detach().requires_grad_(True)
        got = fused_ce.cross_entropy(x, *sample.args, **sample.kwargs)
        # PyTorch's reference in float64 (its own fp16/bf16 rounds more than fused_ce's fp32 math).
        x64 = sample.input.detach().double().requires_grad_(True)
        args64 = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in sample.args]
        kwargs64 = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in sample.kwargs.items()}
        want = F.cross_entropy(x64, *args64, **kwargs64)
        assert got.shape == want.shape and got.dtype == dtype, what
        torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype], msg=what)
        upstream = torch.linspace(0.5, 1.5, want.numel(), dtype=torch.float64, device=device).reshape(want.shape)
        (got_grad,) = torch.autograd.grad(got, x, upstream.to(got.dtype))
        (want_grad,) = torch.autograd.grad(want, x64, upstream)
        torch.testing.assert_close(got_grad.double(), want_grad, **TOLERANCES[dtype], msg=what)
