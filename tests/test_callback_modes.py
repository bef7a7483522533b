"""GradStabCallback / GradStabOptimizer: adaptive thresholds, AGC, normalize, history/diagnosis.

Oracles: :func:`gradstab.adaptive.clip_` on a copy of the model (the adaptive thresholds'
own functional API: the wrapper must match it bit for bit), float64 arithmetic on the
gradients and weights recorded by spy callbacks placed before and after the GradStabCallback
(AGC, normalize, percentile bounds), and Lightning checkpoint resume against an uninterrupted
run.  The Lightning helpers come from tests/test_callback.py.
"""

from __future__ import annotations

import copy
import logging
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from test_callback import (  # noqa: E402
    EPS,
    NAMES,
    HostReads,
    Net,
    Spy,
    TwoOptimizers,
    _fp16_plugin,
    fit,
    make_trainer,
    pnorm,
    seeded,
)
from torch.amp.grad_scaler import OptState  # noqa: E402

import gradstab  # noqa: E402
from gradstab import GradStabCallback, GradStabOptimizer, _clipping, _library  # noqa: E402
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold, clip_  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LeafSpec.*:DeprecationWarning",
    "ignore:.*treespec.*",
    "ignore:.*resuming from a checkpoint that ended before the epoch ended.*",
)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class WeightSpy(Spy):
    """Spy that also records the weights (float64) at the hook."""

    def __init__(self) -> None:
        super().__init__()
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        self.weights.append(
            {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
        )


class StepData(Net):
    """Net whose batch depends only on ``global_step`` (so a resumed run sees the same data)."""

    def training_step(self, batch, batch_idx):
        gen = torch.Generator().manual_seed(1000 + self.trainer.global_step)
        x = torch.randn(4, 32, generator=gen)
        return self.layer(x).pow(2).mean()


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def data(n: int, spikes: dict[int, float] | None = None) -> list[tuple[torch.Tensor, float]]:
    gen = torch.Generator().manual_seed(7)
    spikes = spikes or {}
    return [(torch.randn(16, 6, generator=gen), spikes.get(i, 1.0)) for i in range(n)]


def backward(model: nn.Module, x: torch.Tensor, scale: float) -> None:
    ((model(x) - 1).pow(2).mean() * scale).backward()


# ---------------------------------------------------------------------------------- adaptive

THRESHOLDS = {
    "zscore-adaptive": lambda: ZScoreThreshold(warmup_steps=3),
    "zscore-mean": lambda: ZScoreThreshold(warmup_steps=3, rule="mean", max_norm=5.0),
    "zscore-threshold": lambda: ZScoreThreshold(warmup_steps=3, rule="threshold"),
    "percentile-current": lambda: PercentileThreshold(50.0, history=5),
    "percentile-before": lambda: PercentileThreshold(40.0, history=5, include_current=False),
}


@pytest.mark.parametrize("mode", ["norm", "layer"])
@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_wrapper_matches_adaptive_clip_bit_for_bit(name, mode):
    """Every step's clipped gradients, parameters and threshold state equal the functional
    gradstab.adaptive.clip_ followed by the same optimizer step."""
    steps = data(10, spikes={5: 40.0, 8: 0.01})
    ours, ref = small_model(), small_model()
    opt = GradStabOptimizer(
        torch.optim.SGD(ours.parameters(), lr=0.05),
        mode=mode,
        max_norm=THRESHOLDS[name](),
        module=ours,
    )
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05)
    thr = THRESHOLDS[name]()
    clipped = 0
    for x, s in steps:
        opt.zero_grad()
        sgd.zero_grad()
        backward(ours, x, s)
        backward(ref, x, s)
        pre = [p.grad.clone() for p in ref.parameters()]
        opt.clip()
        clip_(list(ref.parameters()), thr, mode=mode)
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a.grad, b.grad)
        clipped += any(not torch.equal(g, p.grad) for g, p in zip(pre, ref.parameters()))
        opt.optimizer.step()
        sgd.step()
    assert clipped >= 1  # the rule did clip (the spike)
    state = opt.state_dict()["gradstab"]["thresholds"]["all"]["state"]
    for k, v in thr.state_dict()["state"].items():
        assert torch.equal(state[k], v), k
    assert opt.counters()["steps"] == 10


