"""``python -m gradstab bench --train``: what clipping and monitoring add to a Lightning step.

One small Lightning training loop (CSV logging every 50 steps) is timed three ways in the same
process, the variants alternating round by round (the first one rotating) so that a noisy
machine slows them all alike.  The model (``--train-model``):

- ``mlp`` (default): an MLP of ``--train-depth`` hidden layers of width ``--train-width``
  (8 x 64, tanh), MSE regression, torch's default AdamW, batches of 64;
- ``transformer``: a GPT-2-like decoder built from ``torch.nn`` only
  (:class:`~gradstab.tools.bench.train_models.TransformerSpec`; by default 4 pre-LayerNorm
  blocks, d_model 128, 4 heads, 64 tokens, vocabulary 512, tied LM head, batch 16: 52
  tensors, 867,072 parameters), next-token cross-entropy on generated token sequences, and
  ``AdamW(fused=True)`` where torch has a fused AdamW for the device (the CPU since torch
  2.4), else torch's default AdamW; the report and the JSON name the optimizer used.

The variants:

- ``none``: no clipping, no gradient monitoring;
- ``lightning``: ``Trainer(gradient_clip_val=1.0)`` plus Lightning's per-layer gradient norms
  logged every step, as users do with
  ``self.log_dict(grad_norm(self, norm_type=2))`` in ``on_before_optimizer_step``;
- ``gradstab``: ``GradStabCallback(max_norm=1.0, log_per_layer=True, log_every_n_steps=50)``,
  which clips every step and logs the same per-layer norms (plus max-abs and the clip
  statistics) every 50 steps.

(``--train-max-norm`` changes the bound 1.0 of both clipping variants.)  Every variant starts
from the same weights and sees the same batches.  A step is timed from the start of one
training batch to the start of the next (forward, backward, hooks, clipping, optimizer step,
logging, data loading), the first ``--warmup`` steps of every fit excluded, on two clocks: wall
time, and the CPU time of this process (``time.process_time``), which other processes on a
shared machine disturb much less.  The report gives per-step medians, each variant's overhead
over ``none`` (difference of medians), and the ratio of gradstab's overhead to Lightning's
(the target on CPU: at most 1/3).

``--device cuda`` (or ``cuda:N``) trains on that GPU (``Trainer(accelerator="gpu")``), the
batches made on the GPU before the fit, and calls ``torch.cuda.synchronize()`` before each
timestamp, so each interval holds one whole step, its GPU work included.  The ``cpu`` clock is
then the host's CPU time, which includes the host's wait in ``synchronize`` where the driver
spins.  Without a CUDA device ``--device cuda`` exits with status 2 and says so.  The header
and the JSON (``meta.device``) record the device.

Correctness: in the first round the parameters of ``lightning`` and ``gradstab`` must agree
(both clip the global norm to the same bound) -- the final ones for the MLP (rtol 1e-4, atol
1e-5), those after 50 steps for the transformer (rtol 1e-3, atol 1e-4: the two runs' clip
coefficients differ in their last bits, and fused AdamW and the model amplify that faster than
linearly; :func:`check_plan` gives the measurements) -- and gradstab must have clipped, or the
run fails (exit status 1) before reporting any timing.

Example:
    $ python -m gradstab bench --train --quick
    $ python -m gradstab bench --train --repeats 7 --json train.json
    $ python -m gradstab bench --train --train-model transformer --repeats 3 --train-steps 60
    $ python -m gradstab bench --train --device cuda --train-model transformer
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import io
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from gradstab.tools.bench.train_models import (
    TinyGPT,
    TransformerSpec,
    batched,
    fused_adamw_supported,
    token_data,
)
from gradstab.tools.results import OtherLoad, header, quartiles, wants_raw, write_json

VARIANTS = ("none", "lightning", "gradstab")
MODELS = ("mlp", "transformer")
MAX_NORM = 1.0
LOG_EVERY = 50
#: The MLP's batch size, width and hidden layers (``--train-width``/``--train-depth``).
BATCH = 64
MLP_WIDTH = 64
MLP_DEPTH = 8
#: AdamW's learning rate, both models.
LR = 1e-3

#: (rounds, steps per fit, warm-up steps per fit) by default and with ``--quick``.
DEFAULT_PLAN = (6, 200, 20)
QUICK_PLAN = (2, 60, 10)
CLOCKS = ("wall", "cpu")


#: The transformer's parameters are compared after this many steps (or all, if fewer).
CHECK_STEPS = 50


def check_plan(model: str, steps: int) -> tuple[int, float, float]:
    """When and how closely the ``lightning`` and ``gradstab`` runs' parameters must agree.

    Returns ``(after_steps, rtol, atol)``: the parameters of both runs of the first round are
    compared after ``after_steps`` optimizer steps with ``torch.allclose(rtol, atol)``.

    Both runs clip the same global norm to the same bound, but torch's ``clip_grad_norm_``
    and gradstab reduce the norm in a different order, so the clip coefficients differ in their
    last bits, and AdamW carries that into every later step.  The MLP (torch's default AdamW)
    stays within 1e-6 over 200 steps: its final parameters are compared, ``(1e-4, 1e-5)``.
    The transformer drifts faster, and faster than linearly: AdamW moves every element by about
    ``lr`` per step whatever its gradient's size, so where a gradient element is near zero a
    last-bit difference can change the direction of its update, and the training dynamics
    amplify the gap.  Measured on the default transformer (fused AdamW, CPU, lr 1e-3): the
    clipped gradients of step 1 differ by 2.4e-7 relative (2 ulp); the parameters by 3.5e-6
    (max abs) after 10 steps, 1.8e-5 after 50, 7.4e-5 after 100 and 5.1e-4 after 200;
    clipping both runs with torch's own ``clip_grad_norm_`` and nudging one coefficient by one
    ulp drifts alike (1.8e-5 after 50, 6.0e-4 after 200).  So the transformer's runs are
    compared after :data:`CHECK_STEPS` steps (whatever ``--train-steps``), with
    ``(1e-3, 1e-4)``: five times the drift measured there, while a tensor that gradstab failed
    to clip or update moves by about ``lr`` per step (7e-3 after 8 steps) and is caught
    (tests/test_bench_train.py).

    Example:
        >>> check_plan("transformer", 200)
        (50, 0.001, 0.0001)
    """
    if model == "mlp":
        return steps, 1e-4, 1e-5
    return min(steps, CHECK_STEPS), 1e-3, 1e-4


def _lightning() -> Any:
    try:
        import lightning.pytorch as pl  # noqa: PLC0415
    except ImportError as exc:
        raise SystemExit(
            "gradstab bench --train needs Lightning: pip install 'lightning>=2.2'"
        ) from exc
    return pl


def _log_grad_norms(module: Any, variant: str) -> None:
    """The ``lightning`` variant's monitoring: Lightning's per-layer norms, every step."""
    if variant == "lightning":
        from lightning.pytorch.utilities import grad_norm  # noqa: PLC0415

        module.log_dict(grad_norm(module, norm_type=2))


def make_module(pl: Any, width: int, depth: int, variant: str) -> Any:
    """The benchmark's MLP LightningModule: ``depth`` hidden ``Linear(width, width)`` + tanh.

    Args:
        pl: the ``lightning.pytorch`` module.
        width: hidden width.
        depth: number of hidden layers.
        variant: ``"none"``, ``"lightning"`` or ``"gradstab"``; ``"lightning"`` logs
            ``grad_norm(self, 2)`` every step.

    Returns:
        The module (torch's default AdamW, lr :data:`LR`).

    Example:
        >>> import lightning.pytorch as pl
        >>> m = make_module(pl, 16, 2, "none")
        >>> sum(1 for _ in m.parameters())
        6
    """

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
            _log_grad_norms(self, variant)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=LR)

    return MLP()


def make_transformer_module(
    pl: Any, spec: TransformerSpec, variant: str, *, fused: bool = False
) -> Any:
    """The ``--train-model transformer`` LightningModule: :class:`TinyGPT`, next-token loss.

    Args:
        pl: the ``lightning.pytorch`` module.
        spec: the sizes.
        variant: as for :func:`make_module`.
        fused: ``AdamW(fused=True)`` (else torch's default AdamW for the device).

    Returns:
        The module.

    Example:
        >>> import lightning.pytorch as pl
        >>> m = make_transformer_module(pl, TransformerSpec(layers=1, d_model=16, heads=2), "none")
        >>> sum(1 for _ in m.parameters())  # tied head: 2 embeddings + 12 per block + final LN
        16
    """

    class GPT(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = TinyGPT(spec)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.model(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
            _log_grad_norms(self, variant)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            extra = {"fused": True} if fused else {}
            return torch.optim.AdamW(self.parameters(), lr=LR, **extra)

    return GPT()


def _data(steps: int, seed: int, device: torch.device | None = None) -> Any:
    """The MLP's batches (regression on ``sin``); on CUDA, already on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * BATCH, 16, generator=gen)
    y = torch.sin(3 * x[:, :1]) * 10 + torch.randn(steps * BATCH, 1, generator=gen)
    if device is not None and device.type != "cpu":
        return batched((x, y), BATCH, device)
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=False)


def _fit(
    pl: Any,
    variant: str,
    template: dict,
    *,
    build: Callable[[str], Any],
    data: Callable[[], Any],
    steps: int,
    device: torch.device,
    max_norm: float,
    snapshot_at: int,
    logdir: str,
) -> tuple[dict[str, list[float]], list[torch.Tensor], Any]:
    """One fit: per clock the times (ms) from each batch start to the next; a copy of the
    parameters after ``snapshot_at`` optimizer steps; the GradStab callback (or ``None``).

    On CUDA every timestamp follows a ``torch.cuda.synchronize``: a step's kernels run after
    its Python returns, so without it the time of step n's GPU work would land in step n+1's
    interval or in none (and the host could run ahead into the next step).
    """
    from gradstab.callback import GradStabCallback  # noqa: PLC0415

    module = build(variant)
    module.load_state_dict(template)
    starts: list[tuple[float, float]] = []
    cuda = device.type == "cuda"

    class Timer(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            if cuda:
                torch.cuda.synchronize(device)
            starts.append((time.perf_counter(), time.process_time()))

    snapshot: list[torch.Tensor] = []

    class Snapshot(pl.Callback):  # in every variant, so that they all pay for it alike
        def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if trainer.global_step == snapshot_at:
                snapshot[:] = [p.detach().clone() for p in pl_module.parameters()]

    callbacks: list[Any] = [Timer(), Snapshot()]
    cb = None
    if variant == "gradstab":
        cb = GradStabCallback(max_norm=max_norm, log_per_layer=True, log_every_n_steps=LOG_EVERY)
        callbacks.append(cb)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="gpu" if cuda else "cpu",
        devices=[device.index or 0] if cuda else 1,
        logger=pl.loggers.CSVLogger(logdir, name=variant),
        log_every_n_steps=LOG_EVERY,
        gradient_clip_val=max_norm if variant == "lightning" else None,
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
        trainer.fit(module, data())
    finally:
        gc.enable()
    times = {
        clock: [(b[k] - a[k]) * 1e3 for a, b in zip(starts, starts[1:])]
        for k, clock in enumerate(CLOCKS)
    }
    return times, snapshot, cb


def describe_optimizer(model: str, fused: bool) -> str:
    """The optimizer's label in the report and the JSON.

    Example:
        >>> describe_optimizer("transformer", True)
        'AdamW(lr=0.001, fused=True)'
    """
    if model == "mlp":
        return f"AdamW(lr={LR:g})"
    if fused:
        return f"AdamW(lr={LR:g}, fused=True)"
    return f"AdamW(lr={LR:g}; fused unsupported on this device, torch's default)"


def measure(
    *,
    width: int = MLP_WIDTH,
    depth: int = MLP_DEPTH,
    rounds: int = DEFAULT_PLAN[0],
    steps: int = DEFAULT_PLAN[1],
    warmup: int = DEFAULT_PLAN[2],
    seed: int = 0,
    model: str = "mlp",
    spec: TransformerSpec | None = None,
    device: torch.device | str = "cpu",
    max_norm: float = MAX_NORM,
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
        model: ``"mlp"`` or ``"transformer"``.
        spec: the transformer's sizes (default :class:`TransformerSpec`); ``width`` and
            ``depth`` are the MLP's only.
        device: ``"cpu"`` or a CUDA device; the data is put there before the fits.
        max_norm: the clipping bound of the ``lightning`` and ``gradstab`` variants.
        log: optional ``log(message)`` for progress.

    Returns:
        ``{"times": {clock: {variant: [ms, ...]}}, "check": {...}, "params": int,
        "tensors": int, "optimizer": str, "fused": bool}`` with clocks ``"wall"`` and
        ``"cpu"``.

    Raises:
        ValueError: for a bad plan or model.
        RuntimeError: if the ``lightning`` and ``gradstab`` variants end with different
            parameters (beyond :func:`check_plan`'s bound), or gradstab did not clip.

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
    if model not in MODELS:
        raise ValueError(f"bench --train: model must be one of {MODELS}, got {model!r}")
    device = torch.device(device)
    pl = _lightning()
    if model == "transformer":
        spec = spec or TransformerSpec()
        fused = fused_adamw_supported(device)

        def build(variant: str) -> Any:
            return make_transformer_module(pl, spec, variant, fused=fused)

        def data() -> Any:
            return token_data(spec, steps, seed, device)
    else:
        fused = False

        def build(variant: str) -> Any:
            return make_module(pl, width, depth, variant)

        def data() -> Any:
            return _data(steps, seed, device)

    torch.manual_seed(seed)
    first = build("none")
    template = copy.deepcopy(first.state_dict())
    n_params = sum(p.numel() for p in first.parameters())
    n_tensors = sum(1 for _ in first.parameters())
    del first
    times: dict[str, dict[str, list[float]]] = {c: {v: [] for v in VARIANTS} for c in CLOCKS}
    check: dict[str, Any] = {}
    after, *tol = check_plan(model, steps)
    with tempfile.TemporaryDirectory(prefix="gradstab-bench-train-") as logdir, _quiet():
        for r in range(rounds):
            order = [VARIANTS[(r + k) % len(VARIANTS)] for k in range(len(VARIANTS))]
            snapshots = {}
            for v in order:
                t, snapshot, cb = _fit(
                    pl,
                    v,
                    template,
                    build=build,
                    data=data,
                    steps=steps,
                    device=device,
                    max_norm=max_norm,
                    snapshot_at=after,
                    logdir=logdir,
                )
                for c in CLOCKS:
                    times[c][v] += t[c][warmup:]
                snapshots[v] = snapshot
                if cb is not None:
                    check["gradstab_counters"] = cb.counters()
            if r == 0:
                got = _check(snapshots["lightning"], snapshots["gradstab"], check, after, tol)
                check.update(got)
            if log is not None:
                med = {v: statistics.median(times["wall"][v]) for v in VARIANTS}
                shown = ", ".join(f"{v} {m:.3f}" for v, m in med.items())
                log(f"round {r + 1}/{rounds}: median wall ms/step so far: {shown}")
    return {
        "times": times,
        "check": check,
        "params": n_params,
        "tensors": n_tensors,
        "optimizer": describe_optimizer(model, fused),
        "fused": fused,
    }


def _check(
    lightning_params: Sequence[torch.Tensor],
    gradstab_params: Sequence[torch.Tensor],
    check: dict[str, Any],
    after: int,
    tol: Sequence[float],
) -> dict[str, Any]:
    rtol, atol = tol
    if len(lightning_params) != len(gradstab_params) or not lightning_params:
        raise RuntimeError(f"bench --train: no parameters recorded after {after} steps")
    diff = 0.0
    for a, b in zip(lightning_params, gradstab_params):
        diff = max(diff, float((a - b).abs().max()))
        if not torch.allclose(a, b, rtol=rtol, atol=atol):
            raise RuntimeError(
                "bench --train: the gradstab and Lightning clipping runs had different "
                f"parameters after {after} steps (max abs difference {diff:.3g}; tolerance "
                f"rtol {rtol:g}, atol {atol:g}); not timing"
            )
    clipped = check["gradstab_counters"]["clipped_steps"]
    if clipped == 0:
        raise RuntimeError("bench --train: gradstab never clipped; the comparison would be moot")
    return {
        "max_abs_param_diff": diff,
        "compared_after_steps": after,
        "clipped_steps": clipped,
        "tolerance": {"rtol": rtol, "atol": atol},
    }


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


def _device(name: str) -> torch.device | str:
    """The ``--device`` of ``--train`` as a device, or the message refusing it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"gradstab bench --train: unknown device {name!r} (cpu or cuda)"
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        return f"gradstab bench --train: unsupported device {name!r} (cpu or cuda)"
    if not torch.cuda.is_available():
        return (
            f"gradstab bench --train: --device {name} but no CUDA device is available "
            "(torch.cuda.is_available() is False)"
        )
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        return f"gradstab bench --train: no CUDA device {index} (have {torch.cuda.device_count()})"
    return torch.device("cuda", index)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``python -m gradstab bench --train``: measure and print the report.

    Args:
        args: the ``bench`` options (``--quick``, ``--repeats`` = rounds, ``--warmup`` =
            steps left out per fit, ``--threads``, ``--seed``, ``--json``, ``--device``,
            ``--train-model``, ``--train-width``, ``--train-depth``, ``--train-steps``,
            ``--train-heads``, ``--train-seq``, ``--train-vocab``, ``--train-batch``,
            ``--train-max-norm``).
        argv: the arguments after ``python -m gradstab``, echoed in the header.

    Returns:
        0, or 1 if the correctness check failed, 2 for bad options or a missing device.

    Example:
        >>> run(parsed_args, ["bench", "--train", "--quick"])  # doctest: +SKIP
        0
    """
    device = _device(args.device)
    if isinstance(device, str):
        print(device, file=sys.stderr)
        return 2
    model = args.train_model
    if model == "mlp" and any(
        getattr(args, f"train_{k}") is not None for k in ("heads", "seq", "vocab", "batch")
    ):
        print(
            "gradstab bench --train: --train-heads/--train-seq/--train-vocab/--train-batch "
            "are for --train-model transformer",
            file=sys.stderr,
        )
        return 2
    spec = None
    try:
        if model == "transformer":
            given = {
                "layers": args.train_depth,
                "d_model": args.train_width,
                "heads": args.train_heads,
                "seq": args.train_seq,
                "vocab": args.train_vocab,
                "batch": args.train_batch,
            }
            spec = TransformerSpec(**{k: v for k, v in given.items() if v is not None})
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    width = MLP_WIDTH if args.train_width is None else args.train_width
    depth = MLP_DEPTH if args.train_depth is None else args.train_depth
    # The models are small: intra-op threads only add synchronisation (and, on a busy machine,
    # waits for a descheduled thread), so one thread unless --threads says otherwise.
    torch.set_num_threads(1 if args.threads is None else args.threads)
    rounds, steps, warmup = QUICK_PLAN if args.quick else DEFAULT_PLAN
    rounds = args.repeats or rounds
    steps = args.train_steps or steps
    warmup = warmup if args.warmup is None else args.warmup
    max_norm = args.train_max_norm
    meta = header(argv, device)
    meta["device"] = str(device)
    for k, v in meta.items():
        print(f"{k + ':':9} {v}")
    plan = f"{rounds} round(s) x {steps} steps per variant, first {warmup} of each fit untimed"
    if spec is None:
        what = f"MLP 16 -> {depth} x {width} (tanh) -> 1, MSE, batch {BATCH}"
    else:
        what = (
            f"GPT-2-like decoder, {spec.layers} blocks x d_model {spec.d_model}, {spec.heads} "
            f"heads, seq {spec.seq}, vocab {spec.vocab}, {'tied' if spec.tied else 'untied'} "
            f"LM head; next-token cross-entropy, batch {spec.batch}"
        )
    print(f"model:    {what}; clip at {max_norm:g}; {plan}", flush=True)
    other = OtherLoad()
    t0 = time.perf_counter()
    try:
        result = measure(
            width=width,
            depth=depth,
            rounds=rounds,
            steps=steps,
            warmup=warmup,
            seed=args.seed,
            model=model,
            spec=spec,
            device=device,
            max_norm=max_norm,
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
    print(f"optimizer: {result['optimizer']}")
    print(f"({result['tensors']} parameter tensors, {result['params']:,} parameters)\n")
    print(format_report(summary))
    chk = result["check"]
    tol = chk["tolerance"]
    after = chk["compared_after_steps"]
    when = "final" if after == steps else f"after {after} steps, the"
    print(
        f"Check: gradstab clipped {chk['clipped_steps']} of {steps} steps in round 1; {when} "
        f"parameters match the Lightning run to {chk['max_abs_param_diff']:.2g} (max abs; "
        f"tolerance rtol {tol['rtol']:g}, atol {tol['atol']:g})."
    )
    load = f"; other processes kept {busy:.2f} of {os.cpu_count()} CPUs busy" if busy else ""
    print(f"Total time {elapsed:.1f} s{load}.")
    if args.json:
        doc = {"meta": {**meta, "elapsed_s": elapsed, "other_cpus_busy": busy}, "summary": summary}
        if wants_raw(args.json):
            doc["times_ms"] = result["times"]
        if spec is None:
            doc["model"] = {"kind": "mlp", "width": width, "depth": depth, "batch": BATCH}
        else:
            doc["model"] = {"kind": "transformer", **dataclasses.asdict(spec)}
        doc["model"].update(
            params=result["params"],
            tensors=result["tensors"],
            optimizer=result["optimizer"],
            fused=result["fused"],
            max_norm=max_norm,
        )
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
        >>> a = p.parse_args(["--train", "--train-model", "transformer"])
        >>> a.train_model, a.train_width, a.train_max_norm
        ('transformer', None, 1.0)
    """
    parser.add_argument(
        "--train",
        action="store_true",
        help="time a small Lightning training loop without clipping, with Lightning's "
        "gradient_clip_val + grad_norm logging, and with GradStabCallback (needs lightning); "
        "--repeats = rounds, --warmup = untimed steps per fit, --threads defaults to 1, "
        "--device cpu or cuda",
    )
    parser.add_argument(
        "--train-model",
        choices=MODELS,
        default="mlp",
        help="--train: the model: a tanh MLP (default) or a GPT-2-like decoder trained with "
        "fused AdamW where torch has it",
    )
    d = TransformerSpec()
    parser.add_argument(
        "--train-width",
        type=int,
        default=None,
        help=f"--train: MLP width ({MLP_WIDTH}) or transformer d_model ({d.d_model})",
    )
    parser.add_argument(
        "--train-depth",
        type=int,
        default=None,
        help=f"--train: MLP hidden layers ({MLP_DEPTH}) or transformer blocks ({d.layers})",
    )
    for name, value, what in (
        ("heads", d.heads, "attention heads"),
        ("seq", d.seq, "tokens per sequence"),
        ("vocab", d.vocab, "vocabulary size"),
        ("batch", d.batch, "sequences per batch"),
    ):
        parser.add_argument(
            f"--train-{name}",
            type=int,
            default=None,
            help=f"--train-model transformer: {what} ({value})",
        )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=None,
        help=f"--train: steps per fit (default {DEFAULT_PLAN[1]}; --quick {QUICK_PLAN[1]})",
    )
    parser.add_argument(
        "--train-max-norm",
        type=float,
        default=MAX_NORM,
        help=f"--train: the clipping bound of both clipping variants ({MAX_NORM:g}); the run "
        "fails if gradstab never clips",
    )
