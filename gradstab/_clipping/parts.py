"""One part of one clipping unit through the ops: gradients grouped by device, one fused op per
device (or the two-phase path: statistics, combined norm, coefficients, scaling), sharded
gradients combined across ranks, and the pre/post-clip statistics each part returns.

Example:
    >>> from gradstab._clipping.parts import needs_two_phase
    >>> callable(needs_two_phase)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstab import distributed, reference
from gradstab._common import EPS
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS
from gradstab.adaptive import AdaptiveThreshold
from gradstab.agc_units import unit_axis_first

if TYPE_CHECKING:
    pass
from gradstab._clipping.config import AGC_EPS, ClipConfig
from gradstab._clipping.plan import Plan, Unit
from gradstab._clipping.state import ClipState

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


def pnorm(v: Tensor, p: float) -> Tensor:
    """Overflow-safe p-norm of a 1-D float64 vector of non-negative numbers (0 if empty)."""
    if v.numel() == 0:
        return torch.zeros((), dtype=_F64, device=v.device)
    m = v.amax()
    if math.isinf(p):
        return m
    s = torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))
    return s * (v / s).pow(p).sum().pow(1.0 / p)


def cached_index(cache: dict, idx: Sequence[int], device: torch.device) -> Tensor:
    """An int64 index tensor on ``device``, made once per plan (no copy to the device per step)."""
    key = ("index", tuple(idx), device)
    t = cache.get(key)
    if t is None:
        t = cache[key] = torch.tensor(list(idx), dtype=torch.int64, device=device)
    return t


# device, gradients, names, parameters, indices into the unit's params
_PerDevice = list[tuple[torch.device, list[Tensor], list[str], list[Tensor], list[int]]]
Stats = tuple[Tensor, Tensor, Tensor, Tensor]  # norms [T], max_abs [T], nonfinite [T], total []


def _part_grads(unit: Unit, pi: int) -> _PerDevice:
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
class Job:
    """One part of one unit, with this step's gradients."""

    unit: Unit
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


def make_jobs(cfg: ClipConfig, plan: Plan) -> list[Job]:
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
            jobs.append(Job(unit, pi, per_dev, lay))
    return jobs


def needs_two_phase(kind: str, per_dev: _PerDevice) -> bool:
    """Whether a part's coefficients need statistics combined over pieces of its gradients.

    True for norm clipping over several devices, and for a module part of ``"normalize"``
    (no fused op rescales a group of tensors to their joint norm).  Sharded parts always take
    the two-phase path (:func:`_run_sharded`).
    """
    if kind == "normalize_total":
        return True
    return kind in ("norm", "layer", "normalize") and len(per_dev) > 1


def _combine(stats: Sequence[Stats], p: float, device: torch.device) -> Stats:
    """The statistics of all pieces (devices) of a part's gradients as one set, on ``device``.

    One piece is returned as the op gave it.  Several pieces are concatenated in their order,
    in float64, and the total is the p-norm of the per-tensor norms.
    """
    if len(stats) == 1:
        return stats[0]
    norms = torch.cat([s[0].to(device, _F64) for s in stats])
    max_abs = torch.cat([s[1].to(device, _F64) for s in stats])
    nonfinite = torch.cat([s[2].to(device) for s in stats])
    return norms, max_abs, nonfinite, pnorm(norms, p)


def _global_stats(
    lay: distributed.ShardLayout, stats: Stats, p: float, with_max_abs: bool
) -> Stats:
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


def _empty_stats(device: torch.device) -> Stats:
    z = torch.zeros((0,), device=device)
    return z, z.clone(), torch.zeros((0,), dtype=torch.int64, device=device), z.new_zeros(())


def measure(job: Job, p: float, with_max_abs: bool) -> Stats:
    """A part's pre-clip statistics (global for sharded parts), read-only."""
    if job.lay is not None:
        return _global_stats(job.lay, distributed._op_stats(job.lay, p), p, with_max_abs)
    d0 = job.per_dev[0][0]
    return _combine([OPS["grad_stats"](gs, p) for _, gs, *_ in job.per_dev], p, d0)


def _coefs(kind: str, b: Tensor, stats: Stats) -> Tensor:
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
class Part:
    """What one part's op calls returned: pre-clip statistics, in the order of ``names``."""

    kind: str  # "stats", "norm", "layer", "value", "agc", "normalize" or "normalize_total"
    names: list[str]
    grads: list[list[Tensor]]  # per device, in the order of the statistics (sharded: local)
    stats: Stats  # on the part's first device; for "agc" stats[1] is the clipped unit count
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
                post = pnorm(torch.stack(totals), p)
        else:
            coefs = self.coefs
            if coefs is None:
                assert self.bound is not None
                coefs = _coefs(self.kind, self.bound, self.stats)
            post = pnorm(norms * coefs, p)
        self._post = post
        return post


