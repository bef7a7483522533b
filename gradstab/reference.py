"""Pure-PyTorch kernels for the ``gradstab`` ops.

These serve every device that has no compiled kernel (registered under the
``CompositeExplicitAutograd`` key, so a compiled ``CPU``/``CUDA`` kernel takes
precedence), and they are the oracle the compiled kernels are tested against.

They follow the op contract (docs/design.md, section 3) exactly, trading speed for
obviousness: every statistic is computed in float64 from a float64 copy of
the gradient, the p-norm is taken overflow- and underflow-safe as
``m * ||g / m||_p`` with ``m = max|g|``, and results are rounded once to the
result dtype (float64 if any gradient is float64, float32 otherwise).

The ops take ``norm_type > 0`` (or inf), on every kernel.  The statistics functions here also
take 0, negative p and ``-inf`` when called with ``nonpositive=True`` (see :func:`pnorm64`):
that is how :mod:`gradstab.functional` computes those norms, on every device, in PyTorch.

Clipping arithmetic matches the C++ kernel, which is PyTorch's ``mul_`` by a
coefficient of the gradient's dtype: float16, bfloat16 and float32 gradients are
multiplied in float32 by the float64 coefficient rounded to float32, float64
gradients in float64.  Where the coefficient lies outside float32's normal range
(below ``FLT_MIN`` or above ``FLT_MAX``), float32 gradients are multiplied in
float64 and rounded once instead, so no bits of the coefficient are lost.  On CPU a tensor
whose coefficient is 1 is not written; on other devices reading the
coefficient would need a host sync, so the (value-preserving) multiply by 1
happens instead.  Gradients are written in list order (a gradient passed twice
is scaled twice, as by PyTorch); a gradient whose elements share memory (an
expanded view) cannot be written in place, and a clip that would have to write
one raises ``ValueError`` before any gradient changes.

Example:
    >>> import torch
    >>> from gradstab import reference
    >>> g = torch.tensor([3.0, 4.0])
    >>> reference.grad_stats([g], 2.0)[3]
    tensor(5.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "adaptive_clip",
    "agc_coefficients",
    "check_agc_args",
    "check_grads",
    "clip_norm",
    "clip_norm_per_layer",
    "clip_value",
    "clip_with_norm",
    "grad_stats",
    "normalize_per_layer",
    "pnorm64",
    "result_dtype",
    "unit_view",
]

_REDUCED = (torch.float16, torch.bfloat16)
_FLT_MIN = torch.finfo(torch.float32).tiny  # the smallest normal float32
_FLT_MAX = torch.finfo(torch.float32).max
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_grads(grads: list[Tensor]) -> None:
    """Raise, as the C++ kernel does, unless every grad is dense, real floating, on one device."""
    n = len(grads)
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise ValueError(
                f"gradstab: gradient {i} of {n} has layout {g.layout}; only dense (strided) "
                "gradients are supported. Convert it with `p.grad = p.grad.to_dense()`"
            )
        if g.device != grads[0].device:
            raise ValueError(
                f"gradstab: all gradients of one call must be on one device, gradient 0 is on "
                f"{grads[0].device} and gradient {i} on {g.device}; call once per device"
            )
        if g.dtype not in _SUPPORTED:
            raise TypeError(
                f"gradstab: gradient {i} of {n} has dtype {g.dtype}; only float16, bfloat16, "
                "float32 and float64 gradients are supported"
            )


def _check_norm_type(norm_type: float, nonpositive: bool = False) -> None:
    if nonpositive and not math.isnan(norm_type):
        return
    if not norm_type > 0:
        raise ValueError(f"gradstab: norm_type must be a positive number or inf, got {norm_type}")


def _read_bound(t: Tensor, name: str) -> None:
    """Check a bound's value where that needs no device sync (a CPU tensor)."""
    if t.numel() != 1:
        raise ValueError(
            f"gradstab: {name} must be a tensor with one element, got shape {list(t.shape)}"
        )
    if t.device.type == "cpu" and not bool(t >= 0):
        raise ValueError(f"gradstab: {name} must be a non-negative number, got {float(t)}")