def test_percentile_bound_matches_numpy_oracle():
    """include_current=False: step s clips to numpy's percentile of the norms before s."""
    before, after = Spy(), Spy()
    thr = PercentileThreshold(30.0, history=4, include_current=False, warmup_steps=2)
    cb = GradStabCallback(max_norm=thr, log_every_n_steps=1)
    fit(seeded(lambda: Net(bad={3: 5.0, 6: 3.0})), [before, cb, after], max_steps=8)
    norms: list[float] = []
    for b, a in zip(before.grads, after.grads):
        n = pnorm(b.values(), 2)
        bound = float(np.percentile(norms[-4:], 30.0)) if len(norms) >= 2 else math.inf
        coef = min(1.0, bound / (n + EPS))
        assert pnorm(a.values(), 2) == pytest.approx(n * coef, rel=1e-5)
        norms.append(n)
    assert thr.initialized is False  # the prototype itself is never used


def test_threshold_metrics_and_unit_per_group():
    """Bound and statistics logged; a dict gives each group its own threshold copy."""
    before, after = Spy(), Spy()
    cb = GradStabCallback(
        mode="layer",
        max_norm={0: ZScoreThreshold(warmup_steps=2), 1: 0.02},
        log_every_n_steps=1,
        log_per_layer=True,
    )
    fit(seeded(lambda: Net(groups=True, bad={3: 20.0})), [before, cb, after], max_steps=5)
    m = cb.last_metrics
    assert m["grad/clip_threshold_group1"] == 0.02
    for k in ("mean", "std", "count", "spikes"):
        assert f"grad/threshold_group0/{k}" not in m  # per-tensor statistics: not logged
    for n in NAMES[:2]:
        assert f"grad/clip_threshold/{n}" in m  # per-tensor adaptive bounds
    sd = cb.state_dict()["optimizers"][0]["thresholds"]
    assert list(sd) == ["group0"]
    assert sd["group0"]["state"]["count"].tolist() == [5, 5]  # one update per step and tensor
    for b, a in zip(before.grads, after.grads):  # group 1: the fixed bound
        for n in NAMES[2:]:
            coef = min(1.0, 0.02 / (float(b[n].norm()) + EPS))
            torch.testing.assert_close(a[n], b[n] * coef, rtol=1e-6, atol=0)

    cb = GradStabCallback(max_norm=ZScoreThreshold(warmup_steps=2), log_every_n_steps=1)
    fit(seeded(Net), [cb], max_steps=3)
    m = cb.last_metrics
    assert m["grad/clip_threshold"] == math.inf  # no spike: nothing to clip
    assert m["grad/threshold/count"] == 3 and m["grad/threshold/spikes"] == 0
    assert m["grad/threshold/mean"] > 0


def test_adaptive_once_per_optimizer_step_accumulation_and_two_optimizers():
    cb = GradStabCallback(max_norm=PercentileThreshold(50.0, 10), log_every_n_steps=0)
    fit(seeded(Net), [cb], max_steps=3, accumulate_grad_batches=3)
    assert cb.state_dict()["optimizers"][0]["thresholds"]["all"]["state"]["count"] == 3

    cb = GradStabCallback(max_norm=ZScoreThreshold(warmup_steps=2), log_every_n_steps=0)
    fit(seeded(TwoOptimizers), [cb], max_steps=6)  # 3 steps of each optimizer
    sd = cb.state_dict()["optimizers"]
    assert [sd[i]["thresholds"]["all"]["state"]["count"].item() for i in (0, 1)] == [3, 3]


def test_fused_fp16_thresholds_see_unscaled_norms():
    before = Spy()
    thr = PercentileThreshold(100.0, history=8, include_current=False)
    cb = GradStabCallback(max_norm=thr, log_every_n_steps=0)
    plugin = _fp16_plugin()
    fit(seeded(lambda: Net(opt="adam-fused")), [before, cb], max_steps=6, plugins=[plugin])
    st = cb.state_dict()["optimizers"][0]["thresholds"]["all"]["state"]
    unscaled = [
        pnorm(b.values(), 2) / s
        for b, s in zip(before.grads, before.scales)
        if all(torch.isfinite(t).all() for t in b.values())
    ]
    assert len(unscaled) >= 2 and int(st["count"]) == len(unscaled)
    got = st["history"][: len(unscaled)].tolist()
    assert got == pytest.approx(unscaled, rel=1e-5)
    assert all(stage is OptState.READY for stage in before.stages)  # still scaled at the hook


