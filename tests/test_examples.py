"""Smoke runs of the demo's example scripts on tiny settings, checking what they measure."""

from __future__ import annotations

import importlib.util
import math
import os
import sys

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def load(name: str):
    path = os.path.join(EXAMPLES, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_vanishing_sigmoid_mlp(tmp_path, capsys):
    out = load("vanishing_sigmoid_mlp").main(["--steps", "12", "--plots", str(tmp_path)])
    report = out["diagnosis"]
    assert report.steps == 12 and report.vanishing_gradients
    assert "0.weight" in report.vanishing
    first, last = report.layers[0], report.layers[-2]
    assert last.median_norm > 1e3 * first.median_norm
    assert 0 <= out["accuracy"] <= 1 and len(out["losses"]) == 12
    assert sorted(os.path.basename(p) for p in out["plots"]) == [
        "grad_norm_heatmap.png",
        "total_norm.png",
    ]
    assert "vanishing" in capsys.readouterr().out


@pytest.mark.parametrize("lsuv", [False, True])
def test_fixed_init_and_norm(lsuv, capsys):
    argv = ["--steps", "12"] + (["--lsuv"] if lsuv else [])
    out = load("fixed_init_and_norm").main(argv)
    assert out["diagnosis"].healthy
    assert all(math.isfinite(v) for v in out["losses"])
    printed = capsys.readouterr().out
    assert "LayerNorm" in printed and "healthy" in printed
    assert ("kaiming" in printed) != lsuv  # init_model_'s table, or LSUV's


def test_exploding_without_clipping(capsys):
    out = load("exploding_without_clipping").main(["--steps", "40", "--patience", "5"])
    report = out["diagnosis"]
    assert out["first_nonfinite"] is not None
    assert len(out["losses"]) == out["first_nonfinite"] + 5  # stopped after 5 NaN losses
    assert report.nonfinite is not None and report.exploding
    assert "non-finite gradients first at step" in capsys.readouterr().out


def test_exploding_with_gradstab(capsys):
    pytest.importorskip("lightning.pytorch")
    threads = torch.get_num_threads()
    out = load("exploding_with_gradstab").main(["--steps", "15", "--no-progress-bar"])
    torch.set_num_threads(threads)
    light, adaptive = out["lightning"], out["adaptive"]
    assert light["counters"]["steps"] == adaptive["counters"]["steps"] == 15
    for part in (light, adaptive):
        assert part["counters"]["clipped_steps"] >= 1 and part["counters"]["skipped_steps"] == 0
        assert part["accuracy"] is not None and part["diagnosis"].nonfinite is None
        assert part["diagnosis"].steps == 15  # the diagnosis of the integrated history
    # the percentile threshold never exceeds its cap; the first step has no history: the cap
    used = adaptive["thresholds"]
    assert used.shape == (15,) and float(used[0]) == 2.0 and bool((used <= 2.0).all())
    assert adaptive["below_cap_steps"] == int((used < 2.0).sum())
    printed = capsys.readouterr().out
    assert "GradStabCallback(max_norm=2, nonfinite='skip', history=15)" in printed
    assert "PercentileThreshold(10, include_current=False, max_norm=2)" in printed


def test_seed_remedies(capsys):
    module = load("seed_remedies")
    rows = module.main(["--steps", "8"])
    assert len(rows) == len(module.VARIANTS)
    by = {(r["problem"], r["remedy"]): r for r in rows}
    assert "vanishing" in by[("vanishing", "none (sigmoid, SGD)")]["verdict"]
    baseline = by[("exploding", "none (SGD lr 0.05)")]
    assert baseline["first_nonfinite"] is not None and "non-finite" in baseline["verdict"]
    assert by[("exploding", "smaller LR (0.005)")]["first_nonfinite"] is None
    printed = capsys.readouterr().out
    assert printed.count("\n") == len(rows) + 2  # header, rule, one line per variant


def test_fabric_loop(capsys):
    pytest.importorskip("lightning.fabric")
    threads = torch.get_num_threads()
    for precision in ("32-true", "bf16-mixed"):
        out = load("fabric_loop").main(
            ["--steps", "12", "--nan-step", "3", "--log-every", "4", "--precision", precision]
        )
        c = out["counters"]
        assert c["steps"] == 12 and c["skipped_steps"] == 1 and c["nonfinite_steps"] == 1
        assert c["clipped_steps"] >= 1
        assert [s for s, _ in out["logged"]] == [4, 8, 12]
        assert all(math.isfinite(v) for v in out["losses"])
        assert f"{precision}: 12 optimizer steps through gradstab" in capsys.readouterr().out
    torch.set_num_threads(threads)


PLAIN_LOOPS = [
    ("vanishing_sigmoid_mlp", ["--steps", "2"]),
    ("fixed_init_and_norm", ["--steps", "2"]),
    ("exploding_without_clipping", ["--steps", "2"]),
    ("plain_pytorch_loop", ["--steps", "2"]),
    ("seed_remedies", ["--steps", "2"]),
    ("fabric_loop", ["--steps", "2"]),
    ("exploding_with_gradstab", ["--steps", "2", "--no-progress-bar"]),
]


@pytest.mark.parametrize(("name", "argv"), PLAIN_LOOPS, ids=[n for n, _ in PLAIN_LOOPS])
def test_examples_pin_one_thread_by_default(name, argv, monkeypatch, num_threads, capsys):
    """Like the demo, the examples run their small models on one torch thread (steady when
    other processes share the CPU); ``--threads`` changes it."""
    if name in ("fabric_loop", "exploding_with_gradstab"):
        pytest.importorskip("lightning.fabric")
    calls = []
    real = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (calls.append(n), real(n)))
    load(name).main(argv)
    assert calls[:1] == [1]
    calls.clear()
    load(name).main([*argv, "--threads", "2"])
    assert calls[:1] == [2]
