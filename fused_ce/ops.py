"""The registered ops of fused_ce: fake kernels and autograd.

The schemas and the CPU/CUDA kernels live in ``csrc/``. The forward op returns
per-row statistics (see ``csrc/common/ce_math.h``)::

    loss_i = sum_c T_c (lse_i - z_c),   lse_i = logsumexp(z_i),   mass_i = sum_c T_c

for the target distribution ``T`` that ``F.cross_entropy``'s options define. Its
backward needs only the logits and ``lse``: ``grad_c = p_coef * softmax_c - t_coef * T_c``
with ``p_coef = dL/dloss * mass + dL/dlse`` and ``t_coef = dL/dloss``.

The fused op (the training path) returns the per-row objective
``row_scale_i * loss_i + z_scale_i * lse_i**2`` and, computed in the same pass, its
gradient; its backward hands that buffer on, touching only the rows whose upstream
gradient is not exactly 1.

Backward through the kernels is first-order. With ``create_graph=True`` (double
backward: gradient penalties, Hessian-vector products) the gradient is composed from
differentiable torch ops instead (:func:`gradient_by_formula`), materialising the
softmax -- correct, not fast.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the kernels' arithmetic and of every per-row tensor: float64 for float64 logits, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Fixed when fused_ce._C is loaded (before this module); a constant, so that
# torch.compile traces the device check without a graph break.
_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("fused_ce::cross_entropy_forward", "CUDA")


def cuda_kernels_available() -> bool:
    """Whether this build of fused_ce has its CUDA kernels (it may still see no GPU)."""
    return _CUDA_KERNELS


@torch.library.register_fake("fused_ce::cross_entropy_forward")
def _forward_fake(
    logits, target, weight, ignore_index, label_smoothing, softcap, vocab_start=0, vocab_total=-1, logit_scale=1.0,
    temperature=1.0,
):
    rows = logits.new_empty(logits.shape[0], dtype=accumulate_dtype(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("fused_ce::cross_entropy_forward.stats")
def _forward_stats_fake(*args, **kwargs):
    loss, lse, mass = _forward_fake(*args, **kwargs)
    return loss, lse, mass, loss.new_empty(loss.shape, dtype=torch.long), torch.empty_like(loss)


@torch.library.register_fake("fused_ce::cross_entropy_backward")
def _backward_fake(
    logits, target, weight, lse, p_coef, t_coef, ignore_index, label_smoothing, softcap, vocab_start=0, vocab_total=-1,
    logit_scale=1.0, temperature=1.0,
):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("fused_ce::cross_entropy_fused")
def _fused_fake(
    logits, target, weight, row_scale, z_scale, ignore_index, label_smoothing, softcap, vocab_start=0, vocab_total=-1,
    logit_scale=1.0, temperature=1.0,
):
    rows = logits.new_empty(logits.shape[0], dtype=accumulate_dtype(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows), logits.new_empty(logits.shape)


@torch.library.register_fake("fused_ce::cross_entropy_fused_")
def _fused_inplace_fake(
    logits, target, weight, row_scale, z_scale, ignore_index, label_smoothing, softcap, vocab_start=0, vocab_total=-1,
    logit_scale=1.0, temperature=1.0,
):
    rows = logits.new_empty(logits.shape[0], dtype=accumulate_dtype(logits.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("fused_ce::scale_rows_")
def _scale_rows_fake(rows, scale):
    return None


def mapped_logits(logits: Tensor, softcap, logit_scale, temperature, dtype: torch.dtype) -> Tensor:
    """The logits the loss sees, ``softcap(logit_scale * x) / temperature`` (LogitMap in common/ce_math.h)."""
    z = logits.to(dtype) * logit_scale
    z = softcap * torch.tanh(z / softcap) if softcap > 0 else z
    return z / temperature


def _logit_slope(z: Tensor, softcap, logit_scale, temperature):
    """dz/dx of mapped_logits, in terms of z."""
    if softcap > 0:
        return (logit_scale / temperature) * (1 - (z * temperature / softcap).square())
    return logit_scale / temperature


def target_distribution(
    logits: Tensor, target: Tensor, weight, ignore_index: int, label_smoothing: float, vocab_start=0, vocab_total=-1
) -> Tensor:
    """T [N, V] (see the module docstring) as torch ops, in the accumulation dtype.

    The logits may hold the classes [vocab_start, vocab_start + V) of vocab_total.
    """
    dtype = accumulate_dtype(logits.dtype)
    num_classes = logits.shape[1]
    smooth = label_smoothing / (num_classes if vocab_total < 0 else vocab_total)
    if target.is_floating_point():
        t = target.to(dtype) * (1.0 - label_smoothing) + smooth
    else:
        valid = target != ignore_index
        local = target - vocab_start
        here = valid & (local >= 0) & (local < num_classes)
        onehot = torch.zeros(logits.shape, dtype=dtype, device=logits.device)
        onehot.scatter_(1, torch.where(here, local, 0).unsqueeze(1), here.unsqueeze(1).to(dtype))
        t = (onehot * (1.0 - label_smoothing) + smooth) * valid.unsqueeze(1)
    return t * weight if weight is not None else t


def gradient_by_formula(logits, target, weight, options, loss_coef, lse_coef_fn, lse=None):
    """d/d logits of sum_i loss_coef_i * loss_i + (terms in lse_i), as differentiable torch ops.

    lse_coef_fn(lse) gives the derivative of the lse terms with respect to lse_i, so
    that it can depend on the (differentiable) lse itself, as the z-loss does.
    """
    ignore_index, label_smoothing, softcap, vocab_start, vocab_total, logit_scale, temperature = options
    dtype = accumulate_dtype(logits.dtype)
    z = mapped_logits(logits, softcap, logit_scale, temperature, dtype)
    if vocab_total < 0 or vocab_total == logits.shape[1]:
        lse = torch.logsumexp(z, dim=1)
    elif lse is None:
        raise RuntimeError("double backward through a vocabulary slice needs the full rows' lse")
    t = target_distribution(logits, target, weight, ignore_index, label_smoothing, vocab_start, vocab_total)
    p_coef = loss_coef * t.sum(1) + lse_coef_fn(lse)
    grad = p_coef.unsqueeze(1) * torch.exp(z - lse.unsqueeze(1)) - loss_coef.unsqueeze(1) * t
    return (grad * _logit_slope(z, softcap, logit_scale, temperature)).to(logits.dtype)


def _options(args) -> tuple:
    """The ops' trailing options, defaults filled in: (ignore_index, label_smoothing, softcap, vocab_start,
    vocab_total, logit_scale, temperature)."""
    return tuple(args) + (0, -1, 1.0, 1.0)[len(args) - 3 :]


def _forward_setup_context(ctx, inputs, output):
    logits, target, weight, *options = inputs
    _, lse, mass, *prediction = output  # the .stats overload: argmax and its logit too
    ctx.save_for_backward(logits, target, weight, lse, mass)
    ctx.options = _options(options)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(mass, *prediction)


def _forward_backward(ctx, grad_loss: Tensor, grad_lse: Tensor, *_grad_mass_and_prediction):
    logits, target, weight, lse, mass = ctx.saved_tensors
    _, label_smoothing, softcap, _, _, logit_scale, temperature = ctx.options
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype)
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            grad_logits = gradient_by_formula(logits, target, weight, ctx.options, grad_loss, lambda _: grad_lse, lse)
        else:
            grad_logits = torch.ops.fused_ce.cross_entropy_backward(
                logits, target, weight, lse, (grad_loss * mass + grad_lse).contiguous(), grad_loss.contiguous(),
                *ctx.options,
            )
    if ctx.needs_input_grad[1] and target.is_floating_point():
        # d loss_i / d q_ic = (1 - label_smoothing) * w_c * (lse_i - z_c): rare (e.g. a
        # learned teacher), so it is composed from torch ops rather than fused.
        z = mapped_logits(logits, softcap, logit_scale, temperature, lse.dtype)
        grad = (lse.unsqueeze(1) - z) * (grad_loss * (1.0 - label_smoothing)).unsqueeze(1)
        if weight is not None:
            grad = grad * weight
        grad_target = grad.to(target.dtype)
    return (grad_logits, grad_target) + (None,) * (ctx.num_inputs - 2)


for _name in ("fused_ce::cross_entropy_forward", "fused_ce::cross_entropy_forward.stats"):
    torch.library.register_autograd(_name, _forward_backward, setup_context=_forward_setup_context)


@torch.library.register_fake("fused_ce::cross_entropy_backward_into_")
def _backward_into_fake(
    grad, logits, target, weight, lse, p_coef, t_coef, keep_where_one, ignore_index, label_smoothing, softcap,
    vocab_start=0, vocab_total=-1, logit_scale=1.0, temperature=1.0,
):
    return None


@torch.library.register_fake("fused_ce::cross_entropy_backward_")
def _backward_inplace_fake(
    logits, target, weight, lse, p_coef, t_coef, ignore_index, label_smoothing, softcap, vocab_start=0, vocab_total=-1,
    logit_scale=1.0, temperature=1.0,
):
    return None


@torch.library.register_fake("fused_ce::cross_entropy_fused.stats")
def _fused_stats_fake(*args, **kwargs):
    objective, lse, mass, grad = _fused_fake(*args, **kwargs)
    return objective, lse, mass, grad, lse.new_empty(lse.shape, dtype=torch.long), torch.empty_like(lse)


@torch.library.register_fake("fused_ce::cross_entropy_fused_.stats")
def _fused_inplace_stats_fake(*args, **kwargs):
    objective, lse, mass = _fused_inplace_fake(*args, **kwargs)
    return objective, lse, mass, lse.new_empty(lse.shape, dtype=torch.long), torch.empty_like(lse)


def _fused_setup_context(ctx, inputs, output):
    logits, target, weight, row_scale, z_scale, *options = inputs
    _objective, lse, mass, grad, *prediction = output
    ctx.save_for_backward(logits, target, weight, row_scale, z_scale, lse, mass)
    # Held outside save_for_backward (detached: no cycle through a grad_fn): the first
    # eager backward writes into this very buffer and hands it on, then drops it here.
    # (Saved, the write would bump its version and a second backward would refuse it.)
    ctx.grad = grad.detach()
    ctx.options = _options(options)
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, mass, grad, *prediction)
    # Otherwise autograd would zero-fill an N x V gradient for the `grad` output.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_objective: Tensor | None, *_grad_others):
    no_grads = (None,) * (ctx.num_inputs - 1)
    if grad_objective is None:
        return (None,) + no_grads
    logits, target, weight, row_scale, z_scale, lse, mass = ctx.saved_tensors
    g = grad_objective.to(lse.dtype)
    if torch.is_grad_enabled():  # create_graph=True
        z_coef = None if z_scale is None else 2 * g * z_scale
        grad = gradient_by_formula(
            logits, target, weight, ctx.options, g * row_scale, lambda lse_: 0 if z_coef is None else z_coef * lse_, lse
        )
        return (grad,) + no_grads
    t_coef = (g * row_scale).contiguous()
    p_coef = (t_coef * mass + (0 if z_scale is None else 2 * g * z_scale * lse)).contiguous()
    grad, ctx.grad = ctx.grad, None
    if grad is None or type(g) is not torch.Tensor or torch.compiler.is_compiling():
        # A second backward through the same graph (retain_graph, gradcheck): the
        # buffer was handed on, so compute afresh from the logits. Also when traced
        # (AOTAutograd's functional tensors): a traced graph must not mutate a
        # buffer the forward made.
        grad = torch.ops.fused_ce.cross_entropy_backward(logits, target, weight, lse, p_coef, t_coef, *ctx.options)
    else:
        # The forward pass wrote d(objective_i)/d(logits_i). Rows whose upstream
        # gradient is exactly 1 -- every row after a plain loss.backward() -- hold
        # their gradient already and are not touched (decided on the device); the
        # others are recomputed from the logits with the upstream folded in, so the
        # result is rounded once, as in the two-pass path.
        torch.ops.fused_ce.cross_entropy_backward_into_(
            grad, logits, target, weight, lse, p_coef, t_coef, g, *ctx.options
        )
    return (grad,) + no_grads


for _name in ("fused_ce::cross_entropy_fused", "fused_ce::cross_entropy_fused.stats"):
    torch.library.register_autograd(_name, _fused_backward, setup_context=_fused_setup_context)


@torch.library.register_fake("fused_ce::entropy_forward")
def _entropy_forward_fake(logits, temperature=1.0):
    rows = logits.new_empty(logits.shape[0], dtype=accumulate_dtype(logits.dtype))
    return rows, torch.empty_like(rows)


@torch.library.register_fake("fused_ce::entropy_backward")
def _entropy_backward_fake(logits, entropy, lse, grad_entropy, temperature=1.0):
    return logits.new_empty(logits.shape)


def _entropy_setup_context(ctx, inputs, output):
    logits, *temperature = inputs
    entropy, lse = output
    ctx.save_for_backward(logits, entropy, lse)
    ctx.temperature = temperature[0] if temperature else 1.0
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse)


def _entropy_backward(ctx, grad_entropy: Tensor, _grad_lse):
    logits, entropy, lse = ctx.saved_tensors
    g = grad_entropy.to(lse.dtype)
    t = ctx.temperature
    if torch.is_grad_enabled():  # create_graph=True: dH/dx = p (lse - z - H) / T as torch ops
        z = logits.to(lse.dtype) / t
        logp = torch.log_softmax(z, dim=1)
        p = logp.exp()
        h = -(torch.xlogy(p, p)).sum(1, keepdim=True)
        grad = (g / t).unsqueeze(1) * torch.where(p == 0, 0.0, p * (-logp - h))
        return (grad.to(logits.dtype),) + (None,) * (ctx.num_inputs - 1)
    grad = torch.ops.fused_ce.entropy_backward(logits, entropy, lse, g, t)
    return (grad,) + (None,) * (ctx.num_inputs - 1)


torch.library.register_autograd("fused_ce::entropy_forward", _entropy_backward, setup_context=_entropy_setup_context)


# -- distillation (common/distill_math.h) --------------------------------------------------


@torch.library.register_fake("fused_ce::distill_forward")
def _distill_forward_fake(student, teacher, kind, beta, temperature):
    rows = student.new_empty(student.shape[0], dtype=accumulate_dtype(student.dtype))
    return rows, torch.empty_like(rows), torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("fused_ce::distill_backward")
def _distill_backward_fake(student, teacher, aux, lse_student, lse_teacher, grad_loss, kind, beta, temperature):
    return student.new_empty(student.shape)


def distill_grad_by_formula(student, teacher, g, kind: int, beta: float, temperature: float) -> Tensor:
    """g_i * d divergence_i / d student (common/distill_math.h) as differentiable torch ops (double backward)."""
    dtype = accumulate_dtype(student.dtype)
    ls = torch.log_softmax(student.to(dtype) / temperature, dim=1)
    lt = torch.log_softmax(teacher.to(dtype) / temperature, dim=1)
    p, q = ls.exp(), lt.exp()
    if kind == 0:
        grad = p - q
    else:
        r = ls - lt if kind == 1 else ls - torch.log(beta * q + (1 - beta) * p)
        terms = torch.where(p == 0, 0.0, p * r)
        grad = (1.0 if kind == 1 else 1 - beta) * torch.where(p == 0, 0.0, p * (r - terms.sum(1, keepdim=True)))
    return (grad * (g / temperature).unsqueeze(1)).to(student.dtype)


def _distill_setup_context(ctx, inputs, output):
    student, teacher, kind, beta, temperature = inputs
    _loss, aux, lse_student, lse_teacher = output
    ctx.save_for_backward(student, teacher, aux, lse_student, lse_teacher)
    ctx.options = (kind, beta, temperature)
    ctx.mark_non_differentiable(aux, lse_student, lse_teacher)


def _distill_backward(ctx, grad_loss, _grad_aux, _grad_lse_student, _grad_lse_teacher):
    student, teacher, aux, lse_student, lse_teacher = ctx.saved_tensors
    if grad_loss is None or not ctx.needs_input_grad[0]:
        return (None,) * 5
    g = grad_loss.to(aux.dtype)
    if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
        return (distill_grad_by_formula(student, teacher, g, *ctx.options),) + (None,) * 4
    grad = torch.ops.fused_ce.distill_backward(
        student, teacher, aux, lse_student, lse_teacher, g.contiguous(), *ctx.options
    )
    return (grad,) + (None,) * 4


torch.library.register_autograd("fused_ce::distill_forward", _distill_backward, setup_context=_distill_setup_context)