def _resume_cb():
    return GradStabCallback(
        max_norm=ZScoreThreshold(warmup_steps=2, rule="mean"),
        nonfinite="skip",
        log_every_n_steps=1,
    )


def test_lightning_resume_continues_the_threshold_sequence_exactly(tmp_path):
    bad = {2: math.nan, 4: 30.0, 6: 50.0}
    seen: dict[str, list] = {"full": [], "second": []}

    def spy(tag, cb):
        class S(pl.Callback):
            def on_train_batch_end(self, *args):
                m = cb.last_metrics
                seen[tag].append((m["grad/clip_threshold"], m["grad/threshold/mean"]))

        return S()

    full = _resume_cb()
    fit(seeded(lambda: StepData(bad=bad)), [full, spy("full", full)], max_steps=8)
    first = _resume_cb()
    trainer = fit(seeded(lambda: StepData(bad=bad)), [first], max_steps=4)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert saved["optimizers"][0]["thresholds"]["all"]["state"]["count"] == 3  # NaN step left out
    second = _resume_cb()
    make_trainer([second, spy("second", second)], max_steps=8).fit(
        seeded(lambda: StepData(bad=bad)), ckpt_path=ckpt
    )
    assert seen["second"] == seen["full"][4:]  # the same bounds, bit for bit
    assert any(b < math.inf for b, _ in seen["full"][4:])  # and the spikes were clipped
    a = full.state_dict()["optimizers"][0]
    b = second.state_dict()["optimizers"][0]
    for k, v in a["thresholds"]["all"]["state"].items():
        assert torch.equal(v, b["thresholds"]["all"]["state"][k]), k
    assert {k: v for k, v in a.items() if k != "thresholds"} == {
        k: v for k, v in b.items() if k != "thresholds"
    }


def test_wrapper_state_dict_round_trip_continues_exactly():
    steps = data(8, spikes={5: 30.0})
    thr = ZScoreThreshold(warmup_steps=2)
    model = small_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), max_norm=thr)
    for x, s in steps[:4]:
        opt.zero_grad()
        backward(model, x, s)
        opt.step()
    sd = copy.deepcopy(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = GradStabOptimizer(torch.optim.SGD(model2.parameters(), lr=0.05), max_norm=thr)
    opt2.load_state_dict(sd)
    for x, s in steps[4:]:
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            backward(m, x, s)
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    t1 = opt.state_dict()["gradstab"]["thresholds"]["all"]["state"]
    t2 = opt2.state_dict()["gradstab"]["thresholds"]["all"]["state"]
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    other = GradStabOptimizer(
        torch.optim.SGD(small_model().parameters(), lr=0.05),
        max_norm=ZScoreThreshold(warmup_steps=3),
    )
    with pytest.raises(ValueError, match="warmup_steps=2 but this object has warmup_steps=3"):
        other.load_state_dict(sd)
    plain = GradStabOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.05), max_norm=1.0)
    with pytest.raises(ValueError, match="adaptive threshold for 'all'"):
        plain.load_state_dict(sd)


def test_layer_threshold_ignores_tensors_without_gradient():
    model = small_model()
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        mode="layer",
        max_norm=PercentileThreshold(50.0, 4),
        module=model,
    )
    for i, (x, s) in enumerate(data(4)):
        opt.zero_grad()
        backward(model, x, s)
        if i % 2:
            model[2].bias.grad = None
        opt.step()
    count = opt.state_dict()["gradstab"]["thresholds"]["all"]["state"]["count"]
    assert count.tolist() == [4, 4, 4, 2]


# ---------------------------------------------------------------------------------- AGC


def agc_oracle(g: torch.Tensor, w: torch.Tensor, lam: float, eps: float):
    """Float64 AGC of one gradient: (clipped gradient, number of clipped units)."""
    gu = g.reshape(g.shape[0], -1) if g.dim() >= 2 else g.reshape(1, -1)
    wu = w.reshape(w.shape[0], -1) if w.dim() >= 2 else w.reshape(1, -1)
    gn = torch.linalg.vector_norm(gu, dim=1)
    mx = lam * torch.clamp(torch.linalg.vector_norm(wu, dim=1), min=eps)
    coef = torch.where(gn > mx, mx / gn, torch.ones_like(gn))
    return (gu * coef[:, None]).reshape(g.shape), int((gn > mx).sum())


