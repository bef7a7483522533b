"""``python -m gradstab report <log dir>``: diagnose gradients from a training log, draw them.

Reads the log with :func:`gradstab.diagnosis.logs.read_log` (which keys, formats and orders it
understands are described there), prints the diagnosis of :func:`gradstab.diagnose` with its
prescriptions (from the log alone: a log has no model, so the model-based checks are listed as
missing) and writes two PNG files (see :mod:`gradstab.diagnosis.plots`).

A CSV log does not keep the network order of the parameters (``CSVLogger`` sorts its columns):
the rows of the heatmap and the depth trend then follow the module paths, and the heatmap's
axis says so.  ``--order FILE`` gives the true order: a text file with one parameter name a
line, e.g. written by ``print(*(n for n, _ in model.named_parameters()), sep="\\n")``.

Example:
    $ python -m gradstab report lightning_logs --out gradstab_report
    $ python -m gradstab report lightning_logs --version 3 --format tensorboard --json d.json
    $ python -m gradstab report lightning_logs --order param_names.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from gradstab.diagnosis import Diagnosis, diagnose
from gradstab.diagnosis.logs import LogError, read_log
from gradstab.diagnosis.plots import plot_history

__all__ = ["add_arguments", "read_order", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` options to ``parser``.

    Args:
        parser: the ``report`` subcommand parser.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["logs", "--version", "2"]).version
        2
    """
    parser.add_argument(
        "logdir", help="a log folder (searched recursively), metrics.csv or event file"
    )
    parser.add_argument("--version", type=int, default=None,
                        help="use the log under version_N (default: the newest log)")  # fmt: skip
    parser.add_argument("--format", choices=("auto", "csv", "tensorboard"), default="auto",
                        help="log format (default: auto, CSV preferred on a tie)")  # fmt: skip
    parser.add_argument("--out", default="gradstab_report",
                        help="folder for the PNG files (default: ./gradstab_report)")  # fmt: skip
    parser.add_argument("--no-plots", action="store_true", help="print the diagnosis only")
    parser.add_argument("--order", default=None, metavar="FILE",
                        help="parameter names in network order, one a line (a CSV log is "
                        "sorted by name; default: the log's order)")  # fmt: skip
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="also write the diagnosis as JSON to FILE")  # fmt: skip
    parser.add_argument("--norm-type", type=float, default=None,
                        help="read the grad_{p}_norm keys of this p (default: 2)")  # fmt: skip
    parser.add_argument("--prefix", default="grad",
                        help="prefix of gradstab's own keys (default: grad)")  # fmt: skip
    parser.add_argument("--max-norm", type=float, default=None,
                        help="draw this constant clip threshold when the log has none")  # fmt: skip
    parser.add_argument("--window", type=int, default=None,
                        help="diagnose only the last N logged steps")  # fmt: skip
    parser.add_argument("--top", type=int, default=10, help="rows of the layer table (default 10)")
    parser.add_argument("--vanish-decades", type=float, default=2.0,
                        help="decades below the median = vanishing (default 2)")  # fmt: skip
    parser.add_argument("--sustain-steps", type=int, default=5,
                        help="consecutive logged steps to count (default 5)")  # fmt: skip
    parser.add_argument("--spike-z", type=float, default=6.0,
                        help="robust z-score of a total-norm spike (default 6)")  # fmt: skip
    parser.add_argument("--clip-percentile", type=float, default=95.0,
                        help="percentile of the healthy steps' total norms that the clip "
                        "prescription recommends (default 95)")  # fmt: skip
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a problem is found")  # fmt: skip


def read_order(path: str) -> list[str]:
    """The parameter names of an ``--order`` file: one a line, blank lines and ``#`` comments
    skipped.

    Args:
        path: the file, e.g. written by
            ``print(*(n for n, _ in model.named_parameters()), sep="\\n", file=fh)``.

    Returns:
        The names, in the file's order.

    Raises:
        LogError: the file cannot be read or names nothing.

    Example:
        >>> with open("names.txt", "w") as fh:
        ...     _ = fh.write("# GPT-2\\nwte.weight\\n\\nh.0.attn.weight\\n")
        >>> read_order("names.txt")
        ['wte.weight', 'h.0.attn.weight']
    """
    try:
        with open(path) as fh:
            names = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as e:
        raise LogError(f"--order {path}: cannot read: {e}") from e
    if not names:
        raise LogError(f"--order {path}: no parameter names in it (one a line)")
    return names


def _print_report(d: Diagnosis, top: int) -> None:
    text = str(d)
    if top != 10:
        head, _, _ = text.partition("\n\n")
        text = head + "\n\n" + d.table(top=top)
    print(text)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Read the log, print the diagnosis, write the PNGs (and JSON).

    Args:
        args: parsed options (see :func:`add_arguments`).
        argv: the arguments after ``python -m gradstab`` (unused; for the command interface).

    Returns:
        0; 2 when no log could be read or an option is invalid; 1 when the plots could not
        be drawn (matplotlib missing) or, with ``--strict``, a problem was found.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> run(p.parse_args(["lightning_logs", "--no-plots"]), [])  # doctest: +SKIP
        0
    """
    err = sys.stderr
    try:
        order = read_order(args.order) if args.order else None
        data = read_log(
            args.logdir,
            version=args.version,
            fmt=args.format,
            norm_type=args.norm_type,
            prefix=args.prefix,
            order=order,
        )
        d = diagnose(
            data,
            window=args.window,
            vanish_decades=args.vanish_decades,
            sustain_steps=args.sustain_steps,
            spike_z=args.spike_z,
            clip_percentile=args.clip_percentile,
        )
    except (LogError, ValueError) as e:
        print(f"gradstab report: {e}", file=err)
        return 2
    _print_report(d, args.top)
    if data.name_order != "network order":
        print(
            f"\nParameter order: {data.name_order} ({data.source}); the depth trend and the "
            "heatmap's rows follow it. --order FILE (names in network order, one a line) "
            "gives the network order."
        )
    status = 1 if args.strict and not d.healthy else 0
    if args.json:
        parent = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(parent, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(d.to_dict(), fh, indent=1)
        print(f"\nwrote {args.json}")
    if not args.no_plots:
        try:
            paths = plot_history(data, args.out, diagnosis=d, max_norm=args.max_norm)
        except ImportError as e:
            print(f"gradstab report: {e}; or pass --no-plots", file=err)
            return 1
        print("\nwrote " + ", ".join(paths))
    return status
