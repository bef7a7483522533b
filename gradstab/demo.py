"""``python -m gradstab demo``: vanishing and exploding gradients, diagnosed and fixed.

Five runs train one after the other on the same generated data with the same seed, each in a
Lightning ``Trainer`` with a progress bar and one :class:`gradstab.GradStabCallback` that keeps
the run's gradient history (``history=``; monitor-only, ``mode=None``, in the runs that do not
clip) and diagnoses it at the end of ``fit``:

(a) a deep sigmoid MLP with PyTorch's default initialisation: the per-layer gradient norms
    collapse toward the input and the net does not learn; the diagnosis says *vanishing*;
(b) the same MLP fixed: ReLU, :func:`gradstab.init.init_model_` and LayerNorm layers inserted
    by :func:`gradstab.norm.add_normalization_`: healthy, it learns;
(c) a deep ReLU MLP initialised too large (weight std ``2 / sqrt(fan_in)``, twice He's
    variance): without clipping the first SGD steps blow the weights up and the loss becomes
    NaN; the diagnosis says *exploding* and *non-finite*;
(d) the same net, the same initial weights, with :class:`gradstab.GradStabCallback`: the
    total gradient norm is clipped to ``--max-norm`` and non-finite steps would be skipped; it
    trains;
(e) the same again with an adaptive threshold, :class:`gradstab.PercentileThreshold`
    (AutoClip: the ``--percentile``-th percentile of the norms seen so far) under a hard cap of
    ``--max-norm``.  The cap does the clipping while the norms are large (every adaptive rule
    tried lets this net blow up without one); the percentile takes over once the norms have
    come down.  The table shows the range of thresholds it used.

Every number printed comes from these runs: per run a table (final training loss, validation
accuracy, smallest and largest per-layer gradient norm, steps clipped and skipped, the clip
threshold, the verdict of :func:`gradstab.diagnose`), then a comparison.  With matplotlib
installed, a per-layer gradient-norm heatmap and a total-norm curve per run go to ``--out``.

Needs ``lightning`` (``pip install "gradstab[demo]"``); matplotlib is optional.  The models
and the data are small: the default settings take well under two minutes on two CPU cores.
The model builders and the data are public (:func:`make_data`, :func:`sigmoid_mlp`,
:func:`fixed_mlp`, :func:`exploding_mlp`) for the scripts in ``examples/``.

Example:
    $ python -m gradstab demo
    $ python -m gradstab demo --tiny --no-plots --runs a,b
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

import gradstab
from gradstab.diagnosis import Diagnosis, HistoryData

__all__ = [
    "RUNS",
    "DemoConfig",
    "DemoResults",
    "RunInfo",
    "RunResult",
    "add_arguments",
    "exploding_mlp",
    "fixed_mlp",
    "make_data",
    "mlp",
    "run",
    "run_demo",
    "sigmoid_mlp",
    "train_run",
    "verdict",
]

#: Input features and classes of the generated task.
IN_FEATURES = 32
CLASSES = 10


# =========================================================================== data and models


def make_data(
    n: int,
    seed: int,
    *,
    split: int = 0,
    in_features: int = IN_FEATURES,
    classes: int = CLASSES,
    clusters_per_class: int = 3,
    noise: float = 0.6,
) -> tuple[Tensor, Tensor]:
    """A generated classification task: Gaussian clusters, several per class.

    The cluster centres depend on ``seed`` only, so ``split=0`` (training) and ``split=1``
    (validation) draw different samples of the same task.  A linear model cannot separate
    the classes well (each class is a union of clusters); a small MLP reaches about 97-99%.

    Args:
        n: number of samples.
        seed: the task (cluster centres) and, with ``split``, the samples.
        split: which sample of the task (0: training, 1: validation, ...).
        in_features: input dimension.
        classes: number of classes.
        clusters_per_class: Gaussian clusters per class.
        noise: standard deviation of the samples around their centre (centres have std 1).

    Returns:
        ``(x, y)``: float32 ``[n, in_features]`` inputs and int64 ``[n]`` labels.

    Example:
        >>> x, y = make_data(8, seed=0)
        >>> tuple(x.shape), y.dtype
        ((8, 32), torch.int64)
    """
    if n < 1:
        raise ValueError(f"make_data: n must be >= 1, got {n}")
    centers_gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * clusters_per_class, in_features, generator=centers_gen)
    gen = torch.Generator().manual_seed(seed * 7919 + 1 + split)
    idx = torch.randint(0, classes * clusters_per_class, (n,), generator=gen)
    x = centers[idx] + noise * torch.randn(n, in_features, generator=gen)
    return x, idx % classes


def mlp(
    depth: int,
    width: int,
    activation: type[nn.Module],
    *,
    in_features: int = IN_FEATURES,
    classes: int = CLASSES,
) -> nn.Sequential:
    """``depth`` hidden ``Linear(width)`` + activation layers and a linear output layer.

    Parameters are named ``"0.weight", "0.bias", "2.weight", ...`` (network order), with
    PyTorch's default initialisation.

    Example:
        >>> net = mlp(3, 16, nn.ReLU)
        >>> len(net), net[-1].out_features
        (7, 10)
    """
    if depth < 1 or width < 1:
        raise ValueError(f"mlp: depth and width must be >= 1, got {depth} and {width}")
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), activation()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def sigmoid_mlp(depth: int = 10, width: int = 64, **kwargs: int) -> nn.Sequential:
    """Run (a): a deep sigmoid MLP with PyTorch's default initialisation.

    The sigmoid's derivative is at most 1/4 and PyTorch's default ``Linear`` init
    (uniform, std ``1 / sqrt(3 fan_in)``) does not make up for it, so every layer shrinks the
    backpropagated gradient (by about 7x here): the first layers get almost nothing.

    Example:
        >>> isinstance(sigmoid_mlp(4, 8)[1], nn.Sigmoid)
        True
    """
    return mlp(depth, width, nn.Sigmoid, **kwargs)


def fixed_mlp(
    depth: int = 10,
    width: int = 64,
    *,
    norm: str = "layer",
    generator: torch.Generator | None = None,
    **kwargs: int,
) -> nn.Sequential:
    """Run (b): the MLP of (a) with the remedies gradstab provides.

    ReLU instead of sigmoid, a LayerNorm after every hidden ``Linear``
    (:func:`gradstab.norm.add_normalization_`; ``norm="batch"`` gives BatchNorm) and He
    initialisation for the activation that follows each layer
    (:func:`gradstab.init.init_model_`).

    Example:
        >>> net = fixed_mlp(3, 16)
        >>> [type(m).__name__ for m in net][:3]
        ['Linear', 'LayerNorm', 'ReLU']
    """
    model = mlp(depth, width, nn.ReLU, **kwargs)
    gradstab.norm.add_normalization_(model, kind=norm)
    gradstab.init.init_model_(model, generator=generator)
    return model


def exploding_mlp(
    depth: int = 10, width: int = 64, *, init_gain: float = 2.0, **kwargs: int
) -> nn.Sequential:
    """Runs (c) and (d): a deep ReLU MLP whose weights are drawn too large.

    Weights ``N(0, (init_gain / sqrt(fan_in))^2)``, biases 0.  He's init for ReLU is
    ``init_gain = sqrt(2)``; the default 2 doubles the variance, so each layer doubles the
    mean square of the activations going forward and of the gradients going backward: the
    logits start about ``2^(depth/2)`` times too large and so does the gradient.  Draws from
    the global RNG (seed it for reproducible weights).

    Example:
        >>> net = exploding_mlp(3, 256)
        >>> abs(float(net[2].weight.std()) * 256**0.5 - 2.0) < 0.1  # std about init_gain/16
        True
    """
    if not init_gain > 0:
        raise ValueError(f"exploding_mlp: init_gain must be > 0, got {init_gain}")
    model = mlp(depth, width, nn.ReLU, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_gain / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return model


# =========================================================================== runs


@dataclass(frozen=True)
class RunInfo:
    """What one demo run is.

    Attributes:
        key: ``"a"`` .. ``"e"``.
        name: a short name (also used in file names).
        title: one line describing the run.
        expected: the verdict the run is designed to get (see :func:`verdict`).
    """

    key: str
    name: str
    title: str
    expected: str


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
    ),
    "e": RunInfo(
        "e",
        "adaptive",
        "same net and initial weights as (c) + GradStabCallback, adaptive threshold",
        expected="healthy",
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
        progress_bar: show Lightning's progress bar.
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
        from gradstab import _demo_lightning  # noqa: PLC0415 - lightning is optional
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
    if cfg.progress_bar:
        callbacks.append(lt.RunProgressBar(f"({key}) {info.name}"))
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


# =========================================================================== output


def _g(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    if math.isnan(x):
        return "nan"
    return f"{x:.{digits}g}"


def _acc(r: RunResult) -> str:
    return "n/a (NaN outputs)" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"


def _steps_text(r: RunResult) -> str:
    text = f"{r.steps_run} of {r.steps_planned}"
    if r.first_nonfinite_loss is not None:
        text += f"; loss NaN/Inf from step {r.first_nonfinite_loss}"
        if r.stopped_early:
            text += " (stopped after a run of NaN/Inf losses)"
    return text


def _clip_text(r: RunResult) -> str:
    if r.clipped_steps is None:
        return "- (no clipping)"
    return f"{r.clipped_steps} / {r.skipped_steps} of {r.steps_run}"


def _threshold_text(r: RunResult) -> str:
    """The clip threshold a run used, in words (``"-"`` for the runs that do not clip)."""
    if r.threshold_min is None or r.threshold_max is None:
        return "-"
    if r.threshold_cap is None:
        if r.threshold_min == r.threshold_max:
            return f"{_g(r.threshold_min)} (fixed)"
        return f"{_g(r.threshold_min)}..{_g(r.threshold_max)}"
    n = r.below_cap_steps or 0
    if not n:
        return f"{_g(r.threshold_cap)} (the cap) at every step: never adapted below it"
    return (
        f"{_g(r.threshold_min)}..{_g(r.threshold_max)}; below the cap of "
        f"{_g(r.threshold_cap)} at {n} of {r.steps_run} steps (from step {r.first_below_cap})"
    )


def _threshold_cell(r: RunResult) -> str:
    if r.threshold_min is None or r.threshold_max is None:
        return "-"
    if r.threshold_min == r.threshold_max:
        return _g(r.threshold_min)
    text = f"{_g(r.threshold_min)}..{_g(r.threshold_max)}"
    if r.threshold_cap is not None:
        text += f" ({r.below_cap_steps} < cap)"
    return text


def run_table(r: RunResult) -> str:
    """The table printed after a run.

    Example:
        >>> print(run_table(result))  # doctest: +SKIP
    """
    rows = [
        ("model", r.model_text),
        ("steps", _steps_text(r)),
        ("final train loss", f"{_g(r.final_loss, 4)} (mean of the last 10% of steps)"),
        ("val accuracy", f"{_acc(r)} (chance {100 / CLASSES:.0f}%)"),
        ("initial total grad norm", _g(r.initial_total_norm)),
        (
            "layer grad norm min",
            f"{_g(r.min_layer_norm)} ({r.min_layer})  median over steps, weight matrices",
        ),
        ("layer grad norm max", f"{_g(r.max_layer_norm)} ({r.max_layer})"),
        ("spread", f"{_g(r.spread_decades, 2)} decades"),
        ("clipped / skipped steps", _clip_text(r)),
        ("clip threshold", _threshold_text(r)),
        ("diagnosis", r.verdict.upper() if r.verdict != "healthy" else "healthy"),
    ]
    if r.steps_run > END_WINDOW:
        end = r.verdict_end.upper() if r.verdict_end != "healthy" else "healthy"
        rows.append((f"  last {END_WINDOW} steps only", end))
    if r.clip is not None:
        rows.insert(1, ("gradstab", r.clip))
    width = max(len(k) for k, _ in rows)
    lines = [f"({r.info.key}) {r.info.title}"]
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    lines += [f"    - {f}" for f in r.diagnosis.findings()]
    if not r.as_expected:
        lines.append(
            f"  note: this run was designed to be {r.info.expected!r} but the diagnosis says "
            f"{r.verdict!r} (last {END_WINDOW} steps: {r.verdict_end!r}) with these settings"
        )
    return "\n".join(lines)


def comparison_table(results: DemoResults) -> str:
    """The final comparison, one row per run.

    Example:
        >>> print(comparison_table(results))  # doctest: +SKIP
    """
    header = [
        "run",
        "final loss",
        "val acc",
        "layer grad norm min..max",
        "spread",
        "clipped",
        "skipped",
        "threshold",
        "steps",
        "diagnosis",
    ]
    body = []
    for r in results.runs.values():
        body.append(
            [
                f"({r.info.key}) {r.info.name}",
                _g(r.final_loss, 4),
                "n/a" if r.accuracy is None else f"{100 * r.accuracy:.1f}%",
                f"{_g(r.min_layer_norm)}..{_g(r.max_layer_norm)}",
                f"{_g(r.spread_decades, 2)} dec",
                "-" if r.clipped_steps is None else str(r.clipped_steps),
                "-" if r.skipped_steps is None else str(r.skipped_steps),
                _threshold_cell(r),
                f"{r.steps_run}/{r.steps_planned}",
                r.verdict
                if r.steps_run <= END_WINDOW or r.verdict_end == r.verdict
                else f"{r.verdict}; last {END_WINDOW} steps: {r.verdict_end}",
            ]
        )
    widths = [max(len(h), *(len(row[i]) for row in body)) for i, h in enumerate(header)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    out += [line(row) for row in body]
    return "\n".join(out)


def conclusions(results: DemoResults) -> list[str]:
    """Sentences comparing (a) with (b), (c) with (d) and (d) with (e), from the numbers.

    Also one naming the runs that did not get the verdict they were designed for.

    Example:
        >>> for sentence in conclusions(results):  # doctest: +SKIP
        ...     print(sentence)
    """
    runs = results.runs
    out = []
    a, b, c, d, e = (runs.get(k) for k in "abcde")
    if a is not None and b is not None:
        out.append(
            f"(a) -> (b): ReLU + init_model_ + LayerNorm: accuracy {_acc(a)} -> {_acc(b)}, "
            f"layer gradient norms spread over {_g(a.spread_decades, 2)} -> "
            f"{_g(b.spread_decades, 2)} decades; diagnosis {a.verdict} -> {b.verdict}."
        )
    if c is not None and d is not None:
        c_end = (
            f"loss NaN/Inf from step {c.first_nonfinite_loss}"
            if c.first_nonfinite_loss is not None
            else f"final loss {_g(c.final_loss, 4)}"
        )
        out.append(
            f"(c) -> (d): same initial weights, clipping: {c_end} -> final loss "
            f"{_g(d.final_loss, 4)} and accuracy {_acc(d)}; {d.clipped_steps} of "
            f"{d.steps_run} steps clipped, {d.skipped_steps} skipped; diagnosis {c.verdict} "
            f"-> {d.verdict}."
        )
    if c is not None and e is not None and d is None:
        out.append(
            f"(c) -> (e): same initial weights, adaptive clipping: final loss "
            f"{_g(e.final_loss, 4)} and accuracy {_acc(e)}; diagnosis {c.verdict} -> "
            f"{e.verdict}."
        )
    if e is not None:
        out.append(_adaptive_sentence(e, d))
    bad = [r for r in runs.values() if not r.as_expected]
    if bad:
        out.append(
            "Not as designed with these settings: "
            + "; ".join(
                f"({r.info.key}) {r.verdict}, last {END_WINDOW} steps {r.verdict_end} "
                f"(expected {r.info.expected})"
                for r in bad
            )
            + "."
        )
    return out


def _adaptive_sentence(e: RunResult, d: RunResult | None) -> str:
    """What run (e)'s adaptive threshold did, and whether it changed anything against (d)."""
    cap = _g(e.threshold_cap)
    vs = ""
    if d is not None:
        vs = (
            f"; against the fixed threshold of (d): accuracy {_acc(d)} -> {_acc(e)}, "
            f"{d.clipped_steps} -> {e.clipped_steps} steps clipped"
        )
    if not e.below_cap_steps:
        return (
            f"(e): the percentile threshold never went below its cap of {cap} in "
            f"{e.steps_run} steps, so the cap did all the clipping and (e) is (d) again: the "
            f"adaptive rule added nothing here{vs}."
        )
    return (
        f"(e): the cap of {cap} did the clipping while the norms were large; the percentile "
        f"threshold went below it from step {e.first_below_cap} on ({e.below_cap_steps} of "
        f"{e.steps_run} steps, down to {_g(e.threshold_min)}){vs}."
    )


