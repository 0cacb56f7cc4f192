"""The linear path's custom ops (torch.library, so torch.compile and opcheck see them) and their autograd.

* ``fused_ce::linear_cross_entropy_fused`` -- the training path of 'mean'/'sum': the
  summed objective ``sum_i row_scale_i * loss_i + z_scale_i * lse_i**2`` and its
  gradients, computed in forward; backward only scales them by the upstream scalar;
* ``fused_ce::linear_cross_entropy_forward`` -- per-row ``(loss, lse, mass)``;
* ``fused_ce::linear_cross_entropy_backward`` -- the gradients for per-row
  coefficients ``p_coef``, ``t_coef`` (see fused_ce/ops.py), used by the other two's
  backward when the gradient cannot be computed ahead: ``reduction='none'`` (its
  upstream is per row), a second backward through the same graph, or no gradient
  wanted in forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import accumulate_dtype, gradient_by_formula
from .loops import Head, fused_objective_and_gradients, shard_gradients, shard_statistics
from .plan import grad_weight_dtype


def _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, logit_scale,
          temperature, rows, classes, stats=False):
    return Head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, rows,
                classes=classes, logit_scale=logit_scale, temperature=temperature, stats=stats)


@torch.library.custom_op("fused_ce::linear_cross_entropy_forward", mutates_args=())
def forward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    logit_scale: float,
    temperature: float,
    chunk_rows: int,
    chunk_classes: int,
    with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, lse, mass, argmax, max logit) ``[N]`` of ``cross_entropy_forward(input @ linear_weight.T +
    linear_bias)``; the last two empty without ``with_stats``."""
    head = _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap,
                 logit_scale, temperature, chunk_rows, chunk_classes, with_stats)
    return _with_prediction(shard_statistics(head), input)


@torch.library.custom_op("fused_ce::linear_cross_entropy_backward", mutates_args=())
def backward_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    lse: Tensor,
    p_coef: Tensor,
    t_coef: Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    logit_scale: float,
    temperature: float,
    chunk_rows: int,
    chunk_classes: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (input [N, D], weight [V, D], bias [V]; accumulation dtype, empty if not asked for)
    of the loss terms with the per-row coefficients p_coef, t_coef (see ops.py)."""
    head = _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap,
                 logit_scale, temperature, chunk_rows, chunk_classes)
    needs = (input_grad, weight_grad, bias_grad and linear_bias is not None)
    return shard_gradients(head, lse, p_coef, t_coef, needs)


@torch.library.custom_op("fused_ce::linear_cross_entropy_fused", mutates_args=())
def fused_op(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    row_scale: Tensor,
    z_scale: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    logit_scale: float,
    temperature: float,
    chunk_rows: int,
    chunk_classes: int,
    input_grad: bool,
    weight_grad: bool,
    bias_grad: bool,
    with_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(objective [], lse [N], mass [N], grad_input, grad_weight, grad_bias, argmax [N], max logit [N]): see
    fused_objective_and_gradients; the last two empty without ``with_stats``."""
    head = _head(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap,
                 logit_scale, temperature, chunk_rows, chunk_classes, with_stats)
    needs = (input_grad, weight_grad, bias_grad and linear_bias is not None)
    return _with_prediction(fused_objective_and_gradients(head, row_scale, z_scale, needs), input)


def _with_prediction(outputs: tuple, input: Tensor) -> tuple:
    """The loops' outputs with (argmax, max logit) at the end: empty ones when the head kept none
    (an op's outputs are fixed in number)."""
    if len(outputs) in (5, 8):
        return outputs
    acc = accumulate_dtype(input.dtype)
    return outputs + (input.new_empty(0, dtype=torch.long), input.new_empty(0, dtype=acc))


def _grad_fakes(input, linear_weight, linear_bias, chunk_rows, needs):
    acc = accumulate_dtype(input.dtype)
    shapes = (input.shape, linear_weight.shape, linear_weight.shape[:1])
    dtypes = (acc, grad_weight_dtype(linear_weight.dtype, chunk_rows) if needs[1] else acc, acc)
    needs = (needs[0], needs[1], needs[2] and linear_bias is not None)
    return tuple(input.new_empty(s if need else (0,), dtype=d) for s, d, need in zip(shapes, dtypes, needs))


