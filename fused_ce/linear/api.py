"""``linear_cross_entropy`` and ``LinearCrossEntropyLoss``: the public face of the linear path."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _checks as checks
from .. import dtensor
from .._reduce import CountedRows, nan_if_empty, reduce_losses, result_dtype, row_scales
from .._rows import target_rows
from .._stats import make_stats
from ..functional import cross_entropy
from ..ops import accumulate_dtype
from .ops import forward_op, fused_op
from .plan import chunk_plan, compute_dtype


def _autocast_operands(input, linear_weight, linear_bias):
    """(input, linear_weight, linear_bias), autocast applied as to F.linear.

    Under torch.autocast the matmuls run in the autocast dtype, as F.linear's would
    (the casts are ordinary, differentiable ops); otherwise everything keeps its dtype.
    """
    if not isinstance(input, Tensor) or not torch.is_autocast_enabled(input.device.type):
        return input, linear_weight, linear_bias
    dtype = torch.get_autocast_dtype(input.device.type)

    def cast(t):
        # Autocast lowers float32 only (float64 stays as it is).
        return t.to(dtype) if isinstance(t, Tensor) and t.dtype == torch.float32 else t

    return cast(input), cast(linear_weight), cast(linear_bias)


def check_linear_operands(input, linear_weight, linear_bias, names=("input", "linear_weight", "linear_bias")) -> None:
    """The checks of F.linear's operands, in F.linear_cross_entropy's terms (RuntimeErrors, as torch's);
    ``names``: the three arguments' names in the messages."""
    x_name, w_name, b_name = names
    checks.check_floating(input, x_name)
    checks.check_floating(linear_weight, w_name)
    if input.dim() < 1:
        raise checks.ArgumentError(
            f"{x_name} must have a feature dimension: shape (D), (N, D) or (B, T, D), got a scalar"
        )
    if linear_weight.dim() != 2:
        if linear_weight.dim() > 2:
            raise NotImplementedError(
                f"{w_name} must be 2-D (num_classes, in_features), got shape {tuple(linear_weight.shape)} "
                "(the K-dimensional loss of F.linear_cross_entropy is not supported)"
            )
        raise checks.ArgumentError(f"{w_name} must be 2-D (num_classes, in_features), got {linear_weight.dim()}-D")
    num_classes, in_features = linear_weight.shape
    if input.shape[-1] != in_features:
        raise checks.ArgumentError(
            f"{x_name}'s last dimension ({input.shape[-1]}) must equal {w_name}'s in_features ({in_features})"
        )
    if linear_weight.dtype != input.dtype:
        raise checks.ArgumentTypeError(
            f"{w_name} must have {x_name}'s dtype ({input.dtype}), got {linear_weight.dtype}"
        )
    checks.check_same_device(linear_weight, w_name, input.device, x_name)
    if linear_bias is not None:
        checks.check_tensor(linear_bias, b_name)
        if linear_bias.shape != (num_classes,):
            raise checks.ArgumentError(f"{b_name} must have shape ({num_classes},), got {tuple(linear_bias.shape)}")
        if linear_bias.dtype != input.dtype:
            raise checks.ArgumentTypeError(
                f"{b_name} must have {x_name}'s dtype ({input.dtype}), got {linear_bias.dtype}"
            )
        checks.check_same_device(linear_bias, b_name, input.device, x_name)
    checks.check_device(input.device)


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: str = "mean",
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | tuple[int | None, int] | None = None,
    loss_dtype: torch.dtype | None = None,
    shift: int = 0,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    return_stats: bool = False,
) -> Tensor:
    """``F.cross_entropy(F.linear(input, linear_weight, linear_bias), target, ...)`` without the logits.

    The arguments and results of ``torch.nn.functional.linear_cross_entropy`` (and of
    :func:`fused_ce.cross_entropy` for the extra options), computed block by block of
    logits in one reused buffer (:mod:`fused_ce.linear.plan`): the ``N x V`` logits
    never exist.

    Args:
        input: ``(D)``, ``(N, D)`` or ``(B, T, D)`` (any leading batch shape), float32,
            float64, float16 or bfloat16.
        linear_weight: ``(V, D)``, the classifier (LM head) weight, input's dtype.
        target: class indices (any integer dtype) of input's batch shape -- ``()``,
            ``(N)``, ``(B, T)`` -- in ``[0, V)`` or ``ignore_index``; or class
            probabilities of shape ``(*batch, V)``.
        linear_bias: optional ``(V)`` bias, input's dtype.
        weight: optional per-class rescaling weights ``(V)``.
        reduction: ``'none'`` (the batch shape), ``'mean'`` (over the total weight of
            the non-ignored targets; rows for probability targets) or ``'sum'``.
        ignore_index: a class-index target value that adds nothing (None: -100, as
            torch's default; probability targets take none, as in torch).
        label_smoothing: in ``[0, 1]``, as ``F.cross_entropy``.
        z_loss: adds ``z_loss * lse**2`` per non-ignored row (see :func:`fused_ce.cross_entropy`).
        softcap: soft-caps the logits to ``softcap * tanh(logits / softcap)`` first.
        chunk_size: rows per chunk (over the whole vocabulary), or a pair (rows,
            classes) per block, rows None for all of them; None picks them from a
            memory budget (:mod:`fused_ce.linear.plan`; environment variable
            ``FUSED_CE_LINEAR_CHUNK_MB``).
        loss_dtype: as :func:`fused_ce.cross_entropy`'s (default: input's dtype, float32
            under autocast).
        shift: next-token prediction without slicing the hidden states: position ``t``
            of each sequence (the dimension before the features) is scored against the
            class index at ``t + shift`` (``True``: 1); the last ``shift`` positions
            count for nothing, and ``'none'`` returns ``(..., T - shift)``. The hidden
            states are not copied (their last rows are computed and ignored), only the
            target is shifted.
        temperature, logit_scale: as :func:`fused_ce.cross_entropy`'s: the loss of
            ``softcap(logit_scale * logits) / temperature``, inside the kernels.
        return_stats: return a :class:`fused_ce.CrossEntropyStats` (as
            :func:`fused_ce.cross_entropy`'s): the per-row lse and prediction come from the
            blocks' own pass, so the logits still never exist.

    Returns:
        The loss: a scalar, or input's batch shape for ``'none'``.

    When a gradient is wanted and the reduction is ``'mean'`` or ``'sum'``, forward
    computes the loss and every gradient, and backward only scales them by the
    upstream scalar; otherwise backward makes the logits again, block by block.
    Gradients with respect to class weights and probability targets are not supported.
    """
    if shift:
        return _shifted(input, linear_weight, target, shift, linear_bias=linear_bias, weight=weight,
                        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
                        z_loss=z_loss, softcap=softcap, chunk_size=chunk_size, loss_dtype=loss_dtype,
                        temperature=temperature, logit_scale=logit_scale, return_stats=return_stats)
    if dtensor.is_dtensor(linear_weight) or dtensor.is_dtensor(input):
        return dtensor.linear_cross_entropy(
            input, linear_weight, target, linear_bias=linear_bias, weight=weight, reduction=reduction,
            ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
            chunk_size=chunk_size, loss_dtype=loss_dtype, temperature=temperature, logit_scale=logit_scale,
        )
    checks.check_reduction(reduction)
    checks.check_z_loss(z_loss)
    cap = checks.softcap_option(softcap)
    checks.check_label_smoothing(label_smoothing)
    checks.check_positive(temperature, "temperature")
    checks.check_positive(logit_scale, "logit_scale")
    if return_stats and dtensor.is_dtensor(linear_weight):
        raise NotImplementedError("return_stats=True with a DTensor weight: use vocab_parallel_linear_cross_entropy")
    ignore_index_given = ignore_index is not None
    ignore_index = -100 if ignore_index is None else ignore_index
    checks.check_ignore_index(ignore_index)
    input, linear_weight, linear_bias = _autocast_operands(input, linear_weight, linear_bias)
    check_linear_operands(input, linear_weight, linear_bias)
    num_classes, in_features = linear_weight.shape
    batch_shape = input.shape[:-1]
    checks.check_tensor(target, "target")
    checks.check_target_device(target, input.device)
    rows = target_rows(target, batch_shape=batch_shape, probs_shape=(*batch_shape, num_classes), class_dim=-1,
                       probs_dtype=compute_dtype(input.dtype, input.device), ignore_index_given=ignore_index_given)
    acc = accumulate_dtype(input.dtype)
    class_weight = checks.class_weight(weight, num_classes, input.device, acc)
    if rows.is_floating_point() and target.requires_grad and torch.is_grad_enabled():
        raise NotImplementedError(
            "target: gradients with respect to probability targets are not supported by linear_cross_entropy; "
            "pass target.detach(), or use fused_ce.cross_entropy on the logits"
        )
    out_dtype = result_dtype(input.dtype, input.device.type, loss_dtype)
    x = input.reshape(math.prod(batch_shape), in_features)
    if num_classes == 0:  # no classes, no logits to save: F.cross_entropy's answer, on an empty matmul
        loss = cross_entropy(F.linear(x, linear_weight, linear_bias), rows, weight, ignore_index, reduction,
                             label_smoothing, loss_dtype=out_dtype, temperature=temperature, logit_scale=logit_scale,
                             return_stats=return_stats)
        if return_stats or reduction != "none":
            return loss
        return loss.reshape(batch_shape)
    if not rows.is_floating_point():
        checks.validate_targets_if_asked(rows, num_classes, ignore_index)
    counted = CountedRows.of_targets(rows, x.shape[0], class_weight, ignore_index)

    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and input.requires_grad,
        grad_on and linear_weight.requires_grad,
        grad_on and linear_bias is not None and linear_bias.requires_grad,
    )
    plan = chunk_plan(num_classes, input.dtype, input.device, chunk_size, weight_grad=needs[1])
    args = (x, linear_weight, linear_bias, rows, class_weight)
    options = (ignore_index, label_smoothing * 1.0, cap, logit_scale * 1.0, temperature * 1.0, *plan)
    if any(needs) and reduction != "none":
        row_scale, z_scale = row_scales(counted, x.shape[0], reduction, z_loss, input.device, acc)
        objective, lse, _mass, _gi, _gw, _gb, argmax, _max = fused_op(*args, row_scale, z_scale, *options, *needs,
                                                                      return_stats)
        if reduction == "mean":
            objective = nan_if_empty(objective, counted.denominator)
        out = objective.to(out_dtype)
    else:
        loss, lse, _mass, argmax, _max = forward_op(*args, *options, return_stats)
        out = reduce_losses(loss, lse, counted, reduction, z_loss, batch_shape, out_dtype)
    return make_stats(out, lse, argmax, rows, counted, reduction, z_loss, batch_shape) if return_stats else out