@pytest.mark.parametrize(
    ("exclude", "excluded"),
    [
        (None, []),
        ("layer.2.", NAMES[2:]),
        (lambda name, p: p.dim() < 2, ["layer.0.bias", "layer.2.bias"]),
    ],
)
def test_agc_matches_float64_oracle_and_excludes(exclude, excluded):
    before, after = WeightSpy(), Spy()
    cb = GradStabCallback(
        mode="agc",
        clip_factor=0.05,
        agc_eps=1e-2,
        agc_exclude=exclude,
        log_every_n_steps=1,
        log_per_layer=True,
    )
    counts = []

    class Log(pl.Callback):
        def on_train_batch_end(self, *args):
            counts.append(cb.last_metrics["grad/agc_clipped_units"])

    fit(seeded(lambda: Net(bad={2: 3.0})), [before, cb, after, Log()], max_steps=4)
    total_clipped = 0
    for b, w, a, logged in zip(before.grads, before.weights, after.grads, counts):
        units = 0
        for n in NAMES:
            if n in excluded:
                assert torch.equal(a[n], b[n])  # monitored, not clipped
                continue
            want, k = agc_oracle(b[n], w[n], 0.05, 1e-2)
            torch.testing.assert_close(a[n], want, rtol=2e-6, atol=1e-9)
            units += k
        assert logged == units
        total_clipped += units
    assert total_clipped > 0
    m = cb.last_metrics
    for n in NAMES:
        key = "grad/max_abs/" if n in excluded else "grad/agc_clipped_units/"
        assert key + n in m
    assert "grad/clip_threshold" not in m
    assert m["grad/post_clip_norm_total"] == pytest.approx(
        pnorm(after.grads[-1].values(), 2), rel=1e-5
    )


def test_agc_unscales_first_under_fused_fp16():
    before, after = Spy(), Spy()
    cb = GradStabCallback(mode="agc", clip_factor=0.01, log_every_n_steps=0)
    fit(
        seeded(lambda: Net(opt="adam-fused")),
        [before, cb, after],
        max_steps=3,
        plugins=[_fp16_plugin()],
    )
    assert all(stage is OptState.READY for stage in before.stages)
    assert all(stage is OptState.UNSCALED for stage in after.stages)


# ---------------------------------------------------------------------------------- normalize


@pytest.mark.parametrize("group_by", ["param", "module"])
def test_normalize_matches_float64_oracle(group_by):
    before, after = Spy(), Spy()
    cb = GradStabCallback(mode="normalize", target_norm=0.1, group_by=group_by, log_every_n_steps=1)
    fit(seeded(Net), [before, cb, after], max_steps=3)
    modules = [NAMES[:2], NAMES[2:]] if group_by == "module" else [[n] for n in NAMES]
    for b, a in zip(before.grads, after.grads):
        for names in modules:
            coef = 0.1 / (pnorm([b[n] for n in names], 2) + EPS)
            for n in names:
                torch.testing.assert_close(a[n], b[n] * coef, rtol=2e-6, atol=0)
    m = cb.last_metrics
    post = pnorm(after.grads[-1].values(), 2)
    assert m["grad/post_clip_norm_total"] == pytest.approx(post, rel=1e-5)
    assert post == pytest.approx(0.1 * math.sqrt(len(modules)), rel=1e-4)
    assert m["grad/clip_coef"] == pytest.approx(post / pnorm(before.grads[-1].values(), 2))
    # the clip rate counts steps where some gradient was scaled down (exceeded the target)
    down = [any(pnorm([b[n] for n in ns], 2) > 0.1 for ns in modules) for b in before.grads]
    assert cb.counters()["clipped_steps"] == sum(down)


