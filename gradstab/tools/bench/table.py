"""The benchmark's Markdown table and the notes printed under it.

Example:
    >>> from gradstab.tools.bench.table import format_table
    >>> format_table([]).startswith("| set | dtype | mode |")
    True
"""

from collections.abc import Sequence

from gradstab.tools.bench.timing import Result


def fmt_optional(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of the results.

    Args:
        results: rows from :func:`bench_one`.

    Returns:
        The table, one line per result.

    Example:
        >>> r = Result("s", "fp32", "healthy", "gradstab", "gradstab", [1.0, 2.0], 4_000_000)
        >>> print(format_table([r]).splitlines()[2])
        | s | fp32 | healthy | gradstab | 1.500 | 0.500 | 2.67 |  |  |
    """
    cols = [
        "set",
        "dtype",
        "mode",
        "contestant",
        "median ms",
        "IQR ms",
        "GB/s",
        "torch/gradstab",
        "floor/gradstab",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        cells = [
            r.set,
            r.dtype,
            r.mode,
            r.contestant,
            f"{r.median_ms:.3f}",
            f"{r.iqr_ms:.3f}",
            f"{r.nbytes / r.median_ms / 1e6:.2f}",
            fmt_optional(r.ratio, ".2f"),
            fmt_optional(r.floor_fraction, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """\
Medians of the timed rounds; all contestants interleaved round-robin in one process.
IQR = interquartile range of the timed rounds.
torch/gradstab = torch median / gradstab median (> 1: gradstab faster).
floor/gradstab = floor / gradstab median (1 = at the floor). The floor rows time passes
over a flat fp32 buffer of the same bytes; the floor of healthy and stats is one read
(the faster of flat.sum and flat.amax), of value one read+write (flat.mul_(1.0)), of
clip one read plus one read+write (the norm must be known before anything is written).
GB/s = gradient bytes / median (bytes of one pass over the gradients).
The "torch" of agc modes is the timm-style loop; of adaptive modes, gradstab with a fixed
threshold (there the ratio is fixed / adaptive: below 1, adapting costs that much more).
"gradstab GradStabOptimizer.clip()" (healthy, clip) is the training path's clip of the same
gradients; its ratio is gradstab.clip_grad_norm_ / it (below 1: the wrapper costs that much
more than the functional call).
fold times clip + AdamW(fused=True) step: its floor is the unclipped step plus one read, and
its ratios are over the folded step (the explicit gradstab clip + step, torch's). The row
"AdamW step, grad_scale=1" is the fused step as a fold runs it (torch then writes every
gradient back): a folded clipping step costs at least that plus one read."""
