"""The Lightning parts of ``python -m gradstab demo`` (imported only when the demo runs).

Kept apart from the rest of :mod:`gradstab.tools.demo` so that ``python -m gradstab <any
command>``, which imports every command module to build its parser, works without Lightning
installed.
:func:`build_callbacks` is the one place that decides how a run is monitored and clipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from torch import Tensor, nn

import gradstab
from gradstab.adaptive import AdaptiveThreshold
from gradstab.diagnosis import GradHistory

__all__ = [
    "Classifier",
    "LossTracker",
    "RunCallbacks",
    "RunProgressBar",
    "RunProgressLines",
    "build_callbacks",
    "quiet_lightning",
]


class Classifier(pl.LightningModule):
    """Cross-entropy training of ``model`` with SGD (momentum 0.9); logs ``loss``.

    Example:
        >>> module = Classifier(torch.nn.Linear(4, 3), lr=0.1)
    """

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr, momentum=0.9)


class LossTracker(Callback):
    """Keeps every step's loss; stops the run after ``patience`` consecutive NaN/Inf losses.

    Example:
        >>> tracker = LossTracker(patience=20)
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.losses: list[float] = []
        self.first_nonfinite: int | None = None
        self.stopped = False
        self._bad = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = float(outputs["loss"])  # a host read per step: fine for a CPU demo
        self.losses.append(loss)
        if math.isfinite(loss):
            self._bad = 0
            return
        if self.first_nonfinite is None:
            self.first_nonfinite = len(self.losses) - 1
        self._bad += 1
        if self.patience and self._bad >= self.patience:
            trainer.should_stop = True
            self.stopped = True


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar, labelled with the run instead of the epoch."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self._label = label

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self.train_progress_bar is not None:
            self.train_progress_bar.set_description(self._label)


class RunProgressLines(ProgressBar):
    """Plain progress lines for output that is no terminal (a file, a pipe): the run, the step
    and the loss at every tenth of the run, instead of a progress bar's redraws.

    Example:
        >>> bar = RunProgressLines("(a) vanishing")
    """

    def __init__(self, label: str, parts: int = 10) -> None:
        super().__init__()
        self._label = label
        self._parts = parts
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        total, step = trainer.max_steps, trainer.global_step
        if not self._enabled or total <= 0 or step % max(1, total // self._parts):
            return
        loss = trainer.progress_bar_metrics.get("loss")
        shown = f", loss {float(loss):.4g}" if loss is not None else ""
        print(f"  {self._label}: step {step}/{total}{shown}", flush=True)


@dataclass
class RunCallbacks:
    """The callbacks of one run and where to read their results.

    Attributes:
        callbacks: for ``Trainer(callbacks=...)``.
        callback: the run's :class:`gradstab.GradStabCallback` (it records the history and,
            at the end of ``fit``, diagnoses it: :attr:`GradStabCallback.diagnosis`).
        history: returns the run's gradient history, :attr:`GradStabCallback.history`
            (call it after ``fit``: the callback makes it at the first optimizer step).
        clipper: the :class:`gradstab.GradStabCallback` when the run clips, else ``None``
            (a monitor-only callback records the history of the other runs).
        clip: how the run clips, in words, or ``None``.
    """

    callbacks: list[Callback]
    callback: Any
    history: Callable[[], GradHistory | None]
    clipper: Any | None
    clip: str | None


def build_callbacks(*, capacity: int, max_norm: float | AdaptiveThreshold | None) -> RunCallbacks:
    """The one place that decides how a demo run is monitored and clipped.

    Every run has one :class:`gradstab.GradStabCallback` that keeps a gradient history of
    ``capacity`` optimizer steps (``history=capacity``): monitor-only (``mode=None``) without
    ``max_norm``; with ``max_norm`` (a number, or an adaptive threshold such as
    :class:`gradstab.ZScoreThreshold`) it clips the total norm and skips non-finite steps.
    The history keeps its extras (``history_extras=True``: zero fractions and parameter
    norms; the weights' scale at the first step is the evidence of the init prescription).
    Nothing is logged (``log_every_n_steps=0``); at the end of ``fit`` the callback diagnoses
    its history (:attr:`GradStabCallback.diagnosis`, with its prescriptions).

    Example:
        >>> parts = build_callbacks(capacity=10, max_norm=1.0)
        >>> type(parts.clipper).__name__, parts.history() is None  # no step yet
        ('GradStabCallback', True)
    """
    common: dict[str, Any] = {"history": capacity, "history_extras": True}
    common["log_every_n_steps"] = 0
    if max_norm is None:
        cb = gradstab.GradStabCallback(mode=None, **common)
        clipper = None
        clip = None
    else:
        cb = gradstab.GradStabCallback(max_norm=max_norm, nonfinite="skip", **common)
        clipper = cb
        bound = f"{max_norm:g}" if isinstance(max_norm, (int, float)) else _short(max_norm)
        clip = f"GradStabCallback: total norm clipped to {bound}, non-finite steps skipped"
    return RunCallbacks([cb], cb, lambda: cb.history, clipper, clip)


def _short(threshold: AdaptiveThreshold) -> str:
    """``repr`` of an adaptive threshold: its first option and those that differ from the
    defaults (e.g. ``PercentileThreshold(percentile=10.0, include_current=False)``)."""
    try:
        default = type(threshold)().state_dict()["config"]
    except TypeError:  # a threshold class without defaults
        return repr(threshold)
    config = threshold.state_dict()["config"]
    args = [f"{k}={v!r}" for i, (k, v) in enumerate(config.items()) if not i or default.get(k) != v]
    return f"{type(threshold).__name__}({', '.join(args)})"


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info messages, its warning about data-loader workers and the
    callback's fit-end line of counts (the demo prints them in its tables)."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            # Lightning 2.6 with torch >= 2.10: its pytree helper uses a deprecated LeafSpec
            warnings.filterwarnings("ignore", ".*LeafSpec.*", category=FutureWarning)
            # the callback's fit-end counts: the demo's own table shows them
            warnings.filterwarnings("ignore", r"GradStabCallback\(mode=.*optimizer steps")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def fit(
    module: pl.LightningModule,
    loader: torch.utils.data.DataLoader,
    callbacks: list[Callback],
    *,
    steps: int,
    progress_bar: bool,
) -> pl.Trainer:
    """Fit ``module`` with a CPU ``Trainer`` for ``steps`` steps, no logger or checkpoints.

    Returns:
        The trainer, after ``fit``.

    Example:
        >>> trainer = fit(Classifier(net, 0.05), loader, [], steps=10,
        ...               progress_bar=False)  # doctest: +SKIP
    """
    trainer = pl.Trainer(
        max_steps=steps,
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress_bar,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    trainer.fit(module, loader)
    return trainer
