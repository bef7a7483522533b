""":func:`bench_one`: time every mode of one (set, dtype), all contestants interleaved.

Example:
    >>> import torch
    >>> from gradstab.tools.bench.runner import bench_one
    >>> rows = bench_one("many-small", "fp32", ["healthy"], device=torch.device("cpu"),
    ...                  warmup=1, repeats=2)  # doctest: +SKIP
"""

import time
from collections.abc import Callable, Sequence

import torch

from gradstab.tools.bench.config import AGC_MODES, DTYPES, STEP_MODES
from gradstab.tools.bench.cuda import cuda_contestants, make_rotation_copies, rotation_copies
from gradstab.tools.bench.modes import (
    Outliers,
    check_mode,
    check_total_norm,
    core_contestants,
    fill_weights,
    floor_ms,
    make_params,
    pick_value_bound,
)
from gradstab.tools.bench.sets import GPU_SETS, PARAM_SETS
from gradstab.tools.bench.timing import Result, Timer, run_rounds


def bench_one(
    set_name: str,
    dtype_name: str,
    modes: Sequence[str],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    rotate: int | None = None,
) -> list[Result]:
    """Check, then time every mode on one parameter set and dtype.

    Args:
        set_name: a key of :data:`PARAM_SETS` (or of ``GPU_SETS``).
        dtype_name: a key of ``DTYPES`` (``"fp32"``, ``"bf16"``).
        modes: modes to time, from ``MODES``.
        device: where the gradients live.
        warmup: untimed rounds before the timed ones.
        repeats: timed rounds.
        seed: seed of the gradients' ``randn``.
        log: progress sink (one line per step).
        rotate: CUDA only: number of identical copies of the set to cycle through (``None``:
            :func:`rotation_copies` decides; ignored on the CPU).

    Returns:
        One :class:`Result` per (mode, contestant), with ratios filled in.

    Raises:
        BenchError: a correctness check failed.

    Example:
        >>> rs = bench_one(
        ...     "many-small", "fp32", ["healthy"], device=torch.device("cpu"), warmup=1, repeats=3
        ... )
        >>> [r.contestant for r in rs][:3]
        ['gradstab', 'gradstab GradStabOptimizer.clip()', 'torch foreach=True']
    """
    shapes = {**PARAM_SETS, **GPU_SETS}[set_name]()
    dtype = DTYPES[dtype_name]
    params = make_params(shapes, dtype, device, seed)
    if any(m in AGC_MODES or m in STEP_MODES for m in modes):
        fill_weights(params, seed)  # AGC and the optimizer steps read the weights
    grads = [p.grad for p in params]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    where = f"{set_name}/{dtype_name}"
    # The floor: one flat float32 randn buffer with as many bytes as the gradients.
    flat = torch.randn(
        nbytes // 4, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1)
    )
    total, norm_err = check_total_norm(set_name, dtype_name, params)
    log(
        f"{where}: {len(params)} tensors, {nbytes / 1e6:.1f} MB; total norm {total:.8g} checked, "
        f"relative error vs float64: gradstab {norm_err['gradstab_vs_fp64']:.1e}, "
        f"torch {norm_err['torch_vs_fp64']:.1e}"
    )
    value_bound = 0.0
    outliers = None
    if "value" in modes:
        value_bound = pick_value_bound(grads, seed)
        outliers = Outliers(grads, value_bound)
        n = sum(g.numel() for g in grads)
        log(
            f"{where}: value bound {value_bound:.4g} clamps {outliers.count:,} of {n:,} "
            f"elements ({100 * outliers.count / n:.3f}%)"
        )
    copies = rotation_copies(nbytes, device, rotate)
    extra = make_rotation_copies(params, flat, copies, value_bound if "value" in modes else None)
    if copies > 1:
        log(f"{where}: rotating over {copies} copies ({copies * nbytes / 1e6:.0f} MB) on CUDA")
        warmup = max(warmup, copies)  # every copy seen (and its descriptor table built) first

    timer = Timer(device)
    results: list[Result] = []
    for mode in modes:
        check_mode(
            mode,
            f"{where}/{mode}",
            params=params,
            total=total,
            value_bound=value_bound,
            outliers=outliers,
        )
        contestants = core_contestants(
            mode,
            params=params,
            flat=flat,
            total=total,
            value_bound=value_bound,
            outliers=outliers,
        )
        if device.type == "cuda":
            contestants = cuda_contestants(
                mode, [(params, flat, outliers), *extra], total=total, value_bound=value_bound
            )
        t0 = time.perf_counter()
        with torch.no_grad():
            run_rounds(contestants, timer, warmup, repeats)
        log(f"{where}/{mode}: {warmup}+{repeats} rounds in {time.perf_counter() - t0:.1f} s")
        rows = [
            Result(set_name, dtype_name, mode, c.name, c.kind, c.times_ms, nbytes, floor=c.floor)
            for c in contestants
        ]
        ours = next(r for r in rows if r.kind == "gradstab")
        ours.floor_ms = floor_ms(mode, rows)
        ours.floor_fraction = ours.floor_ms / ours.median_ms
        for r in rows:
            if r.kind == "baseline":
                r.ratio = r.median_ms / ours.median_ms
            elif r.kind == "gradstab-wrapper":  # below 1: what the training path costs more
                r.ratio = ours.median_ms / r.median_ms
        results.extend(rows)
    return results
