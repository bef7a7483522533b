"""Public functional API: fused gradient statistics and clipping.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_`` and
``clip_grad_value_``, plus per-layer clipping and per-tensor statistics.  Each
call validates its arguments (before touching any gradient), collects the
gradients of the given parameters (``None`` grads are skipped) and runs one
``torch.ops.gradstab`` op over all of them, which reads every gradient once.

Nothing here reads a device value on the host, except ``error_if_nonfinite=True``, which must
(and a CPU read of what lives on the CPU, which is free).

``torch.nn.utils``'s decomposed API is here too: :func:`get_total_norm` (one fused read) and
:func:`clip_grads_with_norm_` (the clip by a given total, which writes nothing when the
coefficient is 1).

Gradients on several devices (model parallelism in one process) are grouped by device, as
``torch.nn.utils`` groups them: one op per device, the norms combined in float64 on the first
gradient's device, each group scaled by the common coefficient.

``norm_type`` 0, negative and ``-inf`` (``torch.linalg.vector_norm``'s meanings) are computed in
PyTorch (:func:`gradstab.reference.pnorm64`, float64) on every device rather than by the fused
kernels, which take ``p > 0``; the clip that follows runs on the fused kernels.

Eager calls whose gradients all live on the CPU (or all on one CUDA device) take a shortcut
into the compiled extension (``gradstab._C.cpu_fast_path`` / ``cuda_fast_path``): it reads
``p.grad`` in C++ and runs the same kernel as the op, without the dispatcher's per-tensor
boxing cost (about 0.3-0.4 us per tensor, which dominates for a thousand small gradients). It
declines -- and the op runs through the dispatcher -- under ``torch.compile`` and for anything
but plain tensors (subclasses, ``__torch_function__``, dispatch or function modes); the CPU
one also for a bound given as a non-CPU tensor.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from gradstab import distributed, reference
from gradstab._common import (
    EPS,
    AGCStats,
    GradStats,
    TensorOrTensors,
    by_device,
    check_bound,
    check_flag,
    check_foreach,
    check_norm_type,
    check_real,
    collect_grads,
    consume_generator,
    is_dtensor,
    param_list,
)
from gradstab._devices import clip_by_total, combined_stats, in_order, moved_bound
from gradstab._extension import OP_CODES, cpu_fast_path, cuda_fast_path, warn_if_fallback
from gradstab._library import OPS
from gradstab.agc_units import UnitDim, agc_unit_dims, unit_axis_first, unit_dims

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "AGCStats",
    "GradStats",
    "adaptive_clip_grad_",
    "agc_unit_dims",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
    "grad_stats",
    "normalize_grad_per_layer_",
]


def _as_sequence(parameters: TensorOrTensors) -> TensorOrTensors:
    """``parameters`` as a list or tuple (a generator is consumed once, here)."""
    if isinstance(parameters, (list, tuple)):
        return parameters
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        return list(parameters)
    except TypeError:
        return parameters  # not iterable: the regular path raises the error


def _shortcut(
    op: str, parameters: TensorOrTensors, p: float, bound: Tensor | float, err: bool
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor] | None, TensorOrTensors]:
    """Run the op named ``op`` through the compiled eager shortcut when it applies.

    Returns:
        ``(stats, parameters)``: the op's statistics, or ``None`` when no shortcut applies
        (nothing was read or written), and ``parameters`` as a list or tuple, for the
        dispatcher path to use (a generator is consumed here).
    """
    cpu, cuda = cpu_fast_path, cuda_fast_path  # module attributes: tests switch them off
    if (cpu is None and cuda is None) or torch.compiler.is_compiling():
        return None, parameters
    parameters = _as_sequence(parameters)
    code = OP_CODES[op]
    if cpu is not None:
        b = _fast_bound(bound)
        if b is not None:
            out = cpu(code, parameters, p, b, EPS, err)
            if out is not None:
                return out, parameters
    if cuda is not None:
        out = cuda(code, parameters, p, bound, EPS, err)
        if out is not None:
            return out, parameters
    return None, parameters


def _fast_bound(bound: Tensor | float) -> float | None:
    """The bound as a float when the CPU shortcut may use it (numbers and CPU tensors)."""
    if isinstance(bound, float):
        return bound
    if bound.device.type == "cpu":
        return float(bound)
    return None


def _device_scalar(value: Tensor | float, device: torch.device) -> Tensor:
    """``value`` as a 0-d float64 tensor on ``device`` without a host sync (a fill kernel)."""
    if isinstance(value, Tensor):
        return value.to(torch.float64)
    return torch.full((), value, dtype=torch.float64, device=device)


_F64 = torch.float64


def _positive_only(p: float, fn: str) -> None:
    """Refuse ``norm_type <= 0`` where gradients are sharded (no reduction across ranks)."""
    if not p > 0:
        raise ValueError(
            f"{fn}: norm_type {p} is not supported for sharded gradients (DTensor or "
            "process_group=): only p > 0 and inf are reduced across ranks"
        )


def _bound_on(
    value: float | Tensor, checked: float | Tensor, name: str, fn: str, device: torch.device
) -> Tensor:
    """The bound as a 0-d float64 tensor on ``device`` (a tensor bound on another device is
    refused by :func:`check_bound`)."""
    return _device_scalar(check_bound(value, name, fn, device), device)


def _raise_if_nonfinite(stats: GradStats, grads: list[Tensor], p: float) -> None:
    """``error_if_nonfinite=True``: torch's error, before any gradient changes (a host read)."""
    total = stats.total_norm
    if not bool(torch.isfinite(total)):
        raise RuntimeError(
            reference.nonfinite_message(
                p, float(total), stats.nonfinite.tolist(), [g.shape for g in grads]
            )
        )


