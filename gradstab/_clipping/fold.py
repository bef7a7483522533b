"""The clip and the skip folded into a torch fused optimizer's own pass (mode ``"norm"``).

torch's fused optimizers (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with ``fused=True``, CPU and
CUDA) read two optional 0-d float32 device tensors inside ``step()``,
``getattr(optimizer, "grad_scale", None)`` and ``getattr(optimizer, "found_inf", None)``:

- every gradient is divided by ``grad_scale`` in the same pass that updates its parameter, and
  the quotient is written back into ``.grad``;
- ``found_inf == 1`` skips the update: parameters and moments are not written, and the step
  counts are incremented then decremented (unchanged).

``torch.amp.GradScaler`` sets both before it calls ``step()`` of an optimizer with
``_step_supports_amp_scaling`` and deletes them after; when ``unscale_`` was not called it sets
``grad_scale`` to its scale *times the* ``grad_scale`` *already there*.

In mode ``"norm"`` the clip is one coefficient ``c = min(1, max_norm / (total + eps))`` per
step. A folded step measures the gradients (one read, the same statistics as the explicit clip
returns), then sets ``grad_scale = 1 / c`` (times any scale already there) instead of writing
``g * c`` into every gradient, and hands the ``"skip"`` decision to ``found_inf`` instead of
reading the non-finite flag on the host. After the step ``.grad`` holds ``g / (1 / c)``: the
clipped gradient (unscaled under AMP), as after the explicit clip, up to rounding.

The attributes gradstab sets are removed after the step (:func:`restore`), or left to the
GradScaler that deletes them itself. What is *not* folded takes the explicit path: other modes,
``{group: threshold}`` dicts (one coefficient per group; ``grad_scale`` is one per step),
sharded gradients, optimizers that are not one of torch's fused ones in every param group.

Example:
    >>> import torch
    >>> from gradstab._clipping.fold import optimizer_obstacle
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> optimizer_obstacle(torch.optim.AdamW([w], fused=True)) is None
    True
    >>> optimizer_obstacle(torch.optim.AdamW([w]))
    'AdamW without fused=True (in every param group)'
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from gradstab._clipping.config import ClipConfig
from gradstab._clipping.parts import (
    _KERNEL_CHECKED,
    Job,
    Part,
    Stats,
    _bound_tensor,
    _unit_norm,
    measure,
)
from gradstab._clipping.plan import Plan, Unit
from gradstab._clipping.state import ClipState
from gradstab._common import EPS
from gradstab._extension import warn_if_fallback
from gradstab.adaptive import AdaptiveThreshold

#: The optimizers whose ``step()`` reads ``grad_scale`` and ``found_inf`` (with ``fused=True``).
FUSED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad)
_F64 = torch.float64
_MISSING = object()


def check_fold(owner: str, fold: object) -> bool | None:
    """The ``fold`` argument: ``None`` (automatic), ``True`` or ``False``.

    Example:
        >>> check_fold("demo", None) is None
        True
    """
    if fold is not None and not isinstance(fold, bool):
        raise TypeError(
            f"{owner}: fold must be None (fold where possible), True or False; got {fold!r}"
        )
    return fold


def config_obstacle(cfg: ClipConfig) -> str | None:
    """Why these options cannot be folded (``None``: they can).

    Example:
        >>> from gradstab._clipping.config import make_config
        >>> config_obstacle(make_config("demo", mode="value", clip_value=1.0))
        "mode='value' (only mode='norm' has one coefficient per step)"
    """
    if cfg.mode != "norm":
        return f"mode={cfg.mode!r} (only mode='norm' has one coefficient per step)"
    if isinstance(cfg.max_norm, dict):
        return (
            f"max_norm={cfg.max_norm!r} clips each param group with its own coefficient (the "
            "optimizer takes one grad_scale per step)"
        )
    if cfg.process_group is not None:
        return f"process_group={cfg.process_group!r} (sharded gradients take the two-phase path)"
    return None


def _torch_step(cls: type) -> Callable[..., Any]:
    return inspect.unwrap(cls.step)  # torch wraps step() once per class (profile hooks)


def optimizer_obstacle(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot take a folded clip (``None``: it can).

    It must be one of :data:`FUSED_OPTIMIZERS` (a subclass that keeps torch's ``step()``), with
    ``fused=True`` in every param group: a non-fused group would refuse ``grad_scale``.
    """
    name = type(optimizer).__name__
    if _torch_step(type(optimizer)) not in {_torch_step(c) for c in FUSED_OPTIMIZERS}:
        return (
            f"{name} is not one of torch's fused optimizers (Adam, AdamW, SGD, Adagrad with "
            "fused=True; a subclass must keep their step())"
        )
    groups = optimizer.param_groups
    if not groups or not all(g.get("fused") for g in groups):
        return f"{name} without fused=True (in every param group)"
    return None


