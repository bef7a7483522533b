"""From diagnosis to prescription: the likely cause of each finding and the remedy to try.

:func:`prescribe` reads what :func:`gradstab.diagnose` found, the recorded history and, when it
is known, the model, and returns ranked :class:`~gradstab.diagnosis.Prescription` records. Each
one names a cause, the remedy, the gradstab call that applies it and the evidence it rests on.
Nothing is prescribed from a fixed list: a remedy appears only when its evidence is there.

Evidence from the **history** (always available):

- **clip threshold**: the ``clip_percentile``-th percentile (95 by default) of the total norms
  of the *healthy* steps: finite, not a spike, not a huge norm, not skipped, and not above
  ``spike_ratio`` times the median of the healthy steps before it (the rule that keeps a
  run-away explosion out). The fraction of recorded steps it would have clipped is stated;
- **where spikes happen**: the spike steps and the tensors whose norm jumped most at them;
- **steady growth** of the total norm (a log-linear fit over the steps) -> LR decay;
- **parameter norms** (when recorded) growing -> weight decay; the first recorded row gives the
  weights' scale near the start of the window.

Evidence from the **model** (``GradHistory(model)``, ``diagnose(..., model=model)``, the
callback's LightningModule, ``GradStabOptimizer(module=...)``):

- the **activations** that follow the layers of the affected stretch (the structure rules of
  :func:`gradstab._modules.follows`, as :func:`gradstab.init.init_model_` reads them), and
  which of them saturate (Sigmoid, Tanh, Hardsigmoid, Hardtanh, Softsign);
- whether the model has **normalisation** layers, and whether the layers sit in plain
  ``nn.Sequential`` containers (no skip connection can exist between them);
- the weights' **init scale**: RMS against the He/Xavier std for their fans and the activation
  that follows (:func:`gradstab._modules.scheme_and_gain`), compounded over the stack;
- **recurrent** modules: the singular values of each gate block of ``weight_hh``.

Without the model those checks are listed in :attr:`Diagnosis.evidence_missing` and in each
prescription's ``missing``. The evidence is read by :mod:`gradstab.diagnosis.evidence`; this
module decides what it means. docs/diagnosis.md explains each kind and its limits.

Example:
    >>> import torch, gradstab
    >>> h = gradstab.GradHistory(torch.nn.Linear(2, 1))
    >>> gradstab.diagnose(h).prescriptions
    []
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from gradstab.diagnosis.data import HistoryData
from gradstab.diagnosis.evidence import (
    LayerInfo,
    ModelEvidence,
    clip_threshold,
    fit_growth,
    init_scale,
    read_model,
    recurrent_spectra,
    rise_before_nonfinite,
    saturation_bound,
    spike_tensors,
)
from gradstab.diagnosis.findings import Diagnosis, Prescription, Thresholds

__all__ = ["clip_threshold", "prescribe"]

_F64 = torch.float64

#: The compounded init scale (product of the per-layer ratios) that counts as off: 1 decade.
_INIT_DECADES = 1.0
#: Singular values of an orthogonal gate block: within this band around 1.
_ORTHO_BAND = (0.9, 1.1)
#: Steady growth: at least this many decades over the window, with at least this r2.
_GROWTH_DECADES, _GROWTH_R2 = 1.0, 0.5
#: The percentile of the adaptive threshold prescribed when too few healthy steps fix one.
ADAPTIVE_PERCENTILE = 10.0
#: Weight decay: the weights' total norm grew by at least this factor over the healthy steps;
#: at least this factor per step is too fast for a regulariser: a lower learning rate instead.
_WEIGHT_GROWTH, _FAST_WEIGHT_GROWTH = 2.0, 1.01


# =========================================================================== prescriptions


def _short(names: list[str], n: int = 4, quote: bool = False) -> str:
    shown = [repr(x) if quote else x for x in names]
    if len(shown) <= n:
        return ", ".join(shown)
    return ", ".join(shown[:n]) + f", ... (+{len(shown) - n})"


def _g(x: float) -> str:
    return f"{x:.3g}"


def _clip_prescription(
    data: HistoryData, d: Diagnosis, th: Thresholds, rise: float | None
) -> tuple[Prescription | None, dict[str, Any] | None]:
    parts = []
    if d.spikes:
        worst = max(d.spikes, key=lambda s: s.ratio)
        parts.append(
            f"{len(d.spikes)} total-norm spike(s) at step(s) "
            f"{_short([str(s.step) for s in d.spikes])}, the largest x{_g(worst.ratio)} the "
            "running median"
        )
    if d.large_steps:
        parts.append(f"the total norm reached >= {th.large_norm:g} at {len(d.large_steps)} step(s)")
    if rise is not None and rise >= th.spike_ratio:
        parts.append(f"it rose x{_g(rise)} its median just before the first NaN/Inf")
    if d.exploding_layers:
        parts.append(f"{len(d.exploding_layers)} tensor(s) far above the rest")
    dt = d.depth_trend
    if dt is not None and dt.direction == "exploding":
        parts.append(f"norms grow x{_g(dt.growth_toward_input)} per layer toward the input")
    if not parts:
        return None, None
    info = clip_threshold(data, d)
    nf = 0 if info is None else info["nonfinite_steps"]
    skip = nf > 0 or d.nonfinite is not None
    if info is None:
        return (
            Prescription(
                0,
                "exploding",
                "clip",
                "; ".join(parts),
                "no step of the window had a finite, healthy total norm to compute a clip "
                "threshold from; clip at the norm of a healthy run and skip non-finite steps",
                'gradstab.GradStabCallback(max_norm=<a healthy norm>, nonfinite="skip")',
                {"threshold": None},
                ["a healthy step in the window"],
            ),
            None,
        )
    thr = info["threshold"]
    n_h = len(info["healthy_steps"])
    seen = (
        f"the {info['percentile']:g}th percentile of the {n_h} healthy step(s)' total norms "
        f"(median {_g(info['healthy_median'])}); on this history it would have clipped "
        f"{info['would_clip']} of {info['steps']} steps ({100 * info['clip_fraction']:.0f}%)"
    )
    adaptive = n_h < th.spike_min_history
    if not adaptive:
        bound = f"{thr:g}"
        remedy = f"clip the total gradient norm at {thr:g}, {seen}"
        if nf:
            remedy += f" and skipped the {nf} non-finite one(s)"
    else:
        # Too few healthy steps to fix a threshold: the percentile is only an upper bound, one
        # that lets a diverging run crawl on at that norm. Adapt it to the run's own norms,
        # capped at the upper bound, and skip what still goes non-finite.
        bound = (
            f"gradstab.PercentileThreshold({ADAPTIVE_PERCENTILE:g}, include_current=False, "
            f"max_norm={thr:g})"
        )
        remedy = (
            f"only {n_h} healthy step(s) before the blow-up, too few to fix a threshold: clip "
            f"the total gradient norm at an adaptive threshold, the {ADAPTIVE_PERCENTILE:g}th "
            f"percentile of the norms seen so far, capped at {thr:g} ({seen} at {thr:g}), "
            "and skip non-finite steps"
        )
        skip = True
    remedy += "; in a plain loop: gradstab.GradStabOptimizer(optimizer, max_norm=...)"
    call = f"gradstab.GradStabCallback(max_norm={bound}" + (', nonfinite="skip")' if skip else ")")
    ev = dict(info)
    ev["adaptive"] = adaptive
    ev["spike_steps"] = [s.step for s in d.spikes]
    ev["spike_tensors"] = spike_tensors(data, d)
    if ev["spike_tensors"]:
        parts.append(
            "at the spikes the largest jumps were in "
            + ", ".join(f"{n} (x{_g(r)})" for n, r in ev["spike_tensors"])
        )
    return Prescription(0, "exploding", "clip", "; ".join(parts), remedy, call, ev), info


def _growth_prescription(data: HistoryData, d: Diagnosis, th: Thresholds) -> Prescription | None:
    spikes = {s.step for s in d.spikes}
    nf = data.nonfinite_step.tolist() if data.nonfinite_step is not None else []
    pts = [
        (s, x)
        for r, (s, x) in enumerate(zip(data.steps, data.total_norm.to(_F64).tolist()))
        if math.isfinite(x) and x > 0 and s not in spikes and not (nf and nf[r])
    ]
    if len(pts) < th.spike_min_history:
        return None
    decades, r2 = fit_growth([p[0] for p in pts], [p[1] for p in pts])
    if decades < _GROWTH_DECADES or r2 < _GROWTH_R2:
        return None
    a, b = pts[0][0], pts[-1][0]
    return Prescription(
        0,
        "exploding",
        "lr-decay",
        f"the total norm grew steadily: x{_g(10**decades)} over steps {a}..{b} (log-linear "
        f"fit, r2={r2:.2f}), not in isolated spikes",
        "decay the learning rate as training goes on (and clip meanwhile)",
        "torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=<total steps>)"
        "  # an LR schedule is torch's, not gradstab's",
        {
            "growth": 10**decades,
            "decades": decades,
            "r2": r2,
            "first_step": a,
            "last_step": b,
            "points": len(pts),
        },
    )


def _weight_growth(
    data: HistoryData, d: Diagnosis, info: dict[str, Any] | None
) -> Prescription | None:
    """The weights' total norm over the healthy steps (a blow-up itself is no trend)."""
    if data.param_norms is None or info is None:
        return None
    if data.shapes is not None:
        cols = [i for i, s in enumerate(data.shapes) if len(s) >= 2]
    else:
        cols = [i for i, n in enumerate(data.names) if not n.endswith("bias")]
    if not cols:
        return None
    pn = data.param_norms[:, cols].to(_F64)
    healthy = set(info["healthy_steps"])
    ok = [
        r
        for r in torch.isfinite(pn).all(dim=1).nonzero().flatten().tolist()
        if data.steps[r] in healthy
    ]
    if len(ok) < 2:
        return None
    first, last = float(pn[ok[0]].norm()), float(pn[ok[-1]].norm())
    if not first > 0 or last / first < _WEIGHT_GROWTH:
        return None
    s0, s1 = data.steps[ok[0]], data.steps[ok[-1]]
    growth = last / first
    per_step = growth ** (1.0 / max(s1 - s0, 1))
    ev = {"first_step": s0, "last_step": s1, "first_norm": first, "last_norm": last,
          "growth": growth, "growth_per_step": per_step, "tensors": len(cols)}  # fmt: skip
    cause = (
        f"the weights' total norm grew x{_g(growth)} over the healthy steps {s0}..{s1} "
        f"({_g(first)} -> {_g(last)}, x{per_step:.4g} per step): larger weights amplify the "
        "gradient"
    )
    if per_step >= _FAST_WEIGHT_GROWTH:
        return Prescription(
            0,
            "exploding",
            "lower-lr",
            cause + "; that fast, the steps are too large",
            "lower the learning rate (e.g. by 10x) or warm it up",
            "torch.optim.SGD(model.parameters(), lr=<lr / 10>)  # the optimizer's, not gradstab's",
            ev,
        )
    return Prescription(
        0,
        "exploding",
        "weight-decay",
        cause,
        "regularise the weights (L2 / decoupled weight decay)",
        "torch.optim.AdamW(model.parameters(), lr=..., weight_decay=0.01)  # torch's",
        ev,
    )


