"""The GPU check scripts (benchmarks/gpu/), tested where they can be without a GPU: the phases
of run_gpu_checks.sh, and ncu_summary.py on Nsight Compute CSV in the format ncu prints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_DIR = os.path.join(REPO, "benchmarks", "gpu")
sys.path.insert(0, GPU_DIR)

import ncu_summary  # noqa: E402

HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
    '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)


def _row(launch: int, kernel: str, metric: str, unit: str, value: str) -> str:
    return (
        f'"{launch}","1234","python","host","{kernel}","1","7","(256, 1, 1)","(264, 1, 1)","0",'
        f'"9.0","Command line profiler metrics","{metric}","{unit}","{value}"'
    )


def _csv(healthy: bool) -> str:
    reduce = "gradstab::cuda::reduce_kernel(gradstab::cuda::Params)"
    scale = "gradstab::cuda::scale_kernel(gradstab::cuda::Params)"
    rows = [
        "==PROF== Connected to process 1234",
        "driver: traffic clip-healthy: one read of the inputs is 497759232 bytes",
        HEADER,
        _row(0, reduce, "dram__bytes_read.sum", "byte", "498,500,000"),
        _row(0, reduce, "dram__bytes_write.sum", "byte", "731,000"),
        _row(0, reduce, "gpu__time_duration.sum", "nsecond", "110,000"),
        _row(1, scale, "dram__bytes_read.sum", "byte", "1,024" if healthy else "498,000,000"),
        _row(1, scale, "dram__bytes_write.sum", "byte", "0" if healthy else "497,759,232"),
        _row(1, scale, "gpu__time_duration.sum", "usecond", "3.5"),
    ]
    return "\n".join(rows) + "\n"


def test_ncu_summary_sums_each_kernel_across_its_metrics():
    kernels = ncu_summary.parse(_csv(healthy=True))
    assert len(kernels) == 2
    reduce = next(k for n, k in kernels.items() if "reduce_kernel" in n)
    assert reduce == {
        "launches": 1,
        "read_bytes": 498_500_000.0,
        "write_bytes": 731_000.0,
        "seconds": pytest.approx(110e-6),
    }
    scale = next(k for n, k in kernels.items() if "scale_kernel" in n)
    assert scale["seconds"] == pytest.approx(3.5e-6)


def test_ncu_summary_understands_unit_prefixes():
    text = HEADER + "\n" + _row(0, "k", "dram__bytes_read.sum", "Mbyte", "2.5") + "\n"
    assert ncu_summary.parse(text)["k"]["read_bytes"] == 2.5e6


def test_ncu_summary_checks_the_promised_traffic(tmp_path):
    healthy, clipping = tmp_path / "h.csv", tmp_path / "c.csv"
    healthy.write_text(_csv(healthy=True))
    clipping.write_text(_csv(healthy=False))
    ok = ["--expect-read", "497759232", "--max-write", "4000000"]
    assert ncu_summary.main([str(healthy), *ok, "--json", str(tmp_path / "h.json")]) == 0
    assert ncu_summary.main([str(clipping), *ok]) == 3  # a write where a healthy call has none
    assert ncu_summary.main([str(healthy), "--expect-read", "100000000"]) == 3


def test_ncu_summary_fails_when_the_filter_profiled_nothing(tmp_path, capsys):
    out = tmp_path / "empty.csv"
    out.write_text("==PROF== Connected to process 1\n==WARNING== No kernels were profiled.\n")
    assert ncu_summary.main([str(out)]) == 3
    assert "no kernel was profiled" in capsys.readouterr().err


def _dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", os.path.join(GPU_DIR, "run_gpu_checks.sh")],
        env={**os.environ, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_run_gpu_checks_phases_fit_the_lease():
    one, two = _dry_run(PHASE="1"), _dry_run(PHASE="2")
    assert one.returncode == 0 and two.returncode == 0
    assert "phase 1: env build tests_cuda memcheck bench_core " in one.stdout
    assert "phase 2: env build synccheck initcheck traffic bench_more train " in two.stdout
    assert "racecheck" not in one.stdout + two.stdout  # only PHASE=all: nothing to find
    assert _dry_run(PHASE="3").returncode == 2


def test_driver_offers_every_traffic_case():
    import driver  # noqa: PLC0415 - benchmarks/gpu on sys.path

    assert set(driver.TRAFFIC_CASES) == {
        "clip-healthy",
        "clip-clipping",
        "agc-healthy",
        "agc-clipping",
    }
