"""Gradient-health diagnosis: a device-side recorder and a detector that names the problem.

:class:`GradHistory` keeps, per recorded step and per parameter tensor, the statistics that
:func:`gradstab.grad_stats` already computes (norm, max-abs, count of NaN/Inf elements) in
preallocated ring buffers on the gradients' device, plus optional extras: the fraction of
exact zeros in each gradient, each parameter's norm, and per-output-unit "last step with a
non-zero gradient" (for dead units).  Recording never reads a device value on the host; the
history is copied to the host only when asked (:meth:`GradHistory.data`,
:meth:`GradHistory.diagnose`, :meth:`GradHistory.plot`).

:func:`diagnose` turns a history (or a :class:`HistoryData` read from a training log by
``python -m gradstab report``) into a :class:`Diagnosis` that names

- **vanishing** (and **exploding**) layers: a tensor whose gradient magnitude is orders of
  magnitude below (above) the median of the other tensors at the same step, for several
  consecutive steps;
- a **depth trend**: the slope of log-magnitude against depth, fitted over the weight tensors
  in network order; norms that grow toward the input by more than a few decades over the
  depth mean exploding gradients, norms that shrink toward the input mean vanishing ones;
- **spikes**: steps whose total norm jumps far above its running median (a robust z-score of
  the log total norm against the preceding steps), and steps whose total norm is simply huge;
- **dead** parameters: a gradient that was exactly zero, or absent (unused or detached
  parameter), over the whole window; with unit tracking, dead output units of a layer;
- where **non-finite** values first appeared: the step and the parameter.

Network order is the registration order of ``module.named_parameters()``, which follows the
forward pass for ``nn.Sequential`` and for modules that create their layers in the order they
use them.  *Backward order* is the reverse of network order: autograd computes the gradients
of the layers near the output first.  A NaN/Inf produced inside the backward pass at layer
``k`` reaches layer ``k`` and every layer before it, so the origin of a non-finite gradient is
the affected parameter that comes **first in backward order** (the last affected one in network
order); a NaN loss poisons every gradient, and then the origin is the output layer.

Example:
    >>> import torch, gradstab
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> history = gradstab.GradHistory(model, capacity=100)
    >>> for _ in range(3):
    ...     model.zero_grad()
    ...     model(torch.randn(16, 4)).pow(2).mean().backward()
    ...     history.record_step()
    >>> report = gradstab.diagnose(history)
    >>> report.steps
    3
"""

from __future__ import annotations

import dataclasses
import io
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn

from gradstab.functional import grad_stats

__all__ = [
    "DeadParam",
    "DepthTrend",
    "Diagnosis",
    "GradHistory",
    "HistoryData",
    "LayerReport",
    "NonfiniteReport",
    "Spike",
    "Thresholds",
    "diagnose",
]

_F32 = torch.float32
_F64 = torch.float64

#: Row layout of the per-tensor float buffer: norm, max-abs, zero fraction, parameter norm.
_NORM, _MAXABS, _ZERO, _PNORM = range(4)
#: Row layout of the per-step scalar buffer: total norm, post-clip total norm, clip threshold.
_TOTAL, _POST, _THRESH = range(3)


def _is_stats(x: object) -> bool:
    return (
        isinstance(x, (tuple, list))
        and len(x) == 4
        and all(isinstance(t, Tensor) for t in x)
        and x[3].dim() == 0
    )


