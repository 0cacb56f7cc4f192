"""Distillation through two LM heads without their logits: ``linear_distillation_loss``.

``distillation_loss(F.linear(h_s, W_s), F.linear(h_t, W_t))`` makes two ``N x V``
logits tensors (and in training their softmaxes and a gradient as large): at
16384 x 128256 bf16 that is 4 GB each. Here both heads' logits are made a chunk of
rows at a time into two reused buffers and consumed at once:

* per chunk of rows, ``S = h_s W_s^T (+ b_s)`` and ``T = h_t W_t^T (+ b_t)`` over the
  whole vocabulary (the divergence needs whole rows; chunk rows from the budget:
  :func:`~fused_ce.linear.plan.distill_chunk_rows`);
* the divergence per row (``distill_forward``), and when training the student
  logits' gradient (``distill_backward`` with the row scales of the reduction), to
  which the hard-label term adds its own (``cross_entropy_fused_`` written over ``S``);
* that gradient absorbed at once: ``grad_h_s = G W_s``, ``grad_W_s += G^T h_s``,
  ``grad_b_s += G.sum(0)``.

One op, ``fused_ce::linear_distillation``, serves forward and backward: it returns the
objective ``sum_i div_scale_i * div_i + ce_scale_i * ce_i``, the per-row divergence and
cross-entropy, and -- where asked -- the student's gradients of that objective.
Training with a 'mean'/'sum'/'batchmean' reduction computes them in forward, and
backward only scales them by the upstream scalar; ``'none'`` (a per-row upstream) and a
second backward call the op again with the upstream as the row scales.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _checks as checks
from .._reduce import nan_if_empty, result_dtype, safe_inverse
from .._rows import target_rows
from ..distill import KINDS, check_options, check_teacher_takes_no_grad
from ..ops import accumulate_dtype
from .api import _autocast_operands, check_linear_operands
from .loops import Head, _Blocks, _Gradients, _no_autocast, _times  # _times: 0 where the scale is 0
from .ops import _in_dtypes, _scaled_gradients
from .plan import distill_chunk_rows

_STUDENT = ("student_input", "student_weight", "student_bias")
_TEACHER = ("teacher_input", "teacher_weight", "teacher_bias")


def _head(input, weight, bias, target, ignore_index, rows) -> Head:
    return Head(input, weight, bias, target, None, ignore_index, 0.0, 0.0, rows)


def distill_objective_and_gradients(
    student: Head, teacher: Head, div_scale: Tensor, ce_scale: Tensor | None, kind: int, beta: float,
    temperature: float, needs: tuple[bool, bool, bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loop over chunks of rows (see the module docstring).

    Returns ``(objective [], divergence [N], cross-entropy [N], grad_input [N, D],
    grad_weight [V, D], grad_bias [V])`` -- the rows and objective in the accumulation
    dtype, the gradients too (they sum over chunks), an empty tensor for each one not
    asked for; the cross-entropy rows are empty without ``ce_scale``.
    """
    student, teacher = student.in_compute_dtype(), teacher.in_compute_dtype()
    acc = accumulate_dtype(student.input.dtype)
    n = student.num_rows
    divergence = student.input.new_empty(n, dtype=acc)
    cross_entropy = student.input.new_empty(n if ce_scale is not None else 0, dtype=acc)
    objective = student.input.new_zeros((), dtype=acc)
    grads = _Gradients(student, needs, acc)
    s_blocks, t_blocks = _Blocks(student), _Blocks(teacher)
    vocab = slice(0, student.num_classes)
    ce_options = (None, student.ignore_index, 0.0, 0.0, 0, -1, 1.0, 1.0)  # no class weight, plain logits
    with _no_autocast(student):
        for rows in s_blocks.row_chunks():
            s, t = s_blocks.logits(rows, vocab), t_blocks.logits(rows, vocab)
            div, aux, lse_s, lse_t = torch.ops.fused_ce.distill_forward(s, t, kind, beta, temperature)
            divergence[rows] = div
            objective += _times(div_scale[rows], div).sum()
            grad = None
            if any(needs):
                grad = torch.ops.fused_ce.distill_backward(s, t, aux, lse_s, lse_t, div_scale[rows].contiguous(),
                                                           kind, beta, temperature)
            if ce_scale is not None:
                target = student.target[rows]
                if grad is None:
                    ce, _lse, _mass = torch.ops.fused_ce.cross_entropy_forward(s, target, *ce_options)
                else:  # s becomes d ce_i / d s (unit row scales), folded into the gradient with ce_scale
                    ones = torch.ones_like(ce_scale[rows])
                    ce, _lse, _mass = torch.ops.fused_ce.cross_entropy_fused_(s, target, None, ones, None,
                                                                              *ce_options[1:])
                    grad.addcmul_(s, ce_scale[rows].to(s.dtype).unsqueeze(1))
                cross_entropy[rows] = ce
                objective += _times(ce_scale[rows], ce).sum()
            if grad is not None:
                grads.add(rows, vocab, grad)
    return (objective, divergence, cross_entropy) + grads.result()