def _init_prescription(info: dict[str, Any], finding: str) -> Prescription | None:
    dec = info["compounded_decades"]
    if finding == "vanishing" and dec > -_INIT_DECADES:
        return None
    if finding == "exploding" and dec < _INIT_DECADES:
        return None
    word = "small" if dec < 0 else "large"
    return Prescription(
        0,
        finding,
        "init",
        f"weights too {word} for their fan-in and activation: RMS "
        f"x{_g(info['geometric_mean_ratio'])} the He/Xavier std on average over "
        f"{len(info['layers'])} layer(s) ({', '.join(info['weights_from'])}), which compounds "
        f"to x{_g(info['compounded'])} through the stack",
        "re-initialise every layer for the activation that follows it (He for ReLU-like, "
        "Xavier for saturating); or LSUV from a batch",
        "gradstab.init.init_model_(model)  # or gradstab.init.lsuv_(model, batch)",
        info,
    )


def _layers_of(mi: ModelEvidence, d: Diagnosis, finding: str) -> list[LayerInfo]:
    dt = d.depth_trend
    if dt is not None and dt.direction == finding:
        names = set(dt.layers)
        return [lay for lay in mi.layers if names.intersection(lay.params)]
    flagged = set(d.vanishing if finding == "vanishing" else d.exploding_layers)
    idx = [i for i, lay in enumerate(mi.layers) if flagged.intersection(lay.params)]
    return mi.layers[idx[0] :] if idx else list(mi.layers)


