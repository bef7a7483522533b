"""Summarise Nsight Compute's CSV output for the traffic step of run_gpu_checks.sh, and check it.

``ncu --csv --print-units base --metrics dram__bytes_read.sum,dram__bytes_write.sum,
gpu__time_duration.sum ...`` prints one row per (kernel launch, metric). This script sums the
DRAM bytes read and written and the time of every profiled launch, prints them per kernel
name, writes a JSON summary, and fails (exit status 3) when no gradstab kernel was profiled --
a filter that matches nothing must not pass for a clean result -- or when the traffic is not
what the case promises:

- ``--expect-read BYTES``: the bytes read must be within ``--tolerance`` (default 10%) of it
  (one read of the gradients, plus the weights for AGC);
- ``--max-write BYTES``: at most this many bytes written (a healthy call writes only its
  per-unit records: the gradients themselves are not written).

Example:
    $ ncu --csv --print-units base --nvtx --nvtx-include "gradstab_measure/" \\
          --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \\
          python benchmarks/gpu/driver.py traffic --case clip-healthy > ncu.csv
    $ python benchmarks/gpu/ncu_summary.py ncu.csv --expect-read 497759232 --max-write 2000000
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence

#: Multipliers of the unit prefixes ncu may print (with --print-units base it prints none).
_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_TIME = {"nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0}
METRICS = {
    "dram__bytes_read.sum": "read_bytes",
    "dram__bytes_write.sum": "write_bytes",
    "gpu__time_duration.sum": "seconds",
}


def _value(text: str, unit: str) -> float:
    x = float(text.replace(",", ""))
    if unit in _TIME:
        return x * _TIME[unit]
    if unit.endswith("byte"):
        return x * _SCALE[unit[: -len("byte")]]
    return x


def parse(text: str) -> dict[str, dict[str, float]]:
    """``{kernel name: {"launches", "read_bytes", "write_bytes", "seconds"}}`` from ncu's CSV.

    Lines before the CSV header (``==PROF==`` messages, the program's own output) are ignored.

    Example:
        >>> rows = ('"ID","Kernel Name","Metric Name","Metric Unit","Metric Value"\\n'
        ...         '"0","reduce_kernel","dram__bytes_read.sum","byte","1,000"\\n')
        >>> parse("==PROF== done\\n" + rows)["reduce_kernel"]["read_bytes"]
        1000.0
    """
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID",')), None)
    if start is None:
        return {}
    out: dict[str, dict[str, float]] = {}
    seen: set[tuple[str, str]] = set()
    for row in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        metric = METRICS.get(row.get("Metric Name", ""))
        if metric is None:
            continue
        name = row["Kernel Name"]
        k = out.setdefault(name, {"launches": 0, "read_bytes": 0.0, "write_bytes": 0.0,
                                  "seconds": 0.0})  # fmt: skip
        if (row["ID"], name) not in seen:
            seen.add((row["ID"], name))
            k["launches"] += 1
        k[metric] += _value(row["Metric Value"], row.get("Metric Unit", ""))
    return out


def check(
    kernels: dict[str, dict[str, float]],
    expect_read: float | None,
    max_write: float | None,
    tolerance: float,
) -> list[str]:
    """The failed expectations (empty: all met)."""
    if not kernels:
        return ["no kernel was profiled: the kernel filter matched nothing"]
    read = sum(k["read_bytes"] for k in kernels.values())
    write = sum(k["write_bytes"] for k in kernels.values())
    problems = []
    if expect_read is not None and abs(read - expect_read) > tolerance * expect_read:
        problems.append(f"read {read:.4g} bytes, expected {expect_read:.4g} +- {tolerance:.0%}")
    if max_write is not None and write > max_write:
        problems.append(f"wrote {write:.4g} bytes, at most {max_write:.4g} allowed")
    return problems


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", help="ncu's output (stdout captured to a file)")
    parser.add_argument("--expect-read", type=float, default=None)
    parser.add_argument("--max-write", type=float, default=None)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--json", default=None, help="write the summary here")
    args = parser.parse_args(argv)
    with open(args.csv, encoding="utf-8", errors="replace") as f:
        kernels = parse(f.read())
    for name, k in sorted(kernels.items()):
        print(
            f"{name}: {int(k['launches'])} launch(es), read {k['read_bytes'] / 1e6:.3f} MB, "
            f"wrote {k['write_bytes'] / 1e6:.3f} MB, {k['seconds'] * 1e3:.3f} ms"
        )
    problems = check(kernels, args.expect_read, args.max_write, args.tolerance)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"kernels": kernels, "problems": problems}, f, indent=1)
    for p in problems:
        print(f"ncu_summary: {p}", file=sys.stderr)
    return 3 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
