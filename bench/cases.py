"""The CE benchmark's cases (an op on one shape and dtype), their default shapes, and the results.

See ``bench/README.md`` for what is counted; ``bench/run.py`` runs the cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fused_ce.memory import MIB
from harness import GB, dtype_name

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

# --distill: the shapes (N, V) and dtypes by default.
DISTILL_DEFAULTS = {
    "cpu": {"shapes": [(4096, 32000)], "dtypes": [torch.float32]},
    "cuda": {"shapes": [(8192, 128256)], "dtypes": [torch.bfloat16]},
}

# --linear-distill: the shapes (N, D, V) by default (student and teacher of one D).
LINEAR_DISTILL_DEFAULTS = {
    "cpu": {"shapes": [(2048, 256, 32000)], "dtypes": [torch.float32]},
    "cuda": {"shapes": [(8192, 2304, 128256)], "dtypes": [torch.bfloat16]},
}

# --plot: N and the vocabulary sizes of the sweep, and the dtype.
PLOT_SWEEP = {
    "cpu": {"n": 2048, "vocab": [4096, 8192, 16384, 32000, 65536, 131072], "dtypes": [torch.float32]},
    "cuda": {"n": 8192, "vocab": [32000, 65536, 128256, 256000], "dtypes": [torch.bfloat16]},
}
PLOT_QUICK = {"n": 128, "vocab": [512, 2048], "dtypes": [torch.float32]}


@dataclass(frozen=True)
class Case:
    """One block of the table: an op on one shape and dtype, timed for each pass."""

    op: str  # "cross_entropy", "linear_cross_entropy" (--linear), "training_step" (--step), "distillation"
    #          (--distill), "linear_distillation" (--linear-distill)
    n: int
    v: int
    dtype: torch.dtype
    device: torch.device
    d: int = 0  # --linear and --step: the hidden size D (0 for cross_entropy)
    extras: bool = False  # --extras: every implementation gets impls.EXTRAS, or is skipped

    @property
    def linear(self) -> bool:
        """Logits made by matmuls inside the loss (``--linear``, ``--linear-distill``): timed in TFLOP/s."""
        return self.op in ("linear_cross_entropy", "linear_distillation")

    @property
    def linear_distill(self) -> bool:
        """Two heads' logits, student against teacher (``--linear-distill``)."""
        return self.op == "linear_distillation"

    @property
    def step(self) -> bool:
        """A training step: logits = h @ W.T, then the loss (``--step``)."""
        return self.op == "training_step"

    @property
    def distill(self) -> bool:
        """Student logits against a teacher's (``--distill``)."""
        return self.op == "distillation"

    @property
    def has_d(self) -> bool:
        return self.linear or self.step

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def label(self) -> str:
        shape = f"{self.n}x{self.d}x{self.v}" if self.has_d else f"{self.n}x{self.v}"
        return f"{shape} {self.dtype_name}"

    def counted_bytes(self, pass_: str) -> int | None:
        """The op's memory traffic floor: read the logits once, and write the gradient once (None with D)."""
        if self.has_d:
            return None
        # Distillation reads two rows (student and teacher), and writes the student's gradient.
        passes_over_logits = (1 if pass_ == "fwd" else 2) + (1 if self.distill else 0)
        return passes_over_logits * self.n * self.v * self.dtype.itemsize

    def counted_flops(self, pass_: str) -> int | None:
        """With D: the matmuls' FLOPs, 2*N*D*V each (one in fwd, three in fwd+bwd; with a teacher one more)."""
        if not self.has_d:
            return None
        return ((1 if pass_ == "fwd" else 3) + self.linear_distill) * 2 * self.n * self.d * self.v

    @property
    def logits_mb(self) -> float:
        return self.n * self.v * self.dtype.itemsize / MIB

    def make_inputs(self) -> tuple[Tensor, ...]:
        """Random logits [N, V] (a leaf) and class-index targets in [0, V).

        With D: x [N, D] and W [V, D] (leaves, W scaled by D**-0.5 so the logits have
        unit variance) and the targets; ``--linear-distill``: the student's x and W,
        the teacher's (its W twice the scale: sharper logits), the targets.
        """
        generator = torch.Generator(self.device).manual_seed(0)
        if self.has_d:
            x = torch.randn(self.n, self.d, dtype=self.dtype, device=self.device, generator=generator)
            w = torch.randn(self.v, self.d, device=self.device, generator=generator).mul_(self.d**-0.5).to(self.dtype)
            target = torch.randint(0, self.v, (self.n,), device=self.device, generator=generator)
            if self.linear_distill:
                tx = torch.randn(self.n, self.d, dtype=self.dtype, device=self.device, generator=generator)
                tw = torch.randn(self.v, self.d, device=self.device, generator=generator).mul_(2 * self.d**-0.5)
                return x, w, tx, tw.to(self.dtype), target
            return x, w, target
        logits = torch.randn(self.n, self.v, dtype=self.dtype, device=self.device, generator=generator)
        target = torch.randint(0, self.v, (self.n,), device=self.device, generator=generator)
        if self.distill:  # student (a leaf), teacher, labels
            teacher = torch.randn(self.n, self.v, dtype=self.dtype, device=self.device, generator=generator)
            return logits, teacher.mul_(2), target
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
    loss: float | None = None  # the loss of the untimed call
    fresh_input_copy: bool = False  # the implementation overwrites its inputs: each call got a copy
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

    @property
    def beyond_logits_mb(self) -> float | None:
        """--step: the peak beyond the logits, which every implementation allocates."""
        return None if self.peak_mem_mb is None else self.peak_mem_mb - self.case.logits_mb

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
            "loss": _round(self.loss, 6),
        }
        if self.case.linear:
            row.update(tflops=_round(self.tflops, 3), workspace_mb=_round(self.workspace_mb, 1))
        if self.case.step:
            row.update(beyond_logits_mb=_round(self.beyond_logits_mb, 1))
        if self.fresh_input_copy:
            row.update(fresh_input_copy=True)
        return row

    def skip_record(self) -> dict:
        """The ``meta.skipped`` entry of a result that did not run."""
        return {**self._keys(), "reason": self.skipped}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def make_cases(args) -> list[Case]:
    """The cases of a run, from ``run.parse_args``'s arguments."""
    extras = bool(args.extras)
    if args.plot:
        sweep = PLOT_QUICK if args.quick else PLOT_SWEEP[args.device.type]
        dtypes = args.dtypes if args.dtypes_given else sweep["dtypes"]
        return [
            Case("cross_entropy", sweep["n"], v, dtype, args.device, extras=extras)
            for v in sweep["vocab"]
            for dtype in dtypes
        ]
    if args.distill:
        return [Case("distillation", n, v, t, args.device) for n, v in args.shapes for t in args.dtypes]
    if args.linear_distill:
        return [Case("linear_distillation", n, v, t, args.device, d=d) for n, d, v in args.shapes for t in args.dtypes]
    if args.linear or args.step:
        op = "linear_cross_entropy" if args.linear else "training_step"
        return [Case(op, n, v, t, args.device, d=d, extras=extras) for n, d, v in args.shapes for t in args.dtypes]
    return [Case("cross_entropy", n, v, t, args.device, extras=extras) for n, v in args.shapes for t in args.dtypes]
