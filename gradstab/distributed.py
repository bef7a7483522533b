"""Gradient statistics and clipping over sharded gradients (FSDP2 DTensors, ZeRO flat shards).

With sharded gradients every rank holds part of each gradient, so the norm one process would
compute on the full model is a reduction across ranks.  :func:`gradstab.grad_stats`,
:func:`gradstab.clip_grad_norm_` and :func:`gradstab.clip_grad_norm_per_layer_` hand such calls
to this module: gradients that are DTensors (as ``torch.distributed.fsdp.fully_shard`` makes
them), or any call with ``process_group=``.  Then:

1. :func:`layout` sorts the gradients: the local shard of a DTensor (what ``.to_local()``
   returns: the DTensor's own storage, so clipping it clips the DTensor) is *sharded* over
   the process groups of the mesh dimensions it is split on (``Shard``/``_StridedShard``),
   and *local* when it is replicated on every mesh dimension (a mesh dimension of size 1
   counts as replicated).  A plain tensor is sharded over ``process_group`` when one is
   given (ZeRO: each rank holds a disjoint part), unless it was marked with
   :func:`mark_replicated`; without ``process_group`` it is local.
   Local (replicated) tensors are counted once, not once per rank.  ``Partial`` placements
   (a reduction still pending) are refused.
2. One ``torch.ops.gradstab.grad_stats`` call reads every local shard once and returns
   per-shard statistics.
3. One all-reduce per sharding group (one in all for FSDP or ZeRO) combines the shards'
   sums of p-powers (``SUM``; ``MAX`` for ``p = inf``), in float64; the p-root follows on
   the device.  Per-tensor statistics (:func:`gradstab.grad_stats`, per-layer clipping) reduce
   one row per tensor, so each sharded tensor gets the norm of the full tensor, in the input
   order; :func:`gradstab.grad_stats` adds a second, ``MAX``, all-reduce for the max-abs (a
   maximum cannot travel in a sum).
4. Clipping multiplies the local shards by the coefficient from the global norm
   (``torch._foreach_mul_``; on CPU a coefficient of 1 writes nothing).

Nothing is read on the host on a CUDA device (the collectives are issued on the current
stream), except ``error_if_nonfinite=True``.  On CPU (gloo) reading a value is free and the
collectives are synchronous by nature.

Overflow safety across the reduction.  A shard's statistics come from the op, which never
overflows, but the *sum* of ``norm ** p`` over ranks can: ``(1e200) ** 2`` is not a float64.
Reducing ``(norm / m) ** p`` with a global scale ``m`` would need a ``MAX`` all-reduce first
(two collectives and a round of latency on every step).  Instead each value ``norm ** p`` is
split exactly into a power of two and a mantissa (``frexp``) and stored in one of a few
fixed *exponent bins* of 960 bits each (7 bins for ``p = 2`` and 5 for ``p = 1``, the last
one for inf and NaN): the bin layout depends on ``p`` alone, so every rank agrees on it
without communicating, a bin's sum of up to ``2**60`` values cannot overflow, and one
float64 ``SUM`` all-reduce over the bins adds numbers of any magnitude that float16,
bfloat16, float32 or float64 gradients can have.
The root is taken from the highest non-empty bin down.  For integer ``p`` the binning is
exact; the result differs from one process on the full gradients only by the rounding of
the per-shard norms (float32 for non-float64 gradients: well under 1e-6 relative).  NaN and
inf ride in a bin of their own, so they propagate as PyTorch's norm propagates them; with
``MAX`` a NaN is sent as a flag (``MAX`` drops NaNs on some backends).  Non-finite counts are
summed exactly (float64, up to ``2**53``).

Requirements (not checkable without extra communication): all ranks of a group make the
same calls in the same order, with the same parameters having gradients; for per-tensor
statistics with ``process_group`` every rank passes the same number of tensors, tensor ``i``
being each rank's part of the same logical tensor (zero-size parts allowed).  For the total
norm alone (:func:`gradstab.clip_grad_norm_`) any disjoint split works.

Size: over 800 lines, one job: sharded statistics must agree bit for bit with the
single-process ones, and the layout (which tensors are shards of what), the exponent-binned
reduction and the entry points that use them are easier to check side by side.

Example:
    >>> import torch, gradstab
    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
    >>> gradstab.distributed.mark_replicated(w)  # counted once with process_group=...
    >>> gradstab.distributed.is_replicated(w)
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch
from torch import Tensor

from gradstab import reference
from gradstab._common import GradStats, check_bound, collect_grads, is_dtensor, param_list
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS
from gradstab.reference import torch_nonfinite_message

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "ShardLayout",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "collect",
    "grad_stats",
    "is_dtensor",
    "is_replicated",
    "layout",
    "layout_stats",
    "layout_total",
    "mark_replicated",
    "nonfinite_message",
    "reduce_stats",
    "reduce_total",
    "result_dtype",
    "scale_",
    "scale_each_",
    "total_norm",
]

#: Attribute :func:`mark_replicated` sets on a parameter.
REPLICATED_ATTR = "_gradstab_replicated"

#: Width of one exponent bin (bits): a bin holds mantissas in ``[2**-p, 2**960)``, so the sum
#: of up to ``2**60`` of them stays finite.  960 is divisible by 1..6, 8, 10, 12, 15, 16, ...
#: which keeps the power-of-two arithmetic exact for those ``p``.
_BIN_BITS = 960
#: ``frexp`` exponents of positive finite float64 values (mantissa in ``[0.5, 1)``).
_EXP_MIN, _EXP_MAX = -1073, 1024

Groups = tuple["ProcessGroup", ...]


# --------------------------------------------------------------------------- marking, detection


def mark_replicated(*tensors: Tensor) -> None:
    """Mark parameters as replicated on every rank of ``process_group``: counted once.

    With ``process_group=`` the plain (non-DTensor) gradients are taken as disjoint shards
    whose statistics are summed over the group; a parameter whose gradient is instead the
    same on every rank (a ZeRO setup that keeps small tensors, e.g. norms and biases,
    replicated) must be marked, or it would count ``world_size`` times.  DTensors are never
    marked: their placements say it.  Marking is idempotent and survives ``.grad`` being
    replaced (it is stored on the parameter).

    Args:
        *tensors: the parameters (tensors whose ``.grad`` gradstab reads).

    Example:
        >>> import torch, gradstab
        >>> ln = torch.nn.LayerNorm(4)
        >>> gradstab.distributed.mark_replicated(*ln.parameters())
    """
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(
                f"gradstab.distributed.mark_replicated: argument {i} is a "
                f"{type(t).__name__}, not a tensor (pass the parameters themselves)"
            )
        if is_dtensor(t):
            raise ValueError(
                "gradstab.distributed.mark_replicated: argument "
                f"{i} is a DTensor; its placements already say whether it is replicated"
            )
        setattr(t, REPLICATED_ATTR, True)


def is_replicated(t: Tensor) -> bool:
    """Whether :func:`mark_replicated` marked ``t``.

    Example:
        >>> import torch, gradstab
        >>> gradstab.distributed.is_replicated(torch.zeros(1))
        False
    """
    return bool(getattr(t, REPLICATED_ATTR, False))


def collect(parameters: Any, fn: str) -> tuple[list[Tensor], list[bool]]:
    """The gradients of ``parameters`` (``None`` skipped) and their :func:`mark_replicated` marks.

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.zeros(1)); w.grad = torch.ones(1)
        >>> gradstab.distributed.collect([w], "demo")
        ([tensor([1.])], [False])
    """
    params = param_list(parameters, fn)
    grads = collect_grads(params, fn)
    marks = [is_replicated(p) for p in params if p.grad is not None]
    return grads, marks


def _check_group(group: object, fn: str) -> None:
    import torch.distributed as dist  # noqa: PLC0415

    if not dist.is_available():
        raise RuntimeError(
            f"{fn}: process_group was given but this PyTorch build has no torch.distributed"
        )
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"{fn}: process_group must be a torch.distributed.ProcessGroup (or None), "
            f"got {group!r} of type {type(group).__name__}"
        )
    if not dist.is_initialized():
        raise RuntimeError(
            f"{fn}: process_group was given but torch.distributed is not initialized; "
            "call torch.distributed.init_process_group first"
        )


def _group_device(group: ProcessGroup) -> torch.device:
    """The device collectives of ``group`` use when this rank has no tensor to take it from."""
    import torch.distributed as dist  # noqa: PLC0415

    if "nccl" in str(dist.get_backend(group)).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class ShardLayout:
    """How a list of gradients is spread over ranks (see :func:`layout`).

    Attributes:
        local: ``[T]`` the tensors this rank reads and clips, in input order: the local
            tensors of DTensors (their storage: scaling them scales the DTensor) and plain
            tensors.
        domain: ``[T]`` per tensor, the index into ``groups`` it is sharded over, or ``-1``
            for a tensor that is whole on this rank (replicated or not distributed).
        groups: per sharding domain, the process groups to reduce over (in order).
        runs: ``(domain, start, stop)`` maximal runs of consecutive tensors of one domain.
        device: the device of the statistics and of the reduction buffers.
    """

    local: list[Tensor]
    domain: list[int]
    groups: list[Groups]
    runs: list[tuple[int, int, int]]
    device: torch.device


def _dtensor_groups(g: Tensor, i: int, n: int, fn: str) -> Groups:
    mesh = g.device_mesh
    groups = []
    for dim, pl in enumerate(g.placements):
        if pl.is_partial():
            raise ValueError(
                f"{fn}: gradient {i} of {n} is a DTensor with placements {tuple(g.placements)}: "
                "a Partial placement means its reduction across ranks is still pending, so its "
                "norm is not defined yet. Reduce it first (e.g. "
                "`p.grad = p.grad.redistribute(placements=[Replicate()] * mesh.ndim)`)"
            )
        if pl.is_replicate() or mesh.size(dim) == 1:
            continue
        groups.append(mesh.get_group(dim))  # Shard, _StridedShard: split along this mesh dim
    return tuple(groups)


def layout(
    grads: Sequence[Tensor],
    replicated: Sequence[bool] | None = None,
    process_group: ProcessGroup | None = None,
    fn: str = "gradstab",
) -> ShardLayout:
    """Sort gradients into local tensors and sharding domains.

    Args:
        grads: the gradients (DTensors and/or plain tensors).
        replicated: per gradient, whether its parameter was marked with
            :func:`mark_replicated` (plain tensors only); ``None``: none was.
        process_group: the group plain gradients are sharded over (ZeRO), or ``None``.
        fn: the public function's name, for error messages.

    Returns:
        The :class:`ShardLayout`.  With ``process_group`` its domain is domain 0 even when
        this rank holds no gradient, so every rank issues the same collectives.

    Example:
        >>> import torch, gradstab
        >>> lay = gradstab.distributed.layout([torch.ones(2)])
        >>> lay.domain, lay.groups
        ([-1], [])
    """
    if process_group is not None:
        _check_group(process_group, fn)
    n = len(grads)
    groups: list[Groups] = []
    index: dict[Groups, int] = {}
    if process_group is not None:
        groups.append((process_group,))
        index[(process_group,)] = 0
    local: list[Tensor] = []
    domain: list[int] = []
    seen: dict[tuple[int, tuple], Groups] = {}  # (mesh, placements) -> groups, per call
    for i, g in enumerate(grads):
        if is_dtensor(g):
            spec = (id(g.device_mesh), tuple(g.placements))
            key = seen.get(spec)
            if key is None:
                key = seen[spec] = _dtensor_groups(g, i, n, fn)
            # The local shard itself (``to_local()`` is the same storage through an autograd
            # function, ~20 us a call: too slow for thousands of parameters every step).
            lt = getattr(g, "_local_tensor", None)
            local.append(lt if lt is not None else g.to_local())
        else:
            marked = replicated is not None and replicated[i]
            key = (process_group,) if process_group is not None and not marked else ()
            local.append(g)
        if not key:
            domain.append(-1)
            continue
        if key not in index:
            index[key] = len(groups)
            groups.append(key)
        domain.append(index[key])
    runs: list[tuple[int, int, int]] = []
    for i, d in enumerate(domain):
        if runs and runs[-1][0] == d:
            runs[-1] = (d, runs[-1][1], i + 1)
        else:
            runs.append((d, i, i + 1))
    if local:
        device = local[0].device
    elif process_group is not None:
        device = _group_device(process_group)
    else:
        device = torch.device("cpu")
    return ShardLayout(local, domain, groups, runs, device)


# --------------------------------------------------------------------------- exponent bins


def _bin_range(p: float) -> tuple[int, int]:
    """``(lowest bin, number of bins)`` for ``p``; the last bin holds non-finite values."""
    lo = math.floor(_EXP_MIN * p / _BIN_BITS)
    hi = math.floor(_EXP_MAX * p / _BIN_BITS)
    return lo, hi - lo + 2


def _to_bins(x: Tensor, p: float) -> Tensor:
    """``x ** p`` (``x >= 0``, float64 ``[...]``) as exponent bins ``[..., nb]``.

    ``x = f * 2**k`` exactly; ``x ** p = f**p * 2**(k p)`` goes to bin ``b = floor(k p / 960)``
    as ``f**p * 2**(k p - 960 b)``, which lies in ``(2**-p, 2**960)``.  Non-finite ``x``
    (inf, NaN) goes, as is, to the last bin.
    """
    lo, nb = _bin_range(p)
    f, k = torch.frexp(x)
    kp = k.to(torch.float64) * p
    b = torch.floor(kp / _BIN_BITS).clamp(lo, lo + nb - 2)
    m = f.pow(p) * torch.exp2(kp - b * _BIN_BITS)
    finite = torch.isfinite(x)
    col = torch.where(finite, b - lo, torch.full_like(b, nb - 1)).to(torch.int64)
    m = torch.where(finite, m, x)
    out = torch.zeros((*x.shape, nb), dtype=torch.float64, device=x.device)
    return out.scatter_(-1, col.unsqueeze(-1), m.unsqueeze(-1))


def _ldexp(r: Tensor, e: Tensor) -> Tensor:
    """``r * 2**e`` for float64 ``r >= 0`` and integer-valued float64 ``e``, rounded once.

    ``2**e`` alone may under- or overflow where the product does not, so the exponent is
    applied in two exact halves.
    """
    f, k = torch.frexp(r)
    big = (k.to(torch.float64) + e).clamp(-2200.0, 2046.0)
    half = torch.floor(big / 2)
    return f * torch.exp2(half) * torch.exp2(big - half)


def _from_bins(s: Tensor, p: float) -> Tensor:
    """The p-root of the binned sums ``s`` (``[..., nb]``): norms ``[...]`` in float64.

    With ``top`` the highest non-empty bin, ``sum = fs * 2**ks`` (frexp, exact) of the bins
    scaled to it and ``E = ks + 960 (top + lo)`` (an integer), the norm is
    ``(fs * 2**r)**(1/p) * 2**q`` with ``E = q p + r``: nothing on the way can overflow.
    """
    lo, nb = _bin_range(p)
    fin, nonfinite = s[..., :-1], s[..., -1]
    idx = torch.arange(nb - 1, dtype=torch.float64, device=s.device)
    top = torch.where(fin > 0, idx, torch.zeros_like(idx)).amax(-1, keepdim=True)
    shift = (idx - top).clamp(max=0) * _BIN_BITS  # 2**shift <= 1: lower bins add in, scaled
    fs, ks = torch.frexp((fin * torch.exp2(shift)).sum(-1))
    big = ks.to(torch.float64) + (top.squeeze(-1) + lo) * _BIN_BITS
    q = torch.floor(big / p)
    root = (fs * torch.exp2(big - q * p)).pow(1.0 / p)  # one rounding (integer p: exact 2**r)
    norm = _ldexp(root, q)
    return torch.where(nonfinite != 0, nonfinite.pow(1.0 / p), norm)


# --------------------------------------------------------------------------- reductions


def _all_reduce(buf: Tensor, op: str, groups: Groups) -> Tensor:
    import torch.distributed as dist  # noqa: PLC0415

    red = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
    for g in groups:
        if dist.get_world_size(g) > 1:
            dist.all_reduce(buf, op=red, group=g)
    return buf


def _nan_to_zero(x: Tensor) -> Tensor:
    return torch.where(torch.isnan(x), torch.zeros_like(x), x)


def _max_with_nan(values: Tensor, groups: Groups) -> Tensor:
    """Elementwise MAX over ranks of non-negative ``values`` (float64), NaN-propagating."""
    k = values.numel()
    buf = torch.cat([_nan_to_zero(values).reshape(-1), torch.isnan(values).reshape(-1).double()])
    buf = _all_reduce(buf, "max", groups)
    out = torch.where(buf[k:] > 0, torch.full_like(buf[:k], math.nan), buf[:k])
    return out.reshape(values.shape)


def _as_groups(group: ProcessGroup | Sequence[ProcessGroup] | None) -> Groups:
    if group is None:
        return ()
    if isinstance(group, Sequence):
        return tuple(group)
    return (group,)


def _reduce_rows(
    norms: Tensor,
    max_abs: Tensor | None,
    nonfinite: Tensor | None,
    p: float,
    groups: Groups,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-row global statistics of rows sharded over ``groups``.

    Returns float64 norms, float64 max-abs (if given), int64 counts (if given) and, for
    finite ``p``, the reduced bins ``[K, nb]`` (for the total, without re-rounding).
    """
    k = norms.numel()
    n64 = norms.to(torch.float64)
    if math.isinf(p):
        gn = _max_with_nan(n64, groups)  # the inf-norm is the max-abs
        cnt = None
        if nonfinite is not None:
            cnt = _all_reduce(nonfinite.to(torch.float64), "sum", groups).to(torch.int64)
        return gn, (gn if max_abs is not None else None), cnt, None
    bins = _to_bins(n64, p)
    parts = [bins.reshape(-1)]
    if nonfinite is not None:
        parts.append(nonfinite.to(torch.float64))
    if max_abs is not None:
        parts.append(torch.isnan(max_abs).to(torch.float64))
    buf = _all_reduce(torch.cat(parts), "sum", groups)
    nb = bins.shape[-1]
    rbins = buf[: k * nb].reshape(k, nb)
    gn = _from_bins(rbins, p)
    off = k * nb
    cnt = gm = None
    if nonfinite is not None:
        cnt = buf[off : off + k].to(torch.int64)
        off += k
    if max_abs is not None:
        m = _all_reduce(_nan_to_zero(max_abs.to(torch.float64)), "max", groups)
        gm = torch.where(buf[off : off + k] > 0, torch.full_like(m, math.nan), m)
    return gn, gm, cnt, rbins


