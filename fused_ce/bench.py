"""Benchmark of ``fused_ce.cross_entropy`` against ``torch.nn.functional.cross_entropy``.

Run it from the repository root, with the package built::

    python -m fused_ce.bench                    # default device: CUDA if present, else the CPU
    python -m fused_ce.bench --quick            # tiny shapes, few reps: checks that it runs
    python -m fused_ce.bench --device cuda --shapes 16384x128256 --dtypes bfloat16 \\
        --impls fused_ce,torch --passes fwd+bwd --reps 50 --json out/ce.json

Defaults: on the CPU 4096x32000 in float32; on CUDA 16384x128256 and 8192x256000
(Llama 3 and Gemma vocabularies), in bfloat16 and float32.

What runs
    Every implementation of ``IMPLS`` that ``--impls`` names -- ``fused_ce``; ``torch``,
    eager ``F.cross_entropy``; ``torch.compile``, ``torch.compile(F.cross_entropy,
    dynamic=False)`` compiled afresh for each shape and dtype during warm-up -- on
    random logits ``[N, V]`` (a leaf tensor) and random class-index targets in
    ``[0, V)``, with the default ``reduction="mean"``, for two passes:

    * ``fwd``: the loss under ``torch.no_grad()``, as for evaluation;
    * ``fwd+bwd``: the loss and ``loss.backward()`` into ``logits.grad``, which is
      reset to ``None`` after each call, outside the timed region (so every call
      allocates its gradient afresh, as a training step does).

    An implementation that cannot run (no compiler for ``torch.compile``, out of
    memory, ...) is reported as skipped with the reason; the others go on.

What is reported, per (pass, impl, N, V, dtype)
    * ``ms``: the median time of one call. On CUDA every call is timed with CUDA
      events, after warm-up; on the CPU with ``time.perf_counter``. The
      implementations are interleaved within each repetition (round robin, the first
      one rotating from rep to rep), so that the noise of a shared machine falls on
      all of them alike.
    * ``GB/s``: counted bytes over the median time. The counted bytes are the memory
      traffic floor of the op, the same for every implementation so that GB/s compare
      directly: ``fwd`` reads the logits once (``N*V*elt`` bytes); ``fwd+bwd`` reads
      them once and writes the gradient once (``2*N*V*elt``). An implementation that
      makes more passes over memory shows a lower GB/s. On CUDA the table also gives
      it as a percentage of the device's copy bandwidth, measured as
      ``dst.copy_(src)`` of 2 GiB and counted as read + write (``meta.copy_gbps``).
    * ``peak MB``: the extra peak memory of one call beyond its inputs, in MiB
      (2**20 bytes), measured in a separate untimed call: on CUDA
      ``max_memory_allocated()`` minus the memory allocated before the call; on
      Linux CPUs the peak resident set size (``VmHWM``, reset through
      ``/proc/self/clear_refs``) minus the resident set size before the call (null
      where that is unavailable). For ``fwd+bwd`` it includes the gradient itself.
    * ``vs torch``: eager torch's median time over the implementation's (>1: faster).

JSON (``--json PATH``)::

    {"meta": {"gpu" | "cpu": <device name>, "torch": ..., "git_sha": ..., "date": ...,
              "copy_gbps": <GB/s, null on the CPU>, "threads": ..., "cpu_capability": ...,
              "skipped": [{"pass": ..., "impl": ..., "N": ..., "V": ..., "dtype": ...,
                           "reason": ...}], ...},
     "rows": [{"op": "cross_entropy", "pass": "fwd" | "fwd+bwd", "impl": "fused_ce",
               "N": 4096, "V": 32000, "dtype": "float32", "ms": ..., "gbps": ...,
               "peak_mem_mb": ...}]}

Rows hold the implementations that ran; the skipped ones are listed in ``meta.skipped``.

Linear + cross-entropy (``--linear``)
    ``fused_ce.linear_cross_entropy`` against the implementations of ``LINEAR_IMPLS``:
    ``torch`` (``F.cross_entropy(F.linear(x, W), target)``, the full logits);
    ``torch.chunked`` (``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())``,
    torch >= 2.13); on CUDA ``liger`` (Liger-Kernel's
    ``LigerFusedLinearCrossEntropyLoss``) and ``cce`` (Apple's cut-cross-entropy
    ``linear_cross_entropy``) when importable -- each skipped with the reason
    otherwise. Inputs: ``x [N, D]`` and ``W [V, D]`` (leaves; ``W`` scaled by
    ``D**-0.5``), no bias, class-index targets, ``reduction="mean"``. ``fwd+bwd``
    computes the gradients of ``x`` and ``W``. ``--shapes`` takes ``NxDxV``;
    defaults: CPU 4096x256x32000 float32, CUDA 8192x2304x256000 bfloat16.

    The rows carry ``"op": "linear_cross_entropy"`` and ``"D"``; ``gbps`` is null (the
    op is bound by its matmuls, not by memory traffic) and ``tflops`` counts the
    matmuls (``2*N*D*V`` per pass over the logits: one in ``fwd``, three in
    ``fwd+bwd``). ``workspace_mb`` is ``peak_mem_mb`` less the gradients the call
    leaves in ``.grad`` (the same for every implementation): the memory an
    implementation needs beyond its inputs and outputs. The table adds a ``vs
    chunked`` column: ``torch.chunked``'s median time over the implementation's.

Training step (``--step``)
    A training step whose logits come from a matmul: ``loss_fn(h @ W.T, target)``
    with ``h [N, D]`` and ``W [V, D]`` leaves (``--shapes NxDxV``; default CPU
    4096x8x32000, CUDA 16384x8x128256), for ``torch``, ``torch.compile`` (the whole
    step compiled), ``fused_ce`` and ``fused_ce.inplace`` (``inplace_backward=True``:
    the gradient overwrites the logits' buffer). Only ``fwd+bwd`` makes sense here.
    The logits are an allocation every implementation makes, so the table also gives
    the peak beyond them (``beyond logits MB``; ``beyond_logits_mb`` in the JSON).

Extras (``--extras``)
    Every implementation gets ``label_smoothing=0.1``, ``z_loss=1e-4`` and
    ``softcap=30``: fused_ce natively, torch as the composition
    ``F.cross_entropy(30 tanh(x / 30), label_smoothing=0.1) + 1e-4 mean(lse**2)``.

Plots (``--plot DIR``)
    Sweeps V at a fixed N (CPU: N=2048, V from 4096 to 131072; CUDA: N=8192, V from
    32000 to 256000, bfloat16) for fused_ce, torch and torch.compile, and writes
    ``DIR/time_vs_vocab.png`` and ``DIR/memory_vs_vocab.png`` (matplotlib).

Adding an implementation: register a builder that turns a :class:`Case` into a
function ``(logits, target) -> loss``, e.g. for a new flag of fused_ce::

    @register_impl("fused_ce.inplace")
    def _fused_ce_inplace(case):
        return functools.partial(fused_ce.cross_entropy, inplace_backward=True)

A builder raises :class:`ImplUnavailable` for a case it cannot run.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

import fused_ce
from fused_ce._progress import Progress
from fused_ce.memory import measure_peak_mb

PASSES = ("fwd", "fwd+bwd")
MIB = 2**20
GB = 1e9
COPY_BYTES = 2 * 2**30  # the buffer of the copy bandwidth measurement

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}

# Per device: the shapes (N, V), dtypes, timed repetitions and warm-up calls by default.
DEFAULTS = {
    "cpu": {"shapes": [(4096, 32000)], "dtypes": [torch.float32], "reps": 10, "warmup": 2},
    "cuda": {
        "shapes": [(16384, 128256), (8192, 256000)],
        "dtypes": [torch.bfloat16, torch.float32],
        "reps": 20,
        "warmup": 5,
    },
}
QUICK = {"shapes": [(256, 4096)], "reps": 3, "warmup": 1}  # dtypes: the device's defaults

# --linear: the shapes (N, D, V) and dtypes by default.
LINEAR_DEFAULTS = {
    "cpu": {"shapes": [(4096, 256, 32000)], "dtypes": [torch.float32]},
    "cuda": {"shapes": [(8192, 2304, 256000)], "dtypes": [torch.bfloat16]},
}
LINEAR_QUICK = {"shapes": [(256, 64, 4096)], "reps": 3, "warmup": 1}

# --step: the shapes (N, D, V) by default (the dtypes are the device's).
STEP_DEFAULTS = {"cpu": {"shapes": [(4096, 8, 32000)]}, "cuda": {"shapes": [(16384, 8, 128256)]}}
STEP_QUICK = {"shapes": [(256, 8, 4096)], "reps": 3, "warmup": 1}

# --plot: N and the vocabulary sizes of the sweep, and the dtype.
PLOT_SWEEP = {
    "cpu": {"n": 2048, "vocab": [4096, 8192, 16384, 32000, 65536, 131072], "dtypes": [torch.float32]},
    "cuda": {"n": 8192, "vocab": [32000, 65536, 128256, 256000], "dtypes": [torch.bfloat16]},
}

PLOT_QUICK = {"n": 128, "vocab": [512, 2048], "dtypes": [torch.float32]}

# --extras: the options every implementation gets.
EXTRAS = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}

LossFn = Callable[..., Tensor]  # (logits, target) -> loss; --linear: (x, W, target) -> loss


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One block of the table: an op on one shape and dtype, timed for each pass."""

    op: str
    n: int
    v: int
    dtype: torch.dtype
    device: torch.device
    d: int = 0  # linear_cross_entropy: the hidden size D (0 for cross_entropy)

    @property
    def linear(self) -> bool:
        return self.op == "linear_cross_entropy"

    @property
    def step(self) -> bool:
        """A training step: logits = h @ W.T, then the loss (``--step``)."""
        return self.op == "training_step"

    @property
    def has_d(self) -> bool:
        return self.linear or self.step

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        shape = f"{self.n}x{self.d}x{self.v}" if self.has_d else f"{self.n}x{self.v}"
        return f"{shape} {self.dtype_name}"

    def counted_bytes(self, pass_: str) -> int | None:
        """The op's memory traffic floor: read the logits once, and write the gradient once (None for --linear)."""
        if self.has_d:
            return None
        passes_over_logits = 1 if pass_ == "fwd" else 2
        return passes_over_logits * self.n * self.v * self.dtype.itemsize

    def counted_flops(self, pass_: str) -> int | None:
        """--linear: the matmuls' FLOPs, 2*N*D*V each (one in fwd, three in fwd+bwd)."""
        if not self.has_d:
            return None
        return (1 if pass_ == "fwd" else 3) * 2 * self.n * self.d * self.v

    @property
    def logits_mb(self) -> float:
        return self.n * self.v * self.dtype.itemsize / MIB

    def make_inputs(self) -> tuple[Tensor, ...]:
        """Random logits [N, V] (a leaf) and class-index targets in [0, V).

        --linear: x [N, D] and W [V, D] (leaves, W scaled by D**-0.5 so the logits
        have unit variance) and the targets.
        """
        generator = torch.Generator(self.device).manual_seed(0)
        if self.has_d:
            x = torch.randn(self.n, self.d, dtype=self.dtype, device=self.device, generator=generator)
            w = torch.randn(self.v, self.d, device=self.device, generator=generator).mul_(self.d**-0.5).to(self.dtype)
            target = torch.randint(0, self.v, (self.n,), device=self.device, generator=generator)
            return x, w, target
        logits = torch.randn(self.n, self.v, dtype=self.dtype, device=self.device, generator=generator)
        target = torch.randint(0, self.v, (self.n,), device=self.device, generator=generator)
        return logits, target


