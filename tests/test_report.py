"""``python -m gradstab report`` and gradstab.diagnosis.plots, on real logs of short Lightning runs.

A small callback of the test's own logs per-layer gradient norms with Lightning's
``grad_norm`` key convention plus gradstab's ``grad/...`` keys (independently of
GradStabCallback), through ``CSVLogger`` or ``TensorBoardLogger``; the report must read the
log back, locate a NaN injected at a known step, find the vanishing first layers of the
sigmoid network, and write PNG files of the documented pixel size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import sys

import pytest
import torch
from torch import nn

import gradstab
from gradstab.__main__ import main
from gradstab.diagnosis import GradHistory
from gradstab.diagnosis.logs import LogError, find_log, read_log

pl = pytest.importorskip("lightning.pytorch")
pytest.importorskip("matplotlib")

DEPTH = 12
STEPS = 24
NAN_STEP = 12


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from the PNG signature and IHDR chunk."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def decoded_shape(path: str) -> tuple[int, ...]:
    import matplotlib.image as mpimg  # noqa: PLC0415

    return tuple(mpimg.imread(path).shape)


class SigmoidNet(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(DEPTH):
            layers.append(nn.Linear(16, 16 if i < DEPTH - 1 else 1))
            if i < DEPTH - 1:
                layers.append(nn.Sigmoid())
        self.net = nn.Sequential(*layers)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)  # other rows of the CSV: empty gradient cells
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def train_dataloader(self):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(STEPS * 8, 16, generator=gen)
        y = torch.randn(STEPS * 8, 1, generator=gen)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


class NormLogger(pl.Callback):
    """Logs grad_2.0_norm/<name>, grad_2.0_norm_total and grad/... keys every step.

    At NAN_STEP it poisons ``net.4.weight``'s gradient, counts it and skips the step.
    """

    def __init__(self) -> None:
        self.nonfinite = 0
        self.skipped = 0
        self.names: list[str] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step
        named = [(n, p) for n, p in pl_module.named_parameters() if p.grad is not None]
        self.names = [n for n, _ in named]
        if step == NAN_STEP:
            pl_module.net[4].weight.grad[0, 0] = float("nan")
        metrics = {}
        for n, p in named:
            metrics[f"grad_2.0_norm/{n}"] = p.grad.norm().item()
            metrics[f"grad/max_abs/{n}"] = p.grad.abs().max().item()
        total = torch.linalg.vector_norm(torch.stack([p.grad.norm() for _, p in named])).item()
        metrics["grad_2.0_norm_total"] = total
        if not math.isfinite(total):
            self.nonfinite += 1
            self.skipped += 1
            for _, p in named:
                p.grad = None  # skip the step
            metrics["grad/post_clip_norm_total"] = 0.0
        else:
            metrics["grad/post_clip_norm_total"] = min(total, 1.0)
            torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        metrics["grad/nonfinite_steps"] = float(self.nonfinite)
        metrics["grad/skipped_steps"] = float(self.skipped)
        metrics["grad/clip_rate"] = float(total > 1.0)
        metrics["grad/clip_threshold"] = 1.0
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


def _fit(root: str, logger_cls) -> list[str]:
    torch.manual_seed(0)
    cb = NormLogger()
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=logger_cls(root),
        callbacks=[cb],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(SigmoidNet())
    return cb.names


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    from lightning.pytorch.loggers import CSVLogger  # noqa: PLC0415

    root = str(tmp_path_factory.mktemp("csvlogs"))
    names = _fit(root, CSVLogger)
    return root, names


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger  # noqa: PLC0415

    root = str(tmp_path_factory.mktemp("tblogs"))
    names = _fit(root, TensorBoardLogger)
    return root, names


def _check_data(data, names):
    assert data.names == names  # network order restored from the sorted CSV columns
    assert data.steps == list(range(STEPS))
    assert bool(data.present.all())
    assert data.nonfinite_step.nonzero().flatten().tolist() == [NAN_STEP]
    assert data.skipped is not None and data.skipped.nonzero().flatten().tolist() == [NAN_STEP]
    assert data.clip_threshold is not None and set(data.clip_threshold.tolist()) == {1.0}
    assert data.max_abs is not None and data.post_clip_norm is not None
    i = names.index("net.4.weight")
    assert math.isnan(data.norms[NAN_STEP, i])
    assert math.isfinite(data.norms[NAN_STEP + 1, i])


def _check_diagnosis(d):
    nf = d.nonfinite
    assert nf is not None and nf.exact
    assert nf.step == NAN_STEP and nf.origin == "net.4.weight" and nf.steps == [NAN_STEP]
    assert d.skipped_steps == [NAN_STEP]
    assert d.vanishing_gradients
    assert "net.0.weight" in d.vanishing and f"net.{2 * (DEPTH - 1)}.weight" not in d.vanishing


def _check_pngs(out: str):
    heat = os.path.join(out, "grad_norm_heatmap.png")
    total = os.path.join(out, "total_norm.png")
    assert png_size(heat) == (1200, 800)
    assert png_size(total) == (1200, 500)
    assert decoded_shape(heat)[:2] == (800, 1200)
    assert decoded_shape(total)[:2] == (500, 1200)


def test_report_on_a_real_csv_log(csv_run, tmp_path, capsys):
    root, names = csv_run
    kind, loc = find_log(root)
    assert kind == "csv" and loc.endswith(os.path.join("version_0", "metrics.csv"))
    data = read_log(root)
    _check_data(data, names)
    _check_diagnosis(gradstab.diagnose(data))

    out = str(tmp_path / "out")
    js = str(tmp_path / "d.json")
    rc = main(["report", root, "--out", out, "--json", js])
    printed = capsys.readouterr().out
    assert rc == 0
    assert f"non-finite gradients first at step {NAN_STEP} in 'net.4.weight'" in printed
    assert "vanishing" in printed and "net.0.weight" in printed
    assert "grad_norm_heatmap.png" in printed
    _check_pngs(out)
    with open(js) as fh:
        blob = json.load(fh)
    assert blob["nonfinite"]["step"] == NAN_STEP and blob["healthy"] is False
    # prescriptions from the log alone: a log has no model, so the vanishing cause stays open
    # and the missing evidence is named; the NaN at NAN_STEP came without a rise of the norm
    kinds = [p["kind"] for p in blob["prescriptions"]]
    assert kinds == ["skip-nonfinite", "need-model"], kinds
    assert blob["prescriptions"][0]["evidence"]["first_step"] == NAN_STEP
    assert blob["evidence_missing"] and "model" in blob["evidence_missing"][0]
    assert "prescriptions (hypotheses to try" in printed and "not checked: the model" in printed
    assert main(["report", root, "--no-plots", "--strict"]) == 1


def test_report_on_a_real_tensorboard_log(tb_run, tmp_path, capsys):
    root, names = tb_run
    kind, _ = find_log(root)
    assert kind == "tensorboard"
    data = read_log(root, fmt="tensorboard")
    _check_data(data, names)
    _check_diagnosis(gradstab.diagnose(data))
    out = str(tmp_path / "tbout")
    assert main(["report", root, "--format", "tensorboard", "--out", out]) == 0
    assert f"first at step {NAN_STEP}" in capsys.readouterr().out
    _check_pngs(out)


def test_version_choice_and_newest_log(csv_run, tmp_path):
    root, _ = csv_run
    logs = tmp_path / "lightning_logs"
    src = os.path.join(root, "lightning_logs", "version_0", "metrics.csv")
    for v, mtime in ((3, 1_000_000), (10, 2_000_000), (7, 3_000_000)):
        d = logs / f"version_{v}"
        d.mkdir(parents=True)
        shutil.copy(src, d / "metrics.csv")
        os.utime(d / "metrics.csv", (mtime, mtime))
    assert find_log(str(tmp_path))[1].endswith(os.path.join("version_7", "metrics.csv"))
    assert find_log(str(tmp_path), version=10)[1].endswith(
        os.path.join("version_10", "metrics.csv")
    )
    with pytest.raises(
        LogError, match=r"no metrics\.csv files under a version_4 folder; versions found: 3, 7, 10"
    ):
        find_log(str(tmp_path), version=4, fmt="csv")
    # a file path is taken as it is
    assert find_log(src) == ("csv", src)


def test_sparse_csv_with_a_subset_of_keys(tmp_path):
    # Lightning's grad_norm keys only (no total, no gradstab keys), inf norm variant too,
    # rows of other metrics in between, columns sorted by name as CSVLogger writes them
    names = ["layers.2.weight", "layers.10.weight", "layers.1.weight", "layers.0.weight"]
    cols = sorted([f"grad_2.0_norm/{n}" for n in names] + [f"grad_inf_norm/{n}" for n in names])
    path = tmp_path / "metrics.csv"
    lines = [",".join(["epoch", *cols, "step", "train_loss"])]
    for s in range(0, 12, 2):
        vals = {
            f"grad_2.0_norm/layers.{k}.weight": 10.0 ** (-6 if k == 0 else 0) for k in (0, 1, 2, 10)
        }
        vals.update({f"grad_inf_norm/layers.{k}.weight": 0.5 for k in (0, 1, 2, 10)})
        if s == 6:
            vals["grad_2.0_norm/layers.2.weight"] = math.inf
        lines.append(",".join(["0", *(repr(vals[c]) for c in cols), str(s), ""]))
        lines.append(",".join(["0", *([""] * len(cols)), str(s), "0.5"]))
    path.write_text("\n".join(lines) + "\n")
    data = read_log(str(path))
    assert data.names == [
        "layers.0.weight",
        "layers.1.weight",
        "layers.2.weight",
        "layers.10.weight",
    ]
    assert data.steps == [0, 2, 4, 6, 8, 10] and data.norm_type == 2.0
    assert data.total_norm[0].item() == pytest.approx(math.sqrt(3 + 1e-12))
    assert math.isinf(data.total_norm[3].item())
    d = gradstab.diagnose(data)
    assert d.vanishing == ["layers.0.weight"]
    assert d.nonfinite.step == 6 and d.nonfinite.origin == "layers.2.weight"
    inf_data = read_log(str(path), norm_type=math.inf)
    assert inf_data.norm_type == math.inf and float(inf_data.total_norm[0]) == 0.5
    with pytest.raises(LogError, match=r"no grad_1.0_norm keys; norm types logged: 2.0, inf"):
        read_log(str(path), norm_type=1)


def test_counter_only_nonfinite_is_reported_between_logged_steps(tmp_path):
    path = tmp_path / "metrics.csv"
    rows = ["grad/nonfinite_count,grad_2.0_norm/a,grad_2.0_norm/b,grad_2.0_norm/c,step"]
    for s, count in ((0, 0), (5, 0), (10, 2), (15, 2)):
        rows.append(f"{count},1.0,1.0,1.0,{s}")
    path.write_text("\n".join(rows) + "\n")
    d = gradstab.diagnose(read_log(str(tmp_path)))
    assert d.nonfinite is not None and d.nonfinite.step == 10 and not d.nonfinite.exact
    assert d.nonfinite.origin is None
    assert "by step 10 (between logged steps)" in str(d)


def test_report_errors_are_clear(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no metrics.csv or TensorBoard event files found" in capsys.readouterr().err
    bad = tmp_path / "nograd"
    bad.mkdir()
    (bad / "metrics.csv").write_text("epoch,step,train_loss\n0,0,1.0\n")
    assert main(["report", str(bad)]) == 2
    assert "no gradient metrics in this log" in capsys.readouterr().err
    nostep = tmp_path / "nostep"
    nostep.mkdir()
    (nostep / "metrics.csv").write_text("a,b\n1,2\n")
    assert main(["report", str(nostep)]) == 2
    assert "no 'step' column" in capsys.readouterr().err


def test_missing_tensorboard_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "events.out.tfevents.123.host").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "tensorboard.backend.event_processing.event_accumulator", None)
    assert main(["report", str(tmp_path), "--no-plots"]) == 2
    assert "needs the tensorboard package" in capsys.readouterr().err


def test_missing_matplotlib_is_named(tmp_path, monkeypatch, csv_run, capsys):
    from gradstab.diagnosis import plots  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r'pip install "gradstab\[plot\]"'):
        plots.require_matplotlib()
    root, _ = csv_run
    assert main(["report", root, "--out", str(tmp_path / "o")]) == 1
    captured = capsys.readouterr()
    assert "non-finite" in captured.out  # the diagnosis is still printed
    assert 'pip install "gradstab[plot]"' in captured.err and "--no-plots" in captured.err
    assert not (tmp_path / "o").exists()


def test_plots_of_a_grad_history(tmp_path):
    from gradstab.diagnosis.plots import plot_history, plot_layer_heatmap, plot_total_norm  # noqa: PLC0415

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    h = GradHistory(model)
    for s in range(12):
        model.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        if s == 5:
            model[2].weight.grad[0, 0] = float("nan")
        if s == 7:
            model[4].bias.grad.zero_()
        h.record_step(s, post_clip_norm=0.5, clip_threshold=1.0, skipped=(s == 5))
    paths = h.plot(str(tmp_path / "a"))
    assert [os.path.basename(p) for p in paths] == ["grad_norm_heatmap.png", "total_norm.png"]
    _check_pngs(str(tmp_path / "a"))
    # custom size and dpi give exactly that many pixels
    p = plot_layer_heatmap(h.data(), str(tmp_path / "b" / "h.png"), size=(6, 4), dpi=50)
    assert png_size(p) == (300, 200)
    p = plot_total_norm(h.data(), str(tmp_path / "t.png"), size=(5, 2), dpi=80)
    assert png_size(p) == (400, 160)
    # an empty history still gives a picture
    empty = GradHistory(model).data()
    assert len(plot_history(empty, str(tmp_path / "empty"))) == 2
    _check_pngs(str(tmp_path / "empty"))


def test_total_norm_plot_draws_post_clip_curve_only_when_something_was_clipped(
    tmp_path, monkeypatch
):
    from gradstab.diagnosis import plots  # noqa: PLC0415

    labels: list[list[str]] = []
    save = plots._save

    def capture(fig, path):
        labels.append([line.get_label() for ax in fig.axes for line in ax.get_lines()])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    for name, clip in [("monitor", False), ("clipped", True)]:
        h = GradHistory(model)
        for s in range(6):
            model.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            total = gradstab.grad_stats(model.parameters()).total_norm
            h.record_step(s, post_clip_norm=torch.clamp(total, max=1e-3) if clip else total)
        plots.plot_total_norm(h.data(), str(tmp_path / f"{name}.png"))
    assert "after clipping" not in labels[0]
    assert "after clipping" in labels[1]


class _PoisonGrad(pl.Callback):
    """Puts a NaN into ``net.4.weight``'s gradient at NAN_STEP (before gradstab's callback)."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == NAN_STEP:
            pl_module.net[4].weight.grad[0, 0] = float("nan")