def grad_stats(
    parameters: TensorOrTensors,
    norm_type: float = 2.0,
    *,
    process_group: ProcessGroup | None = None,
) -> GradStats:
    """Per-tensor norms, max-abs and non-finite counts of the gradients, in one read.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is examined;
            ``None`` grads are skipped, so ``T`` counts the parameters with a grad.
        norm_type: p of the p-norm: ``> 0`` or ``inf`` on the fused kernels; 0 (number of
            non-zero elements), negative p and ``-inf`` (smallest absolute value) as
            ``torch.linalg.vector_norm`` defines them, computed in PyTorch (float64).
        process_group: the group over which plain gradients are sharded (ZeRO-style
            disjoint parts; see :mod:`gradstab.distributed`), or ``None``.  DTensor gradients
            (FSDP2) need no group: their mesh says it.  Sharded tensors get the statistics
            of the full tensors; every rank gets the same result (``norm_type > 0`` only).

    Returns:
        A :class:`GradStats` on the gradients' device (the first gradient's device when they
        are on several), computed without a host sync.  Finite gradients never give an
        infinite norm unless the norm itself exceeds the largest float32 (for float32
        results).  For ``norm_type=0`` the total is, as in torch, the number of gradients
        with a non-zero norm.

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> gradstab.grad_stats([w]).total_norm
        tensor(5.)
    """
    fn = "gradstab.grad_stats"
    p = check_norm_type(norm_type, fn, nonpositive=True)
    if process_group is not None:
        _positive_only(p, fn)
        grads, marks = distributed.collect(parameters, fn)
        return distributed.grad_stats(
            grads, p, replicated=marks, process_group=process_group, fn=fn
        )
    if p > 0:
        out, parameters = _shortcut("grad_stats", parameters, p, 0.0, False)
        if out is not None:
            return GradStats(*out)
    grads = collect_grads(parameters, fn)
    if not grads:
        empty = torch.zeros((0,))
        return GradStats(
            empty, empty.clone(), torch.zeros((0,), dtype=torch.int64), torch.tensor(0.0)
        )
    if distributed.holds_dtensor(grads):
        _positive_only(p, fn)
        return distributed.grad_stats(grads, p, fn=fn)
    return combined_stats(grads, p, by_device(grads))


