"""``python -m fused_ce.analyze``: every table's numbers against the values and formulas
it states, the printed report, and the ``--plot`` PNG."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from fused_ce import analyze

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


# 1. Loss against the probability of the true class


def test_loss_curve_is_minus_log_p_at_20_points():
    rows = analyze.loss_curve()
    assert len(rows) == 20
    assert rows[0].p == pytest.approx(0.01) and rows[-1].p == pytest.approx(0.99)
    assert f"{rows[0].loss:.4f}" == "4.6052" and f"{rows[-1].loss:.4f}" == "0.0101"
    steps = [b.p - a.p for a, b in itertools.pairwise(rows)]
    assert steps == pytest.approx([0.98 / 19] * 19)
    for r in rows:
        assert r.reference == -math.log(r.p)
        assert f"{r.loss:.4f}" == f"{r.reference:.4f}"
        assert r.loss == pytest.approx(r.reference, rel=1e-12)
        assert r.interpretation == analyze.interpret(r.p)


@pytest.mark.parametrize(
    "p, label",
    [
        (0.0, "very wrong"),
        (0.0999, "very wrong"),
        (0.1, "uncertain / wrong"),
        (0.4999, "uncertain / wrong"),
        (0.5, "reasonably correct"),
        (0.8999, "reasonably correct"),
        (0.9, "confident and correct"),
        (1.0, "confident and correct"),
    ],
)
def test_interpretation_bands_at_their_boundaries(p, label):
    assert analyze.interpret(p) == label


def test_loss_curve_interpretations_in_order():
    labels = [r.interpretation for r in analyze.loss_curve()]
    assert labels[0] == "very wrong" and labels[-1] == "confident and correct"
    order = [label for _upper, label, _colour in analyze.BANDS]
    assert [order.index(x) for x in labels] == sorted(order.index(x) for x in labels)


# 2. The multi-class example


def test_multiclass_example_against_torch():
    example = analyze.multiclass_example()
    x = torch.tensor(analyze.MULTICLASS_LOGITS, dtype=torch.float64)
    y = torch.tensor(analyze.MULTICLASS_TARGETS)
    assert len(example.rows) == 3
    expected_probs = torch.softmax(x, dim=1)
    expected_loss = F.cross_entropy(x, y, reduction="none")
    for i, r in enumerate(example.rows):
        assert len(r.probabilities) == 4
        torch.testing.assert_close(torch.tensor(r.probabilities, dtype=torch.float64), expected_probs[i],
                                   rtol=1e-12, atol=1e-12)
        assert sum(r.probabilities) == pytest.approx(1.0, abs=1e-12)
        assert r.p_true == pytest.approx(r.probabilities[r.target], rel=1e-12)
        assert r.loss == pytest.approx(expected_loss[i].item(), rel=1e-12)
    assert example.mean_loss == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-12)
    assert example.mean_loss == pytest.approx(example.torch_mean_loss, rel=1e-12)
    # Uniform logits: P(true) = 1/4, loss = log 4.
    assert example.rows[2].p_true == pytest.approx(0.25) and example.rows[2].loss == pytest.approx(math.log(4))


# 3. CE = H + KL


def test_ce_is_entropy_plus_kl_row_by_row():
    rows = analyze.ce_decomposition()
    assert [r.name for r in rows] == ["Perfect", "Confident correct", "Uncertain", "Random", "Wrong"]
    for r in rows:
        assert all(math.isfinite(v) for v in (r.cross_entropy, r.entropy, r.kl, r.kl_reference)), r
        assert r.entropy == 0.0  # one-hot p
        assert r.cross_entropy == pytest.approx(r.entropy + r.kl_reference, abs=1e-12)
        assert r.kl == pytest.approx(r.kl_reference, abs=1e-12)
        assert r.kl >= 0.0
    expected_ce = {"Confident correct": -math.log(0.9), "Uncertain": math.log(2), "Random": math.log(3),
                   "Wrong": math.log(10)}
    for r in rows[1:]:
        assert r.cross_entropy == pytest.approx(expected_ce[r.name], rel=1e-12)


def test_perfect_prediction_is_exactly_zero():
    perfect = analyze.ce_decomposition()[0]
    assert perfect.q == (1.0, 0.0, 0.0)
    # 0 log 0 = 0 exactly: no epsilon, no NaN from 0 * -inf.
    assert perfect.cross_entropy == 0.0 and perfect.entropy == 0.0 and perfect.kl == 0.0
    assert perfect.kl_reference == 0.0


def test_ce_decomposition_with_a_soft_true_distribution():
    p = (0.7, 0.2, 0.1)
    rows = analyze.ce_decomposition(p, [("itself", p), ("other", (0.2, 0.5, 0.3)), ("sparse", (0.5, 0.5, 0.0))])
    h = -sum(pi * math.log(pi) for pi in p)
    assert rows[0].entropy == pytest.approx(h, rel=1e-12)
    assert rows[0].kl == pytest.approx(0.0, abs=1e-12)  # KL(p || p) = 0
    assert rows[1].kl > 0
    for r in rows[:2]:
        assert r.cross_entropy == pytest.approx(r.entropy + r.kl_reference, rel=1e-12)
    # q = 0 where p > 0: the cross-entropy and KL are infinite, as they should be.
    assert rows[2].cross_entropy == math.inf and rows[2].kl_reference == math.inf


# 4. Naive against stable


def test_naive_fails_and_stable_is_right_on_extreme_logits():
    rows = analyze.naive_vs_stable()
    ordinary, extreme = rows[0], rows[1:]
    assert ordinary.logits == (1.0, 2.0, 3.0) and ordinary.naive_failure == ""
    for value in (ordinary.naive, ordinary.softmax_log, ordinary.stable):
        assert value == pytest.approx(ordinary.reference, rel=1e-6)
    assert any(r.logits == (100.0, 0.0, 0.0) for r in extreme)
    assert any(r.logits == (1e4, -1e4, 0.0) for r in extreme)
    for r in extreme:
        assert not math.isfinite(r.naive), r
        assert r.naive_failure, r
        assert math.isfinite(r.stable), r
        assert r.stable == pytest.approx(r.reference, rel=1e-6, abs=1e-6), r
    by_case = {(r.logits, r.target): r for r in rows}
    assert math.isnan(by_case[(100.0, 0.0, 0.0), 0].naive)  # exp(100) = inf in float32: inf / inf
    assert by_case[(1e4, -1e4, 0.0), 1].naive == math.inf  # p = 1 / inf = 0: -log 0
    assert by_case[(1e4, -1e4, 0.0), 1].stable == 20000.0
    assert by_case[(1e4, -1e4, 0.0), 1].softmax_log == math.inf  # max-shifted, but p underflows
    assert by_case[(1e4, -1e4, 0.0), 1].softmax_log_failure


def test_naive_vs_stable_in_float64_moves_the_overflow():
    # exp(100) fits float64, so [100, 0, 0] is fine there; 1e4 still overflows.
    rows = {(r.logits, r.target): r for r in analyze.naive_vs_stable(dtype=torch.float64)}
    assert rows[(100.0, 0.0, 0.0), 1].naive == pytest.approx(100.0)
    assert math.isnan(rows[(1e4, -1e4, 0.0), 0].naive)
    assert rows[(1e4, -1e4, 0.0), 0].stable == 0.0


# 5. The binary case


def test_binary_cross_entropy_equals_bce_with_logits():
    rows = analyze.binary_case()
    assert len(rows) >= 5
    assert any(0 < r.t < 1 for r in rows), "soft targets are shown"
    for r in rows:
        bce = F.binary_cross_entropy_with_logits(
            torch.tensor(r.z, dtype=torch.float64), torch.tensor(r.t, dtype=torch.float64)
        ).item()
        assert r.cross_entropy == pytest.approx(bce, abs=1e-6)
        assert r.bce == pytest.approx(bce, abs=1e-12)
        assert r.difference == abs(r.cross_entropy - r.bce) <= 1e-6
        assert r.sigmoid == pytest.approx(1 / (1 + math.exp(-r.z)), rel=1e-12)


# Rendering and the command line


def test_format_table_aligns_columns():
    text = analyze.format_table(["name", "value"], [["a", "1.0"], ["long name", "22.25"]], "lr")
    lines = text.splitlines()
    assert lines[0] == "name       value"
    assert lines[1] == "---------  -----"
    assert lines[2] == "a            1.0"
    assert lines[3] == "long name  22.25"
    with pytest.raises(ValueError):
        analyze.format_table(["a", "b"], [["only one"]])


def test_numbers_print_without_negative_zero():
    assert analyze._num(-0.0) == "0.0000"
    assert analyze._num(math.inf) == "inf" and analyze._num(math.nan) == "nan"


def test_main_prints_every_table(capsys):
    assert analyze.main([]) == 0
    out = capsys.readouterr().out
    titles = ("1. Loss against", "2. A multi-class", "3. Cross-entropy = entropy + KL", "4. Naive", "5. The binary")
    for title in titles:
        assert title in out
    assert "4.6052" in out and "0.0101" in out
    assert "Perfect" in out and "20000.0000" in out and "nan" in out


def test_main_plot_writes_a_png(tmp_path, capsys):
    if not HAS_MATPLOTLIB:
        pytest.skip("matplotlib is not installed (it is optional, for --plot)")
    path = tmp_path / "loss.png"
    assert analyze.main(["--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000
    assert str(path) in capsys.readouterr().out


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as exit_info:
        analyze.main(["--plot", str(tmp_path / "loss.png")])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "pip install matplotlib" in captured.err
    assert captured.out == ""  # it fails before printing the tables
    assert not (tmp_path / "loss.png").exists()