def result_dtype(grads: list[Tensor]) -> torch.dtype:
    """Dtype of every floating result: float64 if any grad is float64, else float32."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def _robust_pnorm(x: Tensor, m: Tensor, norm_type: float) -> Tensor:
    """p-norm of float64 ``x`` whose max-abs is ``m``, safe from overflow and underflow.

    ``m * ||x / m||_p`` when ``m`` is finite and positive; otherwise the plain
    norm, which is 0 for ``m == 0`` and inf/NaN (IEEE propagation) when ``x``
    holds non-finite values.
    """
    if math.isinf(norm_type):
        return m
    usable = (m > 0) & torch.isfinite(m)
    scale = torch.where(usable, m, torch.ones_like(m))
    return scale * torch.linalg.vector_norm(x / scale, norm_type)


def pnorm64(x: Tensor, norm_type: float) -> Tensor:
    """``torch.linalg.vector_norm(x, norm_type)`` of a float64 tensor, for any p, in float64
    and without spurious overflow or underflow.

    - ``p > 0``: ``m * ||x / m||_p`` with ``m = max|x|``; ``inf``: ``max|x|``; 0 if ``x`` is
      zero-size.
    - ``p = 0``: the number of non-zero elements (a NaN counts), as torch.
    - ``p < 0``: ``m * ||x / m||_p`` with ``m = min|x|`` (every ratio is >= 1, so the powers
      cannot overflow); ``-inf``: ``min|x|``.  A zero element gives 0 (as torch).  A zero-size
      ``x`` gives inf (no element to bound the minimum: the limit, and what a zero-size
      tensor contributes to a total, nothing) where torch raises.

    NaN propagates, except for ``p = 0``.  The total norm of a list of tensors is this
    function of their norms, for every p: for ``p = 0`` that is torch's answer, the number of
    tensors with a non-zero norm (not the number of non-zero elements).

    Example:
        >>> import math, torch
        >>> from gradstab.reference import pnorm64
        >>> x = torch.tensor([0.0, 3.0, -4.0], dtype=torch.float64)
        >>> [float(pnorm64(x, p)) for p in (2.0, 0.0, -math.inf, math.inf)]
        [5.0, 2.0, 0.0, 4.0]
    """
    x = x.reshape(-1)
    if norm_type == 0:
        return (x != 0).sum().to(torch.float64)
    if x.numel() == 0:
        empty = 0.0 if norm_type > 0 else math.inf
        return torch.full((), empty, dtype=torch.float64, device=x.device)
    a = x.abs()
    if norm_type > 0:
        return _robust_pnorm(a, a.amax(), norm_type)  # amax, amin: NaN-propagating
    m = a.amin()
    if math.isinf(norm_type):
        return m
    usable = (m > 0) & torch.isfinite(m)
    scale = torch.where(usable, m, torch.ones_like(m))
    return scale * torch.linalg.vector_norm(a / scale, norm_type)


def _stats64(
    grads: list[Tensor], norm_type: float, nonpositive: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-tensor norms, max-abs (float64), non-finite counts (int64) and the float64 total."""
    _check_norm_type(norm_type, nonpositive)
    check_grads(grads)
    if not grads:
        z = torch.zeros((0,), dtype=torch.float64)
        return z, z.clone(), torch.zeros((0,), dtype=torch.int64), torch.zeros((), dtype=z.dtype)
    device = grads[0].device
    norms, maxabs, nonfinite = [], [], []
    for g in grads:
        x = g.detach().reshape(-1).to(torch.float64)
        norms.append(pnorm64(x, norm_type))
        if x.numel() == 0:
            maxabs.append(torch.zeros((), dtype=torch.float64, device=device))
            nonfinite.append(torch.zeros((), dtype=torch.int64, device=device))
            continue
        maxabs.append(x.abs().amax())  # NaN-propagating, like the kernels
        nonfinite.append((~torch.isfinite(x)).sum())
    norms64 = torch.stack(norms)
    return norms64, torch.stack(maxabs), torch.stack(nonfinite), pnorm64(norms64, norm_type)