def _vanishing(mi: ModelEvidence, d: Diagnosis, data: HistoryData) -> list[Prescription]:
    out: list[Prescription] = []
    region = _layers_of(mi, d, "vanishing")
    dt = d.depth_trend
    shrink = (
        f"; the gradient shrinks x{_g(dt.growth_toward_input)} per layer toward the input"
        if dt is not None and dt.direction == "vanishing"
        else ""
    )
    sat = [(lay, saturation_bound(lay.act)) for lay in region]
    sat = [(lay, b) for lay, b in sat if b is not None]
    if sat:
        kinds = sorted({type(lay.act).__name__ for lay, _ in sat})
        acts = [str(lay.act_name) for lay, _ in sat]
        bounds = {type(lay.act).__name__: b for lay, b in sat}
        bound_text = ", ".join(f"{k}' <= {bounds[k]:.3g}" for k in kinds)
        out.append(
            Prescription(
                0,
                "vanishing",
                "activation",
                f"saturating activations: {len(sat)} {'/'.join(kinds)} module(s) follow the "
                f"layers whose gradient vanishes ({_short(acts, quote=True)}); {bound_text}, "
                "near 0 once saturated, and the backward pass multiplies by it at every "
                f"layer{shrink}",
                f"replace those {len(sat)} {'/'.join(kinds)} module(s) by nn.ReLU (or "
                "nn.LeakyReLU, nn.GELU) and re-initialise for it",
                "gradstab.init.init_model_(model)  # after replacing those modules by nn.ReLU()",
                {
                    "activations": acts,
                    "types": kinds,
                    "max_derivative": bounds,
                    "layers": [lay.name for lay, _ in sat],
                },
            )
        )
    if not mi.norms:
        linear = all(isinstance(lay.module, nn.Linear) for lay in region)
        kind = "layer" if linear else "batch"
        out.append(
            Prescription(
                0,
                "vanishing",
                "normalization",
                f"no normalisation layer among the model's {len(mi.modules)} modules: nothing "
                f"rescales the signal between the {len(region)} layer(s)",
                f"insert a {'LayerNorm' if linear else 'BatchNorm'} after each hidden layer "
                "(add_normalization_ reaches nn.Sequential children only)",
                f'gradstab.norm.add_normalization_(model, kind="{kind}")',
                {
                    "normalization_layers": 0,
                    "modules": len(mi.modules),
                    "layers": [lay.name for lay in region],
                },
            )
        )
    info = init_scale(mi, region, data)
    if info is not None:
        p = _init_prescription(info, "vanishing")
        if p is not None:
            out.append(p)
    spectra = recurrent_spectra(mi)
    rec = _recurrent_prescription(spectra, "vanishing", clip=None)
    if rec is not None:
        out.insert(0, rec)
    if len(region) >= 6 and mi.plain_chain(region):
        out.append(
            Prescription(
                0,
                "vanishing",
                "residual",
                f"a plain stack of {len(region)} layers in nn.Sequential containers: no skip "
                "connection carries the gradient past them",
                "wrap blocks of layers in residual connections (x + f(x)); then zero-initialise "
                "each branch's last layer",
                "gradstab.init.init_model_(model, zero_init_residual=[<branch names>])",
                {"layers": [lay.name for lay in region], "plain_sequential": True},
            )
        )
    if not out:
        out.append(
            Prescription(
                0,
                "vanishing",
                "init",
                "no saturating activation, init scale off by a decade or missing normalisation "
                f"was found among {len(region)} layer(s); the scale the layers need depends on "
                "the data",
                "re-initialise from a batch so that each layer's output has unit variance",
                "gradstab.init.lsuv_(model, batch)",
                {"layers": [lay.name for lay in region], "init_scale": info},
            )
        )
    return out