def plan_obstacle(plan: Plan) -> str | None:
    """Why the parameters of ``plan`` cannot be folded (``None``: they can)."""
    if plan.sharded:
        return "the parameters are sharded (DTensor): the clip takes the two-phase path"
    return None


def resolve(owner: str, fold: bool | None, obstacle: str | None) -> bool:
    """Whether to fold, given the ``fold`` argument and the first obstacle found (if any).

    Raises:
        ValueError: ``fold=True`` and an obstacle.

    Example:
        >>> resolve("demo", None, "mode='value'"), resolve("demo", None, None)
        (False, True)
    """
    if fold is True and obstacle is not None:
        raise ValueError(
            f"{owner}: fold=True folds the clip into the step of a torch fused optimizer "
            f"(Adam, AdamW, SGD, Adagrad with fused=True) in mode='norm', but here: {obstacle}. "
            "Use fold=None (fold where possible) or fold=False"
        )
    return fold is not False and obstacle is None


def skip_on_device_ok(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``found_inf`` can skip this step exactly as not stepping would.

    Fused ``SGD`` with momentum makes its momentum buffers with ``torch.empty_like`` on the
    step where none exists yet and keeps them even when ``found_inf`` skips that step, so
    the next step would start from uninitialized memory. Until every parameter with a gradient
    has its buffer, the skip is decided on the host (one read) instead.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    state = optimizer.state
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        for p in group["params"]:
            if p.grad is not None and (p not in state or "momentum_buffer" not in state[p]):
                return False
    return True


@dataclass
class FoldRequest:
    """Asks :func:`gradstab._clipping.clip_step` for a folded step; it fills in the results.

    Attributes:
        skip_on_device: policy ``"skip"`` may hand its decision to ``found_inf`` (no host read).
        coef: the float64 0-d clip coefficient to fold (``None``: nothing to fold, i.e. no
            gradient this step, or a step :func:`nothing_to_fold` finds neither clips nor skips).
        found_inf: 0-d bool, the step must be skipped (``"skip"`` on the device), or ``None``.
    """

    skip_on_device: bool = True
    coef: Tensor | None = None
    found_inf: Tensor | None = None


def fold_unit(
    cfg: ClipConfig,
    state: ClipState,
    plan: Plan,
    unit: Unit,
    jobs: Sequence[Job],
    *,
    request: FoldRequest,
    grad_scale: Tensor | None,
    with_max_abs: bool,
    check: Callable[[Stats, list[str]], None] | None,
) -> tuple[list[Part], AdaptiveThreshold | None]:
    """Measure the one norm-clipped part of ``unit`` (one read, nothing written), compute its
    coefficient into ``request.coef``, and consult and update an adaptive threshold once.

    The statistics, bound and coefficient are those :func:`gradstab._clipping.parts.run_unit`
    gives the explicit clip, so the logged metrics, counters and history are the same.
    ``check`` (policy ``"raise"``) sees the statistics before any state changes.
    """
    assert unit.kind == "norm" and unit.tracks == "total" and len(jobs) == 1, unit
    job = jobs[0]
    p = cfg.norm_type
    d0 = job.per_dev[0][0]
    for d, *_ in job.per_dev:
        if d not in _KERNEL_CHECKED:
            warn_if_fallback(d)
            _KERNEL_CHECKED.add(d)
    stats = measure(job, p, with_max_abs)
    if check is not None:
        check(stats, job.names)
    thr: AdaptiveThreshold | None = None
    if isinstance(unit.bound, AdaptiveThreshold):
        thr = state.threshold(cfg, unit.key)
        g = _unit_norm(unit, jobs, [stats], grad_scale, plan.cache)
        bound = thr.threshold(g) if thr.needs_norm else thr.threshold(device=d0)
        shown = bound.to(d0, _F64)
    else:
        assert isinstance(unit.bound, float)
        shown = _bound_tensor(unit.bound, d0)
    b = shown if grad_scale is None else shown * grad_scale.to(d0)
    coef = torch.clamp(b / (stats[3].to(_F64) + EPS), max=1.0)
    grads = [gs for _, gs, *_ in job.per_dev]
    names = job.names
    part = Part("norm", names, grads, stats, b, b - EPS, grad_scale, shown, coef.expand(len(names)))
    if thr is not None:
        thr.update(g)
    request.coef = coef
    return [part], thr


def nothing_to_fold(coef: Tensor, found_inf: Tensor | None) -> bool:
    """Whether a folded step would change nothing (coefficient exactly 1, no skip) and knowing
    that costs no host-device sync (both on the CPU, where reading a value is free).

    Then ``grad_scale`` is not set at all: torch's fused step divides by it and writes every
    gradient back (``g / 1``, unchanged), a read+write pass over the gradients that made a
    GPT-2-small fused AdamW step on the CPU ~12% slower. With the attribute left unset the
    healthy step is the optimizer's own step, exactly as unfolded. On CUDA the coefficient stays
    on the device and is always folded (no sync).

    Example:
        >>> nothing_to_fold(torch.tensor(1.0, dtype=torch.float64), None)
        True
        >>> nothing_to_fold(torch.tensor(0.5, dtype=torch.float64), None)
        False
    """
    if not _read_is_free(coef) or (found_inf is not None and not _read_is_free(found_inf)):
        return False
    return bool(coef == 1.0) and (found_inf is None or not bool(found_inf))


def _read_is_free(t: Tensor) -> bool:
    """Whether reading ``t``'s value on the host costs no device sync (a CPU tensor). Tests
    turn it off to run the device path, which reads nothing, on the CPU."""
    return t.device.type == "cpu"


def inverse(coef: Tensor) -> Tensor:
    """``1 / coef`` as the 0-d float32 tensor a fused optimizer divides the gradients by.

    The reciprocal is taken in float64 and rounded once. A NaN coefficient (policy
    ``"ignore"``, NaN norm) gives NaN and 0 (an infinite norm) gives inf: the gradients then
    become what the explicit clip makes of them (NaN; 0 where finite, NaN where infinite).

    Example:
        >>> inverse(torch.tensor(0.25, dtype=torch.float64))
        tensor(4.)
    """
    return torch.reciprocal(coef).to(torch.float32)


@dataclass
class Applied:
    """What :func:`apply` set on an optimizer, and what was there before."""

    optimizer: weakref.ref  # no cycle through the post-hook's slot
    grad_scale: Tensor | None
    found_inf: Tensor | None
    before_scale: Any = _MISSING
    before_found: Any = _MISSING


def apply(optimizer: Any, inv_scale: Tensor, found_inf: Tensor | None) -> Applied:
    """Set ``optimizer.grad_scale`` (and ``found_inf``) for a folded step.

    A ``grad_scale`` already there (an AMP scale) is multiplied by ``inv_scale``; a
    ``found_inf`` already there is combined with ours (the step is skipped if either says so).
    """
    attrs = vars(optimizer)
    before_scale = attrs.get("grad_scale", _MISSING)
    before_found = attrs.get("found_inf", _MISSING)
    scale = inv_scale
    if isinstance(before_scale, Tensor):
        scale = before_scale.to(inv_scale.device, torch.float32) * inv_scale
    optimizer.grad_scale = scale
    found = None
    if found_inf is not None:
        found = found_inf.to(torch.float32)
        if isinstance(before_found, Tensor):
            prev = before_found.to(found.device) != 0
            found = (prev | found_inf.to(found.device)).to(torch.float32)
        optimizer.found_inf = found
    return Applied(weakref.ref(optimizer), scale, found, before_scale, before_found)


def restore(applied: Applied) -> None:
    """Undo :func:`apply`: each attribute that still holds what it set goes back to what was
    there before (or is deleted). An attribute someone replaced since is left alone."""
    optimizer = applied.optimizer()
    if optimizer is None:
        return
    attrs = vars(optimizer)
    for name, ours, before in (
        ("grad_scale", applied.grad_scale, applied.before_scale),
        ("found_inf", applied.found_inf, applied.before_found),
    ):
        if ours is None or attrs.get(name) is not ours:
            continue
        if before is _MISSING:
            del attrs[name]
        else:
            attrs[name] = before


class _Slot:
    """The fold pending on one optimizer, undone by its step post-hook (registered once)."""

    def __init__(self) -> None:
        self.after_step: Applied | None = None  # undone by the post-hook
        self.stale: Applied | None = None  # left to a GradScaler; undone if it is still there

    def hook(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        applied, self.after_step = self.after_step, None
        if applied is not None:
            restore(applied)


_SLOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _slot(optimizer: torch.optim.Optimizer) -> _Slot:
    slot = _SLOTS.get(optimizer)
    if slot is None:
        slot = _SLOTS[optimizer] = _Slot()
        optimizer.register_step_post_hook(slot.hook)
    return slot


def undo_after_step(optimizer: torch.optim.Optimizer, applied: Applied) -> None:
    """Undo ``applied`` right after ``optimizer``'s next ``step()`` (a step post-hook)."""
    _slot(optimizer).after_step = applied


def left_to_scaler(optimizer: torch.optim.Optimizer, applied: Applied) -> None:
    """A GradScaler deletes the attributes after ``step()``; :func:`undo_pending` removes them
    if that step never came (the scaler did not call it)."""
    _slot(optimizer).stale = applied


def undo_pending(optimizer: torch.optim.Optimizer) -> None:
    """Undo a fold whose step has not run (called before the next step's clip)."""
    slot = _SLOTS.get(optimizer)
    if slot is None:
        return
    for applied in (slot.after_step, slot.stale):
        if applied is not None:
            restore(applied)
    slot.after_step = slot.stale = None