@dataclass
class Result:
    """The measurements of one implementation on one case and pass (or why it has none)."""

    case: Case
    pass_: str
    impl: str
    ms: float | None = None
    peak_mem_mb: float | None = None
    grad_mb: float | None = None  # the gradients the call left in .grad (part of peak_mem_mb)
    skipped: str | None = None

    @property
    def gbps(self) -> float | None:
        counted = self.case.counted_bytes(self.pass_)
        if self.ms is None or counted is None:
            return None
        return counted / (self.ms * 1e-3) / GB

    @property
    def tflops(self) -> float | None:
        flops = self.case.counted_flops(self.pass_)
        if self.ms is None or flops is None:
            return None
        return flops / (self.ms * 1e-3) / 1e12

    @property
    def workspace_mb(self) -> float | None:
        if self.peak_mem_mb is None or self.grad_mb is None:
            return None
        return self.peak_mem_mb - self.grad_mb

    def _keys(self) -> dict:
        c = self.case
        keys = {"op": c.op, "pass": self.pass_, "impl": self.impl, "N": c.n, "V": c.v, "dtype": c.dtype_name}
        if c.has_d:
            keys["D"] = c.d
        return keys

    def row(self) -> dict:
        """The JSON row of a result that ran."""
        row = {
            **self._keys(),
            "ms": _round(self.ms, 4),
            "gbps": _round(self.gbps, 2),
            "peak_mem_mb": _round(self.peak_mem_mb, 1),
        }
        if self.case.linear:
            row.update(tflops=_round(self.tflops, 3), workspace_mb=_round(self.workspace_mb, 1))
        if self.case.step:
            row.update(beyond_logits_mb=_round(self.beyond_logits_mb, 1))
        return row

    @property
    def beyond_logits_mb(self) -> float | None:
        """--step: the peak beyond the logits, which every implementation allocates."""
        return None if self.peak_mem_mb is None else self.peak_mem_mb - self.case.logits_mb

    def skip_record(self) -> dict:
        """The ``meta.skipped`` entry of a result that did not run."""
        return {**self._keys(), "reason": self.skipped}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


