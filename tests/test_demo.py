"""``python -m gradstab demo``: the tiny demo end to end, its results against independent checks."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import Callback

import gradstab
from gradstab.__main__ import main
from gradstab.tools import demo
from gradstab.tools.demo import lightning as lt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture
def one_thread():
    """One torch thread, as the demo runs (these small models are slowest with more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny demo of all five runs, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    rc = main(["demo", "--tiny", "--no-progress-bar", "--out", str(out), "--seed", "0"])
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    assert rc == 0
    results = demo.command.last_results
    assert results is not None
    return results, out


def test_runs_get_the_verdicts_they_are_designed_for(tiny):
    results, _ = tiny
    runs = results.runs
    assert list(runs) == ["a", "b", "c", "d", "e"]
    a, b, c, d, e = (runs[k] for k in "abcde")
    # (a) vanishing: the first layer's gradient is decades below the last one's
    assert a.diagnosis.vanishing_gradients and "vanishing" in a.verdict
    assert a.diagnosis.depth_trend is not None and a.diagnosis.depth_trend.direction == "vanishing"
    assert a.min_layer == "model.0.weight" and a.spread_decades > 3
    # (b), (d) and (e) healthy and learning (chance is 10%)
    for r in (b, d, e):
        assert r.diagnosis.healthy and r.verdict == "healthy"
        assert r.accuracy is not None and r.accuracy > 0.3
        assert math.isfinite(r.final_loss) and r.final_loss < r.losses[0]
        assert r.steps_run == r.steps_planned == demo.runs.TINY["steps"]
    # (c) exploding: non-finite gradients and a huge total norm before them
    assert c.diagnosis.exploding or c.diagnosis.nonfinite is not None
    assert c.diagnosis.nonfinite is not None and c.first_nonfinite_loss is not None
    assert c.accuracy is None and math.isnan(c.final_loss)
    assert all(r.as_expected for r in runs.values())
    # only (d) and (e) clip
    assert a.clipped_steps is None and b.clipped_steps is None and c.skipped_steps is None
    for r in (d, e):
        assert 0 < r.clipped_steps <= r.steps_run and r.skipped_steps == 0
    assert a.threshold_min is None and c.threshold_max is None
    assert d.threshold_min == d.threshold_max == results.config.max_norm
    assert d.threshold_cap is None and e.threshold_cap == results.config.max_norm
    # the monitor-only callback counts the non-finite steps of (c)
    assert c.nonfinite_steps == int(c.history.nonfinite_step.sum()) >= 1
    assert a.nonfinite_steps == 0


def test_c_d_and_e_start_from_the_same_weights_and_batch(tiny):
    results, _ = tiny
    c, d, e = (results.runs[k] for k in "cde")
    assert c.losses[0] == d.losses[0] == e.losses[0]
    assert c.initial_total_norm == d.initial_total_norm == e.initial_total_norm
    assert c.initial_total_norm > 10 * results.config.max_norm
    torch.testing.assert_close(c.history.norms[0], d.history.norms[0], rtol=0, atol=0)
    torch.testing.assert_close(c.history.norms[0], e.history.norms[0], rtol=0, atol=0)


def test_first_step_statistics_match_plain_pytorch(tiny):
    """Rebuild run (c)'s model and first batch; per-layer norms from torch in float64."""
    results, _ = tiny
    cfg = results.config
    x, y = demo.make_data(cfg.n_train, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = demo.exploding_mlp(cfg.depth, cfg.width, init_gain=cfg.init_gain)
    bx, by = next(iter(demo.runs._loader(x, y, cfg)))
    loss = torch.nn.functional.cross_entropy(model(bx), by)
    loss.backward()
    hist = results.runs["c"].history
    expected = torch.stack(
        [torch.linalg.vector_norm(p.grad.double()) for _, p in model.named_parameters()]
    )
    # the callback's history names the LightningModule's parameters (the net is its .model)
    assert hist.names == [f"model.{n}" for n, _ in model.named_parameters()]
    torch.testing.assert_close(hist.norms[0], expected, rtol=1e-5, atol=0)
    total = torch.linalg.vector_norm(expected)
    assert math.isclose(results.runs["c"].initial_total_norm, float(total), rel_tol=1e-5)
    assert math.isclose(results.runs["c"].losses[0], float(loss), rel_tol=1e-6)


@pytest.mark.parametrize("key", ["d", "e"])
def test_clip_counts_agree_with_the_recorded_norms(tiny, key):
    results, _ = tiny
    r = results.runs[key]
    h = r.history
    max_norm = results.config.max_norm
    assert h.clip_threshold is not None and h.post_clip_norm is not None
    thr = h.clip_threshold
    assert bool((thr <= max_norm).all()) and bool((thr > 0).all())  # max_norm caps it
    assert r.threshold_min == float(thr.min()) and r.threshold_max == float(thr.max())
    # a step is clipped exactly when its pre-clip norm exceeds the threshold (eps 1e-6)
    assert int((h.total_norm > thr).sum()) == r.clipped_steps
    assert bool((h.post_clip_norm <= thr * (1 + 1e-5)).all())
    unclipped = h.total_norm <= thr
    torch.testing.assert_close(h.post_clip_norm[unclipped], h.total_norm[unclipped])
    assert not bool(h.skipped.any())


def percentile_oracle(total_norm: torch.Tensor, percentile: float, cap: float) -> np.ndarray:
    """Run (e)'s threshold at each step from numpy: the percentile of the earlier norms."""
    norms = total_norm.numpy()
    out = [cap]  # no earlier norm: the cap
    out += [min(cap, float(np.percentile(norms[:t], percentile))) for t in range(1, len(norms))]
    return np.array(out)


def test_adaptive_threshold_adapts_below_its_cap(tmp_path):
    """Run (e) long enough for the percentile to come below the cap (the tiny demo is not)."""
    rc = main(["demo", "--tiny", "--steps", "250", "--runs", "e", "--no-plots",
               "--no-progress-bar", "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    cfg = demo.command.last_results.config
    e = demo.command.last_results.runs["e"]
    h = e.history
    # the threshold in force at each step is the numpy percentile of the earlier norms, capped
    expected = percentile_oracle(h.total_norm, cfg.percentile, cfg.max_norm)
    np.testing.assert_allclose(h.clip_threshold.numpy(), expected, rtol=1e-12)
    below = np.flatnonzero(expected < cfg.max_norm)
    assert e.below_cap_steps == len(below) > 0
    assert e.first_below_cap == h.steps[below[0]]
    assert e.threshold_min == float(expected.min()) < cfg.max_norm
    assert e.verdict == "healthy" and e.accuracy is not None and e.accuracy > 0.5
    sentence = demo.conclusions(demo.command.last_results)[-1]
    assert f"went below it from step {e.first_below_cap} on" in sentence
    assert f"below the cap of 2 at {e.below_cap_steps} of 250 steps" in demo.run_table(e)


def test_tiny_adaptive_run_is_the_fixed_run_and_says_so(tiny):
    """In 40 steps the percentile never comes below the cap: (e) clips exactly as (d)."""
    results, _ = tiny
    d, e = results.runs["d"], results.runs["e"]
    expected = percentile_oracle(e.history.total_norm, results.config.percentile, 2.0)
    assert bool((torch.from_numpy(expected) == 2.0).all()) and e.below_cap_steps == 0
    assert e.losses == d.losses and e.clipped_steps == d.clipped_steps
    torch.testing.assert_close(e.history.norms, d.history.norms, rtol=0, atol=0)
    sentence = demo.conclusions(results)[-1]
    assert "never went below its cap of 2" in sentence and "added nothing here" in sentence


class NormOracle(Callback):
    """Records float64 gradient norms with torch itself at each optimizer step.

    Placed before the GradStabCallback it sees the pre-clip gradients, after it the clipped
    ones (Lightning calls ``on_before_optimizer_step`` in list order).
    """

    def __init__(self, module):
        self.module = module
        self.rows = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows.append(
            [
                math.nan if p.grad is None else float(torch.linalg.vector_norm(p.grad.double()))
                for _, p in self.module.named_parameters()
            ]
        )


@pytest.mark.parametrize("key", ["c", "d", "e"])
def test_the_callbacks_history_equals_float64_norms(key, one_thread):
    """The history each run reads is GradStabCallback's own, and its numbers are torch's."""
    cfg = demo.DemoConfig(steps=12, n_train=256, n_val=64, plots=False, progress_bar=False)
    x, y = demo.make_data(cfg.n_train, cfg.seed)
    module = lt.Classifier(demo.runs._build_model(key, cfg), cfg.lr)
    parts = lt.build_callbacks(capacity=cfg.steps, max_norm=demo.runs._clip_for(key, cfg))
    assert parts.callbacks == [parts.callback]  # one callback records and clips: no recorder
    assert isinstance(parts.callback, gradstab.GradStabCallback)
    assert parts.callback.mode == (None if key == "c" else "norm")
    assert (parts.clipper is None) == (key == "c") and parts.history() is None
    pre, post = NormOracle(module), NormOracle(module)
    with lt.quiet_lightning():
        lt.fit(module, demo.runs._loader(x, y, cfg), [pre, *parts.callbacks, post], steps=cfg.steps,
               progress_bar=False)  # fmt: skip
    h = parts.history().data()
    assert parts.history() is parts.callback.history
    assert h.names == [n for n, _ in module.named_parameters()] and h.steps == list(range(12))
    expected = torch.tensor(pre.rows, dtype=torch.float64)
    finite = torch.isfinite(expected)
    torch.testing.assert_close(h.norms[finite], expected[finite], rtol=1e-5, atol=0)
    assert bool((~torch.isfinite(h.norms) == ~finite).all())  # NaN/Inf where torch has them
    if key != "c":
        clipped = torch.tensor(post.rows, dtype=torch.float64)
        total = torch.linalg.vector_norm(clipped, dim=1)
        torch.testing.assert_close(h.post_clip_norm, total, rtol=1e-5, atol=0)
    # the fit-end diagnosis is of this history
    assert parts.callback.diagnosis is not None and parts.callback.diagnosis.steps == 12


def test_a_run_reads_the_callbacks_history_and_diagnosis(monkeypatch, one_thread):
    made = []
    build = lt.build_callbacks

    def spy(**kwargs):
        made.append(build(**kwargs))
        return made[-1]

    monkeypatch.setattr(lt, "build_callbacks", spy)
    cfg = demo.DemoConfig(steps=10, n_train=256, n_val=64, plots=False, progress_bar=False)
    r = demo.train_run("a", cfg)
    (parts,) = made
    assert r.diagnosis is parts.callback.diagnosis
    torch.testing.assert_close(r.history.norms, parts.callback.history.data().norms)
    assert r.verdict_end == demo.verdict(parts.callback.diagnose(window=demo.runs.END_WINDOW))


@pytest.mark.parametrize("seed", [1, 2])
def test_runs_get_their_verdicts_on_other_seeds(seed, capsys):
    rc = main(["demo", "--tiny", "--no-plots", "--no-progress-bar", "--seed", str(seed)])
    assert rc == 0
    runs = demo.command.last_results.runs
    assert [r.verdict for r in runs.values()] == [
        "vanishing", "healthy", "non-finite, exploding", "healthy", "healthy"
    ]  # fmt: skip
    assert all(r.as_expected for r in runs.values())


def test_layer_norm_extremes_come_from_the_diagnosis(tiny):
    results, _ = tiny
    for r in results.runs.values():
        weights = {
            lr.name: lr.median_norm
            for lr in r.diagnosis.layers
            if lr.name.endswith("weight") and math.isfinite(lr.median_norm)
        }
        if r.info.key == "b":  # LayerNorm weights are 1-D: not weight matrices
            weights = {n: v for n, v in weights.items() if int(n.split(".")[1]) % 3 == 0}
        assert r.min_layer_norm == min(weights.values()) == weights[r.min_layer]
        assert r.max_layer_norm == max(weights.values()) == weights[r.max_layer]


def test_pictures_are_written_and_decode(tiny):
    mpimg = pytest.importorskip("matplotlib.image")
    results, out = tiny
    files = sorted(os.listdir(out))
    assert len(files) == 10
    for r in results.runs.values():
        assert len(r.plots) == 2
        heat, total = r.plots
        assert os.path.dirname(heat) == str(out)
        assert mpimg.imread(heat).shape[:2] == (800, 1200)
        assert mpimg.imread(total).shape[:2] == (500, 1200)


def test_printed_tables_show_the_measured_numbers(tiny, capsys):
    results, _ = tiny
    text = "\n\n".join(demo.run_table(r) for r in results.runs.values())
    text += "\n" + demo.comparison_table(results)
    for r in results.runs.values():
        assert f"{r.steps_run} of {r.steps_planned}" in text
        assert f"{r.steps_run}/{r.steps_planned}" in text
        if r.accuracy is not None:
            assert f"{100 * r.accuracy:.1f}%" in text
    for key in "de":
        r = results.runs[key]
        assert f"{r.clipped_steps} / {r.skipped_steps} of {r.steps_run}" in text
    assert "2 (fixed)" in text and "2 (the cap) at every step" in text
    assert "PercentileThreshold(percentile=10.0, include_current=False, max_norm=2.0)" in text
    assert "VANISHING" in text and "NON-FINITE" in text
    sentences = demo.conclusions(results)
    assert len(sentences) == 3 and "vanishing -> healthy" in sentences[0]
    assert sentences[1].startswith("(c) -> (d)") and sentences[2].startswith("(e)")


def test_the_table_prescribes_for_a_and_c_and_b_and_d_apply_it(tiny):
    results, _ = tiny
    a, b, c, d = (results.runs[k] for k in "abcd")
    table = demo.comparison_table(results)
    rows = {line.split(")")[0] + ")": line for line in table.splitlines() if line.startswith("(")}
    # (a): Sigmoid -> ReLU, LayerNorm, init, derived from (a)'s own modules
    rx_a = {p.kind: p for p in a.diagnosis.prescriptions}
    assert [p.kind for p in a.diagnosis.prescriptions][:3] == [
        "activation",
        "normalization",
        "init",
    ]
    sig = rx_a["activation"].evidence["activations"]
    assert sig == [f"model.{2 * i + 1}" for i in range(results.config.depth)]  # the Sigmoids
    assert "1 ReLU for Sigmoid, 2 LayerNorm, 3 init_model_" in rows["(a)"]
    # (b) is built by exactly those remedies: no Sigmoid, LayerNorms, init_model_'s scale
    fixed = demo.fixed_mlp(results.config.depth, results.config.width)
    assert not any(isinstance(m, torch.nn.Sigmoid) for m in fixed.modules())
    assert any(isinstance(m, torch.nn.LayerNorm) for m in fixed.modules())
    assert rows["(b)"].endswith("applies (a)'s 1, 2, 3")
    # (c): a clip threshold from its healthy steps; numpy on the recorded norms agrees
    clip = c.diagnosis.prescriptions[0]
    assert clip.kind == "clip"
    total = c.history.total_norm.numpy()
    assert all(s < c.first_nonfinite_loss for s in clip.evidence["healthy_steps"])
    healthy = total[clip.evidence["healthy_steps"]]
    p95 = float(np.percentile(healthy, 95))
    assert p95 <= clip.evidence["threshold"] <= 1.01 * p95
    assert clip.evidence["nonfinite_steps"] == int((~np.isfinite(total)).sum()) > 0
    how = "adaptive <= " if clip.evidence["adaptive"] else "at "  # adaptive: few healthy steps
    assert clip.evidence["adaptive"] == (len(clip.evidence["healthy_steps"]) < 8)
    assert f"1 clip {how}{clip.evidence['threshold']:g} + skip" in rows["(c)"]
    assert rows["(d)"].endswith("applies (c)'s 1")
    assert d.threshold_min == results.config.max_norm
    sentences = demo.conclusions(results)
    assert "(a)'s prescriptions 1, 2, 3" in sentences[0]
    assert f"prescribed threshold {clip.evidence['threshold']:g}" in sentences[1]
    # the run tables print each prescription with its call
    assert 'gradstab.norm.add_normalization_(model, kind="layer")' in demo.run_table(a)
    assert clip.call in demo.run_table(c)
    for r in (b, d):
        assert r.diagnosis.prescriptions == []


def test_run_selection_without_plots(tmp_path, capsys):
    out = tmp_path / "none"
    rc = main(["demo", "--tiny", "--steps", "12", "--runs", "c,a", "--no-plots",
               "--no-progress-bar", "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = demo.command.last_results
    assert list(res.runs) == ["c", "a"]
    assert all(r.steps_planned == 12 and not r.plots for r in res.runs.values())
    assert not out.exists()
    printed = capsys.readouterr().out
    assert "(c) deep ReLU MLP" in printed and "Comparison" in printed
    assert "(b)" not in printed.split("Comparison")[1]


def test_progress_is_plain_lines_when_stdout_is_no_terminal(tmp_path, capsys, one_thread):
    """Piped to a file, the progress is a line per tenth of a run, not a bar's redraws."""
    rc = main(["demo", "--tiny", "--steps", "20", "--runs", "a", "--no-plots",
               "--out", str(tmp_path)])  # fmt: skip
    assert rc == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "\r" not in printed and "it/s" not in printed
    lines = [ln for ln in printed.splitlines() if ln.startswith("  (a) vanishing: step")]
    assert [ln.split(",")[0] for ln in lines] == [
        f"  (a) vanishing: step {s}/20" for s in range(2, 21, 2)
    ]
    assert all(", loss " in ln for ln in lines)


def test_the_exploding_run_prints_no_warning(tmp_path, one_thread):
    """Run (c) lets NaN steps through on purpose; the callback's fit-end warning about them
    would only repeat the demo's table."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert main(["demo", "--tiny", "--runs", "c", "--no-plots", "--no-progress-bar"]) == 0
    assert not [str(w.message) for w in seen if "GradStab" in str(w.message)]
    assert demo.command.last_results.runs["c"].first_nonfinite_loss is not None


def test_without_matplotlib_the_tables_still_print(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo.command, "_matplotlib_available", lambda: False)
    rc = main(["demo", "--tiny", "--steps", "8", "--runs", "a", "--no-progress-bar",
               "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and "gradstab[demo]" in printed
    assert "diagnosis" in printed and "Comparison" in printed
    assert demo.command.last_results.plots_note is not None
    assert not (tmp_path / "p").exists()


def test_a_bad_percentile_is_refused(capsys):
    assert main(["demo", "--tiny", "--percentile", "150"]) == 2
    assert "percentile must be a number in [0, 100], got 150.0" in capsys.readouterr().err


def test_without_lightning_a_clear_message(monkeypatch, capsys):
    def missing():
        raise ImportError(demo.runs._INSTALL_LIGHTNING)

    monkeypatch.setattr(demo.runs, "_require_lightning", missing)
    assert main(["demo", "--tiny"]) == 2
    err = capsys.readouterr().err
    assert "needs Lightning" in err and "gradstab[demo]" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs", "a,x"], "--runs"),
        (["--runs", ""], "--runs"),
        (["--steps", "0"], "integer >= 1"),
        (["--threads", "zero"], "integer >= 1"),
        (["--runs", "a,f"], "a,b,c,d,e"),
        (["--percentile", "ten"], "--percentile"),
    ],
)
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="max_norm"):
        demo.DemoConfig(max_norm=0.0)
    with pytest.raises(ValueError, match="runs"):
        demo.DemoConfig(runs=("f",))
    with pytest.raises(ValueError, match="percentile"):
        demo.DemoConfig(percentile=101.0)
    with pytest.raises(ValueError, match="steps"):
        demo.DemoConfig(steps=0)


def test_data_and_builders():
    x, y = demo.make_data(2000, seed=3)
    x2, y2 = demo.make_data(2000, seed=3)
    xv, _ = demo.make_data(2000, seed=3, split=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, xv)
    assert set(y.tolist()) == set(range(demo.models.CLASSES))
    torch.manual_seed(0)
    net = demo.exploding_mlp(4, 256, init_gain=2.0)
    std = float(net[2].weight.std())
    assert abs(std * math.sqrt(256) - 2.0) < 0.05
    assert all(float(m.bias.abs().max()) == 0 for m in net if isinstance(m, torch.nn.Linear))
    fixed = demo.fixed_mlp(3, 64)
    kinds = [type(m).__name__ for m in fixed]
    assert kinds == ["Linear", "LayerNorm", "ReLU"] * 3 + ["Linear"]
    assert abs(float(fixed[3].weight.std()) * math.sqrt(64) - math.sqrt(2)) < 0.1
    sig = demo.sigmoid_mlp(2, 8)
    assert [type(m).__name__ for m in sig] == ["Linear", "Sigmoid"] * 2 + ["Linear"]
    with pytest.raises(ValueError, match="init_gain"):
        demo.exploding_mlp(2, 8, init_gain=0.0)


def test_a_run_that_misses_its_design_is_reported(tiny):
    """A healthy-by-design run whose end is dead (as --max-norm 5 gives on some seeds)."""
    results, _ = tiny
    d = results.runs["d"]
    assert d.verdict_end == "healthy"  # 40 steps: the end window is the whole run
    bad = dataclasses.replace(d, verdict_end="dead", steps_run=demo.runs.END_WINDOW + 10)
    assert not bad.as_expected
    table = demo.run_table(bad)
    assert f"last {demo.runs.END_WINDOW} steps only" in table and "DEAD" in table
    assert "note: this run was designed to be 'healthy'" in table
    both = dataclasses.replace(results, runs={**results.runs, "d": bad})
    assert f"healthy; last {demo.runs.END_WINDOW} steps: dead" in demo.comparison_table(both)
    assert demo.conclusions(both)[-1].startswith("Not as designed with these settings: (d)")
