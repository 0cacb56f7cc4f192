"""Allocations of fused_ce.linear's fused op under CUDA's fp16/bf16 plans, counted on the CPU.

CUDA's dtypes and plan are forced (bf16 blocks, the CUDA plan table) and a
TorchDispatchMode tracks the bytes of every storage the op's torch calls create
while they live; the peak is printed per plan. Storages of the inputs, first seen
through a slice, are listed too but are not allocations. (A check of the all-rows
plan's memory without a GPU; its CUDA twin is test_default_plan_memory_on_cuda.)

    PYTHONPATH=. python bench/results/cpu-2026-11-28/linear_plan_memory.py
"""

import os
import weakref

import torch
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

import fused_ce.linear as L

os.environ["FUSED_CE_LINEAR_CHUNK_MB"] = "64"
L.compute_dtype = lambda dtype, device: dtype  # CUDA's dtypes on the CPU
L._device_key = lambda device: "cuda"  # and CUDA's plan


class Track(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live, self.origin, self.cur, self.peak, self.at = {}, {}, 0, 0, []

    def add(self, t, func):
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self.live or st.nbytes() == 0:
            return
        self.live[key] = st.nbytes()
        self.origin[key] = (str(func), tuple(t.shape), t.dtype)
        self.cur += st.nbytes()
        if self.cur > self.peak:
            self.peak = self.cur
            self.at = sorted(((n, self.origin[k]) for k, n in self.live.items()), key=lambda z: -z[0])[:6]

        def free(k=key, n=st.nbytes()):
            if self.live.pop(k, None) is not None:
                self.cur -= n

        weakref.finalize(st, free)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t, func)
        return out


n, d, v = 4096, 256, 65536
x, w = torch.randn(n, d, dtype=torch.bfloat16), torch.randn(v, d, dtype=torch.bfloat16)
t = torch.randint(0, v, (n,))
print(f"N x D x V = {n} x {d} x {v} bf16, budget 64 MiB")
for chunk_size in (None, 512):
    plan = L.chunk_plan(v, x.dtype, torch.device("cuda"), chunk_size)
    head = L.Head(x, w, None, t, None, -100, 0.0, 0.0, plan[0], classes=plan[1])
    mode = Track()
    with mode:
        out = L.fused_objective_and_gradients(head, torch.full((n,), 1 / n), None, (True, True, False))
    inputs = sum(nb for nb, (func, *_ ) in mode.at if "slice" in func)
    print(f"plan {plan}: peak {mode.peak / 2**20:.1f} MiB, of which inputs' storages {inputs / 2**20:.1f} MiB "
          f"-> allocated {(mode.peak - inputs) / 2**20:.1f} MiB; grads {out[3].dtype}, {out[4].dtype}")
    for nbytes, origin in mode.at:
        print(f"    {nbytes / 2**20:7.1f} MiB  {origin}")
