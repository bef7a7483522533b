"""What the detector reports: :class:`Diagnosis` and its parts, with text and dict views.

Example:
    >>> import torch, gradstab
    >>> d = gradstab.diagnose(gradstab.GradHistory(torch.nn.Linear(2, 1)))
    >>> type(d).__name__, d.healthy, d.to_dict()["steps"]
    ('Diagnosis', True, 0)
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DeadParam",
    "DepthTrend",
    "Diagnosis",
    "LayerReport",
    "NonfiniteReport",
    "Prescription",
    "Spike",
    "Thresholds",
]

# =========================================================================== the report


@dataclass(frozen=True)
class Thresholds:
    """The detector's thresholds (the defaults of :func:`diagnose`; see there)."""

    metric: str = "auto"
    vanish_decades: float = 2.0
    explode_decades: float = 2.0
    sustain_steps: int = 5
    depth_decades: float = 2.0
    min_depth_layers: int = 4
    spike_z: float = 6.0
    spike_ratio: float = 5.0
    spike_history: int = 50
    spike_min_history: int = 8
    large_norm: float | None = 1e6
    min_group: int = 3
    clip_percentile: float = 95.0


@dataclass
class LayerReport:
    """One parameter tensor's statistics over the window and what was found.

    Attributes:
        index: position in network order.
        name: parameter name.
        median_norm: median gradient norm over the steps it had a finite gradient.
        median_metric: median of the compared magnitude (see :attr:`Diagnosis.metric`).
        decades_vs_median: median over steps of ``log10(metric / median of the group)``:
            ``-3`` means a thousand times smaller than the typical tensor.
        grad_weight_ratio: median ``||g|| / ||w||`` (``None`` without parameter norms).
        max_abs: largest ``|g|`` seen (``None`` if not recorded).
        zero_fraction: median fraction of exact zeros (``None`` if not recorded).
        nonfinite_steps: steps at which this gradient held a NaN/Inf.
        vanishing_steps: longest run of consecutive steps at least ``vanish_decades`` below
            the median.
        exploding_steps: the same, ``explode_decades`` above.
        status: tags: ``"nonfinite-origin"``, ``"nonfinite"``, ``"dead"``, ``"no-grad"``,
            ``"dead-units"``, ``"vanishing"``, ``"exploding"``; empty when healthy.
    """

    index: int
    name: str
    median_norm: float
    median_metric: float
    decades_vs_median: float
    grad_weight_ratio: float | None
    max_abs: float | None
    zero_fraction: float | None
    nonfinite_steps: int
    vanishing_steps: int
    exploding_steps: int
    status: list[str] = field(default_factory=list)


@dataclass
class Spike:
    """A step whose total gradient norm jumped above its running statistics.

    Attributes:
        step: the step.
        total_norm: its total norm.
        running_median: median total norm of the preceding ``spike_history`` steps.
        robust_z: ``(log10 total - median log10) / (1.4826 * MAD)`` over those steps (the MAD
            floored at 0.01 decades).
        ratio: ``total_norm / running_median``.
    """

    step: int
    total_norm: float
    running_median: float
    robust_z: float
    ratio: float


@dataclass
class DepthTrend:
    """Least-squares fit of log10 gradient magnitude against depth (weight tensors only).

    Attributes:
        layers: the tensors fitted, network order (input first).
        slope_decades_per_layer: fitted change of log10 magnitude per layer, input to output.
        growth_toward_input: ``10 ** -slope``: the factor by which the magnitude grows per
            layer going toward the input (``> 1``: growing, ``< 1``: shrinking).
        decades_toward_input: the fitted change from the last to the first layer, in decades
            (positive: larger at the input).
        r2: coefficient of determination of the fit.
        direction: ``"exploding"`` (growing toward the input by at least ``depth_decades``),
            ``"vanishing"`` (shrinking by at least that much) or ``"flat"``.
        kind: the tensors fitted: ``"weight"`` (dimension >= 2; without shapes, every name
            not ending in ``bias``) or ``"bias"``.
    """

    layers: list[str]
    slope_decades_per_layer: float
    growth_toward_input: float
    decades_toward_input: float
    r2: float
    direction: str
    kind: str = "weight"


@dataclass
class DeadParam:
    """A parameter, or some of its output units, that received no gradient over the window.

    Attributes:
        name: the parameter (for units: the module prefix, e.g. ``"3"`` for ``3.weight`` and
            ``3.bias``).
        kind: ``"no-grad"`` (the gradient was ``None`` at every step: unused or detached),
            ``"zero"`` (present but exactly zero at every step) or ``"units"`` (these output
            units' gradients were exactly zero at every step).
        units: the dead unit indices (``kind == "units"``), else ``[]``.
        total_units: the number of units of the tensor(s) (``kind == "units"``), else 0.
        params: the parameters concerned (for units: all tensors of the module that share
            the output dimension).
    """

    name: str
    kind: str
    units: list[int] = field(default_factory=list)
    total_units: int = 0
    params: list[str] = field(default_factory=list)


