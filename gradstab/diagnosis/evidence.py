"""The evidence the prescriptions rest on, read from the model and from the gradient history.

From the **model**: its Linear/Conv layers whose parameters the history names, the activation
that follows each (:func:`gradstab._modules.follows`, the rules
:func:`gradstab.init.init_model_` uses), its normalisation and recurrent modules
(:func:`read_model`); each layer's weight RMS against the He/Xavier std for its fans and
activation (:func:`init_scale`); the singular values of recurrent weights
(:func:`recurrent_spectra`).  From the **history**: the clip threshold of the healthy steps
(:func:`clip_threshold`), the tensors that jump at spikes (:func:`spike_tensors`), a log-linear
growth fit (:func:`fit_growth`), the rise of the total norm before the first NaN
(:func:`rise_before_nonfinite`).  :mod:`gradstab.diagnosis.prescriptions` turns them into
remedies.

Example:
    >>> from torch import nn
    >>> from gradstab.diagnosis.evidence import read_model
    >>> net = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 1))
    >>> [(lay.name, lay.act_name) for lay in read_model(net, ["0.weight", "2.weight"]).layers]
    [('0', '1'), ('2', None)]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradstab._modules import (
    LAYER_TYPES,
    NORM_TYPES,
    follows,
    is_plain_sequential,
    layer_fans,
    module_parents,
    scheme_and_gain,
)
from gradstab.diagnosis.data import HistoryData
from gradstab.diagnosis.findings import Diagnosis

__all__ = [
    "SATURATING",
    "LayerInfo",
    "ModelEvidence",
    "clip_threshold",
    "fit_growth",
    "init_scale",
    "read_model",
    "recurrent_spectra",
    "rise_before_nonfinite",
    "saturation_bound",
    "spike_tensors",
]

_F64 = torch.float64

#: Saturating activations and the largest value of their derivative.
SATURATING: tuple[tuple[type[nn.Module], float], ...] = (
    (nn.Sigmoid, 0.25),
    (nn.Hardsigmoid, 1.0 / 6.0),
    (nn.Tanh, 1.0),
    (nn.Softsign, 1.0),
    (nn.Hardtanh, 1.0),  # ReLU6 (a subclass) is excluded below
)


# =========================================================================== from the model


@dataclass
class LayerInfo:
    """A Linear/Conv layer of the model whose parameters are in the history."""

    name: str
    module: nn.Module
    params: list[str]
    follow: str  # "act", "layer", "output" or "unknown"
    act: nn.Module | None = None
    act_name: str | None = None


@dataclass
class ModelEvidence:
    """What the prescriptions read from the model's modules."""

    model: nn.Module
    modules: dict[str, nn.Module]
    parents: dict[str, tuple[str, str]]
    layers: list[LayerInfo]
    norms: list[str]
    recurrent: list[tuple[str, nn.Module]]
    params: dict[str, torch.Tensor] = field(default_factory=dict)

    def plain_chain(self, layers: list[LayerInfo]) -> bool:
        """Every module from each layer up to their common ancestor is a plain Sequential:
        the data flows through them in order, with no skip connection in between."""
        if len(layers) < 2:
            return False
        parts = [lay.name.split(".") for lay in layers]
        common: list[str] = []
        for seg in zip(*parts):
            if len(set(seg)) != 1:
                break
            common.append(seg[0])
        top = ".".join(common)
        for lay in layers:
            cur = lay.name
            while cur != top:
                if cur not in self.parents:
                    return False
                cur = self.parents[cur][0]
                if not is_plain_sequential(self.modules[cur]):
                    return False
        return True


def read_model(
    model: nn.Module, names: list[str], shapes: list[tuple[int, ...]] | None = None
) -> ModelEvidence | None:
    """The model's layers, norms and recurrent modules, or ``None`` when the model does not
    match the history (a name it lacks, or a shape that differs)."""
    params = dict(model.named_parameters())
    if not names or not all(n in params for n in names):
        return None
    if shapes is not None and any(tuple(params[n].shape) != s for n, s in zip(names, shapes)):
        return None
    modules = dict(model.named_modules())
    parents = module_parents(model)
    ids: dict[int, str] = {}
    for n, m in modules.items():
        ids.setdefault(id(m), n)
    layers: dict[str, LayerInfo] = {}
    for n in names:
        if n not in params:
            continue
        mod_name = n.rpartition(".")[0]
        module = modules.get(mod_name)
        if module is None or not isinstance(module, LAYER_TYPES):
            continue
        if mod_name in layers:
            layers[mod_name].params.append(n)
            continue
        kind, what = follows(model, modules, parents, mod_name)
        lay = LayerInfo(mod_name, module, [n], kind)
        if kind == "act":
            lay.act, lay.act_name = what, ids.get(id(what), "?")
        layers[mod_name] = lay
    return ModelEvidence(
        model=model,
        modules=modules,
        parents=parents,
        layers=list(layers.values()),
        norms=[n for n, m in modules.items() if isinstance(m, NORM_TYPES)],
        recurrent=[
            (n, m) for n, m in modules.items() if isinstance(m, (nn.RNNBase, nn.RNNCellBase))
        ],
        params={n: p for n, p in params.items() if n in set(names)},
    )