# --------------------------------------------------------------------------- implementations


class ImplUnavailable(Exception):
    """Raised by an implementation's builder for a case it cannot run; the message says why."""


ImplBuilder = Callable[[Case], LossFn]
IMPLS: dict[str, ImplBuilder] = {}
LINEAR_IMPLS: dict[str, ImplBuilder] = {}  # --linear: builders of (x, W, target) -> loss
STEP_IMPLS: dict[str, ImplBuilder] = {}  # --step: builders of (h, W, target) -> loss of h @ W.T
_extras: dict = {}  # --extras: set by main()


def register_impl(name: str, registry: dict[str, ImplBuilder] = IMPLS) -> Callable[[ImplBuilder], ImplBuilder]:
    """Registers ``builder(case) -> (logits, target) -> loss`` under ``name`` (in ``registry``)."""

    def decorator(builder: ImplBuilder) -> ImplBuilder:
        registry[name] = builder
        return builder

    return decorator


def register_linear_impl(name: str) -> Callable[[ImplBuilder], ImplBuilder]:
    """Registers ``builder(case) -> (x, W, target) -> loss`` for ``--linear``."""
    return register_impl(name, LINEAR_IMPLS)


def _require_cuda_kernels(case: Case) -> None:
    if case.device.type == "cuda" and not fused_ce.cuda_kernels_available():
        raise ImplUnavailable("this build of fused_ce has no CUDA kernels")


