"""Smoke test of examples/lightning_quickstart.py on a tiny setting."""

from __future__ import annotations

import csv
import importlib.util
import math
import os

import pytest
import torch

pytest.importorskip("lightning.pytorch")

EXAMPLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "examples",
    "lightning_quickstart.py",
)


@pytest.fixture
def quickstart():
    spec = importlib.util.spec_from_file_location("lightning_quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    n = torch.get_num_threads()
    yield module
    torch.set_num_threads(n)  # the example sets one thread


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_quickstart_runs_logs_and_skips_the_nan_batch(quickstart, tmp_path, capsys):
    out = quickstart.main(
        [
            "--max-steps",
            "24",
            "--log-every",
            "8",
            "--nan-at",
            "5",
            "--depth",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out
    assert out["steps"] == 24
    assert out["nonfinite_steps"] == out["skipped_steps"] == 1
    assert out["clipped_steps"] >= 1
    assert math.isfinite(out["loss"])
    assert out["csv"] in printed and "Steps 24: clipped" in printed
    with open(out["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r.get("grad_2.0_norm_total")]
    assert [int(r["step"]) for r in ours] == [7, 15, 23]
    assert float(ours[-1]["grad/skipped_steps"]) == 1
    assert "grad_2.0_norm/net.0.weight" in rows[0] and "grad/max_abs/net.8.bias" in rows[0]
    assert any(r.get("train_loss") for r in rows)
    if importlib.util.find_spec("tensorboard") is not None:
        assert "tensorboard --logdir" in printed
        tb = tmp_path / "quickstart_tb"
        assert any(p.name.startswith("events.out.tfevents") for p in tb.rglob("*"))
