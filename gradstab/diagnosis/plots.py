"""Pictures of a gradient history: a per-layer norm heatmap and the total-norm curve.

Needs matplotlib, an optional extra: ``pip install "gradstab[plot]"``.  The figures are drawn
with matplotlib's object-oriented API on the non-interactive Agg canvas (no GUI, no change to
the global pyplot backend) and written as PNG files of a fixed pixel size (``size`` inches x
``dpi``; no tight bounding box), so the same history gives the same picture size every time.

Example:
    >>> import torch, gradstab
    >>> from gradstab.diagnosis.plots import plot_history
    >>> m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    >>> h = gradstab.GradHistory(m)
    >>> for step in range(10):
    ...     m.zero_grad(); m(torch.randn(8, 4)).sum().backward(); h.record_step(step)
    >>> plot_history(h.data(), "/tmp/gradstab-plots")  # doctest: +SKIP
    ['/tmp/gradstab-plots/grad_norm_heatmap.png', '/tmp/gradstab-plots/total_norm.png']
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any

import torch

from gradstab.diagnosis.data import HistoryData
from gradstab.diagnosis.findings import Diagnosis

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "HEATMAP_SIZE",
    "TOTAL_SIZE",
    "plot_history",
    "plot_layer_heatmap",
    "plot_total_norm",
    "require_matplotlib",
]

#: Default heatmap size in inches (at ``dpi=100``: 1200 x 800 pixels).
HEATMAP_SIZE = (12.0, 8.0)
#: Default total-norm figure size in inches (at ``dpi=100``: 1200 x 500 pixels).
TOTAL_SIZE = (12.0, 5.0)

_INSTALL = (
    "gradstab's plots need matplotlib, which is not installed: "
    'pip install "gradstab[plot]" (or pip install "matplotlib>=3.5")'
)


def require_matplotlib() -> Any:
    """Import matplotlib, or raise ``ImportError`` saying what to install.

    Returns:
        The ``matplotlib`` module.

    Example:
        >>> require_matplotlib().__name__  # doctest: +SKIP
        'matplotlib'
    """
    try:
        import matplotlib  # noqa: PLC0415 - optional extra
    except ImportError as e:
        raise ImportError(_INSTALL) from e
    return matplotlib


def _figure(size: tuple[float, float], dpi: int) -> tuple[Figure, Any]:
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - optional
    from matplotlib.figure import Figure  # noqa: PLC0415 - optional

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _save(fig: Figure, path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", dpi=fig.dpi, metadata={"Software": None})
    return path


def _short(source: str, n: int = 70) -> str:
    return source if len(source) <= n else "..." + source[-(n - 3) :]


def _edges(steps: list[int]) -> list[float]:
    """Cell edges around each step: midpoints between neighbours, half a gap at the ends."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps[:-1], steps[1:])]
    return [steps[0] - (mids[0] - steps[0]), *mids, steps[-1] + (steps[-1] - mids[-1])]


