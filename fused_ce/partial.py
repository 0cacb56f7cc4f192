"""Cross-entropy of one slice of the vocabulary, given the log-sum-exp of the rest.

For callers that shard the vocabulary themselves (chunked heads, their own tensor
parallelism): the logits hold the classes ``[vocab_start, vocab_start + V_s)`` of
``vocab_total``, and ``lse_rest`` is the log-sum-exp of every other class (flash-
attention's ``precomputed_lse``, quack's ``lse_partial``). This slice's part of the
full row's loss is::

    part_s = sum_{c in s} T_c (lse - z_c),        lse = logaddexp(lse_s, lse_rest)

(``T`` the target distribution over the full vocabulary: a class index in another
slice adds no one-hot entry here; label smoothing spreads over ``vocab_total``), so
that the parts of all slices sum to the full loss. It is computed from the slice
kernel's statistics (no ``V_s``-sized temporary) and differentiable in the logits and
in ``lse_rest``: when the caller makes ``lse_rest`` from the other slices with
differentiable ops, autograd assembles the full gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _checks as checks
from ._reduce import CountedRows, reduce_losses, result_dtype
from ._rows import as_rows, target_rows


class _SlicePart(torch.autograd.Function):
    """(logits [N, V_s], lse_rest [N]) -> the slice's part of the loss [N], and the full lse [N]."""

    @staticmethod
    def forward(ctx, logits, lse_rest, rows, options):
        loss_s, lse_s, mass_s = torch.ops.fused_ce.cross_entropy_forward(logits, rows, None, *options)
        lse = torch.logaddexp(lse_s, lse_rest)
        # mass_s (lse - lse_s) is 0 where the slice holds no target mass, even if lse_s is -inf.
        part = loss_s + torch.where(mass_s == 0, 0.0, mass_s * (lse - lse_s))
        ctx.save_for_backward(logits, rows, lse, lse_rest, mass_s)
        ctx.options = options
        ctx.mark_non_differentiable(lse)
        return part, lse

    @staticmethod
    def backward(ctx, g_part, _g_lse):
        logits, rows, lse, lse_rest, mass_s = ctx.saved_tensors
        g = g_part.to(lse.dtype)
        # d part / d z_c = mass_s softmax_c - T_c over the full row; d part / d lse_rest = mass_s e^(lse_rest - lse).
        grad_logits = torch.ops.fused_ce.cross_entropy_backward(
            logits, rows, None, lse, (g * mass_s).contiguous(), g.contiguous(), *ctx.options
        )
        grad_rest = torch.where(mass_s == 0, 0.0, g * mass_s * torch.exp(lse_rest - lse))
        return grad_logits, grad_rest.to(lse_rest.dtype), None, None


def slice_cross_entropy(
    logits: Tensor,
    target: Tensor,
    lse_rest: Tensor,
    *,
    vocab_start: int,
    vocab_total: int,
    ignore_index: int = -100,
    reduction: str = "none",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    loss_dtype: torch.dtype | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
) -> Tensor:
    """This vocabulary slice's part of the cross-entropy, given the log-sum-exp of the other classes.

    Args:
        logits: ``(..., V_s)``: classes ``[vocab_start, vocab_start + V_s)`` of ``vocab_total``.
        target: class indices into the full vocabulary, ``logits.shape[:-1]``.
        lse_rest: ``logits.shape[:-1]``: the log-sum-exp of every class outside this slice
            (after the soft-cap, if any; ``-inf`` where there is none).
        reduction: ``'none'`` (default), ``'sum'``, or ``'mean'`` (over the non-ignored
            rows): the parts of all slices, reduced alike, sum to the full loss.
        ignore_index, label_smoothing, softcap, loss_dtype, temperature, logit_scale: as
            :func:`fused_ce.cross_entropy` (``lse_rest`` then of the divided logits).

    Returns:
        The slice's part of the loss (the batch shape for ``'none'``, else a scalar).
    """
    checks.check_reduction(reduction)
    checks.check_label_smoothing(label_smoothing)
    checks.check_ignore_index(ignore_index)
    cap = checks.softcap_option(softcap)
    checks.check_positive(temperature, "temperature")
    checks.check_positive(logit_scale, "logit_scale")
    checks.check_floating(logits, "logits")
    checks.check_floating(lse_rest, "lse_rest")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise checks.ArgumentError(f"logits must have a non-empty class dimension last, got {tuple(logits.shape)}")
    checks.check_device(logits.device)
    checks.check_target_device(target, logits.device, "logits")
    checks.check_same_device(lse_rest, "lse_rest", logits.device, "logits")
    batch_shape = logits.shape[:-1]
    if lse_rest.shape != batch_shape:
        raise checks.ArgumentError(f"lse_rest must have shape {tuple(batch_shape)}, one per row, "
                                   f"got {tuple(lse_rest.shape)}")
    size = logits.shape[-1]
    if not (isinstance(vocab_start, int) and isinstance(vocab_total, int) and vocab_start >= 0
            and vocab_start + size <= vocab_total):
        raise checks.ArgumentError(f"the slice [vocab_start, vocab_start + {size}) must lie within "
                                   f"[0, vocab_total), got vocab_start={vocab_start!r}, vocab_total={vocab_total!r}")
    rows = target_rows(target, batch_shape=batch_shape, probs_shape=logits.shape, class_dim=-1, probs_dtype=None,
                       probs_allowed=False)
    x = as_rows(logits, -1)
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    options = (ignore_index, label_smoothing * 1.0, cap, vocab_start, vocab_total, logit_scale * 1.0,
               temperature * 1.0)
    part, _lse = _SlicePart.apply(x, lse_rest.reshape(-1).to(acc), rows, options)
    counted = CountedRows.of_targets(rows, x.shape[0], None, ignore_index)
    out_dtype = result_dtype(logits.dtype, logits.device.type, loss_dtype)
    return reduce_losses(part, _lse, counted, reduction, 0.0, batch_shape, out_dtype)
