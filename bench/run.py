"""Benchmark of ``fused_ce.cross_entropy`` against ``F.cross_entropy``, torch.compile and others.

Run it from the repository root, with fused_ce built (``bash scripts/bench.sh`` does both)::

    python bench/run.py                        # default device: CUDA if present, else the CPU
    python bench/run.py --quick                # tiny shapes, few reps: checks that it runs
    python bench/run.py --device cuda --shapes 16384x128256 --dtypes bfloat16 \\
        --impls fused_ce,torch --passes fwd+bwd --reps 50 --json out/ce.json
    python bench/run.py --linear               # fused linear + cross-entropy
    python bench/run.py --step                 # a training step, logits = h @ W.T
    python bench/run.py --distill              # distillation: student logits against a teacher's
    python bench/run.py --linear-distill       # the same through two LM heads (no logits)
    python bench/run.py --plot DIR             # sweep V, write PNGs to DIR

What runs, what is counted and the JSON format: ``bench/README.md``. The cases and
their defaults are in ``bench/cases.py``, the implementations in ``bench/impls.py``,
the table, JSON and plots in ``bench/report.py``, the timing in ``bench/harness.py``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch
from torch import Tensor

import harness
import report
from cases import (
    DEFAULTS,
    DISTILL_DEFAULTS,
    LINEAR_DEFAULTS,
    LINEAR_DISTILL_DEFAULTS,
    LINEAR_QUICK,
    QUICK,
    STEP_DEFAULTS,
    STEP_QUICK,
    Case,
    Result,
    make_cases,
)
from fused_ce.memory import MIB, measure_peak_mb
from impls import EXTRAS, IMPLS, LINEAR_IMPLS, Impl, build_impls, registry

PASSES = ("fwd", "fwd+bwd")


# --------------------------------------------------------------------------- one pass


def _differentiable(inputs: Sequence[Tensor]) -> list[Tensor]:
    """The inputs that get gradients in fwd+bwd: the floating-point ones but the target (last)."""
    return [t for t in inputs[:-1] if t.is_floating_point()]


class _ImplCalls:
    """An implementation's calls in one pass, as users make them: the loss under no_grad, or with backward().

    Untimed around each call: a fresh copy of the inputs first for an implementation
    that overwrites them, and afterwards the gradients are dropped (so every call
    allocates its own, as a training step does).
    """

    def __init__(self, impl: Impl, inputs: Sequence[Tensor], backward: bool) -> None:
        self.impl, self.inputs, self.backward = impl, tuple(inputs), backward
        self.args = self.inputs
        self.loss: Tensor | None = None

    def before(self) -> None:
        if self.impl.fresh_input_copy:
            copied = {id(t) for t in _differentiable(self.inputs)}
            self.args = tuple(
                t.detach().clone().requires_grad_(t.requires_grad) if id(t) in copied else t for t in self.inputs
            )

    def run(self) -> None:
        if self.backward:
            loss = self.impl.fn(*self.args)
            loss.backward()
            self.loss = loss.detach()
        else:
            with torch.no_grad():
                self.loss = self.impl.fn(*self.args)

    def after(self) -> None:
        for t in _differentiable(self.args):
            t.grad = None
        self.args, self.loss = self.inputs, None

    def grad_mb(self) -> float:
        return sum(t.grad.nbytes for t in _differentiable(self.args) if t.grad is not None) / MIB

    def timed(self) -> harness.Timed:
        return harness.Timed(self.run, before=self.before, after=self.after)


def bench_pass(
    case: Case, pass_: str, impls: dict[str, Impl], inputs: Sequence[Tensor], args, bar
) -> dict[str, Result]:
    """Warm-up, interleaved timed reps, then one untimed call per implementation for its peak memory and loss."""
    backward = pass_ == "fwd+bwd"
    for t in _differentiable(inputs):
        t.requires_grad_(backward)
    calls = {name: _ImplCalls(impl, inputs, backward) for name, impl in impls.items()}
    results = {name: Result(case, pass_, name, fresh_input_copy=impl.fresh_input_copy) for name, impl in impls.items()}
    label = f"{pass_} {case.label}"
    timed = harness.time_interleaved(
        {name: call.timed() for name, call in calls.items()},
        reps=args.reps,
        warmup=args.warmup,
        device=case.device,
        bar=bar,
        label=label,
    )

    bar.set_postfix_str(f"{label}: peak memory")
    for name, times in timed.items():
        result, call = results[name], calls[name]
        if isinstance(times, str):
            result.skipped = times
            continue
        result.ms = statistics.median(times)
        try:
            call.before()
            result.peak_mem_mb = measure_peak_mb(call.run, case.device)
            result.grad_mb = call.grad_mb()
            result.loss = float(call.loss)
        except Exception:  # e.g. out of memory: the timing stands, the peak stays unknown
            result.peak_mem_mb = None
        finally:
            call.after()
            harness.free_memory(case.device)
    bar.update(len(impls))
    for t in _differentiable(inputs):
        t.requires_grad_(False)
    return results


def run_case(case: Case, args, bar) -> list[Result]:
    """All passes of all implementations on one case, in the order of ``args``."""
    steps_per_impl = args.warmup + args.reps + 1  # progress steps of one implementation in one pass
    by_key: dict[tuple[str, str], Result] = {}
    bar.set_postfix_str(f"{case.label}: inputs")
    try:
        inputs = case.make_inputs()
    except Exception as e:  # out of memory
        why = harness.reason(e)
        by_key = {(p, name): Result(case, p, name, skipped=why) for p in args.passes for name in args.impls}
        bar.update(steps_per_impl * len(args.impls) * len(args.passes))
    else:
        impls, unavailable = build_impls(case, args.impls)
        for pass_ in args.passes:
            by_key.update({(pass_, name): Result(case, pass_, name, skipped=why) for name, why in unavailable.items()})
            bar.update(steps_per_impl * len(unavailable))
            if impls:
                by_key.update(
                    {(pass_, name): r for name, r in bench_pass(case, pass_, impls, inputs, args, bar).items()}
                )
        del inputs, impls
    harness.free_memory(case.device)
    return [by_key[(p, name)] for p in args.passes for name in args.impls]


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python bench/run.py",
        description="Benchmark fused_ce.cross_entropy against F.cross_entropy, torch.compile and others.",
        epilog="bench/README.md says what runs, what is counted and the JSON format.",
    )
    harness.add_device_argument(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--linear", action="store_true", help="benchmark fused_ce.linear_cross_entropy (shapes NxDxV; see the README)"
    )
    mode.add_argument(
        "--step", action="store_true", help="a training step with logits = h @ W.T (shapes NxDxV; see the README)"
    )
    mode.add_argument(
        "--distill", action="store_true", help="fused_ce.distillation_loss against F.kl_div of log_softmaxes (NxV)"
    )
    mode.add_argument(
        "--linear-distill",
        action="store_true",
        help="fused_ce.linear_distillation_loss: student and teacher heads (shapes NxDxV)",
    )
    mode.add_argument("--plot", metavar="DIR", help="sweep V and write time and memory plots (PNG) to DIR")
    parser.add_argument(
        "--extras", action="store_true", help=f"give every implementation {EXTRAS} (or skip it, saying why)"
    )
    parser.add_argument("--shapes", help="NxV,... or with --linear/--step NxDxV,... (default: per device)")
    parser.add_argument("--dtypes", type=harness.parse_dtypes, help="e.g. float32,bfloat16 (default: per device)")
    parser.add_argument("--impls", help=f"default: {','.join(IMPLS)}; with --linear: {','.join(LINEAR_IMPLS)}")
    parser.add_argument(
        "--passes",
        type=lambda text: harness.parse_choices(text, PASSES, "pass(es)"),
        default=list(PASSES),
        help=f"default: {','.join(PASSES)}",
    )
    parser.add_argument("--reps", type=int, help="timed repetitions per implementation (default: cpu 10, cuda 20)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: cpu 2, cuda 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    harness.add_progress_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few reps: checks that the benchmark runs")
    args = parser.parse_args(argv)

    device = harness.resolve_device(parser, args.device)
    op = ("linear_cross_entropy" if args.linear else "training_step" if args.step
          else "distillation" if args.distill else "linear_distillation" if args.linear_distill else "cross_entropy")
    try:
        if args.shapes is not None:
            if args.plot:
                parser.error("--plot sweeps its own shapes")
            with_d = args.linear or args.step or args.linear_distill
            args.shapes = harness.parse_shapes(args.shapes, *(("NxDxV", "4096x256x32000") if with_d else ()))
        names = registry(op)
        args.impls = list(names) if args.impls is None else harness.parse_choices(args.impls, names, "impl(s)")
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args.dtypes_given = args.dtypes is not None
    if args.step and args.passes == list(PASSES):
        args.passes = ["fwd+bwd"]
    defaults = dict(DEFAULTS[device.type])
    if args.linear:
        defaults.update(LINEAR_DEFAULTS[device.type])
    if args.step:
        defaults.update(STEP_DEFAULTS[device.type])
    if args.distill:
        defaults.update(DISTILL_DEFAULTS[device.type])
    if args.linear_distill:
        defaults.update(LINEAR_DISTILL_DEFAULTS[device.type])
    if args.quick:
        defaults.update(LINEAR_QUICK if args.linear or args.linear_distill else STEP_QUICK if args.step else QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    args.device = device
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    copy_gbps = harness.measure_copy_gbps(args.device)
    cases = make_cases(args)
    total = len(cases) * len(args.passes) * len(args.impls) * (args.warmup + args.reps + 1)
    with harness.progress(total, enabled=not args.no_progress) as bar:
        results = [result for case in cases for result in run_case(case, args, bar)]

    meta = report.collect_meta(args, results, copy_gbps)
    print(report.format_header(meta))
    print()
    print(report.format_table(results, copy_gbps))
    if args.json:
        harness.write_json(args.json, report.document(meta, results))
        print(f"\nwrote {args.json}")
    if args.plot:
        for path in report.write_plots(args.plot, meta, results):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