def _finish(grads: list[Tensor], stats: tuple[Tensor, Tensor, Tensor, Tensor]):
    norms64, maxabs64, nonfinite, total = stats
    rd = result_dtype(grads)
    return norms64.to(rd), maxabs64.to(rd), nonfinite, total.to(rd)


def _needs_scaling(g: Tensor, coef: Tensor) -> bool:
    """Whether ``g`` is written when scaled by ``coef`` (see :func:`_scale_`)."""
    if g.numel() == 0:
        return False
    # coefficient 1: not written on CPU (NaN coefficients are written, as in PyTorch)
    return g.device.type != "cpu" or not bool(coef == 1)


def _scale_(g: Tensor, coef: Tensor) -> None:
    """Multiply ``g`` in place by the float64 0-d ``coef`` with the kernels' rounding.

    Does nothing where :func:`_needs_scaling` says ``g`` is not written.
    """
    if not _needs_scaling(g, coef):
        return
    g.copy_(_scaled(g, coef))


def scales_in_float(coef: float) -> bool:
    """Whether float32 gradients are multiplied in float32 by ``float(coef)`` (else in float64,
    rounded once): ``FLT_MIN <= |coef| <= FLT_MAX``, csrc/common/scale_rule.h's rule."""
    return _FLT_MIN <= abs(coef) <= _FLT_MAX


def _scaled(g: Tensor, coef: Tensor) -> Tensor:
    """``g * coef`` (``coef`` float64, 0-d or broadcastable) with the kernels' rounding.

    float16/bfloat16: in float32 (PyTorch's opmath); float64: in float64; float32: in float32
    by the coefficient rounded to float32 where ``FLT_MIN <= |coef| <= FLT_MAX``, else in
    float64 and rounded once (selected element-wise on the device: no host read).
    """
    if g.dtype == torch.float64:
        return g * coef
    in_float = g.float() * coef.float()
    if g.dtype in _REDUCED:
        return in_float.to(g.dtype)
    in_range = (coef.abs() >= _FLT_MIN) & (coef.abs() <= _FLT_MAX)  # scales_in_float, on device
    return torch.where(in_range, in_float, (g.double() * coef).float())


def _self_overlapping(g: Tensor) -> bool:
    """Whether elements of ``g`` share memory (an expanded view): not writable in place."""
    return any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape))


def _check_writable(grads: list[Tensor], todo: list[bool], what: str) -> None:
    """Raise before anything is written if a gradient to be written overlaps itself."""
    for i, (g, w) in enumerate(zip(grads, todo)):
        if w and _self_overlapping(g):
            raise ValueError(
                f"gradstab: gradient {i} of {len(grads)} (shape {list(g.shape)}) must be {what}, "
                "but several of its elements share one memory location (an expanded view?), so "
                "it cannot be written in place. Give it its own memory first, e.g. "
                "`p.grad = p.grad.clone()`. No gradient was changed."
            )


def torch_nonfinite_message(norm_type: float) -> str:
    """The error ``torch.nn.utils.clip_grad_norm_(..., error_if_nonfinite=True)`` raises, word for
    word (``norm_type`` as Python prints a float: ``2.0``, ``inf``); gradstab's messages start
    with it, so code matching torch's message matches gradstab's."""
    return (
        f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
        "non-finite, so it cannot be clipped. To disable this error and scale the gradients by "
        "the non-finite norm anyway, set `error_if_nonfinite=False`"
    )


