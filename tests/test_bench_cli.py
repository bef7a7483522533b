"""``gradstab.tools.bench``: the parameter sets have their published totals, and
``python -m gradstab bench`` runs, prints its table, and rejects bad options with status 2.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys

import pytest
from gradstab_testing.oracles import child_env

from gradstab.__main__ import main
from gradstab.tools import bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _totals(shapes):
    return len(shapes), sum(math.prod(s) for _, s in shapes)


def test_gpt2_small_shapes():
    shapes = bench.gpt2_small_shapes()
    assert _totals(shapes) == (148, 124_439_808)
    names = [n for n, _ in shapes]
    assert len(set(names)) == len(names)
    assert dict(shapes)["wte.weight"] == (50257, 768)
    assert dict(shapes)["h.11.mlp.c_proj.weight"] == (3072, 768)


def test_resnet50_shapes():
    shapes = bench.resnet50_shapes()
    assert _totals(shapes) == (161, 25_557_032)
    assert dict(shapes)["conv1.weight"] == (64, 3, 7, 7)
    assert dict(shapes)["fc.weight"] == (1000, 2048)
    assert sum(1 for n, _ in shapes if "downsample.0" in n) == 4


def test_many_small_shapes():
    shapes = bench.many_small_shapes()
    count, numel = _totals(shapes)
    assert count == 1000
    assert 8.0e6 <= 4 * numel <= 9.5e6  # bytes in float32
    assert all(len(s) == 1 and 256 <= s[0] <= 4096 for _, s in shapes)
    assert shapes == bench.many_small_shapes()  # a fixed seed
    assert set(bench.PARAM_SETS) == {"gpt2", "resnet50", "many-small"}


def test_bench_quick_run_prints_a_table(tmp_path):
    args = ["--quick", "--set", "many-small", "--repeats", "2", "--warmup", "1", "--threads", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "gradstab", "bench", *args],
        check=False,
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    header = "| set | dtype | mode | contestant | median ms |"
    assert any(line.startswith(header) for line in lines), proc.stdout
    rows = [line for line in lines if line.startswith("| many-small | fp32 |")]
    modes = {row.split("|")[3].strip() for row in rows}
    assert modes == {"healthy", "clip"}, proc.stdout
    assert any("gradstab" in row for row in rows)
    # the training path's clip, with its ratio to the functional call (a number in (0, 10))
    wrapper = [r for r in rows if "GradStabOptimizer.clip()" in r]
    assert len(wrapper) == 2, proc.stdout
    assert all(0 < float(r.split("|")[8]) < 10 for r in wrapper), wrapper
    assert "Total time" in proc.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--set", "nope"],
        ["bench", "--set", ""],
        ["bench", "--dtype", "fp8"],
        ["bench", "--mode", "healthy,bogus"],
        ["bench", "--repeats", "many"],
        ["bench", "--no-such-option"],
        ["no-such-command"],
        [],
    ],
)
def test_bad_options_exit_with_status_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "--repeats", "0"], "--repeats must be >= 1"),
        (["bench", "--warmup", "-1"], "--warmup >= 0"),
        (["bench", "--device", "meta"], "unsupported device"),
    ],
)
def test_bad_values_return_status_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--quick" in capsys.readouterr().out


def test_results_files_hold_summaries_and_raw_rounds_only_when_compressed(tmp_path):
    from gradstab.tools.bench.timing import Result  # noqa: PLC0415
    from gradstab.tools.results import write_json  # noqa: PLC0415

    row = Result("s", "fp32", "healthy", "gradstab", "gradstab", [1.0, 2.0, 4.0], 4_000_000)
    plain, packed = tmp_path / "r.json", tmp_path / "r.json.gz"
    write_json(str(plain), {"results": [row.to_json(raw=False)]})
    write_json(str(packed), {"results": [row.to_json(raw=True)]})
    summary = json.loads(plain.read_text())["results"][0]
    assert "times_ms" not in summary
    assert summary["median_ms"] == 2.0 and summary["rounds"] == 3
    assert (summary["q1_ms"], summary["q3_ms"]) == (1.5, 3.0)
    with gzip.open(packed, "rt", encoding="utf-8") as f:
        assert json.load(f)["results"][0]["times_ms"] == [1.0, 2.0, 4.0]
