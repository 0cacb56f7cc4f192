"""The benchmark runs (tiny shapes) and writes its JSON in the documented form; no timing is asserted."""

import json
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fused_ce

# The scripts of bench/ import their siblings (harness, cases, impls, ...) as top-level
# modules, as Python does when it runs `python bench/<script>.py`.
BENCH = pathlib.Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import cases  # noqa: E402
import harness  # noqa: E402
import impls  # noqa: E402
import run as bench  # noqa: E402  (bench/run.py, the CE benchmark's command line)

ROW_KEYS = {"op", "pass", "impl", "N", "V", "dtype", "ms", "gbps", "peak_mem_mb"}


def _run(tmp_path, *args):
    path = tmp_path / "out.json"
    bench.main(["--quick", "--device", "cpu", "--no-progress", "--json", str(path), *args])
    return json.loads(path.read_text())


def test_cross_entropy_json(tmp_path, capsys):
    doc = _run(tmp_path, "--impls", "fused_ce,torch")
    assert {"cpu", "torch", "git_sha", "date", "copy_gbps"} <= set(doc["meta"])
    assert doc["meta"]["copy_gbps"] is None  # measured on GPUs only
    rows = doc["rows"]
    assert {(r["pass"], r["impl"]) for r in rows} == {(p, i) for p in ("fwd", "fwd+bwd") for i in ("fused_ce", "torch")}
    for row in rows:
        assert set(row) >= ROW_KEYS and row["op"] == "cross_entropy"
        assert row["ms"] > 0 and row["gbps"] > 0
    assert "vs torch" in capsys.readouterr().out


def test_step_with_extras(tmp_path):
    doc = _run(tmp_path, "--step", "--extras", "--impls", "torch,fused_ce,fused_ce.inplace")
    assert doc["meta"]["extras"] == bench.EXTRAS
    assert {r["impl"] for r in doc["rows"]} == {"torch", "fused_ce", "fused_ce.inplace"}
    assert all(r["op"] == "training_step" and r["pass"] == "fwd+bwd" and "beyond_logits_mb" in r for r in doc["rows"])


def test_linear(tmp_path):
    doc = _run(tmp_path, "--linear", "--impls", "fused_ce,torch")
    assert all(r["op"] == "linear_cross_entropy" and r["D"] > 0 for r in doc["rows"])


def test_distill(tmp_path):
    # Every implementation computes the same loss (the forward KL, batchmean).
    doc = _run(tmp_path, "--distill")
    rows = doc["rows"]
    assert {r["impl"] for r in rows} == set(impls.DISTILL_IMPLS) and all(r["op"] == "distillation" for r in rows)
    losses = [r["loss"] for r in rows]
    assert max(losses) - min(losses) < 1e-4 * max(1.0, abs(losses[0]))


def _quick_case(op, extras=False):
    """The case of --quick on the CPU (one shape, float32)."""
    quick = {"cross_entropy": cases.QUICK, "linear_cross_entropy": cases.LINEAR_QUICK}[op]
    n, *d, v = quick["shapes"][0]
    return cases.Case(op, n, v, torch.float32, torch.device("cpu"), d=d[0] if d else 0, extras=extras)


def test_linear_extras_are_given_or_skipped(tmp_path, capsys):
    # Issue 17, item 9: --linear --extras recorded extras that no implementation was
    # given. Now every implementation that runs gets them (its loss is the loss with
    # the extras), and one that cannot take them is skipped, saying why.
    doc = _run(tmp_path, "--linear", "--extras", "--impls", "fused_ce,torch,torch.chunked")
    x, w, target = _quick_case("linear_cross_entropy").make_inputs()
    with_extras = float(fused_ce.linear_cross_entropy(x, w, target, **impls.EXTRAS))
    plain = float(F.cross_entropy(x @ w.T, target))
    assert abs(with_extras - plain) > 1e-3
    assert {r["impl"] for r in doc["rows"]} == {"fused_ce", "torch"}
    for row in doc["rows"]:
        assert row["loss"] == pytest.approx(with_extras, rel=1e-4), row
    assert doc["meta"]["extras"] == impls.EXTRAS
    skipped = {s["impl"]: s["reason"] for s in doc["meta"]["skipped"]}
    assert set(skipped) == {"torch.chunked"} and "z_loss/softcap" in skipped["torch.chunked"]
    assert "torch.chunked 256x64x4096 float32: ImplUnavailable" in capsys.readouterr().out


