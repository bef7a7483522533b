"""What a step records and logs: the history row and the logged metrics, assembled on the device
and read in one transfer on a logging step.

Example:
    >>> from gradstab._clipping.metrics import step_metrics
    >>> callable(step_metrics)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstab.adaptive import AdaptiveThreshold

if TYPE_CHECKING:
    from gradstab.diagnosis import GradHistory
from gradstab._clipping.config import ClipConfig, metric_names
from gradstab._clipping.parts import Part, Stats, cached_index, pnorm
from gradstab._clipping.plan import Plan, Unit, unit_key_suffix
from gradstab._clipping.state import ClipState

_F64 = torch.float64


def _scalar_threshold(unit: Unit, uparts: Sequence[Part]) -> Tensor | None:
    """The unit's bound when it is one number (0-d), else ``None``."""
    if unit.kind in ("stats", "agc", "normalize", "normalize_total") or not uparts:
        return None
    if isinstance(unit.bound, AdaptiveThreshold) and unit.tracks != "total":
        return None  # one bound per tensor or module
    shown = uparts[0].shown
    if shown is None or shown.dim() != 0:
        return None
    return shown


def _post_total(parts: Sequence[Part], p: float, zeroed: bool | Tensor) -> Tensor:
    dev0 = parts[0].stats[0].device
    posts = [part.post_norm(p).to(dev0, _F64) for part in parts]
    post = posts[0] if len(posts) == 1 else pnorm(torch.stack(posts), p)
    if isinstance(zeroed, Tensor):
        post = torch.where(zeroed.to(dev0), torch.zeros_like(post), post)
    elif zeroed:
        post = torch.zeros_like(post)
    return post


def record_history(
    cfg: ClipConfig,
    history: GradHistory,
    plan: Plan,
    parts: Sequence[Part],
    unit_logs: Sequence[tuple[Unit, list[Part], AdaptiveThreshold | None]],
    *,
    zeroed: bool | Tensor,
    skipped: bool | Tensor,
    scale: Tensor | None,
    step: int | None,
) -> None:
    """Record the step into ``history`` from the statistics the ops returned (no extra pass).

    Rows of parameters the history does not know (not named in it) are left out.  The
    post-clip norm is recorded where it follows from the statistics (not ``"value"``,
    ``"agc"``); the threshold where the optimizer has one bound that is one number.
    """
    cached = plan.cache.get("history")
    if cached is None or cached[0] is not history:
        cached = plan.cache["history"] = (history, set(history.names))
    known = cached[1]
    stats_list: list[Stats] = []
    names: list[str] = []
    grads: list[Tensor] = []
    for part in parts:
        n, m, c, t = part.stats
        if part.kind == "agc":  # the op returns clipped-unit counts, not max-abs
            m = torch.full_like(n, math.nan)
        sel = [i for i, nm in enumerate(part.names) if nm in known]
        if not sel:
            continue
        # the gradients only where the extras need them (a shortcut step lists them on demand)
        flat = [g for gs in part.grads for g in gs] if cfg.history_extras else []
        if len(sel) < len(part.names):
            idx = cached_index(plan.cache, sel, n.device)
            n, m, c = n.index_select(0, idx), m.index_select(0, idx), c.index_select(0, idx)
            flat = [flat[i] for i in sel] if flat else flat
        stats_list.append((n, m, c, t))
        names += [part.names[i] for i in sel]
        grads += flat
    if not stats_list:
        return
    post = None
    if all(part.post_known for part in parts):
        post = _post_total(parts, cfg.norm_type, zeroed)
    bounds = [_scalar_threshold(u, up) for u, up, _ in unit_logs]
    bounds = [b for b in bounds if b is not None]
    history.record(
        stats_list,
        names,
        grads=grads if cfg.history_extras else None,
        post_clip_norm=post,
        clip_threshold=bounds[0] if len(bounds) == 1 and len(unit_logs) == 1 else None,
        skipped=skipped,
        scale=scale,
        step=step,
    )


