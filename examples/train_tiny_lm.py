"""Train a tiny decoder LM with a 32k vocabulary twice: PyTorch's loss against fused_ce's.

    python examples/train_tiny_lm.py                                  # CPU: ~4 minutes on 2 cores
    python examples/train_tiny_lm.py --device cuda --steps 1000 --batch 32 --seq 256

The data is the Python standard library's own source (code, comments and docstrings
of ``sysconfig.get_paths()["stdlib"]``, its test suites left out), so nothing is
downloaded. A word-level tokenizer -- identifiers, numbers, single punctuation marks,
newlines and 4-space indents -- keeps the ``--vocab`` most frequent tokens (ties
broken alphabetically, so the vocabulary is the same on every run of one Python
version) and maps the rest to ``<unk>``. The last 5% of the token stream is held out.

The model is a small GPT (learned positions, pre-norm blocks, causal attention, an
untied LM head) written in plain PyTorch; with V = 32000 and D = 128 its head is
half of the parameters and most of the work. It is trained twice from the same
initial weights on the same batches, step by step in turns so that both see the same
machine load:

* ``torch``: ``F.cross_entropy(F.linear(h, W), y)`` -- the ``N x V`` logits, their
  log-softmax and the gradient of each;
* ``fused_ce``: ``fused_ce.linear_cross_entropy(h, W, y)`` -- no logits.

Per step it records the loss, the wall time of forward + backward + optimizer step,
and the peak memory above what was held before the step (CPU: the peak RSS after
``malloc_trim`` and a reset of ``VmHWM`` through ``/proc/self/clear_refs``; CUDA:
``torch.cuda.max_memory_allocated``). It prints the figures and draws a 3-panel PNG
(``--out``): the loss curves, peak memory and step time.

Needs torch, fused_ce, matplotlib and tqdm only.
"""

from __future__ import annotations

import argparse
import collections
import copy
import math
import os
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import fused_ce
from fused_ce.memory import measure_peak_mb

VARIANTS = ("torch", "fused_ce")
COLORS = {"torch": "#4C72B0", "fused_ce": "#DD8452"}

# --------------------------------------------------------------------------- data

# Identifiers, numbers, newlines, 4-space indents and single punctuation marks; other
# whitespace separates tokens and is dropped.
TOKEN = re.compile(r"\n|    |[A-Za-z_][A-Za-z0-9_]*|\d+|[^\s\w]")
UNK = "<unk>"
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def build_corpus(vocab_size: int) -> tuple[torch.Tensor, list[str], int]:
    """(token ids [n] int64 of the whole corpus, the vocabulary: id -> token, the number of files)."""
    tokens: list[str] = []
    files = stdlib_files()
    for path in files:
        tokens += TOKEN.findall(path.read_text(encoding="utf-8", errors="replace"))
    counts = collections.Counter(tokens)
    if len(counts) + 1 < vocab_size:
        raise SystemExit(f"the corpus has only {len(counts)} distinct tokens; use --vocab {len(counts) + 1} or less")
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: vocab_size - 1]
    vocab = [UNK] + [token for token, _ in ranked]
    index = {token: i for i, token in enumerate(vocab)}
    ids = torch.tensor([index.get(t, 0) for t in tokens], dtype=torch.int64)
    return ids, vocab, len(files)


def batches(ids: torch.Tensor, steps: int, batch: int, seq: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) [batch, seq] windows at random offsets, the same list for both runs."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq - 1, (steps, batch), generator=g)
    windows = torch.arange(seq + 1)
    out = []
    for row in starts:
        chunk = ids[row[:, None] + windows]  # [batch, seq + 1]
        out.append((chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()))
    return out


