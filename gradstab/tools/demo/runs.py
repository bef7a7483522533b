"""One demo run: its configuration, its Lightning fit with the callback's history, and what
it returns (loss, accuracy, the recorded history and its diagnosis).

Example:
    >>> from gradstab.tools.demo.runs import RUNS
    >>> list(RUNS)
    ['a', 'b', 'c', 'd', 'e']
"""

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradstab
from gradstab.diagnosis import Diagnosis, HistoryData
from gradstab.tools.demo.models import CLASSES, exploding_mlp, fixed_mlp, make_data, sigmoid_mlp

# =========================================================================== runs


@dataclass(frozen=True)
class RunInfo:
    """What one demo run is.

    Attributes:
        key: ``"a"`` .. ``"e"``.
        name: a short name (also used in file names).
        title: one line describing the run.
        expected: the verdict the run is designed to get (see :func:`verdict`).
        applies: ``(run, kinds)``: this run applies those prescription kinds (see
            :class:`gradstab.diagnosis.Prescription`) of that run's diagnosis; ``None``.
    """

    key: str
    name: str
    title: str
    expected: str
    applies: tuple[str, tuple[str, ...]] | None = None


#: The five runs, in order.
RUNS: dict[str, RunInfo] = {
    "a": RunInfo(
        "a", "vanishing", "deep sigmoid MLP, PyTorch's default init", expected="vanishing"
    ),
    "b": RunInfo(
        "b",
        "fixed",
        "same MLP fixed: ReLU + gradstab.init.init_model_ + LayerNorm (gradstab.norm)",
        expected="healthy",
        applies=("a", ("activation", "normalization", "init")),
    ),
    "c": RunInfo(
        "c",
        "exploding",
        "deep ReLU MLP, init std 2/sqrt(fan_in), no clipping",
        expected="exploding",
    ),
    "d": RunInfo(
        "d",
        "clipped",
        "same net and initial weights as (c) + GradStabCallback, fixed threshold",
        expected="healthy",
        applies=("c", ("clip",)),
    ),
    "e": RunInfo(
        "e",
        "adaptive",
        "same net and initial weights as (c) + GradStabCallback, adaptive threshold",
        expected="healthy",
        applies=("c", ("clip",)),
    ),
}


