"""Cases for the adaptive thresholds' rules, shared by the tests of their compiled versions
(tests/test_adaptive_compiled.py: C++ against the tensor ops; tests/test_cuda_sim_thresholds.py:
the CUDA kernels against the C++).

``ZSCORE`` and ``PERCENTILE`` are keyword arguments of :class:`~gradstab.ZScoreThreshold` and
:class:`~gradstab.PercentileThreshold` that reach every branch of the rules (each rule, the
spike update, caps, warm-ups, the smallest and a long history, both ``include_current``);
:func:`norm_sequence` gives the nasty norm sequences they are fed.
"""

from __future__ import annotations

import math

import torch

F64 = torch.float64

ZSCORE = [
    {"warmup_steps": 3},
    {"warmup_steps": 1, "rule": "mean"},
    {"warmup_steps": 1, "rule": "mean", "update_on_spike": "skip"},
    {"warmup_steps": 4, "rule": "threshold", "max_norm": 2.5},
    {"warmup_steps": 4, "rule": "threshold", "max_norm": 2.5, "alpha": 0.5, "z_thresh": 1.0},
    {"warmup_steps": 2, "update_on_spike": "skip", "alpha": 0.5, "z_thresh": 1.0},
    {"warmup_steps": 2, "eps": 0.0, "alpha": 0.0},
]
PERCENTILE = [
    {"percentile": 10.0, "history": 50},
    {"percentile": 50.0, "history": 5, "include_current": False},
    {"percentile": 0.0, "history": 1},
    {"percentile": 100.0, "history": 7, "warmup_steps": 3, "max_norm": 4.0},
    {"percentile": 90.0, "history": 4, "include_current": False, "warmup_steps": 2},
    {"percentile": 33.3, "history": 100, "include_current": False, "warmup_steps": 2},
    {"percentile": 33.3, "history": 1000},
]
#: ``(kind, kwargs)``: kind "z" (ZScoreThreshold) or "p" (PercentileThreshold).
CASES = [("z", k) for k in ZSCORE] + [("p", k) for k in PERCENTILE]


def norm_sequence(
    seed: int, steps: int, shape: tuple[int, ...], *, per_entry: bool = False
) -> list[torch.Tensor]:
    """Norms with spikes (x50), NaN, inf, zeros, ties (1.5) and huge values (1e300).

    ``per_entry=False``: each step is one kind for the whole tensor, a per-tensor state gets a
    NaN in entry 0 every fifth step, and every seventh norm is float32. ``per_entry=True``:
    every entry of a per-tensor norm draws its own kind (float64 throughout).
    """
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in range(steps):
        g = torch.rand(shape, generator=gen, dtype=F64) * 2 + 1
        r = torch.rand(shape if per_entry else (), generator=gen, dtype=F64)
        for lo, hi, value in ((0.08, 0.12, math.nan), (0.12, 0.15, math.inf), (0.15, 0.18, 0.0),
                              (0.18, 0.26, 1.5), (0.26, 0.28, 1e300)):  # fmt: skip
            g = torch.where((r >= lo) & (r < hi), value, g)
        g = torch.where(r < 0.08, g * 50, g)  # a spike
        if per_entry:
            out.append(g)
            continue
        if shape and s % 5 == 3:  # per tensor: one entry non-finite, the others not
            g = g.clone()
            g[0] = math.nan
        out.append(g.to(torch.float32) if s % 7 == 6 else g)  # a float32 norm now and then
    return out
