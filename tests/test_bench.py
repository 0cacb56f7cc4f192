"""The benchmark runs (tiny shapes) and writes its JSON in the documented form; no timing is asserted."""

import json

import pytest

from fused_ce import bench

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
        assert ROW_KEYS <= set(row) and row["op"] == "cross_entropy"
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


def _load_script(name):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_floor(capsys):
    step_floor = _load_script("step_floor")
    # The free loss hands autograd the logits' buffer as their gradient: the matmuls'
    # backward as in a real step.
    import torch

    h, w = torch.randn(5, 3, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    logits = h @ w.T
    grad = logits.detach().clone()
    step_floor._FreeLoss.apply(logits).backward()
    torch.testing.assert_close(h.grad, grad @ w.detach())
    torch.testing.assert_close(w.grad, grad.T @ h.detach())
    step_floor.main(["--shape", "16x4x50", "--reps", "1"])
    out = capsys.readouterr().out
    assert "matmuls only" in out and "the most a loss" in out
