"""Shared fixtures: the devices to test on, per-test seeding, and the validation switch.

Every test that takes ``device`` runs on "cpu" and on "cuda"; without a GPU (or
without fused_ce's CUDA kernels) the CUDA twin is reported as skipped, so a CPU-only
run still shows what it did not cover.
"""

from __future__ import annotations

import zlib

import pytest
import torch

import fused_ce
import fused_ce.functional

HAS_CUDA = torch.cuda.is_available() and fused_ce.cuda_kernels_available()
_NO_CUDA = "needs a CUDA GPU and a fused_ce build with its CUDA kernels"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA)

DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture(params=[pytest.param("cuda", id="cuda", marks=requires_cuda)])
def cuda_device(request) -> str:
    """For behaviour only the CUDA path has; always a (possibly skipped) test, never dropped."""
    return request.param


@pytest.fixture(autouse=True)
def _seed(request):
    # A seed per test id: reproducible on its own (pytest -k), and the parametrised
    # cases don't all draw the same numbers.
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    yield


@pytest.fixture(autouse=True)
def _restore_target_validation():
    # A test that turns CUDA target validation on must not change the others.
    saved = fused_ce.functional._validate_targets
    yield
    fused_ce.set_target_validation(saved)