def _matplotlib_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _plot_run(r: RunResult, out_dir: str) -> list[str]:
    from gradstab import plots  # noqa: PLC0415 - needs matplotlib, optional

    stem = os.path.join(out_dir, f"{r.info.key}_{r.info.name}")
    title = f"({r.info.key}) {r.info.title}"
    hist = r.history
    if r.clipped_steps is None:
        # A monitor-only callback records its unchanged norm as the post-clip norm: no
        # "after clipping" curve for a run that does not clip.
        hist = replace(hist, post_clip_norm=None)
    return [
        plots.plot_layer_heatmap(
            r.history, f"{stem}_heatmap.png", title=f"{title}: per-layer gradient norm"
        ),
        plots.plot_total_norm(
            hist,
            f"{stem}_total_norm.png",
            diagnosis=r.diagnosis,
            title=f"{title}: total gradient norm",
        ),
    ]


# =========================================================================== the command


def run_demo(cfg: DemoConfig, *, echo: Any = print) -> DemoResults:
    """Train the selected runs one after the other, print their tables and the comparison.

    Args:
        cfg: the settings.
        echo: where the text goes (``print`` by default; a no-op silences it).

    Returns:
        The :class:`DemoResults`.

    Example:
        >>> res = run_demo(DemoConfig(steps=20, plots=False, progress_bar=False))  # doctest: +SKIP
        >>> res.runs["a"].verdict  # doctest: +SKIP
        'vanishing'
    """
    _require_lightning()
    t0 = time.perf_counter()
    plots_note = None
    if cfg.plots and not _matplotlib_available():
        plots_note = (
            "no pictures: matplotlib is not installed "
            '(pip install "gradstab[demo]" or pip install matplotlib); the tables are complete'
        )
        echo(f"gradstab demo: {plots_note}")
    data = (*make_data(cfg.n_train, cfg.seed), *make_data(cfg.n_val, cfg.seed, split=1))
    echo(
        f"gradstab demo: {len(cfg.runs)} run(s) of {cfg.steps} SGD steps on a generated "
        f"{CLASSES}-class task ({cfg.n_train} training, {cfg.n_val} validation samples, "
        f"{IN_FEATURES} features), seed {cfg.seed}"
    )
    threads = torch.get_num_threads()
    results = DemoResults(config=cfg, runs={}, plots_note=plots_note)
    try:
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        for key in cfg.runs:
            result = train_run(key, cfg, data)
            if cfg.plots and plots_note is None:
                result.plots = _plot_run(result, cfg.out)
            results.runs[key] = result
            sys.stdout.flush()
            echo("")
            echo(run_table(result))
    finally:
        torch.set_num_threads(threads)
    results.seconds = time.perf_counter() - t0
    echo("")
    echo("Comparison")
    echo(comparison_table(results))
    for sentence in conclusions(results):
        echo(sentence)
    written = [p for r in results.runs.values() for p in r.plots]
    if written:
        echo(f"Pictures ({len(written)}) in {os.path.abspath(cfg.out)}:")
        for p in written:
            echo(f"  {os.path.basename(p)}")
    echo(f"Total time {results.seconds:.1f} s (training, diagnosis, pictures).")
    return results


