"""The public functions of fused_ce, with ``torch.nn.functional.cross_entropy``'s semantics.

The kernels work on rows: logits ``[N, V]`` and per-row statistics. The functions
here map every input layout onto rows (``_rows``), check arguments with messages
that name them (``_checks``), run the ops (``ops``, and ``_training`` for the
training path) and apply the reductions (``_reduce``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks as checks
from . import dtensor
from ._reduce import CountedRows, nan_if_empty, reduce_losses, result_dtype, safe_inverse
from ._rows import as_rows, target_rows
from ._stats import make_stats
from ._training import check_inplace, fused_loss
from .ops import accumulate_dtype

set_target_validation = checks.set_target_validation


def _class_layout(input: Tensor) -> tuple[int, torch.Size]:
    """(class dimension, batch shape) of F.cross_entropy's layouts (C), (N, C), (N, C, d1, ..., dk)."""
    if input.dim() == 0:
        raise checks.ArgumentError(
            "input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk), got a scalar"
        )
    class_dim = 0 if input.dim() == 1 else 1
    return class_dim, input.shape[:class_dim] + input.shape[class_dim + 1 :]


def _check_inputs(input, target) -> None:
    checks.check_floating(input, "input", " (the logits)")
    checks.check_tensor(target, "target")
    checks.check_target_device(target, input.device)
    checks.check_device(input.device)


def _no_class_losses(input: Tensor, logits: Tensor, rows: Tensor, ignore_index: int) -> Tensor:
    """Per-row losses when there are no classes (C = 0): as PyTorch, 0 for ignored rows and NaN
    for the others (no softmax exists), whose class index is out of range (IndexError on the CPU
    or with validation). Attached to ``input`` so that its (empty) gradient flows."""
    if rows.is_floating_point():
        counted = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
    else:
        counted = rows != ignore_index
        if rows.device.type == "cpu" or checks.target_validation():
            checks.check_target_range(rows, 0, ignore_index)
    zero = logits.to(accumulate_dtype(input.dtype)).sum(1) * 0
    return zero + torch.where(counted, math.nan, 0.0)