def test_extras_composed_from_torch_ops_match_fused_ce():
    logits, target = _quick_case("cross_entropy").make_inputs()
    target[::7] = -100  # the z-loss is a mean over the counted rows
    expected = fused_ce.cross_entropy(logits, target, **impls.EXTRAS)
    torch.testing.assert_close(impls.torch_loss(impls.EXTRAS)(logits, target), expected)


def test_extras_recorded_only_when_received(tmp_path):
    doc = _run(tmp_path, "--linear", "--extras", "--impls", "torch.chunked")
    assert doc["rows"] == [] and doc["meta"]["extras"] is None


def test_fresh_input_copy(tmp_path, capsys, monkeypatch):
    # An implementation that overwrites its input (as Liger-Kernel writes the gradient
    # into the logits) gets a fresh copy before each call: it and the implementation
    # after it see the original logits every time.
    def overwrites_input(case):
        def loss_fn(logits, target):
            loss = F.cross_entropy(logits, target)
            logits.detach().zero_()
            return loss

        return impls.Impl(loss_fn, fresh_input_copy=True)

    monkeypatch.setitem(impls.IMPLS, "overwrites", overwrites_input)
    doc = _run(tmp_path, "--impls", "overwrites,torch")
    logits, target = _quick_case("cross_entropy").make_inputs()
    expected = float(F.cross_entropy(logits, target))
    assert len(doc["rows"]) == 4
    for row in doc["rows"]:
        assert row["loss"] == pytest.approx(expected, rel=1e-5), row
        assert row.get("fresh_input_copy", False) == (row["impl"] == "overwrites")
    assert f"[*] overwrites {impls.FRESH_COPY_NOTE}" in capsys.readouterr().out


def test_liger_skipped_with_reason():
    built, unavailable = impls.build_impls(_quick_case("cross_entropy"), ["liger", "torch"])
    assert set(built) == {"torch"}
    assert "CUDA" in unavailable["liger"] or "not importable" in unavailable["liger"]


def test_time_interleaved():
    calls = []

    def record(name):
        return lambda: calls.append(name)

    def fails_second_time():
        calls.append("c")
        if calls.count("c") == 2:
            raise RuntimeError("out of memory\nmore")

    fns = {
        "a": harness.Timed(record("a"), before=record("a:before"), after=record("a:after")),
        "b": record("b"),
        "c": fails_second_time,
    }
    out = harness.time_interleaved(fns, reps=2, warmup=1, device="cpu")
    # Round robin, the first one rotating; a failure drops c from the later rounds.
    assert [c for c in calls if ":" not in c] == ["a", "b", "c", "b", "c", "a", "a", "b"]
    assert calls[:3] == ["a:before", "a", "a:after"]
    assert out["c"] == "RuntimeError: out of memory"
    assert len(out["a"]) == len(out["b"]) == 2 and min(out["a"] + out["b"]) >= 0


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    _run(tmp_path, "--plot", str(tmp_path / "plots"), "--impls", "fused_ce,torch")
    for name in ("time_vs_vocab.png", "memory_vs_vocab.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.main(["--shapes", "12xab"])
    with pytest.raises(SystemExit):
        bench.main(["--impls", "nope"])


def test_runs_as_a_script_from_anywhere(tmp_path):
    # `python bench/run.py` finds its sibling modules whatever the working directory.
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "--linear" in done.stdout and "bench/README.md" in done.stdout


def test_step_floor(capsys):
    import step_floor

    # The free loss hands autograd the logits' buffer as their gradient: the matmuls'
    # backward as in a real step.
    h, w = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    logits = h @ w.T
    grad = logits.detach().clone()
    step_floor._FreeLoss.apply(logits).backward()
    torch.testing.assert_close(h.grad, grad @ w.detach())
    torch.testing.assert_close(w.grad, grad.T @ h.detach())
    step_floor.main(["--shape", "16x4x50", "--reps", "1"])
    out = capsys.readouterr().out
    assert "matmuls only" in out and "the most a loss" in out


def test_kernel_times(capsys):
    import kernel_times

    kernel_times.main(["--device", "cpu", "--shape", "64x512", "--reps", "1", "--warmup", "0"])
    out = capsys.readouterr().out
    assert "fused kernel" in out and "cross_entropy + backward()" in out and "failed" not in out
