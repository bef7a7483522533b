"""(d) The exploding net of (c), trained stably by clipping with gradstab.

Run (d) of ``python -m gradstab demo``.  The same ReLU MLP with the same too-large initial
weights as ``exploding_without_clipping.py`` is trained twice:

1. in Lightning with :class:`gradstab.GradStabCallback`: the total gradient norm is clipped to
   ``--max-norm`` in one fused pass before every optimizer step, and a step whose gradients
   hold a NaN/Inf would be skipped (``nonfinite="skip"``: parameters and momentum untouched);
2. in a plain PyTorch loop with an adaptive threshold,
   :class:`gradstab.ZScoreThreshold` (z-score spike clipping in the manner of ZClip) under the
   same hard cap, through :func:`gradstab.adaptive.clip_`.

Both record per-layer gradient statistics in a :class:`gradstab.GradHistory` (pre-clip) and
print :func:`gradstab.diagnose`'s verdict, the steps clipped and the accuracy reached.

Run (about 10 seconds on a CPU):
    python examples/exploding_with_gradstab.py
    python examples/exploding_with_gradstab.py --steps 30
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

import gradstab
from gradstab.demo import exploding_mlp, make_data


class Classifier(pl.LightningModule):
    """Cross-entropy with SGD (lr 0.05, momentum 0.9), as in the other examples."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)


class RecordGradients(pl.Callback):
    """Feeds a GradHistory each optimizer step (put it before GradStabCallback: pre-clip)."""

    def __init__(self, history: gradstab.GradHistory) -> None:
        self.history = history

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        self.history.record_step(trainer.global_step)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Validation accuracy, or None when the outputs are not finite."""
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(1) == y).float().mean()) if out.isfinite().all() else None


def with_lightning(args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Part 1: Lightning + GradStabCallback with a fixed threshold."""
    x, y, x_val, y_val = data
    torch.manual_seed(args.seed)
    model = exploding_mlp(depth=10, width=64)
    history = gradstab.GradHistory(model, capacity=args.steps)
    clipper = gradstab.GradStabCallback(
        mode="norm", max_norm=args.max_norm, nonfinite="skip", log_every_n_steps=0
    )
    sampler = torch.utils.data.RandomSampler(
        range(len(y)),
        replacement=True,
        num_samples=64 * args.steps,
        generator=torch.Generator().manual_seed(args.seed),
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=64, sampler=sampler
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no banner
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress_bar,
        callbacks=[RecordGradients(history), clipper],  # the recorder first: pre-clip norms
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*", category=FutureWarning)
        trainer.fit(Classifier(model), loader)

    report = gradstab.diagnose(history)
    counts = clipper.counters()
    acc = accuracy(model, x_val, y_val)
    print(
        f"\n1. Lightning + GradStabCallback(max_norm={args.max_norm:g}, nonfinite='skip'): "
        f"{counts['clipped_steps']} of {counts['steps']} steps clipped, "
        f"{counts['skipped_steps']} skipped; validation accuracy "
        f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}; diagnosis: "
        + ("healthy" if report.healthy else "; ".join(report.findings()))
    )
    return {"counters": counts, "accuracy": acc, "diagnosis": report}


def with_adaptive_threshold(
    args: argparse.Namespace, data: tuple[torch.Tensor, ...]
) -> dict[str, Any]:
    """Part 2: a plain loop, z-score spike clipping under the same hard cap."""
    x, y, x_val, y_val = data
    torch.manual_seed(args.seed)
    model = exploding_mlp(depth=10, width=64)  # the same initial weights as part 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = gradstab.GradHistory(model, capacity=args.steps)
    threshold = gradstab.ZScoreThreshold(max_norm=args.max_norm)  # ZClip's defaults + a cap
    batches = torch.Generator().manual_seed(args.seed)
    clipped = 0
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (64,), generator=batches)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        history.record_step(step)
        total = gradstab.adaptive.clip_(model.parameters(), threshold)  # clip, then update
        clipped += int(gradstab.grad_stats(model.parameters()).total_norm < total)
        optimizer.step()

    report = gradstab.diagnose(history)
    stats = threshold.statistics()
    spikes = int(stats["spikes"]) if stats is not None else 0
    acc = accuracy(model, x_val, y_val)
    print(
        f"2. plain loop + ZScoreThreshold(max_norm={args.max_norm:g}): {clipped} of "
        f"{args.steps} steps clipped ({spikes} z-score spikes detected); validation accuracy "
        f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}; diagnosis: "
        + ("healthy" if report.healthy else "; ".join(report.findings()))
    )
    return {"clipped_steps": clipped, "spikes": spikes, "accuracy": acc, "diagnosis": report}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts; return their measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-norm", type=float, default=2.0, help="clip threshold (cap)")
    parser.add_argument("--no-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    data = (*make_data(4096, args.seed), *make_data(1024, args.seed, split=1))
    return {
        "lightning": with_lightning(args, data),
        "adaptive": with_adaptive_threshold(args, data),
    }


if __name__ == "__main__":
    main()
