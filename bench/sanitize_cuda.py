"""A compact pass over every CUDA kernel of fused_ce, for compute-sanitizer.

Run under ``compute-sanitizer --tool memcheck|racecheck|initcheck`` (bench/gpu_check.sh
does): pytest under the sanitizer spends most of its time in instrumented start-up and
in torch.compile, while this touches every kernel -- each threads-per-row mapping the
dispatch table chooses (V <= 1024: 32 threads, <= 8192: 256, else 512; another variant
where FUSED_CE_CUDA_VARIANT forces one), 16-byte aligned and unaligned rows,
odd V, every dtype, index and probability targets, weights, label smoothing, z-loss,
soft-capping, ignored rows, the forward, backward, fused and in-place gradients, the
entropy kernels, vocabulary slices and the fused linear path -- in a few hundred small
launches. Each result is also compared with the same call on the CPU kernels (which the
tests hold to float64 references), so a wrong number fails the run as well as a bad
access. Exit status 0: every case matched.

    python bench/sanitize_cuda.py [--device cuda] [--quick] [--single-read-boundaries]

--quick: one V per threads-per-row mapping, float32 and bfloat16, two option sets --
for racecheck, whose instrumentation of shared memory and barriers is the slowest.
--single-read-boundaries: also V at the single-read variant's boundaries on this GPU (one
CTA's share of shared memory, two, the largest cluster, one vector past it), bf16 and
float32 -- for a run with FUSED_CE_CUDA_VARIANT=single_read (bench/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

import fused_ce

# V: one per threads-per-row mapping and its edges; odd sizes take the unaligned tails.
VOCABS = (1, 7, 1024, 1025, 8191, 8193, 40003)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ROWS = 5


def _tolerance(dtype: torch.dtype) -> dict:
    if dtype == torch.float64:
        return {"rtol": 1e-10, "atol": 1e-12}
    if dtype == torch.float32:
        return {"rtol": 1e-4, "atol": 1e-5}
    return {"rtol": 2e-2, "atol": 2e-3}


def _logits(v: int, dtype: torch.dtype, aligned: bool, device) -> torch.Tensor:
    """[ROWS, v] rows of a [ROWS, v + 1] buffer on the device: row stride v + 1, and each row
    starting one element past the buffer's rows when not aligned (a view, not a copy)."""
    full = torch.randn(ROWS, v + 1, dtype=torch.float64).mul_(3).to(dtype).to(device)
    return full[:, :v] if aligned else full[:, 1:]


def _targets(kind: str, v: int, dtype: torch.dtype, device) -> torch.Tensor:
    if kind == "probs":
        return torch.rand(ROWS, v, dtype=torch.float64).softmax(1).to(dtype).to(device)
    target = torch.randint(0, v, (ROWS,))
    target[1] = -100
    return target.to(device)


def _compare(name: str, got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, failures: list[str]) -> None:
    got = got.detach().cpu().double()
    want = want.detach().double()
    if not torch.allclose(got, want, equal_nan=True, **_tolerance(dtype)):
        err = (got - want).abs().nan_to_num(nan=float("inf")).max().item()
        failures.append(f"{name}: max abs error {err:.3g}")