def _fused_ce_loss(**options) -> LossFn:
    return lambda logits, target: fused_ce.cross_entropy(logits, target, **_extras, **options)


def _torch_loss(logits: Tensor, target: Tensor) -> Tensor:
    """F.cross_entropy, with --extras composed from torch ops."""
    if not _extras:
        return F.cross_entropy(logits, target)
    cap = _extras["softcap"]
    z = cap * torch.tanh(logits / cap)
    loss = F.cross_entropy(z, target, label_smoothing=_extras["label_smoothing"])
    return loss + _extras["z_loss"] * torch.logsumexp(z.float(), dim=-1).square().mean()


def _compiled(fn: LossFn) -> LossFn:
    # Dynamo caches compiled code on a function's code object, which every
    # torch.compile wrapper of it shares: reset, so that earlier cases neither count
    # towards the recompile limit (past which it would silently run eagerly) nor stay
    # in memory. Compilation itself happens at the first call, in warm-up.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


@register_impl("fused_ce")
def _fused_ce(case: Case) -> LossFn:
    _require_cuda_kernels(case)
    return _fused_ce_loss()


@register_impl("torch")
def _torch(case: Case) -> LossFn:
    return _torch_loss


@register_impl("torch.compile")
def _torch_compile(case: Case) -> LossFn:
    return _compiled(_torch_loss)


def _step(loss_fn: LossFn) -> LossFn:
    return lambda h, w, target: loss_fn(h @ w.T, target)


@register_impl("torch", STEP_IMPLS)
def _step_torch(case: Case) -> LossFn:
    return _step(_torch_loss)


@register_impl("torch.compile", STEP_IMPLS)
def _step_torch_compile(case: Case) -> LossFn:
    return _compiled(_step(_torch_loss))


@register_impl("fused_ce", STEP_IMPLS)
def _step_fused_ce(case: Case) -> LossFn:
    _require_cuda_kernels(case)
    return _step(_fused_ce_loss())


@register_impl("fused_ce.inplace", STEP_IMPLS)
def _step_fused_ce_inplace(case: Case) -> LossFn:
    _require_cuda_kernels(case)
    return _step(_fused_ce_loss(inplace_backward=True))


@register_linear_impl("fused_ce")
def _linear_fused_ce(case: Case) -> LossFn:
    if case.device.type == "cuda" and not fused_ce.cuda_kernels_available():
        raise ImplUnavailable("this build of fused_ce has no CUDA kernels")
    from fused_ce.linear import linear_cross_entropy

    return linear_cross_entropy


@register_linear_impl("torch")
def _linear_torch(case: Case) -> LossFn:
    return lambda x, w, target: F.cross_entropy(F.linear(x, w), target)


@register_linear_impl("torch.chunked")
def _linear_torch_chunked(case: Case) -> LossFn:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise ImplUnavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, target: F.linear_cross_entropy(x, w, target, options=options)


@register_linear_impl("liger")
def _linear_liger(case: Case) -> LossFn:
    if case.device.type != "cuda":
        raise ImplUnavailable("Liger-Kernel's Triton kernels need a CUDA device")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ImplUnavailable(f"liger-kernel is not importable ({e})") from None
    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, target: loss(w, x, target)


