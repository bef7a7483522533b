"""Timing: one call timed with perf_counter (CPU) or CUDA events, contestants run round-robin,
and the :class:`Result` row each contestant becomes.

Example:
    >>> from gradstab.tools.bench.timing import Result
    >>> Result("s", "fp32", "healthy", "gradstab", "gradstab", [1.0, 2.0], 4_000_000).median_ms
    1.5
"""

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gradstab.tools.results import quartiles


class Timer:
    """Times one call: ``perf_counter`` on CPU, CUDA events (after a sync) on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class Contestant:
    name: str
    kind: str  # "gradstab", "gradstab-wrapper", "baseline" or "floor"
    fn: Callable[[], object]
    after: Callable[[], object] | None = None  # untimed, after every call
    floor: str | None = None  # "read" or "read+write" for floor rows
    times_ms: list[float] = field(default_factory=list)


@dataclass
class Result:
    """Timings of one contestant on one (set, dtype, mode).

    Attributes:
        set: parameter set name.
        dtype: ``"fp32"`` or ``"bf16"``.
        mode: ``"healthy"``, ``"clip"``, ``"stats"`` or ``"value"``.
        contestant: display name.
        kind: ``"gradstab"``, ``"baseline"`` or ``"floor"``.
        times_ms: every timed repeat, in milliseconds, in round order.
        nbytes: bytes of gradients (or of the flat floor buffer).
        ratio: ``median / gradstab median`` for baselines (higher: gradstab faster).
        floor_ms: for gradstab, the floor of the mode (see ``floor_ms``).
        floor_fraction: ``floor_ms / median`` for gradstab (1.0 = at the floor).
        floor: for floor rows, ``"read"`` or ``"read+write"``.
    """

    set: str
    dtype: str
    mode: str
    contestant: str
    kind: str
    times_ms: list[float]
    nbytes: int
    ratio: float | None = None
    floor_ms: float | None = None
    floor_fraction: float | None = None
    floor: str | None = None

    @property
    def median_ms(self) -> float:
        """Median of the timed repeats."""
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range (q3 - q1) of the timed repeats."""
        q1, q3 = quartiles(self.times_ms)
        return q3 - q1

    def to_json(self, raw: bool = False) -> dict[str, Any]:
        """A JSON-ready dict of the row and its summary statistics (``raw``: every round too)."""
        q1, q3 = quartiles(self.times_ms)
        return {
            "set": self.set,
            "dtype": self.dtype,
            "mode": self.mode,
            "contestant": self.contestant,
            "kind": self.kind,
            "floor": self.floor,
            "nbytes": self.nbytes,
            "median_ms": self.median_ms,
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "min_ms": min(self.times_ms),
            "ratio": self.ratio,
            "floor_ms": self.floor_ms,
            "floor_fraction": self.floor_fraction,
            "rounds": len(self.times_ms),
            **({"times_ms": self.times_ms} if raw else {}),
        }


def run_rounds(contestants: list[Contestant], timer: Timer, warmup: int, repeats: int) -> None:
    """Round-robin: one call of each contestant per round, the first one rotating."""
    n = len(contestants)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            for k in range(n):
                c = contestants[(r + k) % n]
                ms = timer.time_ms(c.fn)
                if c.after is not None:
                    c.after()
                if r >= warmup:
                    c.times_ms.append(ms)
            timer.sync()
    finally:
        if gc_was_enabled:
            gc.enable()
