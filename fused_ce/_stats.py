"""Per-token statistics returned with the loss (``return_stats=True``), one design for every loss function.

The kernels track each row's argmax in the pass that computes the loss (no second
pass over the logits, no host synchronisation); the rest is O(N) work here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ._reduce import CountedRows, z_loss_part


class CrossEntropyStats(NamedTuple):
    """What ``return_stats=True`` returns with the loss.

    Attributes:
        loss: the loss, exactly what the call returns without ``return_stats``.
        lse: the log-sum-exp per row (the batch shape, float32; of the logits the loss
            sees: after the scale, the soft-cap and the temperature). Detached.
        z_loss: the z-loss part of ``loss`` (0 without ``z_loss``), reduced as the loss.
            Detached.
        predicted: the argmax per row (the batch shape, int64): the lowest index among
            ties, as ``torch.argmax``; a class index into the full vocabulary.
        accuracy: the fraction of the counted rows (not ``ignore_index``) whose target is
            the prediction, float32; NaN when no row counts, and for probability targets.
    """

    loss: Tensor
    lse: Tensor
    z_loss: Tensor
    predicted: Tensor
    accuracy: Tensor


def make_stats(loss: Tensor, lse: Tensor, predicted: Tensor, rows: Tensor, counted: CountedRows, reduction: str,
               z_loss, batch_shape) -> CrossEntropyStats:
    """The stats of a call: ``lse``, ``predicted`` per row ``[N]``; ``rows`` the targets ``[N]`` (or probabilities)."""
    lse = lse.detach()
    z_part = z_loss_part(lse, counted, reduction, z_loss)
    if z_part is None:
        z_part = lse.new_zeros(lse.shape if reduction == "none" else ())
    if reduction == "none":
        z_part = z_part.reshape(batch_shape)
    if rows.is_floating_point():
        accuracy = lse.new_full((), math.nan)
    else:
        hits = ((predicted == rows) & counted.valid).sum()
        count = counted.count
        accuracy = torch.where(count == 0, math.nan, hits.to(torch.float32) / count.clamp(min=1))
    return CrossEntropyStats(loss, lse.reshape(batch_shape), z_part.to(loss.dtype), predicted.reshape(batch_shape),
                             accuracy.to(torch.float32))
