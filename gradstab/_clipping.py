"""Clipping, monitoring and non-finite handling shared by the callback and the optimizer wrapper.

:class:`gradstab.GradStabCallback` and :class:`gradstab.GradStabOptimizer` are thin adapters
around this module: both validate their options with :func:`make_config`, describe the
optimizer's parameters with :func:`build_plan`, and call :func:`clip_step` once per optimizer
step.  One implementation, so both behave identically.

How a step runs (:func:`clip_step`):

1. The parameters of the optimizer are split into *units*: all of them when the threshold is
   one number, one unit per parameter group when it is a ``{group_index: threshold}`` dict
   (groups absent from the dict are monitored, not clipped).  Within a unit the gradients are
   grouped by device, and with ``group_by="module"`` further by owning module.
2. One ``torch.ops.gradstab`` op per unit and device (per module with ``group_by="module"``)
   clips the gradients in place and returns their *pre-clip* statistics from the same read:
   ``clip_norm`` (mode ``"norm"``; also each module of ``"layer"``/``"module"``, whose
   coefficient ``min(1, max_norm / (||module|| + eps))`` is exactly a global clip over the
   module's tensors), ``clip_norm_per_layer`` (``"layer"``/``"param"``), ``clip_value`` or
   ``grad_stats`` (mode ``None``).  A healthy step thus reads every gradient once and writes
   only the gradients whose coefficient is below 1.
3. A handful of tiny device ops update running counters (steps clipped, steps with non-finite
   gradients) kept in a small int64 device tensor.  Nothing is read on the host, except where
   the non-finite policy needs it (``"skip"`` and ``"raise"``: one read per step; ``"zero"``
   reads the flag on the host only when all gradients live on the CPU, where that is free).
4. On a logging step the summary (pre/post-clip totals, coefficient, counters and, on request,
   per-tensor norms and max-abs) is assembled on the device and read in one transfer.

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

from gradstab._extension import warn_if_fallback
from gradstab._library import OPS

__all__ = [
    "EPS",
    "ClipConfig",
    "ClipState",
    "Plan",
    "build_plan",
    "check_bool",
    "check_log_every",
    "check_prefix",
    "clip_step",
    "make_config",
    "metric_names",
]

#: The epsilon added to the norm in every clip coefficient (PyTorch's ``clip_grad_norm_`` value).
EPS = 1e-6

MODES = ("norm", "layer", "value")
GROUP_BY = ("param", "module")
NONFINITE = ("ignore", "zero", "skip", "raise")

Threshold = Union[float, Mapping[int, float]]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class ClipConfig:
    """Validated clipping options (see :func:`make_config`)."""

    mode: str | None
    max_norm: Union[float, dict[int, float]] | None
    clip_value: Union[float, dict[int, float]] | None
    norm_type: float
    group_by: str
    nonfinite: str
    log_per_layer: bool = False
    log_prefix: str = "grad"

    @property
    def bound(self) -> Union[float, dict[int, float]] | None:
        """The threshold the mode uses: ``max_norm`` or ``clip_value`` (``None`` for monitoring)."""
        if self.mode in ("norm", "layer"):
            return self.max_norm
        if self.mode == "value":
            return self.clip_value
        return None


def _check_choice(owner: str, name: str, value: object, choices: Sequence[object]) -> None:
    if isinstance(value, str) or value is None:
        if value in choices:
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


def _check_threshold(owner: str, name: str, value: object) -> Union[float, dict[int, float]]:
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(
                f"{owner}: {name} as a dict must name at least one param group; got {{}}"
            )
        out: dict[int, float] = {}
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0:
                raise TypeError(
                    f"{owner}: the keys of {name} must be param group indices (int >= 0); "
                    f"got key {k!r} in {name}={dict(value)!r}"
                )
            out[k] = _check_positive(owner, f"{name}[{k}]", v)
        return out
    return _check_positive(owner, name, value)


def check_norm_type(owner: str, norm_type: object) -> float:
    """``norm_type`` as a float: a positive number, ``inf`` or the string ``"inf"``."""
    if isinstance(norm_type, bool) or not isinstance(norm_type, (numbers.Real, str)):
        raise TypeError(
            f"{owner}: norm_type must be a positive number or 'inf'; got {norm_type!r} "
            f"of type {type(norm_type).__name__}"
        )
    try:
        p = float(norm_type)
    except ValueError:
        raise ValueError(
            f"{owner}: norm_type must be a positive number or 'inf'; got {norm_type!r}"
        ) from None
    if math.isnan(p) or p <= 0:
        raise ValueError(
            f"{owner}: norm_type must be a positive number or 'inf'; got {norm_type!r}"
        )
    return p


def check_bool(owner: str, name: str, value: object) -> bool:
    """Raise ``TypeError`` unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be True or False; got {value!r}")
    return value