# --------------------------------------------------------------------------- model


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D]
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D/H]
        x = x + self.proj(attn.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, max_seq: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, D]
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def torch_loss(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = F.linear(h, weight)  # [B, T, V]
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def fused_loss(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return fused_ce.linear_cross_entropy(h, weight, target)


LOSSES = {"torch": torch_loss, "fused_ce": fused_loss}


# --------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- training


def train(args) -> dict:
    device = torch.device(args.device)
    t0 = time.perf_counter()
    ids, vocab, n_files = build_corpus(args.vocab)
    split = int(len(ids) * 0.95)
    train_ids, val_ids = ids[:split], ids[split:]
    unk = (ids == 0).float().mean().item()
    print(f"corpus: {n_files} stdlib files, {len(ids):,} tokens, vocabulary {len(vocab):,} "
          f"(<unk> {unk:.1%} of tokens), built in {time.perf_counter() - t0:.1f} s")

    torch.manual_seed(args.seed)
    model = TinyLM(len(vocab), args.dim, args.layers, args.heads, args.seq).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    head_params = model.lm_head.weight.numel()
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"model: {args.layers} layers, D = {args.dim}, {n_params / 1e6:.1f} M parameters "
          f"({head_params / 1e6:.1f} M in the LM head), {args.batch} x {args.seq} tokens per step, "
          f"{args.steps} steps, {device.type}{threads}")

    models = {v: copy.deepcopy(model) for v in VARIANTS}  # the same initial weights
    del model
    optimizers = {
        v: torch.optim.AdamW(m.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
        for v, m in models.items()
    }
    data = batches(train_ids, args.steps, args.batch, args.seq, args.seed)
    record = {v: {"loss": [], "time": [], "memory": []} for v in VARIANTS}
    if device.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("measuring CPU memory needs Linux (/proc/self/clear_refs)")

    def step(variant: str, i: int, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float, float]:
        m, opt = models[variant], optimizers[variant]
        for group in opt.param_groups:
            group["lr"] = lr_at(i, args.steps, args.lr, max(1, args.steps // 20))
        x, y = x.to(device), y.to(device)
        result = {}

        def timed():
            _sync(device)
            start = time.perf_counter()
            loss = LOSSES[variant](m.hidden_states(x), m.lm_head.weight, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            result["elapsed"] = time.perf_counter() - start
            result["loss"] = loss.item()

        # CPU: peak RSS (malloc_trim, then VmHWM reset through clear_refs); CUDA: allocator peak.
        peak = measure_peak_mb(timed, device)
        return result["loss"], result["elapsed"], peak

    # Drawn on stderr only when it is a terminal (disable=None), erased when done.
    with tqdm(total=args.steps, disable=True if args.no_progress else None, leave=False, dynamic_ncols=True) as bar:
        for i, (x, y) in enumerate(data):
            # In turns, in alternating order, so that both see the same machine load.
            for variant in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:
                loss, elapsed, peak = step(variant, i, x, y)
                record[variant]["loss"].append(loss)
                record[variant]["time"].append(elapsed)
                record[variant]["memory"].append(peak)
            bar.set_postfix_str("  ".join(f"{v} {record[v]['loss'][-1]:.3f}" for v in VARIANTS), refresh=False)
            bar.update()

    val = {}
    with torch.no_grad():
        val_batches = batches(val_ids, 8, args.batch, args.seq, args.seed + 1)
        for v, m in models.items():
            m.eval()
            total = sum(torch_loss(m.hidden_states(x.to(device)), m.lm_head.weight, y.to(device)).item()
                        for x, y in val_batches)
            val[v] = total / len(val_batches)
    return {"record": record, "val": val, "vocab": len(vocab), "params": n_params, "device": str(device),
            "threads": torch.get_num_threads(), "args": vars(args)}


# --------------------------------------------------------------------------- report


# The first steps are left out of the time and memory medians: thread pools, BLAS
# workspaces and the optimizer's state are set up then.
UNTIMED_STEPS = 3


def summarize(result: dict) -> dict:
    summary = {}
    for v, r in result["record"].items():
        tail = r["loss"][-20:]
        timed = slice(UNTIMED_STEPS if len(r["time"]) > UNTIMED_STEPS else 0, None)
        summary[v] = {
            "final_loss": sum(tail) / len(tail),
            "last_loss": r["loss"][-1],
            "val_loss": result["val"][v],
            "peak_mib": statistics.median(r["memory"][timed]),
            "peak_max_mib": max(r["memory"][timed]),
            "step_ms": 1000 * statistics.median(r["time"][timed]),
        }
    a, b = (result["record"][v]["loss"] for v in VARIANTS)
    summary["max_loss_gap"] = max(abs(x - y) for x, y in zip(a, b))
    return summary


def print_summary(summary: dict, seconds: float) -> None:
    print(f"{'':9s} {'final loss':>10s} {'val loss':>9s} {'peak memory':>12s} {'step time':>10s}")
    for v in VARIANTS:
        s = summary[v]
        print(f"{v:9s} {s['final_loss']:10.4f} {s['val_loss']:9.4f} {s['peak_mib']:8.1f} MiB {s['step_ms']:7.1f} ms")
    t, f = summary["torch"], summary["fused_ce"]
    print(f"fused_ce / torch: peak memory {f['peak_mib'] / t['peak_mib']:.2f}x, step time "
          f"{f['step_ms'] / t['step_ms']:.2f}x; largest loss difference at one step {summary['max_loss_gap']:.2e}")
    print("(final loss: mean of the last 20 steps; val loss: 8 held-out batches; peak memory: median over steps "
          f"of the peak above the memory in use before the step; step time: median; total {seconds:.0f} s)")


def plot(result: dict, summary: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record, args = result["record"], result["args"]
    device = result["device"] + (f", {result['threads']} threads" if result["device"] == "cpu" else "")
    fig, (ax_loss, ax_mem, ax_time) = plt.subplots(1, 3, figsize=(15, 4.6), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    fig.suptitle(
        f"Tiny LM on the Python standard library: V = {result['vocab']:,}, D = {args['dim']}, {args['layers']} layers, "
        f"{args['batch']}×{args['seq']} tokens per step ({device})",
        fontsize=12,
    )
    labels = {"torch": "F.cross_entropy(F.linear(h, W), y)", "fused_ce": "fused_ce.linear_cross_entropy(h, W, y)"}

    steps = range(1, len(record["torch"]["loss"]) + 1)
    # torch's curve wide and pale underneath, fused_ce's thin on top: both stay visible where they coincide.
    ax_loss.plot(steps, record["torch"]["loss"], color=COLORS["torch"], lw=3.2, alpha=0.45, label=labels["torch"])
    ax_loss.plot(steps, record["fused_ce"]["loss"], color=COLORS["fused_ce"], lw=1.0, label=labels["fused_ce"])
    ax_loss.set_title("Training loss (same initial weights, same batches)")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross-entropy (nats)")
    ax_loss.legend(frameon=False, loc="upper right")
    ax_loss.text(0.98, 0.72, f"largest gap at one step: {summary['max_loss_gap']:.1e}\n"
                 f"final: {summary['torch']['final_loss']:.3f} vs {summary['fused_ce']['final_loss']:.3f}",
                 transform=ax_loss.transAxes, ha="right", va="top", fontsize=9, color="#444444")
    ax_loss.grid(alpha=0.3)

    names = list(VARIANTS)
    for ax, key, unit, title, fmt in (
        (ax_mem, "peak_mib", "MiB", "Peak memory of a step", "{:.0f} MiB"),
        (ax_time, "step_ms", "ms", "Time of a step (fwd + bwd + AdamW)", "{:.0f} ms"),
    ):
        values = [summary[v][key] for v in names]
        bars = ax.bar(names, values, color=[COLORS[v] for v in names], width=0.6)
        for bar, value in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, value, fmt.format(value), ha="center", va="bottom", fontsize=10)
        ratio = values[1] / values[0]
        ax.set_title(f"{title}\nfused_ce: {ratio:.2f}× of torch's", fontsize=11)
        ax.set_ylabel(unit)
        ax.set_ylim(0, max(values) * 1.18)
        ax.grid(axis="y", alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    ax_loss.spines[["top", "right"]].set_visible(False)
    mem_note = "above the memory in use before the step (RSS)" if result["device"] == "cpu" else "max_memory_allocated"
    ax_mem.set_xlabel(f"median over steps; {mem_note}", fontsize=8)
    ax_time.set_xlabel("median over steps, the two runs interleaved", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None) -> int:
    default_device = "cuda" if torch.cuda.is_available() and fused_ce.cuda_kernels_available() else "cpu"
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--device", default=default_device, help=f"cpu or cuda (default here: {default_device})")
    p.add_argument("--out", default="docs/train_tiny_lm.png",
                   help="the PNG to write (default docs/train_tiny_lm.png; '' for none)")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    p.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq < 2 or args.vocab < 2:
        p.error("--steps and --batch must be >= 1, --seq and --vocab >= 2")
    if args.dim % args.heads:
        p.error("--dim must be a multiple of --heads")

    start = time.perf_counter()
    result = train(args)
    summary = summarize(result)
    print_summary(summary, time.perf_counter() - start)
    if args.out:
        plot(result, summary, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
