"""``python -m gradstab bench --train`` on a tiny setting, and its report arithmetic."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from gradstab.__main__ import main
from gradstab.tools.bench import train as bench_train


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # bench --train sets one thread


def test_bench_train_command(tmp_path, capsys):
    path = tmp_path / "train.json.gz"  # .gz: the raw timings too
    argv = ["bench", "--train", "--repeats", "1", "--train-steps", "8", "--warmup", "2"]
    argv += ["--train-width", "8", "--train-depth", "2", "--json", str(path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for v in bench_train.VARIANTS:
        assert f"| {v} |" in out
    assert "gradstab overhead / Lightning overhead" in out or "no ratio" in out
    assert "final parameters match the Lightning run" in out
    with gzip.open(path, "rt", encoding="utf-8") as f:
        doc = json.load(f)
    for clock in bench_train.CLOCKS:
        for v in bench_train.VARIANTS:
            assert len(doc["times_ms"][clock][v]) == 5  # 8 steps: 7 intervals, 2 untimed
    assert doc["check"]["clipped_steps"] >= 1
    assert doc["check"]["max_abs_param_diff"] < 1e-5


def test_bad_plan_is_refused(capsys):
    argv = ["bench", "--train", "--repeats", "1", "--train-steps", "4", "--warmup", "3"]
    assert main(argv) == 2
    assert "0 <= warmup < steps - 1" in capsys.readouterr().err


def test_summary_arithmetic():
    wall = {"none": [1.0, 3.0, 2.0], "lightning": [4.0, 5.0, 6.0], "gradstab": [2.5, 2.5, 2.5]}
    cpu = {"none": [1.0], "lightning": [0.5], "gradstab": [1.1]}
    s = bench_train.summarize({"times": {"wall": wall, "cpu": cpu}})
    assert s["wall"]["ratio"] == pytest.approx(0.5 / 3.0)
    assert [r["overhead_ms"] for r in s["wall"]["rows"]] == [None, 3.0, 0.5]
    assert s["cpu"]["ratio"] is None  # Lightning "faster" than nothing: noise, no ratio
    text = bench_train.format_report(s)
    assert "wall clock: gradstab overhead / Lightning overhead = 0.167" in text
    assert "cpu clock:  Lightning's overhead was not positive" in text