@torch.library.custom_op("fused_ce::linear_distillation", mutates_args=())
def distill_op(
    student_input: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    target: Tensor,
    div_scale: Tensor,
    ce_scale: Tensor | None,
    kind: int,
    beta: float,
    temperature: float,
    ignore_index: int,
    chunk_rows: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(objective [], divergence [N], cross-entropy [N], grad_input, grad_weight, grad_bias): see
    distill_objective_and_gradients. ``target`` [N] int64 (empty without the hard-label term)."""
    student = _head(student_input, student_weight, student_bias, target, ignore_index, chunk_rows)
    teacher = _head(teacher_input, teacher_weight, teacher_bias, target, ignore_index, chunk_rows)
    needs = (input_grad, weight_grad, bias_grad and student_bias is not None)
    return distill_objective_and_gradients(student, teacher, div_scale, ce_scale, kind, beta, temperature, needs)


@distill_op.register_fake
def _(student_input, student_weight, student_bias, teacher_input, teacher_weight, teacher_bias, target, div_scale,
      ce_scale, kind, beta, temperature, ignore_index, chunk_rows, input_grad, weight_grad, bias_grad):
    acc = accumulate_dtype(student_input.dtype)
    n = student_input.shape[0]
    needs = (input_grad, weight_grad, bias_grad and student_bias is not None)
    shapes = (student_input.shape, student_weight.shape, student_weight.shape[:1])
    grads = tuple(student_input.new_empty(s if need else (0,), dtype=acc) for s, need in zip(shapes, needs))
    rows = (student_input.new_empty(n, dtype=acc), student_input.new_empty(n if ce_scale is not None else 0, dtype=acc))
    return (student_input.new_empty((), dtype=acc),) + rows + grads


def _setup_context(ctx, inputs, output):
    (s_input, s_weight, s_bias, t_input, t_weight, t_bias, target, div_scale, ce_scale, *options,
     input_grad, weight_grad, bias_grad) = inputs
    *_rows, grad_input, grad_weight, grad_bias = output
    ctx.save_for_backward(s_input, s_weight, s_bias, t_input, t_weight, t_bias, target, div_scale, ce_scale)
    ctx.options = tuple(options)
    # The gradients made in forward, held as the linear path's fused op holds them.
    made = input_grad or weight_grad or bias_grad
    ctx.grads = [grad_input.detach(), grad_weight.detach(), grad_bias.detach()] if made else None
    ctx.mark_non_differentiable(grad_input, grad_weight, grad_bias)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_objective, grad_divergence, grad_cross_entropy, *_grad_grads):
    none = (None,) * 14
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:3])
    if not any(needs) or (grad_objective is None and grad_divergence is None and grad_cross_entropy is None):
        return (None,) * 3 + none
    if torch.is_grad_enabled():
        raise NotImplementedError(
            "double backward (create_graph=True) through linear_distillation_loss is not supported; "
            "use fused_ce.distillation_loss on the logits"
        )
    s_input, s_weight, s_bias, t_input, t_weight, t_bias, target, div_scale, ce_scale = ctx.saved_tensors
    inputs = (s_input, s_weight, s_bias)
    if ctx.grads is not None and grad_objective is not None and grad_divergence is None and grad_cross_entropy is None:
        return _scaled_gradients(ctx, grad_objective.to(div_scale.dtype), inputs, needs) + none
    # The upstream as row scales: d/d rows of (g * objective + <g_div, div> + <g_ce, ce>).
    g = 0 if grad_objective is None else grad_objective.to(div_scale.dtype)
    div_coef = g * div_scale + (0 if grad_divergence is None else grad_divergence.to(div_scale.dtype))
    ce_coef = None
    if ce_scale is not None:
        ce_coef = g * ce_scale + (0 if grad_cross_entropy is None else grad_cross_entropy.to(ce_scale.dtype))
    _obj, _div, _ce, *grads = distill_op(s_input, s_weight, s_bias, t_input, t_weight, t_bias, target,
                                         div_coef, ce_coef, *ctx.options, *needs)
    return _in_dtypes(grads, inputs, needs) + none


distill_op.register_autograd(_backward, setup_context=_setup_context)


def linear_distillation_loss(
    student_input: Tensor,
    student_weight: Tensor,
    teacher_input: Tensor,
    teacher_weight: Tensor,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    alpha: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    loss_dtype: torch.dtype | None = None,
) -> Tensor:
    """:func:`fused_ce.distillation_loss` of ``F.linear(student_input, student_weight, student_bias)``
    against ``F.linear(teacher_input, teacher_weight, teacher_bias)``, without either's logits.

    The options are :func:`fused_ce.distillation_loss`'s (``kind``, ``beta``,
    ``temperature``, ``target``/``ignore_index``, ``alpha``'s hard-label term,
    ``reduction``, ``loss_dtype``); the logits are made a chunk of rows at a time
    (see :mod:`fused_ce.linear.distill`), so memory beyond the gradients is
    ``3 x rows x V`` (``chunk_size`` rows; None: from the linear path's budget,
    ``FUSED_CE_LINEAR_CHUNK_MB``).

    Args:
        student_input: ``(..., D_s)`` hidden states; float32/float64/float16/bfloat16.
        student_weight: ``(V, D_s)``, the student's LM head, student_input's dtype.
        teacher_input: ``(..., D_t)`` with student_input's batch shape and dtype.
        teacher_weight: ``(V, D_t)``, the teacher's LM head, same V. The teacher gets
            no gradient: teacher tensors that require grad in grad mode are refused.
        student_bias, teacher_bias: optional ``(V)`` biases.

    Returns:
        The loss: a scalar, or the batch shape for ``'none'``. Gradients reach the
        student's input, weight and bias (not through ``create_graph=True``).
    """
    check_options(kind, beta, temperature, alpha, reduction, ignore_index, target)
    student_input, student_weight, student_bias = _autocast_operands(student_input, student_weight, student_bias)
    teacher_input, teacher_weight, teacher_bias = _autocast_operands(teacher_input, teacher_weight, teacher_bias)
    check_linear_operands(student_input, student_weight, student_bias, _STUDENT)
    check_linear_operands(teacher_input, teacher_weight, teacher_bias, _TEACHER)
    for tensor, name in zip((teacher_input, teacher_weight, teacher_bias), _TEACHER):
        check_teacher_takes_no_grad(tensor, name)
    batch_shape, num_classes = student_input.shape[:-1], student_weight.shape[0]
    if teacher_input.shape[:-1] != batch_shape:
        raise checks.ArgumentError(f"teacher_input must have student_input's batch shape {tuple(batch_shape)}, "
                                   f"got {tuple(teacher_input.shape[:-1])}")
    if teacher_weight.shape[0] != num_classes:
        raise checks.ArgumentError(f"teacher_weight must have student_weight's {num_classes} classes (rows), "
                                   f"got {teacher_weight.shape[0]}")
    if teacher_input.dtype != student_input.dtype:
        raise checks.ArgumentTypeError(f"teacher_input must have student_input's dtype ({student_input.dtype}), "
                                       f"got {teacher_input.dtype}")
    checks.check_same_device(teacher_input, "teacher_input", student_input.device, "student_input")
    device, n = student_input.device, math.prod(batch_shape)
    acc = accumulate_dtype(student_input.dtype)
    chunk_rows = distill_chunk_rows(num_classes, student_input.dtype, device, chunk_size)

    labels, valid = student_input.new_empty(0, dtype=torch.long), None
    if target is not None:
        checks.check_target_device(target, device, "student_input")
        labels = target_rows(target, batch_shape=batch_shape, probs_shape=(*batch_shape, num_classes), class_dim=-1,
                             probs_dtype=None, probs_allowed=False)
        valid = labels != ignore_index
        if alpha > 0:
            checks.validate_targets_if_asked(labels, num_classes, ignore_index)
    counted = student_input.new_ones(n, dtype=acc) if valid is None else valid.to(acc)
    count = n if valid is None else valid.sum()
    batch_size = batch_shape[0] if len(batch_shape) > 0 else 1
    if reduction == "mean":
        row_scale = counted * safe_inverse(count, acc)
    elif reduction == "batchmean":
        row_scale = counted * safe_inverse(batch_size, acc)
    else:
        row_scale = counted
    div_scale = (1 - alpha) * row_scale
    ce_scale = alpha * row_scale if alpha > 0 else None

    grad_on = torch.is_grad_enabled()
    needs = (grad_on and student_input.requires_grad, grad_on and student_weight.requires_grad,
             grad_on and student_bias is not None and student_bias.requires_grad)
    fused = reduction != "none"
    objective, divergence, cross_entropy, *_grads = distill_op(
        student_input.reshape(n, student_input.shape[-1]), student_weight, student_bias,
        teacher_input.reshape(n, teacher_input.shape[-1]).detach(),
        teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach(), labels, div_scale,
        ce_scale, KINDS[kind], beta * 1.0, temperature * 1.0, ignore_index, chunk_rows,
        *(need and fused for need in needs),
    )
    out_dtype = result_dtype(student_input.dtype, device.type, loss_dtype)
    if fused:
        if reduction == "mean":
            objective = nan_if_empty(objective, count)
        elif reduction == "batchmean":
            objective = nan_if_empty(objective, batch_size)
        return objective.to(out_dtype)
    loss = (1 - alpha) * divergence
    if ce_scale is not None:
        loss = loss + alpha * cross_entropy
    if valid is not None:
        loss = torch.where(valid, loss, 0.0)
    return loss.reshape(batch_shape).to(out_dtype)

__all__ = ["distill_op", "linear_distillation_loss"]
