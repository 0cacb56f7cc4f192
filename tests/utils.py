"""Helpers the test modules share: error measures and dtype names."""

from __future__ import annotations

import torch

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
