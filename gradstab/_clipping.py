"""Clipping, monitoring and non-finite handling shared by the callback and the optimizer wrapper.

:class:`gradstab.GradStabCallback` and :class:`gradstab.GradStabOptimizer` are thin adapters
around this module: both validate their options with :func:`make_config`, describe the
optimizer's parameters with :func:`build_plan` (cached while the param groups do not change)
and call :func:`clip_step` once per optimizer step, so both behave identically.

How a step runs (:func:`clip_step`):

1. The optimizer's parameters form *units*: all of them when the threshold is one number (or
   one adaptive threshold), one unit per param group when it is a ``{group_index: threshold}``
   dict (groups missing from the dict are monitored, not clipped).  In mode ``"agc"`` the
   parameters matched by ``agc_exclude`` form a monitored unit of their own.  With
   ``group_by="module"`` a unit is further cut into *parts*, one per owning module;
   otherwise a unit is one part.
2. Each part's gradients (``None`` skipped) are grouped by device and go through one
   ``torch.ops.gradstab`` op per device, which clips them in place and returns their pre-clip
   statistics from the same read: ``clip_norm`` (mode ``"norm"``, and each module part of
   ``"layer"`` with ``group_by="module"``: a module's coefficient
   ``min(1, max_norm / (||module|| + eps))`` is a global clip of its tensors),
   ``clip_norm_per_layer`` (``"layer"``), ``clip_value`` (``"value"``), ``adaptive_clip``
   (``"agc"``), ``normalize_per_layer`` (``"normalize"``) or ``grad_stats`` (monitoring).
   A healthy step reads every gradient once and writes only the gradients that are clipped.
   A norm-clipped part whose gradients live on several devices needs the combined norm before
   any coefficient is known; it takes the two-phase path (statistics per device,
   :func:`_combine`, coefficients, scaling), as does a module part of ``"normalize"`` (no
   fused op rescales a group of tensors to a joint norm).
3. **Adaptive thresholds** (:mod:`gradstab.adaptive`): a unit whose ``max_norm`` is an
   :class:`~gradstab.adaptive.AdaptiveThreshold` owns a deep copy of it (kept in
   :class:`ClipState`, so one per optimizer and unit).  Its *norm* is the unit's total norm
   (``"norm"``), the vector of its tensors' norms (``"layer"``; ``NaN`` for a tensor without a
   gradient, which the threshold ignores) or of its modules' norms (``group_by="module"``).
   A rule that needs this step's norm (``needs_norm``) first measures the unit
   (``grad_stats``: one read), then clips with ``threshold(norm)`` (a second read; a write
   only where clipped); the others clip with ``threshold(device=...)`` in one pass.  Either
   way ``update(norm)`` runs exactly once per optimizer step, with the unscaled pre-clip
   norm.  All of it stays on the device.
4. A few tiny device ops update the counters (steps clipped, steps with non-finite gradients)
   in a small int64 device tensor.  Nothing is read on the host unless the non-finite policy
   needs it (``"skip"``, ``"raise"``: one read per step; ``"zero"`` reads its flag only where
   that is free, all gradients on the CPU).
5. A :class:`~gradstab.GradHistory` given to :func:`clip_step` records the step's pre-clip
   statistics (those the ops returned: no extra pass), the post-clip total norm, the
   threshold and whether the step was skipped, on the device.
6. On a logging step the metrics (pre/post-clip totals, coefficient, threshold, counters and,
   on request, per-tensor norms and max-abs) are assembled on the device and read in one
   transfer.

Sharded gradients (FSDP2 ``DTensor``, or plain tensors with ``process_group=``, ZeRO-style):
:func:`build_plan` marks the plan *sharded*; every part then goes through
:func:`gradstab.distributed.layout` and the two-phase path: the op reads this rank's local
shards, :func:`_global_stats` combines the per-tensor statistics across ranks (one float64
``SUM`` all-reduce of exponent-binned p-powers and non-finite counts; a ``MAX`` all-reduce of
the max-abs when a statistic needs it: ``"value"`` mode, a history, a per-layer log), and the
coefficients from those global statistics scale the local shards.  Every rank makes the same
collectives at the same steps (logging steps included: they are decided by the step count),
so the non-finite flag, the skip decision, the counters, the adaptive thresholds and the
logged norms are those of one process on the full model, on every rank.  Replicated (DDP)
gradients need none of this.

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

import copy
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from gradstab import distributed, reference
from gradstab._common import EPS, check_flag, check_norm_type
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS
from gradstab.adaptive import AdaptiveThreshold

if TYPE_CHECKING:
    from gradstab.diagnosis import GradHistory

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

MODES = ("norm", "layer", "value", "agc", "normalize")
GROUP_BY = ("param", "module")
NONFINITE = ("ignore", "zero", "skip", "raise")
COUNTERS = ("steps", "clipped_steps", "nonfinite_steps", "skipped_steps")

#: The option that holds each mode's threshold.
THRESHOLD_OF = {
    "norm": "max_norm",
    "layer": "max_norm",
    "value": "clip_value",
    "agc": "clip_factor",
    "normalize": "target_norm",
}
#: Defaults of the thresholds that have one (the others must be given).
DEFAULT_THRESHOLD = {"clip_factor": 0.01, "target_norm": 1.0}
AGC_EPS = 1e-3

Bound = Union[float, AdaptiveThreshold]
Threshold = Union[float, AdaptiveThreshold, Mapping[int, Union[float, AdaptiveThreshold]]]
Exclude = Union[tuple[str, ...], Callable[[str, Tensor], bool], None]

# ------------------------------------------------------------------------------ configuration


@dataclass(frozen=True)
class ClipConfig:
    """Validated clipping options (see :func:`make_config`)."""

    mode: str | None
    max_norm: Bound | dict[int, Bound] | None
    clip_value: float | dict[int, float] | None
    norm_type: float
    group_by: str
    nonfinite: str
    log_per_layer: bool
    log_prefix: str
    target_norm: float | dict[int, float] | None = None
    clip_factor: float | dict[int, float] | None = None
    agc_eps: float = AGC_EPS
    agc_exclude: Exclude = None
    history: int = 0
    history_extras: bool = False
    process_group: Any = None

    @property
    def threshold_name(self) -> str | None:
        """The option holding the mode's threshold (``"max_norm"``, ...; ``None``: monitor)."""
        return THRESHOLD_OF.get(self.mode or "")

    @property
    def threshold(self) -> Bound | dict[int, Bound] | None:
        """The threshold of the mode (``max_norm``, ``clip_value``, ...) or ``None``."""
        name = self.threshold_name
        return None if name is None else getattr(self, name)

    def adaptive(self) -> dict[str, AdaptiveThreshold]:
        """``{unit key: prototype}`` of the adaptive thresholds (``"all"`` or ``"group<i>"``)."""
        bound = self.threshold
        if isinstance(bound, AdaptiveThreshold):
            return {"all": bound}
        if isinstance(bound, dict):
            return {f"group{k}": v for k, v in bound.items() if isinstance(v, AdaptiveThreshold)}
        return {}