def check_log_every(owner: str, value: object, allow_none: bool = True) -> int | None:
    """A logging period: ``None`` (where allowed) or an int ``>= 0`` (0 never logs)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{owner}: log_every_n_steps must be {'None or ' if allow_none else ''}an int >= 0; "
            f"got {value!r}"
        )
    if value < 0:
        raise ValueError(f"{owner}: log_every_n_steps must be >= 0 (0 never logs); got {value!r}")
    return value


def check_prefix(owner: str, value: object) -> str:
    """A non-empty metric prefix without a trailing ``/``."""
    if not isinstance(value, str):
        raise TypeError(f"{owner}: log_prefix must be a string; got {value!r}")
    if not value or value.endswith("/"):
        raise ValueError(
            f"{owner}: log_prefix must be a non-empty string not ending in '/'; got {value!r}"
        )
    return value


def make_config(
    owner: str,
    *,
    mode: str | None = "norm",
    max_norm: Threshold | None = None,
    clip_value: Threshold | None = None,
    norm_type: Union[float, str] = 2.0,
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
        log_prefix: prefix of gradstab's own metric names.

    Returns:
        The frozen :class:`ClipConfig`.
    """
    _check_choice(owner, "mode", mode, (*MODES, None))
    if mode in ("norm", "layer"):
        if max_norm is None:
            raise ValueError(f"{owner}: mode={mode!r} needs max_norm (a positive number); got None")
        if clip_value is not None:
            raise ValueError(
                f"{owner}: clip_value={clip_value!r} is only used with mode='value', "
                f"but mode={mode!r}"
            )
    elif mode == "value":
        if clip_value is None:
            raise ValueError(
                f"{owner}: mode='value' needs clip_value (a positive number); got None"
            )
        if max_norm is not None:
            raise ValueError(
                f"{owner}: max_norm={max_norm!r} is only used with mode='norm' or 'layer', "
                "but mode='value'"
            )
    elif max_norm is not None or clip_value is not None:
        which = "max_norm" if max_norm is not None else "clip_value"
        raise ValueError(
            f"{owner}: mode=None only monitors, so {which}="
            f"{max_norm if max_norm is not None else clip_value!r} would be ignored; "
            "set mode='norm', 'layer' or 'value' to clip"
        )
    mn = _check_threshold(owner, "max_norm", max_norm) if max_norm is not None else None
    cv = _check_threshold(owner, "clip_value", clip_value) if clip_value is not None else None
    p = check_norm_type(owner, norm_type)
    _check_choice(owner, "group_by", group_by, GROUP_BY)
    if group_by == "module" and mode != "layer":
        raise ValueError(
            f"{owner}: group_by='module' groups the per-layer clip, so it needs mode='layer'; "
            f"got mode={mode!r}"
        )
    _check_choice(owner, "nonfinite", nonfinite, NONFINITE)
    check_bool(owner, "log_per_layer", log_per_layer)
    check_prefix(owner, log_prefix)
    return ClipConfig(mode, mn, cv, p, group_by, nonfinite, log_per_layer, log_prefix)


def metric_names(cfg: ClipConfig) -> dict[str, str]:
    """The metric keys (Lightning's ``grad_norm`` convention for the norms)."""
    p, pre = cfg.norm_type, cfg.log_prefix
    return {
        "total": f"grad_{p}_norm_total",
        "post": f"{pre}/post_clip_norm_total",
        "coef": f"{pre}/clip_coef",
        "rate": f"{pre}/clip_rate",
        "nonfinite": f"{pre}/nonfinite_count",
        "skipped": f"{pre}/skipped_steps",
        "layer": f"grad_{p}_norm/",
        "max_abs": f"{pre}/max_abs/",
    }


