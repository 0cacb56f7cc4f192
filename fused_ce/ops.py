"""The registered ops of fused_ce: fake kernels and autograd.

The schemas and the CPU/CUDA kernels live in ``csrc/``. The forward op returns
per-row statistics (see ``csrc/common/ce_math.h``)::

    loss_i = sum_c T_c (lse_i - z_c),   lse_i = logsumexp(z_i),   mass_i = sum_c T_c

for the target distribution ``T`` that ``F.cross_entropy``'s options define. Its
backward needs only the logits and ``lse``: ``grad_c = p_coef * softmax_c - t_coef * T_c``
with ``p_coef = dL/dloss * mass + dL/dlse`` and ``t_coef = dL/dloss``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cuda_kernels_available() -> bool:
    """Whether this build of fused_ce has its CUDA kernels (it may still see no GPU)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_ce::cross_entropy_forward", "CUDA")


@torch.library.register_fake("fused_ce::cross_entropy_forward")
def _forward_fake(logits, target, weight, ignore_index, label_smoothing, softcap):
    rows = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return rows, torch.empty_like(rows), torch.empty_like(rows)


@torch.library.register_fake("fused_ce::cross_entropy_backward")
def _backward_fake(logits, target, weight, lse, p_coef, t_coef, ignore_index, label_smoothing, softcap):
    return logits.new_empty(logits.shape)


def _forward_setup_context(ctx, inputs, output):
    logits, target, weight, ignore_index, label_smoothing, softcap = inputs
    _, lse, mass = output
    ctx.save_for_backward(logits, target, weight, lse, mass)
    ctx.options = (ignore_index, label_smoothing, softcap)
    ctx.mark_non_differentiable(mass)


def _forward_backward(ctx, grad_loss: Tensor, grad_lse: Tensor, _grad_mass):
    logits, target, weight, lse, mass = ctx.saved_tensors
    ignore_index, label_smoothing, softcap = ctx.options
    if grad_loss is None:
        grad_loss = torch.zeros_like(lse)
    if grad_lse is None:
        grad_lse = torch.zeros_like(lse)
    grad_loss = grad_loss.float()
    grad_logits = grad_target = None
    if ctx.needs_input_grad[0]:
        p_coef = grad_loss * mass + grad_lse.float()
        grad_logits = torch.ops.fused_ce.cross_entropy_backward(
            logits, target, weight, lse, p_coef.contiguous(), grad_loss.contiguous(), ignore_index, label_smoothing, softcap
        )
    if ctx.needs_input_grad[1] and target.is_floating_point():
        # d loss_i / d q_ic = (1 - label_smoothing) * w_c * (lse_i - z_c): rare (e.g. a
        # learned teacher), so it is composed from torch ops rather than fused.
        z = logits.float()
        if softcap > 0:
            z = softcap * torch.tanh(z / softcap)
        grad = (lse.unsqueeze(1) - z) * (grad_loss * (1.0 - label_smoothing)).unsqueeze(1)
        if weight is not None:
            grad = grad * weight
        grad_target = grad.to(target.dtype)
    return grad_logits, grad_target, None, None, None, None


torch.library.register_autograd(
    "fused_ce::cross_entropy_forward", _forward_backward, setup_context=_forward_setup_context
)
