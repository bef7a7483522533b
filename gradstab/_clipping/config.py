"""The options of :class:`gradstab.GradStabCallback` and :class:`gradstab.GradStabOptimizer`,
checked once (:func:`make_config` -> :class:`ClipConfig`), and the metric names they log.

Example:
    >>> from gradstab._clipping.config import make_config
    >>> make_config("demo", mode="norm", max_norm=1.0).mode
    'norm'
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

from torch import Tensor

from gradstab._common import check_flag, check_norm_type
from gradstab.adaptive import AdaptiveThreshold

if TYPE_CHECKING:
    pass


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
    agc_unit_dim: object = "auto"  # "auto", an int, {param: dim} or param -> dim (agc_units)
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


def _check_unit_dim(owner: str, value: object) -> object:
    """``agc_unit_dim`` as given (``None``: ``"auto"``); the axes are checked per parameter
    when the plan is built (:func:`gradstab.agc_units.unit_dims`)."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, str) or isinstance(value, bool):
        raise ValueError(
            f"{owner}: agc_unit_dim must be 'auto', an int, a mapping {{parameter: dim}} or a "
            f"callable parameter -> dim; got {value!r}"
        )
    if isinstance(value, numbers.Integral) or isinstance(value, Mapping) or callable(value):
        return value
    raise TypeError(
        f"{owner}: agc_unit_dim must be 'auto', an int, a mapping {{parameter: dim}} or a "
        f"callable parameter -> dim; got {value!r}"
    )


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
    agc_unit_dim: object = None,
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
        agc_unit_dim: the unit axis of ``"agc"`` (default ``"auto"``: from the model's layers
            by :func:`gradstab.agc_unit_dims` where the model is known, else dim 0), an int,
            a mapping ``{parameter: dim}`` or a callable ``parameter -> dim``.
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
        agc_opts = (("agc_eps", agc_eps), ("agc_exclude", agc_exclude))
        for name, value in (*given.items(), *agc_opts, ("agc_unit_dim", agc_unit_dim)):
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
            agc_opts = (("agc_eps", agc_eps), ("agc_exclude", agc_exclude))
            for name, value in (*agc_opts, ("agc_unit_dim", agc_unit_dim)):
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
        agc_unit_dim=_check_unit_dim(owner, agc_unit_dim),
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