def _loss_and_grad(logits: torch.Tensor, target: torch.Tensor, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    x = logits.detach().requires_grad_()  # keeps the view's strides (a clone would be contiguous)
    loss = fused_ce.cross_entropy(x, target, **kw)
    loss.backward(torch.ones_like(loss))
    return loss, x.grad


def single_read_boundaries(device: torch.device) -> list[tuple[int, torch.dtype]]:
    """(V, dtype) at the single-read variant's boundaries, sized as csrc/cuda/launch.cuh and
    single_read.cuh size it: a CTA's share is half an SM's shared memory less 1 KB (at most
    the per-block opt-in), of which 416 bytes scratch, the rest 16-byte vectors of the row;
    clusters of up to 8 CTAs. (H100/H200 figures where torch does not report them.)"""
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 233472)
    per_block = getattr(props, "shared_memory_per_block_optin", 232448)
    vectors = (min(per_sm // 2 - 1024, per_block) - 416) // 16
    cases = []
    for dtype in (torch.bfloat16, torch.float32):
        w = 16 // torch.tensor([], dtype=dtype).element_size()
        one = vectors * w
        cases += [(v, dtype) for v in (one, one + w, 2 * one + 1, 8 * one + w - 1, 8 * one + w)]
    return cases


def run(device: torch.device, quick: bool = False, boundaries: bool = False) -> list[str]:
    failures: list[str] = []
    cases = 0
    vocabs = (7, 1025, 8193) if quick else VOCABS
    dtypes = (torch.float32, torch.bfloat16) if quick else DTYPES
    vocab_dtypes = list(itertools.product(vocabs, dtypes))
    if boundaries:
        vocab_dtypes += single_read_boundaries(device)
    options = [
        {},
        {"label_smoothing": 0.1, "reduction": "sum"},
        {"weighted": True, "reduction": "none"},
        {"z_loss": 1e-3, "softcap": 15.0},
    ]
    if quick:
        options = options[:1] + options[-1:]
    for (v, dtype), aligned, kind, opts in itertools.product(vocab_dtypes, (True, False), ("index", "probs"), options):
        if kind == "probs" and "z_loss" in opts:
            continue  # z-loss is defined for class-index targets only
        kw = dict(opts)
        if kw.pop("weighted", False):
            kw["weight"] = torch.rand(v, dtype=torch.float64 if dtype == torch.float64 else torch.float32) + 0.5
        logits = _logits(v, dtype, aligned, device)
        target = _targets(kind, v, dtype, device)
        name = f"V={v} {str(dtype)[6:]} {'aligned' if aligned else 'unaligned'} {kind} {opts}"
        dev_kw = {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in kw.items()}
        loss, grad = _loss_and_grad(logits, target, **dev_kw)
        want_loss, want_grad = _loss_and_grad(logits.cpu(), target.cpu(), **kw)
        _compare(f"loss {name}", loss, want_loss, dtype, failures)
        _compare(f"grad {name}", grad, want_grad, dtype, failures)
        with torch.no_grad():  # the forward-only (evaluation) kernels
            _compare(f"no_grad {name}", fused_ce.cross_entropy(logits, target, **dev_kw), want_loss, dtype, failures)
        # return_stats: the argmax in the statistics pass (no grad) and in the fused one.
        want_predicted = fused_ce.cross_entropy(logits.cpu(), target.cpu(), return_stats=True, **kw).predicted
        for grad_mode in (False, True):
            with torch.set_grad_enabled(grad_mode):
                got_stats = fused_ce.cross_entropy(logits.detach().requires_grad_(grad_mode), target,
                                                   return_stats=True, **dev_kw)
            if not torch.equal(got_stats.predicted.cpu(), want_predicted):
                failures.append(f"predicted {name} (grad {grad_mode})")
            _compare(f"stats loss {name} (grad {grad_mode})", got_stats.loss, want_loss, dtype, failures)
        if kind == "index" and not kw.get("reduction"):
            # The gradient written over the logits (a non-leaf buffer), as in training.
            buffer = logits.clone().requires_grad_()
            work = buffer * 1
            fused_ce.cross_entropy(work, target, inplace_backward=True, **dev_kw).backward()
            _compare(f"inplace grad {name}", buffer.grad, want_grad, dtype, failures)
        cases += 1

    for v, dtype in itertools.product(vocabs, dtypes):  # the entropy kernels
        logits = _logits(v, dtype, v % 2 == 0, device)
        x = logits.detach().requires_grad_()
        h = fused_ce.entropy(x)
        h.sum().backward()
        xc = logits.cpu().detach().clone().requires_grad_()
        hc = fused_ce.entropy(xc)
        hc.sum().backward()
        _compare(f"entropy V={v} {dtype}", h, hc, dtype, failures)
        _compare(f"entropy grad V={v} {dtype}", x.grad, xc.grad, dtype, failures)
        cases += 1

    for dtype in (torch.float32, torch.bfloat16):  # the fused linear path (chunks of rows)
        x = torch.randn(67, 48, dtype=torch.float64).to(dtype)
        w = (torch.randn(3001, 48, dtype=torch.float64) * 48**-0.5).to(dtype)
        target = torch.randint(0, 3001, (67,))
        target[::5] = -100
        got = []
        for dev in (device, torch.device("cpu")):
            xd, wd = x.clone().to(dev).requires_grad_(), w.clone().to(dev).requires_grad_()
            loss = fused_ce.linear_cross_entropy(xd, wd, target.to(dev), chunk_size=16)
            loss.backward()
            got.append((loss, xd.grad, wd.grad))
        for label, a, b in zip(("loss", "grad x", "grad W"), *got):
            _compare(f"linear {label} {dtype}", a, b, dtype if dtype == torch.float32 else torch.bfloat16, failures)
        cases += 1

    # Vocabulary slices (the vocab-parallel building block): a shard's statistics.
    full = _logits(8193, torch.float32, True, device)
    target = _targets("index", 8193, torch.float32, device)
    shard = full[:, 4000:].contiguous()
    on_device = torch.ops.fused_ce.cross_entropy_forward(shard, target, None, -100, 0.0, 0.0, 4000, 8193)
    on_cpu = torch.ops.fused_ce.cross_entropy_forward(shard.cpu(), target.cpu(), None, -100, 0.0, 0.0, 4000, 8193)
    for i, (a, b) in enumerate(zip(on_device, on_cpu)):
        _compare(f"vocab slice output {i}", a, b, torch.float32, failures)
    cases += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{cases} cases on {device}: {len(failures)} mismatches")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer cases (for racecheck)")
    parser.add_argument("--single-read-boundaries", action="store_true", help="also V at single_read's boundaries")
    args = parser.parse_args()
    torch.manual_seed(0)
    failures = run(torch.device(args.device), args.quick, args.single_read_boundaries)
    for line in failures[:50]:
        print("MISMATCH", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
