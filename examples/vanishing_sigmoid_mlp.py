"""(a) Vanishing gradients: a deep sigmoid MLP with PyTorch's default initialisation.

Run (a) of ``python -m gradstab demo``, as a plain PyTorch loop.  A 10-layer sigmoid MLP is
trained with SGD on a generated 10-class task while :class:`gradstab.GradHistory` records
every step's per-layer gradient statistics (one fused read of the gradients per step, kept
on the device).  :func:`gradstab.diagnose` then names the problem: the gradient norms shrink
by about 7x per layer toward the input, the first layers are "vanishing", and the net stays
at chance accuracy.

Run (about 7 s of CPU time, on one torch thread: ``--threads``):
    python examples/vanishing_sigmoid_mlp.py
    python examples/vanishing_sigmoid_mlp.py --steps 20 --plots /tmp/gs-vanishing
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch import nn

import gradstab
from gradstab.tools.demo import make_data, sigmoid_mlp


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train, print the diagnosis, return the measurements."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="SGD steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plots", default=None, help="write the pictures to this folder")
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
    x, y = make_data(4096, args.seed)  # a generated task: no download
    x_val, y_val = make_data(1024, args.seed, split=1)
    model = sigmoid_mlp(depth=10, width=64)  # nn.Sequential, PyTorch's default init
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = gradstab.GradHistory(model, capacity=args.steps)

    batches = torch.Generator().manual_seed(args.seed)
    losses = []
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (64,), generator=batches)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        history.record_step(step)  # per-layer norm, max |g|, NaN count: no host sync
        optimizer.step()
        losses.append(loss.item())

    report = gradstab.diagnose(history)
    print(report)
    with torch.no_grad():
        accuracy = float((model(x_val).argmax(1) == y_val).float().mean())
    first, last = report.layers[0], report.layers[-2]  # first and last weight matrix
    print(
        f"\nGradient norm (median over {args.steps} steps): {first.name} {first.median_norm:.3g}, "
        f"{last.name} {last.median_norm:.3g}; validation accuracy {100 * accuracy:.1f}% "
        f"(chance 10%); final loss {losses[-1]:.3f}"
    )
    plots = history.plot(args.plots) if args.plots else []
    return {"diagnosis": report, "accuracy": accuracy, "losses": losses, "plots": plots}


if __name__ == "__main__":
    main()
