"""The information-theory view of cross-entropy, computed with fused_ce's own kernels.

Run it from the repository root, with the package built::

    python -m fused_ce.analyze                   # print the tables
    python -m fused_ce.analyze --plot loss.png   # also draw the loss curve (needs matplotlib)

Every loss below comes from ``fused_ce.cross_entropy`` and every entropy from
``fused_ce.entropy``; a column marked *reference* is the textbook formula (or
PyTorch's own function) printed beside it for comparison. The tables:

1. **Loss against the probability of the true class.** For ``p`` in 20 evenly spaced
   values from 0.01 to 0.99, the loss of the 2-class logits ``[log p, log(1 - p)]``
   with target class 0, which is ``-log p``: 4.6052 nats at ``p = 0.01``, 0.0101 at
   ``p = 0.99``. A confident wrong prediction costs far more than a confident right
   one earns. The interpretation bands: very wrong (``p < 0.1``), uncertain / wrong
   (``p < 0.5``), reasonably correct (``p < 0.9``), confident and correct.
2. **A multi-class example.** 3 samples, 4 classes: the softmax probabilities (from
   the kernel's log-sum-exp, ``exp(x - lse)``), ``P(true) = exp(-loss)``, the
   per-sample losses and their mean, with ``F.cross_entropy``'s mean beside it.
3. **CE = H + KL.** For a true distribution ``p`` and a prediction ``q``,
   ``CE(p, q) = -sum_c p_c log q_c = H(p) + KL(p || q)``. ``CE`` is
   ``fused_ce.cross_entropy`` of the logits ``log q`` with probability targets
   ``p``; ``H(p)`` is ``fused_ce.entropy`` of the logits ``log p``; ``KL = CE - H``,
   checked against ``sum_c p_c log(p_c / q_c)``. A zero probability is the logit
   ``log 0 = -inf``, and the kernels count ``0 * log 0`` as 0 (as ``torch.xlogy``
   does), exactly -- no epsilon -- so the perfect prediction has ``CE = H = KL = 0``.
   With a one-hot ``p``, ``H(p) = 0``: minimising the cross-entropy is minimising
   the KL divergence from the labels.
4. **Naive against stable, in float32.** Softmax first and log after fails on
   extreme logits: ``exp(100)`` overflows float32 (``inf / inf = nan``), a
   probability that underflows to 0 gives ``-log 0 = inf``, and a row whose every
   ``exp`` underflows gives ``0 / 0 = nan``. Even the max-shifted ``torch.softmax``
   followed by ``log`` underflows. The log-sum-exp form,
   ``loss = logsumexp(x) - x_t`` -- what fused_ce's kernels compute, online -- stays
   finite and right; a float64 reference column shows the true value.
5. **The binary case.** Softmax over the two logits ``[0, z]`` gives class 1 the
   probability ``sigmoid(z)``, so the cross-entropy with the target distribution
   ``[1 - t, t]`` equals ``binary_cross_entropy_with_logits(z, t)``, soft targets
   included; the table shows both and their difference.

Tables 1, 2, 3 and 5 run in float64, so that what they show is the mathematics, not
float32 rounding; table 4 runs in float32, where rounding is the subject.

Each table is a function returning its rows (NamedTuples of plain floats), which the
tests check; ``format_table`` renders them. ``--plot PATH`` writes a PNG of the loss
curve with the interpretation bands shaded (matplotlib is imported only then).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

import fused_ce

DTYPE = torch.float64  # tables 1, 2, 3 and 5: exact enough that rounding does not show

# The interpretation bands of the loss curve: (upper bound of p, label, plot colour).
BANDS = (
    (0.1, "very wrong", "#d62728"),
    (0.5, "uncertain / wrong", "#ff7f0e"),
    (0.9, "reasonably correct", "#bcbd22"),
    (math.inf, "confident and correct", "#2ca02c"),
)


def interpret(p: float) -> str:
    """The interpretation band of a predicted probability ``p`` of the true class (lower bounds inclusive)."""
    for upper, label, _colour in BANDS:
        if p < upper:
            return label
    raise ValueError(f"p must be a probability, got {p!r}")  # NaN


# --------------------------------------------------------------------------------------
# 1. Loss against the probability of the true class
# --------------------------------------------------------------------------------------


class LossCurveRow(NamedTuple):
    p: float  # predicted probability of the true class
    loss: float  # fused_ce.cross_entropy of the logits [log p, log(1 - p)], target 0
    reference: float  # -log p
    interpretation: str


def loss_curve(num: int = 20, low: float = 0.01, high: float = 0.99) -> list[LossCurveRow]:
    """The loss at ``num`` evenly spaced probabilities of the true class, from ``low`` to ``high``."""
    p = torch.linspace(low, high, num, dtype=DTYPE)
    logits = torch.stack([p.log(), torch.log1p(-p)], dim=1)  # [num, 2]: softmax = [p, 1 - p]
    target = torch.zeros(num, dtype=torch.long)
    loss = fused_ce.cross_entropy(logits, target, reduction="none")
    return [
        LossCurveRow(pi, li, -math.log(pi), interpret(pi)) for pi, li in zip(p.tolist(), loss.tolist())
    ]


# --------------------------------------------------------------------------------------
# 2. A multi-class example
# --------------------------------------------------------------------------------------

MULTICLASS_LOGITS = ((2.0, 0.5, 0.3, 0.1), (0.1, 3.0, 0.2, 0.5), (0.5, 0.5, 0.5, 0.5))
MULTICLASS_TARGETS = (0, 1, 2)


class MultiClassRow(NamedTuple):
    logits: tuple[float, ...]
    probabilities: tuple[float, ...]  # softmax(logits) = exp(logits - lse), lse from the kernel
    target: int
    p_true: float  # exp(-loss)
    loss: float


class MultiClassExample(NamedTuple):
    rows: list[MultiClassRow]
    mean_loss: float  # fused_ce.cross_entropy(..., reduction="mean")
    torch_mean_loss: float  # F.cross_entropy, the reference


def multiclass_example(logits=MULTICLASS_LOGITS, targets=MULTICLASS_TARGETS) -> MultiClassExample:
    """Per-sample softmax, P(true) and loss of a small batch, and the mean loss."""
    x = torch.tensor(logits, dtype=DTYPE)  # [N, C]
    y = torch.tensor(targets, dtype=torch.long)  # [N]
    loss, lse = fused_ce.cross_entropy(x, y, reduction="none", return_lse=True)
    probabilities = (x - lse.unsqueeze(1)).exp()
    rows = [
        MultiClassRow(tuple(xi), tuple(qi), int(yi), math.exp(-li), li)
        for xi, qi, yi, li in zip(x.tolist(), probabilities.tolist(), y.tolist(), loss.tolist())
    ]
    mean = fused_ce.cross_entropy(x, y).item()
    return MultiClassExample(rows, mean, F.cross_entropy(x, y).item())


# --------------------------------------------------------------------------------------
# 3. CE = H + KL
# --------------------------------------------------------------------------------------

TRUE_DISTRIBUTION = (1.0, 0.0, 0.0)
PREDICTIONS = (
    ("Perfect", (1.0, 0.0, 0.0)),
    ("Confident correct", (0.9, 0.05, 0.05)),
    ("Uncertain", (0.5, 0.25, 0.25)),
    ("Random", (1 / 3, 1 / 3, 1 / 3)),
    ("Wrong", (0.1, 0.8, 0.1)),
)


class DecompositionRow(NamedTuple):
    name: str
    q: tuple[float, ...]  # the predicted distribution
    cross_entropy: float  # fused_ce.cross_entropy(log q, p): -sum p log q
    entropy: float  # fused_ce.entropy(log p): H(p)
    kl: float  # cross_entropy - entropy
    kl_reference: float  # sum p log(p / q), with 0 log 0 = 0 (torch.xlogy)


def ce_decomposition(true_distribution=TRUE_DISTRIBUTION, predictions=PREDICTIONS) -> list[DecompositionRow]:
    """CE(p, q), H(p) and KL(p || q) for one true distribution ``p`` and each named prediction ``q``."""
    names = [name for name, _q in predictions]
    q = torch.tensor([q for _name, q in predictions], dtype=DTYPE)  # [K, C]
    p = torch.tensor(true_distribution, dtype=DTYPE).expand_as(q)  # [K, C]
    # log 0 = -inf: the kernels give a zero target weight on a -inf logit 0, as xlogy does.
    ce = fused_ce.cross_entropy(q.log(), p, reduction="none")
    h = fused_ce.entropy(p.log())
    kl_reference = (torch.xlogy(p, p) - torch.xlogy(p, q)).sum(dim=1)
    return [
        DecompositionRow(name, tuple(qi), c, e, c - e, k)
        for name, qi, c, e, k in zip(names, q.tolist(), ce.tolist(), h.tolist(), kl_reference.tolist())
    ]


# --------------------------------------------------------------------------------------
# 4. Naive against stable
# --------------------------------------------------------------------------------------

EXTREME_CASES = (
    ((1.0, 2.0, 3.0), 2),  # ordinary logits: every method agrees
    ((100.0, 0.0, 0.0), 0),
    ((100.0, 0.0, 0.0), 1),
    ((1e4, -1e4, 0.0), 0),
    ((1e4, -1e4, 0.0), 1),
    ((-200.0, -200.0, -200.0), 0),
)


class NaiveStableRow(NamedTuple):
    logits: tuple[float, ...]
    target: int
    naive: float  # -log(exp(x_t) / sum exp(x)), float32
    softmax_log: float  # -log(torch.softmax(x)[t]), float32: max-shifted, still log after
    stable: float  # fused_ce.cross_entropy (log-sum-exp), float32
    reference: float  # logsumexp(x) - x_t in float64
    naive_failure: str  # why the naive one is wrong ("" where it is not)
    softmax_log_failure: str  # why softmax->log is wrong ("" where it is not)


def _naive_failure(e: torch.Tensor, target: int) -> str:
    """Why -log(e_t / sum e) goes wrong, from the exponentials ``e`` it divides."""
    total = e.sum()
    if torch.isinf(e[target]):
        return "exp(x_t) = inf, inf/inf = nan"
    if torch.isinf(total):
        return "sum exp = inf, p = 0"
    if total == 0:
        return "sum exp = 0, 0/0 = nan"
    if e[target] / total == 0:
        return "p underflows to 0"
    return ""


def _probability_failure(p: torch.Tensor) -> str:
    """Why -log p goes wrong for a probability ``p`` that may have underflowed."""
    if p == 0:
        return "p underflows to 0"
    if p < torch.finfo(p.dtype).tiny:
        return "p subnormal, digits lost"
    return ""


def naive_vs_stable(cases=EXTREME_CASES, dtype: torch.dtype = torch.float32) -> list[NaiveStableRow]:
    """The loss of each ``(logits, target)`` case computed three ways in ``dtype``, and in float64."""
    rows = []
    for logits, target in cases:
        x = torch.tensor(logits, dtype=dtype)
        e = x.exp()
        naive = -(e / e.sum())[target].log()
        softmax_p = torch.softmax(x, dim=0)[target]
        stable = fused_ce.cross_entropy(x.unsqueeze(0), torch.tensor([target]), reduction="none")[0]
        x64 = torch.tensor(logits, dtype=torch.float64)
        reference = torch.logsumexp(x64, dim=0) - x64[target]
        rows.append(
            NaiveStableRow(
                tuple(logits), target, naive.item(), -softmax_p.log().item(), stable.item(), reference.item(),
                _naive_failure(e, target), _probability_failure(softmax_p),
            )
        )
    return rows


# --------------------------------------------------------------------------------------
# 5. The binary case
# --------------------------------------------------------------------------------------

BINARY_CASES = (  # (z, t): the logit of class 1 and the target probability of class 1
    (-4.0, 0.0),
    (-4.0, 1.0),
    (0.0, 0.0),
    (0.0, 0.5),
    (0.0, 1.0),
    (1.5, 1.0),
    (1.5, 0.25),
    (3.0, 0.8),
    (20.0, 0.0),
    (-20.0, 1.0),
)


class BinaryRow(NamedTuple):
    z: float
    t: float
    sigmoid: float  # sigmoid(z) = softmax([0, z])[1]
    cross_entropy: float  # fused_ce.cross_entropy([0, z], [1 - t, t])
    bce: float  # F.binary_cross_entropy_with_logits(z, t), the reference
    difference: float  # |cross_entropy - bce|


def binary_case(cases=BINARY_CASES) -> list[BinaryRow]:
    """Cross-entropy over the logits ``[0, z]`` against binary cross-entropy with logits ``z``."""
    z = torch.tensor([c[0] for c in cases], dtype=DTYPE)
    t = torch.tensor([c[1] for c in cases], dtype=DTYPE)
    logits = torch.stack([torch.zeros_like(z), z], dim=1)  # [K, 2]
    target = torch.stack([1 - t, t], dim=1)  # [K, 2], probability targets
    ce = fused_ce.cross_entropy(logits, target, reduction="none")
    bce = F.binary_cross_entropy_with_logits(z, t, reduction="none")
    return [
        BinaryRow(zi, ti, si, ci, bi, abs(ci - bi))
        for zi, ti, si, ci, bi in zip(z.tolist(), t.tolist(), torch.sigmoid(z).tolist(), ce.tolist(), bce.tolist())
    ]


# --------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain-text table: a header, a rule, the rows. ``align``: one ``l`` or ``r`` per column (default: all ``r``)."""
    align = align or "r" * len(headers)
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError("every row and align need one entry per header")
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells):
        return "  ".join(
            str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align)
        ).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(row) for row in rows)])