def nonfinite_message(norm_type: float, total: float, nonfinite: list[int], shapes: list) -> str:
    """The error raised by ``clip_norm(..., error_if_nonfinite=True)``: torch's message, then
    what gradstab knows (the C++ kernels build the same text, csrc/common/messages.h)."""
    first = next(i for i, n in enumerate(nonfinite) if n > 0) if any(nonfinite) else -1
    where = (
        f"{sum(nonfinite)} non-finite value(s), the first in gradient {first} of {len(nonfinite)} "
        f"(shape {list(shapes[first])})"
        if first >= 0
        else "no non-finite gradient value (the norm overflowed its result dtype)"
    )
    return (
        f"{torch_nonfinite_message(norm_type)}. gradstab: the total norm is {total}; {where}. "
        "No gradient was changed."
    )


def grad_stats(grads: list[Tensor], norm_type: float, *, nonpositive: bool = False):
    """Reference for ``gradstab::grad_stats``: (norms, max_abs, nonfinite, total_norm).

    ``nonpositive=True`` also takes ``norm_type <= 0`` (:func:`pnorm64`); the op does not.
    """
    return _finish(grads, _stats64(grads, norm_type, nonpositive))


def clip_norm(
    grads: list[Tensor],
    max_norm: Tensor,
    norm_type: float,
    eps: float,
    error_if_nonfinite: bool,
    *,
    nonpositive: bool = False,
):
    """Reference for ``gradstab::clip_norm``: global-norm clip in place, returns pre-clip stats."""
    _read_bound(max_norm, "max_norm")
    stats = _stats64(grads, norm_type, nonpositive)
    total = stats[3]
    # host sync: the caller asked. The norm as returned: inf also where it exceeds float32.
    reported = total.to(result_dtype(grads))
    if error_if_nonfinite and not bool(torch.isfinite(reported)):
        raise RuntimeError(
            nonfinite_message(
                norm_type, float(reported), stats[2].tolist(), [g.shape for g in grads]
            )
        )
    coef = torch.clamp(max_norm.to(torch.float64) / (total + eps), max=1.0)
    todo = [_needs_scaling(g, coef) for g in grads]
    _check_writable(grads, todo, "scaled")
    for g in grads:
        _scale_(g, coef)
    return _finish(grads, stats)


def clip_norm_per_layer(
    grads: list[Tensor],
    max_norm: Tensor,
    norm_type: float,
    eps: float,
    *,
    nonpositive: bool = False,
):
    """Reference for ``gradstab::clip_norm_per_layer``: each grad by its own coefficient."""
    _read_bound(max_norm, "max_norm")
    stats = _stats64(grads, norm_type, nonpositive)
    coefs = torch.clamp(max_norm.to(torch.float64) / (stats[0] + eps), max=1.0).unbind(0)
    todo = [_needs_scaling(g, c) for g, c in zip(grads, coefs)]
    _check_writable(grads, todo, "scaled")
    for g, c in zip(grads, coefs):
        _scale_(g, c)
    return _finish(grads, stats)


def normalize_per_layer(
    grads: list[Tensor],
    target_norm: Tensor,
    norm_type: float,
    eps: float,
    *,
    nonpositive: bool = False,
):
    """Reference for ``gradstab::normalize_per_layer``: grad i times target / (norm_i + eps)."""
    _read_bound(target_norm, "target_norm")
    stats = _stats64(grads, norm_type, nonpositive)
    coefs = (target_norm.to(torch.float64) / (stats[0] + eps)).unbind(0)
    _check_writable(grads, [_needs_scaling(g, c) for g, c in zip(grads, coefs)], "scaled")
    for g, c in zip(grads, coefs):
        _scale_(g, c)
    return _finish(grads, stats)