def plot_layer_heatmap(
    data: HistoryData,
    path: str,
    *,
    size: tuple[float, float] = HEATMAP_SIZE,
    dpi: int = 100,
    max_labels: int = 40,
    title: str | None = None,
) -> str:
    """Heatmap of per-layer gradient norms: layers (in ``data.names`` order: the network
    order, input at the top, where it is known) x steps.  The y axis label says which order
    (:attr:`HistoryData.name_order`).

    Colour is the norm on a log scale; grey cells have no value (no gradient, not logged),
    black cells an exactly zero gradient, red cells a NaN/Inf gradient.

    Args:
        data: the history (:meth:`gradstab.GradHistory.data` or
            :func:`gradstab.diagnosis.logs.read_log`).
        path: the PNG file to write (parent folders are created).
        size: figure size in inches; the PNG is ``size x dpi`` pixels.
        dpi: dots per inch.
        max_labels: at most this many layer names on the y axis (every k-th otherwise).
        title: the title (default: one naming the norm and the source).

    Returns:
        ``path``.

    Example:
        >>> plot_layer_heatmap(history.data(), "heatmap.png")  # doctest: +SKIP
        'heatmap.png'
    """
    fig, ax = _figure(size, dpi)
    import numpy as np  # noqa: PLC0415 - comes with matplotlib
    from matplotlib import colormaps  # noqa: PLC0415 - optional
    from matplotlib.colors import ListedColormap, LogNorm  # noqa: PLC0415 - optional

    p = data.norm_type
    p_txt = "inf" if math.isinf(p) else f"{p:g}"
    ax.set_title(title or f"Per-layer gradient {p_txt}-norm ({_short(data.source)})")
    s_n, t_n = data.num_steps, len(data.names)
    if s_n == 0 or t_n == 0:
        ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    norms = data.norms.to(torch.float64).T  # [T, S]
    present = data.present.T
    finite = torch.isfinite(norms)
    good = present & finite & (norms > 0)
    zero = present & finite & (norms == 0)
    bad = present & ~finite
    if data.nonfinite is not None:
        bad |= torch.nan_to_num(data.nonfinite.T.to(torch.float64), nan=0.0) > 0
        good &= ~bad
    vals = norms.numpy().copy()
    masked = np.ma.masked_array(vals, mask=~good.numpy())
    cmap = colormaps["viridis"].with_extremes(bad="#d9d9d9")
    x = _edges(list(data.steps))
    y = list(range(t_n + 1))
    if good.any():
        lo = float(norms[good].min())
        hi = float(norms[good].max())
        if hi <= lo:
            lo, hi = lo / 10, hi * 10
        mesh = ax.pcolormesh(x, y, masked, cmap=cmap, norm=LogNorm(vmin=lo, vmax=hi))
        cb = fig.colorbar(mesh, ax=ax, pad=0.01)
        cb.set_label(f"gradient {p_txt}-norm (log scale)")
    else:
        ax.pcolormesh(x, y, np.ma.masked_all(vals.shape), cmap=cmap)
    cat = np.zeros(vals.shape)
    cat[zero.numpy()] = 1
    cat[bad.numpy()] = 2
    if cat.any():
        over = ListedColormap([(0, 0, 0, 0), (0, 0, 0, 1), (0.9, 0.1, 0.1, 1)])
        ax.pcolormesh(x, y, np.ma.masked_equal(cat, 0), cmap=over, vmin=0, vmax=2)
    ax.set_ylim(t_n, 0)  # first layer (input side) at the top
    step = max(1, math.ceil(t_n / max(max_labels, 1)))
    ticks = list(range(0, t_n, step))
    ax.set_yticks([t + 0.5 for t in ticks])
    ax.set_yticklabels([data.names[t] for t in ticks], fontsize=7 if t_n > 20 else 9)
    ax.set_xlabel("step")
    ax.set_ylabel(f"parameter ({data.name_order})")
    fig.text(0.01, 0.01, "grey: no value   black: zero gradient   red: NaN/Inf gradient",
             fontsize=8, color="#555555")  # fmt: skip
    fig.subplots_adjust(left=0.22, right=0.98, top=0.94, bottom=0.08)
    return _save(fig, path)