@forward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, softcap, logit_scale,
      temperature, chunk_rows, chunk_classes, with_stats):
    acc = accumulate_dtype(input.dtype)
    return tuple(input.new_empty(input.shape[0], dtype=acc) for _ in range(3)) + _prediction_fakes(input, with_stats)


def _prediction_fakes(input, with_stats):
    n = input.shape[0] if with_stats else 0
    return input.new_empty(n, dtype=torch.long), input.new_empty(n, dtype=accumulate_dtype(input.dtype))


@backward_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, lse, p_coef, t_coef, ignore_index, label_smoothing, softcap,
      logit_scale, temperature, chunk_rows, chunk_classes, input_grad, weight_grad, bias_grad):
    return _grad_fakes(input, linear_weight, linear_bias, chunk_rows, (input_grad, weight_grad, bias_grad))


@fused_op.register_fake
def _(input, linear_weight, linear_bias, target, weight, row_scale, z_scale, ignore_index, label_smoothing, softcap,
      logit_scale, temperature, chunk_rows, chunk_classes, input_grad, weight_grad, bias_grad, with_stats):
    acc = accumulate_dtype(input.dtype)
    rows = tuple(input.new_empty(input.shape[0], dtype=acc) for _ in range(2))
    grads = _grad_fakes(input, linear_weight, linear_bias, chunk_rows, (input_grad, weight_grad, bias_grad))
    return (input.new_empty((), dtype=acc),) + rows + grads + _prediction_fakes(input, with_stats)


# --------------------------------------------------------------------------- autograd


def _in_dtypes(grads, inputs, needs):
    """The gradients in their inputs' dtypes (None where not needed)."""
    return tuple(g.to(x.dtype) if need else None for g, x, need in zip(grads, inputs, needs))


def _recomputed_gradients(ctx, p_coef: Tensor, t_coef: Tensor, needs) -> tuple:
    """Chunked gradients for per-row coefficients, in the inputs' dtypes."""
    input, linear_weight, linear_bias, target, weight, lse = ctx.saved_tensors[:6]
    grads = backward_op(
        input, linear_weight, linear_bias, target, weight, lse, p_coef.contiguous(), t_coef.contiguous(),
        *ctx.options, *ctx.plan, *needs,
    )
    return _in_dtypes(grads, (input, linear_weight, linear_bias), needs)


def _differentiable_gradients(ctx, loss_coef: Tensor, lse_coef_fn, needs) -> tuple:
    """create_graph=True: the gradients as differentiable torch ops, through the full logits.

    Correct, not fast (it materialises N x V), like ops.py's double-backward path.
    """
    input, linear_weight, linear_bias, target, weight = ctx.saved_tensors[:5]
    logits = F.linear(input, linear_weight, linear_bias)
    ignore_index, label_smoothing, softcap, logit_scale, temperature = ctx.options
    options = (ignore_index, label_smoothing, softcap, 0, -1, logit_scale, temperature)
    grad_logits = gradient_by_formula(logits, target, weight, options, loss_coef, lse_coef_fn)
    grads = (grad_logits @ linear_weight, grad_logits.t() @ input, grad_logits.sum(0))
    return tuple(g if need else None for g, need in zip(grads, needs))


def _needs(ctx) -> tuple[bool, bool, bool]:
    return tuple(bool(n) for n in ctx.needs_input_grad[:3])


def _forward_setup_context(ctx, inputs, output):
    input, linear_weight, linear_bias, target, weight, *options_and_plan, _with_stats = inputs
    _loss, lse, mass, *prediction = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, mass)
    ctx.options, plan = tuple(options_and_plan[:5]), options_and_plan[5:]
    ctx.plan = tuple(plan)
    ctx.mark_non_differentiable(mass, *prediction)
    ctx.set_materialize_grads(False)


