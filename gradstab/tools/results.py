"""What every benchmark run reports besides its timings, written once for all of them.

The machine, date, versions, kernel and ISA path, commit and command of a run
(:func:`header`); how busy other processes kept the CPUs meanwhile (:class:`OtherLoad`); the
quartiles of a list of timings; and the JSON writer of the results (:func:`write_json`), used
by ``bench`` (all modes and ``--train``).

Example:
    >>> import torch
    >>> from gradstab.tools.results import quartiles
    >>> quartiles([1.0, 2.0, 3.0, 4.0, 5.0])
    (2.0, 4.0)
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import platform
import shlex
import statistics
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

import gradstab

__all__ = [
    "OtherLoad",
    "cpu_model",
    "gpu_description",
    "header",
    "quartiles",
    "wants_raw",
    "write_json",
]


def quartiles(xs: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles of ``xs`` (inclusive method; one value: itself twice)."""
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def wants_raw(path: str) -> bool:
    """Whether a results file should hold the raw per-round timings: only a ``.json.gz`` one.

    A plain ``.json`` holds the summaries (medians, quartiles, ratios): small enough to commit
    next to RESULTS.md; the raw timings of a full run are hundreds of KB, so they go compressed.
    """
    return path.endswith(".gz")


def write_json(path: str, doc: Mapping[str, Any]) -> None:
    """Write ``doc`` as JSON to ``path`` (its folder created); gzip-compressed for ``.gz``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if wants_raw(path):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump(doc, f)
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def gpu_description(device: torch.device) -> str:
    """Name, SMs, L2 size and memory of a CUDA device, and the CUDA version of torch."""
    prop = torch.cuda.get_device_properties(device)
    l2 = getattr(prop, "L2_cache_size", 0)
    return (
        f"{prop.name}, {prop.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
        f"{prop.total_memory / 2**30:.0f} GiB; CUDA {torch.version.cuda}"
    )


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(argv: Sequence[str], device: torch.device) -> dict[str, str]:
    """Machine, date, versions, backend and command line of this run.

    Args:
        argv: the arguments after ``python -m gradstab``.
        device: the gradients' device.

    Returns:
        An ordered ``{label: value}`` dict (also stored in the JSON output).

    Example:
        >>> header(["bench", "--quick"], torch.device("cpu"))["command"]
        'python -m gradstab bench --quick'
    """
    info = gradstab.backend_info()
    machine = f"{platform.platform()}; CPU: {cpu_model()}; torch threads: {torch.get_num_threads()}"
    if device.type == "cuda":
        machine += f"; GPU: {gpu_description(device)}"
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradstab": gradstab.__version__,
        "kernel": f"cpu: {info['cpu']['kernel']} ({info['cpu']['reason']})",
        "commit": git_commit(),
        "command": "python -m gradstab " + shlex.join(argv),
    }
    if device.type == "cuda":
        meta["kernel"] += f"; cuda: {info['cuda']['kernel']} ({info['cuda']['reason']})"
    probe = OtherLoad()
    time.sleep(0.5)
    busy = probe.cpus()
    load = load_average()
    if busy is not None or load is not None:
        parts = []
        if busy is not None:
            parts.append(f"other processes busy on {busy:.2f} of {os.cpu_count()} CPUs now")
        if load is not None:
            parts.append(f"1-minute load average {load:.2f}")
        meta["load"] = "; ".join(parts)
        if busy is not None and busy > 0.1:
            meta["load"] += " -- WARNING: timings will be noisy"
    return meta


def git_commit() -> str:
    """The checkout's commit (``+dirty`` if modified), or ``"unknown"`` outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """How busy other processes kept the CPUs while the benchmark ran.

    Busy CPU time of the whole machine minus this process's own CPU time, over the
    wall time: a noise indicator (0 on an otherwise idle machine).
    """

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.busy0 = busy_seconds()
        self.own0 = sum(os.times()[:2])

    def cpus(self) -> float | None:
        """Average number of CPUs other processes kept busy since construction."""
        busy1 = busy_seconds()
        wall = time.perf_counter() - self.wall0
        if busy1 is None or self.busy0 is None or wall <= 0:
            return None
        own = sum(os.times()[:2]) - self.own0
        return max(0.0, (busy1 - self.busy0 - own) / wall)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