def _runs(text: str) -> tuple[str, ...]:
    keys = tuple(k.strip().lower() for k in text.split(",") if k.strip())
    bad = [k for k in keys if k not in RUNS]
    if bad or not keys:
        raise argparse.ArgumentTypeError(
            f"--runs: expected a comma-separated selection of {','.join(RUNS)}, got {text!r}"
        )
    return keys


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options to ``parser``.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--runs", "a,c", "--tiny"]).runs
        ('a', 'c')
    """
    d = DemoConfig()
    parser.add_argument(
        "--steps", type=_positive_int, default=None, help=f"SGD steps per run (default {d.steps})"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="data and init seed")
    parser.add_argument(
        "--runs",
        type=_runs,
        default=d.runs,
        help="which runs, comma-separated (default a,b,c,d,e): a vanishing, b fixed, "
        "c exploding, d clipped (fixed threshold), e clipped (adaptive threshold)",
    )
    parser.add_argument("--out", default=d.out, help=f"folder of the pictures (default {d.out})")
    parser.add_argument("--no-plots", action="store_true", help="write no pictures")
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny settings for smoke tests: 40 steps, fewer samples",
    )
    parser.add_argument(
        "--max-norm",
        type=float,
        default=d.max_norm,
        help=f"clip threshold of run (d) and hard cap of run (e) (default {d.max_norm:g})",
    )
    parser.add_argument(
        "--percentile",
        type=float,
        default=d.percentile,
        help="run (e) clips to this percentile of the earlier total norms "
        f"(gradstab.PercentileThreshold; default {d.percentile:g})",
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="hide Lightning's progress bar"
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=d.threads,
        help="torch CPU threads (default 1: fastest for these small models)",
    )


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    """The :class:`DemoConfig` of parsed ``demo`` options (``--tiny`` applies :data:`TINY`).

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> cfg = config_from_args(p.parse_args(["--tiny", "--steps", "7"]))
        >>> cfg.steps, cfg.n_train
        (7, 1024)
    """
    kwargs: dict[str, Any] = dict(TINY) if args.tiny else {}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    return DemoConfig(
        seed=args.seed,
        runs=tuple(args.runs),
        out=args.out,
        plots=not args.no_plots,
        max_norm=args.max_norm,
        percentile=args.percentile,
        progress_bar=not args.no_progress_bar,
        threads=args.threads,
        **kwargs,
    )


#: The results of the last :func:`run` (for tests and interactive use).
last_results: DemoResults | None = None


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the demo described by ``args``.

    Args:
        args: parsed options (see :func:`add_arguments`).
        argv: the arguments after ``python -m gradstab`` (unused).

    Returns:
        0, or 2 when Lightning is missing or an option is invalid.

    Example:
        >>> from gradstab.__main__ import main
        >>> main(["demo", "--tiny", "--no-plots"])  # doctest: +SKIP
        0
    """
    global last_results
    try:
        _require_lightning()
    except ImportError as e:
        print(f"gradstab demo: {e}", file=sys.stderr)
        return 2
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"gradstab demo: {e}", file=sys.stderr)
        return 2
    last_results = run_demo(cfg)
    return 0