def _check_choice(owner: str, name: str, value: object, choices: Sequence[object]) -> None:
    if (value is None or isinstance(value, str)) and value in choices:
        return
    shown = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{owner}: {name} must be one of {shown}; got {value!r}")


def _check_positive(owner: str, name: str, value: object, adaptive: bool = False) -> Bound:
    if adaptive and isinstance(value, AdaptiveThreshold):
        return copy.deepcopy(value)  # a private prototype: later changes to the user's object
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        also = ", a gradstab.adaptive threshold" if adaptive else ""
        raise TypeError(
            f"{owner}: {name} must be a positive finite number{also} or a dict "
            f"{{param_group_index: number}}; got {value!r} of type {type(value).__name__}"
        )
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{owner}: {name} must be a positive finite number; got {value!r}")
    return v


def _check_threshold(
    owner: str, name: str, value: object, adaptive: bool = False
) -> Bound | dict[int, Bound]:
    if not isinstance(value, Mapping):
        return _check_positive(owner, name, value, adaptive)
    if not value:
        raise ValueError(f"{owner}: {name} as a dict must name at least one param group; got {{}}")
    out: dict[int, Bound] = {}
    for k, v in value.items():
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise TypeError(
                f"{owner}: the keys of {name} must be param group indices (int >= 0); "
                f"got key {k!r} in {name}={dict(value)!r}"
            )
        out[k] = _check_positive(owner, f"{name}[{k}]", v, adaptive)
    return out


def _check_exclude(owner: str, value: object) -> Exclude:
    if value is None or callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(
        f"{owner}: agc_exclude must be None, a parameter-name prefix, a sequence of prefixes or "
        f"a callable(name, param) -> bool; got {value!r}"
    )


def _check_process_group(owner: str, value: object) -> Any:
    if value is None or value == "world":
        return value
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available() or not isinstance(value, dist.ProcessGroup):
        raise TypeError(
            f"{owner}: process_group must be a torch.distributed.ProcessGroup (the group plain "
            "gradients are sharded over, ZeRO-style), 'world' (the default group, looked up "
            f"when training starts) or None; got {value!r}"
        )
    return value


def process_group_of(cfg: ClipConfig) -> Any:
    """The process group plain gradients are sharded over, or ``None``.

    ``"world"`` is ``torch.distributed.group.WORLD`` once ``torch.distributed`` is
    initialized, and ``None`` (one process, nothing sharded) before.

    Example:
        >>> process_group_of(make_config("demo", max_norm=1.0)) is None
        True
    """
    group = cfg.process_group
    if group != "world":
        return group
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


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
    clip_value: float | Mapping[int, float] | None = None,
    norm_type: float | str = 2.0,
    group_by: str = "param",
    nonfinite: str = "ignore",
    log_per_layer: bool = False,
    log_prefix: str = "grad",
    target_norm: float | Mapping[int, float] | None = None,
    clip_factor: float | Mapping[int, float] | None = None,
    agc_eps: float | None = None,
    agc_exclude: object = None,
    history: int = 0,
    history_extras: bool = False,
    process_group: Any = None,
) -> ClipConfig:
    """Validate the clipping options; every error names the argument and the value.

    Args:
        owner: the class name used in error messages.
        mode: ``"norm"``, ``"layer"``, ``"value"``, ``"agc"``, ``"normalize"`` or ``None``
            (monitor only).
        max_norm: threshold of ``"norm"``/``"layer"``: a positive number, an
            :class:`~gradstab.adaptive.AdaptiveThreshold` (a prototype, copied per optimizer
            and unit) or a dict ``{param_group_index: number or threshold}``.
        clip_value: threshold of ``"value"``: a positive number or such a dict.
        norm_type: p of the p-norm (positive, ``inf`` or ``"inf"``).
        group_by: ``"param"`` or ``"module"`` (``"module"`` only with ``"layer"`` and
            ``"normalize"``).
        nonfinite: ``"ignore"``, ``"zero"``, ``"skip"`` or ``"raise"``.
        log_per_layer: add per-tensor norms and max-abs to the metrics.
        log_prefix: prefix of gradstab's own metric names (non-empty, no trailing ``/``).
        target_norm: the norm every gradient gets in ``"normalize"`` (default 1.0; number or
            dict).
        clip_factor: lambda of ``"agc"`` (default 0.01; number or dict).
        agc_eps: floor of the weight norm in ``"agc"`` (default 1e-3).
        agc_exclude: parameters ``"agc"`` monitors without clipping: name prefixes, or a
            callable ``(name, param) -> bool``.
        history: ring capacity of a gradient history (0: none).
        history_extras: the history also records zero fractions and parameter norms.
        process_group: the group plain gradients are sharded over (ZeRO-style), ``"world"``
            (the default group once ``torch.distributed`` is initialized), or ``None``.

    Returns:
        The frozen :class:`ClipConfig`.

    Example:
        >>> make_config("demo", mode="layer", max_norm={0: 1.0}).threshold
        {0: 1.0}
    """
    _check_choice(owner, "mode", mode, (*MODES, None))
    given = {
        "max_norm": max_norm,
        "clip_value": clip_value,
        "clip_factor": clip_factor,
        "target_norm": target_norm,
    }
    needed = THRESHOLD_OF.get(mode or "")
    if mode is None:
        for name, value in (*given.items(), ("agc_eps", agc_eps), ("agc_exclude", agc_exclude)):
            if value is not None:
                raise ValueError(
                    f"{owner}: mode=None only monitors, so {name}={value!r} would be ignored; "
                    "set mode='norm', 'layer', 'value', 'agc' or 'normalize' to clip"
                )
    else:
        assert needed is not None
        if given[needed] is None:
            if needed not in DEFAULT_THRESHOLD:
                raise ValueError(
                    f"{owner}: mode={mode!r} needs {needed} (a positive number or a dict "
                    "{param_group_index: number}); got None"
                )
            given[needed] = DEFAULT_THRESHOLD[needed]
        for name, value in given.items():
            if name != needed and value is not None:
                raise ValueError(
                    f"{owner}: {name}={value!r} is not used with mode={mode!r} "
                    f"(which uses {needed}); remove it"
                )
        if mode != "agc":
            for name, value in (("agc_eps", agc_eps), ("agc_exclude", agc_exclude)):
                if value is not None:
                    raise ValueError(
                        f"{owner}: {name}={value!r} is only used with mode='agc'; got mode={mode!r}"
                    )
    checked = {
        name: None
        if value is None
        else _check_threshold(owner, name, value, adaptive=name == "max_norm")
        for name, value in given.items()
    }
    p = check_norm_type(norm_type, owner)
    eps = AGC_EPS
    if agc_eps is not None:
        if isinstance(agc_eps, bool) or not isinstance(agc_eps, numbers.Real):
            raise TypeError(f"{owner}: agc_eps must be a finite number >= 0; got {agc_eps!r}")
        eps = float(agc_eps)
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(f"{owner}: agc_eps must be a finite number >= 0; got {agc_eps!r}")
    exclude = _check_exclude(owner, agc_exclude)
    _check_choice(owner, "group_by", group_by, GROUP_BY)
    if group_by == "module" and mode not in ("layer", "normalize"):
        raise ValueError(
            f"{owner}: group_by='module' groups the per-layer clip, so it needs mode='layer' "
            f"(or 'normalize'); got mode={mode!r}"
        )
    _check_choice(owner, "nonfinite", nonfinite, NONFINITE)
    check_flag(log_per_layer, "log_per_layer", owner)
    if not isinstance(log_prefix, str) or not log_prefix or log_prefix.endswith("/"):
        raise ValueError(
            f"{owner}: log_prefix must be a non-empty string not ending in '/'; got {log_prefix!r}"
        )
    if isinstance(history, bool) or not isinstance(history, int):
        raise TypeError(
            f"{owner}: history must be an int >= 0 (the number of steps kept; 0: off); "
            f"got {history!r}"
        )
    if history < 0:
        raise ValueError(f"{owner}: history must be >= 0 (0: off); got {history!r}")
    check_flag(history_extras, "history_extras", owner)
    if history_extras and not history:
        raise ValueError(
            f"{owner}: history_extras=True adds to the gradient history, which is off; "
            "set history=<number of steps to keep> too"
        )
    return ClipConfig(
        mode=mode,
        max_norm=checked["max_norm"],
        clip_value=checked["clip_value"],  # type: ignore[arg-type]
        norm_type=p,
        group_by=group_by,
        nonfinite=nonfinite,
        log_per_layer=log_per_layer,
        log_prefix=log_prefix,
        target_norm=checked["target_norm"],  # type: ignore[arg-type]
        clip_factor=checked["clip_factor"],  # type: ignore[arg-type]
        agc_eps=eps,
        agc_exclude=exclude,
        history=history,
        history_extras=history_extras,
        process_group=_check_process_group(owner, process_group),
    )


