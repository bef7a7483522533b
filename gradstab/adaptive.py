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
  first measure the norm (one read of the gradients), then clip (a second read, and a write
  only if the gradients are clipped)::

      total = gradstab.grad_stats(params).total_norm
      gradstab.clip_grad_norm_(params, thr.threshold(total))
      thr.update(total)

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

import abc
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Union

import torch
from torch import Tensor

from gradstab._common import check_norm_type, collect_grads
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS

__all__ = ["AdaptiveThreshold", "PercentileThreshold", "ZScoreThreshold", "clip_"]

#: The epsilon PyTorch (and gradstab) add to the norm in a clip coefficient.
CLIP_EPS = 1e-6

_F64 = torch.float64
_STATE_VERSION = 1


def _real(owner: str, name: str, value: object, what: str, ok) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {name} must be {what}, got {value!r}")
    v = float(value)
    if not ok(v):
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}")
    return v


def _int(owner: str, name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    if int(value) < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _cap(owner: str, value: object) -> float | None:
    if value is None:
        return None
    return _real(owner, "max_norm", value, "None or a positive number", lambda v: v > 0)


class AdaptiveThreshold(abc.ABC):
    """Base class: a clipping threshold computed on the device from the history of norms.

    Subclasses define the state (``_init_state``), the bound (``_bound``) and the update
    (``_next_state``) as pure functions of device tensors; this class handles devices,
    shapes, validation and checkpoints.

    The state is created on the first call that sees a norm, on that norm's device and with
    its shape (``()`` for a total norm, ``(T,)`` for per-tensor norms); a later norm on
    another device moves the state there (a one-time copy).
    """

    #: Whether :meth:`threshold` needs the current step's norm.
    needs_norm: bool = True

    def __init__(self) -> None:
        self._state: dict[str, Tensor] | None = None

    # -- what a subclass defines -----------------------------------------------------------
    @abc.abstractmethod
    def _config(self) -> dict[str, Any]:
        """The hyperparameters, as saved in a state dict."""

    @abc.abstractmethod
    def _init_state(self, shape: tuple[int, ...], device: torch.device) -> dict[str, Tensor]:
        """A fresh state for norms of ``shape`` on ``device``."""

    @abc.abstractmethod
    def _bound(self, st: dict[str, Tensor], g: Tensor | None) -> Tensor:
        """The bound for norm ``g`` (``None``: before the step) from state ``st``."""

    @abc.abstractmethod
    def _next_state(self, st: dict[str, Tensor], g: Tensor) -> dict[str, Tensor]:
        """The state after folding in norm ``g`` (a pure function)."""

    # -- public API -----------------------------------------------------------------------
    @property
    def owner(self) -> str:
        return type(self).__name__

    @property
    def initialized(self) -> bool:
        """Whether the state exists (a norm has been seen or a state dict loaded)."""
        return self._state is not None

    def threshold(
        self, total_norm: Tensor | None = None, *, device: torch.device | str | None = None
    ) -> Tensor:
        """This step's ``max_norm``: a float64 device tensor shaped like the norms.

        ``inf`` where nothing is to be clipped (then the clip ops write nothing).  No host
        sync; the state is not changed (call :meth:`update` once per step for that).

        Args:
            total_norm: this step's pre-clip norm (0-d, or ``[T]`` per tensor); required when
                :attr:`needs_norm` is True.
            device: where to return the bound when no norm is given (default: the state's
                device, else CPU).

        Returns:
            The bound, to pass as ``max_norm`` to :func:`gradstab.clip_grad_norm_`.

        Example:
            >>> import torch
            >>> from gradstab.adaptive import ZScoreThreshold
            >>> thr = ZScoreThreshold(warmup_steps=2)
            >>> for g in (1.0, 1.2):
            ...     thr.update(torch.tensor(g))
            >>> thr.threshold(torch.tensor(1.1)), thr.threshold(torch.tensor(9.0))
            (tensor(inf, dtype=torch.float64), tensor(1.1079, dtype=torch.float64))
        """
        if total_norm is None:
            if self.needs_norm:
                raise ValueError(
                    f"{self.owner}.threshold: this rule needs the current step's norm; pass "
                    "it (e.g. gradstab.grad_stats(params).total_norm), or use "
                    "gradstab.adaptive.clip_(params, threshold)"
                )
            if self._state is None:
                dev = torch.device("cpu") if device is None else torch.device(device)
                st = self._init_state((), dev)
            else:
                st = self._state
                if device is not None and torch.device(device) != self._device():
                    st = self._moved(torch.device(device))
            return self._bound(st, None)
        g = self._as_norm(total_norm, "threshold")
        return self._bound(self._ensure_state(g), g)

    def update(self, total_norm: Tensor | float) -> None:
        """Fold this step's pre-clip norm into the state: once per optimizer step.

        Non-finite norms are ignored.  No host sync.

        Args:
            total_norm: the norm the step measured before clipping, the same value given to
                :meth:`threshold` (0-d, or ``[T]`` per tensor).

        Example:
            >>> import torch
            >>> from gradstab.adaptive import PercentileThreshold
            >>> thr = PercentileThreshold(percentile=100.0, include_current=False)
            >>> thr.update(torch.tensor(2.0)); thr.update(torch.tensor(float("nan")))
            >>> thr.threshold()
            tensor(2., dtype=torch.float64)
        """
        g = self._as_norm(total_norm, "update")
        self._state = self._next_state(self._ensure_state(g), g)

    def reset(self) -> None:
        """Forget the history (the state is created again by the next norm)."""
        self._state = None

    def state_dict(self) -> dict[str, Any]:
        """The configuration and a copy of the device state (tensors keep their device).

        Example:
            >>> import torch
            >>> from gradstab.adaptive import ZScoreThreshold
            >>> a = ZScoreThreshold(warmup_steps=2); a.update(torch.tensor(1.0))
            >>> b = ZScoreThreshold(warmup_steps=2); b.load_state_dict(a.state_dict())
            >>> torch.equal(b.state_dict()["state"]["count"], torch.tensor(1))
            True
        """
        state = None if self._state is None else {k: v.clone() for k, v in self._state.items()}
        return {
            "kind": self.owner,
            "version": _STATE_VERSION,
            "config": self._config(),
            "state": state,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> None:
        """Restore a :meth:`state_dict`; the sequence of thresholds continues exactly.

        Args:
            state_dict: from :meth:`state_dict` of the same class.
            strict: refuse a state saved with another configuration (``strict=False``
                accepts other hyperparameters, but never another buffer size).

        Raises:
            ValueError: wrong class, a differing configuration, or malformed state tensors.
        """
        name = f"{self.owner}.load_state_dict"
        if not isinstance(state_dict, Mapping) or "state" not in state_dict:
            raise ValueError(f"{name}: expected a dict from state_dict(), got {state_dict!r}")
        kind = state_dict.get("kind")
        if kind != self.owner:
            raise ValueError(f"{name}: the state was saved by {kind!r}, not {self.owner!r}")
        config = dict(state_dict.get("config", {}))
        mine = self._config()
        for key, value in mine.items():
            if config.get(key) != value and (strict or key in self._structural):
                raise ValueError(
                    f"{name}: the state was saved with {key}={config.get(key)!r} but this "
                    f"object has {key}={value!r}; construct it with the saved configuration"
                    + ("" if key in self._structural else " (or pass strict=False)")
                )
        state = state_dict["state"]
        if state is None:
            self._state = None
            return
        self._check_state(state, name)
        self._state = {k: state[k].detach().clone() for k in self._state_keys}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{self.owner}({args})"

    # -- helpers --------------------------------------------------------------------------
    _state_keys: tuple[str, ...] = ()
    _structural: tuple[str, ...] = ()

    def _device(self) -> torch.device:
        assert self._state is not None
        return next(iter(self._state.values())).device

    def _shape(self) -> tuple[int, ...]:
        assert self._state is not None
        return tuple(self._state["count"].shape)

    def _moved(self, device: torch.device) -> dict[str, Tensor]:
        assert self._state is not None
        return {k: v.to(device) for k, v in self._state.items()}

    def _as_norm(self, value: object, method: str) -> Tensor:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            dev = self._device() if self._state is not None else torch.device("cpu")
            return torch.full((), float(value), dtype=_F64, device=dev)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"{self.owner}.{method}: the norm must be a tensor (0-d, or [T] per tensor) or "
                f"a number, got {type(value).__name__}"
            )
        if not value.is_floating_point():
            raise TypeError(
                f"{self.owner}.{method}: the norm must be a floating tensor, got {value.dtype}"
            )
        if value.dim() > 1:
            raise ValueError(
                f"{self.owner}.{method}: the norm must be 0-d (total norm) or 1-D (one norm "
                f"per tensor), got shape {list(value.shape)}"
            )
        if self._state is not None and tuple(value.shape) != self._shape():
            raise ValueError(
                f"{self.owner}.{method}: got a norm of shape {list(value.shape)} but the "
                f"state tracks shape {list(self._shape())}; use one threshold object per "
                "parameter set (reset() to start over)"
            )
        return value.detach().to(_F64)

    def _ensure_state(self, g: Tensor) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._init_state(tuple(g.shape), g.device)
        elif self._device() != g.device:
            self._state = self._moved(g.device)
        return self._state

    def _check_state(self, state: Mapping[str, Any], name: str) -> None:
        missing = [k for k in self._state_keys if not isinstance(state.get(k), Tensor)]
        if missing:
            raise ValueError(f"{name}: the state lacks tensor(s) {missing}")
        shape = tuple(state["count"].shape)
        template = self._init_state(shape, torch.device("meta"))
        for k in self._state_keys:
            t, want = state[k], template[k]
            if t.shape != want.shape or t.dtype != want.dtype:
                raise ValueError(
                    f"{name}: state tensor {k!r} has shape {list(t.shape)} and dtype "
                    f"{t.dtype}, expected {list(want.shape)} and {want.dtype}"
                )
        devices = {state[k].device for k in self._state_keys}
        if len(devices) != 1:
            raise ValueError(f"{name}: the state tensors are on several devices: {devices}")


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
        """Device tensors: ``mean``, ``std``, ``count`` (finite norms seen), ``spikes``."""
        if self._state is None:
            return None
        st = self._state
        return {
            "mean": st["mean"],
            "std": st["var"].sqrt(),
            "count": st["count"],
            "spikes": st["spikes"],
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
        """Device tensors: ``count`` (finite norms seen) and the ``percentile`` of the history."""
        if self._state is None:
            return None
        return {"count": self._state["count"], "percentile": self._percentile(self._state)}

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
    clip (a second read, a write only where clipped); the others clip in one fused pass.
    Nothing is read on the host (per-layer clipping calls the per-layer op once per
    gradient, each with its 0-d bound).

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
        if threshold.needs_norm:
            total = OPS["grad_stats"](grads, p)[3]
            OPS["clip_norm"](grads, threshold.threshold(total), p, CLIP_EPS, False)
        else:
            bound = threshold.threshold(device=device)
            total = OPS["clip_norm"](grads, bound, p, CLIP_EPS, False)[3]
        threshold.update(total)
        return total
    if threshold.needs_norm:
        norms = OPS["grad_stats"](grads, p)[0]
        bounds = threshold.threshold(norms)
        for g, b in zip(grads, bounds.unbind(0)):
            OPS["clip_norm_per_layer"]([g], b, p, CLIP_EPS)
    else:
        bounds = threshold.threshold(device=device).expand(n)
        norms = torch.cat(
            [OPS["clip_norm_per_layer"]([g], b, p, CLIP_EPS)[0] for g, b in zip(grads, bounds)]
        )
    threshold.update(norms)
    return norms
