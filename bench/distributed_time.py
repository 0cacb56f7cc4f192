"""Vocab-parallel cross-entropy over P gloo ranks on one machine, against one process.

    python bench/distributed_time.py [--ranks 2] [--shape 4096x32000] [--reps 10]

Each rank holds a contiguous 1/P of the classes of the same float32 logits (a leaf)
and runs ``vocab_parallel_cross_entropy`` + ``backward()``; rank 0 reports the median
wall time of a call (``harness.time_interleaved``; the ranks start each call together,
after an untimed barrier) and the bytes of the one collective (an all_gather of the
per-row statistics: 3N float32 per rank). The same logits then go through
``fused_ce.cross_entropy`` and ``F.cross_entropy`` in one process (with all the
machine's threads, the two interleaved), for comparison. Each rank uses
``threads / P`` threads, so the machine is shared alike.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fused_ce
import harness

CPU = torch.device("cpu")


def _median_ms(fns: dict, reps: int) -> dict[str, float]:
    """The median time of each function (``harness.time_interleaved``, one warm-up call)."""
    times = harness.time_interleaved(fns, reps=reps, warmup=1, device=CPU)
    failed = {name: why for name, why in times.items() if isinstance(why, str)}
    if failed:
        raise RuntimeError(f"failed: {failed}")
    return {name: statistics.median(t) for name, t in times.items()}


def _problem(n: int, v: int):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, v, generator=gen), torch.randint(0, v, (n,), generator=gen)


def _rank(rank: int, world: int, port: int, n: int, v: int, reps: int, threads: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    logits, target = _problem(n, v)
    sizes = [v // world + (r < v % world) for r in range(world)]
    start = sum(sizes[:rank])
    shard = logits[:, start : start + sizes[rank]].contiguous().requires_grad_()

    def drop_grad():
        shard.grad = None

    # The ranks start each call together: a barrier before it, outside the timed region.
    call = harness.Timed(
        lambda: fused_ce.vocab_parallel_cross_entropy(shard, target, vocab_sizes=sizes).backward(),
        before=dist.barrier,
        after=drop_grad,
    )
    ms = _median_ms({"vocab_parallel": call}, reps)["vocab_parallel"]
    loss = fused_ce.vocab_parallel_cross_entropy(shard.detach(), target, vocab_sizes=sizes)
    if rank == 0:
        out.put((ms, float(loss)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--shape", type=harness.shape_type("NxV", "4096x32000"), default=(4096, 32000))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--port", type=int, default=29517)
    args = parser.parse_args()
    n, v = args.shape
    threads = torch.get_num_threads()
    per_rank = max(1, threads // args.ranks)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank, args=(args.ranks, args.port, n, v, args.reps, per_rank, queue), nprocs=args.ranks)
    ms, loss = queue.get()

    logits, target = _problem(n, v)
    x = logits.clone().requires_grad_()

    def drop_grad():
        x.grad = None

    def single(fn):
        return harness.Timed(lambda: fn(x, target).backward(), after=drop_grad)

    one = _median_ms({"fused_ce": single(fused_ce.cross_entropy), "torch": single(F.cross_entropy)}, args.reps)
    one_fused, one_torch = one["fused_ce"], one["torch"]
    expected = float(F.cross_entropy(logits, target))
    print(f"{n}x{v} float32, forward+backward, median of {args.reps}; {threads} threads on this machine")
    print(f"  {args.ranks} gloo ranks x {per_rank} threads, vocab_parallel_cross_entropy: {ms:8.1f} ms"
          f"   (loss {loss:.6f}, F.cross_entropy {expected:.6f})")
    print(f"  one process, fused_ce.cross_entropy:                {one_fused:8.1f} ms")
    print(f"  one process, F.cross_entropy:                       {one_torch:8.1f} ms")
    print(f"  communication per call: one all_gather of 3N float32 per rank = {3 * n * 4:,} bytes sent by each rank")


if __name__ == "__main__":
    main()