def test_normalize_per_group_target():
    before, after = Spy(), Spy()
    cb = GradStabCallback(mode="normalize", target_norm={1: 2.0}, log_every_n_steps=0)
    fit(seeded(lambda: Net(groups=True)), [before, cb, after], max_steps=2)
    for b, a in zip(before.grads, after.grads):
        for n in NAMES[:2]:
            assert torch.equal(a[n], b[n])
        for n in NAMES[2:]:
            assert float(a[n].norm()) == pytest.approx(2.0, rel=1e-5)


# ---------------------------------------------------------------------------------- host reads


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "agc", "agc_exclude": "layer.2."},
        {"mode": "normalize", "target_norm": 0.5},
        {"mode": "normalize", "target_norm": 0.5, "group_by": "module"},
        {"max_norm": ZScoreThreshold(warmup_steps=2)},
        {"max_norm": PercentileThreshold(50.0, 8, include_current=False)},
        {"mode": "layer", "max_norm": PercentileThreshold(50.0, 8)},
        {"mode": "layer", "max_norm": ZScoreThreshold(warmup_steps=2), "group_by": "module"},
        {"max_norm": 0.5, "history": 8, "history_extras": True, "diagnose_on_fit_end": False},
    ],
)
def test_no_host_read_on_steps_that_do_not_log(kw, monkeypatch):
    monkeypatch.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
    reads = HostReads(monkeypatch)
    counts = []

    class Start(pl.Callback):
        def on_before_optimizer_step(self, *args):
            reads.start()

    class Stop(pl.Callback):
        def on_before_optimizer_step(self, *args):
            counts.append(reads.stop())

    cb = GradStabCallback(log_every_n_steps=3, log_per_layer=True, **kw)
    fit(seeded(lambda: Net(groups=True)), [Start(), cb, Stop()], max_steps=6)
    assert counts[0] == counts[1] == counts[3] == counts[4] == 0, counts
    assert counts[2] >= 1 and counts[5] >= 1


# ---------------------------------------------------------------------------------- history


def deep_sigmoid() -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(20):
        layers += [nn.Linear(16, 16), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(16, 1))