def metric_names(cfg: ClipConfig) -> dict[str, str]:
    """The metric keys; the norms follow Lightning's ``grad_norm`` convention.

    Args:
        cfg: the options.

    Returns:
        ``{role: key}``; ``"layer"``, ``"max_abs"``, ``"agc_layer"``, ``"threshold_layer"``
        and ``"threshold_stats"`` are prefixes of per-parameter (per-statistic) keys.

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
        "threshold": f"{pre}/clip_threshold",
        "threshold_stats": f"{pre}/threshold/",
        "agc": f"{pre}/agc_clipped_units",
        "layer": f"grad_{p}_norm/",
        "max_abs": f"{pre}/max_abs/",
        "agc_layer": f"{pre}/agc_clipped_units/",
        "threshold_layer": f"{pre}/clip_threshold/",
    }


def per_param_prefixes(cfg: ClipConfig) -> tuple[str, ...]:
    """The prefixes of per-parameter metric keys (they never get an optimizer suffix).

    Example:
        >>> per_param_prefixes(make_config("demo", max_norm=1.0))[0]
        'grad_2.0_norm/'
    """
    k = metric_names(cfg)
    return (k["layer"], k["max_abs"], k["agc_layer"], k["threshold_layer"])


# ------------------------------------------------------------------------------ plan


@dataclass
class _Unit:
    bound: Bound | None  # None: monitored only
    params: list[Tensor]
    names: list[str]
    parts: list[list[int]]  # indices into params; one part per module with group_by="module"
    key: str = "all"  # names the unit's adaptive threshold: "all" or "group<i>"
    kind: str = "stats"  # the op of each part (see _run_part)
    tracks: str = "total"  # what an adaptive threshold tracks: "total", "tensors" or "parts"
    # per part, the parameters grouped by device: (device, indices, names, params)
    by_device: list[list[tuple[torch.device, list[int], list[str], list[Tensor]]]] = field(
        default_factory=list, repr=False
    )

    def __post_init__(self) -> None:
        self.by_device = []
        for idx in self.parts:
            groups: dict[torch.device, tuple[list[int], list[str], list[Tensor]]] = {}
            for i in idx:
                q = self.params[i]
                ids, ns, ps = groups.setdefault(q.device, ([], [], []))
                ids.append(i)
                ns.append(self.names[i])
                ps.append(q)
            self.by_device.append([(d, *lists) for d, lists in groups.items()])


@dataclass
class Plan:
    """The optimizer's parameters split into clipping units (cached between steps)."""

    key: tuple
    units: list[_Unit]
    params: list[Tensor]  # every parameter of the optimizer, in order
    sharded: bool = False  # DTensor parameters or a process_group: reduce across ranks
    group: Any = None  # the process group plain gradients are sharded over (resolved)
    cache: dict = field(default_factory=dict, repr=False)  # index tensors, history rows


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


def _part_kind(cfg: ClipConfig, bound: object) -> tuple[str, str]:
    """``(op kind of each part, what an adaptive threshold tracks)`` of a unit."""
    if cfg.mode is None or bound is None:
        return "stats", "total"
    module = cfg.group_by == "module"
    if cfg.mode == "layer":
        return ("norm", "parts") if module else ("layer", "tensors")
    if cfg.mode == "normalize":
        return ("normalize_total" if module else "normalize"), "total"
    return cfg.mode, "total"


