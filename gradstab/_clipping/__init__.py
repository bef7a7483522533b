"""Clipping, monitoring and non-finite handling shared by the callback and the optimizer wrapper.

Modules: :mod:`.config` (options, metric names), :mod:`.plan` (units and parts),
:mod:`.state` (counters, thresholds), :mod:`.parts` (a part through the ops),
:mod:`.step` (:func:`clip_step`), :mod:`.metrics` (history row, logged metrics),
:mod:`.fold` (the clip and the skip folded into a torch fused optimizer's step).

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

from gradstab._clipping.config import (
    COUNTERS,
    GROUP_BY,
    MODES,
    NONFINITE,
    ClipConfig,
    check_log_every,
    make_config,
    metric_names,
    per_param_prefixes,
)
from gradstab._clipping.fold import FoldRequest
from gradstab._clipping.plan import Plan, build_plan, plan_key
from gradstab._clipping.state import ClipState
from gradstab._clipping.step import clip_step, nonfinite_notice
from gradstab._common import EPS

__all__ = [
    "COUNTERS",
    "EPS",
    "GROUP_BY",
    "MODES",
    "NONFINITE",
    "ClipConfig",
    "ClipState",
    "FoldRequest",
    "Plan",
    "build_plan",
    "check_log_every",
    "clip_step",
    "make_config",
    "metric_names",
    "nonfinite_notice",
    "per_param_prefixes",
    "plan_key",
]
