"""The Lightning parts of ``python -m gradstab demo`` (imported only when the demo runs).

Kept apart from :mod:`gradstab.demo` so that ``python -m gradstab <any command>``, which
imports every command module to build its parser, works without Lightning installed.
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
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch import Tensor, nn

import gradstab
from gradstab.diagnosis import GradHistory

__all__ = [
    "Classifier",
    "LossTracker",
    "RunCallbacks",
    "RunProgressBar",
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


class _HistoryRecorder(Callback):
    """Records each step's gradient statistics into a :class:`gradstab.GradHistory`.

    The recorder goes before the clipping callback in the trainer's list and its
    :attr:`post` part after it (Lightning calls ``on_before_optimizer_step`` in list order):
    the first computes the pre-clip statistics (one fused read of the gradients), the second
    the post-clip total norm and whether the step was skipped (the ``"skip"`` policy sets
    every ``.grad`` to ``None``), and records the row.
    """

    def __init__(self, model: nn.Module, capacity: int, clip_threshold: float | None) -> None:
        self.history = GradHistory(model, capacity=capacity)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._named = named
        self._threshold = clip_threshold
        self._pending: tuple[Any, list[str], list[Tensor], int] | None = None
        recorder = self

        class _Post(Callback):
            def on_before_optimizer_step(
                self, trainer: pl.Trainer, pl_module: Any, optimizer: Any
            ) -> None:
                recorder._finish()

        self.post = _Post()

    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        with_grad = [(n, p) for n, p in self._named if p.grad is not None]
        grads = [p.grad for _, p in with_grad]
        stats = gradstab.grad_stats([p for _, p in with_grad])
        self._pending = (stats, [n for n, _ in with_grad], grads, trainer.global_step)

    @torch.no_grad()
    def _finish(self) -> None:
        if self._pending is None:
            return
        stats, names, grads, step = self._pending
        self._pending = None
        left = [p for _, p in self._named if p.grad is not None]
        post = None
        if self._threshold is not None:
            post = gradstab.grad_stats(left).total_norm if left else torch.zeros(())
        self.history.record(
            stats,
            names,
            grads=grads,
            post_clip_norm=post,
            clip_threshold=self._threshold,
            skipped=bool(names) and not left,
            step=step,
        )


class RunProgressBar(TQDMProgressBar):
    """Lightning's progress bar, labelled with the run instead of the epoch."""

    def __init__(self, label: str) -> None:
        super().__init__()
        self._label = label

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        if self.train_progress_bar is not None:
            self.train_progress_bar.set_description(self._label)


@dataclass
class RunCallbacks:
    """The callbacks of one run and where to read their results.

    Attributes:
        callbacks: for ``Trainer(callbacks=...)``, in this order.
        history: returns the run's gradient history (call it after ``fit``).
        clipper: the :class:`gradstab.GradStabCallback`, or ``None`` when the run does not
            clip.
        clip: how the run clips, in words, or ``None``.
    """

    callbacks: list[Callback]
    history: Callable[[], GradHistory]
    clipper: Any | None
    clip: str | None


def build_callbacks(model: nn.Module, *, capacity: int, max_norm: float | None) -> RunCallbacks:
    """The one place that decides how a demo run is monitored and clipped.

    Every run records its gradient statistics in a :class:`gradstab.GradHistory` of
    ``capacity`` steps; with ``max_norm`` the run also clips with
    :class:`gradstab.GradStabCallback` (total norm to ``max_norm``, non-finite steps
    skipped).

    Example:
        >>> parts = build_callbacks(torch.nn.Linear(2, 1), capacity=10, max_norm=1.0)
        >>> type(parts.clipper).__name__
        'GradStabCallback'
    """
    clipper = None
    clip = None
    if max_norm is not None:
        clipper = gradstab.GradStabCallback(
            mode="norm", max_norm=max_norm, nonfinite="skip", log_every_n_steps=0
        )
        clip = f"GradStabCallback: total norm clipped to {max_norm:g}, non-finite steps skipped"
    recorder = _HistoryRecorder(model, capacity=capacity, clip_threshold=max_norm)
    callbacks: list[Callback] = [recorder]
    if clipper is not None:
        callbacks.append(clipper)
    callbacks.append(recorder.post)
    return RunCallbacks(callbacks, lambda: recorder.history, clipper, clip)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's info messages and its warning about data-loader workers."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            # Lightning 2.6 with torch >= 2.10: its pytree helper uses a deprecated LeafSpec
            warnings.filterwarnings("ignore", ".*LeafSpec.*", category=FutureWarning)
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