def clip_with_norm(grads: list[Tensor], max_norm: Tensor, total_norm: Tensor, eps: float) -> None:
    """Reference for ``gradstab::clip_with_norm``: scale every grad by
    ``min(1, max_norm / (total_norm + eps))``, the total norm given (nothing is measured).

    ``total_norm`` is a one-element tensor on the gradients' device or the CPU, any value (a
    NaN or inf total scales by NaN or 0, as PyTorch does).  On CPU a coefficient of 1 writes
    nothing; on other devices the (value-preserving) multiply by 1 happens, since reading the
    coefficient would need a host sync.
    """
    _read_bound(max_norm, "max_norm")
    check_grads(grads)
    if total_norm.numel() != 1:
        raise ValueError(
            "gradstab: total_norm must be a tensor with one element, got shape "
            f"{list(total_norm.shape)}"
        )
    if not grads:
        return
    device = grads[0].device
    for name, t in (("max_norm", max_norm), ("total_norm", total_norm)):
        if t.device != device and t.device.type != "cpu":
            raise ValueError(f"gradstab: {name} is on {t.device} but the gradients are on {device}")
    total = total_norm.reshape(()).to(device=device, dtype=torch.float64)
    coef = torch.clamp(max_norm.reshape(()).to(device, torch.float64) / (total + eps), max=1.0)
    _check_writable(grads, [_needs_scaling(g, coef) for g in grads], "scaled")
    for g in grads:
        _scale_(g, coef)


def clip_value(grads: list[Tensor], clip_value: Tensor, norm_type: float):
    """Reference for ``gradstab::clip_value``: clamp to ``[-v, v]``, returns pre-clip stats."""
    _read_bound(clip_value, "clip_value")
    stats = _stats64(grads, norm_type)
    v = clip_value.to(dtype=torch.float64)
    todo = []
    for g, m in zip(grads, stats[1].unbind(0)):
        if g.numel() == 0 or g.device.type != "cpu":
            todo.append(g.numel() > 0)
        elif bool(m <= v):
            todo.append(False)  # nothing beyond the bound: not written
        elif not bool(torch.isnan(m)) and not _self_overlapping(g):
            todo.append(True)
        else:
            # (a NaN max-abs proves nothing) written only if a value lies beyond the bound,
            # compared as the C++ kernel does
            x = g if g.dtype == torch.float64 else g.float()
            todo.append(bool((x.abs() > v.to(device=g.device, dtype=x.dtype)).any()))
    _check_writable(grads, todo, "clamped")
    for g, w in zip(grads, todo):
        if not w:
            continue
        # Comparing in g's dtype against v rounded to it gives the same result as PyTorch's
        # float-opmath clamp: no value of g's dtype lies strictly between v and round(v).
        vt = v.to(device=g.device, dtype=g.dtype)
        torch.clamp_(g, min=-vt, max=vt)
    return _finish(grads, stats)


# ------------------------------------------------------------ adaptive gradient clipping (AGC) --


def check_agc_args(
    grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float, norm_type: float
) -> None:
    """Raise, as the C++ kernel does, unless ``adaptive_clip``'s arguments are valid."""
    _check_norm_type(norm_type)
    if not clip_factor > 0:  # also refuses NaN
        raise ValueError(f"gradstab: clip_factor must be a positive number, got {clip_factor}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"gradstab: eps must be a finite number >= 0, got {eps}")
    check_grads(grads)
    if len(params) != len(grads):
        raise ValueError(
            f"gradstab: adaptive_clip needs one parameter per gradient, got {len(grads)} "
            f"gradients and {len(params)} parameters"
        )
    n = len(grads)
    for i, (g, w) in enumerate(zip(grads, params)):
        if w.layout != torch.strided:
            raise ValueError(
                f"gradstab: parameter {i} of {n} has layout {w.layout}; only dense (strided) "
                "parameters are supported"
            )
        if w.device != g.device:
            raise ValueError(
                f"gradstab: parameter {i} of {n} is on {w.device} but its gradient is on "
                f"{g.device}; a parameter and its gradient must be on one device"
            )
        if w.dtype not in _SUPPORTED:
            raise TypeError(
                f"gradstab: parameter {i} of {n} has dtype {w.dtype}; only float16, bfloat16, "
                "float32 and float64 parameters are supported"
            )
        if w.shape != g.shape:
            raise ValueError(
                f"gradstab: parameter {i} of {n} has shape {list(w.shape)} but its gradient "
                f"has shape {list(g.shape)}"
            )


def unit_view(t: Tensor) -> Tensor:
    """``t`` as ``[units, unit_len]``: one row per slice along dim 0; one row for 0-/1-D tensors."""
    if t.dim() <= 1:
        return t.reshape(1, t.numel())
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))


