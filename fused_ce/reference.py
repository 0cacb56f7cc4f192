"""A float64 reference of fused_ce's loss, written from the formulas (for the tests).

It does not call ``F.cross_entropy``: it spells out the one formula every option of
``F.cross_entropy`` reduces to, so the tests can check both fused_ce and PyTorch
against it. For each row of logits ``x`` (the class dimension of ``input``) with
``C`` classes:

    z_c    = x_c                               (softcap=None)
    z_c    = s * tanh(x_c / s)                  (softcap=s > 0, Gemma-2 style)
    lse    = log sum_c exp(z_c)
    q      = onehot(y)                          class-index target y
           = the target row                     class-probability target
    T_c    = w_c * ((1 - ls) * q_c + ls / C)    w = weight (ones without it), ls = label_smoothing
           = 0 for every c                      when y == ignore_index
    loss   = sum_c T_c * (lse - z_c)            (= -sum_c T_c log_softmax(z)_c)

Reductions: ``'none'`` gives the per-row losses in the batch shape, ``'sum'`` their
sum, and ``'mean'`` their sum divided by

    sum_i w_{y_i} over the rows whose target is not ignore_index    (class indices)
    the number of rows                                              (probabilities)

(with label smoothing PyTorch uses the same denominator for the smoothing term).
A zero denominator (every target ignored, or only zero-weight ones) makes ``'mean'``
NaN, as in PyTorch, where the one-hot part is 0 / 0; when every target is ignored
its gradient is zero, as PyTorch's is.

Everything is computed in float64 with plain PyTorch ops, so it is differentiable:
``torch.autograd.grad`` of its output gives the float64 reference gradients with
respect to ``input`` and to probability targets.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cross_entropy_reference(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_lse: bool = False,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
):
    """``F.cross_entropy`` in float64 from the formulas in this module's docstring.

    Accepts every layout ``F.cross_entropy`` does: input ``(C)``, ``(N, C)`` or
    ``(N, C, d1, ..., dk)``; targets of class indices (any integer dtype) in the
    batch shape, or class probabilities in the input's shape. ``softcap`` (not an
    ``F.cross_entropy`` option) applies ``z = softcap * tanh(x / softcap)`` first.
    ``z_loss`` adds ``z_loss * lse**2`` for every non-ignored row (under ``'mean'``
    divided by the number of such rows, unweighted). ``logit_scale`` multiplies the
    logits first and ``temperature`` divides them last: ``softcap(logit_scale * x) / T``.
    Returns a float64 tensor: the batch shape for ``'none'``, else a scalar; with
    ``return_lse``, ``(loss, lse)`` with lse in the batch shape.
    """
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    x = input.to(torch.float64)
    class_dim = 0 if x.dim() == 1 else 1
    num_classes = x.shape[class_dim]
    z = x.movedim(class_dim, -1) * logit_scale  # (..., C): the batch shape, then classes
    if softcap is not None and softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)

    w = torch.ones(num_classes, dtype=torch.float64, device=x.device)
    if weight is not None:
        w = weight.to(device=x.device, dtype=torch.float64)

    if target.is_floating_point():
        q = target.to(torch.float64).movedim(class_dim, -1)
        valid = torch.ones(z.shape[:-1], dtype=torch.bool, device=x.device)
    else:
        y = target.to(torch.int64)
        valid = y != ignore_index
        safe_y = torch.where(valid, y, torch.zeros_like(y))
        if bool(((safe_y < 0) | (safe_y >= num_classes)).any()):
            raise IndexError(f"target holds a class index outside [0, {num_classes})")
        q = torch.nn.functional.one_hot(safe_y, num_classes).to(torch.float64)

    t = w * ((1.0 - label_smoothing) * q + label_smoothing / num_classes)
    t = t * valid.unsqueeze(-1).to(torch.float64)
    # T_c * (lse - z_c) with 0 where T_c is 0 (as xlogy: 0 * log 0 = 0), so logits
    # masked to -inf outside the target add nothing instead of NaN.
    terms = torch.where(t != 0, t * (lse - z), torch.zeros_like(z))
    loss = terms.sum(dim=-1)
    z_terms = z_loss * lse.squeeze(-1).square() * valid.to(torch.float64)
    out = _reduce(loss, z_terms, reduction, target, w, safe_y if not target.is_floating_point() else None, valid)
    return (out, lse.squeeze(-1)) if return_lse else out


def _reduce(loss, z_terms, reduction, target, w, safe_y, valid):
    if reduction == "none":
        return loss + z_terms
    total, z_total = loss.sum(), z_terms.sum()
    if reduction == "sum":
        return total + z_total
    if target.is_floating_point():
        return (total + z_total) / loss.numel()
    count = valid.to(torch.float64).sum()
    denominator = (w[safe_y] * valid.to(torch.float64)).sum()
    if bool(count == 0):  # nothing counted: NaN, with a zero gradient, as PyTorch
        return total * 0.0 + float("nan")
    # Counted rows whose class weights are all 0: the cross-entropy part is NaN (as
    # PyTorch's, whatever the smoothing term's numerator) with a zero gradient (PyTorch's
    # is NaN: fused_ce's documented difference); the z-loss term keeps its gradient.
    ce = total * 0.0 + float("nan") if bool(denominator == 0) else total / denominator
    return ce + z_total / count


def torch_cross_entropy(
    input: Tensor, target: Tensor, *, softcap: float | None = None, z_loss: float = 0.0, temperature: float = 1.0,
    logit_scale: float = 1.0, **kwargs
) -> Tensor:
    """fused_ce's loss as a PyTorch user composes it from torch ops, at the input's dtype.

    ``F.cross_entropy(softcap * tanh(logit_scale * input / softcap) / temperature, target, **kwargs)`` plus
    ``z_loss * lse**2`` per counted row (under ``'mean'`` averaged over those rows):
    the baseline fused_ce's options are compared with in tests and benchmarks. The
    layouts are ``F.cross_entropy``'s (classes in dimension 1).
    """
    z = input * logit_scale if logit_scale != 1.0 else input
    z = softcap * torch.tanh(z / softcap) if softcap is not None else z
    z = z / temperature if temperature != 1.0 else z
    if not target.is_floating_point():
        target = target.long()  # F.cross_entropy takes int64 (or uint8) class indices only
    loss = torch.nn.functional.cross_entropy(z, target, **kwargs)
    if not z_loss:
        return loss
    lse = torch.logsumexp(z, dim=0 if z.dim() == 1 else 1)
    if target.is_floating_point():
        valid = torch.ones_like(lse)
    else:
        valid = (target != kwargs.get("ignore_index", -100)).to(lse.dtype)
    z_rows = z_loss * torch.where(valid > 0, lse, 0.0).square()
    reduction = kwargs.get("reduction", "mean")
    if reduction == "none":
        return loss + z_rows
    if reduction == "sum":
        return loss + z_rows.sum()
    return loss + z_rows.sum() / valid.sum().clamp(min=1)


def distillation_reference(student, teacher, kind="forward_kl", beta=0.5, temperature=1.0, target=None,
                           ignore_index=-100, alpha=0.0, reduction="mean") -> Tensor:
    """fused_ce.distillation_loss in float64 from its formulas (classes last)."""
    ls = torch.log_softmax(student.to(torch.float64) / temperature, dim=-1)
    lt = torch.log_softmax(teacher.to(torch.float64) / temperature, dim=-1)
    p, q = ls.exp(), lt.exp()

    def kl(a, log_a, log_b):  # sum a (log a - log b), 0 where a is 0
        return torch.where(a == 0, 0.0, a * (log_a - log_b)).sum(-1)

    if kind == "forward_kl":
        rows = kl(q, lt, ls)
    elif kind == "reverse_kl":
        rows = kl(p, ls, lt)
    else:
        lm = torch.log(beta * q + (1 - beta) * p)
        rows = beta * kl(q, lt, lm) + (1 - beta) * kl(p, ls, lm)
    valid = torch.ones(rows.shape, dtype=torch.bool, device=rows.device) if target is None else target != ignore_index
    rows = torch.where(valid, rows, 0.0)
    batch = student.shape[0] if student.dim() > 1 else 1
    if reduction == "none":
        div = rows
    elif reduction == "sum":
        div = rows.sum()
    elif reduction == "batchmean":
        div = rows.sum() / batch
    else:
        div = rows.sum() / valid.sum()
    if not alpha:
        return div
    ce_rows = -torch.log_softmax(student.to(torch.float64), dim=-1).gather(
        -1, torch.where(valid, target, 0).unsqueeze(-1)).squeeze(-1)
    ce_rows = torch.where(valid, ce_rows, 0.0)
    ce = {"none": ce_rows, "sum": ce_rows.sum(), "batchmean": ce_rows.sum() / batch}.get(
        reduction, ce_rows.sum() / valid.sum())
    return alpha * ce + (1 - alpha) * div


def entropy_reference(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``-sum_c p_c log p_c`` of ``softmax(logits / temperature)`` over the last dimension, in float64 (0 log 0 = 0)."""
    p = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
    return -torch.xlogy(p, p).sum(-1)


def focal_loss_reference(input, target, gamma=2.0, alpha=None, ignore_index=-100, reduction="mean") -> Tensor:
    """``-alpha_t (1 - p_t)**gamma log p_t`` in float64; ``'mean'`` over the non-ignored rows."""
    x = input.to(torch.float64)
    class_dim = 0 if x.dim() == 1 else 1
    logp = torch.log_softmax(x.movedim(class_dim, -1), dim=-1)
    valid = target != ignore_index
    y = torch.where(valid, target.to(torch.int64), 0)
    logp_t = logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    loss = -((1 - logp_t.exp()) ** gamma) * logp_t
    if alpha is not None:
        loss = loss * (alpha.to(torch.float64)[y] if isinstance(alpha, Tensor) else alpha)
    loss = loss * valid
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


__all__ = [
    "cross_entropy_reference",
    "distillation_reference",
    "entropy_reference",
    "focal_loss_reference",
    "torch_cross_entropy",
]
