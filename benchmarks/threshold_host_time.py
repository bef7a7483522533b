"""Host time per step of the adaptive-threshold rules on the CPU (one thread).

Times ``PercentileThreshold(90, history=1000, include_current=False)`` (``threshold()`` then
``update(norm)``) and ``ZScoreThreshold()`` (``threshold_and_update(norm)``), each fed a new
0-d norm tensor per step, as a training loop would; the tensor's creation alone is timed too
(it is part of both figures). Medians of 5 loops of 2,000 steps after 200 untimed ones.

Run: ``python benchmarks/threshold_host_time.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from gradstab.adaptive import PercentileThreshold, ZScoreThreshold


def per_step_us(fn: Callable[[], object], steps: int = 2000, loops: int = 5) -> float:
    """Median over ``loops`` of the mean time of ``fn`` across ``steps`` calls, in µs."""
    for _ in range(200):
        fn()
    times = []
    for _ in range(loops):
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        times.append((time.perf_counter() - start) / steps * 1e6)
    return statistics.median(times)


def main() -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    norms = (torch.rand(4096, generator=gen) * 2 + 1).tolist()
    step = [0]

    def next_norm() -> torch.Tensor:
        step[0] += 1
        return torch.tensor(norms[step[0] % len(norms)])

    percentile = PercentileThreshold(90, history=1000, include_current=False)
    zscore = ZScoreThreshold()

    def percentile_step() -> None:
        norm = next_norm()
        percentile.threshold()
        percentile.update(norm)

    rows = [
        ("torch.tensor(norm) alone", next_norm),
        ("PercentileThreshold: threshold() + update(), history 1000", percentile_step),
        (
            "ZScoreThreshold: threshold_and_update()",
            lambda: zscore.threshold_and_update(next_norm()),
        ),
    ]
    print(f"torch {torch.__version__}, 1 thread; µs per step, median of 5 x 2,000 steps")
    for name, fn in rows:
        print(f"{name}: {per_step_us(fn):.1f} µs")


if __name__ == "__main__":
    main()
