"""Where the time of a training call goes: each fused_ce op alone, against a plain copy.

    python bench/kernel_times.py [--shape 16384x128256] [--dtype bfloat16]

Times (CUDA events, median of --reps after warm-up) the ops that ``cross_entropy``
runs -- the forward kernel alone (evaluation), the fused kernel (loss and gradient in
one call: each row read twice, the gradient written once), the recomputing backward
kernel (one read, one write), the rescale of the gradient rows by the upstream
gradient (skipped in-kernel when it is 1) -- and the public call with ``backward()``,
next to ``dst.copy_(src)`` of the logits (one read, one write). ``passes`` is the time
over a read-only pass at the copy's bandwidth: what an ideal kernel would need is 1
for the forward, 3 for the fused kernel, 2 for the backward. On CUDA by default; on
the CPU (``--device cpu``, wall-clock timing) it only checks that the script runs.

``--threads-per-row auto,1024`` repeats the kernels' rows for each mapping of threads
to a row (``auto``: the built-in table; else through FUSED_CE_CUDA_THREADS_PER_ROW,
see csrc/cuda/launch.cuh), to measure another choice without a rebuild.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import fused_ce


THREADS_ENV = "FUSED_CE_CUDA_THREADS_PER_ROW"


def _time(fn, reps: int, on_cuda: bool, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if not on_cuda:
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="16384x128256")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads-per-row", default="auto", help="comma-separated: auto, 32, 256, 512, 1024")
    args = parser.parse_args()
    mappings = args.threads_per_row.split(",")
    for mapping in mappings:
        if mapping not in ("auto", "32", "256", "512", "1024"):
            parser.error(f"--threads-per-row: {mapping!r} is not auto, 32, 256, 512 or 1024")
    n, v = (int(s) for s in args.shape.split("x"))
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    logits = torch.randn(n, v, device=device).to(dtype)
    target = torch.randint(0, v, (n,), device=device)
    ops = torch.ops.fused_ce
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    row_scale = torch.full((n,), 1.0 / n, device=device, dtype=acc)
    ones = torch.ones(n, device=device, dtype=acc)
    _, lse, mass = ops.cross_entropy_forward(logits, target, None, -100, 0.0, 0.0)
    grad = torch.zeros_like(logits)
    halves = torch.full((n,), 0.5, device=device, dtype=acc)
    copy_dst = torch.empty_like(logits)

    def public_fwd_bwd():
        x = logits.detach().requires_grad_()
        fused_ce.cross_entropy(x, target).backward()

    rows = {
        "copy (read + write)": lambda: copy_dst.copy_(logits),
        "forward kernel": lambda: ops.cross_entropy_forward(logits, target, None, -100, 0.0, 0.0),
        "fused kernel": lambda: ops.cross_entropy_fused(logits, target, None, row_scale, None, -100, 0.0, 0.0),
        "backward kernel": lambda: ops.cross_entropy_backward(logits, target, None, lse, mass * row_scale, row_scale,
                                                              -100, 0.0, 0.0),
        "scale rows by 1 (skipped)": lambda: ops.scale_rows_(grad, ones),
        "scale rows by 0.5": lambda: ops.scale_rows_(grad, halves),
        "cross_entropy + backward()": public_fwd_bwd,
    }
    gbytes = n * v * logits.element_size() / 1e9
    on_cuda = device.type == "cuda"
    copy_ms = _time(rows["copy (read + write)"], args.reps, on_cuda)
    read_ms = copy_ms / 2  # one pass over the logits at the copy's bandwidth
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, logits {n}x{v} {args.dtype} "
          f"({gbytes:.2f} GB); copy: {2 * gbytes / copy_ms * 1e3:.0f} GB/s counted read + write")
    print(f"{'op':28s} {'ms':>8s} {'passes':>7s}")
    # The copy and scale_rows_ (a fixed 256 threads per row) do not depend on the mapping.
    fixed = [name for name in rows if name.startswith(("copy", "scale rows"))]
    for name in fixed:
        ms = copy_ms if name.startswith("copy") else _time(rows[name], args.reps, on_cuda)
        print(f"{name:28s} {ms:8.3f} {ms / read_ms:7.2f}")
    for mapping in mappings:
        if mapping == "auto":
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = mapping
        print(f"threads per row: {mapping}")
        for name, fn in rows.items():
            if name not in fixed:
                ms = _time(fn, args.reps, on_cuda)
                print(f"{name:28s} {ms:8.3f} {ms / read_ms:7.2f}")
    os.environ.pop(THREADS_ENV, None)


if __name__ == "__main__":
    main()
