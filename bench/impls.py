"""The implementations the CE benchmark compares, one registry per op.

A builder turns a :class:`cases.Case` into a loss function -- ``(logits, target) ->
loss`` for ``cross_entropy``, ``(x, W, target) -> loss`` for ``--linear``, ``(h, W,
target) -> loss of h @ W.T`` for ``--step`` -- or into an :class:`Impl` that says more
about it. It raises :class:`ImplUnavailable` for a case it cannot run, e.g. for a new
flag of fused_ce::

    @register_impl("fused_ce.inplace")
    def _fused_ce_inplace(case):
        return functools.partial(fused_ce.cross_entropy, inplace_backward=True, **extras(case))

With ``--extras`` (``case.extras``) every implementation gets :data:`EXTRAS` or
raises ``ImplUnavailable`` saying which of them it does not take: a benchmark
measures what it says.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

import fused_ce
from cases import Case
from harness import reason

# --extras: the options every implementation gets (or is skipped).
EXTRAS = {"label_smoothing": 0.1, "z_loss": 1e-4, "softcap": 30.0}

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Impl:
    """A loss function, and whether each call needs a fresh copy of its inputs.

    ``fresh_input_copy``: the function overwrites its inputs (Liger-Kernel writes the
    gradient into the logits): every call gets a copy, made outside the timed region.
    """

    fn: LossFn
    fresh_input_copy: bool = False


class ImplUnavailable(Exception):
    """Raised by an implementation's builder for a case it cannot run; the message says why."""


ImplBuilder = Callable[[Case], "LossFn | Impl"]
IMPLS: dict[str, ImplBuilder] = {}
LINEAR_IMPLS: dict[str, ImplBuilder] = {}  # --linear: builders of (x, W, target) -> loss
STEP_IMPLS: dict[str, ImplBuilder] = {}  # --step: builders of (h, W, target) -> loss of h @ W.T
DISTILL_IMPLS: dict[str, ImplBuilder] = {}  # --distill: builders of (student, teacher, labels) -> loss
# --linear-distill: builders of (student x, student W, teacher x, teacher W, labels) -> loss
LINEAR_DISTILL_IMPLS: dict[str, ImplBuilder] = {}

FRESH_COPY_NOTE = (
    "overwrites its input with the gradient: each call got a fresh copy of the inputs, "
    "made outside the timed region (not in ms; peak MB is beyond the copy)"
)


def register_impl(name: str, registry: dict[str, ImplBuilder] = IMPLS) -> Callable[[ImplBuilder], ImplBuilder]:
    """Registers ``builder(case) -> loss function`` under ``name`` (in ``registry``)."""

    def decorator(builder: ImplBuilder) -> ImplBuilder:
        registry[name] = builder
        return builder

    return decorator


def register_linear_impl(name: str) -> Callable[[ImplBuilder], ImplBuilder]:
    """Registers ``builder(case) -> (x, W, target) -> loss`` for ``--linear``."""
    return register_impl(name, LINEAR_IMPLS)


def registry(op: str) -> dict[str, ImplBuilder]:
    registries = {"linear_cross_entropy": LINEAR_IMPLS, "training_step": STEP_IMPLS, "distillation": DISTILL_IMPLS,
                  "linear_distillation": LINEAR_DISTILL_IMPLS}
    return registries.get(op, IMPLS)


def extras(case: Case) -> dict[str, float]:
    """The options of ``--extras`` for fused_ce's keyword arguments ({} without it)."""
    return dict(EXTRAS) if case.extras else {}


def build_impls(case: Case, names: Sequence[str]) -> tuple[dict[str, Impl], dict[str, str]]:
    """The named implementations for ``case``, and why the others are unavailable."""
    builders = registry(case.op)
    built, unavailable = {}, {}
    for name in names:
        try:
            impl = builders[name](case)
        except Exception as e:  # ImplUnavailable, or a builder that failed
            unavailable[name] = reason(e)
        else:
            built[name] = impl if isinstance(impl, Impl) else Impl(impl)
    return built, unavailable


def _require_cuda_kernels(case: Case) -> None:
    if case.device.type == "cuda" and not fused_ce.cuda_kernels_available():
        raise ImplUnavailable("this build of fused_ce has no CUDA kernels")