def _unit_norms64(t: Tensor, norm_type: float) -> Tensor:
    """Float64 p-norm of every unit (row of :func:`unit_view`), overflow/underflow safe."""
    x = unit_view(t.detach()).to(torch.float64)
    if x.shape[1] == 0:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    m = x.abs().amax(dim=1)  # NaN-propagating
    if math.isinf(norm_type):
        return m
    usable = (m > 0) & torch.isfinite(m)
    scale = torch.where(usable, m, torch.ones_like(m))
    return scale * torch.linalg.vector_norm(x / scale[:, None], norm_type, dim=1)


def agc_coefficients(
    grad_unit_norms: Tensor, param_unit_norms: Tensor, clip_factor: float, eps: float
) -> tuple[Tensor, Tensor]:
    """The AGC rule on float64 unit norms: ``(coef, clipped)``.

    ``max_norm = clip_factor * max(||W_i||, eps)`` (a NaN ``||W_i||`` stays NaN);
    a unit is clipped iff ``||G_i|| > max_norm`` (never when either norm is NaN), and
    then scaled by ``max_norm / ||G_i||``; otherwise its coefficient is 1.
    """
    floored = torch.where(param_unit_norms < eps, eps, param_unit_norms)
    max_norm = clip_factor * floored
    clipped = grad_unit_norms > max_norm
    coef = torch.where(clipped, max_norm / grad_unit_norms, torch.ones_like(grad_unit_norms))
    return coef, clipped


def adaptive_clip(
    grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float, norm_type: float
):
    """Reference for ``gradstab::adaptive_clip``: unit-wise AGC in place.

    Returns ``(norms [T], clipped [T] int64, nonfinite [T] int64, total_norm [])``: the
    pre-clip p-norm of each gradient, the number of its units that were clipped, the
    count of its NaN/Inf elements, and the pre-clip total norm.
    """
    check_agc_args(grads, params, clip_factor, eps, norm_type)
    stats = _stats64(grads, norm_type)
    device = grads[0].device if grads else torch.device("cpu")
    # Every unit is decided from the data as it was on entry (gradients and parameters may
    # share memory), an expanded gradient that must change is refused, then the gradients are
    # written in list order (one passed twice is scaled twice), as the C++ kernel does.
    decided = []
    for g, w in zip(grads, params):
        coef, clipped = agc_coefficients(
            _unit_norms64(g, norm_type), _unit_norms64(w, norm_type), clip_factor, eps
        )
        # not written when nothing is clipped (CPU); other devices: a multiply by 1, no sync
        write = g.numel() > 0 and (g.device.type != "cpu" or bool(clipped.any()))
        decided.append((coef, clipped, write))
    _check_writable(grads, [write for _, _, write in decided], "clipped")
    counts = []
    for g, (coef, clipped, write) in zip(grads, decided):
        counts.append(clipped.sum())
        if not write:
            continue
        g.copy_(_scaled(unit_view(g), coef[:, None]).reshape(g.shape))
    clipped_counts = (
        torch.stack(counts) if counts else torch.zeros((0,), dtype=torch.int64, device=device)
    )
    norms, _, nonfinite, total = _finish(grads, stats)
    return norms, clipped_counts, nonfinite, total