def reduce_total(
    norms: Tensor, norm_type: float, group: ProcessGroup | Sequence[ProcessGroup] | None
) -> Tensor:
    """The global p-norm of tensors split over ``group``, from this rank's per-part norms.

    Each rank passes the norms of its parts (any number, possibly none); parts are disjoint
    across ranks.  One float64 all-reduce (``SUM`` of exponent-binned p-powers; ``MAX`` for
    ``p = inf``), no host sync.  Every rank gets the same value.

    Args:
        norms: ``[K]`` p-norms of this rank's parts (the op's per-tensor norms).
        norm_type: p (``> 0``, ``inf`` allowed).
        group: a process group, a sequence of them (reduced over in turn), or ``None``.

    Returns:
        The float64 0-d total norm on ``norms``' device.

    Example:
        >>> import torch, gradstab
        >>> gradstab.distributed.reduce_total(torch.tensor([3.0, 4.0]), 2.0, None)
        tensor(5., dtype=torch.float64)
    """
    p = float(norm_type)
    groups = _as_groups(group)
    n64 = norms.to(torch.float64)
    if math.isinf(p):
        local = n64.amax() if n64.numel() else n64.new_zeros(())
        return _max_with_nan(local, groups)
    row = _all_reduce(_to_bins(n64, p).sum(0), "sum", groups)
    return _from_bins(row, p)


