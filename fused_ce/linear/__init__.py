"""A linear layer fused with cross-entropy: ``F.cross_entropy(F.linear(input, W, b), target)``
without the ``N x V`` logits.

The LM head of a large-vocabulary model spends most of its memory on logits it only
needs for a moment: ``N x V`` of them (16384 x 256000 bf16 is 8 GB), then as many
again for their gradient. Here they are made one block at a time, in one buffer that
every block reuses, and consumed at once.

* :mod:`~fused_ce.linear.plan` -- how the logits are cut into blocks (the chunk plan);
* :mod:`~fused_ce.linear.loops` -- the loops over blocks: matmul, kernel, gradients;
* :mod:`~fused_ce.linear.ops` -- the custom ops and their autograd;
* :mod:`~fused_ce.linear.api` -- :func:`linear_cross_entropy` and :class:`LinearCrossEntropyLoss`;
* :mod:`~fused_ce.linear.distill` -- :func:`linear_distillation_loss`, two heads' logits at once.
"""

from .api import LinearCrossEntropyLoss, linear_cross_entropy
from .distill import linear_distillation_loss
from .plan import chunk_plan

__all__ = ["LinearCrossEntropyLoss", "chunk_plan", "linear_cross_entropy", "linear_distillation_loss"]
