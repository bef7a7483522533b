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
- where **non-finite** values first appeared: the step and the parameter;

and, for each problem, ranked **prescriptions** (:class:`Prescription`: the likely cause, the
remedy, the gradstab call that applies it and the evidence, from the history and, where the
model is known, its modules; :mod:`gradstab.diagnosis.prescriptions`), e.g. a clip threshold
computed from the healthy steps' total norms, or the Sigmoid modules to replace.

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

from gradstab.diagnosis.analysis import diagnose
from gradstab.diagnosis.data import HistoryData
from gradstab.diagnosis.findings import (
    DeadParam,
    DepthTrend,
    Diagnosis,
    LayerReport,
    NonfiniteReport,
    Prescription,
    Spike,
    Thresholds,
)
from gradstab.diagnosis.history import GradHistory

__all__ = [
    "DeadParam",
    "DepthTrend",
    "Diagnosis",
    "GradHistory",
    "HistoryData",
    "LayerReport",
    "NonfiniteReport",
    "Prescription",
    "Spike",
    "Thresholds",
    "diagnose",
]
