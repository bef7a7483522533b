"""Clipping, monitoring and non-finite handling shared by the callback and the optimizer wrapper.

:class:`gradstab.GradStabCallback` and :class:`gradstab.GradStabOptimizer` are thin adapters
around this module: both validate their options with :func:`make_config`, describe the
optimizer's parameters with :func:`build_plan` (cached while the param groups do not change)
and call :func:`clip_step` once per optimizer step, so both behave identically.

How a step runs (:func:`clip_step`):

1. The optimizer's parameters form *units*: all of them when the threshold is one number, one
   unit per param group when it is a ``{group_index: threshold}`` dict (groups missing from
   the dict are monitored, not clipped).  With ``group_by="module"`` a unit is further cut
   into *parts*, one per owning module; otherwise a unit is one part.
2. Each part's gradients (``None`` skipped) are grouped by device and go through one
   ``torch.ops.gradstab`` op per device, which clips them in place and returns their pre-clip
   statistics from the same read: ``clip_norm`` (mode ``"norm"``, and each module part of
   ``"layer"`` with ``group_by="module"``: a module's coefficient
   ``min(1, max_norm / (||module|| + eps))`` is a global clip of its tensors),
   ``clip_norm_per_layer`` (``"layer"``), ``clip_value`` or ``grad_stats`` (mode ``None``).
   A healthy step reads every gradient once and writes only the gradients that are clipped.
   A norm-clipped part whose gradients live on several devices needs the combined norm before
   any coefficient is known; it takes the two-phase path (statistics per device,
   :func:`_combine`, coefficients, scaling).
3. A few tiny device ops update the counters (steps clipped, steps with non-finite gradients)
   in a small int64 device tensor.  Nothing is read on the host unless the non-finite policy
   needs it (``"skip"``, ``"raise"``: one read per step; ``"zero"`` reads its flag only where
   that is free, all gradients on the CPU).
4. On a logging step the metrics (pre/post-clip totals, coefficient, counters and, on request,
   per-tensor norms and max-abs) are assembled on the device and read in one transfer.

Where distributed training plugs in: every part's statistics pass through :func:`_combine`,
the one place where pieces of the gradients meet (today the devices of one process).  For
sharded gradients (FSDP2 ``DTensor``, ZeRO) a cross-process all-reduce of the per-tensor p-power
sums and non-finite counts (``SUM``) and max-abs (``MAX``) goes there, before the total is
taken; :func:`_needs_two_phase` must then answer True for norm-clipped parts, so that their
coefficients come from the reduced norms, and the read-only check of ``nonfinite="raise"``
(:func:`_find_nonfinite`) must use reduced counts so that all ranks agree.  Replicated (DDP)
gradients need nothing.

Where other clipping rules plug in: a unit's threshold is turned into a device tensor by
:func:`_bound_tensor` (an adaptive rule would supply its own 0-d tensor per step, computed on
the device from its history, and update that history from the part's pre-clip total); the op
of each mode is chosen in :func:`_run_part`, and the metrics of each mode in
:meth:`_Part.post_norm`.

Example:
    >>> import torch
    >>> from gradstab import _clipping
    >>> cfg = _clipping.make_config("demo", mode="norm", max_norm=1.0)
    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
    >>> plan = _clipping.build_plan(cfg, [{"params": [w]}], {id(w): "w"}, None, "demo")
    >>> state = _clipping.ClipState()
    >>> skip, metrics = _clipping.clip_step(cfg, state, plan, log=True)
    >>> w.grad, metrics["grad_2.0_norm_total"]
    (tensor([0.6000, 0.8000]), 5.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor

from gradstab import functional, reference
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS
from gradstab.functional import EPS, _check_flag, _check_norm_type

__all__ = [
    "EPS",
    "ClipConfig",
    "ClipState",
    "Plan",
    "build_plan",
    "check_log_every",
    "clip_step",
    "make_config",
    "metric_names",
    "plan_key",
]

MODES = ("norm", "layer", "value")
GROUP_BY = ("param", "module")
NONFINITE = ("ignore", "zero", "skip", "raise")
COUNTERS = ("steps", "clipped_steps", "nonfinite_steps", "skipped_steps")

Threshold = Union[float, Mapping[int, float]]

# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class ClipConfig:
    """Validated clipping options (see :func:`make_config`)."""

    mode: str | None
    max_norm: float | dict[int, float] | None
    clip_value: float | dict[int, float] | None
    norm_type: float
    group_by: str
    nonfinite: str
    log_per_layer: bool
    log_prefix: str

    @property
    def threshold_name(self) -> str | None:
        """``"max_norm"``, ``"clip_value"`` or ``None`` (monitoring only)."""
        return {"norm": "max_norm", "layer": "max_norm", "value": "clip_value"}.get(self.mode or "")

    @property
    def threshold(self) -> float | dict[int, float] | None:
        """The threshold of the mode: ``max_norm``, ``clip_value`` or ``None``."""
        name = self.threshold_name
        return None if name is None else getattr(self, name)


def _check_choice(owner: str, name: str, value: object, choices: Sequence[object]) -> None:
    if (value is None or isinstance(value, str)) and value in choices:
        return
    shown = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{owner}: {name} must be one of {shown}; got {value!r}")


def _check_positive(owner: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{owner}: {name} must be a positive finite number or a dict "
            f"{{param_group_index: number}}; got {value!r} of type {type(value).__name__}"
        )
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{owner}: {name} must be a positive finite number; got {value!r}")
    return v


def _check_threshold(owner: str, name: str, value: object) -> float | dict[int, float]:
    if not isinstance(value, Mapping):
        return _check_positive(owner, name, value)
    if not value:
        raise ValueError(f"{owner}: {name} as a dict must name at least one param group; got {{}}")
    out: dict[int, float] = {}
    for k, v in value.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise TypeError(
                f"{owner}: the keys of {name} must be param group indices (int >= 0); "
                f"got key {k!r} in {name}={dict(value)!r}"
            )
        out[k] = _check_positive(owner, f"{name}[{k}]", v)
    return out


def check_log_every(owner: str, value: object, allow_none: bool = True) -> int | None:
    """A logging period: ``None`` (where allowed) or an int ``>= 0`` (0 never logs).

    Args:
        owner: the class name used in error messages.
        value: the ``log_every_n_steps`` argument.
        allow_none: whether ``None`` is accepted.

    Returns:
        ``value``, checked.

    Example:
        >>> check_log_every("demo", 50)
        50
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        allowed = "None or an int >= 0" if allow_none else "an int >= 0"
        raise TypeError(f"{owner}: log_every_n_steps must be {allowed}; got {value!r}")
    if value < 0:
        raise ValueError(f"{owner}: log_every_n_steps must be >= 0 (0 never logs); got {value!r}")
    return value