def plot_total_norm(
    data: HistoryData,
    path: str,
    *,
    diagnosis: Diagnosis | None = None,
    max_norm: float | None = None,
    size: tuple[float, float] = TOTAL_SIZE,
    dpi: int = 100,
    title: str | None = None,
) -> str:
    """The total gradient norm over steps, with clip thresholds and bad steps marked.

    Draws the pre-clip total norm, the post-clip total norm (when recorded), the clip
    threshold (recorded per step, else ``max_norm`` as a constant line), red vertical lines
    at steps with NaN/Inf gradients, purple crosses at skipped optimizer steps, and orange
    circles at the spikes of ``diagnosis``.  Log y axis.

    Args:
        data: the history.
        path: the PNG file to write.
        diagnosis: its :func:`gradstab.diagnose` result, to mark spikes (optional).
        max_norm: a constant clip threshold to draw when the history has none.
        size: figure size in inches; the PNG is ``size x dpi`` pixels.
        dpi: dots per inch.
        title: the title (default: one naming the source).

    Returns:
        ``path``.

    Example:
        >>> plot_total_norm(history.data(), "total.png", max_norm=1.0)  # doctest: +SKIP
        'total.png'
    """
    fig, ax = _figure(size, dpi)
    ax.set_title(title or f"Total gradient norm ({_short(data.source)})")
    s_n = data.num_steps
    if s_n == 0:
        ax.text(0.5, 0.5, "no steps recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return _save(fig, path)
    steps = list(data.steps)

    def positive(v: torch.Tensor) -> list[float]:
        v = v.to(torch.float64)
        return torch.where(torch.isfinite(v) & (v > 0), v, torch.nan).tolist()

    drew_any = False
    total = positive(data.total_norm)
    if any(not math.isnan(v) for v in total):
        ax.plot(steps, total, color="#1f77b4", lw=1.4, marker="." if s_n < 60 else None,
                label="total norm (pre-clip)")  # fmt: skip
        drew_any = True
    # A monitor-only run records the unchanged norm as its post-clip norm: no second curve.
    clipped_somewhere = data.post_clip_norm is not None and not torch.allclose(
        data.post_clip_norm.to(torch.float64),
        data.total_norm.to(torch.float64),
        rtol=0.0,
        atol=0.0,
        equal_nan=True,
    )
    if data.post_clip_norm is not None and clipped_somewhere:
        post = positive(data.post_clip_norm)
        if any(not math.isnan(v) for v in post):
            ax.plot(steps, post, color="#2ca02c", lw=1.0, ls="-", label="after clipping")
            drew_any = True
    if data.clip_threshold is not None and bool(torch.isfinite(data.clip_threshold).any()):
        ax.step(steps, positive(data.clip_threshold), where="mid", color="black", lw=1.0,
                ls="--", label="clip threshold")  # fmt: skip
        drew_any = True
    elif max_norm is not None:
        ax.axhline(max_norm, color="black", lw=1.0, ls="--", label=f"clip threshold {max_norm:g}")
        drew_any = True
    nf = data.nonfinite_step
    nf_steps = [s for s, f in zip(steps, nf.tolist()) if f] if nf is not None else []
    for i, s in enumerate(nf_steps):
        ax.axvline(
            s, color="#d62728", lw=1.2, alpha=0.8, label="NaN/Inf gradient" if i == 0 else None
        )
    if data.skipped is not None:
        sk = [s for s, f in zip(steps, data.skipped.tolist()) if f]
        if sk:
            ax.plot(sk, [0.97] * len(sk), ls="none", marker="x", color="#9467bd", ms=8,
                    transform=ax.get_xaxis_transform(), label="skipped step")  # fmt: skip
    if diagnosis is not None and diagnosis.spikes:
        ax.plot([sp.step for sp in diagnosis.spikes], [sp.total_norm for sp in diagnosis.spikes],
                ls="none", marker="o", mfc="none", mec="#ff7f0e", ms=10, mew=2,
                label="spike")  # fmt: skip
    if drew_any:
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no finite total norm", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)
    fig.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.12)
    return _save(fig, path)


def plot_history(
    data: HistoryData,
    out_dir: str,
    *,
    diagnosis: Diagnosis | None = None,
    max_norm: float | None = None,
    dpi: int = 100,
) -> list[str]:
    """Write ``grad_norm_heatmap.png`` and ``total_norm.png`` into ``out_dir``.

    Args:
        data: the history.
        out_dir: the folder (created if missing).
        diagnosis: to mark spikes on the total-norm curve.
        max_norm: a constant clip threshold to draw when the history records none.
        dpi: dots per inch (the sizes are :data:`HEATMAP_SIZE` and :data:`TOTAL_SIZE`).

    Returns:
        The paths written.

    Example:
        >>> plot_history(history.data(), "report")  # doctest: +SKIP
        ['report/grad_norm_heatmap.png', 'report/total_norm.png']
    """
    require_matplotlib()
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_layer_heatmap(data, os.path.join(out_dir, "grad_norm_heatmap.png"), dpi=dpi),
        plot_total_norm(
            data,
            os.path.join(out_dir, "total_norm.png"),
            diagnosis=diagnosis,
            max_norm=max_norm,
            dpi=dpi,
        ),
    ]
