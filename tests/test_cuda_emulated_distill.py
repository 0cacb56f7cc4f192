"""The CUDA distillation kernels (csrc/cuda/distill.cuh), run on the CPU thread by thread.

tests/cuda_emulator/cuda_shim.h makes every CUDA thread a std::thread, so the kernels'
indexing, block merges and barriers are checked on machines without a GPU, against the
CPU kernels (which test_distill.py holds to float64 references).
"""

import pytest
import torch

import fused_ce  # noqa: F401 -- registers the CPU ops used as the reference here
from utils import load_emulator


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return load_emulator("fused_ce_cuda_emulator_distill", "distill_emulator.cpp", tmp_path_factory)


@pytest.mark.parametrize("kind", [0, 1, 2], ids=["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("v", [1, 255, 700])  # below, around and above one pass of 256 threads
def test_matches_the_cpu_kernels(emulator, kind, dtype, v):
    g = torch.Generator().manual_seed(v)
    student = (2 * torch.randn(3, v + 2, generator=g, dtype=torch.float64)).to(dtype)[:, 1:-1]  # unaligned rows
    teacher = (3 * torch.randn(3, v, generator=g, dtype=torch.float64)).to(dtype)
    if v > 10:
        student[0, :4] = teacher[0, :4] = -torch.inf  # masked vocabulary
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    grad_loss = torch.tensor([0.5, 0.0, 2.0], dtype=acc)  # a zero upstream: a zero row
    got = emulator.distill(student, teacher, grad_loss, kind, 0.3, 1.7)
    want = torch.ops.fused_ce.distill_forward(student, teacher, kind, 0.3, 1.7)
    want_grad = torch.ops.fused_ce.distill_backward(student, teacher, want[1], want[2], want[3], grad_loss, kind,
                                                    0.3, 1.7)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for name, a, b in zip(("loss", "aux", "lse_student", "lse_teacher"), got[:4], want):
        torch.testing.assert_close(a, b, **tol, msg=name)
    grad_tol = tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(got[4], want_grad, **grad_tol)
    assert bool((got[4][1] == 0).all())
