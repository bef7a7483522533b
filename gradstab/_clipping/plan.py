"""Which gradients each clipping unit holds (:func:`build_plan` -> :class:`Plan`), cached while the
optimizer's param groups do not change.

Example:
    >>> import torch
    >>> from gradstab._clipping import build_plan, make_config
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> cfg = make_config("demo", max_norm=1.0)
    >>> plan = build_plan(cfg, [{"params": [w]}], {id(w): "w"}, None, "demo")
    >>> len(plan.units)
    1
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gradstab import distributed
from gradstab.agc_units import agc_unit_dims, unit_dims

if TYPE_CHECKING:
    pass
from gradstab._clipping.config import Bound, ClipConfig, process_group_of

# ------------------------------------------------------------------------------ plan


@dataclass
class Unit:
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
    # "agc": id(param) -> its unit axis, where not 0 (agc_unit_dim)
    unit_dims: dict[int, int] = field(default_factory=dict, repr=False)

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
    units: list[Unit]
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
    *,
    module: torch.nn.Module | None = None,
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
        module: the model, when known: ``agc_unit_dim="auto"`` reads its layers' layouts.

    Returns:
        The :class:`Plan`.

    Raises:
        ValueError: a ``{group: threshold}`` dict names a group the optimizer lacks; mode
            ``"agc"`` or ``history_extras`` with sharded parameters.

    Example:
        >>> from gradstab._clipping import make_config
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
    axes: dict[int, int] = {}
    if cfg.mode == "agc":
        spec = cfg.agc_unit_dim
        if spec == "auto":
            spec = agc_unit_dims(module) if module is not None else 0
        dims = unit_dims(every, spec, f"{owner} (agc_unit_dim)")  # type: ignore[arg-type]
        axes = {id(p): d for p, d in zip(every, dims) if d}

    def unit(b: Bound | None, ps: list[Tensor], ns: list[str], key: str) -> Unit:
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
            return Unit(b, ps, ns, list(by_module.values()), key, kind, tracks)
        out = Unit(b, ps, ns, [list(range(len(ps)))], key, kind, tracks)
        if kind == "agc":
            out.unit_dims = {id(p): axes[id(p)] for p in ps if id(p) in axes}
        return out

    if isinstance(bound, dict):
        units = [unit(bound.get(gi), ps, ns, f"group{gi}") for gi, (ps, ns) in enumerate(groups)]
    else:
        units = [unit(bound, every, [n for g in groups for n in g[1]], "all")]
    if excluded[0]:
        units.append(
            Unit(None, excluded[0], excluded[1], [list(range(len(excluded[0])))], "excluded")
        )
    return Plan(plan_key(param_groups), units, every, sharded, group)


def unit_key_suffix(key: str) -> str:
    return "" if key == "all" else "_" + key
