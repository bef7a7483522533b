"""``python -m gradstab demo``: the tiny demo end to end, its results against independent checks."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from gradstab import demo
from gradstab.__main__ import main

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny demo of all four runs, shared by the tests of this module."""
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    rc = main(["demo", "--tiny", "--no-progress-bar", "--out", str(out), "--seed", "0"])
    assert torch.get_num_threads() == threads  # the demo restores the thread count
    assert rc == 0
    results = demo.last_results
    assert results is not None
    return results, out


def test_runs_get_the_verdicts_they_are_designed_for(tiny):
    results, _ = tiny
    runs = results.runs
    assert list(runs) == ["a", "b", "c", "d"]
    a, b, c, d = (runs[k] for k in "abcd")
    # (a) vanishing: the first layer's gradient is decades below the last one's
    assert a.diagnosis.vanishing_gradients and "vanishing" in a.verdict
    assert a.diagnosis.depth_trend is not None and a.diagnosis.depth_trend.direction == "vanishing"
    assert a.min_layer == "0.weight" and a.spread_decades > 3
    # (b) and (d) healthy and learning (chance is 10%)
    for r in (b, d):
        assert r.diagnosis.healthy and r.verdict == "healthy"
        assert r.accuracy is not None and r.accuracy > 0.3
        assert math.isfinite(r.final_loss) and r.final_loss < r.losses[0]
        assert r.steps_run == r.steps_planned == demo.TINY["steps"]
    # (c) exploding: non-finite gradients and a huge total norm before them
    assert c.diagnosis.exploding or c.diagnosis.nonfinite is not None
    assert c.diagnosis.nonfinite is not None and c.first_nonfinite_loss is not None
    assert c.accuracy is None and math.isnan(c.final_loss)
    assert all(r.as_expected for r in runs.values())
    # only (d) clips
    assert a.clipped_steps is None and c.skipped_steps is None
    assert 0 < d.clipped_steps <= d.steps_run and d.skipped_steps == 0


def test_c_and_d_start_from_the_same_weights_and_batch(tiny):
    results, _ = tiny
    c, d = results.runs["c"], results.runs["d"]
    assert c.losses[0] == d.losses[0]
    assert c.initial_total_norm == d.initial_total_norm > 10 * results.config.max_norm
    torch.testing.assert_close(c.history.norms[0], d.history.norms[0], rtol=0, atol=0)


def test_first_step_statistics_match_plain_pytorch(tiny):
    """Rebuild run (c)'s model and first batch; per-layer norms from torch in float64."""
    results, _ = tiny
    cfg = results.config
    x, y = demo.make_data(cfg.n_train, cfg.seed)
    torch.manual_seed(cfg.seed)
    model = demo.exploding_mlp(cfg.depth, cfg.width, init_gain=cfg.init_gain)
    bx, by = next(iter(demo._loader(x, y, cfg)))
    loss = torch.nn.functional.cross_entropy(model(bx), by)
    loss.backward()
    hist = results.runs["c"].history
    expected = torch.stack(
        [torch.linalg.vector_norm(p.grad.double()) for _, p in model.named_parameters()]
    )
    assert hist.names == [n for n, _ in model.named_parameters()]
    torch.testing.assert_close(hist.norms[0], expected, rtol=1e-5, atol=0)
    total = torch.linalg.vector_norm(expected)
    assert math.isclose(results.runs["c"].initial_total_norm, float(total), rel_tol=1e-5)
    assert math.isclose(results.runs["c"].losses[0], float(loss), rel_tol=1e-6)


def test_clip_counts_agree_with_the_recorded_norms(tiny):
    results, _ = tiny
    d = results.runs["d"]
    h = d.history
    max_norm = results.config.max_norm
    assert h.clip_threshold is not None and h.post_clip_norm is not None
    thr = h.clip_threshold
    assert bool((thr <= max_norm).all()) and bool((thr > 0).all())  # max_norm caps it
    # a step is clipped exactly when its pre-clip norm exceeds the threshold (eps 1e-6)
    assert int((h.total_norm > thr).sum()) == d.clipped_steps
    assert bool((h.post_clip_norm <= thr * (1 + 1e-5)).all())
    unclipped = h.total_norm <= thr
    torch.testing.assert_close(h.post_clip_norm[unclipped], h.total_norm[unclipped])
    assert not bool(h.skipped.any())