def _require_cuda(case: Case, what: str) -> None:
    if case.device.type != "cuda":
        raise ImplUnavailable(f"{what}'s Triton kernels need a CUDA device")


def _refuse_extras(case: Case, what: str, missing: str) -> None:
    if case.extras:
        raise ImplUnavailable(f"{what} does not take {missing}")


def torch_loss(options: Mapping[str, float]) -> LossFn:
    """Eager ``F.cross_entropy``; with the extras composed from torch ops.

    Soft-cap ``c * tanh(z / c)``, then ``F.cross_entropy(label_smoothing=)``, plus
    ``z_loss * mean(logsumexp(z)**2)`` over the counted rows (the targets that are
    not ``ignore_index``), as fused_ce defines them.
    """
    if not options:
        return lambda logits, target: F.cross_entropy(logits, target)
    cap, smoothing, z_loss = options["softcap"], options["label_smoothing"], options["z_loss"]

    def loss(logits: Tensor, target: Tensor) -> Tensor:
        z = cap * torch.tanh(logits / cap)
        counted = target != -100  # F.cross_entropy's ignore_index
        lse_squared = torch.logsumexp(z.float(), dim=-1).square()
        z_term = (lse_squared * counted).sum() / counted.sum()
        return F.cross_entropy(z, target, label_smoothing=smoothing) + z_loss * z_term

    return loss


def _compiled(fn: LossFn) -> LossFn:
    # Dynamo caches compiled code on a function's code object, which every
    # torch.compile wrapper of it shares: reset, so that earlier cases neither count
    # towards the recompile limit (past which it would silently run eagerly) nor stay
    # in memory. Compilation itself happens at the first call, in warm-up.
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)


def _liger_options(case: Case) -> dict[str, float]:
    """Liger-Kernel's names for the extras (its z-loss is ``lse_square_scale``)."""
    if not case.extras:
        return {}
    return {
        "label_smoothing": EXTRAS["label_smoothing"],
        "lse_square_scale": EXTRAS["z_loss"],
        "softcap": EXTRAS["softcap"],
    }


def _liger_loss(case: Case, class_name: str, module: str):
    """An instance of Liger-Kernel's loss module ``class_name``, with the extras."""
    _require_cuda(case, "Liger-Kernel")
    try:
        loss_class = getattr(importlib.import_module(module), class_name)
    except (ImportError, AttributeError) as e:
        raise ImplUnavailable(f"liger-kernel is not importable ({e})") from None
    try:
        return loss_class(**_liger_options(case))
    except TypeError as e:  # an older Liger-Kernel without softcap
        raise ImplUnavailable(f"this liger-kernel does not take the extras ({e})") from None


# --------------------------------------------------------------------------- cross_entropy


@register_impl("fused_ce")
def _fused_ce(case: Case) -> LossFn:
    _require_cuda_kernels(case)
    options = extras(case)
    return lambda logits, target: fused_ce.cross_entropy(logits, target, **options)


@register_impl("fused_ce.stats")
def _fused_ce_stats(case: Case) -> LossFn:
    """return_stats=True: the argmax tracked in the same pass (what it costs against plain fused_ce)."""
    _require_cuda_kernels(case)
    options = extras(case)
    return lambda logits, target: fused_ce.cross_entropy(logits, target, return_stats=True, **options).loss


@register_impl("torch")
def _torch(case: Case) -> LossFn:
    return torch_loss(extras(case))


@register_impl("torch.compile")
def _torch_compile(case: Case) -> LossFn:
    return _compiled(torch_loss(extras(case)))


@register_impl("liger")
def _liger(case: Case) -> Impl:
    loss = _liger_loss(case, "LigerCrossEntropyLoss", "liger_kernel.transformers.cross_entropy")
    return Impl(lambda logits, target: loss(logits, target), fresh_input_copy=True)


# --------------------------------------------------------------------------- --step


def _step(loss_fn: LossFn) -> LossFn:
    return lambda h, w, target: loss_fn(h @ w.T, target)


@register_impl("torch", STEP_IMPLS)
def _step_torch(case: Case) -> LossFn:
    return _step(torch_loss(extras(case)))


@register_impl("torch.compile", STEP_IMPLS)
def _step_torch_compile(case: Case) -> LossFn:
    return _compiled(_step(torch_loss(extras(case))))


@register_impl("fused_ce", STEP_IMPLS)
def _step_fused_ce(case: Case) -> LossFn:
    return _step(_fused_ce(case))


