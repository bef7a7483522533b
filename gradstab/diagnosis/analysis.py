"""The detector: :func:`diagnose` turns a gradient history into a :class:`Diagnosis`.

See :mod:`gradstab.diagnosis` for what it finds and docs/diagnosis.md for how.

Example:
    >>> import torch, gradstab
    >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
    >>> gradstab.diagnose(h).healthy
    True
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

from gradstab._common import check_int
from gradstab.diagnosis.data import HistoryData
from gradstab.diagnosis.findings import (
    DeadParam,
    DepthTrend,
    Diagnosis,
    LayerReport,
    NonfiniteReport,
    Spike,
    Thresholds,
)
from gradstab.diagnosis.prescriptions import prescribe

if TYPE_CHECKING:
    from gradstab.diagnosis.history import GradHistory

__all__ = ["diagnose"]

_F32 = torch.float32
_F64 = torch.float64

#: Row layout of the per-tensor float buffer: norm, max-abs, zero fraction, parameter norm.
_NORM, _MAXABS, _ZERO, _PNORM = range(4)
#: Row layout of the per-step scalar buffer: total norm, post-clip total norm, clip threshold.
_TOTAL, _POST, _THRESH = range(3)

# =========================================================================== the detector


_METRICS = ("auto", "rms", "ratio", "norm")


def diagnose(
    source: Union[GradHistory, HistoryData],
    model: nn.Module | None = None,
    *,
    window: int | None = None,
    metric: str = "auto",
    vanish_decades: float = 2.0,
    explode_decades: float = 2.0,
    sustain_steps: int = 5,
    depth_decades: float = 2.0,
    min_depth_layers: int = 4,
    spike_z: float = 6.0,
    spike_ratio: float = 5.0,
    spike_history: int = 50,
    spike_min_history: int = 8,
    large_norm: float | None = 1e6,
    clip_percentile: float = 95.0,
) -> Diagnosis:
    """Name vanishing, exploding, dead and non-finite gradients in a recorded history, and
    prescribe the remedies.

    Reads the history on the host (one copy) and analyses the last ``window`` steps. Each
    problem found gets ranked :class:`~gradstab.diagnosis.Prescription` records (likely cause,
    remedy, the call that applies it, the evidence): :attr:`Diagnosis.prescriptions`, derived
    by :func:`gradstab.diagnosis.prescriptions.prescribe` from the history and, when known, the
    model (``model=``, or the model a :class:`GradHistory` was built from).

    - **Compared magnitude** (``metric``): ``"rms"`` = ``norm / sqrt(n)`` with ``n`` the
      number of non-zero gradient elements when the zero fraction was recorded, else all
      elements (so a 4096x4096 weight and its bias, or a sparse embedding gradient, compare
      fairly); ``"ratio"`` = ``||g|| / ||w||`` (needs parameter norms; zero-initialised
      tensors have no ratio at first); ``"norm"``; ``"auto"`` = ``"rms"`` when the shapes
      are known, else ``"norm"``.  With ``"norm"`` and unknown shapes, biases are compared
      with biases and other tensors with each other (their norms differ by ``sqrt(fan_in)``).
    - **Vanishing / exploding layers**: at each step, each tensor's ``log10`` magnitude is
      compared with the median over its group (at least ``min_group`` = 3 tensors with a
      finite, non-zero gradient, else no verdict at that step).  A tensor is vanishing when
      it is at least ``vanish_decades`` below the median for ``sustain_steps`` consecutive
      steps (or for every step of a shorter window), exploding when ``explode_decades``
      above for as long.
    - **Depth trend**: the per-tensor median log magnitude over the window is fitted by a
      line against the position among weight tensors (dimension >= 2; without shapes, the
      tensors whose name does not end in ``bias``), input first.  With at least
      ``min_depth_layers`` tensors, a fitted rise toward the input of ``depth_decades`` or
      more means exploding gradients, a fall of as much vanishing ones.
    - **Spikes**: a step whose total norm ``x`` has, against the finite total norms of the
      previous ``spike_history`` steps (at least ``spike_min_history`` of them), a robust
      z-score ``(log10 x - median) / max(1.4826 MAD, 0.01)`` of at least ``spike_z`` and
      ``x >= spike_ratio x`` the median.  Steps with a total norm of at least ``large_norm``
      are listed too (``None``: off).
    - **Dead**: a tensor with no non-zero finite gradient at any step of the window (absent:
      ``"no-grad"``; present and exactly zero: ``"zero"``).  With unit tracking, output units
      whose gradient stayed exactly zero since the window's first step (``"units"``: a unit
      counts as dead when it is zero in every tensor of its module that shares its output
      dimension, e.g. a row of ``weight`` and the element of ``bias``).  Without unit
      tracking, partly dead tensors show only as a high zero fraction.
    - **Non-finite**: the first step with a NaN/Inf gradient and its origin, the affected
      parameter first in backward order (reverse network order); see the module docstring.

    - **Prescriptions**: the recommended clip threshold is the ``clip_percentile``-th
      percentile of the healthy steps' total norms (:func:`~gradstab.diagnosis.prescriptions.
      clip_threshold`); the rest is described in :mod:`gradstab.diagnosis.prescriptions`.

    Args:
        source: a :class:`GradHistory` or a :class:`HistoryData`.
        model: the model whose parameters the history names: its modules are the evidence of
            the prescriptions (activations, normalisation, init scale, recurrent weights), and
            its shapes are used when the source has none.  Default: the model a
            :class:`GradHistory` was built from (``GradHistory(model)``), else none.
        window: analyse the last ``window`` steps (default: all held).
        metric, vanish_decades, explode_decades, sustain_steps, depth_decades,
            min_depth_layers, spike_z, spike_ratio, spike_history, spike_min_history,
            large_norm: thresholds, as above.
        clip_percentile: percentile (0-100] of the healthy total norms that the clip
            prescription recommends as the threshold.

    Returns:
        A :class:`Diagnosis`; ``print(d)`` shows the findings and a table of the worst
        tensors.

    Example:
        >>> import torch, gradstab
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(20):
        ...     layers += [torch.nn.Linear(16, 16), torch.nn.Sigmoid()]
        >>> model = torch.nn.Sequential(*layers)
        >>> h = gradstab.GradHistory(model)
        >>> for step in range(5):
        ...     model.zero_grad()
        ...     model(torch.randn(32, 16)).pow(2).mean().backward()
        ...     h.record_step(step)
        >>> d = gradstab.diagnose(h)
        >>> d.vanishing_gradients, d.vanishing[0]
        (True, '0.weight')
    """
    owner = "gradstab.diagnose"
    if metric not in _METRICS:
        raise ValueError(f"{owner}: metric must be one of {_METRICS}, got {metric!r}")
    for name, value in (
        ("vanish_decades", vanish_decades),
        ("explode_decades", explode_decades),
        ("depth_decades", depth_decades),
        ("spike_z", spike_z),
        ("spike_ratio", spike_ratio),
        ("clip_percentile", clip_percentile),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}")
    if large_norm is not None and (
        isinstance(large_norm, bool)
        or not isinstance(large_norm, numbers.Real)
        or not large_norm > 0
    ):
        raise ValueError(
            f"{owner}: large_norm must be a positive number or None, got {large_norm!r}"
        )
    if clip_percentile > 100:
        raise ValueError(f"{owner}: clip_percentile must be at most 100, got {clip_percentile!r}")
    sustain_steps = check_int(sustain_steps, "sustain_steps", owner)
    min_depth_layers = check_int(min_depth_layers, "min_depth_layers", owner, 2)
    spike_history = check_int(spike_history, "spike_history", owner)
    spike_min_history = check_int(spike_min_history, "spike_min_history", owner)
    if window is not None:
        window = check_int(window, "window", owner)
    th = Thresholds(
        metric=metric,
        vanish_decades=float(vanish_decades),
        explode_decades=float(explode_decades),
        sustain_steps=sustain_steps,
        depth_decades=float(depth_decades),
        min_depth_layers=min_depth_layers,
        spike_z=float(spike_z),
        spike_ratio=float(spike_ratio),
        spike_history=spike_history,
        spike_min_history=spike_min_history,
        large_norm=None if large_norm is None else float(large_norm),
        clip_percentile=float(clip_percentile),
    )
    if isinstance(source, HistoryData):
        data = source.window(window)
    elif callable(getattr(source, "data", None)) and hasattr(source, "record_step"):
        data = source.data(window)  # a GradHistory (duck-typed: the recorder imports us)
    else:
        raise TypeError(
            f"{owner}: source must be a GradHistory or a HistoryData, got {type(source).__name__}"
        )
    if model is None:
        model = getattr(source, "model", None)
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be an nn.Module or None, got {type(model).__name__}")
    if model is not None and data.shapes is None:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if all(n in shapes for n in data.names):
            data = dataclasses.replace(data, shapes=[shapes[n] for n in data.names])
    d = _analyse(data, th)
    d.prescriptions, d.evidence_missing = prescribe(d, data, model)
    return d


def _analyse(data: HistoryData, th: Thresholds) -> Diagnosis:
    s_n, names = data.num_steps, data.names
    if s_n == 0:
        return Diagnosis(
            steps=0, first_step=None, last_step=None, metric="norm", layers=[], vanishing=[],
            exploding_layers=[], dead=[], spikes=[], large_steps=[], depth_trend=None,
            nonfinite=None, skipped_steps=[], thresholds=th, source=data.source,
        )  # fmt: skip
    norms = data.norms.to(_F64)
    finite = data.present & torch.isfinite(norms)
    metric, value, usable = _compared_value(data, th, norms, finite)
    dev, trends, run_low, run_high = _deviations(data, th, value, usable)
    need = min(th.sustain_steps, s_n)
    vanishing_mask = run_low >= need
    exploding_mask = run_high >= need
    # the weights' fit unless it is flat and the biases' is not
    trends.sort(key=lambda t: (t.direction == "flat", t.kind != "weight"))
    nonfinite_t = data.present & ~torch.isfinite(norms)
    if data.nonfinite is not None:
        nonfinite_t |= torch.nan_to_num(data.nonfinite.to(_F64), nan=0.0) > 0
    dead, status = _dead(data, norms, finite, nonfinite_t)
    nonfinite = _nonfinite(data, nonfinite_t)
    if nonfinite is not None and nonfinite.origin is not None:
        status[names.index(nonfinite.origin)].insert(0, "nonfinite-origin")
    for i in range(len(names)):
        if bool(nonfinite_t[:, i].any()) and "nonfinite-origin" not in status[i]:
            status[i].insert(0, "nonfinite")
        if bool(vanishing_mask[i]):
            status[i].append("vanishing")
        if bool(exploding_mask[i]):
            status[i].append("exploding")
    spikes, large = _spikes(data.steps, data.total_norm.to(_F64), th)
    layers = [
        _layer_report(
            data,
            i,
            norms=norms,
            finite=finite,
            value=value,
            usable=usable,
            dev=dev,
            nonfinite_t=nonfinite_t,
            status=status[i],
            runs=(int(run_low[i]), int(run_high[i])),
        )
        for i in range(len(names))
    ]
    skipped = []
    if data.skipped is not None:
        skipped = [data.steps[r] for r in range(s_n) if bool(data.skipped[r])]
    return Diagnosis(
        steps=s_n,
        first_step=data.steps[0],
        last_step=data.steps[-1],
        metric=metric,
        layers=layers,
        vanishing=[n for i, n in enumerate(names) if bool(vanishing_mask[i])],
        exploding_layers=[n for i, n in enumerate(names) if bool(exploding_mask[i])],
        dead=dead,
        spikes=spikes,
        large_steps=large,
        depth_trend=trends[0] if trends else None,
        nonfinite=nonfinite,
        skipped_steps=skipped,
        thresholds=th,
        source=data.source,
        depth_trends=trends,
    )


def _compared_value(
    data: HistoryData, th: Thresholds, norms: Tensor, finite: Tensor
) -> tuple[str, Tensor, Tensor]:
    """``(metric, value [S, T], usable [S, T])``: the magnitude the layers are compared by."""
    metric = th.metric
    if metric == "auto":
        metric = "rms" if data.shapes is not None else "norm"
    if metric == "rms" and data.shapes is None:
        metric = "norm"
    if metric == "ratio" and data.param_norms is None:
        raise ValueError(
            "gradstab.diagnose: metric='ratio' needs parameter norms, which this history "
            "does not have (record with param_norms=True)"
        )
    if metric == "rms":
        assert data.shapes is not None
        numel = torch.tensor([float(math.prod(s)) for s in data.shapes], dtype=_F64)
        n_eff = numel.expand(data.num_steps, len(data.names))
        if data.zero_fraction is not None:
            zf = data.zero_fraction.to(_F64)
            n_eff = torch.where(torch.isnan(zf), n_eff, n_eff * (1 - zf))
        value = norms / n_eff.clamp(min=1).sqrt()
    elif metric == "ratio":
        assert data.param_norms is not None
        pn = data.param_norms.to(_F64)
        value = torch.where(pn > 0, norms / pn, torch.nan)
    else:
        value = norms
    return metric, value, finite & (value > 0) & torch.isfinite(value)


def _deviations(
    data: HistoryData, th: Thresholds, value: Tensor, usable: Tensor
) -> tuple[Tensor, list[DepthTrend], Tensor, Tensor]:
    """Per-step deviation (decades) from the group median, the depth trends, and per tensor
    the longest run of steps abnormally low / high: ``(dev, trends, run_low, run_high)``.

    Biases are compared with biases: a weight's gradient carries the layer's input activations
    (grad_W = delta x^T) and a bias's does not (grad_b = delta).
    """
    names = data.names
    s_n, t_n = data.num_steps, len(names)
    logv = torch.where(usable, value.clamp(min=1e-300).log10(), torch.nan)
    kinds = ["bias" if n.endswith("bias") else "weight" for n in names]
    dev = torch.full((s_n, t_n), math.nan, dtype=_F64)
    layer_med = torch.nanmedian(logv, dim=0).values
    trends: list[DepthTrend] = []
    low = torch.zeros((s_n, t_n), dtype=torch.bool)
    high = torch.zeros((s_n, t_n), dtype=torch.bool)
    for kind in dict.fromkeys(kinds):
        members = [i for i, k in enumerate(kinds) if k == kind]
        cols = torch.tensor(members, dtype=torch.int64)
        sub = logv[:, cols]
        count = (~torch.isnan(sub)).sum(dim=1)
        med = torch.nanmedian(sub, dim=1).values
        med = torch.where(count >= th.min_group, med, torch.nan)
        dev[:, cols] = sub - med[:, None]
        # depth: matrices/filters only among the weights (a 1-D norm weight is no layer)
        fit_cols = members
        if kind == "weight" and data.shapes is not None:
            fit_cols = [i for i in members if len(data.shapes[i]) >= 2]
        trend = _depth_trend(names, fit_cols, layer_med, th, kind)
        if trend is not None:
            trends.append(trend)
        # A depth trend says which end is abnormal: with norms shrinking toward the input the
        # tensors far above the median are the healthy output end, and the reverse.
        direction = trend.direction if trend is not None else "flat"
        if direction != "exploding":
            low[:, cols] = dev[:, cols] <= -th.vanish_decades
        if direction != "vanishing":
            high[:, cols] = dev[:, cols] >= th.explode_decades
    return dev, trends, _longest_run(low), _longest_run(high)


def _dead(
    data: HistoryData, norms: Tensor, finite: Tensor, nonfinite_t: Tensor
) -> tuple[list[DeadParam], list[list[str]]]:
    """The dead tensors and units, and each tensor's status list so far ("dead", "no-grad",
    "dead-units")."""
    nonzero = finite & (norms > 0)
    dead: list[DeadParam] = []
    dead_status: dict[int, str] = {}
    for i, n in enumerate(data.names):
        if nonzero[:, i].any() or nonfinite_t[:, i].any():
            continue
        kind = "no-grad" if not data.present[:, i].any() else "zero"
        dead.append(DeadParam(name=n, kind=kind, params=[n]))
        dead_status[i] = "no-grad" if kind == "no-grad" else "dead"
    unit_status: set[int] = set()
    if data.unit_last_nonzero:
        dead += _dead_units(data, dead_status, unit_status)
    status: list[list[str]] = []
    for i in range(len(data.names)):
        st = [dead_status[i]] if i in dead_status else []
        if i in unit_status:
            st.append("dead-units")
        status.append(st)
    return dead, status


def _nonfinite(data: HistoryData, nonfinite_t: Tensor) -> NonfiniteReport | None:
    """Where the first non-finite gradients were, if any."""
    names, s_n = data.names, data.num_steps
    mask = data.nonfinite_step
    assert mask is not None
    nf_steps = [data.steps[r] for r in range(s_n) if bool(mask[r])]
    if data.first_nonfinite is not None:
        step0, affected = data.first_nonfinite
        return _nonfinite_report(names, step0, True, affected, nf_steps)
    if nf_steps:
        r0 = next(r for r in range(s_n) if bool(mask[r]))
        affected = [names[i] for i in range(len(names)) if bool(nonfinite_t[r0, i])]
        return _nonfinite_report(names, data.steps[r0], bool(affected), affected, nf_steps)
    return None


def _median(x: Tensor) -> float:
    return float(x.median()) if x.numel() else math.nan


def _layer_report(
    data: HistoryData,
    i: int,
    *,
    norms: Tensor,
    finite: Tensor,
    value: Tensor,
    usable: Tensor,
    dev: Tensor,
    nonfinite_t: Tensor,
    status: list[str],
    runs: tuple[int, int],
) -> LayerReport:
    """Tensor ``i``'s report; ``runs``: its longest abnormally low / high runs of steps."""
    col_ok = finite[:, i]
    d_col = dev[:, i][~torch.isnan(dev[:, i])]
    ratio = mx = zfrac = None
    if data.param_norms is not None:
        pn = data.param_norms[:, i].to(_F64)
        r = torch.where((pn > 0) & col_ok, norms[:, i] / pn, torch.nan)
        ratio = _median(r[~torch.isnan(r)])
    if data.max_abs is not None:
        m = data.max_abs[:, i].to(_F64)
        m = m[data.present[:, i] & ~torch.isnan(m)]
        mx = float(m.max()) if m.numel() else math.nan
    if data.zero_fraction is not None:
        z = data.zero_fraction[:, i].to(_F64)
        zfrac = _median(z[~torch.isnan(z)])
    return LayerReport(
        index=i,
        name=data.names[i],
        median_norm=_median(norms[col_ok, i]),
        median_metric=_median(value[usable[:, i], i]),
        decades_vs_median=_median(d_col),
        grad_weight_ratio=ratio,
        max_abs=mx,
        zero_fraction=zfrac,
        nonfinite_steps=int(nonfinite_t[:, i].sum()),
        vanishing_steps=runs[0],
        exploding_steps=runs[1],
        status=status,
    )


def _longest_run(flags: Tensor) -> Tensor:
    """Per column, the longest run of consecutive True rows."""
    run = torch.zeros(flags.shape[1], dtype=torch.int64)
    best = torch.zeros_like(run)
    for r in range(flags.shape[0]):
        run = (run + 1) * flags[r]
        best = torch.maximum(best, run)
    return best


def _nonfinite_report(
    names: list[str], step: int, exact: bool, affected: list[str], steps: list[int]
) -> NonfiniteReport:
    order = {n: i for i, n in enumerate(names)}
    aff = sorted((a for a in affected if a in order), key=order.__getitem__)
    return NonfiniteReport(
        step=int(step),
        exact=exact,
        origin=aff[-1] if aff else None,
        first_in_network_order=aff[0] if aff else None,
        affected=aff,
        steps=steps,
    )


def _spikes(steps: list[int], total: Tensor, th: Thresholds) -> tuple[list[Spike], list[int]]:
    spikes: list[Spike] = []
    large: list[int] = []
    ok = torch.isfinite(total) & (total > 0)
    logt = torch.where(ok, total.clamp(min=1e-300).log10(), torch.nan)
    vals = logt.tolist()
    tot = total.tolist()
    hist: list[float] = []
    for r, (lv, x) in enumerate(zip(vals, tot)):
        if th.large_norm is not None and math.isfinite(x) and x >= th.large_norm:
            large.append(steps[r])
        if math.isnan(lv):
            continue
        recent = hist[-th.spike_history :]
        if len(recent) >= th.spike_min_history:
            h = torch.tensor(recent, dtype=_F64)
            med = float(h.median())
            mad = float((h - med).abs().median())
            z = (lv - med) / max(1.4826 * mad, 0.01)
            ratio = 10 ** (lv - med)
            if z >= th.spike_z and ratio >= th.spike_ratio:
                spikes.append(Spike(steps[r], x, 10**med, z, ratio))
        hist.append(lv)
    return spikes, large


def _depth_trend(
    names: list[str], cols: list[int], layer_med: Tensor, th: Thresholds, kind: str
) -> DepthTrend | None:
    pts = [(k, float(layer_med[i])) for k, i in enumerate(cols) if not math.isnan(layer_med[i])]
    if len(pts) < th.min_depth_layers:
        return None
    x = torch.tensor([p[0] for p in pts], dtype=_F64)
    y = torch.tensor([p[1] for p in pts], dtype=_F64)
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    fit = ym + slope * (x - xm)
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - float(((y - fit) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    span = -slope * float(x[-1] - x[0])  # change from output end to input end
    if span >= th.depth_decades:
        direction = "exploding"
    elif span <= -th.depth_decades:
        direction = "vanishing"
    else:
        direction = "flat"
    return DepthTrend(
        layers=[names[cols[int(k)]] for k in x.tolist()],
        slope_decades_per_layer=slope,
        growth_toward_input=10 ** (-slope),
        decades_toward_input=span,
        r2=r2,
        direction=direction,
        kind=kind,
    )


def _dead_units(
    data: HistoryData, dead_status: dict[int, str], unit_status: set[int]
) -> list[DeadParam]:
    """Dead output units per module: zero in every tensor of the module with that many units."""
    assert data.unit_last_nonzero is not None
    since = data.unit_tracking_since
    if since is None:
        return []  # no gradient was ever examined unit by unit
    start = max(data.steps[0], since)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, n in enumerate(data.names):
        last = data.unit_last_nonzero.get(n)
        if last is None or i in dead_status:
            continue
        prefix = n.rsplit(".", 1)[0] if "." in n else ""
        groups.setdefault((prefix, int(last.numel())), []).append(i)
    out = []
    for (prefix, k), idx in groups.items():
        if k == 0:
            continue
        dead = torch.ones(k, dtype=torch.bool)
        for i in idx:
            dead &= data.unit_last_nonzero[data.names[i]] < start
        units = torch.nonzero(dead).flatten().tolist()
        if units:
            unit_status.update(idx)
            params = [data.names[i] for i in idx]
            out.append(
                DeadParam(
                    name=prefix or params[0],
                    kind="units",
                    units=units,
                    total_units=k,
                    params=params,
                )
            )
    return out
