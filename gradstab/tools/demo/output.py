"""The demo's tables, conclusions and pictures.

Example:
    >>> from gradstab.tools.demo.output import comparison_table
    >>> callable(comparison_table)
    True
"""

import importlib.util
import math
import os
from dataclasses import replace

from gradstab.diagnosis import Prescription, plots
from gradstab.tools.demo.models import CLASSES
from gradstab.tools.demo.runs import END_WINDOW, DemoResults, RunResult

# =========================================================================== output


def _g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    return f"{x:.{digits}g}"


def _acc(r: RunResult) -> str:
    return "n/a (NaN outputs)" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"


def _steps_text(r: RunResult) -> str:
    text = f"{r.steps_run} of {r.steps_planned}"
    if r.first_nonfinite_loss is not None:
        text += f"; loss NaN/Inf from step {r.first_nonfinite_loss}"
        if r.stopped_early:
            text += " (stopped after a run of NaN/Inf losses)"
    return text


def _clip_text(r: RunResult) -> str:
    if r.clipped_steps is None:
        return "- (no clipping)"
    return f"{r.clipped_steps} / {r.skipped_steps} of {r.steps_run}"


def _threshold_text(r: RunResult) -> str:
    """The clip threshold a run used, in words (``"-"`` for the runs that do not clip)."""
    if r.threshold_min is None or r.threshold_max is None:
        return "-"
    if r.threshold_cap is None:
        if r.threshold_min == r.threshold_max:
            return f"{_g(r.threshold_min)} (fixed)"
        return f"{_g(r.threshold_min)}..{_g(r.threshold_max)}"
    n = r.below_cap_steps or 0
    if not n:
        return f"{_g(r.threshold_cap)} (the cap) at every step: never adapted below it"
    return (
        f"{_g(r.threshold_min)}..{_g(r.threshold_max)}; below the cap of "
        f"{_g(r.threshold_cap)} at {n} of {r.steps_run} steps (from step {r.first_below_cap})"
    )


def _threshold_cell(r: RunResult) -> str:
    if r.threshold_min is None or r.threshold_max is None:
        return "-"
    if r.threshold_min == r.threshold_max:
        return _g(r.threshold_min)
    text = f"{_g(r.threshold_min)}..{_g(r.threshold_max)}"
    if r.threshold_cap is not None:
        text += f" ({r.below_cap_steps} < cap)"
    return text


#: Short names of the prescription kinds, for the comparison table.
_KIND_SHORT = {
    "activation": "ReLU for {types}",
    "normalization": "{norm}",
    "init": "init_model_",
    "residual": "residual",
    "clip": "clip at {threshold}",
    "recurrent-init": "orthogonal init",
    "lr-decay": "LR decay",
    "lower-lr": "lower LR",
    "weight-decay": "weight decay",
    "skip-nonfinite": "skip NaN steps",
    "need-model": "(needs the model)",
    "dead-units": "LeakyReLU",
    "unused-parameters": "check unused",
}


def prescription_short(p: Prescription) -> str:
    """A prescription in two or three words (for the comparison table).

    Example:
        >>> from gradstab.diagnosis import Prescription
        >>> prescription_short(Prescription(1, "exploding", "clip", "", "", "",
        ...                                 {"threshold": 339.0, "nonfinite_steps": 20}))
        'clip at 339 + skip'
        >>> prescription_short(Prescription(1, "exploding", "clip", "", "", "",
        ...                                 {"threshold": 339.0, "adaptive": True}))
        'clip adaptive <= 339 + skip'
    """
    ev = p.evidence
    thr = ev.get("threshold")
    text = _KIND_SHORT.get(p.kind, p.kind).format(
        types="/".join(ev.get("types", [])),
        norm="BatchNorm" if '"batch"' in p.call else "LayerNorm",
        threshold="-" if thr is None else f"{thr:g}",
    )
    if p.kind == "clip" and ev.get("adaptive"):
        text = text.replace(" at ", " adaptive <= ")  # a PercentileThreshold capped there
    if p.kind == "clip" and (ev.get("nonfinite_steps") or ev.get("adaptive")):
        text += " + skip"
    return text


