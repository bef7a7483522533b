"""The base class of gradstab's adaptive clipping thresholds (:class:`AdaptiveThreshold`):
devices, shapes, validation, checkpoints, and the hook through which a rule runs compiled.

The rules themselves (:class:`~gradstab.adaptive.ZScoreThreshold`,
:class:`~gradstab.adaptive.PercentileThreshold`) and the user documentation live in
:mod:`gradstab.adaptive`, which re-exports this class.

Example:
    >>> from gradstab._threshold import AdaptiveThreshold
    >>> from gradstab.adaptive import ZScoreThreshold
    >>> issubclass(ZScoreThreshold, AdaptiveThreshold)
    True
"""

from __future__ import annotations

import abc
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

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
            return self._judge(st, None)
        g = self._as_norm(total_norm, "threshold")
        return self._judge(self._ensure_state(g), g)

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
        st = self._ensure_state(g)
        if not self._compiled(st, g, judge=False, update=True)[0]:
            self._state = self._next_state(st, g)

    def threshold_and_update(self, total_norm: Tensor | float) -> Tensor:
        """``threshold(total_norm)`` then ``update(total_norm)``, in one call.

        On a CPU state with the extension built, both run in one compiled call (a few
        microseconds of host time instead of a dozen tensor ops).

        Args:
            total_norm: this step's pre-clip norm (0-d, or ``[T]`` per tensor).

        Returns:
            This step's bound, as :meth:`threshold` gives it.

        Example:
            >>> import torch
            >>> from gradstab.adaptive import ZScoreThreshold
            >>> thr = ZScoreThreshold(warmup_steps=1, rule="mean")
            >>> thr.threshold_and_update(torch.tensor(2.0))  # warm-up: no bound yet
            tensor(inf, dtype=torch.float64)
            >>> thr.threshold_and_update(torch.tensor(9.0))  # a spike: the mean norm
            tensor(2., dtype=torch.float64)
        """
        g = self._as_norm(total_norm, "threshold_and_update")
        st = self._ensure_state(g)
        served, bound = self._compiled(st, g, judge=True, update=True)
        if served:
            return bound  # type: ignore[return-value]
        bound = self._bound(st, g)
        self._state = self._next_state(st, g)
        return bound

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

    def _judge(self, st: dict[str, Tensor], g: Tensor | None) -> Tensor:
        served, bound = self._compiled(st, g, judge=True, update=False)
        return bound if served else self._bound(st, g)  # type: ignore[return-value]

    def _compiled(
        self, st: dict[str, Tensor], g: Tensor | None, *, judge: bool, update: bool
    ) -> tuple[bool, Tensor | None]:
        """The compiled rule on ``st`` (updated in place): ``(True, bound or None)``, or
        ``(False, None)`` where it does not serve (see :meth:`_compiled_rule`) and the tensor
        ops do."""
        return False, None

    def _compiled_rule(
        self, st: dict[str, Tensor], g: Tensor | None, cpu_fn: Any, cuda_fn: Any
    ) -> Any:
        """The compiled rule that serves ``st`` (``cpu_fn`` on the CPU, ``cuda_fn`` on one
        CUDA device), or None: not built, ``torch.compile``, a non-contiguous state, tensors
        on several devices or elsewhere."""
        if torch.compiler.is_compiling():
            return None
        device = next(iter(st.values())).device
        fn = {"cpu": cpu_fn, "cuda": cuda_fn}.get(device.type)
        if fn is None or (g is not None and g.device != device):
            return None
        if all(t.device == device and t.is_contiguous() for t in st.values()):
            return fn
        return None

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