# --------------------------------------------------------------------------- plan


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
    """A cheap key that changes when param groups are added, replaced or resized."""
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
        module_of: ``id(param) -> id(owning module)``, needed for ``group_by="module"``;
            parameters missing from it form a group of their own.
        owner: the class name used in error messages.

    Returns:
        The :class:`Plan`.
    """
    bound = cfg.bound
    if isinstance(bound, dict):
        bad = [k for k in bound if k >= len(param_groups)]
        if bad:
            which = "max_norm" if cfg.mode in ("norm", "layer") else "clip_value"
            raise ValueError(
                f"{owner}: {which}={bound!r} names param group(s) {bad}, but the optimizer has "
                f"{len(param_groups)} param group(s) (indices 0..{len(param_groups) - 1})"
            )
    all_params: list[Tensor] = []
    grouped: list[tuple[list[Tensor], list[str]]] = []
    for gi, group in enumerate(param_groups):
        ps = list(group["params"])
        ns = [names.get(id(p), f"param_groups.{gi}.{i}") for i, p in enumerate(ps)]
        grouped.append((ps, ns))
        all_params.extend(ps)

    def unit(b: float | None, ps: list[Tensor], ns: list[str]) -> _Unit:
        if cfg.group_by == "module" and b is not None:
            by_module: dict[int, list[int]] = {}
            for i, p in enumerate(ps):
                key = module_of.get(id(p), -1 - i) if module_of is not None else -1 - i
                by_module.setdefault(key, []).append(i)
            parts = list(by_module.values())
        else:
            parts = [list(range(len(ps)))]
        return _Unit(b, ps, ns, parts)

    units: list[_Unit] = []
    if isinstance(bound, dict):
        for gi, (ps, ns) in enumerate(grouped):
            units.append(unit(bound.get(gi), ps, ns))
    else:
        ps = [p for g in grouped for p in g[0]]
        ns = [n for g in grouped for n in g[1]]
        units.append(unit(bound, ps, ns))
    return Plan(plan_key(param_groups), units, all_params)


# --------------------------------------------------------------------------- state


_COUNTERS = ("steps", "clipped_steps", "nonfinite_steps", "skipped_steps")
_WINDOW = ("window_steps", "window_clipped")


@dataclass
class ClipState:
    """Counters of one optimizer, as Python numbers plus a small pending device tensor.

    ``pending`` (int64 ``[3]``: steps clipped, steps with non-finite gradients, steps skipped
    by a GradScaler) accumulates on the device between host reads; :meth:`flush` folds it
    into the Python counters with one read.
    """

    steps: int = 0
    clipped_steps: int = 0
    nonfinite_steps: int = 0
    skipped_steps: int = 0
    window_steps: int = 0
    window_clipped: int = 0
    pending: Tensor | None = field(default=None, repr=False)
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
        """Fold the device counters into the Python ones (one host read, if any are pending)."""
        if self.pending is not None:
            self._fold(self.pending.tolist())

    def counters(self) -> dict[str, int]:
        """``steps``, ``clipped_steps``, ``nonfinite_steps``, ``skipped_steps`` (flushes first)."""
        self.flush()
        return {k: getattr(self, k) for k in _COUNTERS}

    def state_dict(self) -> dict[str, int]:
        """Counters and the running logging window, as Python ints."""
        self.flush()
        return {k: int(getattr(self, k)) for k in (*_COUNTERS, *_WINDOW)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from :meth:`state_dict`; missing keys default to 0."""
        for k in (*_COUNTERS, *_WINDOW):
            setattr(self, k, int(state.get(k, 0)))
        if self.pending is not None:
            self.pending.zero_()

    def __getstate__(self) -> dict[str, Any]:
        self.flush()
        d = dict(self.__dict__)
        d["pending"] = None
        return d


# --------------------------------------------------------------------------- step