def _excluded(cfg: ClipConfig, name: str, param: Tensor) -> bool:
    ex = cfg.agc_exclude
    if ex is None:
        return False
    if isinstance(ex, tuple):
        return name.startswith(ex)
    return bool(ex(name, param))


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

    Raises:
        ValueError: a ``{group: threshold}`` dict names a group the optimizer lacks; mode
            ``"agc"`` or ``history_extras`` with sharded parameters.

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
    every = [p for g in groups for p in g[0]]
    group = process_group_of(cfg)
    sharded = group is not None or any(distributed.is_dtensor(p) for p in every)
    if sharded and cfg.mode == "agc":
        raise ValueError(
            f"{owner}: mode='agc' does not support sharded parameters (FSDP2 DTensors or "
            "process_group=): a unit's gradient and weight norms would have to be gathered "
            "across ranks. Use mode='norm' or 'layer', or AGC without sharding"
        )
    if sharded and cfg.history_extras:
        raise ValueError(
            f"{owner}: history_extras=True is not supported with sharded parameters (FSDP2 "
            "DTensors or process_group=): the zero fractions and parameter norms would be "
            "those of one rank's shards. Use history_extras=False"
        )

    excluded: tuple[list[Tensor], list[str]] = ([], [])

    def unit(b: Bound | None, ps: list[Tensor], ns: list[str], key: str) -> _Unit:
        if cfg.mode == "agc" and b is not None:
            keep = [i for i, (n, p) in enumerate(zip(ns, ps)) if not _excluded(cfg, n, p)]
            if len(keep) < len(ps):
                drop = sorted(set(range(len(ps))) - set(keep))
                excluded[0].extend(ps[i] for i in drop)
                excluded[1].extend(ns[i] for i in drop)
                ps, ns = [ps[i] for i in keep], [ns[i] for i in keep]
        kind, tracks = _part_kind(cfg, b)
        if cfg.group_by == "module" and b is not None:
            by_module: dict[int, list[int]] = {}
            for i, p in enumerate(ps):
                owner_id = module_of.get(id(p)) if module_of is not None else None
                by_module.setdefault(-1 - i if owner_id is None else owner_id, []).append(i)
            return _Unit(b, ps, ns, list(by_module.values()), key, kind, tracks)
        return _Unit(b, ps, ns, [list(range(len(ps)))], key, kind, tracks)

    if isinstance(bound, dict):
        units = [unit(bound.get(gi), ps, ns, f"group{gi}") for gi, (ps, ns) in enumerate(groups)]
    else:
        units = [unit(bound, every, [n for g in groups for n in g[1]], "all")]
    if excluded[0]:
        units.append(
            _Unit(None, excluded[0], excluded[1], [list(range(len(excluded[0])))], "excluded")
        )
    return Plan(plan_key(param_groups), units, every, sharded, group)


# ------------------------------------------------------------------------------ state


@dataclass
class ClipState:
    """Counters of one optimizer: Python ints plus a small device tensor of pending counts.

    ``pending`` (int64 ``[3]``: steps clipped, steps with non-finite gradients, of those the
    steps a GradScaler skips) accumulates on the gradients' device between host reads;
    :meth:`flush` folds it into the Python counters with one read.  ``thresholds`` holds the
    optimizer's own copies of the adaptive thresholds, by unit key.
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
    thresholds: dict[str, AdaptiveThreshold] = field(default_factory=dict, repr=False)

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

    def threshold(self, cfg: ClipConfig, key: str) -> AdaptiveThreshold:
        """The optimizer's copy of the adaptive threshold of unit ``key`` (made on first use)."""
        thr = self.thresholds.get(key)
        if thr is None:
            thr = self.thresholds[key] = copy.deepcopy(cfg.adaptive()[key])
        return thr

    def state_dict(self) -> dict[str, Any]:
        """The counters and the running logging window as Python ints, plus ``"thresholds"``
        (each adaptive threshold's ``state_dict()``, device tensors) when there are any."""
        self.flush()
        out: dict[str, Any] = {
            k: int(getattr(self, k)) for k in (*COUNTERS, "window_steps", "window_clipped")
        }
        if self.thresholds:
            out["thresholds"] = {k: t.state_dict() for k, t in sorted(self.thresholds.items())}
        return out

    def load_state_dict(self, state: Mapping[str, Any], cfg: ClipConfig | None = None) -> None:
        """Restore :meth:`state_dict`; missing keys are 0.

        Args:
            state: from :meth:`state_dict`.
            cfg: the options; needed to restore saved adaptive thresholds (each is a copy of
                the configured prototype loaded with the saved state, which must match its
                configuration: ``ValueError`` otherwise).
        """
        for k in (*COUNTERS, "window_steps", "window_clipped"):
            setattr(self, k, int(state.get(k, 0)))
        self.pending = self.head = None
        self.thresholds = {}
        saved = state.get("thresholds") or {}
        if saved:
            protos = cfg.adaptive() if cfg is not None else {}
            for key, sd in saved.items():
                if key not in protos:
                    raise ValueError(
                        f"gradstab: the checkpoint holds the state of an adaptive threshold for "
                        f"{key!r}, but the configured max_norm has none there "
                        f"(adaptive thresholds configured: {sorted(protos) or 'none'})"
                    )
                thr = copy.deepcopy(protos[key])
                thr.load_state_dict(sd)
                self.thresholds[key] = thr

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
_F64 = torch.float64


def _bound_tensor(value: float, device: torch.device) -> Tensor:
    """A cached 0-d float64 tensor holding ``value`` on ``device`` (made once, by a fill)."""
    key = (value, device)
    t = _BOUND_CACHE.get(key)
    if t is None:
        t = _BOUND_CACHE[key] = torch.full((), value, dtype=_F64, device=device)
    return t


def _pnorm(v: Tensor, p: float) -> Tensor:
    """Overflow-safe p-norm of a 1-D float64 vector of non-negative numbers (0 if empty)."""
    if v.numel() == 0:
        return torch.zeros((), dtype=_F64, device=v.device)
    m = v.amax()
    if math.isinf(p):
        return m
    s = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return s * (v / s).pow(p).sum().pow(1.0 / p)


def _cached_index(cache: dict, idx: Sequence[int], device: torch.device) -> Tensor:
    """An int64 index tensor on ``device``, made once per plan (no copy to the device per step)."""
    key = ("index", tuple(idx), device)
    t = cache.get(key)
    if t is None:
        t = cache[key] = torch.tensor(list(idx), dtype=torch.int64, device=device)
    return t


# device, gradients, names, parameters, indices into the unit's params
_PerDevice = list[tuple[torch.device, list[Tensor], list[str], list[Tensor], list[int]]]
_Stats = tuple[Tensor, Tensor, Tensor, Tensor]  # norms [T], max_abs [T], nonfinite [T], total []


def _part_grads(unit: _Unit, pi: int) -> _PerDevice:
    """The gradients of part ``pi`` of ``unit`` (``None`` skipped) with their names, by device.

    A gradient lives on its parameter's device, so the grouping made with the plan holds;
    only the first gradient of each group is checked (a model moved after the plan was made
    takes the slow path).
    """
    out: _PerDevice = []
    for d, ids, ns, ps in unit.by_device[pi]:
        gs = [q.grad for q in ps]
        kept = [g for g in gs if g is not None]
        if not kept:
            continue
        if kept[0].device != d:
            return _grads_by_device(unit.params, unit.names, unit.parts[pi])
        if len(kept) == len(gs):
            out.append((d, kept, ns, ps, ids))
        else:
            sel = [k for k, g in enumerate(gs) if g is not None]
            out.append((d, kept, [ns[k] for k in sel], [ps[k] for k in sel], [ids[k] for k in sel]))
    return out


def _grads_by_device(
    params: Sequence[Tensor], names: Sequence[str], idx: Sequence[int]
) -> _PerDevice:
    """The gradients of ``params[idx]`` (``None`` skipped) with their names, by device."""
    out: dict[torch.device, tuple[list[Tensor], list[str], list[Tensor], list[int]]] = {}
    for i in idx:
        q = params[i]
        g = q.grad
        if g is None:
            continue
        lists = out.get(g.device)
        if lists is None:
            lists = out[g.device] = ([], [], [], [])
        lists[0].append(g)
        lists[1].append(names[i])
        lists[2].append(q)
        lists[3].append(i)
    return [(d, *lists) for d, lists in out.items()]


