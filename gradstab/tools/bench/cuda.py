"""CUDA-only additions to the benchmark: rotated (L2-cold) inputs, the direct C++ entry point,
and the bandwidth summary against the project's GPU targets.

Example:
    >>> from gradstab.tools.bench.cuda import CUDA_TARGETS
    >>> len(CUDA_TARGETS) > 0
    True
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import gradstab
from gradstab.tools.bench.modes import Outliers, core_contestants
from gradstab.tools.bench.table import fmt_optional
from gradstab.tools.bench.timing import Contestant, Result

#: Rotation on CUDA: sets smaller than this many L2 caches are timed on copies.
ROTATE_L2_MULTIPLE = 3
#: At most this many copies (gradstab's CUDA descriptor-table cache holds 32 entries).
MAX_ROTATE = 16

#: The GPU targets (the CUDA kernel's issue; AGC from the adaptive-clipping issue), checked by
#: :func:`cuda_summary`: (set or None for any, dtype or None, mode, baseline contestant, least
#: ratio, least fraction of the floor or None).
CUDA_TARGETS = (
    ("gpt2", None, "healthy", "torch foreach=True", 2.5, 0.85),
    (None, None, "clip", "torch foreach=True", 1.3, None),
    ("many-small", None, "healthy", "torch foreach=True", 4.0, None),
    ("llama1b", "bf16", "healthy", "torch foreach=True", 2.5, None),
    (None, None, "stats", "torch._foreach_norm", 1.0, None),
    (None, None, "stats", "lightning grad_norm", 50.0, None),
    ("resnet50", None, "agc", "timm-style loop", 5.0, None),
    # adaptive threshold <= fixed threshold + 5%: fixed / adaptive >= 1 / 1.05
    (None, None, "adaptive", "fixed threshold", 0.952, None),
    (None, None, "adaptive-zscore", "fixed threshold", 0.952, None),
)

#: Bytes each mode must move, in passes over the gradients (see ``floor_ms``; AGC reads the
#: weights as well).
_TRAFFIC = {
    "healthy": 1,
    "stats": 1,
    "value": 2,
    "clip": 3,
    "agc": 3,
    "agc-healthy": 2,
    "adaptive": 1,
    "adaptive-zscore": 1,
    # read the norm; AdamW reads weight, gradient, 2 moments, writes weight, 2 moments and
    # (grad_scale given) the gradient
    "fold": 9,
}
#: The baseline each mode's ratio is reported against in the CUDA summary.
_SUMMARY_BASELINE = {
    "stats": "torch._foreach_norm",
    "agc": "timm-style loop",
    "agc-healthy": "timm-style loop",
    "adaptive": "fixed threshold",
    "adaptive-zscore": "fixed threshold",
    "fold": "gradstab explicit (clip + step)",
}


def rotation_copies(nbytes: int, device: torch.device, requested: int | None = None) -> int:
    """How many identical copies of a gradient set to cycle through when timing.

    Args:
        nbytes: bytes of one copy of the gradients.
        device: where they live; on the CPU the answer is always 1.
        requested: ``--rotate`` (``None``: automatic).

    Returns:
        1 on the CPU; on CUDA ``requested`` (at most :data:`MAX_ROTATE`), or enough copies
        to span ``ROTATE_L2_MULTIPLE`` L2 caches (at most :data:`MAX_ROTATE`), so that each
        call reads memory the previous calls evicted from L2.

    Example:
        >>> rotation_copies(8_700_000, torch.device("cpu"))
        1
    """
    if device.type != "cuda":
        return 1
    if requested is not None:
        return max(1, min(requested, MAX_ROTATE))
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(MAX_ROTATE, math.ceil(ROTATE_L2_MULTIPLE * l2 / max(nbytes, 1))))


def make_rotation_copies(
    params: list[nn.Parameter], flat: Tensor, copies: int, value_bound: float | None
) -> list[tuple[list[nn.Parameter], Tensor, Outliers | None]]:
    """Copies 1..copies-1 of (parameters with cloned gradients, floor buffer, outliers)."""
    out = []
    for _ in range(1, copies):
        clones = []
        for p in params:
            q = nn.Parameter(p.detach().clone())  # the weights too: AGC reads them
            q.grad = p.grad.clone()
            clones.append(q)
        outliers = None
        if value_bound is not None:
            outliers = Outliers([q.grad for q in clones], value_bound)
        out.append((clones, flat.clone(), outliers))
    return out


class _Rotation:
    """Calls copy k's function, then (untimed) copy k's after-hook and moves to the next copy."""

    def __init__(
        self, fns: list[Callable[[], object]], afters: list[Callable[[], object] | None]
    ) -> None:
        self.fns = fns
        self.afters = afters
        self.k = 0

    def call(self) -> object:
        return self.fns[self.k]()

    def after(self) -> None:
        hook = self.afters[self.k]
        if hook is not None:
            hook()
        self.k = (self.k + 1) % len(self.fns)


def _direct_contestant(
    mode: str, params: list[nn.Parameter], total: float, value_bound: float, after: Any
) -> Contestant | None:
    """``gradstab._C.cuda_fast_path`` (the C++ entry point, no Python loop) as a contestant."""
    ext = gradstab._extension._C
    fast = getattr(ext, "cuda_fast_path", None) if ext is not None else None
    if fast is None:
        return None
    eps = 1e-6
    if mode not in ("healthy", "clip", "stats", "value"):
        return None  # AGC has no direct entry point
    if mode in ("healthy", "clip"):
        bound = total * (1e6 if mode == "healthy" else 0.5)
        fn = lambda: fast(1, params, 2.0, bound, eps, False)  # noqa: E731
    elif mode == "stats":
        fn = lambda: fast(0, params, 2.0, 0.0, eps, False)  # noqa: E731
    else:
        fn = lambda: fast(3, params, 2.0, value_bound, eps, False)  # noqa: E731
    return Contestant("gradstab _C.cuda_fast_path", "gradstab-direct", fn, after)


def cuda_contestants(
    mode: str,
    copies: list[tuple[list[nn.Parameter], Tensor, Outliers | None]],
    *,
    total: float,
    value_bound: float,
) -> list[Contestant]:
    """The contestants of ``mode`` on CUDA: the direct entry point added, copies rotated."""
    sets = []
    for params, flat, outliers in copies:
        cs = core_contestants(
            mode,
            params=params,
            flat=flat,
            total=total,
            value_bound=value_bound,
            outliers=outliers,
        )
        direct = _direct_contestant(mode, params, total, value_bound, cs[0].after)
        if direct is not None:
            cs.insert(1, direct)
        sets.append(cs)
    if len(sets) == 1:
        return sets[0]
    rotated = []
    for i, c in enumerate(sets[0]):
        rot = _Rotation([s[i].fn for s in sets], [s[i].after for s in sets])
        rotated.append(Contestant(c.name, c.kind, rot.call, rot.after, floor=c.floor))
    return rotated


def cuda_summary(results: Sequence[Result]) -> str:
    """Achieved bandwidth against the floor of the same run, and the CUDA targets.

    Args:
        results: rows from :func:`bench_one` on CUDA.

    Returns:
        A Markdown table (one line per set, dtype, mode and gradstab entry point) and
        the list of targets with ``met`` / ``NOT met``.

    Example:
        >>> cuda_summary([]).splitlines()[0]
        'CUDA summary: achieved bandwidth = least traffic of the mode / median time.'
    """
    lines = [
        "CUDA summary: achieved bandwidth = least traffic of the mode / median time.",
        "Traffic = gradient bytes x passes (healthy, stats: 1 read; value: 1 read+write = 2;",
        "clip: 1 read + 1 read+write = 3; agc: weights read too, 3; agc-healthy: 2).",
        "floor GB/s = the same traffic / the floor's time (flat buffer, same run).",
        "",
        "| set | dtype | mode | entry | GB/s | floor GB/s | of floor | vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.set, r.dtype, r.mode), []).append(r)
    checks = []
    for (set_name, dtype, mode), rows in groups.items():
        ours = next((r for r in rows if r.kind == "gradstab"), None)
        if ours is None or ours.floor_ms is None:
            continue
        traffic = ours.nbytes * _TRAFFIC[mode]
        floor_gbs = traffic / ours.floor_ms / 1e6
        for r in rows:
            if r.kind not in ("gradstab", "gradstab-direct"):
                continue
            base_name = _SUMMARY_BASELINE.get(mode, "torch foreach=True")
            base = next((b for b in rows if b.contestant == base_name), None)
            ratio = base.median_ms / r.median_ms if base is not None else None
            lines.append(
                f"| {set_name} | {dtype} | {mode} | {r.contestant} | "
                f"{traffic / r.median_ms / 1e6:.0f} | {floor_gbs:.0f} | "
                f"{ours.floor_ms / r.median_ms:.2f} | "
                f"{fmt_optional(ratio, '.2f')}x {base_name} |"
            )
            for t_set, t_dtype, t_mode, t_base, t_ratio, t_floor in CUDA_TARGETS:
                if t_mode != mode or t_set not in (None, set_name) or t_dtype not in (None, dtype):
                    continue
                t_row = next((b for b in rows if b.contestant == t_base), None)
                if t_row is None:
                    continue
                t_got = t_row.median_ms / r.median_ms
                frac = ours.floor_ms / r.median_ms
                ok = t_got >= t_ratio
                ok = ok and (t_floor is None or frac >= t_floor)
                want = f">= {t_ratio}x {t_base}" + (
                    f", >= {t_floor:.0%} of floor" if t_floor is not None else ""
                )
                checks.append(
                    f"- {set_name}/{dtype}/{mode} ({r.contestant}): {t_got:.2f}x, "
                    f"{frac:.0%} of floor; target {want}: {'met' if ok else 'NOT met'}"
                )
    if checks:
        lines += ["", "GPU targets (H100/H200):", *checks]
    return "\n".join(lines)
