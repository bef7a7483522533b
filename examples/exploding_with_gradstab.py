"""(d) and (e): the exploding net of (c), trained stably by clipping with gradstab.

Runs (d) and (e) of ``python -m gradstab demo``.  The same ReLU MLP with the same too-large
initial weights as ``exploding_without_clipping.py`` is trained twice:

1. in Lightning with :class:`gradstab.GradStabCallback`: the total gradient norm is clipped to
   ``--max-norm`` in one fused pass before every optimizer step, and a step whose gradients
   hold a NaN/Inf would be skipped (``nonfinite="skip"``: parameters and momentum untouched);
2. in a plain PyTorch loop with :class:`gradstab.GradStabOptimizer` and an adaptive threshold,
   :class:`gradstab.PercentileThreshold` (AutoClip: the ``--percentile``-th percentile of the
   earlier steps' total norms) under the same hard cap.  The cap does the clipping while the
   norms are large; the percentile takes over once they have come down.

Both keep their gradient history themselves (``history=<steps>``: pre-clip per-layer norms,
the post-clip norm, the threshold in force) and diagnose it; the script prints the verdict,
the steps clipped, the thresholds used and the accuracy reached.

Run (about 15 s of CPU time, on one torch thread: ``--threads``):
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
from gradstab.tools.demo import exploding_mlp, make_data


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


def verdict(report: gradstab.Diagnosis) -> str:
    """``healthy`` or the diagnosis's findings."""
    return "healthy" if report.healthy else "; ".join(report.findings())


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Validation accuracy, or None when the outputs are not finite."""
    with torch.no_grad():
        out = model(x)
    return float((out.argmax(1) == y).float().mean()) if out.isfinite().all() else None


def with_lightning(args: argparse.Namespace, data: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """Part 1: Lightning + GradStabCallback with a fixed threshold and a gradient history."""
    x, y, x_val, y_val = data
    torch.manual_seed(args.seed)
    model = exploding_mlp(depth=10, width=64)
    clipper = gradstab.GradStabCallback(
        max_norm=args.max_norm, nonfinite="skip", history=args.steps, log_every_n_steps=0
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
        callbacks=[clipper],
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*LeafSpec.*", category=FutureWarning)
        trainer.fit(Classifier(model), loader)

    report = clipper.diagnosis  # made from clipper.history at the end of fit
    assert report is not None
    counts = clipper.counters()
    acc = accuracy(model, x_val, y_val)
    print(
        f"\n1. Lightning + GradStabCallback(max_norm={args.max_norm:g}, nonfinite='skip', "
        f"history={args.steps}): {counts['clipped_steps']} of {counts['steps']} steps clipped, "
        f"{counts['skipped_steps']} skipped; validation accuracy "
        f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}; diagnosis: {verdict(report)}"
    )
    return {"counters": counts, "accuracy": acc, "diagnosis": report}


def with_adaptive_threshold(
    args: argparse.Namespace, data: tuple[torch.Tensor, ...]
) -> dict[str, Any]:
    """Part 2: a plain loop, GradStabOptimizer, a percentile threshold under the same cap."""
    x, y, x_val, y_val = data
    torch.manual_seed(args.seed)
    model = exploding_mlp(depth=10, width=64)  # the same initial weights as part 1
    threshold = gradstab.PercentileThreshold(
        args.percentile, include_current=False, max_norm=args.max_norm
    )
    optimizer = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        max_norm=threshold,
        nonfinite="skip",
        module=model,
        history=args.steps,
    )
    batches = torch.Generator().manual_seed(args.seed)
    for _ in range(args.steps):
        idx = torch.randint(0, len(y), (64,), generator=batches)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        optimizer.step()  # clips to this step's threshold, then steps SGD

    report = optimizer.diagnose()
    counts = optimizer.counters()
    assert optimizer.history is not None
    used = optimizer.history.data().clip_threshold  # the threshold in force at each step
    assert used is not None
    below = int((used < args.max_norm).sum())
    acc = accuracy(model, x_val, y_val)
    print(
        f"2. plain loop + GradStabOptimizer(max_norm=PercentileThreshold({args.percentile:g}, "
        f"include_current=False, max_norm={args.max_norm:g})): {counts['clipped_steps']} of "
        f"{counts['steps']} steps clipped; threshold {float(used.min()):.3g}.."
        f"{float(used.max()):.3g}, below the cap at {below} steps; validation accuracy "
        f"{'n/a' if acc is None else f'{100 * acc:.1f}%'}; diagnosis: {verdict(report)}"
    )
    return {
        "counters": counts,
        "thresholds": used,
        "below_cap_steps": below,
        "accuracy": acc,
        "diagnosis": report,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run both parts; return their measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps per part")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-norm", type=float, default=2.0, help="clip threshold (cap)")
    parser.add_argument(
        "--percentile", type=float, default=10.0, help="part 2: percentile of the earlier norms"
    )
    parser.add_argument("--no-progress-bar", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for this small model, and steady when "
        "other processes share the CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = (*make_data(4096, args.seed), *make_data(1024, args.seed, split=1))
    return {
        "lightning": with_lightning(args, data),
        "adaptive": with_adaptive_threshold(args, data),
    }


if __name__ == "__main__":
    main()
