"""The CE benchmark's output: its metadata, the printed table, the JSON document and the plots.

The JSON format is documented in ``bench/README.md``.
"""

from __future__ import annotations

from pathlib import Path

import harness
from cases import Result
from impls import EXTRAS, FRESH_COPY_NOTE


def collect_meta(args, results: list[Result], copy_gbps: float | None) -> dict:
    """``meta`` of the JSON: the environment, the run's settings, and what was skipped and why."""
    received_extras = args.extras and any(r.skipped is None for r in results)
    return {
        **harness.environment(args.device),
        "copy_gbps": None if copy_gbps is None else round(copy_gbps, 1),
        "reps": args.reps,
        "warmup": args.warmup,
        "linear": args.linear,
        "step": args.step,
        "distill": args.distill,
        "linear_distill": args.linear_distill,
        # Every row that ran received the extras; an implementation that cannot take
        # them is in "skipped", with the reason.
        "extras": dict(EXTRAS) if received_extras else None,
        "skipped": [r.skip_record() for r in results if r.skipped is not None],
    }


def format_header(meta: dict) -> str:
    counted = "GB/s counts fwd: N*V*elt (read logits), fwd+bwd: 2*N*V*elt (read logits, write grad)"
    if meta.get("linear"):
        counted = (
            "TFLOP/s counts the matmuls, fwd: 2*N*D*V, fwd+bwd: 6*N*D*V; "
            "work MB = peak MB less the gradients left in .grad"
        )
    if meta.get("step"):
        counted = "a step: loss(h @ W.T, target) and its backward; beyond logits MB = peak MB less the logits (N*V*elt)"
    if meta.get("distill"):
        counted = (
            "forward KL(teacher || student) per row, batchmean; GB/s counts fwd: 2*N*V*elt (read both rows), "
            "fwd+bwd: 3*N*V*elt (and write the student's gradient)"
        )
    if meta.get("linear_distill"):
        counted = (
            "forward KL(teacher || student) of two heads' logits, batchmean; TFLOP/s counts the matmuls, "
            "fwd: 4*N*D*V (both heads), fwd+bwd: 8*N*D*V; work MB = peak MB less the gradients left in .grad"
        )
    extras = f"\nextras, given to every implementation that ran: {meta['extras']}" if meta.get("extras") else ""
    return f"{harness.describe(meta)}\nmedian of {meta['reps']} reps after {meta['warmup']} warm-up; {counted}{extras}"


def format_table(results: list[Result], copy_gbps: float | None) -> str:
    """A plain-text table, one row per result; skipped ones and input copies are footnoted below it."""
    linear = any(r.case.linear for r in results)
    step = any(r.case.step for r in results)
    if linear:
        headers = ["pass", "impl", "N", "D", "V", "dtype", "ms", "TFLOP/s", "peak MB", "work MB"]
        baselines = {"vs torch": "torch"}
        if not any(r.case.linear_distill for r in results):
            baselines["vs chunked"] = "torch.chunked"
    elif step:
        headers = ["pass", "impl", "N", "D", "V", "dtype", "ms", "peak MB", "beyond logits MB"]
        baselines = {"vs torch": "torch"}
    else:
        headers = ["pass", "impl", "N", "V", "dtype", "ms", "GB/s"] + (["% copy"] if copy_gbps else []) + ["peak MB"]
        baselines = {"vs torch": "torch"}
    headers += list(baselines)
    reference_ms = {
        (r.case, r.pass_, r.impl): r.ms for r in results if r.impl in baselines.values() and r.skipped is None
    }

    rows, skip_notes = [], []
    for r in results:
        shape = [str(r.case.n), str(r.case.d), str(r.case.v)] if linear or step else [str(r.case.n), str(r.case.v)]
        impl = f"{r.impl} [*]" if r.fresh_input_copy and r.skipped is None else r.impl
        cells = [r.pass_, impl, *shape, r.case.dtype_name]
        if r.skipped is not None:
            skip_notes.append(f"[{len(skip_notes) + 1}] {r.pass_} {r.impl} {r.case.label}: {r.skipped}")
            cells += [f"skipped [{len(skip_notes)}]"] + [""] * (len(headers) - len(cells) - 1)
        else:
            cells.append(harness.fmt_ms(r.ms))
            if linear:
                cells.append(f"{r.tflops:.3f}")
            elif not step:
                cells.append(f"{r.gbps:.1f}")
                if copy_gbps:
                    cells.append(f"{100 * r.gbps / copy_gbps:.0f}%")
            cells.append(_mb(r.peak_mem_mb))
            if linear:
                cells.append(_mb(r.workspace_mb))
            if step:
                cells.append(_mb(r.beyond_logits_mb))
            for baseline in baselines.values():
                reference = reference_ms.get((r.case, r.pass_, baseline))
                cells.append(f"{reference / r.ms:.2f}x" if reference else "-")
        rows.append(cells)
    copied = sorted({r.impl for r in results if r.fresh_input_copy and r.skipped is None})
    notes = [f"[*] {impl} {FRESH_COPY_NOTE}" for impl in copied] + skip_notes
    groups = [(r.case, r.pass_) for r in results]
    return harness.format_table(headers, rows, left={"pass", "impl", "dtype"}, groups=groups, notes=notes)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def document(meta: dict, results: list[Result]) -> dict:
    """The JSON document: ``meta`` and a row per result that ran."""
    return {"meta": meta, "rows": [r.row() for r in results if r.skipped is None]}


def write_plots(directory: str, meta: dict, results: list[Result]) -> list[Path]:
    """--plot: time and peak memory against V, one line per (implementation, pass)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"--plot needs matplotlib ({e}): pip install matplotlib") from None
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    device = meta.get("gpu") or meta.get("cpu")
    ran = [r for r in results if r.skipped is None]
    dtype = ran[0].case.dtype_name if ran else ""
    n = ran[0].case.n if ran else 0
    colors = {"fused_ce": "tab:blue", "torch": "tab:red", "torch.compile": "tab:orange", "liger": "tab:green"}
    paths = []
    for metric, label, filename in [
        ("ms", "median time per call (ms)", "time_vs_vocab.png"),
        ("peak_mem_mb", "extra peak memory per call (MiB)", "memory_vs_vocab.png"),
    ]:
        fig, ax = plt.subplots(figsize=(8, 5))
        for impl in dict.fromkeys(r.impl for r in ran):
            for pass_, style in (("fwd", "--"), ("fwd+bwd", "-")):
                points = sorted((r.case.v, getattr(r, metric)) for r in ran if r.impl == impl and r.pass_ == pass_)
                points = [(v, y) for v, y in points if y is not None]
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=colors.get(impl), label=f"{impl} {pass_}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.set_title(f"cross-entropy, N = {n}, {dtype} -- {device}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / filename
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
