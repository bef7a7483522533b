"""A gradient history on the host (:class:`HistoryData`): what the detector and the plots read.

Built by :meth:`gradstab.GradHistory.data` from the device-side recorder, or from a training
log by :func:`gradstab.diagnosis.logs.read_log`.

Example:
    >>> import torch
    >>> from gradstab.diagnosis import HistoryData
    >>> ones = torch.ones(2, 1)
    >>> d = HistoryData(names=["w"], steps=[0, 1], norms=ones, present=ones.bool(),
    ...                 total_norm=torch.ones(2))
    >>> d.num_steps
    2
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HistoryData"]

# =========================================================================== host-side data


@dataclass
class HistoryData:
    """A gradient history on the host: what :func:`diagnose` and the plots read.

    Rows are recorded steps in chronological order, columns are parameter tensors in network
    order.  Missing values are NaN (a tensor without a gradient at that step, a statistic that
    was not recorded or not logged).  Built by :meth:`GradHistory.data` or, from a training
    log, by :func:`gradstab.diagnosis.logs.read_log`.

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
        name_order: what the order of ``names`` is, in words, for the plots' labels:
            ``"network order"`` (a :class:`GradHistory`: registration order; a log read with
            ``order=``), else how a log's names were ordered (e.g. ``"sorted by module
            path"``).
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
    name_order: str = "network order"

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