def _run_part(
    job: Job,
    p: float,
    bound: float | Tensor | None,
    *,
    grad_scale: Tensor | None,
    error_if_nonfinite: bool,
    pre: Stats | None = None,
    with_max_abs: bool = False,
    agc_eps: float = AGC_EPS,
) -> Part:
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
    if needs_two_phase(kind, per_dev):
        assert b is not None
        stats = pre if pre is not None else measure(job, p, with_max_abs)
        coefs = _coefs(kind, b, stats)
        k = 0
        for d, gs, *_ in per_dev:
            for g, c in zip(gs, coefs[k : k + len(gs)].to(d).unbind(0)):
                reference._scale_(g, c)  # the kernels' rounding; skips c == 1 on the CPU
            k += len(gs)
        return Part(kind, names, grads, stats, b, above, grad_scale, shown, coefs)
    if pre is not None and kind in ("norm", "layer"):  # measured: scale, no second read
        if error_if_nonfinite and not bool(torch.isfinite(pre[3])):  # host read: "raise"
            raise RuntimeError(  # the caller names the parameter; nothing was written
                f"gradstab: the total norm of the gradients is non-finite ({float(pre[3])})"
            )
        _scale_by_norms(kind, grads, b, pre)
        return Part(kind, names, grads, pre, b, above, grad_scale, shown)
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
                        pnorm(n.to(_F64), p),
                    )
                )
        elif kind == "value":
            results.append(OPS["clip_value"](gs, bd, p))
        elif kind == "normalize":
            results.append(OPS["normalize_per_layer"](gs, bd, p, EPS))
        elif kind == "agc":
            assert isinstance(bound, float)
            axes = job.unit.unit_dims
            ags, aws = unit_axis_first(
                gs, [q.detach() for q in ps], [axes.get(id(q), 0) for q in ps]
            )
            results.append(OPS["adaptive_clip"](ags, aws, bound, agc_eps, p))
        else:
            results.append(OPS["grad_stats"](gs, p))
    stats = _combine(results, p, d0)
    return Part(kind, names, grads, stats, b, above, grad_scale, shown)


def _scale_by_norms(kind: str, grads: list[list[Tensor]], b: Tensor | None, pre: Stats) -> None:
    """Clip one device's gradients by the norms already measured (``clip_with_norm``: the
    coefficient of each bound and norm, a write only where it is below 1)."""
    assert b is not None and len(grads) == 1
    gs = grads[0]
    if kind == "norm":
        OPS["clip_with_norm"](gs, b.to(pre[3].device), pre[3], EPS)
        return
    bs = b.expand(len(gs)) if b.dim() == 0 else b
    for g, bi, ni in zip(gs, bs.unbind(0), pre[0].unbind(0)):
        OPS["clip_with_norm"]([g], bi, ni, EPS)


def _run_sharded(
    job: Job,
    p: float,
    *,
    b: Tensor | None,
    above: Tensor | None,
    shown: Tensor | None,
    grad_scale: Tensor | None,
    pre: Stats | None,
    with_max_abs: bool,
) -> Part:
    """A sharded part: the op on the local shards, the statistics reduced, the shards scaled."""
    lay = job.lay
    assert lay is not None
    local = lay.local
    kind = job.kind
    if kind == "value":
        assert b is not None
        st = OPS["clip_value"](local, b.to(lay.device), p) if local else _empty_stats(lay.device)
        stats = _global_stats(lay, st, p, True)  # the clip rate needs the global max-abs
        return Part(kind, job.names, [local], stats, b, above, grad_scale, shown, lay=lay)
    stats = pre if pre is not None else measure(job, p, with_max_abs)
    if kind == "stats":
        return Part(kind, job.names, [local], stats, None, None, grad_scale, lay=lay)
    assert b is not None
    b = b.to(stats[0].device)
    coefs = _coefs(kind, b, stats)
    _scale_local(local, coefs.to(lay.device))
    return Part(kind, job.names, [local], stats, b, above, grad_scale, shown, coefs, lay)


def _scale_local(tensors: Sequence[Tensor], coefs: Tensor) -> None:
    """Multiply tensor ``i`` in place by ``coefs[i]`` (float64, on their device): on the CPU
    a coefficient of exactly 1 writes nothing, elsewhere nothing is read on the host
    (:func:`gradstab.distributed.scale_each_`, whose rounding is the kernels')."""
    distributed.scale_each_(tensors, coefs)


def _unit_norm(
    unit: Unit,
    jobs: Sequence[Job],
    stats: Sequence[Stats],
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
            g = full.index_copy_(0, cached_index(cache, idx, norms.device), norms)
        else:
            g = norms
    else:  # "parts": one norm per module
        dev = stats[0][3].device
        totals = torch.stack([s[3].to(dev, _F64) for s in stats])
        m = len(unit.parts)
        pos = [job.part for job in jobs]
        if pos != list(range(m)):
            full = torch.full((m,), math.nan, dtype=_F64, device=dev)
            g = full.index_copy_(0, cached_index(cache, pos, dev), totals)
        else:
            g = totals
    if scale is not None:
        g = g.to(_F64) / scale.to(g.device, _F64)
    return g


def _job_bound(unit: Unit, job: Job, b: Tensor, cache: dict) -> Tensor:
    """The part of the unit's adaptive bound ``b`` that applies to ``job``'s rows."""
    if b.dim() == 0 or unit.tracks == "total":
        return b
    if unit.tracks == "parts":
        return b[job.part]
    idx = job.index
    if idx == list(range(len(unit.params))):
        return b
    return b.index_select(0, cached_index(cache, idx, b.device))


def run_unit(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    unit: Unit,
    jobs: Sequence[Job],
    *,
    grad_scale: Tensor | None,
    error_if_nonfinite: bool,
    with_max_abs: bool,
) -> tuple[list[Part], AdaptiveThreshold | None]:
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
    if thr.needs_norm:  # one read: the clip scales by the coefficient of the measured norm
        pre = [measure(job, p, with_max_abs) for job in jobs]
        g = _unit_norm(unit, jobs, pre, grad_scale, plan.cache)
        b = thr.threshold_and_update(g)
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
