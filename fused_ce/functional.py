"""The public functions of fused_ce, with ``torch.nn.functional.cross_entropy``'s semantics.

The kernels work on rows: logits ``[N, V]`` and per-row statistics. This module maps
every input layout ``F.cross_entropy`` accepts onto rows, checks arguments with
messages that name them, and applies the reductions (cheap O(N) work).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from .ops import accumulate_dtype

_REDUCTIONS = ("none", "mean", "sum")

_validate_targets = os.environ.get("FUSED_CE_VALIDATE", "0") not in ("", "0")


def set_target_validation(enabled: bool) -> None:
    """Check class-index targets on CUDA tensors too, raising ``IndexError`` when one is out of range.

    On the CPU targets are always checked. On CUDA the check costs a host
    synchronisation, so by default it is off and a row whose target is out of range
    gets a NaN loss (and NaN gradient) instead; the kernels never read out of
    bounds. The environment variable ``FUSED_CE_VALIDATE=1`` turns it on at import.
    """
    global _validate_targets
    _validate_targets = bool(enabled)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda":
        from .ops import cuda_kernels_available

        if not cuda_kernels_available():
            raise RuntimeError(
                "input is a CUDA tensor but this build of fused_ce has no CUDA kernels. Rebuild it with "
                "`FUSED_CE_CUDA=1 pip install --no-build-isolation -e .` (needs a CUDA build of torch and nvcc; "
                "set CUDA_HOME if nvcc is not found)"
            )
    elif device.type != "cpu":
        raise NotImplementedError(f"fused_ce runs on CPU and CUDA tensors, got a tensor on {device}")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def _check_target_range(target: Tensor, num_classes: int, ignore_index: int) -> None:
    """Raises IndexError for a class index outside [0, V) that is not ignore_index.

    It synchronises with the device, and is skipped inside torch.compile (a data-
    dependent branch); the message matches the CPU kernels' own check.
    """
    if target.numel() == 0:
        return
    bad = ((target < 0) | (target >= num_classes)) & (target != ignore_index)
    if bool(bad.any()):
        position = int(bad.reshape(-1).nonzero()[0, 0])
        value = int(target.reshape(-1)[position])
        raise IndexError(
            f"target: class index {value} at position {position} is out of range "
            f"[0, {num_classes}) and is not ignore_index ({ignore_index})"
        )


def _as_rows(input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float):
    """Checks F.cross_entropy's arguments; returns (logits [N, V], target rows, weight, batch shape)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a Tensor, got {type(target).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input (the logits) must be floating point, got {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have a class dimension: shape (C), (N, C) or (N, C, d1, ..., dk), got a scalar")
    if input.device != target.device:
        raise ValueError(f"input and target must be on the same device, got {input.device} and {target.device}")
    _check_device(input.device)
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not -(2**63) <= ignore_index < 2**63:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")

    class_dim = 0 if input.dim() == 1 else 1
    num_classes = input.shape[class_dim]
    if num_classes == 0:
        raise ValueError(f"input has an empty class dimension (shape {tuple(input.shape)})")
    batch_shape = input.shape[:class_dim] + input.shape[class_dim + 1 :]

    # Rows of logits: classes last with unit stride. (C) and (N, C) are views;
    # (N, C, d1, ..., dk) is transposed into one copy, as the kernels read rows.
    logits = input.movedim(class_dim, -1).reshape(-1, num_classes)
    if logits.stride(1) != 1 and num_classes > 1:
        logits = logits.contiguous()

    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(
                f"target: class probabilities must have the input's shape {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        rows = target.movedim(class_dim, -1).reshape(-1, num_classes).to(input.dtype)
        if rows.stride(1) != 1 and num_classes > 1:
            rows = rows.contiguous()
    else:
        if target.dtype == torch.bool or target.dtype.is_complex:
            raise TypeError(
                f"target must hold class indices (an integer dtype) or class probabilities (floating point), "
                f"got {target.dtype}"
            )
        if target.shape != batch_shape:
            raise ValueError(
                f"target: class indices must have shape {tuple(batch_shape)} for input of shape {tuple(input.shape)}, "
                f"got {tuple(target.shape)}"
            )
        rows = target.reshape(-1).long()
        # The CPU kernels check the range themselves (IndexError); on CUDA it is opt-in.
        if _validate_targets and target.device.type == "cuda" and not torch.compiler.is_compiling():
            _check_target_range(rows, num_classes, ignore_index)

    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a Tensor or None, got {type(weight).__name__}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.shape != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), one entry per class, got {tuple(weight.shape)}")
        if weight.device != input.device:
            raise ValueError(f"weight must be on the input's device ({input.device}), got {weight.device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(
                "weight: gradients with respect to class weights are not supported (nor are they by "
                "F.cross_entropy); pass weight.detach()"
            )
        weight = weight.to(torch.float64 if input.dtype == torch.float64 else torch.float32).contiguous()
    return logits, rows, weight, batch_shape


