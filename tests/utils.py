"""Helpers the test modules share: error measures, dtype names, the execution paths of cross_entropy."""

from __future__ import annotations

import math

import torch

import fused_ce

FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_id(dtype: torch.dtype) -> str:
    """A test id for a dtype: 'float32', 'bfloat16', ..."""
    return str(dtype).removeprefix("torch.")


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| where expected is not NaN (0 when nothing is compared)."""
    keep = ~expected.isnan()
    if not bool(keep.any()):
        return 0.0
    diff = (actual.to(torch.float64) - expected)[keep].abs()
    return float(diff.max()) if diff.numel() else 0.0


PATHS = ["forward", "fused", "inplace", "return_lse"]


def run_path(fn, x, target, path, upstream=None, device=None, **kwargs):
    """Loss (detached) and d(loss . upstream)/dx on one execution path of fused_ce.

    forward: no grad (the two-pass kernels' forward); fused: the gradient is computed in
    the forward pass; inplace: ... and written over the logits (an intermediate tensor);
    return_lse: the two-pass path (statistics forward, gradient in backward).
    `fn` may be F.cross_entropy, for which every path is the plain call. With `device`,
    the inputs are moved there and the results back to the CPU.
    """
    if device is not None:
        x, target = x.to(device), target.to(device)
        upstream = None if upstream is None else upstream.to(device)
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        loss, grad = run_path(fn, x, target, path, upstream, **kwargs)
        return loss.cpu(), None if grad is None else grad.cpu()
    is_fused = fn is fused_ce.cross_entropy
    leaf = x.detach().clone().requires_grad_(path != "forward")
    with torch.set_grad_enabled(path != "forward"):
        inp = leaf * 1 if path == "inplace" else leaf
        extra = {}
        if is_fused and path == "inplace":
            extra["inplace_backward"] = True
        if is_fused and path == "return_lse":
            extra["return_lse"] = True
        if not is_fused and not target.is_floating_point():
            target = target.long()
        out = fn(inp, target, **kwargs, **extra)
        loss = out[0] if isinstance(out, tuple) else out
    if path == "forward":
        return loss, None
    u = torch.ones_like(loss) if upstream is None else upstream.to(loss.dtype)
    (grad,) = torch.autograd.grad(loss, leaf, u)
    return loss.detach(), grad


def assert_same_as_torch(actual, expected, what, rtol=2e-5, atol=2e-6):
    assert actual.shape == expected.shape, what
    assert torch.equal(actual.isnan(), expected.isnan()), (
        f"{what}: NaN at {actual.isnan().nonzero().tolist()}, PyTorch's at {expected.isnan().nonzero().tolist()}"
    )
    assert torch.equal(actual == math.inf, expected == math.inf), f"{what}: +inf at other positions than PyTorch's"
    assert torch.equal(actual == -math.inf, expected == -math.inf), f"{what}: -inf at other positions than PyTorch's"
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def load_emulator(name: str, source: str, tmp_path_factory):
    """Builds one of tests/cuda_emulator's modules (CUDA kernels run on the CPU, thread by thread).

    FUSED_CE_EMULATOR_BUILD names a build directory to reuse between runs.
    """
    import os
    import pathlib

    from torch.utils.cpp_extension import load

    root = pathlib.Path(__file__).resolve().parent.parent
    build = os.environ.get("FUSED_CE_EMULATOR_BUILD") or str(tmp_path_factory.mktemp(name))
    return load(
        name,
        [str(root / "tests" / "cuda_emulator" / source)],
        extra_include_paths=[str(root / "csrc"), str(root / "tests" / "cuda_emulator")],
        extra_cflags=["-O1", "-std=c++20"],
        build_directory=build,
        verbose=False,
    )
