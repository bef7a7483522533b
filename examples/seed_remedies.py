"""Classic remedies that are not gradstab's own, measured with gradstab's statistics.

The two broken nets of ``python -m gradstab demo`` are trained with the usual textbook
remedies, one at a time, in plain PyTorch loops: for the vanishing sigmoid MLP, Adam instead
of SGD, ReLU instead of sigmoid, and ReLU with He's init (``torch.nn.init.kaiming_normal_``);
for the exploding ReLU MLP, L2 weight decay, learning-rate decay, a smaller learning rate and
Adam.  Every variant records its gradients in a :class:`gradstab.GradHistory`; the table
shows what :func:`gradstab.diagnose` and the recorded norms say about each: the largest total
gradient norm, how far apart the per-layer gradient norms are (decades between the smallest
and the largest weight matrix, medians over the run), the first step with a NaN/Inf loss,
the verdict over the whole run and over its last 50 steps (a net that collapsed mid-run,
e.g. with every ReLU dead, shows there as "dead"), next to the final loss and the
validation accuracy.  Some remedies help, some do not: the table says
which, for this net and this seed.

Run (about 18 s of CPU time, on one torch thread: ``--threads``):
    python examples/seed_remedies.py
    python examples/seed_remedies.py --steps 30 --seed 1
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import gradstab
from gradstab.tools.demo import exploding_mlp, make_data, mlp, sigmoid_mlp, verdict

Optimizer = torch.optim.Optimizer


def sgd(lr: float = 0.05, weight_decay: float = 0.0) -> Callable[[Any], Optimizer]:
    return lambda params: torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def adam(lr: float = 1e-3) -> Callable[[Any], Optimizer]:
    return lambda params: torch.optim.Adam(params, lr=lr)


def relu_he_init() -> nn.Module:
    """ReLU MLP with He's init from torch.nn.init (not gradstab.init)."""
    model = mlp(10, 64, nn.ReLU)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model


@dataclass
class Variant:
    problem: str
    remedy: str
    model: Callable[[], nn.Module]
    optimizer: Callable[[Any], Optimizer]
    scheduler: Callable[[Optimizer], Any] | None = None


VARIANTS = [
    Variant("vanishing", "none (sigmoid, SGD)", lambda: sigmoid_mlp(10, 64), sgd()),
    Variant("vanishing", "Adam instead of SGD", lambda: sigmoid_mlp(10, 64), adam()),
    Variant("vanishing", "ReLU instead of sigmoid", lambda: mlp(10, 64, nn.ReLU), sgd()),
    Variant("vanishing", "ReLU + He init (torch.nn.init)", relu_he_init, sgd()),
    Variant("exploding", "none (SGD lr 0.05)", lambda: exploding_mlp(10, 64), sgd()),
    Variant("exploding", "L2 weight decay 1e-2", lambda: exploding_mlp(10, 64), sgd(0.05, 1e-2)),
    Variant(
        "exploding",
        "LR decay (x0.98 per step)",
        lambda: exploding_mlp(10, 64),
        sgd(),
        lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.98),
    ),
    Variant("exploding", "smaller LR (0.005)", lambda: exploding_mlp(10, 64), sgd(0.005)),
    Variant("exploding", "Adam instead of SGD", lambda: exploding_mlp(10, 64), adam()),
]


def train(variant: Variant, steps: int, seed: int, data: tuple[torch.Tensor, ...]) -> dict:
    """Train one variant; return its measurements."""
    x, y, x_val, y_val = data
    torch.manual_seed(seed)  # the same initial weights for every remedy of a problem
    model = variant.model()
    optimizer = variant.optimizer(model.parameters())
    scheduler = variant.scheduler(optimizer) if variant.scheduler else None
    history = gradstab.GradHistory(model, capacity=steps)
    batches = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    for step in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=batches)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        history.record_step(step)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if len(losses) >= 20 and not any(map(math.isfinite, losses[-20:])):
            break  # diverged: 20 NaN/Inf losses in a row

    report = gradstab.diagnose(history)
    end = gradstab.diagnose(history, window=50)  # the end of the run: collapsed or dead?
    total = history.data().total_norm
    finite_total = total[torch.isfinite(total)]
    weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    norms = [r.median_norm for r in report.layers if r.name in weights]
    norms = [v for v in norms if math.isfinite(v) and v > 0]
    with torch.no_grad():
        out = model.eval()(x_val)
    accuracy = float((out.argmax(1) == y_val).float().mean()) if out.isfinite().all() else None
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "problem": variant.problem,
        "remedy": variant.remedy,
        "final_loss": sum(tail) / len(tail),
        "accuracy": accuracy,
        "max_total_norm": float(finite_total.max()) if finite_total.numel() else math.nan,
        "spread_decades": math.log10(max(norms) / min(norms)) if norms else math.nan,
        "first_nonfinite": next((i for i, v in enumerate(losses) if not math.isfinite(v)), None),
        "verdict": verdict(report),
        "verdict_end": verdict(end),
        "diagnosis": report,
    }


def print_table(rows: list[dict]) -> None:
    header = ["problem", "remedy", "final loss", "val acc", "max |g| total", "layer spread",
              "NaN from", "diagnosis", "last 50 steps"]  # fmt: skip
    body = [
        [
            r["problem"],
            r["remedy"],
            f"{r['final_loss']:.3g}",
            "n/a" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
            f"{r['max_total_norm']:.3g}",
            f"{r['spread_decades']:.1f} dec",
            "-" if r["first_nonfinite"] is None else f"step {r['first_nonfinite']}",
            r["verdict"],
            r["verdict_end"],
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    for cells in [header, ["-" * w for w in widths], *body]:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())


def main(argv: list[str] | None = None) -> list[dict]:
    """Train every variant, print the table, return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per variant")
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
    data = (*make_data(4096, args.seed), *make_data(1024, args.seed, split=1))
    rows = [train(v, args.steps, args.seed, data) for v in VARIANTS]
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