@dataclass
class _Record:
    """One op call's results, with what is needed to summarize it on a logging step."""

    kind: str  # "stats", "norm", "layer", "value"
    names: list[str]
    grads: list[Tensor]
    stats: tuple[Tensor, Tensor, Tensor, Tensor]
    bound: Tensor | None = None  # effective bound (times the grad scale when scaled)
    coef: Tensor | None = None  # precomputed coefficient (multi-device norm parts)
    scale: Tensor | None = None  # the grads are multiplied by this (fused optimizer + AMP)


_BOUND_CACHE: dict[tuple[float, torch.device], Tensor] = {}


def _bound_tensor(value: float, device: torch.device) -> Tensor:
    """A cached 0-d float64 tensor holding ``value`` on ``device`` (created once)."""
    key = (value, device)
    t = _BOUND_CACHE.get(key)
    if t is None:
        t = torch.full((), value, dtype=torch.float64, device=device)
        _BOUND_CACHE[key] = t
    return t


def _pnorm(v: Tensor, p: float) -> Tensor:
    """Overflow-safe p-norm of a 1-D float64 vector of non-negative values (0 when empty)."""
    if v.numel() == 0:
        return torch.zeros((), dtype=torch.float64, device=v.device)
    m = v.amax()
    if math.isinf(p):
        return m
    usable = (m > 0) & torch.isfinite(m)
    s = torch.where(usable, m, torch.ones_like(m))
    return s * (v / s).pow(p).sum().pow(1.0 / p)


def _host_read_is_free(devices: Sequence[torch.device]) -> bool:
    """Whether reading a flag on the host costs no device synchronization (CPU only)."""
    return all(d.type == "cpu" for d in devices)


def _split_by_device(
    params: Sequence[Tensor], names: Sequence[str], idx: Sequence[int]
) -> list[tuple[torch.device, list[Tensor], list[str]]]:
    """The gradients of ``params[idx]`` (``None`` skipped), grouped by device in order."""
    out: dict[torch.device, tuple[list[Tensor], list[str]]] = {}
    first: torch.device | None = None
    first_lists: tuple[list[Tensor], list[str]] | None = None
    for i in idx:
        g = params[i].grad
        if g is None:
            continue
        d = g.device
        if d == first:
            lists = first_lists
        else:
            lists = out.get(d)
            if lists is None:
                lists = out[d] = ([], [])
            if first is None:
                first, first_lists = d, lists
        assert lists is not None
        lists[0].append(g)
        lists[1].append(names[i])
    return [(d, gs, ns) for d, (gs, ns) in out.items()]