def make_config(
    owner: str,
    *,
    mode: str | None = "norm",
    max_norm: Threshold | None = None,
    clip_value: Threshold | None = None,
    norm_type: float | str = 2.0,
    group_by: str = "param",
    nonfinite: str = "ignore",
    log_per_layer: bool = False,
    log_prefix: str = "grad",
) -> ClipConfig:
    """Validate the clipping options; every error names the argument and the value.

    Args:
        owner: the class name used in error messages.
        mode: ``"norm"``, ``"layer"``, ``"value"`` or ``None`` (monitor only).
        max_norm: threshold of ``"norm"``/``"layer"``: a positive number or a dict
            ``{param_group_index: number}``.
        clip_value: threshold of ``"value"``, same forms.
        norm_type: p of the p-norm (positive, ``inf`` or ``"inf"``).
        group_by: ``"param"`` or ``"module"`` (``"module"`` only with ``mode="layer"``).
        nonfinite: ``"ignore"``, ``"zero"``, ``"skip"`` or ``"raise"``.
        log_per_layer: add per-tensor norms and max-abs to the metrics.
        log_prefix: prefix of gradstab's own metric names (non-empty, no trailing ``/``).

    Returns:
        The frozen :class:`ClipConfig`.

    Example:
        >>> make_config("demo", mode="layer", max_norm={0: 1.0}).threshold
        {0: 1.0}
    """
    _check_choice(owner, "mode", mode, (*MODES, None))
    if mode is None:
        for name, value in (("max_norm", max_norm), ("clip_value", clip_value)):
            if value is not None:
                raise ValueError(
                    f"{owner}: mode=None only monitors, so {name}={value!r} would be ignored; "
                    "set mode='norm', 'layer' or 'value' to clip"
                )
    else:
        needed, unused = (
            ("clip_value", "max_norm") if mode == "value" else ("max_norm", "clip_value")
        )
        given = {"max_norm": max_norm, "clip_value": clip_value}
        if given[needed] is None:
            raise ValueError(
                f"{owner}: mode={mode!r} needs {needed} (a positive number or a dict "
                "{param_group_index: number}); got None"
            )
        if given[unused] is not None:
            raise ValueError(
                f"{owner}: {unused}={given[unused]!r} is not used with mode={mode!r} "
                f"(which clips to {needed}); remove it"
            )
    mn = None if max_norm is None else _check_threshold(owner, "max_norm", max_norm)
    cv = None if clip_value is None else _check_threshold(owner, "clip_value", clip_value)
    p = _check_norm_type(norm_type, owner)
    _check_choice(owner, "group_by", group_by, GROUP_BY)
    if group_by == "module" and mode != "layer":
        raise ValueError(
            f"{owner}: group_by='module' groups the per-layer clip, so it needs mode='layer'; "
            f"got mode={mode!r}"
        )
    _check_choice(owner, "nonfinite", nonfinite, NONFINITE)
    _check_flag(log_per_layer, "log_per_layer", owner)
    if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
        raise ValueError(
            f"{owner}: log_prefix must be a non-empty string not ending in '/'; got {log_prefix!r}"
        )
    return ClipConfig(mode, mn, cv, p, group_by, nonfinite, log_per_layer, log_prefix)


