"""``python -m fused_ce.analyze``: the command line, and the plot of the loss curve (matplotlib)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from . import BANDS, loss_curve, report


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ImportError, saying how to install it, without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"--plot needs matplotlib ({e}); install it with `pip install matplotlib`") from e
    return plt


def plot_loss_curve(path: str, points: int = 20) -> None:
    """Writes a PNG of the loss against the probability of the true class, the bands shaded."""
    plt = _pyplot()
    curve = loss_curve(num=400, low=0.005, high=0.995)
    marks = loss_curve(num=points)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    lower = 0.0
    for upper, label, colour in BANDS:
        if lower == 0:
            span = f"p < {upper:g}"
        elif upper > 1:
            span = f"p \u2265 {lower:g}"
        else:
            span = f"{lower:g} \u2264 p < {upper:g}"
        ax.axvspan(lower, min(upper, 1.0), color=colour, alpha=0.15, lw=0, label=f"{label} ({span})")
        lower = upper
    ax.plot([r.p for r in curve], [r.loss for r in curve], color="#1f4e9c", lw=2,
            label=r"loss $-\log p$, by fused_ce.cross_entropy")
    ax.plot([r.p for r in marks], [r.loss for r in marks], "o", color="#1f4e9c", ms=4,
            label=f"the {points} table points")
    for r, offset, ha in ((marks[0], (12, 6), "left"), (marks[-1], (-12, 18), "right")):
        ax.annotate(f"{r.loss:.4f} at p = {r.p:.2f}", (r.p, r.loss), textcoords="offset points", xytext=offset,
                    ha=ha, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(r.loss for r in curve) * 1.05)
    ax.set_xlabel(r"predicted probability of the true class, $p$")
    ax.set_ylabel(r"cross-entropy loss, $-\log p$ (nats)")
    ax.set_title("Cross-entropy loss against the probability of the true class")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused_ce.analyze",
        description="Cross-entropy from the information-theory side, computed with fused_ce's kernels.",
    )
    parser.add_argument("--plot", metavar="PATH", help="also write a PNG of the loss curve to PATH (needs matplotlib)")
    args = parser.parse_args(argv)
    if args.plot:
        try:
            _pyplot()  # fail before printing, not after
        except ImportError as e:
            parser.error(str(e))
    print(report())
    if args.plot:
        plot_loss_curve(args.plot)
        print(f"wrote the loss curve to {args.plot}")
    return 0