@dataclass
class DemoConfig:
    """Settings of the demo (the command-line options).

    Attributes:
        steps: optimizer steps per run.
        seed: seed of the data and of every model's initial weights.
        runs: which runs, in order.
        depth: hidden layers of every MLP.
        width: hidden width.
        batch_size: samples per step (drawn with replacement).
        lr: SGD learning rate (momentum 0.9), the same for all runs.
        max_norm: clip threshold of run (d) and hard cap of run (e).
        percentile: run (e)'s threshold is this percentile of the total norms seen so far
            (:class:`gradstab.PercentileThreshold`; AutoClip recommends 10).
        init_gain: weight std of runs (c)-(e) times ``sqrt(fan_in)``.
        n_train: training samples.
        n_val: validation samples.
        stop_after_nonfinite: stop a run after this many consecutive non-finite losses
            (0: never).
        out: folder of the pictures.
        plots: write the pictures (needs matplotlib).
        progress_bar: show progress: Lightning's progress bar on a terminal, else a plain
            line at every tenth of a run.
        threads: torch CPU threads during the runs (restored afterwards); ``None`` keeps them.
    """

    steps: int = 300
    seed: int = 0
    runs: tuple[str, ...] = ("a", "b", "c", "d", "e")
    depth: int = 10
    width: int = 64
    batch_size: int = 64
    lr: float = 0.05
    max_norm: float = 2.0
    percentile: float = 10.0
    init_gain: float = 2.0
    n_train: int = 4096
    n_val: int = 1024
    stop_after_nonfinite: int = 20
    out: str = "gradstab_demo"
    plots: bool = True
    progress_bar: bool = True
    threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("steps", "depth", "width", "batch_size", "n_train", "n_val"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoConfig: {name} must be an integer >= 1, got {value!r}")
        for name in ("lr", "max_norm", "init_gain"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"DemoConfig: {name} must be a positive number, got {value!r}")
        p = self.percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 100:
            raise ValueError(f"DemoConfig: percentile must be a number in [0, 100], got {p!r}")
        bad = [r for r in self.runs if r not in RUNS]
        if bad or not self.runs:
            raise ValueError(
                f"DemoConfig: runs must be a non-empty selection of {list(RUNS)}, got "
                f"{list(self.runs)!r}"
            )
        if self.stop_after_nonfinite < 0:
            raise ValueError(
                f"DemoConfig: stop_after_nonfinite must be >= 0, got {self.stop_after_nonfinite}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"DemoConfig: threads must be >= 1 or None, got {self.threads}")


#: The steps of the second, end-of-run diagnosis.
END_WINDOW = 50

#: ``--tiny``: the settings of the smoke tests (a few seconds in all).
TINY = {"steps": 40, "n_train": 1024, "n_val": 512}


@dataclass
class RunResult:
    """What one run measured.  Every field comes from the run itself.

    Attributes:
        info: which run.
        steps_planned: ``--steps``.
        steps_run: optimizer steps taken (fewer when a diverged run was stopped).
        losses: the training loss of every step.
        final_loss: the mean training loss of the last 10% of the steps run (NaN if any of
            them is not finite).
        accuracy: validation accuracy after training, or ``None`` when the model's outputs
            are not finite.
        first_nonfinite_loss: the first step whose loss was NaN/Inf, or ``None``.
        stopped_early: the run was stopped after ``stop_after_nonfinite`` non-finite losses.
        min_layer_norm, max_layer_norm: the smallest and largest per-layer gradient norm
            (median over the steps with a finite gradient) among the weight matrices.
        min_layer, max_layer: their parameter names.
        initial_total_norm: the total gradient norm of the first step.
        clipped_steps, skipped_steps: from :meth:`gradstab.GradStabCallback.counters`
            (``None`` for the runs that do not clip).
        nonfinite_steps: optimizer steps whose gradients held a NaN/Inf (the callback's
            counter; it counts in the monitor-only runs too).
        threshold_min, threshold_max: the smallest and largest clip threshold in force, from
            the history's ``clip_threshold`` (``None`` for the runs that do not clip).
        threshold_cap: the hard cap of an adaptive threshold (``None`` elsewhere).
        below_cap_steps: the steps at which the adaptive threshold was below its cap, and
            the first of them (``first_below_cap``; ``None`` if never or not adaptive).
        diagnosis: the callback's fit-end diagnosis of its history,
            :attr:`gradstab.GradStabCallback.diagnosis`.
        history: the callback's history on the host (what the pictures show).
        verdict: :func:`verdict` of the diagnosis.
        verdict_end: :func:`verdict` of the diagnosis of the last :data:`END_WINDOW` steps
            only (a run that collapsed late, e.g. with every ReLU dead, shows there).
        clip: how runs (d)/(e) clipped (``None`` elsewhere).
        plots: the PNG files written.
        seconds: wall time of the run.
    """

    info: RunInfo
    steps_planned: int
    steps_run: int
    losses: list[float]
    final_loss: float
    accuracy: float | None
    first_nonfinite_loss: int | None
    stopped_early: bool
    min_layer_norm: float
    max_layer_norm: float
    min_layer: str
    max_layer: str
    initial_total_norm: float
    clipped_steps: int | None
    skipped_steps: int | None
    nonfinite_steps: int
    diagnosis: Diagnosis
    history: HistoryData
    verdict: str
    verdict_end: str = ""
    threshold_min: float | None = None
    threshold_max: float | None = None
    threshold_cap: float | None = None
    below_cap_steps: int | None = None
    first_below_cap: int | None = None
    clip: str | None = None
    model_text: str = ""
    plots: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def as_expected(self) -> bool:
        """The verdict contains what the run was designed to show.

        A run designed to be healthy must be so over the whole run and over its end.
        """
        if self.info.expected == "healthy":
            return self.verdict == "healthy" and self.verdict_end in ("healthy", "")
        return self.info.expected in self.verdict.split(", ")

    @property
    def spread_decades(self) -> float:
        """``log10(max_layer_norm / min_layer_norm)``."""
        if self.min_layer_norm > 0 and math.isfinite(self.max_layer_norm):
            return math.log10(self.max_layer_norm / self.min_layer_norm)
        return math.nan


@dataclass
class DemoResults:
    """All runs of one demo.

    Attributes:
        config: the settings.
        runs: run key -> result, in run order.
        seconds: total wall time (runs, tables, plots).
        plots_note: why no pictures were written, or ``None``.
    """

    config: DemoConfig
    runs: dict[str, RunResult]
    seconds: float = 0.0
    plots_note: str | None = None


def verdict(diagnosis: Diagnosis) -> str:
    """A short verdict: ``"healthy"`` or a comma-separated list of the problems found.

    In order: ``"non-finite"``, ``"exploding"``, ``"vanishing"``, ``"dead"``.

    Example:
        >>> import torch, gradstab
        >>> verdict(gradstab.diagnose(gradstab.GradHistory(torch.nn.Linear(2, 1))))
        'healthy'
    """
    found = []
    if diagnosis.nonfinite is not None:
        found.append("non-finite")
    if diagnosis.exploding:
        found.append("exploding")
    if diagnosis.vanishing_gradients:
        found.append("vanishing")
    if diagnosis.dead:
        found.append("dead")
    return ", ".join(found) or "healthy"


def _build_model(key: str, cfg: DemoConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)  # (c), (d) and (e) get the same initial weights
    if key == "a":
        return sigmoid_mlp(cfg.depth, cfg.width)
    if key == "b":
        return fixed_mlp(cfg.depth, cfg.width)
    return exploding_mlp(cfg.depth, cfg.width, init_gain=cfg.init_gain)


def _model_text(key: str, cfg: DemoConfig) -> str:
    arch = {"a": "Linear+Sigmoid", "b": "Linear+LayerNorm+ReLU"}.get(key, "Linear+ReLU")
    return (
        f"{cfg.depth} x {arch} (width {cfg.width}) + Linear({CLASSES}); SGD lr {cfg.lr:g} "
        f"momentum 0.9, batch {cfg.batch_size}"
    )


def adaptive_threshold(cfg: DemoConfig) -> gradstab.PercentileThreshold:
    """Run (e)'s threshold: AutoClip's percentile of the norms seen so far, capped.

    ``include_current=False``: the bound is the percentile of the *earlier* steps' norms, known
    before the step, so the callback clips in its one fused pass and the history records a
    threshold for every step.  Before the first norm (and whenever the percentile is above it)
    the cap ``cfg.max_norm`` is the bound.

    Example:
        >>> adaptive_threshold(DemoConfig(percentile=10, max_norm=2.0)).max_norm
        2.0
    """
    return gradstab.PercentileThreshold(
        cfg.percentile, include_current=False, max_norm=cfg.max_norm
    )


def _clip_for(key: str, cfg: DemoConfig) -> float | gradstab.PercentileThreshold | None:
    if key == "d":
        return cfg.max_norm
    if key == "e":
        return adaptive_threshold(cfg)
    return None


def _loader(x: Tensor, y: Tensor, cfg: DemoConfig) -> torch.utils.data.DataLoader:
    # One epoch of exactly cfg.steps batches, drawn with replacement: one progress bar.
    gen = torch.Generator().manual_seed(cfg.seed)
    sampler = torch.utils.data.RandomSampler(
        range(len(y)), replacement=True, num_samples=cfg.steps * cfg.batch_size, generator=gen
    )
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=cfg.batch_size, sampler=sampler
    )


def _require_lightning() -> Any:
    try:
        from gradstab.tools.demo import lightning as _demo_lightning  # noqa: PLC0415 - optional
    except ModuleNotFoundError as exc:
        if exc.name is None or not exc.name.startswith("lightning"):
            raise
        raise ImportError(_INSTALL_LIGHTNING) from exc
    return _demo_lightning


_INSTALL_LIGHTNING = (
    "gradstab demo needs Lightning, which is not installed: "
    'pip install "gradstab[demo]" (or pip install "lightning>=2.2" matplotlib)'
)


def train_run(
    key: str,
    cfg: DemoConfig,
    data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
) -> RunResult:
    """Train one run (``"a"`` .. ``"e"``) with Lightning and measure it.

    Args:
        key: the run.
        cfg: the settings (``plots``/``out`` are not used here).
        data: ``(x_train, y_train, x_val, y_val)``; default: :func:`make_data` with
            ``cfg.seed``.

    Returns:
        The :class:`RunResult` (no pictures drawn yet).

    Raises:
        ImportError: Lightning is not installed.

    Example:
        >>> r = train_run("a", DemoConfig(steps=20, progress_bar=False))  # doctest: +SKIP
        >>> r.verdict  # doctest: +SKIP
        'vanishing'
    """
    if key not in RUNS:
        raise ValueError(f"train_run: key must be one of {list(RUNS)}, got {key!r}")
    lt = _require_lightning()
    info = RUNS[key]
    if data is None:
        data = (*make_data(cfg.n_train, cfg.seed), *make_data(cfg.n_val, cfg.seed, split=1))
    x, y, xv, yv = data
    t0 = time.perf_counter()
    model = _build_model(key, cfg)
    module = lt.Classifier(model, cfg.lr)
    clip_bound = _clip_for(key, cfg)
    parts = lt.build_callbacks(capacity=cfg.steps, max_norm=clip_bound)
    tracker = lt.LossTracker(cfg.stop_after_nonfinite)
    callbacks = [*parts.callbacks, tracker]
    if cfg.progress_bar:  # a bar on a terminal; plain lines in a file or a pipe
        bar = lt.RunProgressBar if sys.stdout.isatty() else lt.RunProgressLines
        callbacks.append(bar(f"({key}) {info.name}"))
    with lt.quiet_lightning():
        lt.fit(
            module,
            _loader(x, y, cfg),
            callbacks,
            steps=cfg.steps,
            progress_bar=cfg.progress_bar,
        )

    callback = parts.callback
    history = parts.history()
    if history is None:  # no optimizer step was taken
        raise RuntimeError(f"demo run ({key}): GradStabCallback recorded no gradient history")
    diag = callback.diagnosis  # its fit-end diagnosis of the whole history
    if diag is None:
        diag = callback.diagnose()
    end = callback.diagnose(window=END_WINDOW)
    hist = history.data()
    losses = tracker.losses
    tail = losses[-max(1, len(losses) // 10) :]
    final_loss = sum(tail) / len(tail) if all(math.isfinite(v) for v in tail) else math.nan
    model.eval()
    with torch.no_grad():
        out = model(xv)
    accuracy = float((out.argmax(1) == yv).float().mean()) if out.isfinite().all() else None
    shapes = {n: tuple(p.shape) for n, p in module.named_parameters()}  # the history's names
    weights = [
        r for r in diag.layers if len(shapes.get(r.name, ())) >= 2 and math.isfinite(r.median_norm)
    ]
    lo = min(weights, key=lambda r: r.median_norm, default=None)
    hi = max(weights, key=lambda r: r.median_norm, default=None)
    counts = callback.counters()
    counters = counts if parts.clipper is not None else None
    thr = _threshold_summary(hist, clip_bound)
    return RunResult(
        info=info,
        steps_planned=cfg.steps,
        steps_run=len(losses),
        losses=losses,
        final_loss=final_loss,
        accuracy=accuracy,
        first_nonfinite_loss=tracker.first_nonfinite,
        stopped_early=tracker.stopped,
        min_layer_norm=lo.median_norm if lo else math.nan,
        max_layer_norm=hi.median_norm if hi else math.nan,
        min_layer=lo.name if lo else "-",
        max_layer=hi.name if hi else "-",
        initial_total_norm=float(hist.total_norm[0]) if hist.num_steps else math.nan,
        clipped_steps=None if counters is None else counters["clipped_steps"],
        skipped_steps=None if counters is None else counters["skipped_steps"],
        nonfinite_steps=counts["nonfinite_steps"],
        diagnosis=diag,
        history=hist,
        verdict=verdict(diag),
        verdict_end=verdict(end),
        **thr,
        clip=parts.clip,
        model_text=_model_text(key, cfg),
        seconds=time.perf_counter() - t0,
    )


def _threshold_summary(hist: HistoryData, bound: Any) -> dict[str, Any]:
    """The clip thresholds a run used, from the history's ``clip_threshold`` column."""
    if bound is None or hist.clip_threshold is None:
        return {}
    thr = hist.clip_threshold
    finite = thr[torch.isfinite(thr)]
    out: dict[str, Any] = {
        "threshold_min": float(finite.min()) if finite.numel() else math.nan,
        "threshold_max": float(finite.max()) if finite.numel() else math.nan,
    }
    cap = getattr(bound, "max_norm", None)
    if cap is not None:  # an adaptive threshold under a hard cap
        below = (thr < cap).nonzero().flatten().tolist()
        out["threshold_cap"] = float(cap)
        out["below_cap_steps"] = len(below)
        out["first_below_cap"] = hist.steps[below[0]] if below else None
    return out