def metric_names(cfg: ClipConfig) -> dict[str, str]:
    """The metric keys; the norms follow Lightning's ``grad_norm`` convention.

    Args:
        cfg: the options.

    Returns:
        ``{role: key}``; ``"layer"`` and ``"max_abs"`` are prefixes of per-parameter keys.

    Example:
        >>> metric_names(make_config("demo", max_norm=1.0))["total"]
        'grad_2.0_norm_total'
    """
    p, pre = cfg.norm_type, cfg.log_prefix
    return {
        "total": f"grad_{p}_norm_total",
        "post": f"{pre}/post_clip_norm_total",
        "coef": f"{pre}/clip_coef",
        "rate": f"{pre}/clip_rate",
        "nonfinite": f"{pre}/nonfinite_steps",
        "skipped": f"{pre}/skipped_steps",
        "layer": f"grad_{p}_norm/",
        "max_abs": f"{pre}/max_abs/",
    }


# ------------------------------------------------------------------------------ plan


@dataclass
class _Unit:
    bound: float | None  # None: monitored only
    params: list[Tensor]
    names: list[str]
    parts: list[list[int]]  # indices into params; one part per module with group_by="module"


@dataclass
class Plan:
    """The optimizer's parameters split into clipping units (cached between steps)."""

    key: tuple
    units: list[_Unit]
    params: list[Tensor]  # every parameter of the optimizer, in order


def plan_key(param_groups: Sequence[Mapping[str, Any]]) -> tuple:
    """A cheap key that changes when param groups are added, replaced or resized.

    Args:
        param_groups: the optimizer's ``param_groups``.

    Returns:
        A tuple to compare with :attr:`Plan.key`.

    Example:
        >>> len(plan_key([{"params": []}]))
        1
    """
    return tuple((id(g), id(g["params"]), len(g["params"])) for g in param_groups)


