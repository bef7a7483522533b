"""Public functional API: fused gradient statistics and clipping.

Drop-in replacements for ``torch.nn.utils.clip_grad_norm_`` and
``clip_grad_value_``, plus per-layer clipping and per-tensor statistics.  Each
call validates its arguments (before touching any gradient), collects the
gradients of the given parameters (``None`` grads are skipped) and runs one
``torch.ops.gradstab`` op over all of them, which reads every gradient once.

Nothing here reads a device value on the host, except
``clip_grad_norm_(..., error_if_nonfinite=True)``, which must.

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

from gradstab import distributed
from gradstab._common import (
    EPS,
    AGCStats,
    GradStats,
    TensorOrTensors,
    check_bound,
    check_flag,
    check_foreach,
    check_norm_type,
    check_real,
    collect_grads,
    is_dtensor,
    param_list,
)
from gradstab._extension import cpu_fast_path, cuda_fast_path, warn_if_fallback
from gradstab._library import OPS

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = [
    "AGCStats",
    "GradStats",
    "adaptive_clip_grad_",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value_",
    "grad_stats",
    "normalize_grad_per_layer_",
]

#: ``gradstab._C.cpu_fast_path`` op codes.
_FAST_STATS, _FAST_CLIP_NORM, _FAST_CLIP_LAYER, _FAST_CLIP_VALUE, _FAST_NORMALIZE = 0, 1, 2, 3, 4


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
    op: int, parameters: TensorOrTensors, p: float, bound: Tensor | float, err: bool
) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor] | None, TensorOrTensors]:
    """Run ``op`` through the compiled eager shortcut when it applies.

    Returns:
        ``(stats, parameters)``: the op's statistics, or ``None`` when no shortcut applies
        (nothing was read or written), and ``parameters`` as a list or tuple, for the
        dispatcher path to use (a generator is consumed here).
    """
    cpu, cuda = cpu_fast_path, cuda_fast_path  # module attributes: tests switch them off
    if (cpu is None and cuda is None) or torch.compiler.is_compiling():
        return None, parameters
    parameters = _as_sequence(parameters)
    if cpu is not None:
        b = _fast_bound(bound)
        if b is not None:
            out = cpu(op, parameters, p, b, EPS, err)
            if out is not None:
                return out, parameters
    if cuda is not None:
        out = cuda(op, parameters, p, bound, EPS, err)
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
        norm_type: p of the p-norm (``> 0``, ``inf`` allowed).
        process_group: the group over which plain gradients are sharded (ZeRO-style
            disjoint parts; see :mod:`gradstab.distributed`), or ``None``.  DTensor gradients
            (FSDP2) need no group: their mesh says it.  Sharded tensors get the statistics
            of the full tensors; every rank gets the same result.

    Returns:
        A :class:`GradStats` on the gradients' device, computed without a host sync.
        Finite gradients never give an infinite norm unless the norm itself exceeds
        the largest float32 (for float32 results).

    Example:
        >>> import torch, gradstab
        >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.tensor([3.0, 4.0])
        >>> gradstab.grad_stats([w]).total_norm
        tensor(5.)
    """
    fn = "gradstab.grad_stats"
    p = check_norm_type(norm_type, fn)
    if process_group is not None:
        grads, marks = distributed.collect(parameters, fn)
        return distributed.grad_stats(
            grads, p, replicated=marks, process_group=process_group, fn=fn
        )
    out, parameters = _shortcut(_FAST_STATS, parameters, p, 0.0, False)
    if out is not None:
        return GradStats(*out)
    grads = collect_grads(parameters, fn)
    if not grads:
        empty = torch.zeros((0,))
        return GradStats(
            empty, empty.clone(), torch.zeros((0,), dtype=torch.int64), torch.tensor(0.0)
        )
    if is_dtensor(grads[0]):
        return distributed.grad_stats(grads, p, fn=fn)
    warn_if_fallback(grads[0].device)
    try:
        return GradStats(*OPS["grad_stats"](grads, p))
    except (RuntimeError, NotImplementedError):
        if not distributed.holds_dtensor(grads):
            raise
    return distributed.grad_stats(grads, p, fn=fn)


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

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest allowed total norm: a non-negative number, or a 0-d
            tensor on the gradients' device (then nothing is read on the host).
        norm_type: p of the p-norm (``> 0``, ``inf`` allowed).
        error_if_nonfinite: raise ``RuntimeError`` before changing any gradient if the
            total norm is NaN or inf (this reads the norm on the host).
        foreach: accepted for signature compatibility; the fused kernel is always used.
        process_group: the group over which plain gradients are sharded (ZeRO-style
            disjoint parts; see :mod:`gradstab.distributed`), or ``None``.  DTensor gradients
            (FSDP2) need no group.  With sharded gradients the norm is that of the full
            model (one all-reduce) and every rank scales its shards by the same coefficient.

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
    p = check_norm_type(norm_type, fn)
    check_flag(error_if_nonfinite, "error_if_nonfinite", fn)
    check_foreach(foreach, fn)
    checked = check_bound(max_norm, "max_norm", fn, None)
    if process_group is not None:
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
    out, parameters = _shortcut(_FAST_CLIP_NORM, parameters, p, checked, error_if_nonfinite)
    if out is not None:
        return out[3]
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.tensor(0.0)
    if is_dtensor(grads[0]):
        return distributed.clip_grad_norm_(
            grads, max_norm, p, eps=EPS, error_if_nonfinite=error_if_nonfinite, fn=fn
        )
    device = grads[0].device
    bound = _device_scalar(check_bound(max_norm, "max_norm", fn, device), device)
    warn_if_fallback(device)
    try:
        return OPS["clip_norm"](grads, bound, p, EPS, error_if_nonfinite)[3]
    except (RuntimeError, NotImplementedError):
        if not distributed.holds_dtensor(grads):
            raise
    return distributed.clip_grad_norm_(
        grads, max_norm, p, eps=EPS, error_if_nonfinite=error_if_nonfinite, fn=fn
    )


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
        norm_type: p of the p-norm (``> 0``, ``inf`` allowed).
        process_group: the group over which plain gradients are sharded (ZeRO-style; every
            rank passes its part of the same tensors in the same order; see
            :mod:`gradstab.distributed`), or ``None``.  A sharded tensor is clipped by the
            norm of the full tensor.

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
    p = check_norm_type(norm_type, fn)
    checked = check_bound(max_norm, "max_norm", fn, None)
    if process_group is not None:
        grads, marks = distributed.collect(parameters, fn)
        return distributed.clip_grad_norm_per_layer_(
            grads, max_norm, p, replicated=marks, eps=EPS, process_group=process_group, fn=fn
        )
    out, parameters = _shortcut(_FAST_CLIP_LAYER, parameters, p, checked, False)
    if out is not None:
        return out[0]
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.zeros((0,))
    if is_dtensor(grads[0]):
        return distributed.clip_grad_norm_per_layer_(grads, max_norm, p, eps=EPS, fn=fn)
    device = grads[0].device
    bound = _device_scalar(check_bound(max_norm, "max_norm", fn, device), device)
    warn_if_fallback(device)
    try:
        return OPS["clip_norm_per_layer"](grads, bound, p, EPS)[0]
    except (RuntimeError, NotImplementedError):
        if not distributed.holds_dtensor(grads):
            raise
    return distributed.clip_grad_norm_per_layer_(grads, max_norm, p, eps=EPS, fn=fn)


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
        norm_type: p of the p-norm (``> 0``, ``inf`` allowed).

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
    p = check_norm_type(norm_type, fn)
    checked = check_bound(target_norm, "target_norm", fn, None)
    out, parameters = _shortcut(_FAST_NORMALIZE, parameters, p, checked, False)
    if out is not None:
        return out[0]
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.zeros((0,))
    device = grads[0].device
    bound = _device_scalar(check_bound(target_norm, "target_norm", fn, device), device)
    warn_if_fallback(device)
    return OPS["normalize_per_layer"](grads, bound, p, EPS)[0]