def _check_positive_int(owner: str, name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{owner}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_norm_type(owner: str, value: object) -> float:
    try:
        p = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(
            f"{owner}: norm_type must be a positive number or inf, got {value!r}"
        ) from None
    if isinstance(value, bool) or math.isnan(p) or p <= 0:
        raise ValueError(f"{owner}: norm_type must be a positive number or inf, got {value!r}")
    return p


# =========================================================================== host-side data


@dataclass
class HistoryData:
    """A gradient history on the host: what :func:`diagnose` and the plots read.

    Rows are recorded steps in chronological order, columns are parameter tensors in network
    order.  Missing values are NaN (a tensor without a gradient at that step, a statistic that
    was not recorded or not logged).  Built by :meth:`GradHistory.data` or, from a training
    log, by :func:`gradstab.report.read_log`.

    Attributes:
        names: parameter names, network order (``T``).
        steps: the step number of each row (``S``).
        norms: ``[S, T]`` float64 gradient p-norm per tensor.
        present: ``[S, T]`` bool, the tensor had a gradient (a value) at that step.
        total_norm: ``[S]`` float64 total p-norm of all gradients (pre-clip).
        max_abs: ``[S, T]`` float64 largest ``|g|`` per tensor, or ``None``.
        nonfinite: ``[S, T]`` float64 count of NaN/Inf elements per tensor, or ``None``
            (then a non-finite norm marks a non-finite gradient).
        zero_fraction: ``[S, T]`` float64 fraction of exact zeros per gradient, or ``None``.
        param_norms: ``[S, T]`` float64 2-norm of each parameter, or ``None``.
        post_clip_norm: ``[S]`` float64 total norm after clipping, or ``None``.
        clip_threshold: ``[S]`` float64 clip threshold in force at each step, or ``None``.
        skipped: ``[S]`` bool, the optimizer step was skipped, or ``None``.
        nonfinite_step: ``[S]`` bool, some gradient held a NaN/Inf at (or, for a training log,
            since the previous row up to) that step, or ``None`` (derived from the others).
        shapes: the shape of each parameter, or ``None`` (unknown, e.g. from a log).
        norm_type: p of the norms.
        first_nonfinite: ``(step, [names])`` of the first step whose gradients held a NaN/Inf
            since recording began (kept on the device by :class:`GradHistory`, so it survives
            the ring buffer), or ``None``.
        unit_last_nonzero: per tensor name, an int64 tensor ``[units]`` with the last step at
            which each output unit (row ``i`` of dimension 0) had a non-zero gradient (-1:
            never), or ``None`` when units were not tracked.
        unit_tracking_since: the first step at which units were tracked.
        source: where the data came from (for messages).
    """

    names: list[str]
    steps: list[int]
    norms: Tensor
    present: Tensor
    total_norm: Tensor
    max_abs: Tensor | None = None
    nonfinite: Tensor | None = None
    zero_fraction: Tensor | None = None
    param_norms: Tensor | None = None
    post_clip_norm: Tensor | None = None
    clip_threshold: Tensor | None = None
    skipped: Tensor | None = None
    nonfinite_step: Tensor | None = None
    shapes: list[tuple[int, ...]] | None = None
    norm_type: float = 2.0
    first_nonfinite: tuple[int, list[str]] | None = None
    unit_last_nonzero: dict[str, Tensor] | None = None
    unit_tracking_since: int | None = None
    source: str = "GradHistory"

    def __post_init__(self) -> None:
        s, t = len(self.steps), len(self.names)
        if tuple(self.norms.shape) != (s, t):
            raise ValueError(
                f"HistoryData: norms has shape {tuple(self.norms.shape)}, expected ({s}, {t}) "
                "(steps x names)"
            )
        if self.nonfinite_step is None:
            nf = torch.isinf(self.total_norm)
            nf |= (self.present & ~torch.isfinite(self.norms)).any(dim=1)
            if self.nonfinite is not None:
                nf |= (torch.nan_to_num(self.nonfinite, nan=0.0) > 0).any(dim=1)
            self.nonfinite_step = nf

    @property
    def num_steps(self) -> int:
        """``S``, the number of rows."""
        return len(self.steps)

    def window(self, last: int | None) -> HistoryData:
        """The last ``last`` rows (all when ``None``), as a new :class:`HistoryData`."""
        if last is None or last >= self.num_steps:
            return self
        lo = self.num_steps - last

        def cut(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[lo:]

        return dataclasses.replace(
            self,
            steps=self.steps[lo:],
            norms=self.norms[lo:],
            present=self.present[lo:],
            total_norm=self.total_norm[lo:],
            max_abs=cut(self.max_abs),
            nonfinite=cut(self.nonfinite),
            zero_fraction=cut(self.zero_fraction),
            param_norms=cut(self.param_norms),
            post_clip_norm=cut(self.post_clip_norm),
            clip_threshold=cut(self.clip_threshold),
            skipped=cut(self.skipped),
            nonfinite_step=cut(self.nonfinite_step),
        )


# =========================================================================== the recorder


class GradHistory:
    """Per-step, per-tensor gradient statistics kept on the device in ring buffers.

    Each :meth:`record` writes one row (one step) into preallocated device buffers with a few
    small kernels and no host synchronisation; the oldest row is overwritten once
    ``capacity`` rows are held.  What is kept per tensor and step: the gradient norm, max-abs
    and NaN/Inf count (from :func:`gradstab.grad_stats` or a clip op: no extra pass), and,
    every ``extras_every`` recorded steps:

    - ``zero_fraction``: the fraction of exact zeros, from ``torch._foreach_norm(grads, 0)``
      (the count of non-zeros; float32 accumulation).  **Cost: one extra read of every
      gradient** on the steps where it is computed (no temporary the size of a gradient).
    - ``param_norms``: each parameter's 2-norm, ``torch._foreach_norm(params)``.  **Cost: one
      read of every parameter**.  It gives the gradient-to-weight ratio ``||g|| / ||w||``
      (the update-to-weight ratio of plain SGD divided by the learning rate).
    - ``track_units`` (off by default): for every tensor of dimension >= 1, the last step at
      which each output unit (each index of dimension 0: a row of a ``Linear`` weight, an
      output channel of a convolution, an element of a bias) had a non-zero gradient.
      **Cost: one extra read of every gradient** (a row-wise max-abs per tensor, one small
      kernel per tensor) and ``sum(shape[0])`` int64 of device memory.

    Beyond the ring, two small device trackers cover the whole run: the first step with a
    NaN/Inf gradient with the tensors affected then, and the units' last non-zero steps.

    Recording with the same ``step`` as the previous record merges into the same row (the
    tensors of the second call are added, total norms combine as p-norms), so several
    optimizers stepping in one training step give one row.

    Memory: ``capacity x T x 37`` bytes (four float64 and one int32 statistic and a flag per
    tensor), e.g. 5.5 MB for 148 tensors (GPT-2 small) and 1,000 steps.

    Args:
        parameters: an ``nn.Module`` (its ``named_parameters()`` that require a gradient, in
            registration order), or an iterable of ``(name, parameter)`` pairs in network
            order.  Use :meth:`from_names` when only names are known.
        capacity: the number of steps kept (>= 1).
        norm_type: p of the norms recorded (must match the statistics passed to
            :meth:`record`).
        zero_fraction: record the fraction of exact zeros (needs gradients; see cost above).
        param_norms: record parameter norms (needs the parameters; see cost above).
        track_units: track dead output units (needs gradients; see cost above).
        extras_every: compute the extras on every ``extras_every``-th recorded step only
            (NaN in between; the unit tracker is simply updated less often).
        device: the device of the buffers; default: that of the first statistics recorded.

    Example:
        >>> import torch, gradstab
        >>> model = torch.nn.Linear(3, 2)
        >>> h = gradstab.GradHistory(model, capacity=10)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> h.record_step(step=0)
        >>> h.data().names
        ['weight', 'bias']
    """

    _owner = "GradHistory"

    def __init__(
        self,
        parameters: Union[nn.Module, Iterable[tuple[str, Tensor]]],
        *,
        capacity: int = 1000,
        norm_type: float = 2.0,
        zero_fraction: bool = True,
        param_norms: bool = True,
        track_units: bool = False,
        extras_every: int = 1,
        device: Union[torch.device, str, None] = None,
    ) -> None:
        if isinstance(parameters, nn.Module):
            named = [(n, p) for n, p in parameters.named_parameters() if p.requires_grad]
        else:
            named = []
            for i, item in enumerate(parameters):
                if (
                    not isinstance(item, (tuple, list))
                    or len(item) != 2
                    or not isinstance(item[0], str)
                    or not isinstance(item[1], Tensor)
                ):
                    raise TypeError(
                        f"{self._owner}: parameters must be an nn.Module or an iterable of "
                        f"(name, tensor) pairs; item {i} is {item!r:.80}"
                    )
                named.append((item[0], item[1]))
        self._init(
            [n for n, _ in named],
            [tuple(p.shape) for _, p in named],
            [p for _, p in named],
            capacity=capacity,
            norm_type=norm_type,
            zero_fraction=zero_fraction,
            param_norms=param_norms,
            track_units=track_units,
            extras_every=extras_every,
            device=device,
        )

    @classmethod
    def from_names(
        cls,
        names: Sequence[str],
        *,
        shapes: Sequence[Sequence[int]] | None = None,
        capacity: int = 1000,
        norm_type: float = 2.0,
        zero_fraction: bool = True,
        track_units: bool = False,
        extras_every: int = 1,
        device: Union[torch.device, str, None] = None,
    ) -> GradHistory:
        """A history for named tensors without the parameter objects (no parameter norms).

        Args:
            names: parameter names in network order (unique).
            shapes: their shapes (needed for ``track_units`` and for the per-element RMS the
                diagnosis compares; without them it compares norms).
            capacity, norm_type, zero_fraction, track_units, extras_every, device: as in
                :class:`GradHistory`.

        Returns:
            The history; :meth:`record_step` is not available (no parameters).

        Example:
            >>> h = GradHistory.from_names(["0.weight", "0.bias"], shapes=[(2, 3), (2,)])
            >>> h.names
            ['0.weight', '0.bias']
        """
        self = cls.__new__(cls)
        names = list(names)
        if shapes is not None:
            shapes = [tuple(int(d) for d in s) for s in shapes]
            if len(shapes) != len(names):
                raise ValueError(
                    f"{cls._owner}.from_names: {len(shapes)} shapes for {len(names)} names"
                )
        self._init(
            names,
            shapes,
            None,
            capacity=capacity,
            norm_type=norm_type,
            zero_fraction=zero_fraction,
            param_norms=False,
            track_units=track_units,
            extras_every=extras_every,
            device=device,
        )
        return self

    def _init(
        self,
        names: list[str],
        shapes: list[tuple[int, ...]] | None,
        params: list[Tensor] | None,
        *,
        capacity: int,
        norm_type: float,
        zero_fraction: bool,
        param_norms: bool,
        track_units: bool,
        extras_every: int,
        device: Union[torch.device, str, None],
    ) -> None:
        owner = self._owner
        if not names:
            raise ValueError(f"{owner}: no parameters to record (none requires a gradient)")
        for n in names:
            if not isinstance(n, str):
                raise TypeError(f"{owner}: parameter names must be strings, got {n!r}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"{owner}: parameter name {dup!r} appears more than once")
        self._capacity = _check_positive_int(owner, "capacity", capacity)
        self._every = _check_positive_int(owner, "extras_every", extras_every)
        self._p = _check_norm_type(owner, norm_type)
        for flag_name, flag in (
            ("zero_fraction", zero_fraction),
            ("param_norms", param_norms),
            ("track_units", track_units),
        ):
            if not isinstance(flag, bool):
                raise TypeError(f"{owner}: {flag_name} must be True or False, got {flag!r}")
        if track_units and shapes is None:
            raise ValueError(f"{owner}: track_units=True needs the parameters' shapes")
        self.names: list[str] = names
        self.shapes: list[tuple[int, ...]] | None = shapes
        self._params = params
        self._zero = zero_fraction
        self._pnorms = param_norms and params is not None
        self._units = track_units
        self._device = torch.device(device) if device is not None else None
        self._pos = {n: i for i, n in enumerate(names)}
        numel = [math.prod(s) for s in shapes] if shapes is not None else None
        self._numel = numel
        # unit offsets: tensor i owns units [off[i], off[i] + shape[0]) (dimension >= 1 only)
        self._unit_off: list[int] = []
        self._unit_len: list[int] = []
        if track_units and shapes is not None:
            off = 0
            for s in shapes:
                k = s[0] if len(s) >= 1 else 0
                self._unit_off.append(off)
                self._unit_len.append(k)
                off += k
            self._total_units = off
        self._idx_cache: dict[tuple[str, ...], tuple[Tensor | None, list[int]]] = {}
        self._unit_idx_cache: dict[tuple[str, ...], Tensor] = {}
        self._numel_cache: dict[tuple[str, ...], Tensor] = {}
        self.reset()

    # ------------------------------------------------------------------ state

    @property
    def capacity(self) -> int:
        """The number of steps kept."""
        return self._capacity

    @property
    def norm_type(self) -> float:
        """p of the recorded norms."""
        return self._p

    def __len__(self) -> int:
        """The number of rows held (at most ``capacity``)."""
        return min(self._rows, self._capacity)

    def reset(self) -> None:
        """Forget every recorded step (the buffers are kept)."""
        self._rows = 0  # rows started since the last reset
        self._steps: list[int] = [0] * self._capacity
        self._last_step: int | None = None
        self._first_unit_step: int | None = None
        if getattr(self, "_f", None) is not None:
            self._first_nf_step.fill_(-1)
            self._first_nf_mask.zero_()
            if self._units:
                self._unit_last.fill_(-1)

    def _allocate(self, device: torch.device) -> None:
        c, t = self._capacity, len(self.names)
        self._device = device
        self._f = torch.full((c, 4, t), math.nan, dtype=_F64, device=device)
        self._nf = torch.zeros((c, t), dtype=torch.int32, device=device)
        self._present = torch.zeros((c, t), dtype=torch.bool, device=device)
        self._s = torch.full((c, 3), math.nan, dtype=_F64, device=device)
        self._skipped = torch.zeros((c,), dtype=torch.bool, device=device)
        self._first_nf_step = torch.full((), -1, dtype=torch.int64, device=device)
        self._first_nf_mask = torch.zeros((t,), dtype=torch.bool, device=device)
        if self._units:
            self._unit_last = torch.full((self._total_units,), -1, dtype=torch.int64, device=device)

    _f: Tensor | None = None

    def _index(self, names: Sequence[str]) -> tuple[Tensor | None, list[int]]:
        key = tuple(names)
        hit = self._idx_cache.get(key)
        if hit is not None:
            return hit
        pos = []
        for n in names:
            i = self._pos.get(n)
            if i is None:
                raise KeyError(
                    f"{self._owner}.record: parameter name {n!r} is not one of the "
                    f"{len(self.names)} names this history was built with"
                )
            pos.append(i)
        if len(set(pos)) != len(pos):
            raise ValueError(f"{self._owner}.record: a parameter name is repeated in names")
        if pos == list(range(len(self.names))):
            hit = (None, pos)
        else:
            assert self._device is not None
            hit = (torch.tensor(pos, dtype=torch.int64, device=self._device), pos)
        self._idx_cache[key] = hit
        return hit

    # ------------------------------------------------------------------ recording

    @torch.no_grad()
    def record(
        self,
        stats: Union[Sequence[Tensor], Sequence[Sequence[Tensor]]],
        names: Sequence[str] | None = None,
        *,
        grads: Sequence[Tensor] | None = None,
        post_clip_norm: Union[Tensor, float, None] = None,
        clip_threshold: Union[Tensor, float, None] = None,
        skipped: Union[Tensor, bool, None] = None,
        scale: Tensor | None = None,
        step: int | None = None,
    ) -> None:
        """Record one step's statistics (no host synchronisation).

        Args:
            stats: a :class:`gradstab.GradStats` (or any ``(norms, max_abs, nonfinite,
                total_norm)`` tuple returned by a ``torch.ops.gradstab`` op), or a sequence
                of them (several devices or parameter groups of one step); their rows are
                taken in order.
            names: the parameter name of each row of ``stats`` (concatenated); default: all
                names of this history, in order.  Tensors not named have no gradient at this
                step.
            grads: the gradients, aligned with ``names``; needed for ``zero_fraction`` and
                ``track_units`` (skipped when not given).
            post_clip_norm: the total norm after clipping (number or 0-d tensor).
            clip_threshold: the clip threshold in force (number or 0-d tensor).
            skipped: the optimizer step was skipped (bool or 0-d bool tensor).
            scale: the statistics are those of gradients multiplied by this 0-d tensor (a
                fused optimizer under a GradScaler); they are divided by it.
            step: the step number (default: the previous one plus 1, or 0).  The same step
                as the previous record merges into its row.

        Example:
            >>> import torch, gradstab
            >>> w = torch.nn.Parameter(torch.ones(3)); w.grad = torch.tensor([0.0, 3.0, 4.0])
            >>> h = gradstab.GradHistory([("w", w)])
            >>> h.record(gradstab.grad_stats([w]), ["w"], grads=[w.grad], step=7)
            >>> d = h.data(); d.steps, d.norms.tolist(), round(d.zero_fraction.item(), 6)
            ([7], [[5.0]], 0.333333)
        """
        parts = [stats] if _is_stats(stats) else list(stats)  # type: ignore[list-item]
        for i, part in enumerate(parts):
            if not _is_stats(part):
                raise TypeError(
                    f"{self._owner}.record: stats must be a GradStats (norms, max_abs, "
                    f"nonfinite, total_norm) or a sequence of them; part {i} is "
                    f"{type(part).__name__}"
                )
        names = list(self.names if names is None else names)
        rows = sum(int(part[0].numel()) for part in parts)
        if rows != len(names):
            raise ValueError(
                f"{self._owner}.record: the statistics have {rows} rows but {len(names)} "
                "names were given"
            )
        if grads is not None and len(grads) != len(names):
            raise ValueError(f"{self._owner}.record: {len(grads)} grads for {len(names)} names")
        if step is None:
            step = 0 if self._last_step is None else self._last_step + 1
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"{self._owner}.record: step must be an int, got {step!r}")
        step = int(step)
        if self._f is None:
            dev = self._device
            if dev is None:
                dev = parts[0][0].device if parts else torch.device("cpu")
            self._allocate(dev)
        dev = self._device
        assert dev is not None
        idx, pos_list = self._index(names)
        # validate everything before the row is touched
        post = _as_device_scalar(post_clip_norm, dev, "post_clip_norm", self._owner)
        thr = _as_device_scalar(clip_threshold, dev, "clip_threshold", self._owner)
        if skipped is not None and not isinstance(skipped, (bool, Tensor)):
            raise TypeError(
                f"{self._owner}.record: skipped must be a bool or a bool tensor, got {skipped!r}"
            )
        if scale is not None and (not isinstance(scale, Tensor) or scale.numel() != 1):
            raise TypeError(f"{self._owner}.record: scale must be a 0-d tensor, got {scale!r}")

        merge = self._last_step is not None and step == self._last_step and self._rows > 0
        if not merge:
            self._rows += 1
        row = (self._rows - 1) % self._capacity
        if not merge:
            self._f[row].fill_(math.nan)
            self._nf[row].zero_()
            self._present[row].zero_()
            self._s[row].fill_(math.nan)
            self._skipped[row].zero_()
            self._steps[row] = step
        self._last_step = step

        def cat(k: int) -> Tensor:
            ts = [part[k].to(dev) for part in parts]
            return ts[0] if len(ts) == 1 else torch.cat(ts)

        p = self._p
        if parts:
            norms = cat(0).to(_F64)
            max_abs = cat(1).to(_F64)
            nonfinite = cat(2).to(torch.int32)
            totals = torch.stack([part[3].to(dev, _F64) for part in parts])
            total = _pnorm64(totals, p)
        else:
            norms = max_abs = torch.zeros((0,), dtype=_F64, device=dev)
            nonfinite = torch.zeros((0,), dtype=torch.int32, device=dev)
            total = torch.zeros((), dtype=_F64, device=dev)
        if scale is not None:
            s = scale.to(dev, _F64).reshape(())
            norms, max_abs, total = norms / s, max_abs / s, total / s
            if post is not None:
                post = post / s

        f = self._f[row]
        if idx is None:
            f[_NORM].copy_(norms)
            f[_MAXABS].copy_(max_abs)
            self._nf[row].copy_(nonfinite)
            self._present[row].fill_(True)
        else:
            f[_NORM].index_copy_(0, idx, norms)
            f[_MAXABS].index_copy_(0, idx, max_abs)
            self._nf[row].index_copy_(0, idx, nonfinite)
            self._present[row].index_fill_(0, idx, True)
        if merge:
            old = self._s[row, _TOTAL]
            self._s[row, _TOTAL] = torch.where(torch.isnan(old), total, _pcombine(old, total, p))
            if post is not None:
                old = self._s[row, _POST]
                self._s[row, _POST] = torch.where(torch.isnan(old), post, _pcombine(old, post, p))
        else:
            self._s[row, _TOTAL] = total
            if post is not None:
                self._s[row, _POST] = post
        if thr is not None:
            self._s[row, _THRESH] = thr
        if isinstance(skipped, Tensor):
            self._skipped[row].logical_or_(skipped.to(dev).reshape(()).bool())
        elif skipped:
            self._skipped[row].fill_(True)

        # First step with a non-finite gradient (survives the ring): set once, or refined
        # by a merged record of the same step.
        row_nf = self._nf[row] > 0
        upd = ((self._first_nf_step < 0) | (self._first_nf_step == step)) & row_nf.any()
        self._first_nf_step.copy_(torch.where(upd, step, self._first_nf_step))
        self._first_nf_mask.copy_(torch.where(upd, row_nf, self._first_nf_mask))

        extras = (self._rows - 1) % self._every == 0
        if extras and pos_list:
            if grads is not None and self._zero:
                self._record_zero_fraction(f, names, idx, grads)
            if self._pnorms:
                assert self._params is not None
                ps = [self._params[i] for i in pos_list]
                pn = _foreach_norm_f32(ps, 2.0).to(dev, _F64)
                if idx is None:
                    f[_PNORM].copy_(pn)
                else:
                    f[_PNORM].index_copy_(0, idx, pn)
            if grads is not None and self._units:
                self._record_units(names, pos_list, grads, step)

    def _record_zero_fraction(
        self, f: Tensor, names: list[str], idx: Tensor | None, grads: Sequence[Tensor]
    ) -> None:
        dev = f.device
        nnz = _foreach_norm_f32(list(grads), 0.0).to(dev, _F64)
        key = tuple(names)
        numel = self._numel_cache.get(key)
        if numel is None:
            numel = torch.tensor([g.numel() for g in grads], dtype=_F64, device=dev)
            self._numel_cache[key] = numel
        zf = torch.where(numel > 0, 1.0 - nnz / numel.clamp(min=1), torch.nan)
        if idx is None:
            f[_ZERO].copy_(zf)
        else:
            f[_ZERO].index_copy_(0, idx, zf)

    def _record_units(
        self, names: list[str], pos_list: list[int], grads: Sequence[Tensor], step: int
    ) -> None:
        dev = self._unit_last.device
        nz: list[Tensor] = []
        take: list[int] = []
        for i, g in zip(pos_list, grads):
            k = self._unit_len[i]
            if k == 0 or g.dim() == 0 or g.shape[0] != k:
                continue
            if g.dim() == 1:
                nz.append(g.ne(0))
            elif g.numel() == 0:
                nz.append(torch.zeros((k,), dtype=torch.bool, device=g.device))
            else:
                row_max = torch.linalg.vector_norm(g.reshape(k, -1), ord=math.inf, dim=1)
                nz.append(row_max.ne(0))  # NaN rows count as non-zero (not dead)
            take.append(i)
        if not nz:
            return
        key = tuple(names)
        uidx = self._unit_idx_cache.get(key)
        if uidx is None:
            flat = [
                u
                for i in take
                for u in range(self._unit_off[i], self._unit_off[i] + self._unit_len[i])
            ]
            uidx = torch.tensor(flat, dtype=torch.int64, device=dev)
            self._unit_idx_cache[key] = uidx
        allnz = torch.cat([x.to(dev) for x in nz])
        cur = self._unit_last.index_select(0, uidx)
        self._unit_last.index_copy_(0, uidx, torch.where(allnz, step, cur))
        if self._first_unit_step is None:
            self._first_unit_step = step

    @torch.no_grad()
    def record_step(
        self,
        step: int | None = None,
        *,
        post_clip_norm: Union[Tensor, float, None] = None,
        clip_threshold: Union[Tensor, float, None] = None,
        skipped: Union[Tensor, bool, None] = None,
    ) -> None:
        """Compute and record the current gradients' statistics (one fused read + extras).

        For plain PyTorch loops: call it after ``backward()`` (before or after clipping, as
        the statistics you want) and before ``optimizer.zero_grad()``.  Parameters without a
        gradient are recorded as absent.  When the gradients were just clipped by
        ``gradstab.clip_grad_norm_``, prefer :meth:`record` with the statistics the clip
        already computed (no second read).

        Args:
            step: the step number (default: previous plus 1).
            post_clip_norm, clip_threshold, skipped: as in :meth:`record`.

        Example:
            >>> import torch, gradstab
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> m(torch.ones(1, 2)).sum().backward(); h.record_step()
            >>> len(h)
            1
        """
        if self._params is None:
            raise RuntimeError(
                f"{self._owner}.record_step needs the parameters: build the history from a "
                "module or (name, parameter) pairs, or call record() with statistics"
            )
        names = [n for n, p in zip(self.names, self._params) if p.grad is not None]
        grads = [p.grad for p in self._params if p.grad is not None]
        stats = grad_stats([p for p in self._params if p.grad is not None], self._p)
        if self._f is None and self._device is None and self._params:
            self._device = self._params[0].device
        self.record(
            stats,
            names,
            grads=grads,  # type: ignore[arg-type]
            post_clip_norm=post_clip_norm,
            clip_threshold=clip_threshold,
            skipped=skipped,
            step=step,
        )

    # ------------------------------------------------------------------ reading

    def data(self, last: int | None = None) -> HistoryData:
        """Copy the history to the host (a handful of transfers; the only sync point).

        Args:
            last: only the last ``last`` rows (default: all rows held).

        Returns:
            A :class:`HistoryData`, rows in chronological order.

        Example:
            >>> import torch, gradstab
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> h.data().num_steps
            0
        """
        n = len(self)
        if last is not None:
            n = min(n, _check_positive_int(f"{self._owner}.data", "last", last))
        t = len(self.names)
        if n == 0 or self._f is None:
            nan = torch.zeros((0, t), dtype=_F64)
            return HistoryData(
                names=list(self.names),
                steps=[],
                norms=nan,
                present=torch.zeros((0, t), dtype=torch.bool),
                total_norm=torch.zeros((0,), dtype=_F64),
                shapes=self.shapes,
                norm_type=self._p,
            )
        c = self._capacity
        end = self._rows  # rows [end - n, end) modulo capacity
        order = [(r % c) for r in range(end - n, end)]
        idx = torch.tensor(order, dtype=torch.int64, device=self._device)
        f = self._f.index_select(0, idx).to("cpu", _F64)
        nf = self._nf.index_select(0, idx).to("cpu", _F64)
        present = self._present.index_select(0, idx).cpu()
        s = self._s.index_select(0, idx).cpu()
        skipped = self._skipped.index_select(0, idx).cpu()
        first_step = int(self._first_nf_step)
        first_mask = self._first_nf_mask.cpu().tolist()
        nf = torch.where(present, nf, torch.nan)
        first = None
        if first_step >= 0:
            first = (first_step, [nm for nm, m in zip(self.names, first_mask) if m])
        units = None
        if self._units:
            last_nz = self._unit_last.cpu()
            units = {
                nm: last_nz[self._unit_off[i] : self._unit_off[i] + self._unit_len[i]]
                for i, nm in enumerate(self.names)
                if self._unit_len[i] > 0
            }
        zf = f[:, _ZERO]
        pn = f[:, _PNORM]
        return HistoryData(
            names=list(self.names),
            steps=[self._steps[r] for r in order],
            norms=f[:, _NORM],
            present=present,
            total_norm=s[:, _TOTAL],
            max_abs=f[:, _MAXABS],
            nonfinite=nf,
            zero_fraction=zf if self._zero else None,
            param_norms=pn if self._pnorms else None,
            post_clip_norm=s[:, _POST] if not bool(torch.isnan(s[:, _POST]).all()) else None,
            clip_threshold=s[:, _THRESH] if not bool(torch.isnan(s[:, _THRESH]).all()) else None,
            skipped=skipped,
            shapes=self.shapes,
            norm_type=self._p,
            first_nonfinite=first,
            unit_last_nonzero=units,
            unit_tracking_since=self._first_unit_step,
        )

    def diagnose(self, **kwargs: Any) -> Diagnosis:
        """:func:`diagnose` of this history (``kwargs`` as there).

        Example:
            >>> import torch, gradstab
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> h.diagnose().healthy
            True
        """
        return diagnose(self, **kwargs)

    def plot(self, out_dir: str, **kwargs: Any) -> list[str]:
        """Write the PNG pictures of this history (see :func:`gradstab.plots.plot_history`).

        Example:
            >>> import torch, gradstab
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> h.plot("/tmp/gradstab-plots")  # doctest: +SKIP
        """
        from gradstab.plots import plot_history  # noqa: PLC0415 - plots imports this module

        data = self.data()
        return plot_history(data, out_dir, diagnosis=diagnose(data), **kwargs)


def _pnorm64(v: Tensor, p: float) -> Tensor:
    """p-norm of a 1-D float64 vector of non-negative values, scaled against overflow."""
    if v.numel() == 1:
        return v.reshape(())
    m = v.amax()
    if math.isinf(p):
        return m
    usable = (m > 0) & torch.isfinite(m)
    s = torch.where(usable, m, torch.ones_like(m))
    return s * (v / s).pow(p).sum().pow(1.0 / p)


def _pcombine(a: Tensor, b: Tensor, p: float) -> Tensor:
    return _pnorm64(torch.stack((a.to(_F64), b.to(_F64))), p)


def _as_device_scalar(
    value: Union[Tensor, float, None], dev: torch.device, name: str, owner: str
) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{owner}.record: {name} must be a number or a 0-d tensor")
        return value.to(dev, _F64).reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}.record: {name} must be a number or a 0-d tensor, got {value!r}")
    return torch.full((), float(value), dtype=_F64, device=dev)


def _foreach_norm_f32(tensors: list[Tensor], ord: float) -> Tensor:
    """Per-tensor ``ord``-norms (ord 0: the count of non-zeros), stacked, float32 at least.

    One ``torch._foreach_norm`` call with ``dtype=float32`` for float16/bfloat16/float32
    tensors (counts stay exact past float16's 65,504), or without ``dtype`` when all are
    float64; per-tensor ``vector_norm`` for a mix of float64 and narrower dtypes, for tensors
    on several devices, or where ``_foreach_norm`` has no ``dtype`` argument.
    """
    if not tensors:
        return torch.zeros((0,), dtype=_F32)
    dev = tensors[0].device
    if all(t.device == dev for t in tensors):
        n64 = sum(t.dtype == _F64 for t in tensors)
        try:
            if n64 == 0:
                return torch.stack(list(torch._foreach_norm(tensors, ord, dtype=_F32)))
            if n64 == len(tensors):
                return torch.stack(list(torch._foreach_norm(tensors, ord)))
        except (TypeError, RuntimeError):
            pass
    out = [
        torch.linalg.vector_norm(t.detach(), ord=ord, dtype=torch.promote_types(t.dtype, _F32)).to(
            dev, _F64
        )
        for t in tensors
    ]
    return torch.stack(out)


# =========================================================================== the report


@dataclass(frozen=True)
class Thresholds:
    """The detector's thresholds (the defaults of :func:`diagnose`; see there)."""

    metric: str = "auto"
    vanish_decades: float = 2.0
    explode_decades: float = 2.0
    sustain_steps: int = 5
    depth_decades: float = 2.0
    min_depth_layers: int = 4
    spike_z: float = 6.0
    spike_ratio: float = 5.0
    spike_history: int = 50
    spike_min_history: int = 8
    large_norm: float | None = 1e6
    min_group: int = 3


@dataclass
class LayerReport:
    """One parameter tensor's statistics over the window and what was found.

    Attributes:
        index: position in network order.
        name: parameter name.
        median_norm: median gradient norm over the steps it had a finite gradient.
        median_metric: median of the compared magnitude (see :attr:`Diagnosis.metric`).
        decades_vs_median: median over steps of ``log10(metric / median of the group)``:
            ``-3`` means a thousand times smaller than the typical tensor.
        grad_weight_ratio: median ``||g|| / ||w||`` (``None`` without parameter norms).
        max_abs: largest ``|g|`` seen (``None`` if not recorded).
        zero_fraction: median fraction of exact zeros (``None`` if not recorded).
        nonfinite_steps: steps at which this gradient held a NaN/Inf.
        vanishing_steps: longest run of consecutive steps at least ``vanish_decades`` below
            the median.
        exploding_steps: the same, ``explode_decades`` above.
        status: tags: ``"nonfinite-origin"``, ``"nonfinite"``, ``"dead"``, ``"no-grad"``,
            ``"dead-units"``, ``"vanishing"``, ``"exploding"``; empty when healthy.
    """

    index: int
    name: str
    median_norm: float
    median_metric: float
    decades_vs_median: float
    grad_weight_ratio: float | None
    max_abs: float | None
    zero_fraction: float | None
    nonfinite_steps: int
    vanishing_steps: int
    exploding_steps: int
    status: list[str] = field(default_factory=list)


@dataclass
class Spike:
    """A step whose total gradient norm jumped above its running statistics.

    Attributes:
        step: the step.
        total_norm: its total norm.
        running_median: median total norm of the preceding ``spike_history`` steps.
        robust_z: ``(log10 total - median log10) / (1.4826 * MAD)`` over those steps (the MAD
            floored at 0.01 decades).
        ratio: ``total_norm / running_median``.
    """

    step: int
    total_norm: float
    running_median: float
    robust_z: float
    ratio: float


@dataclass
class DepthTrend:
    """Least-squares fit of log10 gradient magnitude against depth (weight tensors only).

    Attributes:
        layers: the tensors fitted, network order (input first).
        slope_decades_per_layer: fitted change of log10 magnitude per layer, input to output.
        growth_toward_input: ``10 ** -slope``: the factor by which the magnitude grows per
            layer going toward the input (``> 1``: growing, ``< 1``: shrinking).
        decades_toward_input: the fitted change from the last to the first layer, in decades
            (positive: larger at the input).
        r2: coefficient of determination of the fit.
        direction: ``"exploding"`` (growing toward the input by at least ``depth_decades``),
            ``"vanishing"`` (shrinking by at least that much) or ``"flat"``.
        kind: the tensors fitted: ``"weight"`` (dimension >= 2; without shapes, every name
            not ending in ``bias``) or ``"bias"``.
    """

    layers: list[str]
    slope_decades_per_layer: float
    growth_toward_input: float
    decades_toward_input: float
    r2: float
    direction: str
    kind: str = "weight"


@dataclass
class DeadParam:
    """A parameter, or some of its output units, that received no gradient over the window.

    Attributes:
        name: the parameter (for units: the module prefix, e.g. ``"3"`` for ``3.weight`` and
            ``3.bias``).
        kind: ``"no-grad"`` (the gradient was ``None`` at every step: unused or detached),
            ``"zero"`` (present but exactly zero at every step) or ``"units"`` (these output
            units' gradients were exactly zero at every step).
        units: the dead unit indices (``kind == "units"``), else ``[]``.
        total_units: the number of units of the tensor(s) (``kind == "units"``), else 0.
        params: the parameters concerned (for units: all tensors of the module that share
            the output dimension).
    """

    name: str
    kind: str
    units: list[int] = field(default_factory=list)
    total_units: int = 0
    params: list[str] = field(default_factory=list)


@dataclass
class NonfiniteReport:
    """Where NaN/Inf gradients first appeared.

    Attributes:
        step: the first step (for a training log: the first logged step at or after it).
        exact: ``False`` when only a counter revealed the step (the NaN happened between two
            logged steps) and the parameter is unknown.
        origin: the affected parameter first in backward order (the last affected one in
            network order): where the NaN/Inf entered the backward pass; ``None`` if unknown.
        first_in_network_order: the affected parameter closest to the input.
        affected: every affected parameter at that step, network order.
        steps: all steps in the window with a NaN/Inf gradient.
    """

    step: int
    exact: bool
    origin: str | None
    first_in_network_order: str | None
    affected: list[str]
    steps: list[int]


@dataclass
class Diagnosis:
    """What :func:`diagnose` found.  ``str(d)`` is a readable report; fields are for code.

    Attributes:
        steps: the number of steps analysed.
        first_step, last_step: the window's step range (``None`` when empty).
        metric: the magnitude compared across tensors: ``"rms"`` (norm divided by the square
            root of the number of non-zero elements, so tensors of different sizes and
            sparse gradients compare fairly), ``"ratio"`` (``||g|| / ||w||``) or ``"norm"``.
        layers: one :class:`LayerReport` per tensor, network order.
        vanishing: names of the vanishing tensors, network order.
        exploding_layers: names of tensors far above the median, network order.
        dead: dead parameters and units.
        spikes: total-norm spikes.
        large_steps: steps whose total norm reached ``large_norm``.
        depth_trend: the weights' depth fit, or the biases' where that one finds a trend and
            the weights' does not; ``None`` with too few tensors.
        depth_trends: every depth fit made (one per group: weights, biases).
        nonfinite: where NaN/Inf first appeared, or ``None``.
        skipped_steps: steps whose optimizer step was skipped.
        thresholds: the thresholds used.
        source: where the data came from.
    """

    steps: int
    first_step: int | None
    last_step: int | None
    metric: str
    layers: list[LayerReport]
    vanishing: list[str]
    exploding_layers: list[str]
    dead: list[DeadParam]
    spikes: list[Spike]
    large_steps: list[int]
    depth_trend: DepthTrend | None
    nonfinite: NonfiniteReport | None
    skipped_steps: list[int]
    thresholds: Thresholds
    source: str = ""
    depth_trends: list[DepthTrend] = field(default_factory=list)

    @property
    def exploding(self) -> bool:
        """Spikes, huge total norms, layers far above the rest, or norms rising toward the input."""
        return bool(
            self.spikes
            or self.large_steps
            or self.exploding_layers
            or (self.depth_trend is not None and self.depth_trend.direction == "exploding")
        )

    @property
    def vanishing_gradients(self) -> bool:
        """Vanishing layers, or norms shrinking toward the input."""
        return bool(
            self.vanishing
            or (self.depth_trend is not None and self.depth_trend.direction == "vanishing")
        )

    @property
    def healthy(self) -> bool:
        """Nothing was found."""
        return not (self.exploding or self.vanishing_gradients or self.dead or self.nonfinite)

    def findings(self) -> list[str]:
        """One sentence per problem found (empty when healthy)."""
        out: list[str] = []
        th = self.thresholds
        nf = self.nonfinite
        if nf is not None:
            where = (
                f"in {nf.origin!r} (first in backward order)"
                if nf.origin
                else "(parameter unknown)"
            )
            when = f"at step {nf.step}" if nf.exact else f"by step {nf.step} (between logged steps)"
            extra = f"; {len(nf.affected)} parameter(s) affected" if nf.affected else ""
            more = f"; {len(nf.steps)} step(s) with NaN/Inf in the window" if nf.steps else ""
            out.append(f"non-finite gradients first {when} {where}{extra}{more}")
        if self.dead:
            parts = []
            for d in self.dead:
                if d.kind == "units":
                    parts.append(f"{d.name}: {len(d.units)}/{d.total_units} units")
                else:
                    parts.append(
                        f"{d.name} ({'no gradient' if d.kind == 'no-grad' else 'all zero'})"
                    )
            out.append("dead: " + ", ".join(parts))
        if self.vanishing:
            out.append(
                f"vanishing: {len(self.vanishing)} tensor(s) >= {th.vanish_decades:g} decades "
                f"below the median {self.metric}: " + _short_list(self.vanishing)
            )
        if self.exploding_layers:
            out.append(
                f"exploding layers: {len(self.exploding_layers)} tensor(s) >= "
                f"{th.explode_decades:g} decades above the median {self.metric}: "
                + _short_list(self.exploding_layers)
            )
        dt = self.depth_trend
        if dt is not None and dt.direction != "flat":
            verb = "grow" if dt.direction == "exploding" else "shrink"
            out.append(
                f"{dt.direction} gradients by depth: norms {verb} toward the input "
                f"x{dt.growth_toward_input:.3g} per layer ({abs(dt.decades_toward_input):.1f} "
                f"decades over {len(dt.layers)} {dt.kind} tensors, r2={dt.r2:.2f})"
            )
        if self.spikes:
            worst = max(self.spikes, key=lambda s: s.ratio)
            out.append(
                f"exploding steps: {len(self.spikes)} total-norm spike(s), worst at step "
                f"{worst.step}: {worst.total_norm:.3g} = x{worst.ratio:.3g} the running median "
                f"(robust z {worst.robust_z:.1f})"
            )
        if self.large_steps:
            out.append(
                f"huge total norm (>= {th.large_norm:g}) at {len(self.large_steps)} step(s), "
                f"first at step {self.large_steps[0]}"
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (plus the verdicts).

        Example:
            >>> import gradstab, torch
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> d = gradstab.diagnose(h).to_dict()
            >>> d["healthy"], d["steps"]
            (True, 0)
        """
        d = dataclasses.asdict(self)
        d["exploding"] = self.exploding
        d["vanishing_gradients"] = self.vanishing_gradients
        d["healthy"] = self.healthy
        d["findings"] = self.findings()
        return _json_safe(d)

    def table(self, top: int = 10, use_rich: bool | None = None, width: int = 120) -> str:
        """The worst ``top`` layers as a terminal table (``rich`` when installed).

        Args:
            top: rows shown (worst first: non-finite, dead, vanishing/exploding, then by
                distance from the median).
            use_rich: force (True) or avoid (False) ``rich``; default: use it if importable.
            width: the width of a rich rendering.

        Returns:
            The table as a string.
        """
        rows = sorted(self.layers, key=_severity)[: max(top, 0)]
        has_ratio = any(r.grad_weight_ratio is not None for r in self.layers)
        has_max = any(r.max_abs is not None for r in self.layers)
        has_zero = any(r.zero_fraction is not None for r in self.layers)
        show_metric = self.metric != "norm"
        header = ["#", "parameter", "grad norm"] + ([self.metric] if show_metric else [])
        header.append("vs median")
        if has_ratio:
            header.append("|g|/|w|")
        if has_max:
            header.append("max |g|")
        if has_zero:
            header.append("zeros")
        header += ["NaN steps", "status"]
        body = []
        for r in rows:
            cells = [str(r.index), r.name, _fmt(r.median_norm)]
            if show_metric:
                cells.append(_fmt(r.median_metric))
            dev = r.decades_vs_median
            cells.append("-" if math.isnan(dev) else f"{dev:+.1f} dec")
            if has_ratio:
                cells.append(_fmt(r.grad_weight_ratio))
            if has_max:
                cells.append(_fmt(r.max_abs))
            if has_zero:
                cells.append(
                    "-"
                    if r.zero_fraction is None or math.isnan(r.zero_fraction)
                    else f"{100 * r.zero_fraction:.0f}%"
                )
            cells += [str(r.nonfinite_steps), ",".join(r.status) or "ok"]
            body.append(cells)
        if use_rich is None:
            try:
                import rich  # noqa: F401, PLC0415 - optional
            except ImportError:
                use_rich = False
            else:
                use_rich = True
        if use_rich:
            from rich.console import Console  # noqa: PLC0415 - optional
            from rich.table import Table  # noqa: PLC0415 - optional

            tbl = Table(show_edge=False, pad_edge=False)
            for i, h in enumerate(header):
                tbl.add_column(h, justify="left" if i in (1, len(header) - 1) else "right")
            for cells in body:
                tbl.add_row(*cells)
            buf = io.StringIO()
            Console(file=buf, width=width, force_terminal=False, color_system=None).print(tbl)
            return buf.getvalue().rstrip("\n")
        return _plain_table(header, body)

    def __str__(self) -> str:
        lines = []
        src = f" ({self.source})" if self.source else ""
        if self.steps == 0:
            return f"gradstab diagnosis{src}: no steps recorded"
        lines.append(
            f"gradstab diagnosis{src}: {self.steps} steps ({self.first_step}..{self.last_step}),"
            f" {len(self.layers)} parameter tensors, compared by {self.metric}"
        )
        found = self.findings()
        if not found:
            lines.append("healthy: no vanishing, exploding, dead or non-finite gradients found")
        else:
            lines += [f"- {f}" for f in found]
        if self.skipped_steps:
            lines.append(
                f"skipped optimizer steps: {len(self.skipped_steps)} "
                f"({_short_list([str(s) for s in self.skipped_steps])})"
            )
        lines.append("")
        lines.append(self.table())
        hidden = len(self.layers) - min(len(self.layers), 10)
        if hidden > 0:
            lines.append(f"({hidden} more tensor(s) not shown)")
        return "\n".join(lines)


def _short_list(items: Sequence[str], n: int = 6) -> str:
    items = list(items)
    if len(items) <= n:
        return ", ".join(items)
    return ", ".join(items[:n]) + f", ... (+{len(items) - n})"


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def _severity(r: LayerReport) -> tuple:
    order = (
        "nonfinite-origin",
        "nonfinite",
        "no-grad",
        "dead",
        "dead-units",
        "vanishing",
        "exploding",
    )
    rank = min((order.index(s) for s in r.status if s in order), default=len(order))
    dev = 0.0 if math.isnan(r.decades_vs_median) else -abs(r.decades_vs_median)
    return (rank, dev, r.index)


def _plain_table(header: list[str], body: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(row[i]) for row in body)) if body else len(h)
        for i, h in enumerate(header)
    ]
    left = {1, len(header) - 1}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in body]
    return "\n".join(out)


def _json_safe(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# =========================================================================== the detector


_METRICS = ("auto", "rms", "ratio", "norm")


def diagnose(
    source: Union[GradHistory, HistoryData],
    model: nn.Module | None = None,
    *,
    window: int | None = None,
    metric: str = "auto",
    vanish_decades: float = 2.0,
    explode_decades: float = 2.0,
    sustain_steps: int = 5,
    depth_decades: float = 2.0,
    min_depth_layers: int = 4,
    spike_z: float = 6.0,
    spike_ratio: float = 5.0,
    spike_history: int = 50,
    spike_min_history: int = 8,
    large_norm: float | None = 1e6,
) -> Diagnosis:
    """Name vanishing, exploding, dead and non-finite gradients in a recorded history.

    Reads the history on the host (one copy) and analyses the last ``window`` steps.

    - **Compared magnitude** (``metric``): ``"rms"`` = ``norm / sqrt(n)`` with ``n`` the
      number of non-zero gradient elements when the zero fraction was recorded, else all
      elements (so a 4096x4096 weight and its bias, or a sparse embedding gradient, compare
      fairly); ``"ratio"`` = ``||g|| / ||w||`` (needs parameter norms; zero-initialised
      tensors have no ratio at first); ``"norm"``; ``"auto"`` = ``"rms"`` when the shapes
      are known, else ``"norm"``.  With ``"norm"`` and unknown shapes, biases are compared
      with biases and other tensors with each other (their norms differ by ``sqrt(fan_in)``).
    - **Vanishing / exploding layers**: at each step, each tensor's ``log10`` magnitude is
      compared with the median over its group (at least ``min_group`` = 3 tensors with a
      finite, non-zero gradient, else no verdict at that step).  A tensor is vanishing when
      it is at least ``vanish_decades`` below the median for ``sustain_steps`` consecutive
      steps (or for every step of a shorter window), exploding when ``explode_decades``
      above for as long.
    - **Depth trend**: the per-tensor median log magnitude over the window is fitted by a
      line against the position among weight tensors (dimension >= 2; without shapes, the
      tensors whose name does not end in ``bias``), input first.  With at least
      ``min_depth_layers`` tensors, a fitted rise toward the input of ``depth_decades`` or
      more means exploding gradients, a fall of as much vanishing ones.
    - **Spikes**: a step whose total norm ``x`` has, against the finite total norms of the
      previous ``spike_history`` steps (at least ``spike_min_history`` of them), a robust
      z-score ``(log10 x - median) / max(1.4826 MAD, 0.01)`` of at least ``spike_z`` and
      ``x >= spike_ratio x`` the median.  Steps with a total norm of at least ``large_norm``
      are listed too (``None``: off).
    - **Dead**: a tensor with no non-zero finite gradient at any step of the window (absent:
      ``"no-grad"``; present and exactly zero: ``"zero"``).  With unit tracking, output units
      whose gradient stayed exactly zero since the window's first step (``"units"``: a unit
      counts as dead when it is zero in every tensor of its module that shares its output
      dimension, e.g. a row of ``weight`` and the element of ``bias``).  Without unit
      tracking, partly dead tensors show only as a high zero fraction.
    - **Non-finite**: the first step with a NaN/Inf gradient and its origin, the affected
      parameter first in backward order (reverse network order); see the module docstring.

    Args:
        source: a :class:`GradHistory` or a :class:`HistoryData`.
        model: when given and the source has no shapes, the shapes are taken from its
            ``named_parameters()`` by name.
        window: analyse the last ``window`` steps (default: all held).
        metric, vanish_decades, explode_decades, sustain_steps, depth_decades,
            min_depth_layers, spike_z, spike_ratio, spike_history, spike_min_history,
            large_norm: thresholds, as above.

    Returns:
        A :class:`Diagnosis`; ``print(d)`` shows the findings and a table of the worst
        tensors.

    Example:
        >>> import torch, gradstab
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> layers = []
        >>> for _ in range(20):
        ...     layers += [torch.nn.Linear(16, 16), torch.nn.Sigmoid()]
        >>> model = torch.nn.Sequential(*layers)
        >>> h = gradstab.GradHistory(model)
        >>> for step in range(5):
        ...     model.zero_grad()
        ...     model(torch.randn(32, 16)).pow(2).mean().backward()
        ...     h.record_step(step)
        >>> d = gradstab.diagnose(h)
        >>> d.vanishing_gradients, d.vanishing[0]
        (True, '0.weight')
    """
    owner = "gradstab.diagnose"
    if metric not in _METRICS:
        raise ValueError(f"{owner}: metric must be one of {_METRICS}, got {metric!r}")
    for name, value in (
        ("vanish_decades", vanish_decades),
        ("explode_decades", explode_decades),
        ("depth_decades", depth_decades),
        ("spike_z", spike_z),
        ("spike_ratio", spike_ratio),
    ):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"{owner}: {name} must be a positive number, got {value!r}")
    if large_norm is not None and (
        isinstance(large_norm, bool)
        or not isinstance(large_norm, numbers.Real)
        or not large_norm > 0
    ):
        raise ValueError(
            f"{owner}: large_norm must be a positive number or None, got {large_norm!r}"
        )
    sustain_steps = _check_positive_int(owner, "sustain_steps", sustain_steps)
    min_depth_layers = _check_positive_int(owner, "min_depth_layers", min_depth_layers, 2)
    spike_history = _check_positive_int(owner, "spike_history", spike_history)
    spike_min_history = _check_positive_int(owner, "spike_min_history", spike_min_history)
    if window is not None:
        window = _check_positive_int(owner, "window", window)
    th = Thresholds(
        metric=metric,
        vanish_decades=float(vanish_decades),
        explode_decades=float(explode_decades),
        sustain_steps=sustain_steps,
        depth_decades=float(depth_decades),
        min_depth_layers=min_depth_layers,
        spike_z=float(spike_z),
        spike_ratio=float(spike_ratio),
        spike_history=spike_history,
        spike_min_history=spike_min_history,
        large_norm=None if large_norm is None else float(large_norm),
    )
    if isinstance(source, GradHistory):
        data = source.data(window)
    elif isinstance(source, HistoryData):
        data = source.window(window)
    else:
        raise TypeError(
            f"{owner}: source must be a GradHistory or a HistoryData, got {type(source).__name__}"
        )
    if model is not None and data.shapes is None:
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        if all(n in shapes for n in data.names):
            data = dataclasses.replace(data, shapes=[shapes[n] for n in data.names])
    return _analyse(data, th)


def _analyse(data: HistoryData, th: Thresholds) -> Diagnosis:
    s_n, t_n = data.num_steps, len(data.names)
    names = data.names
    if s_n == 0:
        return Diagnosis(
            steps=0, first_step=None, last_step=None, metric="norm", layers=[], vanishing=[],
            exploding_layers=[], dead=[], spikes=[], large_steps=[], depth_trend=None,
            nonfinite=None, skipped_steps=[], thresholds=th, source=data.source,
        )  # fmt: skip
    norms = data.norms.to(_F64)
    present = data.present
    finite = present & torch.isfinite(norms)

    # ---- the compared magnitude
    metric = th.metric
    if metric == "auto":
        metric = "rms" if data.shapes is not None else "norm"
    if metric == "rms" and data.shapes is None:
        metric = "norm"
    if metric == "ratio" and data.param_norms is None:
        raise ValueError(
            "gradstab.diagnose: metric='ratio' needs parameter norms, which this history "
            "does not have (record with param_norms=True)"
        )
    if metric == "rms":
        assert data.shapes is not None
        numel = torch.tensor([float(math.prod(s)) for s in data.shapes], dtype=_F64)
        n_eff = numel.expand(s_n, t_n)
        if data.zero_fraction is not None:
            zf = data.zero_fraction.to(_F64)
            n_eff = torch.where(torch.isnan(zf), n_eff, n_eff * (1 - zf))
        value = norms / n_eff.clamp(min=1).sqrt()
    elif metric == "ratio":
        assert data.param_norms is not None
        pn = data.param_norms.to(_F64)
        value = torch.where(pn > 0, norms / pn, torch.nan)
    else:
        value = norms
    usable = finite & (value > 0) & torch.isfinite(value)
    logv = torch.where(usable, value.clamp(min=1e-300).log10(), torch.nan)

    # ---- groups, per-step deviation from the group median, depth trend per group
    # Biases are compared with biases: a weight's gradient carries the layer's input
    # activations (grad_W = delta x^T) and a bias's does not (grad_b = delta).
    kinds = ["bias" if n.endswith("bias") else "weight" for n in names]
    dev = torch.full((s_n, t_n), math.nan, dtype=_F64)
    layer_med = torch.nanmedian(logv, dim=0).values
    trends: list[DepthTrend] = []
    low = torch.zeros((s_n, t_n), dtype=torch.bool)
    high = torch.zeros((s_n, t_n), dtype=torch.bool)
    for kind in dict.fromkeys(kinds):
        members = [i for i, k in enumerate(kinds) if k == kind]
        cols = torch.tensor(members, dtype=torch.int64)
        sub = logv[:, cols]
        count = (~torch.isnan(sub)).sum(dim=1)
        med = torch.nanmedian(sub, dim=1).values
        med = torch.where(count >= th.min_group, med, torch.nan)
        dev[:, cols] = sub - med[:, None]
        # depth: matrices/filters only among the weights (a 1-D norm weight is no layer)
        fit_cols = members
        if kind == "weight" and data.shapes is not None:
            fit_cols = [i for i in members if len(data.shapes[i]) >= 2]
        trend = _depth_trend(names, fit_cols, layer_med, th, kind)
        if trend is not None:
            trends.append(trend)
        # A depth trend says which end is abnormal: with norms shrinking toward the input the
        # tensors far above the median are the healthy output end, and the reverse.
        direction = trend.direction if trend is not None else "flat"
        if direction != "exploding":
            low[:, cols] = dev[:, cols] <= -th.vanish_decades
        if direction != "vanishing":
            high[:, cols] = dev[:, cols] >= th.explode_decades
    need = min(th.sustain_steps, s_n)
    run_low = _longest_run(low)
    run_high = _longest_run(high)
    vanishing_mask = run_low >= need
    exploding_mask = run_high >= need
    # the weights' fit unless it is flat and the biases' is not
    trends.sort(key=lambda t: (t.direction == "flat", t.kind != "weight"))
    depth = trends[0] if trends else None

    # ---- dead tensors
    nonzero = finite & (norms > 0)
    nonfinite_t = present & ~torch.isfinite(norms)
    if data.nonfinite is not None:
        nonfinite_t |= torch.nan_to_num(data.nonfinite.to(_F64), nan=0.0) > 0
    dead: list[DeadParam] = []
    dead_status: dict[int, str] = {}
    for i, n in enumerate(names):
        if nonzero[:, i].any() or nonfinite_t[:, i].any():
            continue
        kind = "no-grad" if not present[:, i].any() else "zero"
        dead.append(DeadParam(name=n, kind=kind, params=[n]))
        dead_status[i] = "no-grad" if kind == "no-grad" else "dead"
    unit_status: set[int] = set()
    if data.unit_last_nonzero:
        dead += _dead_units(data, dead_status, unit_status)

    # ---- non-finite
    nf_steps_mask = data.nonfinite_step
    assert nf_steps_mask is not None
    nf_steps = [data.steps[r] for r in range(s_n) if bool(nf_steps_mask[r])]
    nonfinite = None
    origin_idx: int | None = None
    if data.first_nonfinite is not None:
        step0, affected = data.first_nonfinite
        nonfinite = _nonfinite_report(names, step0, True, affected, nf_steps)
    elif nf_steps:
        r0 = next(r for r in range(s_n) if bool(nf_steps_mask[r]))
        affected = [names[i] for i in range(t_n) if bool(nonfinite_t[r0, i])]
        nonfinite = _nonfinite_report(names, data.steps[r0], bool(affected), affected, nf_steps)
    if nonfinite is not None and nonfinite.origin is not None:
        origin_idx = names.index(nonfinite.origin)

    # ---- spikes and huge norms
    total = data.total_norm.to(_F64)
    spikes, large = _spikes(data.steps, total, th)

    # ---- per-layer reports
    layers: list[LayerReport] = []
    for i, n in enumerate(names):
        col_ok = finite[:, i]
        med_norm = float(norms[col_ok, i].median()) if col_ok.any() else math.nan
        col_v = usable[:, i]
        med_metric = float(value[col_v, i].median()) if col_v.any() else math.nan
        d_col = dev[:, i][~torch.isnan(dev[:, i])]
        med_dev = float(d_col.median()) if d_col.numel() else math.nan
        ratio = None
        if data.param_norms is not None:
            pn = data.param_norms[:, i].to(_F64)
            r = torch.where((pn > 0) & col_ok, norms[:, i] / pn, torch.nan)
            r = r[~torch.isnan(r)]
            ratio = float(r.median()) if r.numel() else math.nan
        mx = None
        if data.max_abs is not None:
            m = data.max_abs[:, i].to(_F64)
            m = m[present[:, i] & ~torch.isnan(m)]
            mx = float(m.max()) if m.numel() else math.nan
        zfrac = None
        if data.zero_fraction is not None:
            z = data.zero_fraction[:, i].to(_F64)
            z = z[~torch.isnan(z)]
            zfrac = float(z.median()) if z.numel() else math.nan
        status = []
        if origin_idx == i:
            status.append("nonfinite-origin")
        elif bool(nonfinite_t[:, i].any()):
            status.append("nonfinite")
        if i in dead_status:
            status.append(dead_status[i])
        if i in unit_status:
            status.append("dead-units")
        if bool(vanishing_mask[i]):
            status.append("vanishing")
        if bool(exploding_mask[i]):
            status.append("exploding")
        layers.append(
            LayerReport(
                index=i,
                name=n,
                median_norm=med_norm,
                median_metric=med_metric,
                decades_vs_median=med_dev,
                grad_weight_ratio=ratio,
                max_abs=mx,
                zero_fraction=zfrac,
                nonfinite_steps=int(nonfinite_t[:, i].sum()),
                vanishing_steps=int(run_low[i]),
                exploding_steps=int(run_high[i]),
                status=status,
            )
        )
    skipped = []
    if data.skipped is not None:
        skipped = [data.steps[r] for r in range(s_n) if bool(data.skipped[r])]
    return Diagnosis(
        steps=s_n,
        first_step=data.steps[0],
        last_step=data.steps[-1],
        metric=metric,
        layers=layers,
        vanishing=[n for i, n in enumerate(names) if bool(vanishing_mask[i])],
        exploding_layers=[n for i, n in enumerate(names) if bool(exploding_mask[i])],
        dead=dead,
        spikes=spikes,
        large_steps=large,
        depth_trend=depth,
        nonfinite=nonfinite,
        skipped_steps=skipped,
        thresholds=th,
        source=data.source,
        depth_trends=trends,
    )


def _longest_run(flags: Tensor) -> Tensor:
    """Per column, the longest run of consecutive True rows."""
    run = torch.zeros(flags.shape[1], dtype=torch.int64)
    best = torch.zeros_like(run)
    for r in range(flags.shape[0]):
        run = (run + 1) * flags[r]
        best = torch.maximum(best, run)
    return best


def _nonfinite_report(
    names: list[str], step: int, exact: bool, affected: list[str], steps: list[int]
) -> NonfiniteReport:
    order = {n: i for i, n in enumerate(names)}
    aff = sorted((a for a in affected if a in order), key=order.__getitem__)
    return NonfiniteReport(
        step=int(step),
        exact=exact,
        origin=aff[-1] if aff else None,
        first_in_network_order=aff[0] if aff else None,
        affected=aff,
        steps=steps,
    )


def _spikes(steps: list[int], total: Tensor, th: Thresholds) -> tuple[list[Spike], list[int]]:
    spikes: list[Spike] = []
    large: list[int] = []
    ok = torch.isfinite(total) & (total > 0)
    logt = torch.where(ok, total.clamp(min=1e-300).log10(), torch.nan)
    vals = logt.tolist()
    tot = total.tolist()
    hist: list[float] = []
    for r, (lv, x) in enumerate(zip(vals, tot)):
        if th.large_norm is not None and math.isfinite(x) and x >= th.large_norm:
            large.append(steps[r])
        if math.isnan(lv):
            continue
        recent = hist[-th.spike_history :]
        if len(recent) >= th.spike_min_history:
            h = torch.tensor(recent, dtype=_F64)
            med = float(h.median())
            mad = float((h - med).abs().median())
            z = (lv - med) / max(1.4826 * mad, 0.01)
            ratio = 10 ** (lv - med)
            if z >= th.spike_z and ratio >= th.spike_ratio:
                spikes.append(Spike(steps[r], x, 10**med, z, ratio))
        hist.append(lv)
    return spikes, large


def _depth_trend(
    names: list[str], cols: list[int], layer_med: Tensor, th: Thresholds, kind: str
) -> DepthTrend | None:
    pts = [(k, float(layer_med[i])) for k, i in enumerate(cols) if not math.isnan(layer_med[i])]
    if len(pts) < th.min_depth_layers:
        return None
    x = torch.tensor([p[0] for p in pts], dtype=_F64)
    y = torch.tensor([p[1] for p in pts], dtype=_F64)
    xm, ym = x.mean(), y.mean()
    sxx = ((x - xm) ** 2).sum()
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    fit = ym + slope * (x - xm)
    ss_tot = float(((y - ym) ** 2).sum())
    r2 = 1.0 - float(((y - fit) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    span = -slope * float(x[-1] - x[0])  # change from output end to input end
    if span >= th.depth_decades:
        direction = "exploding"
    elif span <= -th.depth_decades:
        direction = "vanishing"
    else:
        direction = "flat"
    return DepthTrend(
        layers=[names[cols[int(k)]] for k in x.tolist()],
        slope_decades_per_layer=slope,
        growth_toward_input=10 ** (-slope),
        decades_toward_input=span,
        r2=r2,
        direction=direction,
        kind=kind,
    )


def _dead_units(
    data: HistoryData, dead_status: dict[int, str], unit_status: set[int]
) -> list[DeadParam]:
    """Dead output units per module: zero in every tensor of the module with that many units."""
    assert data.unit_last_nonzero is not None
    since = data.unit_tracking_since
    if since is None:
        return []  # no gradient was ever examined unit by unit
    start = max(data.steps[0], since)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, n in enumerate(data.names):
        last = data.unit_last_nonzero.get(n)
        if last is None or i in dead_status:
            continue
        prefix = n.rsplit(".", 1)[0] if "." in n else ""
        groups.setdefault((prefix, int(last.numel())), []).append(i)
    out = []
    for (prefix, k), idx in groups.items():
        if k == 0:
            continue
        dead = torch.ones(k, dtype=torch.bool)
        for i in idx:
            dead &= data.unit_last_nonzero[data.names[i]] < start
        units = torch.nonzero(dead).flatten().tolist()
        if units:
            unit_status.update(idx)
            params = [data.names[i] for i in idx]
            out.append(
                DeadParam(
                    name=prefix or params[0],
                    kind="units",
                    units=units,
                    total_units=k,
                    params=params,
                )
            )
    return out
