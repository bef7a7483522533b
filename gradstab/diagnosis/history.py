"""The device-side gradient recorder (:class:`GradHistory`).

Keeps, per recorded step and per parameter tensor, the statistics the ops already compute
(norm, max-abs, NaN/Inf count) in preallocated ring buffers on the gradients' device, plus
optional extras (zero fraction, parameter norm, per-unit last non-zero step for dead units),
without reading a device value on the host until :meth:`GradHistory.data` is asked. This is
the largest module of the package (~700 lines): one class whose recording paths (a stats
tuple, a step of a model, the clip step's units) share its buffers.

Example:
    >>> import torch, gradstab
    >>> model = torch.nn.Linear(4, 2)
    >>> history = gradstab.GradHistory(model, capacity=10)
    >>> model(torch.randn(3, 4)).sum().backward()
    >>> history.record_step()
    >>> len(history)
    1
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from gradstab._common import check_int, check_norm_type
from gradstab.diagnosis.analysis import diagnose
from gradstab.diagnosis.data import HistoryData
from gradstab.diagnosis.findings import Diagnosis
from gradstab.diagnosis.plots import plot_history
from gradstab.functional import grad_stats

__all__ = ["GradHistory"]

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
        model: the model the parameters belong to, for the prescriptions of
            :func:`diagnose` (its modules are their evidence); default: ``parameters`` when
            it is an ``nn.Module``.  Kept by reference as :attr:`model`.

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
        model: nn.Module | None = None,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"{self._owner}: model must be an nn.Module or None, got {model!r:.80}")
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
        if model is None and isinstance(parameters, nn.Module):
            model = parameters
        #: The model whose modules the prescriptions of :meth:`diagnose` read (or ``None``).
        self.model: nn.Module | None = model

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
        self.model = None
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
        self._capacity = check_int(capacity, "capacity", owner)
        self._every = check_int(extras_every, "extras_every", owner)
        self._p = check_norm_type(norm_type, owner)
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
            n = min(n, check_int(last, "last", f"{self._owner}.data"))
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
        """Write the PNG pictures of this history (:func:`gradstab.diagnosis.plots.plot_history`).

        Example:
            >>> import torch, gradstab
            >>> m = torch.nn.Linear(2, 1); h = gradstab.GradHistory(m)
            >>> h.plot("/tmp/gradstab-plots")  # doctest: +SKIP
        """
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
