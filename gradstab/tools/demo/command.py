"""``python -m gradstab demo``: :func:`run_demo` and the command's options.

Example:
    $ python -m gradstab demo --tiny
"""

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch

from gradstab.tools.demo import runs as demo_runs
from gradstab.tools.demo.models import CLASSES, IN_FEATURES, make_data
from gradstab.tools.demo.output import (
    _matplotlib_available,
    _plot_run,
    comparison_table,
    conclusions,
    run_table,
)
from gradstab.tools.demo.runs import (
    RUNS,
    TINY,
    DemoConfig,
    DemoResults,
    train_run,
)

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
    demo_runs._require_lightning()
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
        "--no-progress-bar",
        action="store_true",
        help="no progress (a bar on a terminal, a line per tenth of a run otherwise)",
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
        demo_runs._require_lightning()
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
