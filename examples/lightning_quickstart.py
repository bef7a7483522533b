"""gradstab in Lightning: fused clipping and per-layer gradient health with one callback.

A deep tanh MLP with a deliberately large initialisation (its gradients explode) is trained on
synthetic regression data with ``GradStabCallback``: every optimizer step the global gradient
norm is clipped in one fused pass, a corrupted batch (NaN inputs, ``--nan-at``) is skipped
without touching the weights or AdamW's state, and every ``--log-every`` steps the pre/post-clip
norms, the clip rate and the per-layer norms and max-abs go to a CSV logger (and TensorBoard
when it is installed).

Run (well under a minute on a CPU):
    python examples/lightning_quickstart.py
    python examples/lightning_quickstart.py --max-steps 50 --out /tmp/gs-logs
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn

from gradstab import GradStabCallback


class DeepMLP(pl.LightningModule):
    """A deep tanh MLP whose weights are drawn with a too-large std; NaN batch at ``nan_at``."""

    def __init__(self, depth: int, width: int, init_std: float, nan_at: int | None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(16 if i == 0 else width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=init_std)
                nn.init.zeros_(m.bias)
        self.nan_at = nan_at

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.global_step == self.nan_at:
            x = torch.full_like(x, math.nan)  # a corrupted batch: every gradient turns NaN
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def make_data(n: int, seed: int) -> torch.utils.data.DataLoader:
    """Synthetic regression data: ``y = 2 tanh(x @ w)`` plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=gen)
    w = torch.randn(16, 1, generator=gen) / 4
    y = 2 * torch.tanh(x @ w) + 0.05 * torch.randn(n, 1, generator=gen)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=64, shuffle=True, generator=gen)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print where the logs are and a summary; return the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--depth", type=int, default=10)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--init-std", type=float, default=0.3)
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--nan-at", type=int, default=100, help="step of the NaN batch (-1: none)")
    parser.add_argument("--out", default="gradstab_quickstart_logs", help="log directory")
    parser.add_argument("--no-tensorboard", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: fastest for this tiny model)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pl.seed_everything(args.seed, verbose=False)
    model = DeepMLP(
        args.depth, args.width, args.init_std, args.nan_at if args.nan_at >= 0 else None
    )
    gradstab_cb = GradStabCallback(
        max_norm=args.max_norm,
        nonfinite="skip",  # bf16/fp32 have no GradScaler: this keeps a NaN step off the weights
        log_every_n_steps=args.log_every,
        log_per_layer=True,
    )
    loggers: list[Any] = [CSVLogger(args.out, name="quickstart")]
    if not args.no_tensorboard and importlib.util.find_spec("tensorboard") is not None:
        loggers.append(TensorBoardLogger(args.out, name="quickstart_tb"))
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        accelerator="cpu",
        devices=1,
        logger=loggers,
        log_every_n_steps=args.log_every,
        callbacks=[gradstab_cb],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, make_data(64 * 50, args.seed))

    counts = gradstab_cb.counters()
    m = gradstab_cb.last_metrics
    layers = {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith("grad_2.0_norm/")}
    loss = float(trainer.callback_metrics.get("train_loss", math.nan))
    print("\nLogs:")
    print(f"  CSV          {os.path.join(loggers[0].log_dir, 'metrics.csv')}")
    if len(loggers) > 1:
        print(f"  TensorBoard  tensorboard --logdir {loggers[1].log_dir}")
    print(
        f"Steps {counts['steps']}: clipped {counts['clipped_steps']}, "
        f"non-finite {counts['nonfinite_steps']}, skipped {counts['skipped_steps']}; "
        f"final loss {loss:.4f}"
    )
    if layers:
        big, small = max(layers, key=layers.get), min(layers, key=layers.get)
        print(
            f"Last log: pre-clip norm {m['grad_2.0_norm_total']:.3f}, post-clip "
            f"{m['grad/post_clip_norm_total']:.3f}, clip rate {m['grad/clip_rate']:.2f}; "
            f"largest layer {big} ({layers[big]:.3g}), smallest {small} ({layers[small]:.3g})"
        )
    return {
        **counts,
        "loss": loss,
        "csv": os.path.join(loggers[0].log_dir, "metrics.csv"),
        "last_metrics": dict(m),
    }


if __name__ == "__main__":
    main()
