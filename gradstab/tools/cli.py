"""The command line, ``python -m gradstab <command> [options]``: the commands and their parser.

Each command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args, argv) -> int``; adding a command (``demo``, ``report``) is one entry in
:data:`COMMANDS`.

Example:
    $ python -m gradstab --help
    $ python -m gradstab bench --quick
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

#: Command name -> (module providing add_arguments/run, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "gradstab.tools.bench",
        "time gradstab against torch.nn.utils clipping and a memory-bandwidth floor",
    ),
    "demo": (
        "gradstab.tools.demo",
        "train vanishing, fixed, exploding and clipped nets side by side; diagnose and plot them",
    ),
    "report": (
        "gradstab.tools.report",
        "diagnose vanishing/exploding/dead/NaN gradients from a training log and plot them",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m gradstab`` parser, with one subparser per command.

    Returns:
        The parser; each subparser sets ``args.command``.

    Example:
        >>> build_parser().parse_args(["bench", "--quick"]).command
        'bench'
    """
    parser = argparse.ArgumentParser(
        prog="python -m gradstab",
        description="gradstab: fused gradient statistics and clipping.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the chosen command.

    Args:
        argv: the arguments after ``python -m gradstab``.

    Returns:
        The command's exit status.

    Example:
        >>> main(["bench", "--quick", "--set", "many-small"])  # doctest: +SKIP
        0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    return int(module.run(args, argv))