def test_report_on_a_gradstab_callback_log(tmp_path, capsys):
    """End to end: GradStabCallback's own CSV keys are what the report reads."""
    from lightning.pytorch.loggers import CSVLogger  # noqa: PLC0415

    torch.manual_seed(0)
    root = str(tmp_path / "logs")
    cb = gradstab.GradStabCallback(
        max_norm=1.0, nonfinite="skip", log_per_layer=True, log_every_n_steps=1
    )
    trainer = pl.Trainer(
        max_steps=STEPS,
        logger=CSVLogger(root),
        callbacks=[_PoisonGrad(), cb],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(SigmoidNet())
    assert cb.counters()["skipped_steps"] == 1
    data = read_log(root)
    assert data.nonfinite_step.nonzero().flatten().tolist() == [NAN_STEP]
    assert data.skipped is not None and data.skipped.nonzero().flatten().tolist() == [NAN_STEP]
    assert data.clip_threshold is not None and set(data.clip_threshold.tolist()) == {1.0}
    d = gradstab.diagnose(data)
    assert d.nonfinite is not None and d.nonfinite.step == NAN_STEP
    assert d.nonfinite.origin == "net.4.weight"
    assert d.skipped_steps == [NAN_STEP]
    rc = main(["report", root, "--no-plots"])
    assert rc == 0
    assert f"non-finite gradients first at step {NAN_STEP}" in capsys.readouterr().out


GPT2_ORDER = [
    "transformer.wte.weight",
    "transformer.wpe.weight",
    "transformer.h.0.attn.c_attn.weight",
    "transformer.h.0.mlp.c_fc.weight",
    "transformer.h.1.attn.c_attn.weight",
    "transformer.h.1.mlp.c_fc.weight",
    "transformer.ln_f.weight",
]


def _gpt2_csv(tmp_path) -> str:
    """A CSVLogger-style log (columns sorted by name) of GPT-2-like parameter names."""
    cols = sorted(f"grad_2.0_norm/{n}" for n in GPT2_ORDER)
    lines = [",".join(["epoch", *cols, "step"])]
    for s in range(6):
        lines.append(",".join(["0", *(["1.0"] * len(cols)), str(s)]))
    path = tmp_path / "metrics.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _ylabels(monkeypatch) -> list[str]:
    from matplotlib.axes import Axes  # noqa: PLC0415

    labels: list[str] = []
    real = Axes.set_ylabel
    monkeypatch.setattr(
        Axes, "set_ylabel", lambda self, text, *a, **k: (labels.append(text), real(self, text))[1]
    )
    return labels


def _rows(labels: list[str]) -> list[str]:
    """The heatmap's row-axis label among the y labels set (colour bars have their own)."""
    return [t for t in labels if t.startswith("parameter")]


def test_csv_log_order_is_labelled_for_what_it_is(tmp_path, monkeypatch, capsys):
    """CSVLogger sorts its columns: GPT-2's wte/wpe end up after the blocks, so the heatmap must
    not call the rows "network order"; --order FILE gives the real order."""
    path = _gpt2_csv(tmp_path)
    data = read_log(path)
    assert data.names.index("transformer.wte.weight") > data.names.index(
        "transformer.h.1.mlp.c_fc.weight"
    )
    assert data.name_order == "sorted by module path, not the network order"
    labels = _ylabels(monkeypatch)
    assert main(["report", path, "--out", str(tmp_path / "plain")]) == 0
    assert _rows(labels) == ["parameter (sorted by module path, not the network order)"]
    printed = capsys.readouterr().out
    assert "Parameter order: sorted by module path, not the network order" in printed
    assert "--order FILE" in printed
    # the true order from a file: rows and label follow it, no note
    order = tmp_path / "names.txt"
    order.write_text("# GPT-2\n" + "\n".join(GPT2_ORDER) + "\n")
    labels.clear()
    assert main(["report", path, "--order", str(order), "--out", str(tmp_path / "o")]) == 0
    assert _rows(labels) == ["parameter (network order)"]
    assert "Parameter order:" not in capsys.readouterr().out
    assert read_log(path, order=GPT2_ORDER).names == GPT2_ORDER
    partial = read_log(path, order=GPT2_ORDER[:2])
    assert partial.names[:2] == GPT2_ORDER[:2]
    assert partial.name_order == "network order; 5 not in it, at the end"


def test_report_order_file_errors(tmp_path, capsys):
    path = _gpt2_csv(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    assert main(["report", path, "--order", str(empty), "--no-plots"]) == 2
    assert "no parameter names in it" in capsys.readouterr().err
    assert main(["report", path, "--order", str(tmp_path / "missing.txt"), "--no-plots"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_grad_history_heatmap_is_labelled_network_order(tmp_path, monkeypatch):
    from gradstab.diagnosis.plots import plot_layer_heatmap  # noqa: PLC0415

    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    h = GradHistory(model)
    model(torch.randn(8, 4)).sum().backward()
    h.record_step(0)
    labels = _ylabels(monkeypatch)
    plot_layer_heatmap(h.data(), str(tmp_path / "h.png"))
    assert _rows(labels) == ["parameter (network order)"]