def _plain(t: torch.Tensor) -> bool:
    """A materialised tensor of this process (not meta, not a DTensor or other subclass whose
    values live elsewhere): its values may be read for evidence."""
    return not t.is_meta and type(t.detach()) is torch.Tensor


def saturation_bound(act: nn.Module | None) -> float | None:
    """The derivative bound of a saturating activation, else ``None``."""
    if act is None or isinstance(act, nn.ReLU6):
        return None
    for t, bound in SATURATING:
        if isinstance(act, t):
            return bound
    return None


def init_scale(
    mi: ModelEvidence, layers: list[LayerInfo], data: HistoryData
) -> dict[str, Any] | None:
    """Each layer's weight RMS against the std :func:`init_model_` would give it.

    The RMS comes from the first row of the recorded parameter norms when there is one (the
    weights near the window's start), else from the current weights.
    """
    rows: list[dict[str, Any]] = []
    sources = set()
    for lay in layers:
        if lay.follow == "unknown":
            continue
        wname = next((p for p in lay.params if p.endswith("weight")), None)
        if wname is None:
            continue
        w = mi.params[wname]
        numel = w.numel()
        rms, src = math.nan, ""
        if data.param_norms is not None:
            col = data.param_norms[:, data.names.index(wname)].to(_F64)
            ok = torch.isfinite(col).nonzero().flatten()
            if ok.numel():
                r = int(ok[0])
                rms = float(col[r]) / math.sqrt(max(numel, 1))
                src = f"weights at step {data.steps[r]}"
        if not math.isfinite(rms) and _plain(w):
            rms, src = float(w.detach().to(_F64).pow(2).mean().sqrt()), "current weights"
        if not (math.isfinite(rms) and rms > 0):
            continue
        fan_in, fan_out = layer_fans(lay.module)
        scheme, gain = scheme_and_gain(lay.act if lay.follow == "act" else None)
        if scheme == "kaiming":
            target = gain / math.sqrt(fan_in)
        else:
            target = gain * math.sqrt(2.0 / (fan_in + fan_out))
        sources.add(src)
        rows.append(
            {
                "layer": lay.name,
                "activation": type(lay.act).__name__ if lay.act is not None else "linear",
                "fan_in": fan_in,
                "scheme": scheme,
                "target_std": target,
                "rms": rms,
                "ratio": rms / target,
            }
        )
    if not rows:
        return None
    log_sum = sum(math.log10(r["ratio"]) for r in rows)
    return {
        "layers": rows,
        "weights_from": sorted(sources),
        "geometric_mean_ratio": 10 ** (log_sum / len(rows)),
        "compounded": 10**log_sum,
        "compounded_decades": log_sum,
    }


def recurrent_spectra(mi: ModelEvidence) -> list[dict[str, Any]]:
    """Singular values of each gate block of every recurrent module's hidden-hidden weight."""
    out = []
    for name, m in mi.recurrent:
        mode = getattr(m, "mode", type(m).__name__).upper()
        blocks = 4 if "LSTM" in mode else 3 if "GRU" in mode else 1
        h = int(m.hidden_size)
        for pname, p in m.named_parameters(recurse=False):
            if not pname.startswith("weight_hh") or not _plain(p):
                continue
            w = p.detach().to(_F64)
            if not bool(torch.isfinite(w).all()):
                out.append({"weight": f"{name}.{pname}" if name else pname, "finite": False})
                continue
            sv = torch.cat([torch.linalg.svdvals(w[b * h : (b + 1) * h]) for b in range(blocks)])
            out.append(
                {
                    "weight": f"{name}.{pname}" if name else pname,
                    "finite": True,
                    "gate_blocks": blocks,
                    "max_singular_value": float(sv.max()),
                    "min_singular_value": float(sv.min()),
                }
            )
    return out


# =========================================================================== from the history


