"""A tensor-parallel LM head trained with fused_ce.distributed, under torchrun.

    torchrun --nproc-per-node 2 examples/tp_lm_head.py              # CPUs: gloo
    torchrun --nproc-per-node 8 examples/tp_lm_head.py --steps 50   # one GPU per rank: NCCL

A toy language model: an embedding and an MLP block replicated on every rank, then
an LM head whose (V, H) weight is split by vocabulary rows across the ranks
(Megatron's column-parallel head; the slices may be uneven). No rank ever holds a
full row of logits. Two ways to plug the loss in are shown (--head):

* ``fused`` (default): ``vocab_parallel_linear_cross_entropy(hidden, weight_shard,
  target)`` -- no rank materialises even its own (N, V_r) logits. The trunk is
  replicated, so the head's input gradient must be the sum over ranks: the default
  ``reduce_input_grad=True`` all-reduces it inside backward.
* ``logits``: the head computes its logits slice itself and calls
  ``vocab_parallel_cross_entropy(logits_shard, target)``. The input gradient of the
  head's matmul is then this rank's part only, so the hidden states go through
  ``copy_to_tensor_parallel_region`` first (identity forward, all-reduce backward),
  as Megatron does. (With the fused head, the same arrangement is
  ``reduce_input_grad=False``.)

Every rank computes the same loss; at step 0 rank 0 checks it against
F.cross_entropy on the full logits, and at the end that the replicated trunk
stayed identical on every rank.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fused_ce.distributed import vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy


def vocab_split(vocab_size: int, world_size: int) -> list[int]:
    """Contiguous slices in rank order; the first ranks take one class more when it does not divide."""
    return [vocab_size // world_size + (r < vocab_size % world_size) for r in range(world_size)]


class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class VocabParallelLMHead(nn.Module):
    """The rows [vocab_start, vocab_start + V_r) of a (V, H) LM head, and its loss."""

    def __init__(self, full_weight: torch.Tensor, group=None, head: str = "fused"):
        super().__init__()
        self.group = group
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        self.vocab_sizes = vocab_split(full_weight.shape[0], world_size)
        start = sum(self.vocab_sizes[:rank])
        self.weight = nn.Parameter(full_weight[start : start + self.vocab_sizes[rank]].clone())
        self.head = head

    def forward(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # Passing vocab_sizes spares the per-call discovery of the layout.
        if self.head == "fused":
            return vocab_parallel_linear_cross_entropy(
                hidden, self.weight, target, group=self.group, vocab_sizes=self.vocab_sizes, z_loss=1e-4
            )
        hidden = _CopyToTensorParallelRegion.apply(hidden, self.group)
        logits_shard = F.linear(hidden, self.weight)  # (B, T, V_r)
        return vocab_parallel_cross_entropy(
            logits_shard, target, group=self.group, vocab_sizes=self.vocab_sizes, z_loss=1e-4
        )


class TinyLM(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, group=None, head: str = "fused"):
        super().__init__()
        # Same seed on every rank: the replicated parts start identical, and every rank
        # takes its rows of the same full head.
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab_size, hidden)
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, 4 * hidden), nn.GELU(),
                                   nn.Linear(4 * hidden, hidden))
        full_head = torch.randn(vocab_size, hidden) / hidden**0.5
        self.lm_head = VocabParallelLMHead(full_head, group, head)
        self.full_head_for_checking = full_head

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return h + self.block(h)

    def forward(self, tokens: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens), target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=1001, help="vocabulary size (need not divide by the ranks)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--head", choices=("fused", "logits"), default="fused")
    args = parser.parse_args()

    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()

    model = TinyLM(args.vocab, args.hidden, head=args.head).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    data = torch.Generator().manual_seed(1)  # the same batches on every rank
    if rank == 0:
        print(f"{world_size} ranks, vocabulary slices {model.lm_head.vocab_sizes}, head: {args.head}")

    for step in range(args.steps):
        # A task to learn: the next token is a fixed function of the current one.
        inputs = torch.randint(0, args.vocab, (args.batch, args.seq), generator=data).to(device)
        target = (7 * inputs + 3) % args.vocab
        loss = model(inputs, target)
        if step == 0 and rank == 0:
            with torch.no_grad():
                logits = model.hidden(inputs) @ model.full_head_for_checking.to(device).T
                lse = torch.logsumexp(logits.float(), -1)
                expected = F.cross_entropy(logits.flatten(0, 1), target.flatten()) + 1e-4 * lse.square().mean()
            torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
            print(f"step 0: loss {loss.item():.6f} matches F.cross_entropy on the full logits ({expected.item():.6f})")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 5 == 4 or step == args.steps - 1):
            print(f"step {step + 1}: loss {loss.item():.4f}")

    # The replicated trunk got the same (all-reduced) gradients on every rank.
    trunk = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if not n.startswith("lm_head")])
    gathered = [torch.empty_like(trunk) for _ in range(world_size)]
    dist.all_gather(gathered, trunk)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "the replicated parameters diverged across ranks"
    if rank == 0:
        print("replicated parameters identical on every rank")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