@register_linear_impl("cce")
def _linear_cce(case: Case) -> LossFn:
    if case.device.type != "cuda":
        raise ImplUnavailable("cut-cross-entropy's Triton kernels need a CUDA device")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    except ImportError as e:
        raise ImplUnavailable(f"cut-cross-entropy is not importable ({e})") from None
    return lambda x, w, target: cce_linear_cross_entropy(x, w, target)


def build_impls(case: Case, names: Sequence[str]) -> tuple[dict[str, LossFn], dict[str, str]]:
    """The loss functions of the named implementations for ``case``, and why others are unavailable."""
    registry = _registry(case.op)
    fns, unavailable = {}, {}
    for name in names:
        try:
            fns[name] = registry[name](case)
        except Exception as e:  # ImplUnavailable, or a builder that failed
            unavailable[name] = _reason(e)
    return fns, unavailable


def _registry(op: str) -> dict[str, ImplBuilder]:
    return {"linear_cross_entropy": LINEAR_IMPLS, "training_step": STEP_IMPLS}.get(op, IMPLS)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- measurement


def _call(fn: LossFn, inputs: Sequence[Tensor], backward: bool) -> None:
    """One call as users make it: the loss under no_grad, or the loss and its backward."""
    if backward:
        fn(*inputs).backward()
    else:
        with torch.no_grad():
            fn(*inputs)


def _differentiable(inputs: Sequence[Tensor]) -> list[Tensor]:
    """The inputs that get gradients in fwd+bwd: the floating-point ones but the target (last)."""
    return [t for t in inputs[:-1] if t.is_floating_point()]


def _clear_grads(inputs: Sequence[Tensor]) -> None:
    for t in _differentiable(inputs):
        t.grad = None


def _grad_mb(inputs: Sequence[Tensor]) -> float:
    return sum(t.grad.nbytes for t in _differentiable(inputs) if t.grad is not None) / MIB


def _timed_round(
    fns: dict[str, LossFn], order: Sequence[str], inputs: Sequence[Tensor], backward: bool
) -> dict[str, float | str]:
    """Calls each implementation once, in ``order``; returns its time in ms, or why it failed.

    On CUDA each call sits between two CUDA events and the round ends with one
    synchronisation; on the CPU each call is timed with ``time.perf_counter``. The
    gradient is dropped after each call, outside the timed region.
    """
    device = inputs[0].device
    cuda = device.type == "cuda"
    out: dict[str, float | str] = {}
    events = {}
    for name in order:
        try:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                _call(fns[name], inputs, backward)
                end.record()
                events[name] = (start, end)
            else:
                start_s = time.perf_counter()
                _call(fns[name], inputs, backward)
                out[name] = (time.perf_counter() - start_s) * 1e3
        except Exception as e:  # out of memory, a compiler that fails, ...
            out[name] = _reason(e)
        finally:
            _clear_grads(inputs)
        if isinstance(out.get(name), str):
            _free_memory(device)
    if cuda:
        torch.cuda.synchronize(device)
        out.update({name: start.elapsed_time(end) for name, (start, end) in events.items()})
    return out


def measure_copy_gbps(device: torch.device, nbytes: int = COPY_BYTES, reps: int = 10) -> float | None:
    """The device's copy bandwidth: ``dst.copy_(src)`` timed with CUDA events, read + write counted."""
    try:
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        for _ in range(3):
            dst.copy_(src)
        events = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        ms = statistics.median(start.elapsed_time(end) for start, end in events)
        return 2 * nbytes / (ms * 1e-3) / GB
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        src = dst = None
        _free_memory(device)


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- running


def bench_pass(
    case: Case, pass_: str, fns: dict[str, LossFn], inputs: Sequence[Tensor], args, bar: Progress
) -> dict[str, Result]:
    """Warm-up, interleaved timed reps, then one untimed call per implementation for its peak memory."""
    backward = pass_ == "fwd+bwd"
    for t in _differentiable(inputs):
        t.requires_grad_(backward)
    results = {name: Result(case, pass_, name) for name in fns}
    active = list(fns)
    times: dict[str, list[float]] = {name: [] for name in fns}

    for rep in range(args.warmup + args.reps):
        stage = f"warm-up {rep + 1}/{args.warmup}" if rep < args.warmup else f"rep {rep - args.warmup + 1}/{args.reps}"
        bar.set_note(f"{pass_} {case.label}: {stage}")
        order = active[rep % len(active) :] + active[: rep % len(active)] if active else []
        for name, value in _timed_round(fns, order, inputs, backward).items():
            if isinstance(value, str):
                results[name].skipped = value
                active.remove(name)
            elif rep >= args.warmup:
                times[name].append(value)
        bar.update(len(fns))

    bar.set_note(f"{pass_} {case.label}: peak memory")
    for name in active:
        results[name].ms = statistics.median(times[name])
        try:
            results[name].peak_mem_mb = measure_peak_mb(lambda: _call(fns[name], inputs, backward), case.device)
            results[name].grad_mb = _grad_mb(inputs)
        except Exception:  # e.g. out of memory: the timing stands, the peak stays unknown
            results[name].peak_mem_mb = None
        finally:
            _clear_grads(inputs)
            _free_memory(case.device)
    bar.update(len(fns))
    for t in _differentiable(inputs):
        t.requires_grad_(False)
    return results