class DeepSigmoid(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = deep_sigmoid()

    def training_step(self, batch, batch_idx):
        gen = torch.Generator().manual_seed(self.global_step)
        x = torch.randn(32, 16, generator=gen)
        return (self.net(x) - 1).pow(2).mean()

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_history_diagnosis_and_plots_at_fit_end(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    cb = GradStabCallback(max_norm=1.0, history=20, plot_dir=tmp_path / "plots")
    # Lightning's logger may not propagate to the root (where caplog listens): it sets
    # propagate=False when imported while the root logger has no handler
    lightning_logger = logging.getLogger("lightning.pytorch")
    lightning_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
            module = DeepSigmoid()
            fit(module, [cb], max_steps=8)
    finally:
        lightning_logger.removeHandler(caplog.handler)
    assert isinstance(cb.history, gradstab.GradHistory) and len(cb.history) == 8
    assert cb.history.names[0] == "net.0.weight"
    d = cb.diagnosis
    assert d is not None and d.vanishing_gradients and d.steps == 8
    assert "net.0.weight" in d.vanishing
    assert "vanishing" in caplog.text and "gradstab diagnosis" in caplog.text
    # the fit-end summary prescribes from the LightningModule's modules: its Sigmoids, named
    sigmoids = [n for n, m in module.named_modules() if isinstance(m, nn.Sigmoid)]
    assert d.prescriptions[0].kind == "activation"
    assert d.prescriptions[0].evidence["activations"] == sigmoids
    assert "prescriptions" in caplog.text and f"'{sigmoids[0]}'" in caplog.text
    assert cb.history.model is module
    files = sorted(os.listdir(tmp_path / "plots"))
    assert files == ["grad_norm_heatmap.png", "total_norm.png"]
    data = cb.history.data()
    assert data.clip_threshold is not None and set(data.clip_threshold.tolist()) == {1.0}
    assert data.post_clip_norm is not None
    assert cb.diagnose(window=4).steps == 4


def test_plots_without_matplotlib_warn(tmp_path, monkeypatch):
    from gradstab.diagnosis import plots  # noqa: PLC0415

    def missing():
        raise ImportError("gradstab's plots need matplotlib, which is not installed")

    monkeypatch.setattr(plots, "require_matplotlib", missing)
    cb = GradStabCallback(max_norm=1.0, history=5, plot_dir=str(tmp_path / "p"))
    with pytest.warns(UserWarning, match="no plots written: .*need matplotlib"):
        fit(seeded(Net), [cb], max_steps=2)
    assert cb.diagnosis is not None and not os.path.exists(tmp_path / "p")


def test_history_records_the_clip_statistics_without_an_extra_pass(monkeypatch):
    """History rows equal float64 norms of the pre-clip gradients; no grad_stats call is made
    (the clip op's statistics are recorded); post-clip norm, threshold, skipped flag kept."""
    calls = {"n": 0}
    orig = _library.OPS["grad_stats"]

    def counting(*args):
        calls["n"] += 1
        return orig(*args)

    monkeypatch.setitem(_library.OPS, "grad_stats", counting)
    model = small_model()
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        max_norm=0.5,
        nonfinite="skip",
        module=model,
        history=3,
    )
    pre, post = [], []
    for i, (x, s) in enumerate(data(5)):
        opt.zero_grad()
        backward(model, x, s)
        if i == 3:
            model[0].weight.grad[0, 0] = math.nan
        pre.append([p.grad.double().norm().item() for p in model.parameters()])
        opt.step()
        post.append(pnorm([p.grad for p in model.parameters() if p.grad is not None], 2))
    assert calls["n"] == 0
    d = opt.history.data()
    assert d.steps == [2, 3, 4]  # the ring keeps the last 3
    for row, want in zip(d.norms.tolist(), pre[2:]):
        assert row == pytest.approx(want, rel=1e-6, nan_ok=True)
    assert d.skipped.tolist() == [False, True, False]
    assert d.clip_threshold.tolist() == [0.5] * 3
    assert d.post_clip_norm[0].item() == pytest.approx(post[2], rel=1e-5)
    assert d.post_clip_norm[2].item() == pytest.approx(post[4], rel=1e-5)
    assert d.zero_fraction is None and d.param_norms is None
    assert opt.diagnose().steps == 3

    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05),
        mode="agc",
        history=4,
        history_extras=True,
    )
    opt.zero_grad()
    backward(model, *data(1)[0])
    opt.step()
    d = opt.history.data()
    assert d.names == [
        "param_groups.0.0",
        "param_groups.0.1",
        "param_groups.0.2",
        "param_groups.0.3",
    ]
    assert d.zero_fraction is not None and d.param_norms is not None
    assert torch.isnan(d.max_abs).all()  # AGC's op does not compute max-abs
    assert d.post_clip_norm is None  # it would take a second read


def test_diagnose_without_history_is_a_clear_error():
    cb = GradStabCallback(max_norm=1.0)
    with pytest.raises(RuntimeError, match=r"GradStabCallback\.diagnose: .*history=<number"):
        cb.diagnose()
    opt = GradStabOptimizer(torch.optim.SGD(small_model().parameters(), lr=0.1), max_norm=1.0)
    assert opt.history is None
    with pytest.raises(RuntimeError, match=r"GradStabOptimizer\.diagnose: .*history=<number"):
        opt.diagnose()


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"mode": "value", "clip_value": ZScoreThreshold()}, TypeError, "clip_value must be"),
        ({"mode": "agc", "max_norm": 1.0}, ValueError, "max_norm=1.0 is not used with mode='agc'"),
        ({"max_norm": 1.0, "clip_factor": 0.1}, ValueError, "clip_factor=0.1 is not used"),
        ({"max_norm": 1.0, "agc_eps": 0.1}, ValueError, "agc_eps=0.1 is only used with mode='agc'"),
        ({"mode": "agc", "agc_eps": -1.0}, ValueError, "agc_eps must be a finite number >= 0"),
        ({"mode": "agc", "clip_factor": 0}, ValueError, "clip_factor must be a positive"),
        ({"mode": "agc", "agc_exclude": 3}, TypeError, "agc_exclude must be None, a parameter"),
        ({"mode": "agc", "group_by": "module"}, ValueError, "group_by='module' .* needs mode"),
        ({"mode": "normalize", "target_norm": -1}, ValueError, "target_norm must be a positive"),
        ({"mode": None, "target_norm": 1.0}, ValueError, "mode=None only monitors"),
        ({"max_norm": 1.0, "history": -1}, ValueError, "history must be >= 0"),
        ({"max_norm": 1.0, "history": 2.0}, TypeError, "history must be an int"),
        ({"max_norm": 1.0, "history_extras": True}, ValueError, "history_extras=True adds to"),
        ({"max_norm": 1.0, "plot_dir": "p"}, ValueError, "plot_dir='p' plots the gradient"),
        ({"max_norm": 1.0, "history": 5, "plot_dir": 3}, TypeError, "plot_dir must be a folder"),
        ({"max_norm": 1.0, "diagnose_on_fit_end": 1}, TypeError, "diagnose_on_fit_end must be"),
        ({"max_norm": 1.0, "process_group": "all"}, TypeError, "process_group must be a torch"),
    ],
)
def test_constructor_errors(kw, exc, match):
    with pytest.raises(exc, match=f"GradStabCallback: {match}"):
        GradStabCallback(**kw)