def _recurrent_prescription(
    spectra: list[dict[str, Any]], finding: str, clip: dict[str, Any] | None
) -> Prescription | None:
    lo, hi = _ORTHO_BAND
    off = [
        s
        for s in spectra
        if not s["finite"] or s["max_singular_value"] > hi or s["min_singular_value"] < lo
    ]
    if not off:
        return None
    finite = [s for s in off if s["finite"]]
    rng = ""
    if finite:
        rng = (
            ": singular values of the current weights' gate blocks "
            f"{_g(min(s['min_singular_value'] for s in finite))}.."
            f"{_g(max(s['max_singular_value'] for s in finite))} (orthogonal: all 1)"
        )
    cause = (
        f"recurrent weights not orthogonal ({_short([s['weight'] for s in off], quote=True)})"
        f"{rng}; the "
        "backward pass multiplies by them once per time step, so values above 1 blow the "
        "gradient up and values below 1 make it vanish over long sequences"
    )
    remedy = "initialise every recurrent gate block orthogonally"
    if clip is not None:
        remedy += f", and clip the total norm (at {clip['threshold']:g}, see the clip remedy)"
    return Prescription(
        0,
        finding,
        "recurrent-init",
        cause,
        remedy,
        "gradstab.init.init_model_(model)",
        {
            "recurrent_weights": spectra,
            "orthogonal_band": list(_ORTHO_BAND),
            "weights_from": "current weights",
        },
    )