def get_total_norm(
    tensors: TensorOrTensors,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """The p-norm of tensors viewed as one vector; a drop-in for ``torch.nn.utils.get_total_norm``.

    One fused read of every tensor (the ``grad_stats`` op), no host sync.  With
    :func:`clip_grads_with_norm_` it is :func:`clip_grad_norm_` in two steps, for code that
    needs the norm in between (pipeline stages, FSDP).  Tensors on several devices are
    grouped by device and their norms combined in float64 on the first tensor's device, as
    torch does.

    Args:
        tensors: a tensor or an iterable of tensors (the tensors themselves: pass
            ``[p.grad for p in params if p.grad is not None]`` for gradients).
        norm_type: p of the p-norm, as :func:`clip_grad_norm_` takes it (0, negative and
            ``-inf`` included).
        error_if_nonfinite: raise ``RuntimeError`` (torch's message) if the norm is NaN or
            inf (this reads the norm on the host).
        foreach: accepted for signature compatibility; the fused kernel is always used.
        process_group: the group plain tensors are sharded over (ZeRO-style disjoint parts;
            a tensor marked with :func:`gradstab.distributed.mark_replicated` counts once), or
            ``None``.  DTensors (FSDP2) need no group.  Sharded tensors give the norm of the
            full tensors, the same on every rank (one all-reduce; ``norm_type > 0`` only).

    Returns:
        The 0-d total norm, float32 (float64 if any tensor is float64) where torch returns
        the tensors' dtype; a plain tensor for DTensors too (torch returns a DTensor).
        Finite tensors never give an infinite norm unless the norm exceeds the result dtype.

    Example:
        >>> import torch, gradstab
        >>> gradstab.get_total_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        tensor(5.)
    """
    fn = "gradstab.get_total_norm"
    ts = param_list(tensors, fn)
    p = check_norm_type(norm_type, fn, nonpositive=True)
    check_flag(error_if_nonfinite, "error_if_nonfinite", fn)
    check_foreach(foreach, fn)
    with torch.no_grad():
        if process_group is not None or (ts and distributed.holds_dtensor(ts)):
            _positive_only(p, fn)
            marks = [distributed.is_replicated(t) for t in ts]
            total, nonfinite, lay = distributed.total_norm(
                ts, p, replicated=marks, process_group=process_group, fn=fn
            )
            total = total.to(distributed.result_dtype(lay))
            if error_if_nonfinite and not bool(torch.isfinite(total)):
                raise RuntimeError(distributed.nonfinite_message(p, float(total), nonfinite, lay))
            return total
        if not ts:
            return torch.tensor(0.0)
        stats = combined_stats(ts, p, by_device(ts))
        if error_if_nonfinite:
            _raise_if_nonfinite(stats, ts, p)
        return stats.total_norm


def clip_grads_with_norm_(
    parameters: TensorOrTensors,
    max_norm: float | Tensor,
    total_norm: Tensor | float,
    foreach: bool | None = None,
) -> None:
    """Scale gradients by a total norm measured before; a drop-in for
    ``torch.nn.utils.clip_grads_with_norm_``.

    Every gradient is multiplied by ``min(1, max_norm / (total_norm + 1e-6))``, on the fused
    kernel (``torch.ops.gradstab.clip_with_norm``), which measures nothing; a coefficient
    of 1 reads and writes nothing (on CUDA the coefficient stays on the device: no host
    sync).  Without a compiled kernel, the pure-PyTorch kernel multiplies every gradient
    (by 1 too).  Gradients on several devices are scaled by the same
    coefficient, each device by its own op.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is scaled (``None``
            grads skipped).  DTensor (FSDP2) gradients: their local shards are scaled (the
            total is already that of the full model).  Sharded plain gradients
            (``process_group`` elsewhere): pass this rank's parameters and the global total.
        max_norm: the largest allowed total norm: a non-negative number, or a 0-d tensor on
            the gradients' device (then nothing is read on the host).
        total_norm: the total norm, e.g. from :func:`get_total_norm`: a one-element tensor
            (any device; a DTensor is made whole with ``full_tensor()``) or a number.  NaN or
            inf scales by NaN or 0, as torch does.
        foreach: accepted for signature compatibility; the fused kernel is always used.

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> total = gradstab.get_total_norm([w.grad])
        >>> gradstab.clip_grads_with_norm_([w], 1.0, total)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    fn = "gradstab.clip_grads_with_norm_"
    check_foreach(foreach, fn)
    checked = check_bound(max_norm, "max_norm", fn, None)
    total = _check_total_norm(total_norm, fn)
    grads = collect_grads(parameters, fn)
    if not grads:
        return
    if distributed.holds_dtensor(grads):  # elementwise: each rank scales its local shards
        grads = distributed.layout(grads, fn=fn).local
    groups = by_device(grads)
    if len(groups) == 1:
        d = groups[0][0]
        bound = _bound_on(max_norm, checked, "max_norm", fn, d)
        OPS["clip_with_norm"](grads, bound, total.to(d), EPS)
        return
    clip_by_total(grads, groups, checked, total)


def _check_total_norm(total_norm: object, fn: str) -> Tensor:
    """``total_norm`` as a 0-d tensor (a DTensor made whole; a number on the CPU)."""
    if isinstance(total_norm, Tensor):
        if is_dtensor(total_norm):
            total_norm = total_norm.full_tensor()
        if total_norm.numel() != 1 or total_norm.is_complex() or total_norm.dtype == torch.bool:
            raise ValueError(
                f"{fn}: total_norm must be a tensor holding one real number, got shape "
                f"{list(total_norm.shape)} and dtype {total_norm.dtype}"
            )
        return total_norm.detach().reshape(())
    if isinstance(total_norm, bool) or not isinstance(total_norm, (int, float)):
        raise TypeError(f"{fn}: total_norm must be a tensor or a number, got {total_norm!r}")
    return torch.tensor(float(total_norm), dtype=_F64)


def clip_grad_norm_(
    parameters: TensorOrTensors,
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Clip the gradients' global norm in place; a drop-in for ``torch.nn.utils.clip_grad_norm_``.

    Every gradient is scaled by ``min(1, max_norm / (total_norm + 1e-6))``; a gradient is
    not written when that coefficient is 1.  Unlike PyTorch, the norm cannot overflow
    for finite gradients (``[1e30, 1e30]`` in float32 has norm ``1.414e30``, not inf)
    and is returned in float32 (float64 for float64 grads) rather than the grads' dtype.
    Gradients on several devices are grouped by device (one read per device), their norms
    combined on the first gradient's device, and each group scaled by the common coefficient,
    as torch does.  An empty generator (an exhausted ``model.parameters()``) warns as in torch.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest allowed total norm: a non-negative number, or a 0-d
            tensor on the gradients' device (then nothing is read on the host).
        norm_type: p of the p-norm: ``> 0`` or ``inf`` on the fused kernels (one read, and a
            write only when clipping); 0, negative p and ``-inf`` as torch defines them
            (``torch.linalg.vector_norm``; for 0 the total is the number of gradients with a
            non-zero norm), measured in PyTorch in float64, then clipped on the fused kernels.
        error_if_nonfinite: raise ``RuntimeError`` before changing any gradient if the
            total norm is NaN or inf (this reads the norm on the host).  The message starts
            with torch's, word for word.
        foreach: accepted for signature compatibility; the fused kernel is always used.
        process_group: the group over which plain gradients are sharded (ZeRO-style
            disjoint parts; see :mod:`gradstab.distributed`), or ``None``.  DTensor gradients
            (FSDP2) need no group.  With sharded gradients the norm is that of the full
            model (one all-reduce) and every rank scales its shards by the same coefficient
            (``norm_type > 0`` only).

    Returns:
        The total norm of the gradients before clipping (0-d tensor).

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> gradstab.clip_grad_norm_([w], max_norm=1.0)
        tensor(5.)
        >>> w.grad
        tensor([0.6000, 0.8000])
    """
    fn = "gradstab.clip_grad_norm_"
    parameters = consume_generator(parameters)
    p = check_norm_type(norm_type, fn, nonpositive=True)
    check_flag(error_if_nonfinite, "error_if_nonfinite", fn)
    check_foreach(foreach, fn)
    checked = check_bound(max_norm, "max_norm", fn, None)
    if process_group is not None:
        _positive_only(p, fn)
        grads, marks = distributed.collect(parameters, fn)
        return distributed.clip_grad_norm_(
            grads,
            max_norm,
            p,
            replicated=marks,
            eps=EPS,
            error_if_nonfinite=error_if_nonfinite,
            process_group=process_group,
            fn=fn,
        )
    if p > 0:
        out, parameters = _shortcut("clip_norm", parameters, p, checked, error_if_nonfinite)
        if out is not None:
            return out[3]
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.tensor(0.0)
    if distributed.holds_dtensor(grads):
        _positive_only(p, fn)
        return distributed.clip_grad_norm_(
            grads, max_norm, p, eps=EPS, error_if_nonfinite=error_if_nonfinite, fn=fn
        )
    groups = by_device(grads)
    if len(groups) == 1 and p > 0:
        device = groups[0][0]
        bound = _bound_on(max_norm, checked, "max_norm", fn, device)
        warn_if_fallback(device)
        return OPS["clip_norm"](grads, bound, p, EPS, error_if_nonfinite)[3]
    # Several devices, or norm_type <= 0: measure (one read per device), then clip by the total.
    if len(groups) == 1:
        check_bound(max_norm, "max_norm", fn, groups[0][0])  # a bound on another device: refused
    stats = combined_stats(grads, p, groups)
    if error_if_nonfinite:
        _raise_if_nonfinite(stats, grads, p)
    clip_by_total(grads, groups, checked, stats.total_norm)
    return stats.total_norm


def _per_layer(fn: str, op: str, grads: list[Tensor], bound: float | Tensor, p: float) -> Tensor:
    """``clip_norm_per_layer`` / ``normalize_per_layer`` once per device; norms in input order."""
    name = "target_norm" if op == "normalize_per_layer" else "max_norm"
    checked = check_bound(bound, name, fn, None)
    groups = by_device(grads)
    outs = []
    for d, ix in groups:
        gs = [grads[i] for i in ix] if len(groups) > 1 else grads
        b = _bound_on(bound, checked, name, fn, d) if len(groups) == 1 else moved_bound(checked, d)
        if p > 0:
            warn_if_fallback(d, stacklevel=4)  # for the caller of the public function
            outs.append(OPS[op](gs, b, p, EPS)[0])
        else:
            outs.append(getattr(reference, op)(gs, b, p, EPS, nonpositive=True)[0])
    return in_order(outs, groups, grads[0].device, reference.result_dtype(grads))


def clip_grad_norm_per_layer_(
    parameters: TensorOrTensors,
    max_norm: float | Tensor,
    norm_type: float = 2.0,
    *,
    process_group: ProcessGroup | None = None,
) -> Tensor:
    """Clip each gradient to its own norm bound, in place.

    Gradient ``i`` is scaled by ``min(1, max_norm / (norm_i + 1e-6))``; gradients whose
    coefficient is 1 are not written.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest allowed norm per gradient (number or 0-d device tensor).
        norm_type: p of the p-norm: ``> 0`` or ``inf`` on the fused kernels; 0, negative
            and ``-inf`` as :func:`grad_stats` takes them (measured in PyTorch).
        process_group: the group over which plain gradients are sharded (ZeRO-style; every
            rank passes its part of the same tensors in the same order; see
            :mod:`gradstab.distributed`), or ``None``.  A sharded tensor is clipped by the
            norm of the full tensor (``norm_type > 0`` only).

    Returns:
        ``[T]`` per-gradient norms before clipping.

    Example:
        >>> import torch, gradstab
        >>> a = torch.nn.Parameter(torch.zeros(2)); a.grad = torch.tensor([3.0, 4.0])
        >>> b = torch.nn.Parameter(torch.zeros(1)); b.grad = torch.tensor([0.5])
        >>> gradstab.clip_grad_norm_per_layer_([a, b], max_norm=1.0)
        tensor([5.0000, 0.5000])
        >>> b.grad
        tensor([0.5000])
    """
    fn = "gradstab.clip_grad_norm_per_layer_"
    parameters = consume_generator(parameters)
    p = check_norm_type(norm_type, fn, nonpositive=True)
    checked = check_bound(max_norm, "max_norm", fn, None)
    if process_group is not None:
        _positive_only(p, fn)
        grads, marks = distributed.collect(parameters, fn)
        return distributed.clip_grad_norm_per_layer_(
            grads, max_norm, p, replicated=marks, eps=EPS, process_group=process_group, fn=fn
        )
    if p > 0:
        out, parameters = _shortcut("clip_norm_per_layer", parameters, p, checked, False)
        if out is not None:
            return out[0]
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.zeros((0,))
    if distributed.holds_dtensor(grads):
        _positive_only(p, fn)
        return distributed.clip_grad_norm_per_layer_(grads, max_norm, p, eps=EPS, fn=fn)
    return _per_layer(fn, "clip_norm_per_layer", grads, max_norm, p)


def normalize_grad_per_layer_(
    parameters: TensorOrTensors, target_norm: float | Tensor = 1.0, norm_type: float = 2.0
) -> Tensor:
    """Rescale each gradient to a target norm, in place (LARS-style gradient normalization).

    Gradient ``i`` is multiplied by ``target_norm / (norm_i + 1e-6)``, up or down, so every
    layer takes a step of the same size whatever its gradient's scale: a cure for layers
    whose gradients vanish (made larger) or explode (made smaller).  An all-zero gradient
    stays zero; a gradient holding NaN/Inf becomes NaN.  Gradients whose coefficient is
    exactly 1 are not written.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is rescaled.
        target_norm: the norm every gradient gets (non-negative number or 0-d device tensor).
        norm_type: p of the p-norm: ``> 0`` or ``inf`` on the fused kernels; 0, negative
            and ``-inf`` as :func:`grad_stats` takes them (measured in PyTorch).

    Returns:
        ``[T]`` per-gradient norms before rescaling.

    Example:
        >>> import torch, gradstab
        >>> a = torch.nn.Parameter(torch.zeros(2)); a.grad = torch.tensor([3.0, 4.0])
        >>> b = torch.nn.Parameter(torch.zeros(1)); b.grad = torch.tensor([1e-3])
        >>> gradstab.normalize_grad_per_layer_([a, b], target_norm=1.0)
        tensor([5.0000e+00, 1.0000e-03])
        >>> a.grad, b.grad
        (tensor([0.6000, 0.8000]), tensor([0.9990]))
    """
    fn = "gradstab.normalize_grad_per_layer_"
    parameters = consume_generator(parameters)
    p = check_norm_type(norm_type, fn, nonpositive=True)
    checked = check_bound(target_norm, "target_norm", fn, None)
    if p > 0:
        out, parameters = _shortcut("normalize_per_layer", parameters, p, checked, False)
        if out is not None:
            return out[0]
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.zeros((0,))
    return _per_layer(fn, "normalize_per_layer", grads, target_norm, p)


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float | Tensor, foreach: bool | None = None
) -> None:
    """Clamp every gradient to ``[-clip_value, clip_value]`` in place.

    A drop-in for ``torch.nn.utils.clip_grad_value_``: NaNs stay NaN, and blocks of a
    gradient with nothing beyond the bound are not written.  DTensor (FSDP2) gradients are
    clamped shard by shard, with no communication.  Gradients on several devices are
    clamped by one op per device.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clamped.
        clip_value: the bound, a non-negative number or a 0-d tensor on the gradients'
            device.
        foreach: accepted for signature compatibility; the fused kernel is always used.

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.tensor([-2.0, 0.5, 3.0])
        >>> gradstab.clip_grad_value_([w], 1.0)
        >>> w.grad
        tensor([-1.0000,  0.5000,  1.0000])
    """
    fn = "gradstab.clip_grad_value_"
    check_foreach(foreach, fn)
    checked = check_bound(clip_value, "clip_value", fn, None)
    out, parameters = _shortcut("clip_value", parameters, 2.0, checked, False)
    if out is not None:
        return
    grads = collect_grads(parameters, fn)
    if not grads:
        return
    if distributed.holds_dtensor(grads):  # elementwise: each rank clamps its local shards
        grads = distributed.layout(grads, fn=fn).local
    groups = by_device(grads)
    for d, ix in groups:
        gs = [grads[i] for i in ix] if len(groups) > 1 else grads
        bound = (
            _bound_on(clip_value, checked, "clip_value", fn, d)
            if len(groups) == 1
            else moved_bound(checked, d)
        )
        warn_if_fallback(d)
        OPS["clip_value"](gs, bound, 2.0)