def step_metrics(
    cfg: ClipConfig,
    state: ClipState,
    parts: list[Part],
    unit_logs: Sequence[tuple[Unit, list[Part], AdaptiveThreshold | None]],
    *,
    zeroed: bool | Tensor,
) -> dict[str, float]:
    """Build the metrics on the device and read them with one host transfer."""
    keys = metric_names(cfg)
    p = cfg.norm_type
    metrics: dict[str, float] = {}
    if parts:
        dev0 = parts[0].stats[0].device
        pre_l = []
        for part in parts:
            total = part.stats[3].to(dev0, _F64)
            if part.scale is not None:
                total = total / part.scale.to(dev0, _F64)
            pre_l.append(total)
        pre = pre_l[0] if len(pre_l) == 1 else pnorm(torch.stack(pre_l), p)
        post = _post_total(parts, p, zeroed)
        if parts[0].scale is not None:
            post = post / parts[0].scale.to(dev0, _F64)
        # 1 for all-zero gradients; NaN where the pre-clip norm is NaN/Inf (policy "ignore");
        # 0 for a skipped or zeroed step (post is 0 then)
        coef = torch.where(pre == 0, torch.ones_like(pre), post / pre)
        if isinstance(zeroed, Tensor):
            coef = torch.where(zeroed.to(dev0), torch.zeros_like(coef), coef)
        elif zeroed:
            coef = torch.zeros_like(coef)
        blocks: list[tuple[list[str], Tensor]] = [
            ([keys["total"], keys["post"], keys["coef"]], torch.stack((pre, post, coef))),
            (["pending"] * 3, _pending(state, dev0)),
        ]
        # thresholds: the bound in force and an adaptive threshold's statistics
        for unit, uparts, thr in unit_logs:
            sfx = unit_key_suffix(unit.key)
            b = _scalar_threshold(unit, uparts)
            if b is not None:
                blocks.append(([keys["threshold"] + sfx], b.to(dev0, _F64).reshape(1)))
            stats = getattr(thr, "statistics", lambda: None)() if thr is not None else None
            if stats and all(v.dim() == 0 for v in stats.values()):
                base = keys["threshold_stats"].rstrip("/") + sfx + "/"
                blocks.append(
                    (
                        [base + k for k in stats],
                        torch.stack([v.to(dev0, _F64) for v in stats.values()]),
                    )
                )
        agc = [part.stats[1] for part in parts if part.kind == "agc"]
        if agc:
            total_units = torch.stack([a.to(dev0, _F64).sum() for a in agc]).sum()
            blocks.append(([keys["agc"]], total_units.reshape(1)))
        if cfg.log_per_layer:
            for unit, uparts, thr in unit_logs:
                for part in uparts:
                    _per_layer_blocks(blocks, keys, unit, part=part, thr=thr, dev0=dev0)
        vals = torch.cat([t.reshape(-1) for _, t in blocks]).tolist()  # the one host read
        names = [k for ks, _ in blocks for k in ks]
        state._fold(vals[3:6])
        for k, v in zip(names, vals):
            if k != "pending":
                metrics[k] = v
    else:  # no gradient at all this step
        state.flush()
        metrics = {keys["total"]: 0.0, keys["post"]: 0.0, keys["coef"]: 1.0}
    rate = state.window_clipped / state.window_steps if state.window_steps else 0.0
    out = {
        keys["total"]: metrics.pop(keys["total"]),
        keys["post"]: metrics.pop(keys["post"]),
        keys["coef"]: metrics.pop(keys["coef"]),
        keys["rate"]: rate,
        keys["nonfinite"]: float(state.nonfinite_steps),
        keys["skipped"]: float(state.skipped_steps),
    }
    out.update(metrics)
    state.window_steps = 0
    state.window_clipped = 0
    state.last_metrics = out
    return out


def _pending(state: ClipState, device: torch.device) -> Tensor:
    """The device counters not yet read, float64 (zeros where the step counted on the host)."""
    if state.pending is None:
        return torch.zeros(3, dtype=_F64, device=device)
    return state.pending.to(device, _F64)


def _per_layer_blocks(
    blocks: list[tuple[list[str], Tensor]],
    keys: Mapping[str, str],
    unit: Unit,
    *,
    part: Part,
    thr: AdaptiveThreshold | None,
    dev0: torch.device,
) -> None:
    """Per-parameter norms, max-abs (``"agc"``: clipped units) and adaptive bounds of a part."""
    norms, second = part.stats[0].to(dev0, _F64), part.stats[1].to(dev0, _F64)
    if part.kind == "agc":
        second_key = keys["agc_layer"]
    else:
        second_key = keys["max_abs"]
        if part.scale is not None:
            second = second / part.scale.to(dev0, _F64)
    if part.scale is not None:
        norms = norms / part.scale.to(dev0, _F64)
    blocks.append(([keys["layer"] + n for n in part.names], norms))
    blocks.append(([second_key + n for n in part.names], second))
    if thr is not None and unit.tracks != "total" and part.shown is not None:
        shown = part.shown.to(dev0, _F64).expand(len(part.names))
        blocks.append(([keys["threshold_layer"] + n for n in part.names], shown))