def _dead(mi: ModelEvidence | None, d: Diagnosis) -> list[Prescription]:
    out = []
    unused = [p for p in d.dead if p.kind != "units"]
    if unused:
        names = [p.name for p in unused]
        out.append(
            Prescription(
                0,
                "dead",
                "unused-parameters",
                f"{len(names)} parameter(s) got no gradient or an all-zero one at every step "
                f"({_short(names)}): not on the loss's path, detached, or multiplied by zero",
                "check the forward pass; if they are meant to be frozen, "
                "p.requires_grad_(False) and leave them out of the optimizer",
                "",
                {"parameters": {p.name: p.kind for p in unused}},
            )
        )
    units = [p for p in d.dead if p.kind == "units"]
    if units:
        acts: dict[str, str] = {}
        if mi is not None:
            by_name = {lay.name: lay for lay in mi.layers}
            for p in units:
                lay = by_name.get(p.name)
                if lay is not None and lay.act is not None:
                    acts[p.name] = type(lay.act).__name__
        relu = [n for n, a in acts.items() if a == "ReLU"]
        cause = "output units whose gradient stayed exactly zero: " + ", ".join(
            f"{p.name} {len(p.units)}/{p.total_units}" for p in units
        )
        if relu:
            cause += f"; {_short(relu)} feed(s) a ReLU: dying ReLUs (negative for every input)"
        out.append(
            Prescription(
                0,
                "dead",
                "dead-units",
                cause,
                "use nn.LeakyReLU(0.01) after those layers and re-initialise, or lower the "
                "learning rate that pushed them negative",
                "gradstab.init.init_model_(model)  # after replacing their nn.ReLU by "
                "nn.LeakyReLU(0.01)",
                {
                    "modules": {p.name: [len(p.units), p.total_units] for p in units},
                    "activations": acts,
                },
                [] if mi is not None else ["the model (which activation follows the layers)"],
            )
        )
    return out


_NO_MODEL = (
    "the model's modules (activations, normalisation layers, init scale, recurrent weights): "
    "pass model= to gradstab.diagnose or build GradHistory(model)"
)