@dataclass
class _Job:
    """One part of one unit, with this step's gradients."""

    unit: _Unit
    part: int  # index into unit.parts
    per_dev: _PerDevice
    lay: distributed.ShardLayout | None = None  # sharded parts

    @property
    def kind(self) -> str:
        return self.unit.kind

    @property
    def names(self) -> list[str]:
        if len(self.per_dev) == 1:
            return self.per_dev[0][2]
        return [n for _, _, ns, _, _ in self.per_dev for n in ns]

    @property
    def index(self) -> list[int]:
        """Positions in ``unit.params`` of the statistics' rows."""
        if len(self.per_dev) == 1:
            return self.per_dev[0][4]
        return [i for *_, ix in self.per_dev for i in ix]


def _jobs(cfg: ClipConfig, plan: Plan) -> list[_Job]:
    jobs = []
    for unit in plan.units:
        for pi in range(len(unit.parts)):
            per_dev = _part_grads(unit, pi)
            if not per_dev:
                continue
            lay = None
            if plan.sharded:
                if len(per_dev) > 1:
                    devs = [str(d) for d, *_ in per_dev]
                    raise ValueError(
                        f"gradstab: the sharded gradients of {per_dev[0][2][0]!r} and others are "
                        f"on several devices ({', '.join(devs)}); sharded clipping needs every "
                        "gradient of a rank on one device"
                    )
                _, gs, _, ps, _ = per_dev[0]
                marks = None
                if plan.group is not None:
                    marks = [distributed.is_replicated(q) for q in ps]
                lay = distributed.layout(gs, marks, plan.group, "gradstab")
                if not lay.groups:  # nothing sharded in this part (replicated DTensors)
                    per_dev = [(per_dev[0][0], lay.local, *per_dev[0][2:])]
                    lay = None
            jobs.append(_Job(unit, pi, per_dev, lay))
    return jobs


def _needs_two_phase(kind: str, per_dev: _PerDevice) -> bool:
    """Whether a part's coefficients need statistics combined over pieces of its gradients.

    True for norm clipping over several devices, and for a module part of ``"normalize"``
    (no fused op rescales a group of tensors to their joint norm).  Sharded parts always take
    the two-phase path (:func:`_run_sharded`).
    """
    if kind == "normalize_total":
        return True
    return kind in ("norm", "layer", "normalize") and len(per_dev) > 1


def _combine(stats: Sequence[_Stats], p: float, device: torch.device) -> _Stats:
    """The statistics of all pieces (devices) of a part's gradients as one set, on ``device``.

    One piece is returned as the op gave it.  Several pieces are concatenated in their order,
    in float64, and the total is the p-norm of the per-tensor norms.
    """
    if len(stats) == 1:
        return stats[0]
    norms = torch.cat([s[0].to(device, _F64) for s in stats])
    max_abs = torch.cat([s[1].to(device, _F64) for s in stats])
    nonfinite = torch.cat([s[2].to(device) for s in stats])
    return norms, max_abs, nonfinite, _pnorm(norms, p)


def _global_stats(
    lay: distributed.ShardLayout, stats: _Stats, p: float, with_max_abs: bool
) -> _Stats:
    """Per-tensor statistics of the full tensors from this rank's statistics of its shards.

    One float64 ``SUM`` all-reduce per sharding domain combines the exponent-binned p-powers
    and the non-finite counts (so the non-finite flag is global); a ``MAX`` all-reduce of the
    max-abs follows only ``with_max_abs`` (otherwise the local max-abs is returned, unused).
    The total is taken from the reduced bins (no re-rounding).  Every rank gets the same
    values.  (:func:`gradstab.distributed.layout_stats` reduces the counts only together with
    the max-abs: two collectives where one suffices on most steps.)
    """
    if not lay.groups:
        return stats
    d = distributed
    norms, max_abs, nonfinite, _ = stats
    rd = norms.dtype
    n64 = norms.to(_F64)
    gn, gm, gc, gb = [], [], [], []
    for di, groups in enumerate(lay.groups):
        rn, rm, rc, rb = d._reduce_rows(
            d._gather_runs(n64, lay, di),
            d._gather_runs(max_abs, lay, di) if with_max_abs else None,
            d._gather_runs(nonfinite, lay, di),
            p,
            groups,
        )
        gn.append(rn)
        gm.append(rm)
        gc.append(rc)
        gb.append(rb)
    loc = d._gather_runs(n64, lay, -1)
    if math.isinf(p):
        total = d._total(p, [], [loc, *gn])
    else:
        total = d._total(p, [d._to_bins(loc, p), *gb], [])
    out_n = d._scatter_runs(lay, n64, gn).to(rd)
    out_c = d._scatter_runs(lay, nonfinite, gc)
    out_m = max_abs
    if with_max_abs:
        out_m = d._scatter_runs(lay, max_abs.to(_F64), gm).to(rd)
    return out_n, out_m, out_c, total


def _empty_stats(device: torch.device) -> _Stats:
    z = torch.zeros((0,), device=device)
    return z, z.clone(), torch.zeros((0,), dtype=torch.int64, device=device), z.new_zeros(())


def _measure(job: _Job, p: float, with_max_abs: bool) -> _Stats:
    """A part's pre-clip statistics (global for sharded parts), read-only."""
    if job.lay is not None:
        return _global_stats(job.lay, distributed._op_stats(job.lay, p), p, with_max_abs)
    d0 = job.per_dev[0][0]
    return _combine([OPS["grad_stats"](gs, p) for _, gs, *_ in job.per_dev], p, d0)


def _coefs(kind: str, b: Tensor, stats: _Stats) -> Tensor:
    """Float64 per-tensor coefficients of the two-phase path (one per row of ``stats``)."""
    norms = stats[0].to(_F64)
    total = stats[3].to(_F64)
    if kind == "norm":
        return torch.clamp(b / (total + EPS), max=1.0).expand(norms.shape)
    if kind == "layer":
        return torch.clamp(b / (norms + EPS), max=1.0)
    if kind == "normalize":
        return b / (norms + EPS)
    if kind == "normalize_total":
        return (b / (total + EPS)).expand(norms.shape)
    raise AssertionError(kind)