def _num(x: float, spec: str = ".4f") -> str:
    """A float as text: inf, -inf and nan spelt out, -0 shown as 0."""
    return format(x + 0.0 if x == 0 else x, spec)


def _vector(values: Sequence[float], spec: str = ".4g") -> str:
    return "[" + ", ".join(_num(v, spec) for v in values) + "]"


def _section(title: str, note: str, table: str) -> str:
    return f"{title}\n{'=' * len(title)}\n{note}\n\n{table}\n"


def render_loss_curve(rows: list[LossCurveRow]) -> str:
    table = format_table(
        ["p(true)", "loss (fused_ce)", "-log p (reference)", "interpretation"],
        [[_num(r.p), _num(r.loss), _num(r.reference), r.interpretation] for r in rows],
        "rrrl",
    )
    note = "Logits [log p, log(1 - p)], target class 0: the loss is -log p (nats)."
    return _section("1. Loss against the predicted probability of the true class", note, table)


def render_multiclass(example: MultiClassExample) -> str:
    table = format_table(
        ["sample", "logits", "softmax probabilities", "target", "P(true)", "loss"],
        [
            [str(i), _vector(r.logits, ".1f"), _vector(r.probabilities, ".4f"), str(r.target), _num(r.p_true),
             _num(r.loss)]
            for i, r in enumerate(example.rows)
        ],
        "rllrrr",
    )
    table += (
        f"\n\nmean loss: {_num(example.mean_loss)} (fused_ce.cross_entropy, reduction='mean'); "
        f"reference F.cross_entropy: {_num(example.torch_mean_loss)}"
    )
    note = "Softmax probabilities = exp(logits - lse), with lse from the kernel; P(true) = exp(-loss)."
    return _section("2. A multi-class example (3 samples, 4 classes)", note, table)


