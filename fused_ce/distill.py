"""Fused distillation losses: a student's logits against a teacher's, without the N x V softmaxes.

Every public implementation but a chunked one materialises both ``log_softmax`` rows
(two ``N x V`` float32 buffers for bf16 models) and more for their gradients. The
kernels here (``csrc/common/distill_math.h``; CPU: ``cpu/distill.cpp``, CUDA:
``cuda/distill.cuh``) read both rows for their two online log-sum-exps, sum the
divergence's terms in a second pass over the rows (from cache), and write the
student's gradient in backward; nothing of size ``N x V`` but that gradient is
allocated.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _checks as checks
from ._reduce import nan_if_empty, result_dtype, safe_inverse
from ._rows import as_rows, target_rows
from .functional import cross_entropy

KINDS = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}
REDUCTIONS = ("none", "mean", "sum", "batchmean")


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    target: Tensor | None = None,
    ignore_index: int = -100,
    alpha: float = 0.0,
    reduction: str = "mean",
    loss_dtype: torch.dtype | None = None,
) -> Tensor:
    """The divergence between the teacher's and the student's softmax at a temperature, row by row.

    With ``p = softmax(student / T)`` and ``q = softmax(teacher / T)``:

    * ``"forward_kl"``: ``KL(q || p)`` (what ``F.kl_div(log p, log q, log_target=True)`` computes);
    * ``"reverse_kl"``: ``KL(p || q)``;
    * ``"jsd"``: ``beta KL(q || m) + (1 - beta) KL(p || m)`` with ``m = beta q + (1 - beta) p``
      (``beta = 0.5``: the Jensen-Shannon divergence); ``beta`` in ``(0, 1)``.

    Terms where a probability is 0 count 0 (``0 log 0 = 0``), so vocabulary masked to
    ``-inf`` in both rows adds nothing. The loss is not multiplied by ``T**2`` (Hinton's
    scaling): multiply it yourself if you want it.

    Args:
        student_logits: ``(..., V)``, classes last; float32/float64/float16/bfloat16.
        teacher_logits: the student's shape (converted to the student's dtype if it
            differs). The teacher gets no gradient: a teacher that requires grad in grad
            mode is refused (pass ``teacher_logits.detach()``).
        target: optional class indices of the batch shape: rows whose target is
            ``ignore_index`` count for nothing; with ``alpha > 0`` also the labels of the
            hard-label term.
        alpha: the weight of the hard-label cross-entropy ``CE(student, target)`` (at
            temperature 1): the loss is ``alpha * CE + (1 - alpha) * divergence``.
        reduction: ``"mean"`` (over the counted rows; NaN if none), ``"sum"``, ``"none"``
            (the batch shape) or ``"batchmean"`` (the sum over the size of the first
            dimension, as ``F.kl_div``'s).
        loss_dtype: as :func:`fused_ce.cross_entropy`'s.
    """
    check_options(kind, beta, temperature, alpha, reduction, ignore_index, target)
    checks.check_floating(student_logits, "student_logits")
    checks.check_floating(teacher_logits, "teacher_logits")
    if student_logits.dim() == 0:
        raise checks.ArgumentError("student_logits must have a class dimension last, (..., V), got a scalar")
    if teacher_logits.shape != student_logits.shape:
        raise checks.ArgumentError(f"teacher_logits must have the student's shape {tuple(student_logits.shape)}, "
                                   f"got {tuple(teacher_logits.shape)}")
    checks.check_same_device(teacher_logits, "teacher_logits", student_logits.device, "student_logits")
    checks.check_device(student_logits.device)
    check_teacher_takes_no_grad(teacher_logits, "teacher_logits")
    batch_shape = student_logits.shape[:-1]
    rows_s = as_rows(student_logits, student_logits.dim() - 1)
    rows_t = as_rows(teacher_logits.to(student_logits.dtype), teacher_logits.dim() - 1)
    num_rows = rows_s.shape[0]
    valid = None
    if target is not None:
        checks.check_target_device(target, student_logits.device, "student_logits")
        labels = target_rows(target, batch_shape=batch_shape, probs_shape=student_logits.shape, class_dim=-1,
                             probs_dtype=None, probs_allowed=False)
        valid = labels != ignore_index

    if rows_s.shape[1] == 0 or num_rows == 0:
        divergence = rows_s.sum(1) * 0  # no classes: no divergence (keeps the empty gradient attached)
    else:
        divergence, _aux, _lse_s, _lse_t = torch.ops.fused_ce.distill_forward(
            rows_s, rows_t.detach(), KINDS[kind], beta * 1.0, temperature * 1.0
        )
    if valid is not None:
        divergence = torch.where(valid, divergence, 0.0)
    count = num_rows if valid is None else valid.sum()
    out_dtype = result_dtype(student_logits.dtype, student_logits.device.type, loss_dtype)
    loss = _reduce(divergence, reduction, count, student_logits.shape[0] if student_logits.dim() > 1 else 1)
    if alpha > 0:
        ce_reduction = {"batchmean": "sum"}.get(reduction, reduction)
        hard = cross_entropy(rows_s, labels, ignore_index=ignore_index, reduction=ce_reduction,
                             loss_dtype=loss.dtype)
        if reduction == "batchmean":
            hard = hard / (student_logits.shape[0] if student_logits.dim() > 1 else 1)
        loss = alpha * hard + (1 - alpha) * loss
    if reduction == "none":
        loss = loss.reshape(batch_shape)
    return loss.to(out_dtype)


def check_options(kind, beta, temperature, alpha, reduction, ignore_index, target) -> None:
    """The checks of the options every distillation function shares."""
    checks.check_reduction(reduction, allowed=REDUCTIONS)
    if kind not in KINDS:
        raise checks.ArgumentError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    if kind == "jsd":
        checks.check_in_range(beta, "beta", 0.0, 1.0, rule="a number in (0, 1) for the JSD")
        if not 0 < beta < 1:
            raise checks.ArgumentError(f"beta must be a number in (0, 1) for the JSD, got {beta!r}")
    checks.check_positive(temperature, "temperature")
    checks.check_in_range(alpha, "alpha", 0.0, 1.0, rule="a number in [0, 1]")
    checks.check_ignore_index(ignore_index)
    if alpha > 0 and target is None:
        raise checks.ArgumentError("alpha > 0 mixes in the hard-label cross-entropy, which needs target")


def check_teacher_takes_no_grad(tensor: Tensor | None, name: str) -> None:
    """The teacher gets no gradient: refuse one that asks for it, rather than leave its .grad silently None."""
    if tensor is not None and tensor.requires_grad and torch.is_grad_enabled():
        raise checks.ArgumentError(
            f"{name} requires grad, but the distillation loss gives the teacher no gradient; "
            f"pass {name}.detach() (or compute the teacher under torch.no_grad())"
        )


def _reduce(rows: Tensor, reduction: str, count, batch_size: int) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        return total / batch_size if batch_size else total + math.nan
    return nan_if_empty(total * safe_inverse(count, total.dtype), count)


__all__ = ["KINDS", "check_options", "check_teacher_takes_no_grad", "distillation_loss"]