@dataclass
class _Part:
    """What one part's op calls returned: pre-clip statistics, in the order of ``names``."""

    kind: str  # "stats", "norm", "layer", "value", "agc", "normalize" or "normalize_total"
    names: list[str]
    grads: list[list[Tensor]]  # per device, in the order of the statistics (sharded: local)
    stats: _Stats  # on the part's first device; for "agc" stats[1] is the clipped unit count
    bound: Tensor | None  # the effective bound there (times grad_scale), None for "stats"
    above: Tensor | None  # clipped where the statistic exceeds this (bound - eps for norms)
    scale: Tensor | None  # the gradients are still multiplied by this (fused optimizer + AMP)
    shown: Tensor | None = None  # the unscaled bound (0-d or one per row), to log and record
    coefs: Tensor | None = None  # per-tensor coefficients, where the two-phase path made them
    lay: distributed.ShardLayout | None = None  # sharded parts
    _post: Tensor | None = None

    def clipped(self) -> Tensor | None:
        """0-d bool: whether any gradient was clipped (``None`` for monitoring).

        For ``"normalize"``: whether any gradient was scaled *down* (its norm exceeded the
        target), so that the clip rate says how often the target was exceeded.
        """
        norms, second, _, total = self.stats
        if self.kind in ("norm", "normalize_total"):
            return torch.gt(total, self.above)  # min(1, b / (total + eps)) < 1
        if self.kind in ("layer", "normalize"):
            return torch.gt(norms, self.above).any()
        if self.kind == "value":
            return torch.gt(second, self.above).any()
        if self.kind == "agc":
            return torch.gt(second, 0).any()
        return None

    @property
    def post_known(self) -> bool:
        """Whether the post-clip norm follows from the statistics (no second read)."""
        return self.kind not in ("value", "agc")

    def post_norm(self, p: float) -> Tensor:
        """The float64 total norm after the clip (a second read in ``"value"``/``"agc"``)."""
        if self._post is not None:
            return self._post
        norms, total = self.stats[0].to(_F64), self.stats[3].to(_F64)
        if self.kind == "stats":
            post = total
        elif not self.post_known:
            if self.lay is not None:  # a second read of the shards, reduced (all ranks)
                lay = self.lay
                post = distributed.layout_total(lay, distributed._op_stats(lay, p)[0], p)
            else:
                totals = [OPS["grad_stats"](gs, p)[3].to(total.device, _F64) for gs in self.grads]
                post = _pnorm(torch.stack(totals), p)
        else:
            coefs = self.coefs
            if coefs is None:
                assert self.bound is not None
                coefs = _coefs(self.kind, self.bound, self.stats)
            post = _pnorm(norms * coefs, p)
        self._post = post
        return post


def _run_part(
    job: _Job,
    p: float,
    bound: float | Tensor | None,
    *,
    grad_scale: Tensor | None,
    error_if_nonfinite: bool,
    pre: _Stats | None = None,
    with_max_abs: bool = False,
    agc_eps: float = AGC_EPS,
) -> _Part:
    """Clip one part in place (or only measure it) and return its pre-clip statistics.

    ``bound`` is the unscaled threshold: a number, a 0-d float64 tensor, or (per-tensor
    adaptive bounds of ``"layer"``) one per row.  ``pre``: the part's statistics, already
    measured (an adaptive rule that needed them), reused by the two-phase and sharded paths.
    """
    kind, per_dev = job.kind, job.per_dev
    d0 = per_dev[0][0]
    names = job.names
    grads = [gs for _, gs, *_ in per_dev]
    b = above = shown = None
    if bound is not None and kind not in ("stats", "agc"):
        margin = 0.0 if kind == "value" else EPS
        if isinstance(bound, Tensor):
            shown = bound.to(d0, _F64)
            above0 = shown - margin
        else:
            shown = _bound_tensor(bound, d0)
            above0 = _bound_tensor(bound - margin, d0)
        if grad_scale is None:
            b, above = shown, above0
        else:
            b = shown * grad_scale.to(d0)
            above = b - margin
    for d, *_ in per_dev:
        if d not in _KERNEL_CHECKED:
            warn_if_fallback(d)
            _KERNEL_CHECKED.add(d)
    if job.lay is not None:
        return _run_sharded(
            job,
            p,
            b=b,
            above=above,
            shown=shown,
            grad_scale=grad_scale,
            pre=pre,
            with_max_abs=with_max_abs,
        )
    if _needs_two_phase(kind, per_dev):
        assert b is not None
        stats = pre if pre is not None else _measure(job, p, with_max_abs)
        coefs = _coefs(kind, b, stats)
        k = 0
        for d, gs, *_ in per_dev:
            for g, c in zip(gs, coefs[k : k + len(gs)].to(d).unbind(0)):
                reference._scale_(g, c)  # the kernels' rounding; skips c == 1 on the CPU
            k += len(gs)
        return _Part(kind, names, grads, stats, b, above, grad_scale, shown, coefs)
    results = []
    for d, gs, _, ps, _ in per_dev:
        bd = None if b is None else b.to(d)
        if kind == "norm":
            results.append(OPS["clip_norm"](gs, bd, p, EPS, error_if_nonfinite))
        elif kind == "layer":
            if bd.dim() == 0:  # type: ignore[union-attr]
                results.append(OPS["clip_norm_per_layer"](gs, bd, p, EPS))
            else:  # one adaptive bound per tensor: one call each (a read; a write if clipped)
                outs = [
                    OPS["clip_norm_per_layer"]([g], bi, p, EPS)
                    for g, bi in zip(gs, bd.unbind(0))  # type: ignore[union-attr]
                ]
                n = torch.cat([o[0] for o in outs])
                results.append(
                    (
                        n,
                        torch.cat([o[1] for o in outs]),
                        torch.cat([o[2] for o in outs]),
                        _pnorm(n.to(_F64), p),
                    )
                )
        elif kind == "value":
            results.append(OPS["clip_value"](gs, bd, p))
        elif kind == "normalize":
            results.append(OPS["normalize_per_layer"](gs, bd, p, EPS))
        elif kind == "agc":
            assert isinstance(bound, float)
            weights = [q.detach() for q in ps]
            results.append(OPS["adaptive_clip"](gs, weights, bound, agc_eps, p))
        else:
            results.append(OPS["grad_stats"](gs, p))
    stats = _combine(results, p, d0)
    return _Part(kind, names, grads, stats, b, above, grad_scale, shown)


def _run_sharded(
    job: _Job,
    p: float,
    *,
    b: Tensor | None,
    above: Tensor | None,
    shown: Tensor | None,
    grad_scale: Tensor | None,
    pre: _Stats | None,
    with_max_abs: bool,
) -> _Part:
    """A sharded part: the op on the local shards, the statistics reduced, the shards scaled."""
    lay = job.lay
    assert lay is not None
    local = lay.local
    kind = job.kind
    if kind == "value":
        assert b is not None
        st = OPS["clip_value"](local, b.to(lay.device), p) if local else _empty_stats(lay.device)
        stats = _global_stats(lay, st, p, True)  # the clip rate needs the global max-abs
        return _Part(kind, job.names, [local], stats, b, above, grad_scale, shown, lay=lay)
    stats = pre if pre is not None else _measure(job, p, with_max_abs)
    if kind == "stats":
        return _Part(kind, job.names, [local], stats, None, None, grad_scale, lay=lay)
    assert b is not None
    b = b.to(stats[0].device)
    coefs = _coefs(kind, b, stats)
    _scale_local(local, coefs.to(lay.device))
    return _Part(kind, job.names, [local], stats, b, above, grad_scale, shown, coefs, lay)