def build_plan(
    cfg: ClipConfig,
    param_groups: Sequence[Mapping[str, Any]],
    names: Mapping[int, str],
    module_of: Mapping[int, int] | None,
    owner: str,
) -> Plan:
    """Split the optimizer's parameters into clipping units.

    Args:
        cfg: the validated options.
        param_groups: the optimizer's ``param_groups``.
        names: ``id(param) -> name`` for messages and metric keys (missing ones are
            named ``param_groups.<g>.<i>``).
        module_of: ``id(param) -> id(owning module)`` for ``group_by="module"``;
            parameters missing from it are a group of their own.
        owner: the class name used in error messages.

    Returns:
        The :class:`Plan`.

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> cfg = make_config("demo", max_norm=1.0)
        >>> build_plan(cfg, [{"params": [w]}], {}, None, "demo").units[0].names
        ['param_groups.0.0']
    """
    bound = cfg.threshold
    if isinstance(bound, dict):
        bad = sorted(k for k in bound if k >= len(param_groups))
        if bad:
            raise ValueError(
                f"{owner}: {cfg.threshold_name}={bound!r} names param group(s) {bad}, but the "
                f"optimizer has {len(param_groups)} param group(s)"
            )
    groups = []
    for gi, group in enumerate(param_groups):
        ps = list(group["params"])
        groups.append((ps, [names.get(id(p), f"param_groups.{gi}.{i}") for i, p in enumerate(ps)]))

    def unit(b: float | None, ps: list[Tensor], ns: list[str]) -> _Unit:
        if cfg.group_by == "module" and b is not None:
            by_module: dict[int, list[int]] = {}
            for i, p in enumerate(ps):
                owner_id = module_of.get(id(p)) if module_of is not None else None
                by_module.setdefault(-1 - i if owner_id is None else owner_id, []).append(i)
            return _Unit(b, ps, ns, list(by_module.values()))
        return _Unit(b, ps, ns, [list(range(len(ps)))])

    if isinstance(bound, dict):
        units = [unit(bound.get(gi), ps, ns) for gi, (ps, ns) in enumerate(groups)]
    else:
        units = [unit(bound, [p for g in groups for p in g[0]], [n for g in groups for n in g[1]])]
    return Plan(plan_key(param_groups), units, [p for g in groups for p in g[0]])


# ------------------------------------------------------------------------------ state