def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
    loss_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    return_stats: bool = False,
    size_average: bool | None = None,
    reduce: bool | None = None,
):
    """Cross-entropy between logits and targets: ``F.cross_entropy`` fused into one pass.

    Args:
        input: logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float32,
            float64, float16 or bfloat16 (read as they are, with float32 arithmetic;
            float64 with float64 arithmetic).
        target: class indices (any integer dtype) of shape ``()``, ``(N)`` or
            ``(N, d1, ..., dk)`` in ``[0, C)`` or equal to ``ignore_index``; or class
            probabilities with the input's shape.
        weight: optional per-class rescaling weights of shape ``(C)``.
        ignore_index: a class-index target value whose rows add nothing to the loss and
            its gradient (nor to the ``mean`` denominator). Probability targets refuse a
            non-negative one, as PyTorch does.
        reduction: ``'none'`` (per-element losses), ``'mean'`` (the sum divided by the
            total weight of the non-ignored targets, or by the number of rows for
            probability targets) or ``'sum'``.
        label_smoothing: in ``[0, 1]``; mixes the target with the uniform distribution
            over the ``C`` classes, as ``F.cross_entropy`` defines it.
        z_loss: adds ``z_loss * lse**2`` for each non-ignored row (PaLM's auxiliary
            loss; ``lse`` the row's log-sum-exp). Under ``'mean'`` it is averaged over the
            non-ignored rows, unweighted.
        softcap: if set, the logits are soft-capped to ``softcap * tanh(input / softcap)``
            inside the kernels (Gemma 2), gradients included; nothing is materialised.
        return_lse: also return the per-row log-sum-exp (float32, the batch shape,
            computed after the soft-cap), differentiable.
        inplace_backward: overwrite ``input``'s buffer with its gradient during the
            forward pass, so that a training step allocates nothing of size N x V.
            ``input`` then no longer holds the logits: its version counter is bumped, so
            autograd raises if another op's backward needs them. Not for a leaf tensor
            that requires grad, nor with ``return_lse``. Off by default. Inside
            ``torch.compile`` the graph is functional and the two-pass path is used
            (same results, without the memory saving).
        loss_dtype: the dtype of the result. Default: the input's (float32 for
            float16/bfloat16 input under ``torch.autocast``, as ``F.cross_entropy``
            under autocast); e.g. ``torch.float32`` keeps all the digits of a bf16
            model's loss.
        temperature: the loss of ``z / temperature``, computed inside the kernels
            (nothing materialised), gradients included; with ``softcap``, the cap
            first, then the temperature (a model outputs capped logits, sampling
            divides those). ``return_lse`` gives the lse of the divided logits.
        logit_scale: multiplies the logits before everything else (Cohere's and
            Granite's logit scales), inside the kernels: the loss of
            ``softcap(logit_scale * input) / temperature``.
        return_stats: return a :class:`fused_ce.CrossEntropyStats` -- the loss, the
            per-row lse, the z-loss part, the predicted class per row and the token
            accuracy -- tracked in the same pass as the loss (no second pass over the
            logits, no host synchronisation; the loss and gradient are bitwise those
            without it). CPU and CUDA.
        size_average, reduce: deprecated, as in ``F.cross_entropy``.

    Returns:
        The loss: a scalar, or the batch shape for ``'none'``; with ``return_lse``,
        the tuple ``(loss, lse)``.

    When ``input`` requires grad, one kernel computes the loss and writes the gradient
    (one read and one write of the logits); backward then only scales it by the
    upstream gradient, which for a plain ``loss.backward()`` costs no pass at all.
    Class-index targets out of range raise ``IndexError`` on the CPU; on CUDA they
    give NaN for that row unless :func:`set_target_validation` is on. Bad arguments
    raise :class:`fused_ce.ArgumentError` (a ``ValueError`` and a ``RuntimeError``)
    or :class:`fused_ce.ArgumentTypeError` (a ``TypeError`` and a ``RuntimeError``).
    """
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    if dtensor.is_dtensor(input):
        return dtensor.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss,
                                     softcap=softcap, return_lse=return_lse, inplace_backward=inplace_backward,
                                     loss_dtype=loss_dtype, temperature=temperature, logit_scale=logit_scale,
                                     return_stats=return_stats)
    checks.check_reduction(reduction)
    checks.check_z_loss(z_loss)
    cap = checks.softcap_option(softcap)
    checks.check_label_smoothing(label_smoothing)
    checks.check_ignore_index(ignore_index)
    checks.check_positive(temperature, "temperature")
    checks.check_positive(logit_scale, "logit_scale")
    if inplace_backward and return_lse:
        raise checks.ArgumentError(
            "inplace_backward=True cannot be combined with return_lse=True: the lse's gradient needs the logits"
        )
    if return_stats and return_lse:
        raise checks.ArgumentError("return_stats=True already returns the lse; pass return_lse=False")
    _check_inputs(input, target)
    class_dim, batch_shape = _class_layout(input)
    if input.dim() == 1 and not target.is_floating_point() and target.shape == (1,):
        target = target.reshape(())  # as PyTorch: an unbatched input takes a target of shape (1,) too
    num_classes = input.shape[class_dim]
    logits = as_rows(input, class_dim)
    rows = target_rows(target, batch_shape=batch_shape, probs_shape=input.shape, class_dim=class_dim,
                       probs_dtype=input.dtype, ignore_index_given=ignore_index >= 0)
    acc = accumulate_dtype(input.dtype)
    weight = checks.class_weight(weight, num_classes, input.device, acc)
    if not rows.is_floating_point():
        checks.validate_targets_if_asked(rows, num_classes, ignore_index)
    counted = CountedRows.of_targets(rows, logits.shape[0], weight, ignore_index)
    out_dtype = result_dtype(input.dtype, input.device.type, loss_dtype)
    options = (ignore_index, label_smoothing * 1.0, cap, 0, -1, logit_scale * 1.0, temperature * 1.0)

    predicted = None
    if num_classes == 0:
        loss = _no_class_losses(input, logits, rows, ignore_index)
        lse = torch.full_like(loss, -math.inf)
        predicted = torch.zeros(loss.shape, dtype=torch.long, device=loss.device)
    elif (
        torch.is_grad_enabled() and input.requires_grad and not return_lse and not target.requires_grad
        and (reduction != "none" or inplace_backward) and not torch.compiler.is_compiling()
    ):
        # The training path pays off when backward only hands its buffer on: the
        # upstream of a reduced loss is a scalar, usually 1. Per-row losses ('none')
        # mostly get other upstreams (masks, weights, a mean), which it would
        # recompute: the two-pass path (2 reads + 1 write, and no N x V buffer held
        # from forward to backward) is cheaper then. Inside torch.compile the graph is
        # functional: no hand-over, so the two-pass path too.
        inplace = None
        if inplace_backward:
            check_inplace(input)
            # The gradient goes into the input's own buffer when the rows are a view of
            # it; otherwise into the copy as_rows made (still no second buffer).
            shares = logits.untyped_storage().data_ptr() == input.untyped_storage().data_ptr()
            inplace = (input, class_dim) if shares else (logits, 1)
        result = fused_loss(logits, rows, weight, counted, options, z_loss, reduction, batch_shape, out_dtype, inplace,
                            with_stats=return_stats)
        if not return_stats:
            return result
        return make_stats(*result, rows, counted, reduction, z_loss, batch_shape)
    else:
        op = torch.ops.fused_ce.cross_entropy_forward
        loss, lse, _mass, *prediction = (op.stats if return_stats else op)(logits, rows, weight, *options)
        predicted = prediction[0] if return_stats else None
    out = reduce_losses(loss, lse, counted, reduction, z_loss, batch_shape, out_dtype)
    if return_stats:
        return make_stats(out, lse, predicted, rows, counted, reduction, z_loss, batch_shape)
    return (out, lse.reshape(batch_shape)) if return_lse else out


def entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of ``softmax(logits / temperature)`` along the last dimension.

    One online pass over each row (running max, rescaled sum and rescaled
    ``sum_c e^(z_c - max) (max - z_c)``), differentiable; zero probabilities count as
    ``0 log 0 = 0``, as ``torch.xlogy`` defines it.

    Args:
        logits: ``(..., V)``, floating point.
        temperature: divides the logits inside the kernels (sampling-time entropy),
            gradients included.

    Returns:
        ``(...)``: float32 (float64 for float64 logits); 0 where there is no class (V = 0).
    """
    checks.check_floating(logits, "logits")
    checks.check_positive(temperature, "temperature")
    if logits.dim() == 0:
        raise checks.ArgumentError("logits must have a class dimension last, (..., V), got a scalar")
    checks.check_device(logits.device)
    rows = as_rows(logits, logits.dim() - 1)
    if rows.shape[1] == 0:
        value = rows.to(accumulate_dtype(logits.dtype)).sum(1)
    else:
        value, _lse = torch.ops.fused_ce.entropy_forward(rows, temperature * 1.0)
    return value.reshape(logits.shape[:-1])


def _focal_factor(loss: Tensor, gamma) -> Tensor:
    """``(1 - p_t)**gamma`` with ``p_t = exp(-loss)``, in float64.

    ``1 - p_t = -expm1(-loss)`` is exact near ``p_t = 1``. Where it is 0 (an ignored
    row, or a saturated one) the factor is 0, and its derivative ``gamma (1 -
    p_t)**(gamma - 1)`` would be infinite for ``gamma < 1``: pow's backward would give
    ``0 * inf = NaN`` for a true gradient of 0. The ``where`` keeps that branch out of
    autograd. Float64 keeps ``u**(gamma - 1)`` finite for the smallest losses.
    """
    u = -torch.expm1(-loss.to(torch.float64))
    positive = u > 0
    safe = torch.where(positive, u, 1.0)
    return torch.where(positive, safe.pow(gamma), 0.0 if gamma > 0 else 1.0)


def focal_loss(
    input: Tensor,
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    *,
    loss_dtype: torch.dtype | None = None,
) -> Tensor:
    """Focal loss ``-alpha_t (1 - p_t)**gamma log p_t`` (Lin et al., 2017) for class-index targets.

    Built on the fused per-row cross-entropy (``-log p_t``): the softmax is never
    materialised.

    Args:
        input: logits, with ``cross_entropy``'s layouts.
        target: class indices (``ignore_index`` rows add nothing).
        gamma: the focusing exponent, ``>= 0`` (0 gives the cross-entropy; fractional
            values are fine, the gradient stays finite where ``p_t`` reaches 1).
        alpha: ``None``, a float (every class), or a ``(C)`` tensor of per-class weights.
        reduction: ``'none'``, ``'mean'`` (over the non-ignored rows; NaN if there
            are none) or ``'sum'``.
        loss_dtype: as :func:`cross_entropy`'s.
    """
    checks.check_reduction(reduction)
    checks.check_in_range(gamma, "gamma", 0.0, checks.FLOAT_MAX, rule="a finite number >= 0")
    checks.check_ignore_index(ignore_index)
    _check_inputs(input, target)
    if target.is_floating_point():
        raise checks.ArgumentTypeError(
            "focal_loss takes class-index targets (an integer dtype), got floating-point probabilities"
        )
    # return_lse: the two-pass path (statistics now, the gradient in backward), as the
    # upstream of these per-row losses is never exactly 1.
    loss, _lse = cross_entropy(input, target, ignore_index=ignore_index, reduction="none", return_lse=True,
                               loss_dtype=torch.float64)
    target = target.reshape(loss.shape)
    valid = target != ignore_index
    focal = _focal_factor(loss, gamma) * loss if gamma else loss
    num_classes = input.shape[0 if input.dim() == 1 else 1]
    if alpha is not None:
        if isinstance(alpha, Tensor):
            if alpha.shape != (num_classes,):
                raise checks.ArgumentError(
                    f"alpha must be a float or have shape ({num_classes},), got {tuple(alpha.shape)}"
                )
            checks.check_same_device(alpha, "alpha", input.device)
            # Clamped: an out-of-range class (a NaN row on CUDA) must not index out of bounds.
            index = torch.where(valid, target, 0).long().clamp(0, max(num_classes - 1, 0))
            alpha_t = alpha.to(focal.dtype)[index] if num_classes else torch.ones_like(focal)
        elif checks.is_number(alpha):
            checks.check_in_range(alpha, "alpha", -checks.FLOAT_MAX, checks.FLOAT_MAX, rule="a finite number")
            alpha_t = alpha
        else:
            raise checks.ArgumentTypeError(f"alpha must be None, a finite float or a tensor, got {alpha!r}")
        focal = focal * alpha_t
    focal = torch.where(valid, focal, 0.0)  # ignored rows: 0, also where alpha_t would not be
    out_dtype = result_dtype(input.dtype, input.device.type, loss_dtype)
    if reduction == "none":
        return focal.to(out_dtype)
    total = focal.sum()
    if reduction == "mean":
        count = valid.sum()
        total = nan_if_empty(total * safe_inverse(count, total.dtype), count)
    return total.to(out_dtype)


__all__ = ["cross_entropy", "entropy", "focal_loss", "set_target_validation"]