def reduce_stats(
    norms: Tensor,
    max_abs: Tensor | None,
    nonfinite: Tensor | None,
    norm_type: float,
    group: ProcessGroup | Sequence[ProcessGroup] | None,
) -> GradStats:
    """Global per-tensor statistics from every rank's statistics of its shards.

    Row ``i`` on each rank describes that rank's shard of logical tensor ``i`` (every rank
    passes the same number of rows).  One float64 ``SUM`` all-reduce combines the p-powers
    (exponent-binned, so nothing overflows), the non-finite counts and NaN flags; a second,
    ``MAX``, all-reduce combines the max-abs, only when ``max_abs`` is given.  No host sync.

    Args:
        norms: ``[K]`` p-norms of this rank's shards (from a ``torch.ops.gradstab`` op).
        max_abs: ``[K]`` max-abs of the shards, or ``None`` (then not reduced: result's
            ``max_abs`` is ``None``).
        nonfinite: ``[K]`` non-finite counts, or ``None`` (likewise).
        norm_type: p (``> 0``, ``inf`` allowed).
        group: a process group, a sequence of them (reduced over in turn), or ``None``
            (nothing to reduce: the tensors are whole on this rank).

    Returns:
        A :class:`gradstab.GradStats` of the full tensors, floating fields in ``norms``'
        dtype, plus the total norm over all rows.

    Example:
        >>> import torch, gradstab
        >>> s = gradstab.distributed.reduce_stats(
        ...     torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.0]),
        ...     torch.tensor([0, 0]), 2.0, None)
        >>> s.total_norm
        tensor(5.)
    """
    p = float(norm_type)
    rd = norms.dtype
    gn, gm, cnt, rbins = _reduce_rows(norms, max_abs, nonfinite, p, _as_groups(group))
    total = _total(p, [rbins] if rbins is not None else [], [gn])
    return GradStats(
        gn.to(rd),
        gm.to(rd) if gm is not None else None,
        cnt,
        total.to(rd),
    )