def _shifted(input, linear_weight, target, shift, *, reduction: str, ignore_index, **kwargs) -> Tensor:
    """linear_cross_entropy(shift=k): the target moved k positions left along the sequence, its tail ignored."""
    if isinstance(shift, bool):
        shift = int(shift)
    if not isinstance(shift, int) or shift < 0:
        raise checks.ArgumentError(f"shift must be a non-negative int (or a bool), got {shift!r}")
    checks.check_tensor(target, "target")
    checks.check_tensor(input, "input")
    if input.dim() < 2 or target.is_floating_point() or target.shape != input.shape[:-1]:
        raise checks.ArgumentError(
            "shift needs input (..., T, D) with a sequence dimension and class indices of shape (..., T), "
            f"got input {tuple(input.shape)} and target {tuple(target.shape)} ({target.dtype})"
        )
    fill = -100 if ignore_index is None else ignore_index
    shifted = F.pad(target[..., shift:], (0, min(shift, target.shape[-1])), value=fill)
    loss = linear_cross_entropy(input, linear_weight, shifted, reduction=reduction, ignore_index=ignore_index,
                                **kwargs)
    if kwargs.get("return_stats"):
        keep = max(target.shape[-1] - shift, 0)  # the positions that predict a target
        return loss._replace(lse=loss.lse[..., :keep], predicted=loss.predicted[..., :keep],
                             loss=loss.loss[..., :keep] if reduction == "none" else loss.loss,
                             z_loss=loss.z_loss[..., :keep] if reduction == "none" else loss.z_loss)
    return loss[..., : max(target.shape[-1] - shift, 0)] if reduction == "none" else loss


