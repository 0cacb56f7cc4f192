"""Shared fixtures: the devices to test on, per-test seeding, and the validation switch.

Every test that takes ``device`` runs on "cpu" and on "cuda"; without a GPU (or
without fused_ce's CUDA kernels) the CUDA twin is reported as skipped, so a CPU-only
run still shows what it did not cover.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

import fused_ce
import fused_ce._checks

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
    saved = fused_ce._checks.target_validation()
    yield
    fused_ce.set_target_validation(saved)


# -- budgets: property-based examples and slow tests ------------------------------------------
#
# CI runs a bounded, derandomised hypothesis budget (the same examples every run) and
# skips the tests marked `slow`. A thorough run raises both:
#
#     pytest tests --hypothesis-examples=2000 --slow
#     FUSED_CE_HYPOTHESIS_EXAMPLES=2000 FUSED_CE_SLOW=1 pytest tests
#
# With an explicit budget the examples are drawn at random (a failure prints the
# `@reproduce_failure` blob and seed to replay it).


def pytest_addoption(parser):
    group = parser.getgroup("fused_ce")
    group.addoption(
        "--hypothesis-examples",
        type=int,
        default=None,
        help="examples per property-based test (default: each test's CI budget, derandomised); "
        "also FUSED_CE_HYPOTHESIS_EXAMPLES",
    )
    group.addoption(
        "--slow", action="store_true", default=False, help="run the tests marked slow (also FUSED_CE_SLOW=1)"
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long or memory-hungry; runs only with --slow or FUSED_CE_SLOW=1")
    examples = config.getoption("--hypothesis-examples", default=None)
    if examples is not None:
        # Read by the property-based test modules when they are imported (after this hook).
        os.environ["FUSED_CE_HYPOTHESIS_EXAMPLES"] = str(examples)


def run_slow(config) -> bool:
    return bool(config.getoption("--slow", default=False)) or os.environ.get("FUSED_CE_SLOW", "0") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    if run_slow(config):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow or FUSED_CE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