def render_decomposition(rows: list[DecompositionRow], true_distribution=TRUE_DISTRIBUTION) -> str:
    table = format_table(
        ["prediction", "q", "CE(p, q)", "H(p)", "KL(p||q)", "sum p log(p/q) (reference)"],
        [
            [r.name, _vector(r.q, ".4g"), _num(r.cross_entropy), _num(r.entropy), _num(r.kl), _num(r.kl_reference)]
            for r in rows
        ],
        "llrrrr",
    )
    note = (
        f"True distribution p = {_vector(true_distribution, '.4g')}. CE = fused_ce.cross_entropy(log q, p), "
        "H = fused_ce.entropy(log p),\nKL = CE - H. Zero probabilities are logits log 0 = -inf, "
        "with 0 log 0 = 0 exactly (no epsilon).\nWith a one-hot p, H(p) = 0 and CE = KL: "
        "minimising the cross-entropy minimises the KL divergence."
    )
    return _section("3. Cross-entropy = entropy + KL divergence", note, table)


def render_naive_vs_stable(rows: list[NaiveStableRow]) -> str:
    table = format_table(
        ["logits", "target", "naive", "softmax->log", "stable: fused_ce", "float64 ref", "what goes wrong"],
        [
            [_vector(r.logits, ".6g"), str(r.target), _num(r.naive), _num(r.softmax_log), _num(r.stable),
             _num(r.reference),
             "; ".join(f"{name}: {why}" for name, why in (("naive", r.naive_failure),
                                                           ("softmax->log", r.softmax_log_failure)) if why)]
            for r in rows
        ],
        "lrrrrrl",
    )
    note = (
        "float32. naive: -log(exp(x_t) / sum exp(x)). softmax->log: -log(torch.softmax(x)[t]), max-shifted\n"
        "but still taking the log of a probability that can underflow. stable: logsumexp(x) - x_t, which\n"
        "is what fused_ce's kernels compute (online, one pass over the row)."
    )
    return _section("4. Naive (softmax, then log) against stable (log-sum-exp)", note, table)


def render_binary(rows: list[BinaryRow]) -> str:
    table = format_table(
        ["z", "target t", "sigmoid(z)", "CE([0, z], [1-t, t]) (fused_ce)", "BCE-with-logits(z, t) (reference)",
         "|difference|"],
        [[_num(r.z, ".1f"), _num(r.t, ".2f"), _num(r.sigmoid, ".4g"), _num(r.cross_entropy), _num(r.bce),
          _num(r.difference, ".1e")] for r in rows],
    )
    note = "softmax([0, z])[1] = sigmoid(z), so 2-class cross-entropy is binary cross-entropy with logits z."
    return _section("5. The binary case", note, table)


def report() -> str:
    """Every table, rendered."""
    return "\n".join([
        render_loss_curve(loss_curve()),
        render_multiclass(multiclass_example()),
        render_decomposition(ce_decomposition()),
        render_naive_vs_stable(naive_vs_stable()),
        render_binary(binary_case()),
    ])


# The command line and the plot use the tables above.
from .plot import main as main  # noqa: E402
from .plot import plot_loss_curve as plot_loss_curve  # noqa: E402