def run_case(case: Case, args, bar: Progress) -> list[Result]:
    """All passes of all implementations on one case, in the order of ``args``."""
    steps_per_pass = len(args.impls) * (args.warmup + args.reps + 1)
    by_key: dict[tuple[str, str], Result] = {}
    bar.set_note(f"{case.label}: inputs")
    try:
        inputs = case.make_inputs()
    except Exception as e:  # out of memory
        reason = _reason(e)
        by_key = {(p, name): Result(case, p, name, skipped=reason) for p in args.passes for name in args.impls}
        bar.update(steps_per_pass * len(args.passes))
    else:
        fns, unavailable = build_impls(case, args.impls)
        for pass_ in args.passes:
            by_key.update({(pass_, name): Result(case, pass_, name, skipped=why) for name, why in unavailable.items()})
            if fns:
                timed = bench_pass(case, pass_, fns, inputs, args, bar)
                by_key.update({(pass_, name): result for name, result in timed.items()})
            else:
                bar.update(steps_per_pass)
        del inputs, fns
    _free_memory(case.device)
    return [by_key[(p, name)] for p in args.passes for name in args.impls]


def make_cases(args) -> list[Case]:
    if args.plot:
        sweep = PLOT_QUICK if args.quick else PLOT_SWEEP[args.device.type]
        dtypes = args.dtypes if args.dtypes_given else sweep["dtypes"]
        return [Case("cross_entropy", sweep["n"], v, dtype, args.device) for v in sweep["vocab"] for dtype in dtypes]
    if args.step:
        return [Case("training_step", n, v, dtype, args.device, d=d) for n, d, v in args.shapes for dtype in args.dtypes]
    if args.linear:
        return [
            Case("linear_cross_entropy", n, v, dtype, args.device, d=d)
            for n, d, v in args.shapes
            for dtype in args.dtypes
        ]
    return [Case("cross_entropy", n, v, dtype, args.device) for n, v in args.shapes for dtype in args.dtypes]


# --------------------------------------------------------------------------- reporting


