"""Where the time of a training call goes: each fused_ce op alone, against a plain copy.

    python bench/kernel_times.py [--shape 16384x128256] [--dtype bfloat16]

Times (``harness.time_interleaved``: CUDA events, the ops interleaved, median of
--reps after --warmup) the ops that ``cross_entropy`` runs -- the forward kernel
alone (evaluation), the fused kernel (loss and gradient in one call: each row read
twice, the gradient written once), the recomputing backward kernel (one read, one
write), the rescale of the gradient rows by the upstream gradient (skipped in-kernel
when it is 1) -- and the public call with ``backward()``, next to ``dst.copy_(src)``
of the logits (one read, one write). ``passes`` is the time over a read-only pass at
the copy's bandwidth: what an ideal kernel would need is 1 for the forward, 3 for the
fused kernel, 2 for the backward. On CUDA by default; on the CPU (``--device cpu``,
wall-clock timing) it only checks that the script runs.

``--threads-per-row auto,1024`` repeats the kernels' rows for each mapping of threads
to a row (``auto``: the built-in table; else through FUSED_CE_CUDA_THREADS_PER_ROW,
see csrc/cuda/launch.cuh), to measure another choice without a rebuild.
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections.abc import Sequence

import torch

import fused_ce
import harness

THREADS_ENV = "FUSED_CE_CUDA_THREADS_PER_ROW"
MAPPINGS = ("auto", "32", "256", "512", "1024")
COPY = "copy (read + write)"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=harness.shape_type("NxV", "16384x128256"), default=(16384, 128256))
    parser.add_argument("--dtype", type=harness.parse_dtype, default=torch.bfloat16)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    harness.add_device_argument(parser)
    parser.add_argument(
        "--threads-per-row",
        type=lambda text: harness.parse_choices(text, MAPPINGS, "mapping(s)"),
        default=["auto"],
        help="comma-separated: auto, 32, 256, 512, 1024",
    )
    args = parser.parse_args(argv)
    device = harness.resolve_device(parser, args.device)
    (n, v), dtype = args.shape, args.dtype
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
    x = logits.detach().requires_grad_()

    def drop_grad():
        x.grad = None

    # The copy and scale_rows_ (a fixed 256 threads per row) do not depend on the mapping.
    fixed = {
        COPY: lambda: copy_dst.copy_(logits),
        "scale rows by 1 (skipped)": lambda: ops.scale_rows_(grad, ones),
        "scale rows by 0.5": lambda: ops.scale_rows_(grad, halves),
    }
    per_mapping = {
        "forward kernel": lambda: ops.cross_entropy_forward(logits, target, None, -100, 0.0, 0.0),
        "fused kernel": lambda: ops.cross_entropy_fused(logits, target, None, row_scale, None, -100, 0.0, 0.0),
        "backward kernel": lambda: ops.cross_entropy_backward(
            logits, target, None, lse, mass * row_scale, row_scale, -100, 0.0, 0.0
        ),
        "cross_entropy + backward()": harness.Timed(
            lambda: fused_ce.cross_entropy(x, target).backward(), after=drop_grad
        ),
    }

    def measure(fns) -> dict[str, list[float] | str]:
        return harness.time_interleaved(fns, reps=args.reps, warmup=args.warmup, device=device)

    measured = [("-", measure(fixed))]
    for mapping in args.threads_per_row:
        if mapping == "auto":
            os.environ.pop(THREADS_ENV, None)
        else:
            os.environ[THREADS_ENV] = mapping
        try:
            measured.append((mapping, measure(per_mapping)))
        finally:
            os.environ.pop(THREADS_ENV, None)

    copy_times = measured[0][1][COPY]
    if isinstance(copy_times, str):
        raise SystemExit(f"the copy failed: {copy_times}")
    copy_ms = statistics.median(copy_times)
    read_ms = copy_ms / 2  # one pass over the logits at the copy's bandwidth
    gbytes = n * v * logits.element_size() / 1e9
    print(harness.describe(harness.environment(device)))
    print(
        f"logits {n}x{v} {harness.dtype_name(dtype)} ({gbytes:.2f} GB); copy: {2 * gbytes / copy_ms * 1e3:.0f} GB/s "
        f"counted read + write; median of {args.reps} reps after {args.warmup} warm-up, interleaved"
    )
    rows, groups = [], []
    for mapping, times in measured:
        for name, value in times.items():
            if isinstance(value, str):
                rows.append([name, mapping, f"failed: {value}", ""])
            else:
                ms = statistics.median(value)
                rows.append([name, mapping, f"{ms:.3f}", f"{ms / read_ms:.2f}"])
            groups.append(mapping)
    print(harness.format_table(["op", "threads/row", "ms", "passes"], rows, left={"op", "threads/row"}, groups=groups))


if __name__ == "__main__":
    main()
