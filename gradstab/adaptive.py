"""Adaptive clipping thresholds that live on the device: z-score (ZClip) and percentile (AutoClip).

A threshold object turns the history of gradient norms into this step's ``max_norm``, a 0-d
(or, per layer, 1-D) float64 tensor on the gradients' device that
:func:`gradstab.clip_grad_norm_` and the ``torch.ops.gradstab`` clip ops accept as is.  Its
state (running statistics, a ring buffer of norms, counters) is a few small device tensors;
computing a threshold and updating the state are a handful of tiny device ops with no
host-device synchronisation (no ``.item()``, no Python ``if`` on a device value), so they can
run every step.  ``state_dict()``/``load_state_dict()`` round-trip the state exactly: a run
resumed from a checkpoint continues the same sequence of thresholds bit for bit.

Two kinds of rule:

* rules whose bound is known before the step (``needs_norm`` is False: a
  :class:`PercentileThreshold` with ``include_current=False``, a :class:`ZScoreThreshold` with
  ``rule="threshold"``) clip in one fused pass::

      total = gradstab.clip_grad_norm_(params, thr.threshold(device=dev))
      thr.update(total)

* rules whose bound depends on the current norm (``needs_norm`` is True: ZClip's
  ``"adaptive_scaling"`` and ``"mean"``, AutoClip's percentile including the current norm)
  first measure the norm (one read of the gradients), then scale by the coefficient that norm
  gives (no second read; a write only if the gradients are clipped)::

      total = gradstab.grad_stats(params).total_norm
      gradstab.clip_grads_with_norm_(params, thr.threshold_and_update(total), total)

With the extension built, each rule is one compiled call: on a CPU state C++
(``gradstab._C.zscore_threshold`` / ``percentile_threshold``), on a CUDA state one kernel
launch (``cuda_zscore_threshold`` / ``cuda_percentile_threshold``, no host sync; the
percentile kernel for histories of up to 4,096 norms), both the arithmetic of
``csrc/common/threshold_rules.h`` and bit-identical to each other: a few microseconds of host
time per step instead of a dozen tiny tensor ops.  Elsewhere (no extension,
``torch.compile``, longer CUDA histories) the tensor ops below compute the same rules on the
device; they agree with the compiled ones to the last bit or two of float64 (the warm-up mean
is summed in another order).

:func:`clip_` does either in one call, for the global norm (``mode="norm"``) or per tensor
(``mode="layer"``, one independent statistic per gradient).  Call ``update`` exactly once per
optimizer step, with the pre-clip norm.

Non-finite norms (NaN/inf, e.g. an fp16 overflow step) never enter the statistics: ``update``
ignores them, and a threshold computed from a NaN norm does not clip (an inf norm counts as a
spike and is clipped like one, which turns its infinite gradient elements into NaN; pair with a
non-finite policy that skips such steps).

Distributed data parallel: every rank holds the same all-reduced gradients, so every rank
computes the same total norm and, updating with it, keeps an identical state; no
communication is needed.  With sharded gradients (FSDP, ZeRO) feed ``update`` and
``threshold`` the *global* norm (all-reduced sum of p-powers), never a shard's.

Example:
    >>> import torch, gradstab
    >>> from gradstab.adaptive import PercentileThreshold, clip_
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> thr = PercentileThreshold(percentile=50.0, history=4)
    >>> for g in ([3.0, 4.0], [0.6, 0.8], [30.0, 40.0]):
    ...     w.grad = torch.tensor(g)
    ...     total = clip_([w], thr)
    >>> w.grad  # clipped to the median of the norms 5, 1, 50
    tensor([3., 4.])
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Union

import torch
from torch import Tensor

from gradstab import _extension
from gradstab._common import check_norm_type, collect_grads
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS
from gradstab._threshold import AdaptiveThreshold, _cap, _int, _real

__all__ = ["AdaptiveThreshold", "PercentileThreshold", "ZScoreThreshold", "clip_"]

#: The epsilon PyTorch (and gradstab) add to the norm in a clip coefficient.
CLIP_EPS = 1e-6

_F64 = torch.float64


def _capped(bound: Tensor, cap: float | None) -> Tensor:
    return bound if cap is None else torch.clamp(bound, max=cap)


class ZScoreThreshold(AdaptiveThreshold):
    """Z-score spike clipping in the manner of ZClip (Kumar et al. 2025).

    Warm-up: the first ``warmup_steps`` finite norms are stored; meanwhile nothing is
    clipped except by the optional hard cap ``max_norm``.  They then initialise the mean
    ``mu`` and variance ``var`` (population variance) of the norm.  Afterwards, for a norm
    ``g`` (all in float64)::

        sigma = sqrt(var);  z = (g - mu) / (sigma + eps)
        spike = z > z_thresh
        target = mu + (z_thresh**2 / z) * sigma   rule="adaptive_scaling" (ZClip's default)
               = mu                               rule="mean"
               = mu + z_thresh * (sigma + eps)    rule="threshold" (the detection bound)
        max_norm = target if spike else inf;  then min(max_norm, max_norm cap)

    ``adaptive_scaling`` is ZClip's reciprocal rule ``z* = z_thresh**2 / z``: the larger the
    spike, the harder it is clipped; it meets ``mu + z_thresh * sigma`` at ``z = z_thresh``.
    The statistics then move by an exponential moving average::

        x = target if spike else g       (update_on_spike="clipped", ZClip's default)
        mu  <- alpha * mu + (1 - alpha) * x
        var <- alpha * var + (1 - alpha) * (x - mu)**2     (with the updated mu)

    or, with ``update_on_spike="skip"``, a spike leaves them unchanged.  The cap does not
    enter the statistics.  Non-finite norms are ignored by the update.

    Args:
        alpha: EMA weight of the old statistics, in ``[0, 1)`` (ZClip: 0.97): near 1
            remembers long (0.97: about 33 steps), smaller follows the latest norms.
        z_thresh: z-score above which a norm is a spike, ``> 0`` (ZClip: 2.5).
        warmup_steps: finite norms collected before the statistics start, ``>= 1`` (ZClip: 25).
        rule: ``"adaptive_scaling"``, ``"mean"`` or ``"threshold"``.  The first two need the
            current norm (:attr:`needs_norm`); ``"threshold"`` clips in one fused pass.
        max_norm: optional hard cap: the bound never exceeds it, warm-up included (default:
            none; ZClip's ``max_grad_norm`` defaults to 1.0, so ZClip's defaults are
            ``ZScoreThreshold(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=1.0)``).
        eps: added to sigma in the z-score, ``>= 0`` (ZClip: 1e-6).
        update_on_spike: ``"clipped"`` (update with the target) or ``"skip"``.

    Example:
        >>> import torch
        >>> from gradstab.adaptive import ZScoreThreshold
        >>> thr = ZScoreThreshold(warmup_steps=3, rule="mean")
        >>> for g in (1.0, 2.0, 3.0):
        ...     thr.update(torch.tensor(g))
        >>> thr.threshold(torch.tensor(10.0))  # z = 8 / 0.816 > 2.5: clip to the mean
        tensor(2., dtype=torch.float64)
    """

    RULES = ("adaptive_scaling", "mean", "threshold")
    SPIKE_UPDATES = ("clipped", "skip")
    _state_keys = ("mean", "var", "count", "spikes", "warmup")
    _structural = ("warmup_steps",)

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        *,
        rule: str = "adaptive_scaling",
        max_norm: float | None = None,
        eps: float = 1e-6,
        update_on_spike: str = "clipped",
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.alpha = _real(owner, "alpha", alpha, "a number in [0, 1)", lambda v: 0 <= v < 1)
        self.z_thresh = _real(
            owner, "z_thresh", z_thresh, "a positive finite number", lambda v: 0 < v < math.inf
        )
        self.warmup_steps = _int(owner, "warmup_steps", warmup_steps, 1)
        if rule not in self.RULES:
            raise ValueError(f"{owner}: rule must be one of {self.RULES}, got {rule!r}")
        self.rule = rule
        self.max_norm = _cap(owner, max_norm)
        self.eps = _real(owner, "eps", eps, "a finite number >= 0", lambda v: 0 <= v < math.inf)
        if update_on_spike not in self.SPIKE_UPDATES:
            raise ValueError(
                f"{owner}: update_on_spike must be one of {self.SPIKE_UPDATES}, got "
                f"{update_on_spike!r}"
            )
        self.update_on_spike = update_on_spike

    @property
    def needs_norm(self) -> bool:  # type: ignore[override]
        """False only for ``rule="threshold"``, whose bound is known before the step."""
        return self.rule != "threshold"

    def statistics(self) -> dict[str, Tensor] | None:
        """Device tensors: ``mean``, ``std``, ``count`` (finite norms seen), ``spikes``.

        Copies: later updates (in place on a CPU state) do not change them."""
        if self._state is None:
            return None
        st = self._state
        return {
            "mean": st["mean"].clone(),
            "std": st["var"].sqrt(),
            "count": st["count"].clone(),
            "spikes": st["spikes"].clone(),
        }

    def _config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "z_thresh": self.z_thresh,
            "warmup_steps": self.warmup_steps,
            "rule": self.rule,
            "max_norm": self.max_norm,
            "eps": self.eps,
            "update_on_spike": self.update_on_spike,
        }

    def _init_state(self, shape: tuple[int, ...], device: torch.device) -> dict[str, Tensor]:
        return {
            "mean": torch.zeros(shape, dtype=_F64, device=device),
            "var": torch.zeros(shape, dtype=_F64, device=device),
            "count": torch.zeros(shape, dtype=torch.int64, device=device),
            "spikes": torch.zeros(shape, dtype=torch.int64, device=device),
            "warmup": torch.zeros((self.warmup_steps, *shape), dtype=_F64, device=device),
        }

    def _detect(self, st: dict[str, Tensor], g: Tensor | None) -> tuple[Tensor, Tensor]:
        """(spike, target) of norm ``g`` against the current statistics."""
        mu, sigma = st["mean"], st["var"].sqrt()
        ready = st["count"] >= self.warmup_steps
        zt = self.z_thresh
        bound = mu + zt * (sigma + self.eps)
        if g is None:  # rule "threshold" before the step: clip anything above the bound
            return ready, bound
        z = (g - mu) / (sigma + self.eps)
        spike = ready & (z > zt)
        if self.rule == "adaptive_scaling":
            target = mu + (zt * zt / z) * sigma
        elif self.rule == "mean":
            target = mu
        else:
            target = bound
        return spike, target

    def _compiled(
        self, st: dict[str, Tensor], g: Tensor | None, *, judge: bool, update: bool
    ) -> tuple[bool, Tensor | None]:
        fn = self._compiled_rule(
            st, g, _extension.zscore_threshold, _extension.cuda_zscore_threshold
        )
        if fn is None:
            return False, None
        bound = fn(
            g,
            st["mean"],
            st["var"],
            st["count"],
            st["spikes"],
            st["warmup"],
            self.alpha,
            self.z_thresh,
            self.eps,
            self.max_norm,
            self.warmup_steps,
            self.RULES.index(self.rule),
            self.update_on_spike == "skip",
            judge,
            update,
        )
        return True, bound

    def _bound(self, st: dict[str, Tensor], g: Tensor | None) -> Tensor:
        spike, target = self._detect(st, g)
        inf = torch.full_like(st["mean"], math.inf)
        return _capped(torch.where(spike, target, inf), self.max_norm)

    def _next_state(self, st: dict[str, Tensor], g: Tensor) -> dict[str, Tensor]:
        n_warm = self.warmup_steps
        count, buf = st["count"], st["warmup"]
        finite = torch.isfinite(g)
        warm = count < n_warm
        # warm-up: store the norm in slot `count`
        slot = count.clamp(max=n_warm - 1).unsqueeze(0)
        take = warm & finite
        stored = torch.where(take, g, buf.gather(0, slot).squeeze(0))
        buf = buf.scatter(0, slot, stored.unsqueeze(0))
        new_count = count + finite.to(count.dtype)
        completes = take & (new_count == n_warm)
        mu0 = buf.mean(0)
        var0 = (buf - mu0).square().mean(0)
        # after warm-up: EMA with the target (spikes) or the norm
        spike, target = self._detect(st, g)
        spike = spike & finite
        x = torch.where(spike, target, g)
        a = self.alpha
        mu_e = a * st["mean"] + (1 - a) * x
        var_e = a * st["var"] + (1 - a) * (x - mu_e).square()
        upd = ~warm & finite
        if self.update_on_spike == "skip":
            upd = upd & ~spike
        mean = torch.where(completes, mu0, torch.where(upd, mu_e, st["mean"]))
        var = torch.where(completes, var0, torch.where(upd, var_e, st["var"]))
        return {
            "mean": mean,
            "var": var,
            "count": new_count,
            "spikes": st["spikes"] + spike.to(count.dtype),
            "warmup": buf,
        }


class PercentileThreshold(AdaptiveThreshold):
    """Percentile-of-history clipping in the manner of AutoClip (Seetharaman et al. 2020).

    The finite norms of the last ``history`` updates are kept in a ring buffer on the device;
    the bound is their ``percentile``-th percentile (linear interpolation between the two
    nearest ranks: with ``m`` sorted values ``v``, rank ``r = percentile / 100 * (m - 1)``,
    ``v[floor(r)] + (r - floor(r)) * (v[floor(r) + 1] - v[floor(r)])``, numpy's default).
    AutoClip keeps every norm and includes the current one (``include_current=True``: the
    bound is the percentile of the history *after* adding this step's norm, and only norms
    above it are clipped); ``include_current=False`` uses the history before this step, so the
    bound is known in advance and the clip is one fused pass.  With no history yet (or during
    ``warmup_steps``), nothing is clipped except by the optional cap ``max_norm``: without a
    cap the first step is never clipped (``include_current=False``: the threshold is inf;
    ``include_current=True``: a norm is not above the percentile of itself).

    Args:
        percentile: in ``[0, 100]`` (AutoClip recommends 10).
        history: ring-buffer length, ``>= 1`` (AutoClip: unbounded; a bounded window also
            follows drifting norms). Memory: ``history`` float64 values per tracked norm.
        include_current: whether this step's norm is part of the history it is judged by.
        warmup_steps: finite norms in the history before clipping starts (default 0; at
            least one is always needed).
        max_norm: optional hard cap: the bound never exceeds it.

    Example:
        >>> import torch
        >>> from gradstab.adaptive import PercentileThreshold
        >>> thr = PercentileThreshold(percentile=50.0, include_current=False)
        >>> for g in (1.0, 3.0, 2.0, 10.0):
        ...     thr.update(torch.tensor(g))
        >>> thr.threshold()  # median of 1, 2, 3, 10
        tensor(2.5000, dtype=torch.float64)
    """

    _state_keys = ("history", "count")
    _structural = ("history",)

    def __init__(
        self,
        percentile: float = 10.0,
        history: int = 1000,
        *,
        include_current: bool = True,
        warmup_steps: int = 0,
        max_norm: float | None = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.percentile = _real(
            owner, "percentile", percentile, "a number in [0, 100]", lambda v: 0 <= v <= 100
        )
        self.history = _int(owner, "history", history, 1)
        if not isinstance(include_current, bool):
            raise TypeError(
                f"{owner}: include_current must be True or False, got {include_current!r}"
            )
        self.include_current = include_current
        self.warmup_steps = _int(owner, "warmup_steps", warmup_steps, 0)
        self.max_norm = _cap(owner, max_norm)

    @property
    def needs_norm(self) -> bool:  # type: ignore[override]
        """True when the current norm is part of the history (``include_current``)."""
        return self.include_current

    def statistics(self) -> dict[str, Tensor] | None:
        """Device tensors: ``count`` (finite norms seen) and the ``percentile`` of the history.

        Copies: later updates (in place on a CPU state) do not change them."""
        if self._state is None:
            return None
        st = self._state
        return {"count": st["count"].clone(), "percentile": self._percentile(st)}

    def _config(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "history": self.history,
            "include_current": self.include_current,
            "warmup_steps": self.warmup_steps,
            "max_norm": self.max_norm,
        }

    def _init_state(self, shape: tuple[int, ...], device: torch.device) -> dict[str, Tensor]:
        return {
            "history": torch.zeros((self.history, *shape), dtype=_F64, device=device),
            "count": torch.zeros(shape, dtype=torch.int64, device=device),
        }

    def _next_state(self, st: dict[str, Tensor], g: Tensor) -> dict[str, Tensor]:
        hist, count = st["history"], st["count"]
        finite = torch.isfinite(g)
        slot = torch.remainder(count, self.history).unsqueeze(0)
        value = torch.where(finite, g, hist.gather(0, slot).squeeze(0))
        return {
            "history": hist.scatter(0, slot, value.unsqueeze(0)),
            "count": count + finite.to(count.dtype),
        }

    def _percentile(self, st: dict[str, Tensor]) -> Tensor:
        hist, count = st["history"], st["count"]
        h = self.history
        m = count.clamp(max=h)  # valid entries: slots [0, m)
        slots = torch.arange(h, device=hist.device).reshape(h, *[1] * count.dim())
        ranked = torch.where(slots < m, hist, math.inf).sort(dim=0).values
        last = (m - 1).clamp(min=0)
        rank = (self.percentile / 100.0) * last.to(_F64)
        lo = rank.floor().to(torch.int64).clamp(max=last)
        hi = (lo + 1).clamp(max=last)
        a = ranked.gather(0, lo.unsqueeze(0)).squeeze(0)
        b = ranked.gather(0, hi.unsqueeze(0)).squeeze(0)
        value = a + (rank - lo.to(_F64)) * (b - a)
        return torch.where(m > 0, value, math.inf)

    def _compiled(
        self, st: dict[str, Tensor], g: Tensor | None, *, judge: bool, update: bool
    ) -> tuple[bool, Tensor | None]:
        cuda_fn = None
        if self.history <= _extension.cuda_max_kernel_history:  # the kernel ranks in O(h^2)
            cuda_fn = _extension.cuda_percentile_threshold
        fn = self._compiled_rule(st, g, _extension.percentile_threshold, cuda_fn)
        if fn is None:
            return False, None
        bound = fn(
            g,
            st["history"],
            st["count"],
            self.percentile,
            self.max_norm,
            self.warmup_steps,
            self.include_current,
            judge,
            update,
        )
        return True, bound

    def _bound(self, st: dict[str, Tensor], g: Tensor | None) -> Tensor:
        if g is None or not self.include_current:
            ready = st["count"] >= max(self.warmup_steps, 1)
            bound = self._percentile(st)
        else:
            after = self._next_state(st, g)
            ready = after["count"] >= max(self.warmup_steps, 1)
            bound = self._percentile(after)
            bound = torch.where(g > bound, bound, math.inf)  # only norms above it are clipped
        return _capped(torch.where(ready, bound, math.inf), self.max_norm)


def clip_(
    parameters: Union[Tensor, Iterable[Tensor]],
    threshold: AdaptiveThreshold,
    *,
    norm_type: float = 2.0,
    mode: str = "norm",
) -> Tensor:
    """Clip with an adaptive threshold and update it: one call per optimizer step.

    ``mode="norm"`` clips the global norm and tracks the total norm (a 0-d state);
    ``mode="layer"`` clips each gradient by its own bound and tracks one statistic per
    gradient (a ``[T]`` state: keep the parameter list and its order fixed).  Rules that
    need the current norm measure it first (:func:`gradstab.grad_stats`, one read), then
    scale by the coefficient it gives (``clip_with_norm``: no second read, a write only
    where clipped); the others clip in one fused pass.  Nothing is read on the host
    (per-layer clipping calls an op once per gradient, each with its 0-d bound).

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped (``None``
            grads skipped); all gradients on one device.
        threshold: a :class:`ZScoreThreshold` or :class:`PercentileThreshold` (one object
            per parameter set and mode).
        norm_type: p of the p-norm.
        mode: ``"norm"`` or ``"layer"``.

    Returns:
        The pre-clip total norm (``"norm"``) or per-gradient norms (``"layer"``).

    Example:
        >>> import torch
        >>> from gradstab.adaptive import ZScoreThreshold, clip_
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> thr = ZScoreThreshold(warmup_steps=2, rule="mean")
        >>> for g in ([0.3, 0.4], [0.6, 0.8], [30.0, 40.0]):
        ...     w.grad = torch.tensor(g)
        ...     total = clip_([w], thr)
        >>> total, w.grad  # the spike (norm 50) clipped to the mean norm 0.75
        (tensor(50.), tensor([0.4500, 0.6000]))
    """
    fn = "gradstab.adaptive.clip_"
    if not isinstance(threshold, AdaptiveThreshold):
        raise TypeError(
            f"{fn}: threshold must be a ZScoreThreshold or PercentileThreshold, got "
            f"{type(threshold).__name__}"
        )
    if mode not in ("norm", "layer"):
        raise ValueError(f"{fn}: mode must be 'norm' or 'layer', got {mode!r}")
    p = check_norm_type(norm_type, fn)
    grads = collect_grads(parameters, fn)
    if not grads:
        return torch.tensor(0.0) if mode == "norm" else torch.zeros((0,))
    device = grads[0].device
    n = len(grads)
    want = () if mode == "norm" else (n,)
    if threshold.initialized and threshold._shape() != want:
        raise ValueError(
            f"{fn}: the threshold tracks norms of shape {list(threshold._shape())} but "
            f"mode={mode!r} with {n} gradient(s) gives shape {list(want)}; use one threshold "
            "object per parameter set and mode"
        )
    warn_if_fallback(device)
    if mode == "norm":
        if threshold.needs_norm:  # one read; the clip writes only if it scales
            total = OPS["grad_stats"](grads, p)[3]
            OPS["clip_with_norm"](grads, threshold.threshold_and_update(total), total, CLIP_EPS)
        else:
            bound = threshold.threshold(device=device)
            total = OPS["clip_norm"](grads, bound, p, CLIP_EPS, False)[3]
            threshold.update(total)
        return total
    if threshold.needs_norm:
        norms = OPS["grad_stats"](grads, p)[0]
        bounds = threshold.threshold_and_update(norms)
        for g, b, gn in zip(grads, bounds.unbind(0), norms.unbind(0)):
            OPS["clip_with_norm"]([g], b, gn, CLIP_EPS)
    else:
        bounds = threshold.threshold(device=device).expand(n)
        norms = torch.cat(
            [OPS["clip_norm_per_layer"]([g], b, p, CLIP_EPS)[0] for g, b in zip(grads, bounds)]
        )
        threshold.update(norms)
    return norms