def _scale_local(tensors: Sequence[Tensor], coefs: Tensor) -> None:
    """Multiply tensor ``i`` in place by ``coefs[i]`` (float64, on their device).

    On the CPU the coefficients are read on the host (free there) and a tensor whose
    coefficient is exactly 1 is not written; elsewhere nothing is read on the host.  Unlike
    :func:`gradstab.distributed.scale_each_`, which serves clipping and skips every
    coefficient ``>= 1``, coefficients above 1 (``"normalize"`` scales up) are applied.
    """
    if not tensors:
        return
    cs = coefs.unbind(0)
    if tensors[0].device.type == "cpu":
        keep = [i for i, c in enumerate(coefs.tolist()) if c != 1.0]  # NaN is kept
        if keep:
            torch._foreach_mul_([tensors[i] for i in keep], [cs[i] for i in keep])
        return
    torch._foreach_mul_(list(tensors), list(cs))


def _unit_norm(
    unit: _Unit,
    jobs: Sequence[_Job],
    stats: Sequence[_Stats],
    scale: Tensor | None,
    cache: dict,
) -> Tensor:
    """What the unit's adaptive threshold tracks, unscaled: total, per-tensor or per-part norms.

    Tensors (or modules) without a gradient this step are NaN, which the threshold ignores.
    """
    if unit.tracks == "total":
        g = stats[0][3]
    elif unit.tracks == "tensors":
        norms = stats[0][0]
        idx = jobs[0].index
        n = len(unit.params)
        if idx != list(range(n)):
            full = torch.full((n,), math.nan, dtype=norms.dtype, device=norms.device)
            g = full.index_copy_(0, _cached_index(cache, idx, norms.device), norms)
        else:
            g = norms
    else:  # "parts": one norm per module
        dev = stats[0][3].device
        totals = torch.stack([s[3].to(dev, _F64) for s in stats])
        m = len(unit.parts)
        pos = [job.part for job in jobs]
        if pos != list(range(m)):
            full = torch.full((m,), math.nan, dtype=_F64, device=dev)
            g = full.index_copy_(0, _cached_index(cache, pos, dev), totals)
        else:
            g = totals
    if scale is not None:
        g = g.to(_F64) / scale.to(g.device, _F64)
    return g


def _job_bound(unit: _Unit, job: _Job, b: Tensor, cache: dict) -> Tensor:
    """The part of the unit's adaptive bound ``b`` that applies to ``job``'s rows."""
    if b.dim() == 0 or unit.tracks == "total":
        return b
    if unit.tracks == "parts":
        return b[job.part]
    idx = job.index
    if idx == list(range(len(unit.params))):
        return b
    return b.index_select(0, _cached_index(cache, idx, b.device))


def _run_unit(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    unit: _Unit,
    jobs: Sequence[_Job],
    *,
    grad_scale: Tensor | None,
    error_if_nonfinite: bool,
    with_max_abs: bool,
) -> tuple[list[_Part], AdaptiveThreshold | None]:
    """Clip the parts of one unit; an adaptive threshold is consulted and updated once."""
    p = cfg.norm_type
    kw = {
        "grad_scale": grad_scale,
        "error_if_nonfinite": error_if_nonfinite,
        "with_max_abs": with_max_abs,
        "agc_eps": cfg.agc_eps,
    }
    if not isinstance(unit.bound, AdaptiveThreshold):
        return [_run_part(job, p, unit.bound, **kw) for job in jobs], None  # type: ignore[arg-type]
    thr = state.threshold(cfg, unit.key)
    if thr.needs_norm:
        pre = [_measure(job, p, with_max_abs) for job in jobs]
        g = _unit_norm(unit, jobs, pre, grad_scale, plan.cache)
        b = thr.threshold(g)
    else:
        pre = [None] * len(jobs)
        b = thr.threshold(device=jobs[0].per_dev[0][0])
    if unit.tracks == "tensors" and b.dim() == 0:
        b = b.expand(len(unit.params))  # one bound per tensor, to log per parameter
    parts = [
        _run_part(job, p, _job_bound(unit, job, b, plan.cache), pre=pr, **kw)  # type: ignore[arg-type]
        for job, pr in zip(jobs, pre)
    ]
    if not thr.needs_norm:
        g = _unit_norm(unit, jobs, [part.stats for part in parts], grad_scale, plan.cache)
    thr.update(g)
    return parts, thr


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


def _find_nonfinite(jobs: Sequence[_Job], p: float, step: int | None) -> RuntimeError | None:
    """The error naming the first non-finite gradient of ``jobs``, if any (read-only).

    Sharded parts count across ranks, so every rank raises the same error.
    """
    counts: list[int] = []
    names: list[str] = []
    for job in jobs:
        if job.lay is not None:
            counts += _measure(job, p, False)[2].tolist()  # host read: "raise" asked for it
            names += job.names
            continue
        for _, gs, ns, *_ in job.per_dev:
            counts += OPS["grad_stats"](gs, p)[2].tolist()  # host read: "raise" asked for it
            names += ns
    return _nonfinite_error(counts, names, step) if any(counts) else None


def _host_read_is_free(parts: Sequence[_Part]) -> bool:
    """Whether reading a flag on the host costs no device synchronization (all on the CPU)."""
    return all(gs[0].device.type == "cpu" for part in parts for gs in part.grads if gs)


def _unit_key_suffix(key: str) -> str:
    return "" if key == "all" else "_" + key


