"""Reading a training log into a :class:`~gradstab.diagnosis.HistoryData` (:func:`read_log`).

Reads the per-layer gradient norms that a training run logged (Lightning's ``CSVLogger``
``metrics.csv`` or a TensorBoard event directory), for :func:`gradstab.diagnose` and the plots;
``python -m gradstab report`` (:mod:`gradstab.tools.report`) is its command line.

Keys understood (any subset; other columns are ignored):

- ``grad_{p}_norm/<param>``: per-tensor gradient p-norm (Lightning's ``grad_norm``
  convention, as logged by :class:`gradstab.GradStabCallback` with ``log_per_layer=True`` or
  by ``self.log_dict(lightning.pytorch.utilities.grad_norm(self, 2))``), with ``p`` such as
  ``2.0`` or ``inf``;
- ``grad_{p}_norm_total``: total norm (else computed from the per-tensor norms);
- ``<prefix>/max_abs/<param>``, ``<prefix>/post_clip_norm_total``, ``<prefix>/clip_threshold``
  (also ``<prefix>/max_norm``), and the cumulative counters ``<prefix>/nonfinite_steps``
  (or ``nonfinite_count``) and ``<prefix>/skipped_steps`` (a step where a counter grew is
  marked), with ``<prefix>`` = ``grad`` unless ``--prefix`` says otherwise.  Keys with an
  ``_opt<i>`` suffix (several optimizers) are combined: norms as p-norms, counters summed.

``CSVLogger`` writes one row per ``log_metrics`` call, with empty cells for the keys not logged
then; rows of the same step are merged.  It sorts its columns by name, which loses the
network order: when the per-layer keys appear sorted, they are re-ordered by module path with
a natural sort (digit runs compared as numbers: ``layers.2`` before ``layers.10``) and, within
a module, ``weight`` before ``bias`` (the registration order of PyTorch's layers).  That
restores the order of numbered containers (``nn.Sequential``, ``nn.ModuleList``); sibling
modules with other names stay alphabetical (GPT-2's ``transformer.wte`` and ``wpe`` come after
``transformer.h.*``), so ``read_log(order=...)`` (``report --order FILE``) takes the true
order.  TensorBoard tags keep the order in which they were first written (for
:class:`gradstab.GradStabCallback`: its optimizer's parameter order).
:attr:`HistoryData.name_order` says which order the names are in; the heatmap's axis label
shows it.

The log is looked for under the directory given: ``metrics.csv`` files and folders holding
``events.out.tfevents.*`` files (e.g. ``lightning_logs/version_3/``).  The newest one is used,
or the one under ``version_N`` with ``--version N``.

Example:
    $ python -m gradstab report lightning_logs --out gradstab_report
    $ python -m gradstab report lightning_logs --version 3 --format tensorboard --json d.json
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from gradstab.diagnosis.data import HistoryData

__all__ = ["LogError", "find_log", "read_log"]

_EVENTS = "events.out.tfevents."
_LAYER = re.compile(r"^grad_(?P<p>[^/_]+)_norm/(?P<name>.+)$")
_TOTAL = re.compile(r"^grad_(?P<p>[^/_]+)_norm_total(?:_opt(?P<opt>\d+))?$")
_OPT = re.compile(r"^(?P<base>.+?)_opt(?P<opt>\d+)$")


class LogError(ValueError):
    """No usable log was found or it could not be read (the message says why)."""


# --------------------------------------------------------------------------- finding logs


def _version_of(path: str) -> str | None:
    for part in reversed(os.path.normpath(path).split(os.sep)):
        m = re.fullmatch(r"version_(\d+)", part)
        if m:
            return m.group(1)
    return None


def find_log(path: str, version: int | None = None, fmt: str = "auto") -> tuple[str, str]:
    """Find the log to read under ``path``.

    Args:
        path: a ``metrics.csv`` file, an event file, or a folder searched recursively.
        version: only logs under a ``version_<version>`` folder.
        fmt: ``"auto"``, ``"csv"`` or ``"tensorboard"``.

    Returns:
        ``(kind, location)``: ``("csv", <csv file>)`` or ``("tensorboard", <folder>)``; the
        newest (latest modification) when several match; a CSV file wins a tie.

    Raises:
        LogError: nothing matches (the message lists what was found).

    Example:
        >>> find_log("lightning_logs")  # doctest: +SKIP
        ('csv', 'lightning_logs/version_1/metrics.csv')
    """
    if fmt not in ("auto", "csv", "tensorboard"):
        raise LogError(f"format must be auto, csv or tensorboard, got {fmt!r}")
    if not os.path.exists(path):
        raise LogError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        base = os.path.basename(path)
        if base.startswith(_EVENTS) and fmt != "csv":
            return "tensorboard", os.path.dirname(os.path.abspath(path))
        if base.endswith(".csv") and fmt != "tensorboard":
            return "csv", path
        raise LogError(f"{path}: not a CSV file or a TensorBoard event file (format {fmt})")
    found: list[tuple[float, int, str, str]] = []  # (mtime, csv first, kind, location)
    for root, dirs, files in os.walk(path):
        dirs.sort()
        events = [f for f in files if f.startswith(_EVENTS)]
        if events and fmt != "csv":
            mtime = max(os.path.getmtime(os.path.join(root, f)) for f in events)
            found.append((mtime, 0, "tensorboard", root))
        if "metrics.csv" in files and fmt != "tensorboard":
            f = os.path.join(root, "metrics.csv")
            found.append((os.path.getmtime(f), 1, "csv", f))
    what = {"auto": "metrics.csv or TensorBoard event files", "csv": "metrics.csv files",
            "tensorboard": "TensorBoard event files"}[fmt]  # fmt: skip
    if not found:
        raise LogError(f"{path}: no {what} found under it")
    if version is not None:
        matching = [f for f in found if _version_of(f[3]) == str(version)]
        if not matching:
            have = sorted({v for f in found if (v := _version_of(f[3])) is not None}, key=int)
            raise LogError(
                f"{path}: no {what} under a version_{version} folder; versions found: "
                f"{', '.join(have) or 'none'}"
            )
        found = matching
    _, _, kind, loc = max(found)
    return kind, loc


# --------------------------------------------------------------------------- reading logs


def _float(cell: str) -> float | None:
    cell = cell.strip()
    if not cell:
        return None
    try:
        return float(cell)
    except ValueError:
        return None


def _read_csv(path: str) -> tuple[dict[int, dict[str, float]], list[str]]:
    rows: dict[int, dict[str, float]] = {}
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            if "step" not in columns:
                raise LogError(f"{path}: no 'step' column (is this a Lightning CSVLogger file?)")
            for line, row in enumerate(reader, start=2):
                step_v = _float(row.get("step") or "")
                if step_v is None or not math.isfinite(step_v):
                    raise LogError(f"{path}, line {line}: step {row.get('step')!r} is not a number")
                merged = rows.setdefault(int(step_v), {})
                for key, cell in row.items():
                    if key in (None, "step", "epoch") or cell is None:
                        continue
                    v = _float(cell)
                    if v is not None:
                        merged[key] = v
    except OSError as e:
        raise LogError(f"{path}: cannot read: {e}") from e
    except csv.Error as e:
        raise LogError(f"{path}: not a valid CSV file: {e}") from e
    return rows, [c for c in columns if c not in ("step", "epoch")]


def _read_tensorboard(path: str) -> tuple[dict[int, dict[str, float]], list[str]]:
    try:
        from tensorboard.backend.event_processing.event_accumulator import (  # noqa: PLC0415
            EventAccumulator,
        )
    except ImportError as e:
        raise LogError(
            f"{path}: reading TensorBoard logs needs the tensorboard package, which is not "
            "installed: pip install tensorboard (or log with CSVLogger and pass its folder)"
        ) from e
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    try:
        acc.Reload()
    except Exception as e:  # a corrupt event file raises various errors
        raise LogError(f"{path}: cannot read the TensorBoard events: {e}") from e
    tags = list(acc.Tags().get("scalars", []))
    rows: dict[int, dict[str, float]] = {}
    for tag in tags:
        for ev in acc.Scalars(tag):
            rows.setdefault(int(ev.step), {})[tag] = float(ev.value)
    return rows, tags


def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _param_key(name: str) -> tuple[Any, ...]:
    """Sort key approximating registration order: module path naturally, then weight, bias."""
    prefix, _, leaf = name.rpartition(".")
    return (_natural_key(prefix), {"weight": 0, "bias": 1}.get(leaf, 2), _natural_key(leaf))


def _combine_opt(rows: Mapping[int, Mapping[str, float]], p: float) -> dict[int, dict[str, float]]:
    """Fold ``<key>_opt<i>`` columns into ``<key>`` (norms as p-norms, counters summed)."""
    out: dict[int, dict[str, float]] = {}
    for step, row in rows.items():
        new: dict[str, float] = {}
        parts: dict[str, list[float]] = {}
        for k, v in row.items():
            m = _OPT.match(k)
            if m and "_norm/" not in k and "/max_abs/" not in k:
                parts.setdefault(m.group("base"), []).append(v)
            else:
                new[k] = v
        for base, vals in parts.items():
            if base in new:
                continue
            if "norm" in base:
                if math.isinf(p):
                    new[base] = max(vals)
                else:
                    new[base] = math.fsum(abs(v) ** p for v in vals) ** (1 / p)
            elif base.endswith(("_count", "_steps")):
                new[base] = math.fsum(vals)
            else:
                new[base] = vals[0]
        out[step] = new
    return out


def _p_text(p: float) -> str:
    return "inf" if math.isinf(p) else str(float(p))


def read_log(
    path: str,
    *,
    version: int | None = None,
    fmt: str = "auto",
    norm_type: float | None = None,
    prefix: str = "grad",
    order: Sequence[str] | None = None,
) -> HistoryData:
    """Read a training log into a :class:`gradstab.HistoryData`.

    Args:
        path: a log folder, ``metrics.csv`` or event file (see :func:`find_log`).
        version: pick the log under ``version_<version>``.
        fmt: ``"auto"``, ``"csv"`` or ``"tensorboard"``.
        norm_type: which ``grad_{p}_norm`` keys to read (default: 2 if logged, else the
            first p found).
        prefix: the prefix of gradstab's own keys (``GradStabCallback(log_prefix=...)``).
        order: parameter names in network order (e.g. ``[n for n, _ in
            model.named_parameters()]``); logged names not in it follow, naturally sorted.
            Without it the names are in the log's order (TensorBoard: as first written; CSV:
            sorted by module path), and :attr:`HistoryData.name_order` says so.

    Returns:
        The history: one row per logged step that has any gradient key, missing cells NaN.
        ``nonfinite_step`` marks rows with a NaN/Inf norm and rows where the non-finite
        counter grew since the previous row; ``skipped`` rows where the skip counter grew.

    Raises:
        LogError: no log, no gradient keys, or an unreadable file.

    Example:
        >>> data = read_log("lightning_logs")  # doctest: +SKIP
        >>> data.names[:2]  # doctest: +SKIP
        ['model.0.weight', 'model.0.bias']
    """
    kind, loc = find_log(path, version, fmt)
    rows, columns = _read_csv(loc) if kind == "csv" else _read_tensorboard(loc)
    ps: dict[str, float] = {}
    for c in columns:
        m = _LAYER.match(c) or _TOTAL.match(c)
        if m:
            try:
                ps[m.group("p")] = float(m.group("p"))
            except ValueError:
                continue
    if norm_type is not None:
        want = _p_text(float(norm_type))
        if want not in ps:
            raise LogError(
                f"{loc}: no grad_{want}_norm keys; norm types logged: "
                f"{', '.join(sorted(ps)) or 'none'}"
            )
    elif ps:
        want = "2.0" if "2.0" in ps else sorted(ps)[0]
    else:
        want = "2.0"
    p = float(want)
    rows = _combine_opt(rows, p)
    layer_prefix = f"grad_{want}_norm/"
    names = list(
        dict.fromkeys(c[len(layer_prefix) :] for c in columns if c.startswith(layer_prefix))
    )
    if names == sorted(names):  # CSVLogger sorts its columns: the network order is lost
        names.sort(key=_param_key)
        name_order = "sorted by module path, not the network order"
    elif kind == "csv":
        name_order = "the log's column order"
    else:
        name_order = "as first logged"
    if order is not None:
        pos = {n: i for i, n in enumerate(order)}
        names = sorted(names, key=lambda n: (pos.get(n, len(pos)), _param_key(n)))
        missing = [n for n in names if n not in pos]
        name_order = "network order" + (
            f"; {len(missing)} not in it, at the end" if missing else ""
        )
    total_key = f"grad_{want}_norm_total"
    g = f"{prefix}/"
    keys = {
        "post": g + "post_clip_norm_total",
        "thr": g + "clip_threshold",
        "thr2": g + "max_norm",
        "nf": g + "nonfinite_steps",  # GradStabCallback's key
        "nf2": g + "nonfinite_count",  # older logs
        "skip": g + "skipped_steps",
    }
    grad_keys = {total_key, *keys.values(), g + "clip_rate", g + "clip_coef"}
    steps = sorted(
        s
        for s, row in rows.items()
        if any(k in grad_keys or k.startswith((layer_prefix, g + "max_abs/")) for k in row)
    )
    if not steps:
        raise LogError(
            f"{loc}: no gradient metrics in this log (looked for grad_{{p}}_norm/<param>, "
            f"grad_{{p}}_norm_total and {prefix}/... keys); log them with "
            "GradStabCallback(log_per_layer=True) or lightning.pytorch.utilities.grad_norm"
        )
    s_n, t_n = len(steps), len(names)
    nan = math.nan
    norms = torch.full((s_n, t_n), nan, dtype=torch.float64)
    present = torch.zeros((s_n, t_n), dtype=torch.bool)
    max_abs = torch.full((s_n, t_n), nan, dtype=torch.float64)
    total = torch.full((s_n,), nan, dtype=torch.float64)
    post = torch.full((s_n,), nan, dtype=torch.float64)
    thr = torch.full((s_n,), nan, dtype=torch.float64)
    nf_step = torch.zeros((s_n,), dtype=torch.bool)
    skipped = torch.zeros((s_n,), dtype=torch.bool)
    have_max = have_post = have_thr = have_skip = False
    prev_nf = prev_skip = 0.0
    for r, s in enumerate(steps):
        row = rows[s]
        for i, n in enumerate(names):
            v = row.get(layer_prefix + n)
            if v is not None:
                norms[r, i] = v
                present[r, i] = True
            m = row.get(g + "max_abs/" + n)
            if m is not None:
                max_abs[r, i] = m
                have_max = True
        t = row.get(total_key)
        layer_vals = norms[r][present[r]]
        if t is None and layer_vals.numel():
            if math.isinf(p):
                t = float(layer_vals.max())
            elif bool(torch.isfinite(layer_vals).all()):
                t = math.fsum(float(v) ** p for v in layer_vals.abs().tolist()) ** (1 / p)
            else:
                t = math.inf if not bool(torch.isnan(layer_vals).any()) else math.nan
        if t is not None:
            total[r] = t
            if not math.isfinite(t):
                nf_step[r] = True
        if layer_vals.numel() and not bool(torch.isfinite(layer_vals).all()):
            nf_step[r] = True
        v = row.get(keys["post"])
        if v is not None:
            post[r], have_post = v, True
        v = row.get(keys["thr"], row.get(keys["thr2"]))
        if v is not None:
            thr[r], have_thr = v, True
        v = row.get(keys["nf"], row.get(keys["nf2"]))
        if v is not None:
            if v > prev_nf:
                nf_step[r] = True
            prev_nf = v
        v = row.get(keys["skip"])
        if v is not None:
            have_skip = True
            if v > prev_skip:
                skipped[r] = True
            prev_skip = v
    return HistoryData(
        names=names,
        steps=steps,
        norms=norms,
        present=present,
        total_norm=total,
        max_abs=max_abs if have_max else None,
        post_clip_norm=post if have_post else None,
        clip_threshold=thr if have_thr else None,
        skipped=skipped if have_skip else None,
        nonfinite_step=nf_step,
        norm_type=p,
        source=os.path.relpath(loc) if not os.path.isabs(path) else loc,
        name_order=name_order,
    )
