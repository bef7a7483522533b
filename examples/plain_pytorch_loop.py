"""gradstab in a plain PyTorch training loop: per-layer statistics and fused clipping.

A deep tanh MLP with a too-large initialisation is trained on synthetic regression data.
Each step, ``gradstab.clip_grad_norm_`` clips the global gradient norm in one fused pass,
and every ``--log-every`` steps ``gradstab.grad_stats`` reports the per-layer gradient
norms, max-abs and non-finite counts, read on the host only then.

Run (about 9 s of CPU time, on one torch thread: ``--threads``):
    python examples/plain_pytorch_loop.py --steps 200
"""

from __future__ import annotations

import argparse

import torch
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


def main(argv: list[str] | None = None) -> float:
    """Train and return the final loss."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--init-std", type=float, default=0.5)
    parser.add_argument("--max-norm", type=float, default=1.0)
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

    torch.manual_seed(args.seed)
    model = make_model(args.depth, args.width, args.init_std)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(512, 16)
    y = torch.sin(x.sum(dim=1, keepdim=True))
    clipped = 0
    loss = torch.tensor(float("nan"))
    for step in range(1, args.steps + 1):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        total = gradstab.clip_grad_norm_(model.parameters(), max_norm=args.max_norm)
        clipped += int(total > args.max_norm)  # host read, for this demo's report only
        opt.step()
        if step % args.log_every == 0 or step == 1:
            stats = gradstab.grad_stats(model.parameters())  # post-clip statistics
            worst = int(stats.norms.argmax())
            print(
                f"step {step:4d}  loss {loss.item():.4f}  pre-clip norm {total.item():9.3f}  "
                f"largest layer {names[worst]} ({stats.norms[worst].item():.3f})  "
                f"smallest {stats.norms.min().item():.2e}  non-finite {int(stats.nonfinite.sum())}"
            )
    print(f"clipped {clipped} of {args.steps} steps; final loss {loss.item():.4f}")
    return loss.item()


if __name__ == "__main__":
    main()
