"""``python -m gradstab bench``: options and the run (``--train`` hands over to
:mod:`gradstab.tools.bench.train`).

Example:
    $ python -m gradstab bench --quick
"""

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch

from gradstab.tools.bench import train
from gradstab.tools.bench.config import (
    DEFAULT_REPEATS,
    DEFAULT_WARMUP,
    DTYPES,
    MODES,
    QUICK_REPEATS,
    QUICK_SETS,
    QUICK_WARMUP,
    BenchError,
)
from gradstab.tools.bench.cuda import MAX_ROTATE, ROTATE_L2_MULTIPLE, cuda_summary
from gradstab.tools.bench.runner import bench_one
from gradstab.tools.bench.sets import GPU_QUICK_REPEATS, GPU_REPEATS, GPU_SETS, PARAM_SETS
from gradstab.tools.bench.table import NOTES, format_table
from gradstab.tools.bench.timing import Result
from gradstab.tools.results import OtherLoad, header, wants_raw, write_json


def _parse_sets(text: str) -> list[str]:
    if [t.strip() for t in text.split(",") if t.strip()] == ["all"]:
        return ["all"]  # resolved by _resolve_sets: GPU-only sets join on CUDA
    return _csv([*PARAM_SETS, *GPU_SETS], allow_all=True)(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _resolve_sets(sets: list[str] | None, quick: bool, device: torch.device) -> list[str]:
    gpu = list(GPU_SETS) if device.type == "cuda" else []
    if sets is None:
        return list(QUICK_SETS) if quick else [*PARAM_SETS, *gpu]
    if sets == ["all"]:
        return [*PARAM_SETS, *gpu]
    return sets


def _default_repeats(set_name: str, quick: bool) -> int:
    table = QUICK_REPEATS if quick else DEFAULT_REPEATS
    if set_name in table:
        return table[set_name]
    return (GPU_QUICK_REPEATS if quick else GPU_REPEATS)[set_name]


def _csv(choices: Sequence[str], allow_all: bool = False) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if allow_all and items == ["all"]:
            return list(choices)
        bad = [s for s in items if s not in choices]
        if bad or not items:
            extra = ", all" if allow_all else ""
            raise argparse.ArgumentTypeError(
                f"invalid choice {','.join(bad) or text!r} (choose from {', '.join(choices)}"
                f"{extra}; comma-separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``.

    Args:
        parser: the ``bench`` subcommand parser.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--set", "gpt2", "--mode", "clip"]).set
        ['gpt2']
    """
    parser.add_argument(
        "--set",
        type=_parse_sets,
        default=None,
        help="parameter sets, comma-separated: gpt2, resnet50, many-small, llama1b or all "
        "(default: all; with --quick: many-small,resnet50; llama1b is part of all only on "
        "CUDA)",
    )
    parser.add_argument(
        "--dtype",
        type=_csv(list(DTYPES)),
        default=None,
        help="gradient dtypes, comma-separated (default: fp32,bf16; with --quick: fp32)",
    )
    parser.add_argument(
        "--mode",
        type=_csv(MODES),
        default=None,
        help="modes, comma-separated: healthy, clip, stats, value, agc, agc-healthy, "
        "adaptive, adaptive-zscore, fold (default: healthy,clip)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per set/dtype/mode (default per set: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items())
        + "; fewer with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"untimed rounds first (default {DEFAULT_WARMUP})"
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the gradients: cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the gradients (default 0)")
    parser.add_argument(
        "--rotate",
        type=_positive_int,
        default=None,
        help="CUDA only: time each set on N identical copies, cycled call by call (default: "
        f"enough for {ROTATE_L2_MULTIPLE}x the L2 cache, at most {MAX_ROTATE}; 1 disables)",
    )
    parser.add_argument("--json", metavar="PATH",
                        help="also write the results to PATH: summaries (medians, quartiles, "
                             "ratios) for .json, every round's time too for .json.gz")  # fmt: skip
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run (many-small + resnet50, fp32, few repeats; under ~30 s)",
    )
    train.add_arguments(parser)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark described by ``args`` and print the table.

    Args:
        args: parsed options (see :func:`add_arguments`).
        argv: the arguments after ``python -m gradstab``, echoed in the header.

    Returns:
        The exit status: 0, or 1 if a correctness check failed.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> run(p.parse_args(["--quick", "--set", "many-small", "--repeats", "2"]),
        ...     ["bench", "--quick"])  # doctest: +SKIP
        0
    """
    if getattr(args, "train", False):
        return train.run(args, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gradstab bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"gradstab bench: unsupported device {args.device!r}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sets = _resolve_sets(args.set, args.quick, device)
    dtypes = args.dtype or (["fp32"] if args.quick else list(DTYPES))
    modes = args.mode or ["healthy", "clip"]
    warmup = args.warmup
    if warmup is None:
        warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if (args.repeats is not None and args.repeats < 1) or warmup < 0:
        print("gradstab bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    meta = header(argv, device)
    for k, v in meta.items():
        print(f"{k + ':':9} {v}")
    print(flush=True)

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    results: list[Result] = []
    other = OtherLoad()
    t0 = time.perf_counter()
    try:
        for s in sets:
            repeats = args.repeats or _default_repeats(s, args.quick)
            for d in dtypes:
                results += bench_one(
                    s,
                    d,
                    modes,
                    device=device,
                    warmup=warmup,
                    repeats=repeats,
                    seed=args.seed,
                    log=log,
                    rotate=getattr(args, "rotate", None),
                )
                gc.collect()
    except BenchError as exc:
        print(f"gradstab bench: correctness check failed, not timing: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    other_cpus = other.cpus()

    print(format_table(results))
    print()
    print(NOTES)
    if device.type == "cuda":
        print()
        print(cuda_summary(results))
    print(f"Total time {elapsed:.1f} s.", end="")
    if other_cpus is not None:
        print(
            f" Other processes kept {other_cpus:.2f} of {os.cpu_count()} CPUs busy meanwhile",
            end="",
        )
        if other_cpus > 0.1:
            print(": timings are disturbed, rerun on a quiet machine", end="")
        print(".", end="")
    print()
    if args.json:
        doc = {
            "meta": {
                **meta,
                "elapsed_s": elapsed,
                "other_cpus_busy": other_cpus,
                "warmup": warmup,
                "argv": list(argv),
            },
            "results": [r.to_json(raw=wants_raw(args.json)) for r in results],
        }
        write_json(args.json, doc)
        print(f"Results written to {args.json}.")
    return 0
