"""Where the time of a training call goes: each fused_ce op alone, against a plain copy,
for every kernel variant -- and the dispatch-table entries the sweep would write.

    python bench/kernel_times.py [--shapes 16384x128256,8192x256000] [--dtype bfloat16]
                                 [--variants auto,stream32,stream256,stream512,stream1024,single_read]

Times (CUDA events, median of --reps after warm-up) the ops that ``cross_entropy`` runs --
the forward kernel alone (evaluation), the fused kernel (loss and gradient in one call:
each row read twice by the streaming variants, once by single_read; the gradient written
once), the recomputing backward kernel (one read, one write), the rescale of the gradient
rows by the upstream gradient (skipped in-kernel when it is 1) -- and the public call with
``backward()``, next to ``dst.copy_(src)`` of the logits (one read, one write). ``passes``
is the time over a read-only pass at the copy's bandwidth: an ideal kernel needs 1 for the
forward, 2 for the fused kernel (3 if it reads twice), 2 for the backward.

Each variant runs in its own process with FUSED_CE_CUDA_VARIANT set (``auto``: unset, the
built-in table; csrc/cuda/variants.h), since the library reads that variable once. A
variant a launch cannot take (single_read: sm_90, forward passes, rows up to a cluster's
shared memory) runs the table's choice there, and is timed as that. At the end, per shape
and pass, the fastest variant, as a line for kDispatchTable. On the CPU (``--device cpu``, wall-clock timing)
it only checks that the script runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

import torch

import harness

# FUSED_CE_CUDA_VARIANT names and their csrc/cuda/variants.h enumerators.
VARIANTS = {"stream32": "kStream32", "stream256": "kStream256", "stream512": "kStream512",
            "stream1024": "kStream1024", "single_read": "kSingleRead"}
VARIANT_ENV = "FUSED_CE_CUDA_VARIANT"
TABLE_PASSES = {"forward kernel": "kPassForward", "fused kernel": "kPassFused", "backward kernel": "kPassBackward"}
DTYPE_BITS = {"float32": "kFloat32", "float64": "kFloat64", "float16": "kFloat16", "bfloat16": "kBFloat16"}
COPY = "copy (read + write)"


def measure(shape: str, dtype_name: str, reps: int, warmup: int, device_name: str) -> dict:
    """This process's times (ms) of every op at one shape (the variant: FUSED_CE_CUDA_VARIANT)."""
    import fused_ce

    n, v = (int(s) for s in shape.split("x"))
    dtype = getattr(torch, dtype_name)
    device = torch.device(device_name)
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

    rows = {
        COPY: lambda: copy_dst.copy_(logits),
        "forward kernel": lambda: ops.cross_entropy_forward(logits, target, None, -100, 0.0, 0.0),
        "fused kernel": lambda: ops.cross_entropy_fused(logits, target, None, row_scale, None, -100, 0.0, 0.0),
        "backward kernel": lambda: ops.cross_entropy_backward(logits, target, None, lse, mass * row_scale, row_scale,
                                                              -100, 0.0, 0.0),
        "scale rows by 1 (skipped)": lambda: ops.scale_rows_(grad, ones),
        "scale rows by 0.5": lambda: ops.scale_rows_(grad, halves),
        "cross_entropy + backward()": harness.Timed(
            lambda: fused_ce.cross_entropy(x, target).backward(), after=drop_grad
        ),
    }
    measured = harness.time_interleaved(rows, reps=reps, warmup=warmup, device=device)
    times = {name: statistics.median(t) if not isinstance(t, str) else float("nan") for name, t in measured.items()}
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "gbytes": n * v * logits.element_size() / 1e9,
        "ms": times,
    }


def run_variant(variant: str, args) -> dict:
    env = dict(os.environ)
    env.pop(VARIANT_ENV, None)
    if variant != "auto":
        env[VARIANT_ENV] = variant
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shapes", args.shapes, "--dtype", args.dtype,
           "--reps", str(args.reps), "--warmup", str(args.warmup), "--device", args.device]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant}: exit {out.returncode}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="16384x128256", help="comma-separated NxV")
    parser.add_argument("--shape", help="one NxV (the same as --shapes with one)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--variants", help="comma-separated: auto, " + ", ".join(VARIANTS) +
                        " (default: all of them on CUDA, auto on the CPU, which has no variants)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shape:
        args.shapes = args.shape
    if args.child:  # one variant (from the environment), every shape: JSON on the last line
        print(json.dumps({s: measure(s, args.dtype, args.reps, args.warmup, args.device)
                          for s in args.shapes.split(",")}))
        return
    if args.variants is None:
        args.variants = "auto," + ",".join(VARIANTS) if args.device.startswith("cuda") else "auto"
    variants = args.variants.split(",")
    for v in variants:
        if v != "auto" and v not in VARIANTS:
            parser.error(f"--variants: {v!r} is not auto or one of {', '.join(VARIANTS)}")
    results = {v: run_variant(v, args) for v in variants}
    first = results[variants[0]]
    for shape in args.shapes.split(","):
        info = first[shape]
        copy_ms = info["ms"][COPY]
        print(f"\n{info['device']}, torch {info['torch']}, logits {shape} {args.dtype} ({info['gbytes']:.2f} GB); "
              f"copy: {2 * info['gbytes'] / copy_ms * 1e3:.0f} GB/s counted read + write")
        print("passes over a read (ms in brackets), against each process's own copy; FUSED_CE_CUDA_VARIANT=<name>")
        print(f"{'op':28s} " + " ".join(f"{v:>18s}" for v in variants))

        def passes(v: str, op: str, shape: str = shape) -> float:  # time over one read at the copy's bandwidth
            ms = results[v][shape]["ms"]
            return ms[op] / (ms[COPY] / 2)

        for op in info["ms"]:
            cells = [f"{passes(v, op):7.2f} ({results[v][shape]['ms'][op]:7.3f})" for v in variants]
            print(f"{op:28s} " + " ".join(f"{c:>18s}" for c in cells))
        print("fastest per pass, as kDispatchTable lines (V up to this shape's; check the neighbours):")
        _, v_size = shape.split("x")
        for op, pass_name in TABLE_PASSES.items():
            # single_read cannot take a backward launch: forced, it runs the table's choice.
            timed = {v: passes(v, op) for v in variants if v != "auto" and not (v == "single_read" and
                                                                                 pass_name == "kPassBackward")}
            if not timed:
                continue
            best = min(timed, key=timed.get)
            figure = f"{info['device']}, {shape} {args.dtype}: {op.split()[0]} {timed[best]:.2f} passes"
            if "auto" in results:
                figure += f" (table today: {passes('auto', op):.2f})"
            print(f'    {{90, {DTYPE_BITS.get(args.dtype, "kAnyDtype")}, {v_size}, {pass_name}, '
                  f'Variant::{VARIANTS[best]}, "{figure}"}},')


if __name__ == "__main__":
    main()