def prescribe(
    diagnosis: Diagnosis, data: HistoryData, model: nn.Module | None = None
) -> tuple[list[Prescription], list[str]]:
    """Causes and remedies for the findings of ``diagnosis``, most likely first.

    Called by :func:`gradstab.diagnose`, which stores the result in
    :attr:`Diagnosis.prescriptions` and :attr:`Diagnosis.evidence_missing`.

    Args:
        diagnosis: what the detector found in ``data``.
        data: the history (the same window).
        model: the model whose ``named_parameters()`` names the history's tensors, or
            ``None`` (the model-based checks are then listed as missing).

    Returns:
        ``(prescriptions, evidence_missing)``; both empty for a healthy diagnosis.

    Example:
        >>> import torch, gradstab
        >>> from gradstab.diagnosis.prescriptions import prescribe
        >>> h = gradstab.GradHistory(torch.nn.Linear(2, 1))
        >>> prescribe(gradstab.diagnose(h), h.data())
        ([], [])
    """
    d = diagnosis
    if d.healthy or d.steps == 0:
        return [], []
    th = d.thresholds
    mi = read_model(model, data.names, data.shapes) if model is not None else None
    missing: list[str] = []
    if mi is None:
        missing.append(
            _NO_MODEL
            if model is None
            else "the model: its parameters do not match the history's names and shapes"
        )
    out: list[Prescription] = []

    rise = rise_before_nonfinite(data, d)
    exploding = d.exploding or (rise is not None and rise >= th.spike_ratio)
    if exploding:
        clip, info = _clip_prescription(data, d, th, rise)  # info: the threshold's numbers
        if clip is not None:
            out.append(clip)
        if mi is not None:
            rec = _recurrent_prescription(recurrent_spectra(mi), "exploding", info)
            if rec is not None:
                out.append(rec)
            scale = init_scale(mi, _layers_of(mi, d, "exploding"), data)
            p = _init_prescription(scale, "exploding") if scale is not None else None
            if p is not None:
                out.append(p)
        for extra in (_growth_prescription(data, d, th), _weight_growth(data, d, info)):
            if extra is not None:
                out.append(extra)
    elif d.nonfinite is not None:
        nf = d.nonfinite
        where = f" in {nf.origin!r}" if nf.origin else ""
        rise_text = f" (the last finite total norm was x{_g(rise)} its median)" if rise else ""
        out.append(
            Prescription(
                0,
                "non-finite",
                "skip-nonfinite",
                f"NaN/Inf from step {nf.step}{where} without a rise of the gradient norm before "
                f"it{rise_text}: a numerical fault in the forward pass or the loss (log, sqrt "
                "or division near 0, float16 overflow) is more likely than an explosion",
                f"keep those steps off the weights and inspect{where or ' the origin'}'s inputs",
                'gradstab.GradStabCallback(nonfinite="skip")',
                {
                    "first_step": nf.step,
                    "origin": nf.origin,
                    "steps": len(nf.steps),
                    "rise_before": rise,
                },
            )
        )
    if d.vanishing_gradients:
        if mi is not None:
            out += _vanishing(mi, d, data)
        else:
            dt = d.depth_trend
            trend = (
                f"norms shrink x{_g(dt.growth_toward_input)} per layer toward the input; "
                if dt is not None and dt.direction == "vanishing"
                else ""
            )
            out.append(
                Prescription(
                    0,
                    "vanishing",
                    "need-model",
                    f"{trend}which of saturating activations, too small an init or missing "
                    "normalisation causes it cannot be told from gradient norms alone",
                    "diagnose with the model to name the modules; the usual remedies: "
                    "ReLU-family activations re-initialised with gradstab.init.init_model_, "
                    "and gradstab.norm.add_normalization_",
                    "gradstab.diagnose(history, model=model)",
                    {"vanishing": list(d.vanishing)},
                    [_NO_MODEL],
                )
            )
    if d.dead:
        out += _dead(mi, d)
    for i, p in enumerate(out, 1):
        p.rank = i
    return out, missing