def adaptive_clip_grad_(
    parameters: TensorOrTensors,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    *,
    unit_dim: UnitDim = 0,
) -> AGCStats:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, NFNets), in place.

    A *unit* is a slice along the unit axis of a parameter with two or more dimensions: dim 0
    by default (an output channel of a convolution, a row of a ``torch.nn.Linear`` weight);
    a 0-/1-D parameter is one unit.  Layouts whose output axis is not dim 0 (a transposed
    convolution's ``[in, out, ...]``, Hugging Face's ``Conv1D`` ``[in, out]``) need
    ``unit_dim``: :func:`agc_unit_dims` finds them in a module.  For every unit ``i`` of every
    parameter ``W`` with gradient ``G``::

        max_norm_i = clip_factor * max(||W_i||_p, eps)
        G_i <- G_i * max_norm_i / ||G_i||_p     if ||G_i||_p > max_norm_i, else unchanged

    the paper's rule: ``eps`` floors the *weight* norm (so zero-initialised weights can
    still learn); no epsilon is added to ``||G_i||`` (timm clamps it at ``1e-6``, which
    differs only when ``max_norm_i < 1e-6``).  One fused call reads every parameter and
    gradient once and writes a unit only when it is clipped; nothing is read on the host.
    (A unit axis other than dim 0 is handed to the kernel as a ``transpose(0, d)`` view,
    which it processes on a contiguous copy: one more read, and a write back when clipped.)

    Non-finite values follow the formula in float64: a unit whose gradient norm or weight
    norm is NaN is left unchanged (the comparison is false); a unit whose gradient holds
    ``inf`` (and no NaN) has norm ``inf`` and coefficient 0, so its finite elements become
    0 and its infinite ones NaN.  Pair with a non-finite policy (skip the step) if that matters.

    Gradients (and parameters) may share memory: every unit is decided on the values as
    they were on entry, then the gradients are written in list order (one passed twice is
    scaled twice).  A gradient whose own elements share memory (an expanded view) cannot be
    written in place: if one of its units must be clipped (on CUDA: always, as that is not
    known without a host sync), ``ValueError`` is raised before any gradient is changed.
    Gradients on several devices are clipped by one op per device.

    Args:
        parameters: a tensor or an iterable of tensors; those whose ``.grad`` is ``None``
            are skipped.  Parameters and gradients may have different dtypes (float16,
            bfloat16, float32, float64) but must have the same shape and device.
        clip_factor: lambda of the paper, ``> 0`` (NFNets use 0.01 to 0.16 depending on
            batch size).
        eps: floor of the weight norm, finite and ``>= 0`` (paper and timm: ``1e-3``).
        norm_type: p of the unit-wise p-norms (``> 0``, ``inf`` allowed).
        unit_dim: the unit axis of the parameters of two or more dimensions: an int for all
            of them (negative counts from the end), a mapping ``{parameter: dim}`` (e.g. from
            :func:`agc_unit_dims`; a parameter not in it uses dim 0), or a callable
            ``parameter -> dim`` (``None``: dim 0).  Ignored for 0-/1-D parameters.

    Returns:
        An :class:`AGCStats` with the pre-clip norms and the number of clipped units.

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
        >>> w.grad = torch.tensor([[0.3, 0.4], [0.1, 0.0]])
        >>> gradstab.adaptive_clip_grad_([w], clip_factor=0.01).clipped
        tensor([2])
        >>> w.grad  # row 0 to 0.01 * 5 = 0.05, row 1 to 0.01 * max(0, 1e-3) = 1e-5
        tensor([[3.0000e-02, 4.0000e-02],
                [1.0000e-05, 0.0000e+00]])
    """
    fn = "gradstab.adaptive_clip_grad_"
    parameters = consume_generator(parameters)
    lam = check_real(clip_factor, "clip_factor", fn, "a positive number", lambda v: v > 0)
    floor = check_real(
        eps, "eps", fn, "a finite number >= 0", lambda v: v >= 0 and math.isfinite(v)
    )
    p = check_norm_type(norm_type, fn)
    params = param_list(parameters, fn)
    with_grad = [q for q in params if q.grad is not None]
    dims = unit_dims(with_grad, unit_dim, fn)
    if not with_grad:
        empty = torch.zeros((0,))
        zeros = torch.zeros((0,), dtype=torch.int64)
        return AGCStats(empty, zeros, zeros.clone(), torch.tensor(0.0))
    grads, weights = unit_axis_first(
        [q.grad for q in with_grad], [q.detach() for q in with_grad], dims
    )
    groups = by_device(grads)
    outs = []
    for d, ix in groups:
        warn_if_fallback(d)
        gs = [grads[i] for i in ix] if len(groups) > 1 else grads
        ws = [weights[i] for i in ix] if len(groups) > 1 else weights
        outs.append(OPS["adaptive_clip"](gs, ws, lam, floor, p))
    if len(outs) == 1:
        return AGCStats(*outs[0])
    d0 = grads[0].device
    rd = reference.result_dtype(grads)
    norms = in_order([o[0] for o in outs], groups, d0, _F64)
    return AGCStats(
        norms.to(rd),
        in_order([o[1] for o in outs], groups, d0, torch.int64),
        in_order([o[2] for o in outs], groups, d0, torch.int64),
        reference.pnorm64(norms, p).to(rd),
    )
