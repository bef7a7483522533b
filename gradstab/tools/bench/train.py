"""``python -m gradstab bench --train``: what clipping and monitoring add to a Lightning step.

One small Lightning training loop (an MLP of ``--train-depth`` hidden layers of width
``--train-width``, AdamW, batches of 64, CSV logging every 50 steps) is timed three ways in
the same process, the variants alternating round by round (the first one rotating) so that a
noisy machine slows them all alike:

- ``none``: no clipping, no gradient monitoring;
- ``lightning``: ``Trainer(gradient_clip_val=1.0)`` plus Lightning's per-layer gradient norms
  logged every step, as users do with
  ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``;
- ``gradstab``: ``GradStabCallback(max_norm=1.0, log_per_layer=True, log_every_n_steps=50)``,
  which clips every step and logs the same per-layer norms (plus max-abs and the clip
  statistics) every 50 steps.

Every variant starts from the same weights and sees the same batches.  A step is timed from
the start of one training batch to the start of the next (forward, backward, hooks, clipping,
optimizer step, logging, data loading), the first ``--warmup`` steps of every fit excluded, on
two clocks: wall time, and the CPU time of this process (``time.process_time``), which other
processes on a shared machine disturb much less.  The report gives per-step medians, each
variant's overhead over ``none`` (difference of medians), and the ratio of gradstab's overhead
to Lightning's (the target on CPU: at most 1/3).  The final parameters of ``lightning`` and
``gradstab`` in the first round must agree (both clip the global norm to 1.0), and gradstab
must have clipped, or the run fails.

Example:
    $ python -m gradstab bench --train --quick
    $ python -m gradstab bench --train --repeats 7 --json train.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gradstab.tools.results import OtherLoad, header, quartiles, wants_raw, write_json

VARIANTS = ("none", "lightning", "gradstab")
MAX_NORM = 1.0
LOG_EVERY = 50
BATCH = 64

#: (rounds, steps per fit, warm-up steps per fit) by default and with ``--quick``.
DEFAULT_PLAN = (6, 200, 20)
QUICK_PLAN = (2, 60, 10)
CLOCKS = ("wall", "cpu")


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl  # noqa: PLC0415
    except ImportError as exc:
        raise SystemExit(
            "gradstab bench --train needs Lightning: pip install 'lightning>=2.2'"
        ) from exc
    return pl


def make_module(pl: Any, width: int, depth: int, variant: str) -> Any:
    """The benchmark's LightningModule: ``depth`` hidden ``Linear(width, width)`` + tanh layers.

    Args:
        pl: the ``lightning.pytorch`` module.
        width: hidden width.
        depth: number of hidden layers.
        variant: ``"none"``, ``"lightning"`` or ``"gradstab"``; ``"lightning"`` logs
            ``grad_norm(self, 2)`` every step.

    Returns:
        The module.

    Example:
        >>> import lightning.pytorch as pl
        >>> m = make_module(pl, 16, 2, "none")
        >>> sum(1 for _ in m.parameters())
        6
    """
    from lightning.pytorch.utilities import grad_norm  # noqa: PLC0415

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Linear(16, width), nn.Tanh()]
            for _ in range(depth - 1):
                layers += [nn.Linear(width, width), nn.Tanh()]
            layers.append(nn.Linear(width, 1))
            self.net = nn.Sequential(*layers)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            if variant == "lightning":
                self.log_dict(grad_norm(self, norm_type=2))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    return MLP()


def _data(steps: int, seed: int) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * BATCH, 16, generator=gen)
    y = torch.sin(3 * x[:, :1]) * 10 + torch.randn(steps * BATCH, 1, generator=gen)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def _fit(
    pl: Any,
    variant: str,
    template: dict,
    *,
    width: int,
    depth: int,
    steps: int,
    seed: int,
    logdir: str,
) -> tuple[dict[str, list[float]], Any, Any]:
    """One fit: per clock the times (ms) from each batch start to the next; module; callback."""
    from gradstab.callback import GradStabCallback  # noqa: PLC0415

    module = make_module(pl, width, depth, variant)
    module.load_state_dict(template)
    starts: list[tuple[float, float]] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            starts.append((time.perf_counter(), time.process_time()))

    callbacks: list[Any] = [Timer()]
    cb = None
    if variant == "gradstab":
        cb = GradStabCallback(max_norm=MAX_NORM, log_per_layer=True, log_every_n_steps=LOG_EVERY)
        callbacks.append(cb)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=pl.loggers.CSVLogger(logdir, name=variant),
        log_every_n_steps=LOG_EVERY,
        gradient_clip_val=MAX_NORM if variant == "lightning" else None,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    gc.collect()
    gc.disable()
    try:
        trainer.fit(module, _data(steps, seed))
    finally:
        gc.enable()
    times = {
        clock: [(b[k] - a[k]) * 1e3 for a, b in zip(starts, starts[1:])]
        for k, clock in enumerate(CLOCKS)
    }
    return times, module, cb


def measure(
    *,
    width: int = 64,
    depth: int = 8,
    rounds: int = DEFAULT_PLAN[0],
    steps: int = DEFAULT_PLAN[1],
    warmup: int = DEFAULT_PLAN[2],
    seed: int = 0,
    log: Any = None,
) -> dict[str, Any]:
    """Time the three variants, interleaved round by round.

    Args:
        width: hidden width of the MLP.
        depth: hidden layers of the MLP.
        rounds: fits of each variant.
        steps: optimizer steps per fit.
        warmup: steps at the start of every fit left out of the timings.
        seed: seed of the weights and the data.
        log: optional ``log(message)`` for progress.

    Returns:
        ``{"times": {clock: {variant: [ms, ...]}}, "check": {...}, "params": int,
        "tensors": int}`` with clocks ``"wall"`` and ``"cpu"``.

    Raises:
        RuntimeError: if the ``lightning`` and ``gradstab`` variants end with different
            parameters, or gradstab did not clip.

    Example:
        >>> r = measure(width=16, depth=2, rounds=1, steps=6, warmup=1)  # doctest: +SKIP
        >>> sorted(r["times"]["wall"])  # doctest: +SKIP
        ['gradstab', 'lightning', 'none']
    """
    if rounds < 1 or steps < 2 or not 0 <= warmup < steps - 1:
        raise ValueError(
            f"bench --train: need rounds >= 1, steps >= 2 and 0 <= warmup < steps - 1; got "
            f"rounds={rounds}, steps={steps}, warmup={warmup}"
        )
    pl = _lightning()
    torch.manual_seed(seed)
    template = copy.deepcopy(make_module(pl, width, depth, "none").state_dict())
    times: dict[str, dict[str, list[float]]] = {c: {v: [] for v in VARIANTS} for c in CLOCKS}
    check: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gradstab-bench-train-") as logdir, _quiet():
        for r in range(rounds):
            order = [VARIANTS[(r + k) % len(VARIANTS)] for k in range(len(VARIANTS))]
            finals = {}
            for v in order:
                t, module, cb = _fit(
                    pl, v, template, width=width, depth=depth, steps=steps, seed=seed, logdir=logdir
                )
                for c in CLOCKS:
                    times[c][v] += t[c][warmup:]
                finals[v] = module
                if cb is not None:
                    check["gradstab_counters"] = cb.counters()
            if r == 0:
                check.update(_check(finals["lightning"], finals["gradstab"], check))
            if log is not None:
                med = {v: statistics.median(times["wall"][v]) for v in VARIANTS}
                shown = ", ".join(f"{v} {m:.3f}" for v, m in med.items())
                log(f"round {r + 1}/{rounds}: median wall ms/step so far: {shown}")
    n_params = sum(p.numel() for p in template.values())
    return {"times": times, "check": check, "params": n_params, "tensors": len(template)}


def _check(lightning_module: Any, gradstab_module: Any, check: dict[str, Any]) -> dict[str, Any]:
    diff = 0.0
    for a, b in zip(lightning_module.parameters(), gradstab_module.parameters()):
        diff = max(diff, float((a - b).abs().max()))
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            raise RuntimeError(
                "bench --train: the gradstab and Lightning clipping runs ended with different "
                f"parameters (max abs difference {diff:.3g}); not timing"
            )
    clipped = check["gradstab_counters"]["clipped_steps"]
    if clipped == 0:
        raise RuntimeError("bench --train: gradstab never clipped; the comparison would be moot")
    return {"max_abs_param_diff": diff, "clipped_steps": clipped}


@contextlib.contextmanager
def _quiet():
    """Silence Lightning's per-fit info lines and warnings (they would swamp the report)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per clock: medians, quartiles, overheads over ``none`` and the ratio of overheads.

    Args:
        result: from :func:`measure`.

    Returns:
        ``{clock: {"rows": [...], "ratio": float | None}}``; ``ratio`` is gradstab's overhead
        over Lightning's (``None`` when Lightning's overhead is not positive).

    Example:
        >>> t = {"none": [1.0], "lightning": [2.0], "gradstab": [1.25]}
        >>> summarize({"times": {"wall": t, "cpu": t}})["cpu"]["ratio"]
        0.25
    """
    out = {}
    for clock in CLOCKS:
        times = result["times"][clock]
        med = {v: statistics.median(times[v]) for v in VARIANTS}
        rows = []
        for v in VARIANTS:
            q1, q3 = quartiles(times[v])
            rows.append(
                {
                    "variant": v,
                    "median_ms": med[v],
                    "iqr_ms": q3 - q1,
                    "steps": len(times[v]),
                    "overhead_ms": None if v == "none" else med[v] - med["none"],
                }
            )
        over_l = med["lightning"] - med["none"]
        over_g = med["gradstab"] - med["none"]
        out[clock] = {"rows": rows, "ratio": over_g / over_l if over_l > 0 else None}
    return out


def format_report(summary: dict[str, Any]) -> str:
    """The Markdown table and the verdict lines.

    Args:
        summary: from :func:`summarize`.

    Returns:
        The text.

    Example:
        >>> t = {"none": [1.0], "lightning": [2.0], "gradstab": [1.25]}
        >>> print(format_report(summarize({"times": {"wall": t, "cpu": t}})).splitlines()[-1])
        cpu clock:  gradstab overhead / Lightning overhead = 0.250 (target <= 0.333): met
    """
    lines = [
        "| variant | wall ms/step | wall IQR | wall overhead | CPU ms/step | CPU IQR | "
        "CPU overhead |",
        "|---|---|---|---|---|---|---|",
    ]
    for w, c in zip(summary["wall"]["rows"], summary["cpu"]["rows"]):
        cells = [w["variant"]]
        for r in (w, c):
            over = "" if r["overhead_ms"] is None else f"{r['overhead_ms']:+.3f}"
            cells += [f"{r['median_ms']:.3f}", f"{r['iqr_ms']:.3f}", over]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for clock in CLOCKS:
        ratio = summary[clock]["ratio"]
        head = f"{clock} clock:".ljust(11)
        if ratio is None:
            lines.append(f"{head} Lightning's overhead was not positive: no ratio (too noisy)")
        else:
            verdict = "met" if ratio <= 1 / 3 else "NOT met"
            if ratio < 0:
                verdict += " (gradstab's overhead is below the noise)"
            lines.append(
                f"{head} gradstab overhead / Lightning overhead = {ratio:.3f} "
                f"(target <= 0.333): {verdict}"
            )
    return "\n".join(lines)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``python -m gradstab bench --train``: measure and print the report.

    Args:
        args: the ``bench`` options (``--quick``, ``--repeats`` = rounds, ``--warmup`` =
            steps left out per fit, ``--threads``, ``--seed``, ``--json``,
            ``--train-width``, ``--train-depth``, ``--train-steps``).
        argv: the arguments after ``python -m gradstab``, echoed in the header.

    Returns:
        0, or 1 if the correctness check failed, 2 for bad options.

    Example:
        >>> run(parsed_args, ["bench", "--train", "--quick"])  # doctest: +SKIP
        0
    """
    if args.device != "cpu":
        print("gradstab bench --train: only --device cpu is supported", file=sys.stderr)
        return 2
    # The model is tiny: intra-op threads only add synchronisation (and, on a busy machine,
    # waits for a descheduled thread), so one thread unless --threads says otherwise.
    torch.set_num_threads(1 if args.threads is None else args.threads)
    rounds, steps, warmup = QUICK_PLAN if args.quick else DEFAULT_PLAN
    rounds = args.repeats or rounds
    steps = args.train_steps or steps
    warmup = warmup if args.warmup is None else args.warmup
    meta = header(argv, torch.device("cpu"))
    for k, v in meta.items():
        print(f"{k + ':':9} {v}")
    print(
        f"model:    MLP 16 -> {args.train_depth} x {args.train_width} (tanh) -> 1, AdamW, "
        f"batch {BATCH}; {rounds} round(s) x {steps} steps per variant, first {warmup} of "
        "each fit untimed",
        flush=True,
    )
    other = OtherLoad()
    t0 = time.perf_counter()
    try:
        result = measure(
            width=args.train_width,
            depth=args.train_depth,
            rounds=rounds,
            steps=steps,
            warmup=warmup,
            seed=args.seed,
            log=lambda msg: print(f"[bench --train] {msg}", file=sys.stderr, flush=True),
        )
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"gradstab bench --train: correctness check failed: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    busy = other.cpus()
    summary = summarize(result)
    print(f"({result['tensors']} parameter tensors, {result['params']:,} parameters)\n")
    print(format_report(summary))
    chk = result["check"]
    print(
        f"Check: gradstab clipped {chk['clipped_steps']} of {steps} steps in round 1; final "
        f"parameters match the Lightning run to {chk['max_abs_param_diff']:.2g} (max abs)."
    )
    load = f"; other processes kept {busy:.2f} of {os.cpu_count()} CPUs busy" if busy else ""
    print(f"Total time {elapsed:.1f} s{load}.")
    if args.json:
        doc = {"meta": {**meta, "elapsed_s": elapsed, "other_cpus_busy": busy}, "summary": summary}
        if wants_raw(args.json):
            doc["times_ms"] = result["times"]
        doc["model"] = {"width": args.train_width, "depth": args.train_depth, "batch": BATCH}
        doc["check"] = chk
        write_json(args.json, doc)
        print(f"Results written to {args.json}.")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``--train`` options to the ``bench`` parser.

    Args:
        parser: the ``bench`` subcommand parser.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--train"]).train_width
        64
    """
    parser.add_argument(
        "--train",
        action="store_true",
        help="time a small Lightning training loop without clipping, with Lightning's "
        "gradient_clip_val + grad_norm logging, and with GradStabCallback (needs lightning); "
        "--repeats = rounds, --warmup = untimed steps per fit, --threads defaults to 1",
    )
    parser.add_argument("--train-width", type=int, default=64, help="--train: MLP width (64)")
    parser.add_argument("--train-depth", type=int, default=8, help="--train: hidden layers (8)")
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help=f"--train: steps per fit (default {DEFAULT_PLAN[1]}; --quick {QUICK_PLAN[1]})",
    )