def _total(p: float, bins: list[Tensor], inf_parts: list[Tensor]) -> Tensor:
    """The float64 total norm from binned rows (finite ``p``) or norm pieces (``p = inf``)."""
    if math.isinf(p):
        parts = [x.reshape(-1) for x in inf_parts]
        allv = torch.cat(parts) if parts else torch.zeros((0,), dtype=torch.float64)
        return allv.amax() if allv.numel() else allv.new_zeros(())
    acc = bins[0].reshape(-1, bins[0].shape[-1]).sum(0)
    for b in bins[1:]:
        acc = acc + b.reshape(-1, b.shape[-1]).sum(0)
    return _from_bins(acc, p)


# --------------------------------------------------------------------------- layout-level stats


def _op_stats(lay: ShardLayout, p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op's per-tensor statistics of this rank's tensors (one read of each)."""
    if lay.local:
        warn_if_fallback(lay.device)
        return OPS["grad_stats"](lay.local, p)
    z = torch.zeros((0,), device=lay.device)
    return z, z.clone(), torch.zeros((0,), dtype=torch.int64, device=lay.device), z.new_zeros(())


def _gather_runs(x: Tensor, lay: ShardLayout, d: int) -> Tensor:
    pieces = [x[a:b] for dd, a, b in lay.runs if dd == d]
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat(pieces) if pieces else x[:0]


def _scatter_runs(lay: ShardLayout, local: Tensor, per_domain: list[Tensor]) -> Tensor:
    """Reassemble per-tensor values in input order from local values and per-domain values."""
    if len(lay.runs) == 1 and lay.runs[0][0] >= 0:
        return per_domain[lay.runs[0][0]]
    used = [0] * len(per_domain)
    pieces = []
    for d, a, b in lay.runs:
        if d < 0:
            pieces.append(local[a:b])
        else:
            pieces.append(per_domain[d][used[d] : used[d] + b - a])
            used[d] += b - a
    return torch.cat(pieces) if pieces else local


def layout_total(lay: ShardLayout, norms: Tensor, p: float) -> Tensor:
    """The float64 global total norm from the op's per-tensor ``norms`` of ``lay.local``.

    One all-reduce per sharding domain (one ``[nb]`` float64 buffer; ``[2]`` for inf).

    Example:
        >>> import torch, gradstab
        >>> lay = gradstab.distributed.layout([torch.tensor([3.0, 4.0])])
        >>> gradstab.distributed.layout_total(lay, torch.tensor([5.0]), 2.0)
        tensor(5., dtype=torch.float64)
    """
    n64 = norms.to(torch.float64)
    if math.isinf(p):
        parts = [_gather_runs(n64, lay, -1)]
        for d, groups in enumerate(lay.groups):
            part = _gather_runs(n64, lay, d)
            local = part.amax() if part.numel() else part.new_zeros(())
            parts.append(_max_with_nan(local, groups))
        return _total(p, [], parts)
    bins = _to_bins(n64, p)
    rows = [_gather_runs(bins, lay, -1)]
    for d, groups in enumerate(lay.groups):
        rows.append(_all_reduce(_gather_runs(bins, lay, d).sum(0), "sum", groups))
    return _total(p, rows, [])


def layout_stats(
    lay: ShardLayout,
    stats: tuple[Tensor, Tensor, Tensor, Tensor],
    p: float,
    with_max_abs: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Global per-tensor statistics, in input order, from the op's statistics of ``lay.local``.

    Args:
        lay: the :class:`ShardLayout`.
        stats: ``(norms, max_abs, nonfinite, total)`` from a ``torch.ops.gradstab`` op on
            ``lay.local`` (statistics of the shards).
        p: the norm type.
        with_max_abs: also reduce max-abs and non-finite counts (a second, ``MAX``,
            all-reduce per domain); ``False`` returns the local ones for those fields.

    Returns:
        ``(norms, max_abs, nonfinite, total)``: norms and max-abs in the stats' dtype,
        counts int64, and the float64 total norm.

    Example:
        >>> import torch, gradstab
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> lay = gradstab.distributed.layout(g)
        >>> gradstab.distributed.layout_stats(lay, torch.ops.gradstab.grad_stats(g, 2.0), 2.0)[3]
        tensor(5., dtype=torch.float64)
    """
    norms, max_abs, nonfinite, _ = stats
    rd = norms.dtype
    n64 = norms.to(torch.float64)
    gn, gm, gc, gb = [], [], [], []
    for d, groups in enumerate(lay.groups):
        rn, rm, rc, rb = _reduce_rows(
            _gather_runs(n64, lay, d),
            _gather_runs(max_abs, lay, d) if with_max_abs else None,
            _gather_runs(nonfinite, lay, d) if with_max_abs else None,
            p,
            groups,
        )
        gn.append(rn)
        gm.append(rm)
        gc.append(rc)
        gb.append(rb)
    loc = _gather_runs(n64, lay, -1)
    if math.isinf(p):
        total = _total(p, [], [loc, *gn])
    else:
        total = _total(p, [_to_bins(loc, p), *gb], [])
    out_n = _scatter_runs(lay, n64, gn).to(rd)
    if not with_max_abs or not lay.groups:
        return out_n, max_abs, nonfinite, total
    out_m = _scatter_runs(lay, max_abs.to(torch.float64), gm).to(rd)
    out_c = _scatter_runs(lay, nonfinite, gc)
    return out_n, out_m, out_c, total


# --------------------------------------------------------------------------- scaling


def _mul_on_cpu_(
    tensors: Sequence[Tensor], coefs: Sequence[Tensor], values: Sequence[float]
) -> None:
    """CPU: ``tensors[i] *= coefs[i]`` (0-d float64, value ``values[i]``) with the kernels'
    rounding: as PyTorch's ``mul_`` (float32 by the coefficient rounded to float32), except
    float32 where the coefficient is not a normal float32, multiplied in float64 and rounded
    once (the gradstab ops do the same)."""
    fast_t, fast_c = [], []
    for t, c, v in zip(tensors, coefs, values):
        if t.dtype == torch.float32 and not reference.scales_in_float(v):
            t.copy_(t.double() * v)
        else:
            fast_t.append(t)
            fast_c.append(c)
    if fast_t:
        torch._foreach_mul_(fast_t, fast_c)


def scale_(tensors: Sequence[Tensor], coef: Tensor) -> None:
    """Multiply every tensor in place by the 0-d ``coef`` (float64, on their device).

    On CPU the coefficient is read on the host (free there) and a coefficient of exactly 1
    writes nothing (any other, above 1 too, is applied); elsewhere the multiply is issued
    without a host read.  float16 and bfloat16 multiply in float32, float32 by the
    coefficient rounded to float32 (as ``torch.nn.utils.clip_grad_norm_`` does); on CPU,
    where the coefficient is not a normal float32 (below ``FLT_MIN``), float32 multiplies in
    float64 and rounds once, as the gradstab ops do (on other devices that needs a host read:
    there the float32-rounded coefficient is used).

    Example:
        >>> import torch, gradstab
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> gradstab.distributed.scale_(g, torch.tensor(0.5, dtype=torch.float64)); g[0]
        tensor([1.5000, 2.0000])
    """
    if not tensors:
        return
    if tensors[0].device.type == "cpu":
        value = float(coef)
        if value != 1.0:
            _mul_on_cpu_(tensors, [coef] * len(tensors), [value] * len(tensors))
        return
    # A 0-d tensor, not a Python float: with a float, foreach rounds it to float16 first.
    torch._foreach_mul_(list(tensors), coef)


def scale_each_(tensors: Sequence[Tensor], coefs: Tensor) -> None:
    """Multiply tensor ``i`` in place by ``coefs[i]`` (float64 ``[T]`` on their device).

    On CPU the coefficients are read on the host and tensors whose coefficient is exactly 1
    are not written (any other, above 1 too, is applied); elsewhere nothing is read on the host.
    Rounding as :func:`scale_`.

    Example:
        >>> import torch, gradstab
        >>> g = [torch.tensor([2.0]), torch.tensor([3.0])]
        >>> gradstab.distributed.scale_each_(g, torch.tensor([0.5, 1.0], dtype=torch.float64))
        >>> g
        [tensor([1.]), tensor([3.])]
    """
    if not tensors:
        return
    cs = coefs.unbind(0)
    if tensors[0].device.type == "cpu":
        values = coefs.tolist()
        keep = [i for i, c in enumerate(values) if c != 1.0]  # NaN is kept
        _mul_on_cpu_([tensors[i] for i in keep], [cs[i] for i in keep], [values[i] for i in keep])
        return
    torch._foreach_mul_(list(tensors), list(cs))


# --------------------------------------------------------------------------- public entry points


def _coef(bound: Union[float, Tensor], norm: Tensor, eps: float, fn: str) -> Tensor:
    """``min(1, bound / (norm + eps))`` in float64 on ``norm``'s device, NaN kept.

    ``bound`` is checked as :mod:`gradstab.functional` checks it: a number, or a 0-d tensor
    on the gradients' device (a CPU tensor is read on the host for free).
    """
    b = check_bound(bound, "max_norm", fn, norm.device)
    if isinstance(b, Tensor):
        b = b.to(torch.float64)
    return torch.clamp(b / (norm + eps), max=1.0)


def result_dtype(lay: ShardLayout) -> torch.dtype:
    """float64 if any local tensor is float64, else float32 (the ops' result dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in lay.local) else torch.float32


def grad_stats(
    grads: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    replicated: Sequence[bool] | None = None,
    process_group: ProcessGroup | None = None,
    fn: str = "gradstab.grad_stats",
) -> GradStats:
    """:func:`gradstab.grad_stats` over sharded gradients (see the module docstring).

    Example:
        >>> import torch, gradstab
        >>> gradstab.distributed.grad_stats([torch.tensor([3.0, 4.0])])[3]
        tensor(5.)
    """
    lay = layout(grads, replicated, process_group, fn)
    n, m, c, total = layout_stats(lay, _op_stats(lay, norm_type), norm_type)
    return GradStats(n, m, c, total.to(result_dtype(lay)))


def total_norm(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    replicated: Sequence[bool] | None = None,
    process_group: ProcessGroup | None = None,
    fn: str = "gradstab.get_total_norm",
) -> tuple[Tensor, Tensor, ShardLayout]:
    """The global total norm of sharded tensors: one read, one all-reduce per sharding domain.

    Returns:
        ``(total, nonfinite, layout)``: the float64 0-d total norm (the same on every rank),
        this rank's per-tensor non-finite counts, and the :class:`ShardLayout`.

    Example:
        >>> import torch, gradstab
        >>> gradstab.distributed.total_norm([torch.tensor([3.0, 4.0])])[0]
        tensor(5., dtype=torch.float64)
    """
    lay = layout(tensors, replicated, process_group, fn)
    norms, _, nonfinite, _ = _op_stats(lay, norm_type)
    return layout_total(lay, norms, norm_type), nonfinite, lay


def clip_grad_norm_(
    grads: Sequence[Tensor],
    max_norm: Union[float, Tensor],
    norm_type: float = 2.0,
    *,
    replicated: Sequence[bool] | None = None,
    eps: float = 1e-6,
    error_if_nonfinite: bool = False,
    process_group: ProcessGroup | None = None,
    fn: str = "gradstab.clip_grad_norm_",
) -> Tensor:
    """:func:`gradstab.clip_grad_norm_` over sharded gradients: one read, one all-reduce.

    Example:
        >>> import torch, gradstab
        >>> g = [torch.tensor([3.0, 4.0])]
        >>> gradstab.distributed.clip_grad_norm_(g, 1.0), g[0]
        (tensor(5.), tensor([0.6000, 0.8000]))
    """
    total, nonfinite, lay = total_norm(
        grads, norm_type, replicated=replicated, process_group=process_group, fn=fn
    )
    if error_if_nonfinite and not bool(torch.isfinite(total)):  # host read: the caller asked
        raise RuntimeError(nonfinite_message(norm_type, float(total), nonfinite, lay))
    scale_(lay.local, _coef(max_norm, total, eps, fn))
    return total.to(result_dtype(lay))


def clip_grad_norm_per_layer_(
    grads: Sequence[Tensor],
    max_norm: Union[float, Tensor],
    norm_type: float = 2.0,
    *,
    replicated: Sequence[bool] | None = None,
    eps: float = 1e-6,
    process_group: ProcessGroup | None = None,
    fn: str = "gradstab.clip_grad_norm_per_layer_",
) -> Tensor:
    """:func:`gradstab.clip_grad_norm_per_layer_` over sharded gradients (full-tensor norms).

    Example:
        >>> import torch, gradstab
        >>> g = [torch.tensor([3.0, 4.0]), torch.tensor([0.5])]
        >>> gradstab.distributed.clip_grad_norm_per_layer_(g, 1.0)
        tensor([5.0000, 0.5000])
    """
    lay = layout(grads, replicated, process_group, fn)
    norms, _, _, _ = layout_stats(lay, _op_stats(lay, norm_type), norm_type, with_max_abs=False)
    scale_each_(lay.local, _coef(max_norm, norms.to(torch.float64), eps, fn))
    return norms


def nonfinite_message(p: float, total: float, nonfinite: Tensor, lay: ShardLayout) -> str:
    """The ``error_if_nonfinite=True`` error for sharded gradients: torch's message word for
    word, then what this rank knows."""
    counts = nonfinite.tolist()
    first = next((i for i, k in enumerate(counts) if k > 0), -1)
    if first >= 0:
        where = (
            f"this rank's gradients hold {sum(counts)} non-finite value(s), the first in "
            f"gradient {first} of {len(counts)} (local shape {list(lay.local[first].shape)})"
        )
    else:
        where = (
            "this rank's gradients hold no non-finite value (another rank's do, or the norm "
            "overflowed its result dtype)"
        )
    return (
        f"{torch_nonfinite_message(p)}. gradstab: the total norm (reduced across ranks) is "
        f"{total}; {where}. No gradient was changed."
    )


def holds_dtensor(grads: Iterable[Tensor]) -> bool:
    return any(is_dtensor(g) for g in grads)
