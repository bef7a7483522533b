"""(c) Exploding gradients: a deep ReLU MLP initialised too large diverges without clipping.

Run (c) of ``python -m gradstab demo``, as a plain PyTorch loop.  The weights of a 10-layer
ReLU MLP are drawn with std ``2 / sqrt(fan_in)`` (twice the variance of He's init), so the
logits and the gradients start about ``2^5`` times too large.  The first SGD steps then move
the weights so far that the next gradients are larger still: the total gradient norm goes
from hundreds to billions in three steps and then the loss is NaN.
:class:`gradstab.GradHistory` keeps recording (the NaN steps included) and
:func:`gradstab.diagnose` says where NaN/Inf first appeared and that the gradients exploded.
The loop stops after ``--patience`` steps with a non-finite loss.

Run (about 6 s of CPU time, on one torch thread: ``--threads``):
    python examples/exploding_without_clipping.py
    python examples/exploding_without_clipping.py --plots /tmp/gs-exploding
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
from torch import nn

import gradstab
from gradstab.tools.demo import exploding_mlp, make_data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train until the loss has been NaN for a while, print the diagnosis, return it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="at most this many SGD steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-gain", type=float, default=2.0, help="weight std x sqrt(fan_in)")
    parser.add_argument("--patience", type=int, default=20, help="stop after N NaN losses")
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
    x, y = make_data(4096, args.seed)
    model = exploding_mlp(depth=10, width=64, init_gain=args.init_gain)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = gradstab.GradHistory(model, capacity=args.steps)

    batches = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    for step in range(args.steps):
        idx = torch.randint(0, len(y), (64,), generator=batches)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        history.record_step(step)
        optimizer.step()  # no clipping: one huge gradient is one huge step
        losses.append(loss.item())
        if len(losses) >= args.patience and not any(map(math.isfinite, losses[-args.patience :])):
            break

    report = gradstab.diagnose(history)
    print(report)
    totals = history.data().total_norm.tolist()
    first_nan = next((i for i, v in enumerate(losses) if not math.isfinite(v)), None)
    print(
        "\nTotal gradient norm of the first steps: "
        + ", ".join(f"{v:.3g}" for v in totals[:4])
        + f"; loss NaN/Inf from step {first_nan}; stopped after {len(losses)} steps"
    )
    plots = history.plot(args.plots) if args.plots else []
    return {"diagnosis": report, "losses": losses, "first_nonfinite": first_nan, "plots": plots}


if __name__ == "__main__":
    main()