def _clip_part(
    cfg: ClipConfig,
    kind: str,
    *,
    bound: float | None,
    per_dev: list[tuple[torch.device, list[Tensor], list[str]]],
    grad_scale: Tensor | None,
    records: list[_Record],
) -> Tensor | None:
    """Run the op(s) of one part; returns the value compared with the bound (or ``None``)."""
    p = cfg.norm_type
    scale = grad_scale
    if kind == "norm" and len(per_dev) > 1:
        # One global coefficient across devices: statistics per device, the total on the
        # first device, then the scaling (two passes; only for parts spanning devices).
        d0 = per_dev[0][0]
        recs = []
        for d, gs, ns in per_dev:
            warn_if_fallback(d)
            recs.append(_Record("norm", ns, gs, OPS["grad_stats"](gs, p)))
        totals = torch.stack([r.stats[3].to(d0, torch.float64) for r in recs])
        total = _pnorm(totals, p)
        b = _bound_tensor(bound, d0) if bound is not None else None
        if scale is not None:
            b = b * scale.to(d0)
        coef = torch.clamp(b / (total + EPS), max=1.0)
        for r, (d, gs, _) in zip(recs, per_dev):
            c = coef.to(d)
            for g in gs:
                g.mul_(c)
            r.bound, r.coef, r.scale = b.to(d), c, scale
            records.append(r)
        return total
    checks: list[Tensor] = []
    for d, gs, ns in per_dev:
        warn_if_fallback(d)
        if kind == "stats":
            records.append(_Record("stats", ns, gs, OPS["grad_stats"](gs, p), scale=scale))
            continue
        b = _bound_tensor(bound, d)
        if scale is not None:
            b = b * scale.to(d)
        if kind == "norm":
            stats = OPS["clip_norm"](gs, b, p, EPS, False)
            checks.append(stats[3].reshape(1))
        elif kind == "layer":
            stats = OPS["clip_norm_per_layer"](gs, b, p, EPS)
            checks.append(stats[0])
        else:
            stats = OPS["clip_value"](gs, b, p)
            checks.append(stats[1])
        records.append(_Record(kind, ns, gs, stats, b, None, scale))
    if not checks:
        return None
    return checks[0] if len(checks) == 1 else torch.cat([c.to(per_dev[0][0]) for c in checks])


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
            optimizer under a GradScaler): thresholds are multiplied by it and the statistics
            divided by it, so the clip equals the clip of the unscaled gradients (up to
            ``eps``).  Value clipping would turn an overflowed (inf) scaled gradient into a
            finite one that the scaler cannot see, so callers unscale before value clipping.
        scaler_skips: a GradScaler will skip this step if the gradients are non-finite; the
            non-finite policy is then left to it, and such steps are counted as skipped.
        step: the step number for error messages.

    Returns:
        ``(skip, metrics)``: ``skip`` is True when the ``"skip"`` policy wants the optimizer
        step not to happen; ``metrics`` is ``None`` unless ``log``.
    """
    state.steps += 1
    state.window_steps += 1
    records: list[_Record] = []
    unit_checks: list[tuple[Tensor, Tensor, str]] = []
    for unit in plan.units:
        kind = "stats" if cfg.mode is None or unit.bound is None else cfg.mode
        if kind == "layer" and cfg.group_by == "module":
            kind = "norm"  # each module part is a global clip over the module's tensors
        vals: list[Tensor] = []
        for part in unit.parts:
            per_dev = _split_by_device(unit.params, unit.names, part)
            if not per_dev:
                continue
            v = _clip_part(
                cfg, kind, bound=unit.bound, per_dev=per_dev, grad_scale=grad_scale, records=records
            )
            if v is not None:
                vals.append(v.reshape(-1))
        if vals:
            d0 = vals[0].device
            v = vals[0] if len(vals) == 1 else torch.cat([x.to(d0) for x in vals])
            b = _bound_tensor(unit.bound, d0)  # type: ignore[arg-type]
            if grad_scale is not None:
                b = b * grad_scale.to(d0)
            unit_checks.append((v, b, kind))
    if not records:
        if log:
            return False, _summarize(cfg, state, [], flag=None, skipped=False, zeroed=False)
        return False, None

    dev0 = records[0].stats[0].device
    devices = {r.stats[0].device for r in records}
    if len(records) == 1:
        nf_vec = records[0].stats[2]
    else:
        nf_vec = torch.cat([r.stats[2].to(dev0) for r in records])
    flag = nf_vec.sum() > 0

    clipped: Tensor | None = None
    for v, b, kind in unit_checks:
        c = (v > b).any() if kind == "value" else (v + EPS > b).any()
        clipped = c if clipped is None else clipped | c.to(dev0)
    if clipped is None:
        clipped = torch.zeros((), dtype=torch.bool, device=dev0)
    clipped = clipped & ~flag

    if state.pending is None:
        state.pending = torch.zeros(3, dtype=torch.int64, device=dev0)
    elif state.pending.device != dev0:
        state.pending = state.pending.to(dev0)
    if scaler_skips:
        state.pending.add_(torch.stack((clipped, flag, flag)))
    else:
        state.pending[:2].add_(torch.stack((clipped, flag)))

    skip = False
    zeroed: Union[bool, Tensor] | None = False
    if not scaler_skips and cfg.nonfinite != "ignore":
        if cfg.nonfinite == "zero":
            if _host_read_is_free(list(devices)):
                zeroed = bool(flag)
                if zeroed:
                    for r in records:
                        for g in r.grads:
                            g.zero_()
            else:
                for r in records:
                    f = flag.to(r.stats[0].device)
                    for g in r.grads:
                        g.masked_fill_(f, 0)
                zeroed = flag
        elif cfg.nonfinite == "skip":
            skip = bool(flag)  # one host read per step: the optimizer step happens or not
            if skip:
                state.skipped_steps += 1
        else:  # raise
            counts = nf_vec.tolist()  # one host read per step
            if any(counts):
                names = [n for r in records for n in r.names]
                first = next(i for i, c in enumerate(counts) if c)
                bad = sum(1 for c in counts if c)
                at = f" at optimizer step {step}" if step is not None else ""
                raise RuntimeError(
                    f"gradstab: non-finite gradient{at}: parameter {names[first]!r} has "
                    f"{int(counts[first])} NaN/Inf value(s) in its gradient ({bad} of "
                    f"{len(counts)} parameters with a gradient are affected). The optimizer "
                    "step was not taken. Use nonfinite='skip' to skip such steps, or 'zero' "
                    "to zero their gradients"
                )
    if not log:
        return skip, None
    return skip, _summarize(cfg, state, records, flag=flag, skipped=skip, zeroed=zeroed)


def _summarize(
    cfg: ClipConfig,
    state: ClipState,
    records: list[_Record],
    *,
    flag: Tensor | None,
    skipped: bool,
    zeroed: Union[bool, Tensor, None],
) -> dict[str, float]:
    """Build the metrics on the device and read them with one host transfer."""
    names = metric_names(cfg)
    p = cfg.norm_type
    f64 = torch.float64
    if records:
        dev0 = records[0].stats[0].device
        pre_r, post_r, norms_l, maxabs_l = [], [], [], []
        for r in records:
            norms, max_abs, _, total = (t.to(dev0, f64) for t in r.stats)
            if r.kind == "norm":
                coef = r.coef.to(dev0) if r.coef is not None else None
                if coef is None:
                    coef = torch.clamp(r.bound.to(dev0) / (total + EPS), max=1.0)
                post = total * coef
            elif r.kind == "layer":
                coefs = torch.clamp(r.bound.to(dev0) / (norms + EPS), max=1.0)
                post = _pnorm(norms * coefs, p)
            elif r.kind == "value":
                post = OPS["grad_stats"](r.grads, p)[3].to(dev0, f64)  # second pass, log steps only
            else:
                post = total
            if r.scale is not None:
                s = r.scale.to(dev0, f64)
                norms, max_abs, total, post = norms / s, max_abs / s, total / s, post / s
            pre_r.append(total.reshape(1))
            post_r.append(post.reshape(1))
            norms_l.append(norms)
            maxabs_l.append(max_abs)
        if len(records) == 1:
            pre, post = pre_r[0][0], post_r[0][0]
        else:
            pre, post = _pnorm(torch.cat(pre_r), p), _pnorm(torch.cat(post_r), p)
        if skipped or zeroed is True:
            post = torch.zeros_like(post)
        elif isinstance(zeroed, Tensor):
            post = torch.where(zeroed.to(dev0), torch.zeros_like(post), post)
        coef = torch.where(pre > 0, post / pre, torch.ones_like(pre))
        parts = [torch.stack((pre, post, coef))]
        if state.pending is not None:
            parts.append(state.pending.to(dev0, f64))
        else:
            parts.append(torch.zeros(3, dtype=f64, device=dev0))
        layer_names: list[str] = []
        if cfg.log_per_layer:
            parts += norms_l + maxabs_l
            layer_names = [n for r in records for n in r.names]
        vals = torch.cat(parts).tolist()  # the one host read of a logging step
    else:
        vals = [0.0, 0.0, 1.0]
        if state.pending is not None:
            vals += state.pending.tolist()
        else:
            vals += [0.0, 0.0, 0.0]
        layer_names = []
    pre_v, post_v, coef_v = vals[:3]
    state._fold(vals[3:6])
    rate = state.window_clipped / state.window_steps if state.window_steps else 0.0
    metrics = {
        names["total"]: pre_v,
        names["post"]: post_v,
        names["coef"]: coef_v,
        names["rate"]: rate,
        names["nonfinite"]: float(state.nonfinite_steps),
        names["skipped"]: float(state.skipped_steps),
    }
    t = len(layer_names)
    for i, n in enumerate(layer_names):
        metrics[names["layer"] + n] = vals[6 + i]
        metrics[names["max_abs"] + n] = vals[6 + t + i]
    state.window_steps = 0
    state.window_clipped = 0
    state.last_metrics = metrics
    return metrics