def clip_step(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    *,
    log: bool,
    grad_scale: Tensor | None = None,
    scaler_skips: bool = False,
    step: int | None = None,
    history: GradHistory | None = None,
    history_step: int | None = None,
) -> tuple[bool, dict[str, float] | None]:
    """Clip, count and apply the non-finite policy for one optimizer step.

    Args:
        cfg: the validated options.
        state: the optimizer's counters and adaptive thresholds (updated in place).
        plan: from :func:`build_plan` for the optimizer's current param groups.
        log: build and return the metrics (one host read).  With sharded gradients every
            rank must pass the same ``log`` (the metrics may need collectives).
        grad_scale: the gradients are still multiplied by this 0-d device tensor (a fused
            optimizer under a GradScaler, which unscales inside ``step()``): the thresholds
            are multiplied by it and the statistics divided by it, so the clip is that of the
            unscaled gradients (up to ``eps``) and adaptive thresholds see unscaled norms.
            Not for ``"value"`` and ``"agc"`` modes (unscale first: clamping would turn an
            overflowed scaled gradient into a finite one the scaler cannot see, and AGC
            compares gradients with weights).
        scaler_skips: a GradScaler skips this step if the gradients are non-finite: the
            non-finite policy is left to it, and such steps are counted as skipped.
        step: the step number for error messages.
        history: a :class:`~gradstab.GradHistory` to record this step into (on the device,
            from the statistics the ops returned), or ``None``.
        history_step: the step number of the history's row (steps recorded twice merge).

    Returns:
        ``(skip, metrics)``: ``skip`` is True when the ``"skip"`` policy wants the optimizer
        step not to happen; ``metrics`` is ``None`` unless ``log``.

    Raises:
        RuntimeError: with ``nonfinite="raise"``, naming the first parameter whose gradient
            holds a NaN/Inf; no gradient has been changed then.
    """
    p = cfg.norm_type
    jobs = _jobs(cfg, plan)
    with_max_abs = cfg.mode == "value" or cfg.history > 0 or (log and cfg.log_per_layer)

    check = cfg.nonfinite == "raise" and not scaler_skips
    # One norm-clipped job in one fused op: its kernel checks the total before writing anything
    # (error_if_nonfinite).  Otherwise a read-only check must come before any gradient changes.
    kernel_checks = (
        check
        and len(jobs) == 1
        and jobs[0].kind == "norm"
        and jobs[0].lay is None
        and not _needs_two_phase("norm", jobs[0].per_dev)
    )
    if check and not kernel_checks:
        err = _find_nonfinite(jobs, p, step)
        if err is not None:
            raise err
    parts: list[_Part] = []
    unit_logs: list[tuple[_Unit, list[_Part], AdaptiveThreshold | None]] = []
    by_unit: dict[int, list[_Job]] = {}
    for job in jobs:
        by_unit.setdefault(id(job.unit), []).append(job)
    try:
        for ujobs in by_unit.values():
            uparts, thr = _run_unit(
                cfg,
                state,
                plan,
                ujobs[0].unit,
                ujobs,
                grad_scale=grad_scale,
                error_if_nonfinite=kernel_checks,
                with_max_abs=with_max_abs,
            )
            parts += uparts
            unit_logs.append((ujobs[0].unit, uparts, thr))
    except RuntimeError as exc:
        err = _find_nonfinite(jobs, p, step) if kernel_checks else None
        if err is not None:  # the kernel refused before writing: name the parameter
            raise err from exc
        raise  # not about a NaN/Inf (or the norm overflowed): the kernel's own message

    state.steps += 1
    state.window_steps += 1
    if not parts:
        return False, (_metrics(cfg, state, [], [], zeroed=False) if log else None)

    dev0 = parts[0].stats[0].device
    if len(parts) == 1:
        flag = parts[0].stats[2].any()
    else:
        flag = torch.stack([part.stats[2].any().to(dev0) for part in parts]).any()
    clipped = None
    for part in parts:
        c = part.clipped()
        if c is not None:
            clipped = c.to(dev0) if clipped is None else clipped | c.to(dev0)
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
                        if gs:
                            torch._foreach_zero_(gs)
        else:  # no host read: a masked fill of every gradient
            for part in parts:
                for gs in part.grads:
                    if not gs:
                        continue
                    f = flag.to(gs[0].device)
                    for g in gs:
                        g.masked_fill_(f, 0)
            zeroed = flag
    elif cfg.nonfinite == "skip" and not scaler_skips:
        skip = bool(flag)  # one host read per step: the optimizer step happens or not
        if skip:
            state.skipped_steps += 1
    if history is not None:
        _record(
            cfg,
            history,
            plan,
            parts,
            unit_logs,
            zeroed=skip or zeroed,
            skipped=flag if scaler_skips else skip,
            scale=grad_scale,
            step=history_step,
        )
    if not log:
        return skip, None
    return skip, _metrics(cfg, state, parts, unit_logs, zeroed=skip or zeroed)


def _scalar_threshold(unit: _Unit, uparts: Sequence[_Part]) -> Tensor | None:
    """The unit's bound when it is one number (0-d), else ``None``."""
    if unit.kind in ("stats", "agc", "normalize", "normalize_total") or not uparts:
        return None
    if isinstance(unit.bound, AdaptiveThreshold) and unit.tracks != "total":
        return None  # one bound per tensor or module
    shown = uparts[0].shown
    if shown is None or shown.dim() != 0:
        return None
    return shown


def _post_total(parts: Sequence[_Part], p: float, zeroed: bool | Tensor) -> Tensor:
    dev0 = parts[0].stats[0].device
    posts = [part.post_norm(p).to(dev0, _F64) for part in parts]
    post = posts[0] if len(posts) == 1 else _pnorm(torch.stack(posts), p)
    if isinstance(zeroed, Tensor):
        post = torch.where(zeroed.to(dev0), torch.zeros_like(post), post)
    elif zeroed:
        post = torch.zeros_like(post)
    return post


def _record(
    cfg: ClipConfig,
    history: GradHistory,
    plan: Plan,
    parts: Sequence[_Part],
    unit_logs: Sequence[tuple[_Unit, list[_Part], AdaptiveThreshold | None]],
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
    stats_list: list[_Stats] = []
    names: list[str] = []
    grads: list[Tensor] = []
    for part in parts:
        n, m, c, t = part.stats
        if part.kind == "agc":  # the op returns clipped-unit counts, not max-abs
            m = torch.full_like(n, math.nan)
        flat = [g for gs in part.grads for g in gs]
        sel = [i for i, nm in enumerate(part.names) if nm in known]
        if not sel:
            continue
        if len(sel) < len(part.names):
            idx = _cached_index(plan.cache, sel, n.device)
            n, m, c = n.index_select(0, idx), m.index_select(0, idx), c.index_select(0, idx)
            flat = [flat[i] for i in sel]
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


def _metrics(
    cfg: ClipConfig,
    state: ClipState,
    parts: list[_Part],
    unit_logs: Sequence[tuple[_Unit, list[_Part], AdaptiveThreshold | None]],
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
        pre = pre_l[0] if len(pre_l) == 1 else _pnorm(torch.stack(pre_l), p)
        post = _post_total(parts, p, zeroed)
        if parts[0].scale is not None:
            post = post / parts[0].scale.to(dev0, _F64)
        coef = torch.where(pre > 0, post / pre, torch.ones_like(pre))
        blocks: list[tuple[list[str], Tensor]] = [
            ([keys["total"], keys["post"], keys["coef"]], torch.stack((pre, post, coef))),
            (["pending"] * 3, state.pending.to(dev0, _F64)),  # type: ignore[union-attr]
        ]
        # thresholds: the bound in force and an adaptive threshold's statistics
        for unit, uparts, thr in unit_logs:
            sfx = _unit_key_suffix(unit.key)
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


def _per_layer_blocks(
    blocks: list[tuple[list[str], Tensor]],
    keys: Mapping[str, str],
    unit: _Unit,
    *,
    part: _Part,
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