def collect_meta(args, copy_gbps: float | None) -> dict:
    device = args.device
    meta: dict = {}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
    else:
        meta["cpu"] = _cpu_model()
    meta.update(
        torch=torch.__version__,
        git_sha=_git_sha(),
        git_dirty=_git_dirty(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        copy_gbps=_round(copy_gbps, 1),
        device=device.type,
        threads=torch.get_num_threads(),
        cpu_capability=torch.backends.cpu.get_cpu_capability(),
        cuda=torch.version.cuda,
        python=platform.python_version(),
        fused_ce=fused_ce.__version__,
        fused_ce_cuda_kernels=fused_ce.cuda_kernels_available(),
        reps=args.reps,
        warmup=args.warmup,
        linear=args.linear,
        step=args.step,
        extras=dict(_extras) or None,
    )
    return meta


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _git(*args: str) -> str | None:
    """The output of a git command in the package's repository, or None."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_sha() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


def _git_dirty() -> bool | None:
    """Whether tracked files differ from HEAD (the build may not be HEAD's); None without git."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def format_header(meta: dict) -> str:
    device = f"GPU {meta['gpu']}" if "gpu" in meta else f"CPU {meta['cpu']}"
    parts = [device, f"torch {meta['torch']}", f"fused_ce {meta['git_sha']}", f"{meta['threads']} threads"]
    parts.append(f"cpu capability {meta['cpu_capability']}")
    if meta["copy_gbps"] is not None:
        parts.append(f"copy {meta['copy_gbps']:.0f} GB/s")
    counted = "GB/s counts fwd: N*V*elt (read logits), fwd+bwd: 2*N*V*elt (read logits, write grad)"
    if meta.get("linear"):
        counted = (
            "TFLOP/s counts the matmuls, fwd: 2*N*D*V, fwd+bwd: 6*N*D*V; "
            "work MB = peak MB less the gradients left in .grad"
        )
    if meta.get("step"):
        counted = "a step: loss(h @ W.T, target) and its backward; beyond logits MB = peak MB less the logits (N*V*elt)"
    extras = f"\nextras: {meta['extras']}" if meta.get("extras") else ""
    return f"{', '.join(parts)}\nmedian of {meta['reps']} reps after {meta['warmup']} warm-up; {counted}{extras}"


def format_table(results: list[Result], copy_gbps: float | None) -> str:
    """A plain-text table, one row per result; skipped ones are footnoted below it."""
    linear = any(r.case.linear for r in results)
    step = any(r.case.step for r in results)
    if linear:
        headers = ["pass", "impl", "N", "D", "V", "dtype", "ms", "TFLOP/s", "peak MB", "work MB"]
        baselines = {"vs torch": "torch", "vs chunked": "torch.chunked"}
    elif step:
        headers = ["pass", "impl", "N", "D", "V", "dtype", "ms", "peak MB", "beyond logits MB"]
        baselines = {"vs torch": "torch"}
    else:
        headers = ["pass", "impl", "N", "V", "dtype", "ms", "GB/s"] + (["% copy"] if copy_gbps else []) + ["peak MB"]
        baselines = {"vs torch": "torch"}
    headers += list(baselines)
    reference_ms = {
        (r.case, r.pass_, r.impl): r.ms for r in results if r.impl in baselines.values() and r.skipped is None
    }

    rows, notes = [], []
    for r in results:
        shape = [str(r.case.n), str(r.case.d), str(r.case.v)] if linear or step else [str(r.case.n), str(r.case.v)]
        cells = [r.pass_, r.impl, *shape, r.case.dtype_name]
        if r.skipped is not None:
            notes.append(f"[{len(notes) + 1}] {r.pass_} {r.impl} {r.case.label}: {r.skipped}")
            cells += [f"skipped [{len(notes)}]"] + [""] * (len(headers) - len(cells) - 1)
        else:
            cells.append(_fmt_ms(r.ms))
            if linear:
                cells.append(f"{r.tflops:.3f}")
            elif step:
                pass
            else:
                cells.append(f"{r.gbps:.1f}")
                if copy_gbps:
                    cells.append(f"{100 * r.gbps / copy_gbps:.0f}%")
            cells.append("n/a" if r.peak_mem_mb is None else f"{r.peak_mem_mb:.1f}")
            if linear:
                cells.append("n/a" if r.workspace_mb is None else f"{r.workspace_mb:.1f}")
            if step:
                cells.append("n/a" if r.beyond_logits_mb is None else f"{r.beyond_logits_mb:.1f}")
            for impl in baselines.values():
                reference = reference_ms.get((r.case, r.pass_, impl))
                cells.append(f"{reference / r.ms:.2f}x" if reference else "-")
        rows.append(cells)

    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    left = {"pass", "impl", "dtype"}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, headers)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    previous = None
    for r, cells in zip(results, rows):
        if previous is not None and (r.case, r.pass_) != previous:
            out.append("")
        previous = (r.case, r.pass_)
        out.append(line(cells))
    return "\n".join(out + ([""] + notes if notes else []))


def _fmt_ms(ms: float) -> str:
    return f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}"


def write_json(path: str, meta: dict, results: list[Result]) -> None:
    meta = {**meta, "skipped": [r.skip_record() for r in results if r.skipped is not None]}
    document = {"meta": meta, "rows": [r.row() for r in results if r.skipped is None]}
    target = Path(path)
    if target.parent != Path(""):
        target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(document, indent=2) + "\n")