def test_layer_norm_extremes_come_from_the_diagnosis(tiny):
    results, _ = tiny
    for r in results.runs.values():
        weights = {
            lr.name: lr.median_norm
            for lr in r.diagnosis.layers
            if lr.name.endswith("weight") and math.isfinite(lr.median_norm)
        }
        if r.info.key == "b":  # LayerNorm weights are 1-D: not weight matrices
            weights = {n: v for n, v in weights.items() if int(n.split(".")[0]) % 3 == 0}
        assert r.min_layer_norm == min(weights.values()) == weights[r.min_layer]
        assert r.max_layer_norm == max(weights.values()) == weights[r.max_layer]


def test_pictures_are_written_and_decode(tiny):
    mpimg = pytest.importorskip("matplotlib.image")
    results, out = tiny
    files = sorted(os.listdir(out))
    assert len(files) == 8
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
    d = results.runs["d"]
    assert f"{d.clipped_steps} / {d.skipped_steps} of {d.steps_run}" in text
    assert "VANISHING" in text and "NON-FINITE" in text
    sentences = demo.conclusions(results)
    assert len(sentences) == 2 and "vanishing -> healthy" in sentences[0]


def test_run_selection_without_plots(tmp_path, capsys):
    out = tmp_path / "none"
    rc = main(["demo", "--tiny", "--steps", "12", "--runs", "c,a", "--no-plots",
               "--no-progress-bar", "--out", str(out)])  # fmt: skip
    assert rc == 0
    res = demo.last_results
    assert list(res.runs) == ["c", "a"]
    assert all(r.steps_planned == 12 and not r.plots for r in res.runs.values())
    assert not out.exists()
    printed = capsys.readouterr().out
    assert "(c) deep ReLU MLP" in printed and "Comparison" in printed
    assert "(b)" not in printed.split("Comparison")[1]


def test_without_matplotlib_the_tables_still_print(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "_matplotlib_available", lambda: False)
    rc = main(["demo", "--tiny", "--steps", "8", "--runs", "a", "--no-progress-bar",
               "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 0
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and "gradstab[demo]" in printed
    assert "diagnosis" in printed and "Comparison" in printed
    assert demo.last_results.plots_note is not None
    assert not (tmp_path / "p").exists()


def test_without_lightning_a_clear_message(monkeypatch, capsys):
    def missing():
        raise ImportError(demo._INSTALL_LIGHTNING)

    monkeypatch.setattr(demo, "_require_lightning", missing)
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
        demo.DemoConfig(runs=("e",))
    with pytest.raises(ValueError, match="steps"):
        demo.DemoConfig(steps=0)


def test_data_and_builders():
    x, y = demo.make_data(2000, seed=3)
    x2, y2 = demo.make_data(2000, seed=3)
    xv, _ = demo.make_data(2000, seed=3, split=1)
    assert torch.equal(x, x2) and torch.equal(y, y2) and not torch.equal(x, xv)
    assert set(y.tolist()) == set(range(demo.CLASSES))
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
    bad = dataclasses.replace(d, verdict_end="dead", steps_run=demo.END_WINDOW + 10)
    assert not bad.as_expected
    table = demo.run_table(bad)
    assert f"last {demo.END_WINDOW} steps only" in table and "DEAD" in table
    assert "note: this run was designed to be 'healthy'" in table
    both = dataclasses.replace(results, runs={**results.runs, "d": bad})
    assert f"healthy; last {demo.END_WINDOW} steps: dead" in demo.comparison_table(both)
    assert demo.conclusions(both)[-1].startswith("Not as designed with these settings: (d)")