class LinearCrossEntropyLoss(nn.Module):
    """Drop-in for :class:`torch.nn.LinearCrossEntropyLoss`, backed by :func:`linear_cross_entropy`.

    Like torch's, the module owns the classifier: ``self.linear``, a
    :class:`torch.nn.Linear` ``(in_features -> num_classes)``, and ``forward(input,
    target)`` returns the loss of ``self.linear(input)``. The class ``weight`` is a
    buffer. As torch's, it refuses a ``weight`` of the wrong shape and a
    ``label_smoothing`` outside ``[0, 1]`` at construction. ``z_loss``, ``softcap``,
    ``chunk_size`` and ``loss_dtype`` are fused_ce's extras (also checked at
    construction); ``out_features`` (torch's K-dimensional loss) must be ``()``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device=None,
        dtype=None,
        reduction: str = "mean",
        weight: Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        softcap: float | None = None,
        chunk_size: int | tuple[int | None, int] | None = None,
        loss_dtype: torch.dtype | None = None,
        temperature: float = 1.0,
        logit_scale: float = 1.0,
    ) -> None:
        if weight is not None and tuple(weight.shape) != (num_classes,):
            raise checks.ArgumentError(f"weight must have shape ({num_classes},), got {tuple(weight.shape)}")
        checks.check_label_smoothing(label_smoothing)
        checks.check_z_loss(z_loss)
        checks.softcap_option(softcap)
        checks.check_positive(temperature, "temperature")
        checks.check_positive(logit_scale, "logit_scale")
        if chunk_size is not None:
            chunk_plan(num_classes, torch.float32, torch.device("cpu"), chunk_size)
        if tuple(out_features) != ():
            raise NotImplementedError("out_features (the K-dimensional loss) is not supported; it must be ()")
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", weight)
        self.num_classes = num_classes
        self.out_features = ()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.chunk_size = chunk_size
        self.loss_dtype = loss_dtype
        self.temperature = temperature
        self.logit_scale = logit_scale

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return linear_cross_entropy(
            input,
            self.linear.weight,
            target,
            linear_bias=self.linear.bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            softcap=self.softcap,
            chunk_size=self.chunk_size,
            loss_dtype=self.loss_dtype,
            temperature=self.temperature,
            logit_scale=self.logit_scale,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.linear.in_features}, num_classes={self.num_classes}, "
            f"bias={self.linear.bias is not None}, reduction={self.reduction!r}, ignore_index={self.ignore_index}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}, softcap={self.softcap}, "
            f"chunk_size={self.chunk_size}"
        )