@dataclass
class NonfiniteReport:
    """Where NaN/Inf gradients first appeared.

    Attributes:
        step: the first step (for a training log: the first logged step at or after it).
        exact: ``False`` when only a counter revealed the step (the NaN happened between two
            logged steps) and the parameter is unknown.
        origin: the affected parameter first in backward order (the last affected one in
            network order): where the NaN/Inf entered the backward pass; ``None`` if unknown.
        first_in_network_order: the affected parameter closest to the input.
        affected: every affected parameter at that step, network order.
        steps: all steps in the window with a NaN/Inf gradient.
    """

    step: int
    exact: bool
    origin: str | None
    first_in_network_order: str | None
    affected: list[str]
    steps: list[int]


@dataclass
class Prescription:
    """A likely cause of a finding and the remedy to try, with the evidence it rests on.

    A prescription is a hypothesis: the evidence (the model's modules, the recorded norms)
    points at a cause, and the remedy is what the catalogue of fixes says to try for it.
    docs/diagnosis.md says how each kind is derived and where it can be wrong.

    Attributes:
        rank: 1 = try first; the order of :attr:`Diagnosis.prescriptions`.
        finding: the finding it answers: ``"exploding"``, ``"non-finite"``, ``"vanishing"``
            or ``"dead"``.
        kind: the remedy: ``"clip"`` (clip the total norm at a threshold computed from the
            history), ``"lr-decay"``, ``"lower-lr"``, ``"weight-decay"``,
            ``"skip-nonfinite"``, ``"init"`` (re-initialise for the activations),
            ``"activation"`` (replace saturating activations), ``"normalization"``,
            ``"residual"``, ``"recurrent-init"`` (orthogonal recurrent weights),
            ``"dead-units"``, ``"unused-parameters"`` or ``"need-model"`` (the cause cannot be
            told without the model).
        cause: the likely cause, in words, with the deciding numbers.
        remedy: what to do, in words.
        call: the code that applies it (a gradstab call where gradstab has one; ``""`` where
            there is nothing to call).
        evidence: the facts it rests on (module and parameter names, measured numbers);
            JSON-ready, keys per kind (see docs/diagnosis.md).
        missing: evidence it would have used and did not have (e.g. the model).

    Example:
        >>> p = Prescription(1, "exploding", "clip", "spikes", "clip", "call()", {"a": 1})
        >>> p.kind, p.missing
        ('clip', [])
    """

    rank: int
    finding: str
    kind: str
    cause: str
    remedy: str
    call: str
    evidence: dict[str, Any] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)