def clip_threshold(
    data: HistoryData, diagnosis: Diagnosis, percentile: float | None = None
) -> dict[str, Any] | None:
    """The clip threshold the history recommends and what it would have done.

    The healthy steps are those with a finite, positive total norm that are not a spike, not
    a huge norm (``large_norm``), not skipped and not above ``spike_ratio`` times the median
    of the healthy steps before them. The threshold is the ``percentile``-th percentile of
    their total norms (linear interpolation, as ``numpy.percentile``), rounded up to three
    significant digits.

    Args:
        data: the history the diagnosis was made from (the same window).
        diagnosis: its :class:`Diagnosis` (spikes, huge norms, skipped steps, thresholds).
        percentile: default: ``diagnosis.thresholds.clip_percentile``.

    Returns:
        ``None`` when no step is healthy, else a dict: ``threshold``, ``percentile``,
        ``healthy_steps`` (their step numbers), ``healthy_median``, ``steps`` (recorded),
        ``would_clip`` (steps with a finite total norm above the threshold),
        ``clip_fraction`` (``would_clip / steps``), ``nonfinite_steps``, ``excluded`` (counts
        per reason), ``max_total_norm``.

    Example:
        >>> import torch, gradstab
        >>> from gradstab.diagnosis import HistoryData
        >>> t = torch.tensor([1.0, 2.0, 3.0, 4.0, 1e3], dtype=torch.float64)
        >>> d = HistoryData(names=["w"], steps=list(range(5)), norms=t[:, None],
        ...                 present=torch.ones(5, 1, dtype=torch.bool), total_norm=t)
        >>> clip_threshold(d, gradstab.diagnose(d), percentile=50)["threshold"]
        2.5
    """
    th = diagnosis.thresholds
    q = th.clip_percentile if percentile is None else float(percentile)
    total = data.total_norm.to(_F64).tolist()
    spikes = {s.step for s in diagnosis.spikes}
    large = set(diagnosis.large_steps)
    skipped = set(diagnosis.skipped_steps)
    nf = data.nonfinite_step.tolist() if data.nonfinite_step is not None else [False] * len(total)
    excluded = {"non-finite": 0, "spike": 0, "huge": 0, "skipped": 0, "run-away": 0}
    healthy: list[float] = []
    healthy_steps: list[int] = []
    for x, step, bad in zip(total, data.steps, nf):
        if bad or not math.isfinite(x) or x <= 0:
            excluded["non-finite"] += 1
        elif step in spikes:
            excluded["spike"] += 1
        elif step in large:
            excluded["huge"] += 1
        elif step in skipped:
            excluded["skipped"] += 1
        elif healthy and x > th.spike_ratio * median(healthy):
            excluded["run-away"] += 1
        else:
            healthy.append(x)
            healthy_steps.append(step)
    if not healthy:
        return None
    thr = round_up(float(torch.quantile(torch.tensor(healthy, dtype=_F64), q / 100.0)))
    finite = [x for x in total if math.isfinite(x)]
    would = sum(1 for x in finite if x > thr)
    return {
        "threshold": thr,
        "percentile": q,
        "healthy_steps": healthy_steps,
        "healthy_median": median(healthy),
        "steps": len(total),
        "would_clip": would,
        "clip_fraction": would / len(total),
        "nonfinite_steps": excluded["non-finite"],
        "excluded": excluded,
        "max_total_norm": max(finite) if finite else math.nan,
    }


def round_up(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits (a healthy step at the percentile
    stays unclipped)."""
    if not (math.isfinite(x) and x > 0):
        return x
    unit = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / unit - 1e-9) * unit:.{digits}g}")


def median(xs: list[float]) -> float:
    return float(torch.tensor(xs, dtype=_F64).quantile(0.5))


def spike_tensors(data: HistoryData, diagnosis: Diagnosis, top: int = 3) -> list[list[Any]]:
    """The tensors whose norm jumped most (against their own median) at the spike steps."""
    rows = [data.steps.index(s.step) for s in diagnosis.spikes if s.step in data.steps]
    if not rows:
        return []
    norms = data.norms.to(_F64)
    calm = torch.ones(len(data.steps), dtype=torch.bool)
    calm[rows] = False
    jumps = []
    for i, name in enumerate(data.names):
        col = norms[calm, i]
        col = col[torch.isfinite(col) & (col > 0)]
        at = norms[rows, i]
        at = at[torch.isfinite(at)]
        if col.numel() and at.numel():
            jumps.append([name, float(at.max()) / float(col.median())])
    jumps.sort(key=lambda j: -j[1])
    return jumps[:top]


def fit_growth(steps: list[int], values: list[float]) -> tuple[float, float]:
    """``(decades over the span, r2)`` of a line fitted to log10 values against steps."""
    x = torch.tensor(steps, dtype=_F64)
    y = torch.tensor(values, dtype=_F64).log10()
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    if sxx == 0:
        return 0.0, 0.0
    slope = float(((x - xm) * (y - ym)).sum()) / sxx
    ss_tot = float(((y - ym) ** 2).sum())
    fit = ym + slope * (x - xm)
    r2 = 1.0 - float(((y - fit) ** 2).sum()) / ss_tot if ss_tot > 0 else 0.0
    return slope * float(x[-1] - x[0]), r2


def rise_before_nonfinite(data: HistoryData, diagnosis: Diagnosis) -> float | None:
    """The last finite total norm before the first NaN/Inf step over the median before it."""
    nf = diagnosis.nonfinite
    if nf is None or nf.step not in data.steps:
        return None
    r0 = data.steps.index(nf.step)
    before = [x for x in data.total_norm[:r0].to(_F64).tolist() if math.isfinite(x) and x > 0]
    if len(before) < 2:
        return None
    return before[-1] / median(before)