@dataclass
class ClipState:
    """Counters of one optimizer: Python ints plus a small device tensor of pending counts.

    ``pending`` (int64 ``[3]``: steps clipped, steps with non-finite gradients, of those the
    steps a GradScaler skips) accumulates on the gradients' device between host reads;
    :meth:`flush` folds it into the Python counters with one read.
    """

    steps: int = 0
    clipped_steps: int = 0
    nonfinite_steps: int = 0
    skipped_steps: int = 0
    window_steps: int = 0
    window_clipped: int = 0
    pending: Tensor | None = field(default=None, repr=False)
    head: Tensor | None = field(default=None, repr=False)  # pending[:2], made once
    last_metrics: dict[str, float] = field(default_factory=dict, repr=False)

    def _fold(self, vals: Sequence[float]) -> None:
        clipped, nonfinite, skipped = (round(v) for v in vals)
        self.clipped_steps += clipped
        self.window_clipped += clipped
        self.nonfinite_steps += nonfinite
        self.skipped_steps += skipped
        if self.pending is not None:
            self.pending.zero_()

    def flush(self) -> None:
        """Fold the device counters into the Python ones (one host read)."""
        if self.pending is not None:
            self._fold(self.pending.tolist())

    def counters(self) -> dict[str, int]:
        """``steps``, ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps`` (flushes first)."""
        self.flush()
        return {k: getattr(self, k) for k in COUNTERS}

    def state_dict(self) -> dict[str, int]:
        """The counters and the running logging window, as Python ints."""
        self.flush()
        return {k: int(getattr(self, k)) for k in (*COUNTERS, "window_steps", "window_clipped")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys are 0."""
        for k in (*COUNTERS, "window_steps", "window_clipped"):
            setattr(self, k, int(state.get(k, 0)))
        self.pending = self.head = None

    def add(self, clipped: Tensor, nonfinite: Tensor, scaler_skips: bool) -> None:
        """Count one step on the device: 0-d bools, on the device of the statistics."""
        if self.pending is None or self.pending.device != clipped.device:
            self.flush()
            self.pending = torch.zeros(3, dtype=torch.int64, device=clipped.device)
            self.head = self.pending[:2]
        if scaler_skips:
            self.pending.add_(torch.stack((clipped, nonfinite, nonfinite)))
        else:
            self.head.add_(torch.stack((clipped, nonfinite)))  # type: ignore[union-attr]

    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        return {**self.__dict__, "pending": None, "head": None}


# ------------------------------------------------------------------------------ one step

_BOUND_CACHE: dict[tuple[float, torch.device], Tensor] = {}
_KERNEL_CHECKED: set[torch.device] = set()  # devices warn_if_fallback has seen


def _bound_tensor(value: float, device: torch.device) -> Tensor:
    """A cached 0-d float64 tensor holding ``value`` on ``device`` (made once, by a fill)."""
    key = (value, device)
    t = _BOUND_CACHE.get(key)
    if t is None:
        t = _BOUND_CACHE[key] = torch.full((), value, dtype=torch.float64, device=device)
    return t


def _pnorm(v: Tensor, p: float) -> Tensor:
    """Overflow-safe p-norm of a 1-D float64 vector of non-negative numbers (0 if empty)."""
    if v.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=v.device)
    m = v.amax()
    if math.isinf(p):
        return m
    s = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return s * (v / s).pow(p).sum().pow(1.0 / p)


_PerDevice = list[tuple[torch.device, list[Tensor], list[str]]]
_Stats = tuple[Tensor, Tensor, Tensor, Tensor]  # norms [T], max_abs [T], nonfinite [T], total []


def _grads_by_device(
    params: Sequence[Tensor], names: Sequence[str], idx: Sequence[int]
) -> _PerDevice:
    """The gradients of ``params[idx]`` (``None`` skipped) with their names, by device."""
    out: dict[torch.device, tuple[list[Tensor], list[str]]] = {}
    for i in idx:
        g = params[i].grad
        if g is None:
            continue
        lists = out.get(g.device)
        if lists is None:
            lists = out[g.device] = ([], [])
        lists[0].append(g)
        lists[1].append(names[i])
    return [(d, gs, ns) for d, (gs, ns) in out.items()]


def _needs_two_phase(kind: str, per_dev: _PerDevice) -> bool:
    """Whether a part's coefficients need statistics combined over pieces of its gradients.

    True for norm clipping over several devices.  Sharded gradients (FSDP2) will answer True
    here too, so that their coefficients come from the norms reduced in :func:`_combine`.
    """
    return kind in ("norm", "layer") and len(per_dev) > 1


def _combine(stats: Sequence[_Stats], p: float, device: torch.device) -> _Stats:
    """The statistics of all pieces of a part's gradients as one set, on ``device``.

    Every part's statistics pass through here.  One piece is returned as the op gave it.
    Several pieces (devices) are concatenated in their order, in float64, and the total is the
    p-norm of the per-tensor norms.

    The single place where pieces of the gradients meet: for sharded gradients a cross-process
    all-reduce goes here, before the early return (``SUM`` of ``norms ** p`` and of
    ``nonfinite``, ``MAX`` of ``max_abs``, then the total from the reduced norms).
    """
    if len(stats) == 1:
        return stats[0]
    f64 = torch.float64
    norms = torch.cat([s[0].to(device, f64) for s in stats])
    max_abs = torch.cat([s[1].to(device, f64) for s in stats])
    nonfinite = torch.cat([s[2].to(device) for s in stats])
    return norms, max_abs, nonfinite, _pnorm(norms, p)


@dataclass
class _Part:
    """What one part's op calls returned: pre-clip statistics, in the order of ``names``."""

    kind: str  # "stats", "norm", "layer" or "value"
    names: list[str]
    grads: list[list[Tensor]]  # per device, in the order of the statistics
    stats: _Stats  # on the part's first device
    bound: Tensor | None  # the effective bound there (times grad_scale), None for "stats"
    above: Tensor | None  # clipped where the statistic exceeds this (bound - eps for norms)
    scale: Tensor | None  # the gradients are still multiplied by this (fused optimizer + AMP)
    coefs: Tensor | None = None  # per-tensor coefficients, where the two-phase path made them

    def clipped(self) -> Tensor | None:
        """0-d bool: whether any coefficient is below 1 (``None`` for monitoring)."""
        norms, max_abs, _, total = self.stats
        if self.kind == "norm":
            return torch.gt(total, self.above)  # min(1, b / (total + eps)) < 1
        if self.kind == "layer":
            return torch.gt(norms, self.above).any()
        if self.kind == "value":
            return torch.gt(max_abs, self.above).any()
        return None

    def post_norm(self, p: float) -> Tensor:
        """The float64 total norm after the clip (a second read in ``"value"`` mode)."""
        f64 = torch.float64
        norms, total = self.stats[0].to(f64), self.stats[3].to(f64)
        if self.kind == "stats":
            return total
        if self.kind == "value":
            totals = [OPS["grad_stats"](gs, p)[3].to(total.device, f64) for gs in self.grads]
            return _pnorm(torch.stack(totals), p)
        coefs = self.coefs
        if coefs is None:
            denom = (total if self.kind == "norm" else norms) + EPS
            coefs = torch.clamp(self.bound / denom, max=1.0)
        return _pnorm(norms * coefs, p)


def _run_part(
    kind: str,
    p: float,
    bound: float | None,
    per_dev: _PerDevice,
    *,
    grad_scale: Tensor | None,
    error_if_nonfinite: bool,
) -> _Part:
    """Clip one part in place (or only measure it) and return its pre-clip statistics."""
    d0 = per_dev[0][0]
    names = [n for _, _, ns in per_dev for n in ns]
    grads = [gs for _, gs, _ in per_dev]
    b = above = None
    if bound is not None and kind != "stats":
        margin = 0.0 if kind == "value" else EPS
        if grad_scale is None:
            b, above = _bound_tensor(bound, d0), _bound_tensor(bound - margin, d0)
        else:
            b = _bound_tensor(bound, d0) * grad_scale.to(d0)
            above = b - margin
    for d, _, _ in per_dev:
        if d not in _KERNEL_CHECKED:
            warn_if_fallback(d)
            _KERNEL_CHECKED.add(d)
    if _needs_two_phase(kind, per_dev):
        stats = _combine([OPS["grad_stats"](gs, p) for gs in grads], p, d0)
        norms, _, _, total = stats
        coefs = torch.clamp(b / ((total if kind == "norm" else norms) + EPS), max=1.0)
        if kind == "norm":
            coefs = coefs.expand(norms.shape)
        k = 0
        for d, gs, _ in per_dev:
            for g, c in zip(gs, coefs[k : k + len(gs)].to(d).unbind(0)):
                reference._scale_(g, c)  # the kernels' rounding; skips c >= 1 on the CPU
            k += len(gs)
        return _Part(kind, names, grads, stats, b, above, grad_scale, coefs)
    results = []
    for d, gs, _ in per_dev:
        bd = None if b is None else b.to(d)
        if kind == "norm":
            results.append(OPS["clip_norm"](gs, bd, p, EPS, error_if_nonfinite))
        elif kind == "layer":
            results.append(OPS["clip_norm_per_layer"](gs, bd, p, EPS))
        elif kind == "value":
            results.append(OPS["clip_value"](gs, bd, p))
        else:
            results.append(OPS["grad_stats"](gs, p))
    stats = _combine(results, p, d0)
    return _Part(kind, names, grads, stats, b, above, grad_scale)


def _nonfinite_error(counts: Sequence[int], names: Sequence[str], step: int | None) -> RuntimeError:
    first = next(i for i, c in enumerate(counts) if c)
    affected = sum(1 for c in counts if c)
    at = f" at optimizer step {step}" if step is not None else ""
    return RuntimeError(
        f"gradstab: non-finite gradient{at}: parameter {names[first]!r} has {int(counts[first])} "
        f"NaN/Inf value(s) in its gradient ({affected} of {len(counts)} parameters with a "
        "gradient are affected). No gradient was changed and the optimizer step was not taken. "
        "Use nonfinite='skip' to skip such steps or 'zero' to zero their gradients"
    )


def _find_nonfinite(
    jobs: Sequence[tuple[str, float | None, _PerDevice]], p: float, step: int | None
) -> RuntimeError | None:
    """The error naming the first non-finite gradient of ``jobs``, if any (read-only)."""
    counts: list[int] = []
    names: list[str] = []
    for _, _, per_dev in jobs:
        for _, gs, ns in per_dev:
            counts += OPS["grad_stats"](gs, p)[2].tolist()  # host read: "raise" asked for it
            names += ns
    return _nonfinite_error(counts, names, step) if any(counts) else None


def _host_read_is_free(parts: Sequence[_Part]) -> bool:
    """Whether reading a flag on the host costs no device synchronization (all on the CPU)."""
    return all(gs[0].device.type == "cpu" for part in parts for gs in part.grads)


def clip_step(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    *,
    log: bool,
    grad_scale: Tensor | None = None,
    scaler_skips: bool = False,
    step: int | None = None,
) -> tuple[bool, dict[str, float] | None]:
    """Clip, count and apply the non-finite policy for one optimizer step.

    Args:
        cfg: the validated options.
        state: the optimizer's counters (updated in place).
        plan: from :func:`build_plan` for the optimizer's current param groups.
        log: build and return the metrics (one host read).
        grad_scale: the gradients are still multiplied by this 0-d device tensor (a fused
            optimizer under a GradScaler, which unscales inside ``step()``): the thresholds
            are multiplied by it and the statistics divided by it, so the clip is that of the
            unscaled gradients (up to ``eps``).  Not for ``"value"`` mode: clamping would turn
            an overflowed scaled gradient into a finite one the scaler cannot see.
        scaler_skips: a GradScaler skips this step if the gradients are non-finite: the
            non-finite policy is left to it, and such steps are counted as skipped.
        step: the step number for error messages.

    Returns:
        ``(skip, metrics)``: ``skip`` is True when the ``"skip"`` policy wants the optimizer
        step not to happen; ``metrics`` is ``None`` unless ``log``.

    Raises:
        RuntimeError: with ``nonfinite="raise"``, naming the first parameter whose gradient
            holds a NaN/Inf; no gradient has been changed then.
    """
    p = cfg.norm_type
    jobs: list[tuple[str, float | None, _PerDevice]] = []
    for unit in plan.units:
        kind = "stats" if cfg.mode is None or unit.bound is None else cfg.mode
        if kind == "layer" and cfg.group_by == "module":
            kind = "norm"  # each module part is a global clip over the module's tensors
        for idx in unit.parts:
            per_dev = _grads_by_device(unit.params, unit.names, idx)
            if per_dev:
                jobs.append((kind, unit.bound, per_dev))

    for _, _, per_dev in jobs:
        for _, gs, ns in per_dev:
            if functional._is_dtensor(gs[0]):
                raise TypeError(
                    f"gradstab: the gradient of {ns[0]!r} is a DTensor (sharded, e.g. FSDP2); "
                    "GradStabCallback and GradStabOptimizer do not combine sharded statistics "
                    "across ranks yet. Clip with gradstab.clip_grad_norm_(model.parameters(), "
                    "max_norm), which does, in on_before_optimizer_step (Lightning) or before "
                    "optimizer.step()"
                )

    check = cfg.nonfinite == "raise" and not scaler_skips
    # One norm-clipped job in one fused op: its kernel checks the total before writing anything
    # (error_if_nonfinite).  Otherwise a read-only check must come before any gradient changes.
    kernel_checks = (
        check
        and len(jobs) == 1
        and jobs[0][0] == "norm"
        and not _needs_two_phase("norm", jobs[0][2])
    )
    if check and not kernel_checks:
        err = _find_nonfinite(jobs, p, step)
        if err is not None:
            raise err
    parts: list[_Part] = []
    for kind, bound, per_dev in jobs:
        try:
            parts.append(
                _run_part(
                    kind, p, bound, per_dev, grad_scale=grad_scale, error_if_nonfinite=kernel_checks
                )
            )
        except RuntimeError as exc:
            err = _find_nonfinite(jobs, p, step) if kernel_checks else None
            if err is not None:  # the kernel refused before writing: name the parameter
                raise err from exc
            raise  # not about a NaN/Inf (or the norm overflowed): the kernel's own message

    state.steps += 1
    state.window_steps += 1
    if not parts:
        return False, (_metrics(cfg, state, [], zeroed=False) if log else None)

    dev0 = parts[0].stats[0].device
    if len(parts) == 1:
        flag = parts[0].stats[2].any()
    else:
        flag = torch.stack([part.stats[2].any().to(dev0) for part in parts]).any()
    clipped = None
    for part in parts:
        c = part.clipped()
        if c is not None:
            clipped = c if clipped is None else clipped | c.to(dev0)
    # clipped on a finite step; for bools a > b is "a and not b", in one op
    clipped = torch.zeros_like(flag) if clipped is None else torch.gt(clipped, flag)
    state.add(clipped, flag, scaler_skips)

    skip = False
    zeroed: bool | Tensor = False
    if cfg.nonfinite == "zero" and not scaler_skips:
        if _host_read_is_free(parts):
            zeroed = bool(flag)
            if zeroed:
                for part in parts:
                    for gs in part.grads:
                        torch._foreach_zero_(gs)
        else:  # no host read: a masked fill of every gradient
            for part in parts:
                for gs in part.grads:
                    f = flag.to(gs[0].device)
                    for g in gs:
                        g.masked_fill_(f, 0)
            zeroed = flag
    elif cfg.nonfinite == "skip" and not scaler_skips:
        skip = bool(flag)  # one host read per step: the optimizer step happens or not
        if skip:
            state.skipped_steps += 1
    if not log:
        return skip, None
    return skip, _metrics(cfg, state, parts, zeroed=skip or zeroed)


def _metrics(
    cfg: ClipConfig,
    state: ClipState,
    parts: list[_Part],
    *,
    zeroed: bool | Tensor,
) -> dict[str, float]:
    """Build the metrics on the device and read them with one host transfer."""
    keys = metric_names(cfg)
    p = cfg.norm_type
    f64 = torch.float64
    layer_names: list[str] = []
    if parts:
        dev0 = parts[0].stats[0].device
        pre_l, post_l, norms_l, max_abs_l = [], [], [], []
        for part in parts:
            norms, max_abs, _, total = (t.to(dev0, f64) for t in part.stats)
            post = part.post_norm(p).to(dev0)
            if part.scale is not None:
                s = part.scale.to(dev0, f64)
                norms, max_abs, total, post = norms / s, max_abs / s, total / s, post / s
            pre_l.append(total.reshape(1))
            post_l.append(post.reshape(1))
            norms_l.append(norms)
            max_abs_l.append(max_abs)
        if len(parts) == 1:
            pre, post = pre_l[0][0], post_l[0][0]
        else:
            pre, post = _pnorm(torch.cat(pre_l), p), _pnorm(torch.cat(post_l), p)
        if isinstance(zeroed, Tensor):
            post = torch.where(zeroed.to(dev0), torch.zeros_like(post), post)
        elif zeroed:
            post = torch.zeros_like(post)
        coef = torch.where(pre > 0, post / pre, torch.ones_like(pre))
        pieces = [torch.stack((pre, post, coef))]
        pieces.append(state.pending.to(dev0, f64))  # type: ignore[union-attr]
        if cfg.log_per_layer:
            pieces += norms_l + max_abs_l
            layer_names = [n for part in parts for n in part.names]
        vals = torch.cat(pieces).tolist()  # the one host read of a logging step
        state._fold(vals[3:6])
    else:  # no gradient at all this step
        state.flush()
        vals = [0.0, 0.0, 1.0, 0, 0, 0]
    rate = state.window_clipped / state.window_steps if state.window_steps else 0.0
    metrics = {
        keys["total"]: vals[0],
        keys["post"]: vals[1],
        keys["coef"]: vals[2],
        keys["rate"]: rate,
        keys["nonfinite"]: float(state.nonfinite_steps),
        keys["skipped"]: float(state.skipped_steps),
    }
    t = len(layer_names)
    for i, n in enumerate(layer_names):
        metrics[keys["layer"] + n] = vals[6 + i]
        metrics[keys["max_abs"] + n] = vals[6 + t + i]
    state.window_steps = 0
    state.window_clipped = 0
    state.last_metrics = metrics
    return metrics