@register_impl("fused_ce.inplace", STEP_IMPLS)
def _step_fused_ce_inplace(case: Case) -> LossFn:
    _require_cuda_kernels(case)
    options = extras(case)
    return _step(lambda logits, target: fused_ce.cross_entropy(logits, target, inplace_backward=True, **options))


# --------------------------------------------------------------------------- --linear


@register_linear_impl("fused_ce")
def _linear_fused_ce(case: Case) -> LossFn:
    _require_cuda_kernels(case)
    options = extras(case)
    return lambda x, w, target: fused_ce.linear_cross_entropy(x, w, target, **options)


@register_linear_impl("torch")
def _linear_torch(case: Case) -> LossFn:
    loss = torch_loss(extras(case))
    return lambda x, w, target: loss(F.linear(x, w), target)


@register_linear_impl("torch.chunked")
def _linear_torch_chunked(case: Case) -> LossFn:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        raise ImplUnavailable(f"torch {torch.__version__} has no F.linear_cross_entropy (torch >= 2.13)")
    _refuse_extras(case, "F.linear_cross_entropy", "z_loss/softcap")
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, target: F.linear_cross_entropy(x, w, target, options=options)


@register_linear_impl("liger")
def _linear_liger(case: Case) -> LossFn:
    loss = _liger_loss(case, "LigerFusedLinearCrossEntropyLoss", "liger_kernel.transformers")
    return lambda x, w, target: loss(w, x, target)


@register_linear_impl("cce")
def _linear_cce(case: Case) -> LossFn:
    _require_cuda(case, "cut-cross-entropy")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy
    except ImportError as e:
        raise ImplUnavailable(f"cut-cross-entropy is not importable ({e})") from None
    _refuse_extras(case, "cut-cross-entropy's linear_cross_entropy", "label_smoothing/z_loss")
    return lambda x, w, target: cce_linear_cross_entropy(x, w, target)


# --------------------------------------------------------------------------- --distill
# The forward KL, KL(teacher || student), averaged over rows; the teacher gets no gradient.


@register_impl("fused_ce", DISTILL_IMPLS)
def _distill_fused_ce(case: Case) -> LossFn:
    return lambda s, t, _labels: fused_ce.distillation_loss(s, t.detach(), reduction="batchmean")


def _distill_torch_fn(s: Tensor, t: Tensor, _labels: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(s, -1), F.log_softmax(t.detach(), -1), log_target=True, reduction="batchmean")


@register_impl("torch", DISTILL_IMPLS)
def _distill_torch(case: Case) -> LossFn:
    return _distill_torch_fn


@register_impl("torch.compile", DISTILL_IMPLS)
def _distill_torch_compile(case: Case) -> LossFn:
    return _compiled(_distill_torch_fn)


# --------------------------------------------------------------------------- --linear-distill
# The same loss through two LM heads: logits = x @ W.T for the student and the teacher.


@register_impl("fused_ce", LINEAR_DISTILL_IMPLS)
def _linear_distill_fused_ce(case: Case) -> LossFn:
    return lambda xs, ws, xt, wt, _labels: fused_ce.linear_distillation_loss(
        xs, ws, xt.detach(), wt.detach(), reduction="batchmean"
    )


@register_impl("fused_ce.logits", LINEAR_DISTILL_IMPLS)
def _linear_distill_fused_ce_logits(case: Case) -> LossFn:
    """Both heads' logits materialised, then fused_ce.distillation_loss."""
    return lambda xs, ws, xt, wt, _labels: fused_ce.distillation_loss(
        F.linear(xs, ws), F.linear(xt.detach(), wt.detach()), reduction="batchmean"
    )


def _linear_distill_torch_fn(xs: Tensor, ws: Tensor, xt: Tensor, wt: Tensor, labels: Tensor) -> Tensor:
    return _distill_torch_fn(F.linear(xs, ws), F.linear(xt.detach(), wt.detach()), labels)


@register_impl("torch", LINEAR_DISTILL_IMPLS)
def _linear_distill_torch(case: Case) -> LossFn:
    return _linear_distill_torch_fn


@register_impl("torch.compile", LINEAR_DISTILL_IMPLS)
def _linear_distill_torch_compile(case: Case) -> LossFn:
    return _compiled(_linear_distill_torch_fn)