def _forward_backward(ctx, grad_loss, grad_lse, *_grad_mass_and_prediction):
    if grad_loss is None and grad_lse is None:
        return (None,) * 13
    lse, mass = ctx.saved_tensors[5:7]
    grad_loss = torch.zeros_like(lse) if grad_loss is None else grad_loss.to(lse.dtype)
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.to(lse.dtype)
    needs = _needs(ctx)
    if torch.is_grad_enabled():  # create_graph=True
        grads = _differentiable_gradients(ctx, grad_loss, lambda _: grad_lse, needs)
    else:
        grads = _recomputed_gradients(ctx, grad_loss * mass + grad_lse, grad_loss, needs)
    return grads + (None,) * 10


forward_op.register_autograd(_forward_backward, setup_context=_forward_setup_context)


def _fused_setup_context(ctx, inputs, output):
    (input, linear_weight, linear_bias, target, weight, row_scale, z_scale, ignore_index, label_smoothing, softcap,
     logit_scale, temperature, chunk_rows, chunk_classes, *_needs_and_stats) = inputs
    _objective, lse, mass, grad_input, grad_weight, grad_bias, *prediction = output
    ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, lse, mass, row_scale, z_scale)
    ctx.options = (ignore_index, label_smoothing, softcap, logit_scale, temperature)
    ctx.plan = (chunk_rows, chunk_classes)
    # Held outside save_for_backward (and detached, so no cycle through a grad_fn):
    # the first eager backward hands these very buffers on and drops them here.
    ctx.grads = [grad_input.detach(), grad_weight.detach(), grad_bias.detach()]
    ctx.mark_non_differentiable(lse, mass, grad_input, grad_weight, grad_bias, *prediction)
    # Otherwise autograd hands backward zero-filled "gradients" of the gradient
    # outputs: an input- plus weight-sized transient in every backward.
    ctx.set_materialize_grads(False)


def _fused_backward(ctx, grad_objective, *_grad_others):
    needs = _needs(ctx)
    no_grads = (None,) * 15
    if grad_objective is None:
        return (None,) * 3 + no_grads
    input, linear_weight, linear_bias, _target, _weight, lse, mass, row_scale, z_scale = ctx.saved_tensors
    g = grad_objective.to(lse.dtype)
    if torch.is_grad_enabled():  # create_graph=True
        z_coef = None if z_scale is None else 2 * g * z_scale
        grads = _differentiable_gradients(
            ctx, g * row_scale, lambda lse_: 0 if z_coef is None else z_coef * lse_, needs
        )
        return grads + no_grads
    if ctx.grads is None:
        # A second backward through the same graph (retain_graph, gradcheck): the
        # first one handed the gradients on, so compute them afresh.
        t_coef = g * row_scale
        p_coef = t_coef * mass + (0 if z_scale is None else 2 * g * z_scale * lse)
        return _recomputed_gradients(ctx, p_coef, t_coef, needs) + no_grads
    return _scaled_gradients(ctx, g, (input, linear_weight, linear_bias), needs) + no_grads


def _scaled_gradients(ctx, g: Tensor, inputs, needs) -> tuple:
    """The gradients computed in forward, times the scalar upstream gradient g, in the inputs' dtypes."""
    grads = ctx.grads
    if not _eager(g):
        # Traced (torch.compile, AOT): functional, so the saved buffers stay intact
        # for another backward.
        return tuple(gr.mul(g).to(x.dtype) if need else None for gr, x, need in zip(grads, inputs, needs))
    # Eager: hand the buffers on and drop our references, so that autograd's
    # AccumulateGrad can take them as .grad without a copy.
    ctx.grads = None
    out = []
    for gr, x, need in zip(grads, inputs, needs):
        if not need:
            out.append(None)
            continue
        # In place (the buffer is ours), rows whose scale is exactly 1 untouched
        # (decided on the device): after a plain loss.backward() this costs nothing.
        rows = gr if gr.dim() == 2 else gr.unsqueeze(1)  # input/weight [*, D]; bias [V]
        torch.ops.fused_ce.scale_rows_(rows, g.expand(rows.shape[0]))
        # fp16/bf16: rounded once, after the scale; the fp32 buffer is freed on return.
        out.append(gr if gr.dtype == x.dtype else gr.to(x.dtype))
    return tuple(out)


def _eager(t: Tensor) -> bool:
    return type(t) is torch.Tensor and not torch.compiler.is_compiling()


fused_op.register_autograd(_fused_backward, setup_context=_fused_setup_context)