def write_plots(directory: str, meta: dict, results: list[Result]) -> list[Path]:
    """--plot: time and peak memory against V, one line per (implementation, pass)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e}): pip install matplotlib") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    device = meta.get("gpu") or meta.get("cpu")
    ran = [r for r in results if r.skipped is None]
    dtype = ran[0].case.dtype_name if ran else ""
    n = ran[0].case.n if ran else 0
    colors = {"fused_ce": "tab:blue", "torch": "tab:red", "torch.compile": "tab:orange"}
    paths = []
    for metric, label, filename in [
        ("ms", "median time per call (ms)", "time_vs_vocab.png"),
        ("peak_mem_mb", "extra peak memory per call (MiB)", "memory_vs_vocab.png"),
    ]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for impl in dict.fromkeys(r.impl for r in ran):
            for pass_, style in (("fwd", "--"), ("fwd+bwd", "-")):
                points = sorted((r.case.v, getattr(r, metric)) for r in ran if r.impl == impl and r.pass_ == pass_)
                points = [(v, y) for v, y in points if y is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=colors.get(impl), label=f"{impl} {pass_}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.set_title(f"cross-entropy, N = {n}, {dtype} -- {device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- command line


def _parse_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def _parse_shapes(text: str, names: str = "NxV", example: str = "4096x32000") -> list[tuple[int, ...]]:
    shapes = []
    for item in _parse_list(text):
        try:
            dims = tuple(int(x) for x in item.lower().replace("×", "x").split("x"))
        except ValueError:
            dims = ()
        if len(dims) != len(names.split("x")):
            raise argparse.ArgumentTypeError(f"shape {item!r} is not {names}, e.g. {example}")
        if min(dims) < 1:
            raise argparse.ArgumentTypeError(f"shape {item!r}: {', '.join(names.split('x'))} must be positive")
        shapes.append(dims)
    return shapes


def _parse_dtypes(text: str) -> list[torch.dtype]:
    unknown = [d for d in _parse_list(text) if d not in DTYPES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {unknown}; choose from {sorted(DTYPES)}")
    return list(dict.fromkeys(DTYPES[d] for d in _parse_list(text)))


def _parse_impls(text: str, registry: dict[str, ImplBuilder] = IMPLS) -> list[str]:
    names = list(dict.fromkeys(_parse_list(text)))
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown impl(s) {unknown}; choose from {list(registry)}")
    return names


def _parse_passes(text: str) -> list[str]:
    names = list(dict.fromkeys(_parse_list(text)))
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown pass(es) {unknown}; choose from {list(PASSES)}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m fused_ce.bench",
        description="Benchmark fused_ce.cross_entropy against F.cross_entropy and torch.compile.",
        epilog="See the module docstring (python -c 'import fused_ce.bench; help(fused_ce.bench)') for what is counted.",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--linear", action="store_true", help="benchmark fused_ce.linear_cross_entropy (shapes NxDxV; see the docstring)"
    )
    mode.add_argument(
        "--step", action="store_true", help="a training step with logits = h @ W.T (shapes NxDxV; see the docstring)"
    )
    mode.add_argument("--plot", metavar="DIR", help="sweep V and write time and memory plots (PNG) to DIR")
    parser.add_argument("--extras", action="store_true", help=f"give every implementation {EXTRAS}")
    parser.add_argument("--shapes", help="NxV,... or with --linear NxDxV,... (default: per device, see the docstring)")
    parser.add_argument("--dtypes", type=_parse_dtypes, help="e.g. float32,bfloat16 (default: per device)")
    parser.add_argument(
        "--impls", help=f"default: {','.join(IMPLS)}; with --linear: {','.join(LINEAR_IMPLS)}"
    )
    parser.add_argument("--passes", type=_parse_passes, default=list(PASSES), help=f"default: {','.join(PASSES)}")
    parser.add_argument("--reps", type=int, help="timed repetitions per implementation (default: cpu 10, cuda 20)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default: cpu 2, cuda 5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off anyway when stderr is no TTY)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes and few reps: checks that the benchmark runs")
    args = parser.parse_args(argv)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    op = "linear_cross_entropy" if args.linear else "training_step" if args.step else "cross_entropy"
    registry = _registry(op)
    try:
        if args.shapes is not None:
            if args.plot:
                parser.error("--plot sweeps its own shapes")
            with_d = args.linear or args.step
            args.shapes = _parse_shapes(args.shapes, *(("NxDxV", "4096x256x32000") if with_d else ()))
        args.impls = list(registry) if args.impls is None else _parse_impls(args.impls, registry)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    args.dtypes_given = args.dtypes is not None
    if args.step and args.passes == list(PASSES):
        args.passes = ["fwd+bwd"]
    defaults = {**DEFAULTS[args.device], **(QUICK if args.quick else {})}
    if args.linear:
        defaults.update(LINEAR_DEFAULTS[args.device])
        if args.quick:
            defaults.update(LINEAR_QUICK)
    if args.step:
        defaults.update(STEP_DEFAULTS[args.device])
        if args.quick:
            defaults.update(STEP_QUICK)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < 1 or args.warmup < 0:
        parser.error("--reps must be at least 1 and --warmup at least 0")
    args.device = torch.device(args.device)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    _extras.clear()
    if args.extras:
        _extras.update(EXTRAS)
    copy_gbps = measure_copy_gbps(args.device) if args.device.type == "cuda" else None
    cases = make_cases(args)
    total = len(cases) * len(args.passes) * len(args.impls) * (args.warmup + args.reps + 1)
    with Progress(total, enabled=not args.no_progress) as bar:
        results = [result for case in cases for result in run_case(case, args, bar)]

    meta = collect_meta(args, copy_gbps)
    print(format_header(meta))
    print()
    print(format_table(results, copy_gbps))
    if args.json:
        write_json(args.json, meta, results)
        print(f"\nwrote {args.json}")
    if args.plot:
        for path in write_plots(args.plot, meta, results):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