def prescription_cell(r: RunResult, results: DemoResults, top: int = 3) -> str:
    """What the comparison table says a run was prescribed, or which prescriptions it applies.

    A run that applies another run's remedies (:attr:`RunInfo.applies`) names their ranks in
    that run's diagnosis, as that diagnosis ranked them.

    Example:
        >>> print(prescription_cell(results.runs["b"], results))  # doctest: +SKIP
        applies (a)'s 1, 2, 3
    """
    if r.info.applies is not None:
        key, kinds = r.info.applies
        src = results.runs.get(key)
        if src is None:
            return f"({key}) not run"
        ranks = {p.kind: p.rank for p in src.diagnosis.prescriptions}
        found = sorted(ranks[k] for k in kinds if k in ranks)
        text = f"applies ({key})'s " + ", ".join(str(n) for n in found) if found else ""
        lost = [k for k in kinds if k not in ranks]
        if lost:
            text += ("; " if text else "") + f"{', '.join(lost)}: not prescribed to ({key})"
        return text
    rx = r.diagnosis.prescriptions
    if not rx:
        return "-"
    text = ", ".join(f"{p.rank} {prescription_short(p)}" for p in rx[:top])
    return text + (f" (+{len(rx) - top})" if len(rx) > top else "")


def run_table(r: RunResult) -> str:
    """The table printed after a run.

    Example:
        >>> print(run_table(result))  # doctest: +SKIP
    """
    rows = [
        ("model", r.model_text),
        ("steps", _steps_text(r)),
        ("final train loss", f"{_g(r.final_loss, 4)} (mean of the last 10% of steps)"),
        ("val accuracy", f"{_acc(r)} (chance {100 / CLASSES:.0f}%)"),
        ("initial total grad norm", _g(r.initial_total_norm)),
        (
            "layer grad norm min",
            f"{_g(r.min_layer_norm)} ({r.min_layer})  median over steps, weight matrices",
        ),
        ("layer grad norm max", f"{_g(r.max_layer_norm)} ({r.max_layer})"),
        ("spread", f"{_g(r.spread_decades, 2)} decades"),
        ("clipped / skipped steps", _clip_text(r)),
        ("clip threshold", _threshold_text(r)),
        ("diagnosis", r.verdict.upper() if r.verdict != "healthy" else "healthy"),
    ]
    if r.steps_run > END_WINDOW:
        end = r.verdict_end.upper() if r.verdict_end != "healthy" else "healthy"
        rows.append((f"  last {END_WINDOW} steps only", end))
    if r.clip is not None:
        rows.insert(1, ("gradstab", r.clip))
    width = max(len(k) for k, _ in rows)
    lines = [f"({r.info.key}) {r.info.title}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"    - {f}" for f in r.diagnosis.findings()]
    for p in r.diagnosis.prescriptions:
        lines.append(f"    => {p.rank}. [{p.kind}] {p.remedy}")
        if p.call:
            lines.append(f"       {p.call}")
    if not r.as_expected:
        lines.append(
            f"  note: this run was designed to be {r.info.expected!r} but the diagnosis says "
            f"{r.verdict!r} (last {END_WINDOW} steps: {r.verdict_end!r}) with these settings"
        )
    return "\n".join(lines)


def comparison_table(results: DemoResults) -> str:
    """The final comparison, one row per run.

    Example:
        >>> print(comparison_table(results))  # doctest: +SKIP
    """
    header = [
        "run",
        "final loss",
        "val acc",
        "layer grad norm min..max",
        "spread",
        "clipped",
        "skipped",
        "threshold",
        "steps",
        "diagnosis",
        "prescription",
    ]
    body = []
    for r in results.runs.values():
        body.append(
            [
                f"({r.info.key}) {r.info.name}",
                _g(r.final_loss, 4),
                "n/a" if r.accuracy is None else f"{100 * r.accuracy:.1f}%",
                f"{_g(r.min_layer_norm)}..{_g(r.max_layer_norm)}",
                f"{_g(r.spread_decades, 2)} dec",
                "-" if r.clipped_steps is None else str(r.clipped_steps),
                "-" if r.skipped_steps is None else str(r.skipped_steps),
                _threshold_cell(r),
                f"{r.steps_run}/{r.steps_planned}",
                r.verdict
                if r.steps_run <= END_WINDOW or r.verdict_end == r.verdict
                else f"{r.verdict}; last {END_WINDOW} steps: {r.verdict_end}",
                prescription_cell(r, results),
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    return "\n".join(out)


def conclusions(results: DemoResults) -> list[str]:
    """Sentences comparing (a) with (b), (c) with (d) and (d) with (e), from the numbers.

    Also one naming the runs that did not get the verdict they were designed for.

    Example:
        >>> for sentence in conclusions(results):  # doctest: +SKIP
        ...     print(sentence)
    """
    runs = results.runs
    out = []
    a, b, c, d, e = (runs.get(k) for k in "abcde")
    if a is not None and b is not None:
        out.append(
            f"(a) -> (b): ReLU + init_model_ + LayerNorm{_applied(b, results)}: accuracy "
            f"{_acc(a)} -> {_acc(b)}, layer gradient norms spread over "
            f"{_g(a.spread_decades, 2)} -> {_g(b.spread_decades, 2)} decades; diagnosis "
            f"{a.verdict} -> {b.verdict}."
        )
    if c is not None and d is not None:
        c_end = (
            f"loss NaN/Inf from step {c.first_nonfinite_loss}"
            if c.first_nonfinite_loss is not None
            else f"final loss {_g(c.final_loss, 4)}"
        )
        out.append(
            f"(c) -> (d): same initial weights, clipping{_applied(d, results)}: {c_end} -> "
            "final loss "
            f"{_g(d.final_loss, 4)} and accuracy {_acc(d)}; {d.clipped_steps} of "
            f"{d.steps_run} steps clipped, {d.skipped_steps} skipped; diagnosis {c.verdict} "
            f"-> {d.verdict}."
        )
    if c is not None and e is not None and d is None:
        out.append(
            f"(c) -> (e): same initial weights, adaptive clipping: final loss "
            f"{_g(e.final_loss, 4)} and accuracy {_acc(e)}; diagnosis {c.verdict} -> "
            f"{e.verdict}."
        )
    if e is not None:
        out.append(_adaptive_sentence(e, d))
    bad = [r for r in runs.values() if not r.as_expected]
    if bad:
        out.append(
            "Not as designed with these settings: "
            + "; ".join(
                f"({r.info.key}) {r.verdict}, last {END_WINDOW} steps {r.verdict_end} "
                f"(expected {r.info.expected})"
                for r in bad
            )
            + "."
        )
    return out


def _applied(r: RunResult, results: DemoResults) -> str:
    """`` (prescriptions 1, 2, 3 of (a))``: which of the source run's prescriptions ``r``
    applies, with the prescribed clip threshold next to the one ``r`` used."""
    if r.info.applies is None or r.info.applies[0] not in results.runs:
        return ""
    key, kinds = r.info.applies
    rx = {p.kind: p for p in results.runs[key].diagnosis.prescriptions}
    ranks = sorted(rx[k].rank for k in kinds if k in rx)
    if not ranks:
        return f" (not what ({key})'s diagnosis prescribed)"
    text = f" (({key})'s prescription{'s' if len(ranks) > 1 else ''} " + ", ".join(
        str(n) for n in ranks
    )
    clip = rx.get("clip")
    if "clip" in kinds and clip is not None and clip.evidence.get("threshold") is not None:
        ev = clip.evidence
        n = len(ev.get("healthy_steps", []))
        text += (
            f"; prescribed threshold {ev['threshold']:g} from {n} healthy step(s), used "
            f"{_threshold_cell(r)}"
        )
    return text + ")"


def _adaptive_sentence(e: RunResult, d: RunResult | None) -> str:
    """What run (e)'s adaptive threshold did, and whether it changed anything against (d)."""
    cap = _g(e.threshold_cap)
    vs = ""
    if d is not None:
        vs = (
            f"; against the fixed threshold of (d): accuracy {_acc(d)} -> {_acc(e)}, "
            f"{d.clipped_steps} -> {e.clipped_steps} steps clipped"
        )
    if not e.below_cap_steps:
        return (
            f"(e): the percentile threshold never went below its cap of {cap} in "
            f"{e.steps_run} steps, so the cap did all the clipping and (e) is (d) again: the "
            f"adaptive rule added nothing here{vs}."
        )
    return (
        f"(e): the cap of {cap} did the clipping while the norms were large; the percentile "
        f"threshold went below it from step {e.first_below_cap} on ({e.below_cap_steps} of "
        f"{e.steps_run} steps, down to {_g(e.threshold_min)}){vs}."
    )


def _matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plot_run(r: RunResult, out_dir: str) -> list[str]:
    stem = os.path.join(out_dir, f"{r.info.key}_{r.info.name}")
    title = f"({r.info.key}) {r.info.title}"
    hist = r.history
    if r.clipped_steps is None:
        # A monitor-only callback records its unchanged norm as the post-clip norm: no
        # "after clipping" curve for a run that does not clip.
        hist = replace(hist, post_clip_norm=None)
    return [
        plots.plot_layer_heatmap(
            r.history, f"{stem}_heatmap.png", title=f"{title}: per-layer gradient norm"
        ),
        plots.plot_total_norm(
            hist,
            f"{stem}_total_norm.png",
            diagnosis=r.diagnosis,
            title=f"{title}: total gradient norm",
        ),
    ]