@dataclass
class Diagnosis:
    """What :func:`diagnose` found.  ``str(d)`` is a readable report; fields are for code.

    Attributes:
        steps: the number of steps analysed.
        first_step, last_step: the window's step range (``None`` when empty).
        metric: the magnitude compared across tensors: ``"rms"`` (norm divided by the square
            root of the number of non-zero elements, so tensors of different sizes and
            sparse gradients compare fairly), ``"ratio"`` (``||g|| / ||w||``) or ``"norm"``.
        layers: one :class:`LayerReport` per tensor, network order.
        vanishing: names of the vanishing tensors, network order.
        exploding_layers: names of tensors far above the median, network order.
        dead: dead parameters and units.
        spikes: total-norm spikes.
        large_steps: steps whose total norm reached ``large_norm``.
        depth_trend: the weights' depth fit, or the biases' where that one finds a trend and
            the weights' does not; ``None`` with too few tensors.
        depth_trends: every depth fit made (one per group: weights, biases).
        nonfinite: where NaN/Inf first appeared, or ``None``.
        skipped_steps: steps whose optimizer step was skipped.
        thresholds: the thresholds used.
        source: where the data came from.
        prescriptions: for each problem found, its likely causes and the remedies to try,
            most likely first (:class:`Prescription`); empty when healthy.
        evidence_missing: what the prescriptions could not check for want of evidence (e.g.
            no model: activations, normalisation and init scale unknown).
    """

    steps: int
    first_step: int | None
    last_step: int | None
    metric: str
    layers: list[LayerReport]
    vanishing: list[str]
    exploding_layers: list[str]
    dead: list[DeadParam]
    spikes: list[Spike]
    large_steps: list[int]
    depth_trend: DepthTrend | None
    nonfinite: NonfiniteReport | None
    skipped_steps: list[int]
    thresholds: Thresholds
    source: str = ""
    depth_trends: list[DepthTrend] = field(default_factory=list)
    prescriptions: list[Prescription] = field(default_factory=list)
    evidence_missing: list[str] = field(default_factory=list)

    @property
    def exploding(self) -> bool:
        """Spikes, huge total norms, layers far above the rest, or norms rising toward the input."""
        return bool(
            self.spikes
            or self.large_steps
            or self.exploding_layers
            or (self.depth_trend is not None and self.depth_trend.direction == "exploding")
        )

    @property
    def vanishing_gradients(self) -> bool:
        """Vanishing layers, or norms shrinking toward the input."""
        return bool(
            self.vanishing
            or (self.depth_trend is not None and self.depth_trend.direction == "vanishing")
        )

    @property
    def healthy(self) -> bool:
        """Nothing was found."""
        return not (self.exploding or self.vanishing_gradients or self.dead or self.nonfinite)

    def findings(self) -> list[str]:
        """One sentence per problem found (empty when healthy)."""
        out: list[str] = []
        th = self.thresholds
        nf = self.nonfinite
        if nf is not None:
            where = (
                f"in {nf.origin!r} (first in backward order)"
                if nf.origin
                else "(parameter unknown)"
            )
            when = f"at step {nf.step}" if nf.exact else f"by step {nf.step} (between logged steps)"
            extra = f"; {len(nf.affected)} parameter(s) affected" if nf.affected else ""
            more = f"; {len(nf.steps)} step(s) with NaN/Inf in the window" if nf.steps else ""
            out.append(f"non-finite gradients first {when} {where}{extra}{more}")
        if self.dead:
            parts = []
            for d in self.dead:
                if d.kind == "units":
                    parts.append(f"{d.name}: {len(d.units)}/{d.total_units} units")
                else:
                    parts.append(
                        f"{d.name} ({'no gradient' if d.kind == 'no-grad' else 'all zero'})"
                    )
            out.append("dead: " + ", ".join(parts))
        if self.vanishing:
            out.append(
                f"vanishing: {len(self.vanishing)} tensor(s) >= {th.vanish_decades:g} decades "
                f"below the median {self.metric}: " + _short_list(self.vanishing)
            )
        if self.exploding_layers:
            out.append(
                f"exploding layers: {len(self.exploding_layers)} tensor(s) >= "
                f"{th.explode_decades:g} decades above the median {self.metric}: "
                + _short_list(self.exploding_layers)
            )
        dt = self.depth_trend
        if dt is not None and dt.direction != "flat":
            verb = "grow" if dt.direction == "exploding" else "shrink"
            out.append(
                f"{dt.direction} gradients by depth: norms {verb} toward the input "
                f"x{dt.growth_toward_input:.3g} per layer ({abs(dt.decades_toward_input):.1f} "
                f"decades over {len(dt.layers)} {dt.kind} tensors, r2={dt.r2:.2f})"
            )
        if self.spikes:
            worst = max(self.spikes, key=lambda s: s.ratio)
            out.append(
                f"exploding steps: {len(self.spikes)} total-norm spike(s), worst at step "
                f"{worst.step}: {worst.total_norm:.3g} = x{worst.ratio:.3g} the running median "
                f"(robust z {worst.robust_z:.1f})"
            )
        if self.large_steps:
            out.append(
                f"huge total norm (>= {th.large_norm:g}) at {len(self.large_steps)} step(s), "
                f"first at step {self.large_steps[0]}"
            )
        return out

    def prescription_lines(self) -> list[str]:
        """The prescriptions as text lines (empty when there are none), as ``str(d)`` shows.

        Example:
            >>> import torch, gradstab
            >>> gradstab.diagnose(gradstab.GradHistory(torch.nn.Linear(2, 1))).prescription_lines()
            []
        """
        if not self.prescriptions:
            return []
        out = [
            "prescriptions (hypotheses to try, most likely first; evidence in "
            "to_dict()['prescriptions']):"
        ]
        for p in self.prescriptions:
            out.append(f"{p.rank}. [{p.finding}] cause: {p.cause}")
            out.append(f"   remedy: {p.remedy}")
            if p.call:
                out.append(f"   apply:  {p.call}")
            if p.missing:
                out.append(f"   not checked: {'; '.join(p.missing)}")
        for m in self.evidence_missing:
            out.append(f"   (no evidence: {m})")
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (plus the verdicts).

        Example:
            >>> import gradstab, torch
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> d = gradstab.diagnose(h).to_dict()
            >>> d["healthy"], d["steps"]
            (True, 0)
        """
        d = dataclasses.asdict(self)
        d["exploding"] = self.exploding
        d["vanishing_gradients"] = self.vanishing_gradients
        d["healthy"] = self.healthy
        d["findings"] = self.findings()
        return _json_safe(d)

    def table(self, top: int = 10, use_rich: bool | None = None, width: int = 120) -> str:
        """The worst ``top`` layers as a terminal table (``rich`` when installed).

        Args:
            top: rows shown (worst first: non-finite, dead, vanishing/exploding, then by
                distance from the median).
            use_rich: force (True) or avoid (False) ``rich``; default: use it if importable.
            width: the width of a rich rendering.

        Returns:
            The table as a string.
        """
        rows = sorted(self.layers, key=_severity)[: max(top, 0)]
        has_ratio = any(r.grad_weight_ratio is not None for r in self.layers)
        has_max = any(r.max_abs is not None for r in self.layers)
        has_zero = any(r.zero_fraction is not None for r in self.layers)
        show_metric = self.metric != "norm"
        header = ["#", "parameter", "grad norm"] + ([self.metric] if show_metric else [])
        header.append("vs median")
        if has_ratio:
            header.append("|g|/|w|")
        if has_max:
            header.append("max |g|")
        if has_zero:
            header.append("zeros")
        header += ["NaN steps", "status"]
        body = []
        for r in rows:
            cells = [str(r.index), r.name, _fmt(r.median_norm)]
            if show_metric:
                cells.append(_fmt(r.median_metric))
            dev = r.decades_vs_median
            cells.append("-" if math.isnan(dev) else f"{dev:+.1f} dec")
            if has_ratio:
                cells.append(_fmt(r.grad_weight_ratio))
            if has_max:
                cells.append(_fmt(r.max_abs))
            if has_zero:
                cells.append(
                    "-"
                    if r.zero_fraction is None or math.isnan(r.zero_fraction)
                    else f"{100 * r.zero_fraction:.0f}%"
                )
            cells += [str(r.nonfinite_steps), ",".join(r.status) or "ok"]
            body.append(cells)
        if use_rich is None:
            try:
                import rich  # noqa: F401, PLC0415 - optional
            except ImportError:
                use_rich = False
            else:
                use_rich = True
        if use_rich:
            from rich.console import Console  # noqa: PLC0415 - optional
            from rich.table import Table  # noqa: PLC0415 - optional

            tbl = Table(show_edge=False, pad_edge=False)
            for i, h in enumerate(header):
                tbl.add_column(h, justify="left" if i in (1, len(header) - 1) else "right")
            for cells in body:
                tbl.add_row(*cells)
            buf = io.StringIO()
            Console(file=buf, width=width, force_terminal=False, color_system=None).print(tbl)
            return buf.getvalue().rstrip("\n")
        return _plain_table(header, body)

    def __str__(self) -> str:
        lines = []
        src = f" ({self.source})" if self.source else ""
        if self.steps == 0:
            return f"gradstab diagnosis{src}: no steps recorded"
        lines.append(
            f"gradstab diagnosis{src}: {self.steps} steps ({self.first_step}..{self.last_step}),"
            f" {len(self.layers)} parameter tensors, compared by {self.metric}"
        )
        found = self.findings()
        if not found:
            lines.append("healthy: no vanishing, exploding, dead or non-finite gradients found")
        else:
            lines += [f"- {f}" for f in found]
        if self.skipped_steps:
            lines.append(
                f"skipped optimizer steps: {len(self.skipped_steps)} "
                f"({_short_list([str(s) for s in self.skipped_steps])})"
            )
        lines += self.prescription_lines()
        lines.append("")
        lines.append(self.table())
        hidden = len(self.layers) - min(len(self.layers), 10)
        if hidden > 0:
            lines.append(f"({hidden} more tensor(s) not shown)")
        return "\n".join(lines)


def _short_list(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    if len(items) <= n:
        return ", ".join(items)
    return ", ".join(items[:n]) + f", ... (+{len(items) - n})"


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def _severity(r: LayerReport) -> tuple:
    order = (
        "nonfinite-origin",
        "nonfinite",
        "no-grad",
        "dead",
        "dead-units",
        "vanishing",
        "exploding",
    )
    rank = min((order.index(s) for s in r.status if s in order), default=len(order))
    dev = 0.0 if math.isnan(r.decades_vs_median) else -abs(r.decades_vs_median)
    return (rank, dev, r.index)


def _plain_table(header: list[str], body: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(row[i]) for row in body)) if body else len(h)
        for i, h in enumerate(header)
    ]
    left = {1, len(header) - 1}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x
