"""gradstab under Lightning Fabric: ``GradStabOptimizer`` through ``fabric.setup``.

A deep tanh MLP with a too-large initialisation is trained on synthetic regression data with
Fabric.  Instead of calling ``fabric.clip_gradients`` before each step, the AdamW optimizer is
wrapped in :class:`gradstab.GradStabOptimizer` before ``fabric.setup(model, optimizer)``: every
``optimizer.step()`` then clips the global gradient norm in one fused pass, skips a step whose
gradients hold a NaN/Inf (``--nan-step`` plants one), and hands the metrics to
``fabric.log_dict`` every ``--log-every`` steps.  With ``--precision 16-mixed`` Fabric's
GradScaler unscales the gradients before the wrapper clips them (the wrapper declares
``_step_supports_amp_scaling = False``) and skips overflowing steps itself.

Run (about 11 s of CPU time on one torch thread; 16-mixed needs a CUDA device):
    python examples/fabric_loop.py
    python examples/fabric_loop.py --precision bf16-mixed --steps 50
    python examples/fabric_loop.py --accelerator cuda --precision 16-mixed
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from lightning.fabric import Fabric
from torch import nn

import gradstab


def make_model(depth: int, width: int, init_std: float) -> nn.Sequential:
    """A deep tanh MLP whose weights are drawn with a deliberately large std."""
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(16 if i == 0 else width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 1))
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_std)
            nn.init.zeros_(m.bias)
    return model


def main(argv: list[str] | None = None, fabric: Fabric | None = None) -> dict[str, Any]:
    """Train with Fabric; return the losses, the counters and the last logged metrics.

    Args:
        argv: command-line arguments.
        fabric: a Fabric to use instead of ``Fabric(accelerator=..., precision=...)`` (tests
            pass one with their own precision plugin).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--precision", default="32-true", help="32-true, bf16-mixed, 16-mixed")
    parser.add_argument("--accelerator", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--max-norm", type=float, default=1.0)
    parser.add_argument("--nan-step", type=int, default=50, help="plant a NaN here (-1: none)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fastest for this small model, and steady when "
        "other processes share the CPU)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if fabric is None:
        fabric = Fabric(accelerator=args.accelerator, devices=1, precision=args.precision)
    fabric.seed_everything(args.seed, verbose=False)
    model = make_model(depth=12, width=64, init_std=0.5)
    logged: list[tuple[int, dict[str, float]]] = []

    def log_fn(metrics: dict[str, float], step: int) -> None:
        fabric.log_dict(metrics, step=step)  # to Fabric's loggers (none configured here)
        logged.append((step, metrics))

    optimizer = gradstab.GradStabOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        max_norm=args.max_norm,
        nonfinite="skip",
        module=model,  # parameter names in the metrics
        log_every_n_steps=args.log_every,
        log_fn=log_fn,
    )
    model, optimizer = fabric.setup(model, optimizer)  # no fabric.clip_gradients needed

    x = torch.randn(512, 16, device=fabric.device)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    losses: list[float] = []
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        fabric.backward(loss)
        if step == args.nan_step:  # a corrupted batch: the step is skipped, weights untouched
            next(model.parameters()).grad[0, 0] = float("nan")
        optimizer.step()  # 16-mixed: the scaler unscales, then gradstab clips, then AdamW
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 and logged:
            s, m = logged[-1]
            print(
                f"step {s:4d}  loss {losses[-1]:.4f}  pre-clip norm "
                f"{m['grad_2.0_norm_total']:9.3f}  clip coefficient {m['grad/clip_coef']:.3g}"
            )
    counters = optimizer.counters()  # forwarded through Fabric's optimizer wrapper
    print(
        f"{args.precision}: {counters['steps']} optimizer steps through gradstab "
        f"({counters['clipped_steps']} clipped, {counters['skipped_steps']} skipped for "
        f"NaN/Inf); final loss {losses[-1]:.4f}"
    )
    return {"losses": losses, "counters": counters, "logged": logged, "optimizer": optimizer}


if __name__ == "__main__":
    main()