def _check_extras(z_loss, softcap) -> float:
    """Checks z_loss and softcap; returns the soft-cap as the ops take it (0 = off)."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) or not math.isfinite(z_loss) or z_loss < 0:
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


class _Rows:
    """What the reductions need to know about the rows: which count, and their weights."""

    def __init__(self, logits: Tensor, rows: Tensor, weight: Tensor | None, ignore_index: int):
        self.num_rows = logits.shape[0]
        if rows.is_floating_point():  # probability targets: every row counts, mean over rows
            self.valid = None
            self.denominator = self.num_rows
            self.count = self.num_rows
        else:
            self.valid = rows != ignore_index
            self.count = self.valid.sum()
            if weight is None:
                self.denominator = self.count
            else:
                target_weight = weight.gather(0, rows.clamp(0, logits.shape[1] - 1))
                self.denominator = (target_weight * self.valid).sum()

    def mask(self, device, dtype) -> Tensor:
        if self.valid is None:
            return torch.ones(self.num_rows, device=device, dtype=dtype)
        return self.valid.to(dtype)


def _masked_square(lse: Tensor, info: "_Rows") -> Tensor:
    """lse**2 on the rows that count, 0 elsewhere (also where an ignored row's lse is not finite)."""
    return lse.square() if info.valid is None else torch.where(info.valid, lse, 0.0).square()


def _safe_inverse(denominator, dtype: torch.dtype):
    """1 / denominator, but 0 where it is 0: the loss of 'mean' is then NaN (added by
    _nan_if_empty), as in PyTorch, while the gradient stays 0 -- as PyTorch's when every
    row is ignored; where counted rows all weigh 0 PyTorch's is NaN (a documented difference)."""
    if isinstance(denominator, int):
        return 0.0 if denominator == 0 else 1.0 / denominator
    d = denominator.to(dtype)
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _nan_if_empty(total: Tensor, denominator) -> Tensor:
    if isinstance(denominator, int):
        return total + math.nan if denominator == 0 else total
    return total + torch.where(denominator == 0, math.nan, 0.0)


def cross_entropy(
    input: Tensor,  # noqa: A002 - F.cross_entropy's name
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
    size_average: bool | None = None,
    reduce: bool | None = None,
):
    """Cross-entropy between logits and targets: ``F.cross_entropy`` fused into one pass.

    Args:
        input: logits of shape ``(C)``, ``(N, C)`` or ``(N, C, d1, ..., dk)``; float32,
            float64, float16 or bfloat16 (read as they are, with float32 arithmetic;
            float64 with float64 arithmetic).
        target: class indices (any integer dtype: int64, int32, uint8, ...) of shape ``()``, ``(N)`` or ``(N, d1, ..., dk)``
            in ``[0, C)`` or equal to ``ignore_index``; or class probabilities with the
            input's shape.
        weight: optional per-class rescaling weights of shape ``(C)``.
        ignore_index: a class-index target value whose rows add nothing to the loss and
            its gradient (nor to the ``mean`` denominator).
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
        size_average, reduce: deprecated, as in ``F.cross_entropy``.

    Returns:
        The loss in the input's dtype: a scalar, or the batch shape for ``'none'``;
        with ``return_lse``, the tuple ``(loss, lse)``.

    When ``input`` requires grad, one kernel computes the loss and writes the gradient
    (one read and one write of the logits); backward then only scales it by the
    upstream gradient, which for a plain ``loss.backward()`` costs no pass at all.
    Class-index targets out of range raise ``IndexError`` on the CPU; on CUDA they
    give NaN for that row unless :func:`set_target_validation` is on.
    """
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    _check_reduction(reduction)
    cap = _check_extras(z_loss, softcap)
    if inplace_backward and return_lse:
        raise ValueError("inplace_backward=True cannot be combined with return_lse=True: the lse's gradient needs the logits")
    logits, rows, weight, batch_shape = _as_rows(input, target, weight, ignore_index, label_smoothing)
    info = _Rows(logits, rows, weight, ignore_index)
    smoothing = float(label_smoothing)

    wants_grad = torch.is_grad_enabled() and input.requires_grad
    # Inside torch.compile the graph is functional: the in-place hand-over of the
    # forward pass's gradient does not apply, and the two-pass path (statistics
    # forward, gradient in backward: 2 reads + 1 write) is cheaper than the fused
    # one would be there (fused forward, then a scaled copy).
    if wants_grad and not return_lse and not target.requires_grad and not torch.compiler.is_compiling():
        if inplace_backward:
            _check_inplace(input)
        # In place, the gradient goes into the input's own buffer when the rows are a
        # view of it; otherwise into the copy _as_rows made (still no second buffer).
        inplace_target = None
        if inplace_backward:
            shares = logits.untyped_storage().data_ptr() == input.untyped_storage().data_ptr()
            class_dim = 0 if input.dim() == 1 else 1
            inplace_target = (input, class_dim) if shares else (logits, 1)
        return _fused(logits, rows, weight, info, ignore_index, smoothing, cap, z_loss, reduction, batch_shape,
                      input.dtype, inplace_target)

    loss, lse, _mass = torch.ops.fused_ce.cross_entropy_forward(logits, rows, weight, ignore_index, smoothing, cap)
    out = _reduce(loss, lse, info, reduction, z_loss, batch_shape, input.dtype)
    return (out, lse.reshape(batch_shape)) if return_lse else out


def _reduce(loss: Tensor, lse: Tensor, info: _Rows, reduction: str, z_loss: float, batch_shape, dtype) -> Tensor:
    """The reduction of per-row losses, with the z-loss term (the two-pass path)."""
    if reduction == "none":
        if z_loss:
            loss = loss + z_loss * _masked_square(lse, info)
        return loss.reshape(batch_shape).to(dtype)
    total = loss.sum()
    if reduction == "mean":
        total = _nan_if_empty(total * _safe_inverse(info.denominator, total.dtype), info.denominator)
    if z_loss:
        z_total = _masked_square(lse, info).sum()
        if reduction == "mean":
            z_total = z_total * _safe_inverse(info.count, z_total.dtype)
        total = total + z_loss * z_total
    return total.to(dtype)


def _row_scales(info: _Rows, reduction: str, z_loss: float, device, dtype) -> tuple[Tensor, Tensor | None]:
    """row_scale and z_scale [N] of the fused objective ``row_scale * loss + z_scale * lse**2``,
    whose sum is the reduced loss (the training path)."""
    mask = info.mask(device, dtype)
    row_scale = mask if reduction != "mean" else mask * _safe_inverse(info.denominator, dtype)
    z_scale = None
    if z_loss:
        z_scale = z_loss * mask if reduction != "mean" else (z_loss * _safe_inverse(info.count, dtype)) * mask
    return row_scale.contiguous(), z_scale


def _reduce_objective(objective: Tensor, info: _Rows, reduction: str, batch_shape, dtype) -> Tensor:
    """The loss from the fused path's per-row objective."""
    if reduction == "none":
        return objective.reshape(batch_shape).to(dtype)
    total = objective.sum()
    if reduction == "mean":
        total = _nan_if_empty(total, info.denominator)
    return total.to(dtype)


def _fused(logits, rows, weight, info, ignore_index, smoothing, cap, z_loss, reduction, batch_shape, dtype, inplace):
    """The training path: the loss and its gradient in one kernel (see ops.py).

    inplace: None, or (the tensor whose buffer the gradient overwrites, its class
    dimension): the input the rows ``logits`` view, or ``logits`` itself when
    _as_rows copied.
    """
    row_scale, z_scale = _row_scales(info, reduction, z_loss, logits.device, accumulate_dtype(logits.dtype))
    args = (rows, weight, row_scale, z_scale, ignore_index, smoothing, cap)
    if inplace is not None:
        objective = _fused_inplace(*inplace, args)
    else:
        objective, _lse, _mass, _grad = torch.ops.fused_ce.cross_entropy_fused(logits, *args)
    return _reduce_objective(objective, info, reduction, batch_shape, dtype)


def _check_inplace(input: Tensor) -> None:
    """Refuses, before anything is written, what autograd or the memory layout would not allow."""
    if input.is_leaf:
        raise ValueError(
            "inplace_backward=True would overwrite input with its gradient, but input is a leaf tensor "
            "that requires grad; use it on logits computed by the model (e.g. the output of the LM head)"
        )
    base = input._base
    if base is not None and base.is_leaf and base.requires_grad:
        raise ValueError(
            "inplace_backward=True would overwrite input with its gradient, but input is a view of a leaf "
            "tensor that requires grad"
        )
    if _may_overlap(input):
        raise ValueError(
            "inplace_backward=True needs input whose elements do not share memory (not, e.g., an expand() "
            "or rows from unfold()); pass input.contiguous() or use inplace_backward=False"
        )


def _may_overlap(t: Tensor) -> bool:
    """Whether two elements of t may share memory: its strides, smallest first, must each pass
    the farthest offset the smaller dimensions reach (a contiguous or padded layout does; an
    expand, stride 0, or overlapping unfold() rows do not)."""
    reach = 0
    for stride, size in sorted((abs(st), n) for st, n in zip(t.stride(), t.shape) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def _rows_view(t: Tensor, class_dim: int) -> Tensor:
    """The rows [N, C] of t as _as_rows makes them; a view when _as_rows made one."""
    return t.movedim(class_dim, -1).reshape(-1, t.shape[class_dim])


def _fused_inplace(buffer: Tensor, class_dim: int, args) -> Tensor:
    """cross_entropy_fused_ with autograd: the gradient overwrites the logits.

    A mutating op cannot carry torch.library autograd, and autograd lets a Function
    that modifies a view (the logits often are one) return only that view. So two
    Functions share the work: _GradIntoLogits runs the kernel, writing the gradient
    over the logits (marked dirty: their version counter is bumped, and another op's
    backward that saved them raises), and is the identity for autograd;
    _ObjectiveOf returns the objective, whose gradient with respect to that buffer is
    the buffer scaled by the upstream gradient.

    The Functions take the buffer itself, not a reshaped view of it: in-place work on
    a view makes autograd route the gradient through a CopySlices node, which copies it.
    """
    objective_box: list[Tensor] = []
    grad = _GradIntoLogits.apply(buffer, class_dim, objective_box, *args)
    return _ObjectiveOf.apply(objective_box[0], grad, class_dim)


class _GradIntoLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, buffer, class_dim, objective_box, *args):
        objective, _lse, _mass = torch.ops.fused_ce.cross_entropy_fused_(_rows_view(buffer, class_dim), *args)
        objective_box.append(objective)
        ctx.mark_dirty(buffer)
        return buffer

    @staticmethod
    def backward(ctx, grad):
        return (grad, None, None) + (None,) * 7


class _ObjectiveOf(torch.autograd.Function):
    @staticmethod
    def forward(ctx, objective, grad, class_dim):
        ctx.save_for_backward(grad)
        ctx.class_dim = class_dim
        ctx.grad_buffer_used = False
        return objective.clone()

    @staticmethod
    def backward(ctx, grad_objective):
        if ctx.grad_buffer_used or torch.is_grad_enabled():
            raise RuntimeError(
                "cross_entropy(inplace_backward=True) wrote the gradient over the logits, so it supports one "
                "first-order backward pass; for retain_graph=True, create_graph=True or gradcheck use "
                "inplace_backward=False"
            )
        ctx.grad_buffer_used = True
        (grad,) = ctx.saved_tensors
        # Only rows whose upstream gradient is not exactly 1 are scaled; with the
        # logits gone they cannot be recomputed, so in float16/bfloat16 such rows are
        # rounded twice (see the README).
        rows = _rows_view(grad, ctx.class_dim)
        torch.ops.fused_ce.scale_rows_(rows, grad_objective.to(accumulate_dtype(grad.dtype)))
        return None, grad, None


def entropy(logits: Tensor) -> Tensor:
    """Entropy ``-sum_c p_c log p_c`` of ``softmax(logits)`` along the last dimension.

    One online pass over each row (running max, rescaled sum and rescaled
    ``sum_c e^(z_c - max) (max - z_c)``), differentiable; zero probabilities count as
    ``0 log 0 = 0``, as ``torch.xlogy`` defines it.

    Args:
        logits: ``(..., V)``, floating point.

    Returns:
        ``(...)``: float32 (float64 for float64 logits).
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point Tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"logits must have a non-empty last (class) dimension, got shape {tuple(logits.shape)}")
    _check_device(logits.device)
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(1) != 1 and rows.shape[1] > 1:
        rows = rows.contiguous()
    value, _lse = torch.ops.fused_ce.entropy_forward(rows)
    return value.reshape(logits.shape[:-1])


def focal_loss(
    input: Tensor,  # noqa: A002 - F.cross_entropy's name
    target: Tensor,
    gamma: float = 2.0,
    alpha: float | Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Focal loss ``-alpha_t (1 - p_t)**gamma log p_t`` (Lin et al., 2017) for class-index targets.

    Built on the fused per-row cross-entropy (``-log p_t``): the softmax is never
    materialised. ``p_t = exp(-loss)`` and ``1 - p_t = -expm1(-loss)``, exact near 1.

    Args:
        input: logits, with ``cross_entropy``'s layouts.
        target: class indices (``ignore_index`` rows add nothing).
        gamma: the focusing exponent, ``>= 0`` (0 gives the cross-entropy).
        alpha: ``None``, a float (every class), or a ``(C)`` tensor of per-class weights.
        reduction: ``'none'``, ``'mean'`` (over the non-ignored rows; NaN if there
            are none) or ``'sum'``.
    """
    _check_reduction(reduction)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
    if isinstance(target, Tensor) and target.is_floating_point():
        raise TypeError("focal_loss takes class-index targets (an integer dtype), got floating-point probabilities")
    logits, rows, _, batch_shape = _as_rows(input, target, None, ignore_index, 0.0)
    loss, _lse, _mass = torch.ops.fused_ce.cross_entropy_forward(logits, rows, None, ignore_index, 0.0, 0.0)
    focal = (-torch.expm1(-loss)).pow(gamma) * loss if gamma else loss
    valid = rows != ignore_index
    if alpha is not None:
        if isinstance(alpha, Tensor):
            if alpha.shape != (logits.shape[1],):
                raise ValueError(f"alpha must be a float or have shape ({logits.shape[1]},), got {tuple(alpha.shape)}")
            if alpha.device != logits.device:
                raise ValueError(f"alpha must be on the input's device ({logits.device}), got {alpha.device}")
            alpha_t = alpha.to(focal.dtype).gather(0, torch.where(valid, rows, 0))
        elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and math.isfinite(alpha):
            alpha_t = float(alpha)
        else:
            raise TypeError(f"alpha must be None, a finite float or a tensor, got {alpha!r}")
        focal = focal * alpha_t
    focal = focal * valid  # ignored rows: 0, also where alpha_t would not be
    if reduction == "none":
        return focal.reshape(batch_shape).to(input.dtype)
    total = focal.sum()
    if reduction == "mean":
        count = valid.sum()
        total = _nan_if_empty(total * _safe_inverse(count, total.dtype), count)
    return total.to(input.dtype)


__all__ = ["cross_entropy", "entropy", "focal_loss", "set_target_validation"]