def clip_grad_value_(
    parameters: TensorOrTensors, clip_value: float | Tensor, foreach: bool | None = None
) -> None:
    """Clamp every gradient to ``[-clip_value, clip_value]`` in place.

    A drop-in for ``torch.nn.utils.clip_grad_value_``: NaNs stay NaN, and blocks of a
    gradient with nothing beyond the bound are not written.  DTensor (FSDP2) gradients are
    clamped shard by shard, with no communication.

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
    out, parameters = _shortcut(_FAST_CLIP_VALUE, parameters, 2.0, checked, False)
    if out is not None:
        return
    grads = collect_grads(parameters, fn)
    if not grads:
        return
    if is_dtensor(grads[0]):  # elementwise: each rank clamps its local shards
        grads = distributed.layout(grads, fn=fn).local
    device = grads[0].device
    bound = _device_scalar(check_bound(clip_value, "clip_value", fn, device), device)
    warn_if_fallback(device)
    try:
        OPS["clip_value"](grads, bound, 2.0)
    except (RuntimeError, NotImplementedError):
        if not distributed.holds_dtensor(grads):
            raise
        OPS["clip_value"](distributed.layout(grads, fn=fn).local, bound, 2.0)


def adaptive_clip_grad_(
    parameters: TensorOrTensors,
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
) -> AGCStats:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021, NFNets), in place.

    A *unit* is a slice along dim 0 of a parameter with two or more dimensions (an
    output channel of a convolution, a row of a linear weight); a 0-/1-D parameter is
    one unit.  For every unit ``i`` of every parameter ``W`` with gradient ``G``::

        max_norm_i = clip_factor * max(||W_i||_p, eps)
        G_i <- G_i * max_norm_i / ||G_i||_p     if ||G_i||_p > max_norm_i, else unchanged

    the paper's rule: ``eps`` floors the *weight* norm (so zero-initialised weights can
    still learn); no epsilon is added to ``||G_i||`` (timm clamps it at ``1e-6``, which
    differs only when ``max_norm_i < 1e-6``).  One fused call reads every parameter and
    gradient once and writes a unit only when it is clipped; nothing is read on the host.

    Non-finite values follow the formula in float64: a unit whose gradient norm or weight
    norm is NaN is left unchanged (the comparison is false); a unit whose gradient holds
    ``inf`` (and no NaN) has norm ``inf`` and coefficient 0, so its finite elements become
    0 and its infinite ones NaN.  Pair with a non-finite policy (skip the step) if that matters.

    Gradients (and parameters) may share memory: every unit is decided on the values as
    they were on entry, then the gradients are written in list order (one passed twice is
    scaled twice).  A gradient whose own elements share memory (an expanded view) cannot be
    written in place: if one of its units must be clipped (on CUDA: always, as that is not
    known without a host sync), ``ValueError`` is raised before any gradient is changed.

    Args:
        parameters: a tensor or an iterable of tensors; those whose ``.grad`` is ``None``
            are skipped.  Parameters and gradients may have different dtypes (float16,
            bfloat16, float32, float64) but must have the same shape and device.
        clip_factor: lambda of the paper, ``> 0`` (NFNets use 0.01 to 0.16 depending on
            batch size).
        eps: floor of the weight norm, finite and ``>= 0`` (paper and timm: ``1e-3``).
        norm_type: p of the unit-wise p-norms (``> 0``, ``inf`` allowed).

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
    lam = check_real(clip_factor, "clip_factor", fn, "a positive number", lambda v: v > 0)
    floor = check_real(
        eps, "eps", fn, "a finite number >= 0", lambda v: v >= 0 and math.isfinite(v)
    )
    p = check_norm_type(norm_type, fn)
    params = param_list(parameters, fn)
    pairs = [(q.grad, q.detach()) for q in params if q.grad is not None]
    if not pairs:
        empty = torch.zeros((0,))
        zeros = torch.zeros((0,), dtype=torch.int64)
        return AGCStats(empty, zeros, zeros.clone(), torch.tensor(0.0))
    grads = [g for g, _ in pairs]
    weights = [w for _, w in pairs]
    warn_if_fallback(grads[0].device)
    return AGCStats(*OPS["adaptive_clip"](grads, weights, lam, floor, p))
