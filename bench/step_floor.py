"""How fast could the ``--step`` training step be with a loss that costs nothing?

The step of ``python bench/run.py --step`` is ``loss_fn(h @ W.T, target)`` and its
backward. Its matmuls -- ``h @ W.T`` forward, ``G @ W`` and ``G.T @ h`` backward -- are
the same whatever the loss, so they bound the speed-up any loss can give the step:
``eager step / matmuls only``. This script times, interleaved in one process
(``harness.time_interleaved``, median of ``--reps``):

* ``torch``: the step with ``F.cross_entropy``;
* ``fused_ce.inplace``: the step with ``fused_ce.cross_entropy(..., inplace_backward=True)``;
* ``matmuls only``: the step with a "loss" whose forward returns 0 and whose
  backward hands autograd the logits' own buffer as their gradient (as the in-place
  loss does: contiguous ``[N, V]``, already in memory): the matmuls and nothing else;

and each matmul alone (``torch.mm``, fresh outputs as in the step), with a ``G`` of
the gradient's layout. The floor holds for losses that hand autograd a contiguous
``[N, V]`` gradient, as every loss here does: autograd then computes ``W``'s
gradient as ``G.T @ h`` (to match ``W.T``'s layout), and that product's speed
depends on the layout (see the last two lines). Medians with min-max over the reps.

    python bench/step_floor.py                     # 4096 x 8 x 32000 fp32, the CPU shape of issue 3
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import fused_ce
import harness


class _FreeLoss(torch.autograd.Function):
    """A scalar 0 whose "gradient" with respect to the logits is the logits' own buffer."""

    @staticmethod
    def forward(ctx, logits):
        ctx.logits = logits.detach()
        return logits.new_zeros(())

    @staticmethod
    def backward(ctx, _):
        grad, ctx.logits = ctx.logits, None
        return grad


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=harness.shape_type("NxDxV", "4096x8x32000"), default=(4096, 8, 32000))
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    n, d, v = args.shape
    torch.manual_seed(0)
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    target = torch.randint(0, v, (n,))
    grad = torch.randn(n, v) / (n * v)

    def drop_grads():
        h.grad = w.grad = None

    def step(loss_fn):
        return harness.Timed(lambda: loss_fn(h @ w.T).backward(), after=drop_grads)

    hd, wd = h.detach(), w.detach()
    runs = {
        "torch": step(lambda z: F.cross_entropy(z, target)),
        "fused_ce.inplace": step(lambda z: fused_ce.cross_entropy(z, target, inplace_backward=True)),
        "matmuls only": step(_FreeLoss.apply),
        "  h @ W.T": lambda: hd @ wd.T,
        "  G @ W": lambda: grad @ wd,
        "  G.T @ h (as autograd: W.T's layout)": lambda: grad.t().mm(hd).t(),
        "  (h.T @ G).T (same product)": lambda: hd.t().mm(grad).t(),
    }
    times = harness.time_interleaved(runs, reps=args.reps, warmup=1, device=torch.device("cpu"))
    failed = {name: why for name, why in times.items() if isinstance(why, str)}
    if failed:
        raise SystemExit(f"failed: {failed}")
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"N x D x V = {n} x {d} x {v} fp32, {torch.get_num_threads()} threads, median of {args.reps} interleaved")
    for name, ms in median.items():
        print(f"  {name:40s} {ms:8.1f} ms  ({min(times[name]):.1f}-{max(times[name]):.1f})")
    print(f"torch / fused_ce.inplace:  {median['torch'] / median['fused_ce.inplace']:.2f}x")
    print(f"torch / matmuls only:      {median['torch'] / median['matmuls only']:.2f}x "
          "(about the most a loss with a contiguous [N, V] gradient could give this step)")


if __name__ == "__main__":
    main()