def test_defaults_of_agc_and_normalize():
    cb = GradStabCallback(mode="agc")
    assert cb.clip_factor == 0.01 and cb._config.agc_eps == 1e-3
    assert GradStabCallback(mode="normalize").target_norm == 1.0
    # the state key tells differently configured instances apart, stable across runs
    a = GradStabCallback(mode="agc", agc_exclude=lambda n, p: False).state_key
    assert "agc_exclude" in a and "0x" not in a
    assert GradStabCallback(max_norm=1.0).state_key == (
        "GradStabCallback{'mode': 'norm', 'max_norm': 1.0, 'clip_value': None, 'norm_type': "
        "2.0, 'group_by': 'param', 'nonfinite': 'ignore', 'log_prefix': 'grad'}"
    )


# ---------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": ZScoreThreshold(warmup_steps=2, rule="mean")},
        {"max_norm": PercentileThreshold(50.0, 4, include_current=False)},
        {"mode": "layer", "max_norm": PercentileThreshold(50.0, 4)},
        {"mode": "layer", "max_norm": ZScoreThreshold(warmup_steps=2), "group_by": "module"},
        {"mode": "normalize", "target_norm": 0.3},
    ],
)
def test_two_phase_path_equals_the_fused_ops(kw, monkeypatch):
    """Parts whose statistics must be combined first (several devices), forced on one CPU
    device: the same clip, metrics and threshold state as the fused ops."""
    results = []
    for forced in (False, True):
        if forced:
            for where in (_clipping.parts, _clipping.step):
                monkeypatch.setattr(
                    where,
                    "needs_two_phase",
                    lambda kind, per_dev: kind in ("norm", "layer", "normalize", "normalize_total"),
                )
        model = small_model()
        opt = GradStabOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.05),
            module=model,
            log_every_n_steps=1,
            log_per_layer=True,
            **copy.deepcopy(kw),
        )
        for x, s in data(6, spikes={4: 30.0}):
            opt.zero_grad()
            backward(model, x, s)
            opt.step()
        results.append((model, opt.last_metrics, opt.state_dict()["gradstab"]))
    (m0, k0, s0), (m1, k1, s1) = results
    for a, b in zip(m0.parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert k0.keys() == k1.keys()
    for k in k0:
        assert k1[k] == pytest.approx(k0[k], rel=1e-6), k
    for key, t in s0.get("thresholds", {}).items():
        for name, v in t["state"].items():
            torch.testing.assert_close(s1["thresholds"][key]["state"][name], v, rtol=1e-6, atol=0)


def test_parameters_moved_after_the_plan_take_the_slow_path():
    """The plan groups parameters by device once; a gradient found elsewhere (the model was
    moved) is regrouped per step, with the same result."""
    model, ref = small_model(), small_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), max_norm=0.2)
    x, s = data(1)[0]
    backward(model, x, s)
    backward(ref, x, s)
    unit = opt._current_plan().units[0]
    _, *rest = unit.by_device[0][0]
    unit.by_device[0][0] = (torch.device("meta"), *rest)  # as if the plan saw another device
    opt.clip()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.2)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_process_group_world_without_torch_distributed_is_one_process():
    model, ref = small_model(), small_model()
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05), max_norm=0.2, process_group="world"
    )
    x, s = data(1)[0]
    backward(model, x, s)
    backward(ref, x, s)
    opt.clip()
    assert not opt._current_plan().sharded
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.2)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
