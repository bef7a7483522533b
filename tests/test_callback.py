"""GradStabCallback in real Lightning ``Trainer`` runs (CPU, tiny BoringModel-style models).

The oracle is float64 arithmetic on the gradients recorded by spy callbacks placed before and
after the GradStabCallback (Lightning calls callbacks in list order), and Lightning's own
``gradient_clip_val`` for end-to-end parameter equality.
"""

from __future__ import annotations

import copy
import csv
import math
import pickle
import re
import sys

import pytest
import torch
from torch import nn

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402
from torch.amp.grad_scaler import OptState  # noqa: E402

import gradstab  # noqa: E402
from gradstab import GradStabCallback, GradStabOptimizer, _clipping, reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*LeafSpec.*:DeprecationWarning",
    "ignore:.*treespec.*",
)

EPS = 1e-6
NAMES = ["layer.0.weight", "layer.0.bias", "layer.2.weight", "layer.2.bias"]


# ---------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine's stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(BoringModel):
    """BoringModel with two Linear layers (4 parameter tensors, 2 modules).

    ``bad`` maps ``global_step -> value`` written into one gradient element after backward
    (NaN/Inf injection); ``opt`` picks the optimizer; ``groups`` uses one param group per
    layer.
    """

    def __init__(self, opt: str = "sgd", bad: dict | None = None, groups: bool = False):
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))
        self.opt, self.bad, self.groups = opt, bad or {}, groups

    def on_after_backward(self) -> None:
        value = self.bad.get(self.trainer.global_step)
        if value is not None:
            self.layer[2].weight.grad[0, 1] = value

    def configure_optimizers(self):
        params = (
            [{"params": self.layer[0].parameters()}, {"params": self.layer[2].parameters()}]
            if self.groups
            else self.parameters()
        )
        if self.opt == "sgd":
            return torch.optim.SGD(params, lr=0.1)
        kw = {"adam": {}, "adam-foreach": {"foreach": True}, "adam-fused": {"fused": True}}
        return torch.optim.Adam(params, lr=0.01, weight_decay=0.01, **kw[self.opt])


def make_trainer(callbacks, **kw) -> pl.Trainer:
    args = {
        "max_steps": 4,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "accelerator": "cpu",
        "devices": 1,
    }
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


class Spy(pl.Callback):
    """Records the gradients (float64 copies) of the optimizer being stepped, by name."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.stages: list[object] = []
        self.scales: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.grads.append(
            {
                n: p.grad.detach().double().clone()
                for n, p in pl_module.named_parameters()
                if id(p) in ids and p.grad is not None
            }
        )
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None:
            self.stages.append(scaler._per_optimizer_states[id(optimizer)]["stage"])
            self.scales.append(float(scaler._scale))


def pnorm(ts, p: float) -> float:
    flat = torch.cat([t.reshape(-1) for t in ts])
    return float(torch.linalg.vector_norm(flat, p))


def fit(model, callbacks, **kw) -> pl.Trainer:
    trainer = make_trainer(callbacks, **kw)
    trainer.fit(model)
    return trainer


def seeded(factory, seed: int = 0):
    torch.manual_seed(seed)
    return factory()


# ---------------------------------------------------------------------------------- clipping


@pytest.mark.parametrize(
    ("kw", "p"),
    [
        ({"max_norm": 0.5}, 2.0),
        ({"max_norm": 0.3, "norm_type": 1.0}, 1.0),
        ({"max_norm": 0.2, "norm_type": "inf"}, math.inf),
        ({"mode": "layer", "max_norm": 0.2}, 2.0),
        ({"mode": "layer", "max_norm": 0.2, "group_by": "module"}, 2.0),
        ({"mode": "value", "clip_value": 0.05}, 2.0),
    ],
)
def test_clip_matches_float64_oracle(kw, p):
    before, after = Spy(), Spy()
    cb = GradStabCallback(log_every_n_steps=0, **kw)
    fit(seeded(Net), [before, cb, after], max_steps=5)
    assert len(before.grads) == len(after.grads) == 5
    mode = kw.get("mode", "norm")
    bound = kw.get("max_norm", kw.get("clip_value"))
    clipped_any = False
    for b, a in zip(before.grads, after.grads):
        if mode == "norm":
            units = [NAMES]
        elif kw.get("group_by") == "module":
            units = [NAMES[:2], NAMES[2:]]
        else:
            units = [[n] for n in NAMES]
        for unit in units:
            if mode == "value":
                for n in unit:
                    expect = b[n].float().clamp(-bound, bound).double()  # clamped in fp32
                    torch.testing.assert_close(a[n], expect, rtol=0, atol=0)
                    clipped_any |= bool((b[n].abs() > bound).any())
                continue
            norm = pnorm([b[n] for n in unit], p)
            coef = min(1.0, bound / (norm + EPS))
            clipped_any |= coef < 1
            for n in unit:
                # fp32 gradients times the coefficient rounded to fp32 (<= 2 roundings)
                torch.testing.assert_close(a[n], b[n] * coef, rtol=2e-7, atol=0)
            assert pnorm([a[n] for n in unit], p) <= bound * (1 + 1e-6)
    assert clipped_any, "the thresholds were meant to clip at least once"
    assert cb.counters()["steps"] == 5


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_parameters_equal_lightning_gradient_clip_val(algorithm):
    """Same seed, same data: gradstab's clip and Lightning's give the same parameters.

    "value" clamps identically, so the parameters are bit-identical.  "norm" differs only in
    the rounding of the coefficient (float32 in torch, float64 here): a relative difference of
    a few 1e-7 in each clipped gradient, times lr = 0.1 and 6 steps, stays far below 1e-6.
    """
    bound = 0.5 if algorithm == "norm" else 0.05
    ref = seeded(Net)
    fit(ref, [], max_steps=6, gradient_clip_val=bound, gradient_clip_algorithm=algorithm)
    ours = seeded(Net)
    kw = {"max_norm": bound} if algorithm == "norm" else {"mode": "value", "clip_value": bound}
    fit(ours, [GradStabCallback(**kw)], max_steps=6)
    untouched = seeded(Net)
    fit(untouched, [], max_steps=6)
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        if algorithm == "value":
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    # the clip mattered: without it the parameters end elsewhere
    assert not all(torch.equal(a, c) for a, c in zip(ours.parameters(), untouched.parameters()))


def test_per_param_group_thresholds():
    before, after = Spy(), Spy()
    cb = GradStabCallback(max_norm={1: 0.05}, log_every_n_steps=1, log_per_layer=True)
    fit(seeded(lambda: Net(groups=True)), [before, cb, after], max_steps=3)
    for b, a in zip(before.grads, after.grads):
        for n in NAMES[:2]:  # group 0: monitored only
            assert torch.equal(a[n], b[n])
        coef = min(1.0, 0.05 / (pnorm([b[n] for n in NAMES[2:]], 2) + EPS))
        assert coef < 1
        for n in NAMES[2:]:
            torch.testing.assert_close(a[n], b[n] * coef, rtol=2e-7, atol=0)
    m = cb.last_metrics
    assert m["grad_2.0_norm_total"] == pytest.approx(pnorm(before.grads[-1].values(), 2), rel=1e-6)
    for n in NAMES:
        assert m[f"grad_2.0_norm/{n}"] == pytest.approx(float(before.grads[-1][n].norm()), rel=1e-6)
    post = math.hypot(*(float(after.grads[-1][n].norm()) for n in NAMES))
    assert m["grad/post_clip_norm_total"] == pytest.approx(post, rel=1e-5)


def test_dict_threshold_naming_a_missing_group_is_refused():
    cb = GradStabCallback(max_norm={3: 1.0})
    with pytest.raises(ValueError, match=r"max_norm=\{3: 1.0\} names param group\(s\) \[3\]"):
        fit(seeded(Net), [cb], max_steps=1)


# ---------------------------------------------------------------------------------- precision


def test_bf16_mixed_clips_fp32_grads_and_matches_lightning():
    before, after = Spy(), Spy()
    ours = seeded(Net)
    fit(ours, [before, GradStabCallback(max_norm=0.5), after], max_steps=4, precision="bf16-mixed")
    ref = seeded(Net)
    fit(ref, [], max_steps=4, precision="bf16-mixed", gradient_clip_val=0.5)
    for b, a in zip(before.grads, after.grads):
        coef = min(1.0, 0.5 / (pnorm(b.values(), 2) + EPS))
        for n in NAMES:
            torch.testing.assert_close(a[n], b[n] * coef, rtol=2e-7, atol=0)
    for x, y in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_bf16_true_clips_bf16_grads():
    before, after = Spy(), Spy()
    cb = GradStabCallback(mode="layer", max_norm=0.1, log_every_n_steps=2, log_per_layer=True)
    fit(seeded(Net), [before, cb, after], max_steps=4, precision="bf16-true")
    for b, a in zip(before.grads, after.grads):
        for n in NAMES:
            coef = min(1.0, 0.1 / (float(b[n].norm()) + EPS))
            # bf16 gradients are scaled in float32 and rounded once to bf16 (8 bits)
            torch.testing.assert_close(a[n], b[n] * coef, rtol=2**-8, atol=0)
    # bf16 gradients, float32 statistics
    assert cb.last_metrics["grad_2.0_norm/layer.0.weight"] == pytest.approx(
        float(before.grads[-1]["layer.0.weight"].norm()), rel=1e-6
    )


def _fp16_plugin():
    try:
        return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"fp16 AMP on CPU is not available here: {exc}")


@pytest.mark.parametrize("opt", ["adam", "adam-fused"])
@pytest.mark.parametrize("mode", ["norm", "layer", "value"])
def test_fp16_amp_clips_unscaled_gradients(opt, mode):
    """16-mixed with a GradScaler on CPU; fused Adam reaches the hook with scaled grads."""
    before, after = Spy(), Spy()
    kw = {"clip_value": 0.01} if mode == "value" else {"max_norm": 0.05}
    # fold=False: the spy after the callback reads the clipped gradients before the step (a
    # folded clip happens inside the fused step; tests/test_fold.py)
    cb = GradStabCallback(mode=mode, nonfinite="raise", log_every_n_steps=1, fold=False, **kw)
    fit(seeded(lambda: Net(opt=opt)), [before, cb, after], max_steps=8, plugins=[_fp16_plugin()])
    fused = opt == "adam-fused"
    finite_steps = 0
    for b, a, stage, scale in zip(before.grads, after.grads, after.stages, after.scales):
        # a fused optimizer's gradients reach the hooks scaled; "value" unscales them first
        still_scaled = fused and mode != "value"
        assert stage is (OptState.READY if still_scaled else OptState.UNSCALED)
        if not all(torch.isfinite(t).all() for t in b.values()):
            continue  # the scaler skips this step ("raise" is left to it under fp16 AMP)
        finite_steps += 1
        bu = {n: t / (scale if fused else 1.0) for n, t in b.items()}
        au = {n: t / (scale if still_scaled else 1.0) for n, t in a.items()}
        # clipping scaled gradients against a scaled bound: eps acts as eps / scale
        eps = EPS / scale if still_scaled else EPS
        if mode == "value":
            for n in NAMES:
                expect = bu[n].float().clamp(-0.01, 0.01).double()  # clamped in fp32
                torch.testing.assert_close(au[n], expect, rtol=0, atol=0)
        elif mode == "norm":
            coef = min(1.0, 0.05 / (pnorm(bu.values(), 2) + eps))
            for n in NAMES:
                torch.testing.assert_close(au[n], bu[n] * coef, rtol=1e-6, atol=0)
        else:
            for n in NAMES:
                coef = min(1.0, 0.05 / (float(bu[n].norm()) + eps))
                torch.testing.assert_close(au[n], bu[n] * coef, rtol=1e-6, atol=0)
    assert finite_steps >= 2
    c = cb.counters()
    assert c["steps"] == 8
    assert c["skipped_steps"] == c["nonfinite_steps"] == 8 - finite_steps
    if mode == "norm":  # logged statistics are those of the unscaled gradients
        bu = before.grads[-1]
        s = after.scales[-1] if fused else 1.0
        assert cb.last_metrics["grad_2.0_norm_total"] == pytest.approx(
            pnorm(bu.values(), 2) / s, rel=1e-5
        )


# ---------------------------------------------------------------------------------- loop shapes


def test_gradient_accumulation_clips_accumulated_grads_once_per_step():
    class Counting(Net):
        calls = 0

        def training_step(self, batch, batch_idx):
            Counting.calls += 1
            return super().training_step(batch, batch_idx)

    before, after = Spy(), Spy()
    cb = GradStabCallback(max_norm=0.5, log_every_n_steps=1)
    totals = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            totals.append(cb.last_metrics["grad_2.0_norm_total"])

    fit(seeded(Counting), [before, cb, after, Record()], max_steps=3, accumulate_grad_batches=4)
    assert Counting.calls == 12
    assert cb.counters()["steps"] == len(before.grads) == 3
    for b, a, t in zip(before.grads, after.grads, totals):
        norm = pnorm(b.values(), 2)
        assert t == pytest.approx(norm, rel=1e-6)  # the clip saw the accumulated gradients
        assert pnorm(a.values(), 2) == pytest.approx(min(norm, 0.5), rel=1e-6)


class TwoOptimizers(Net):
    """Manual optimization with one optimizer per layer; the user adds no gradstab call."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self):
        return [
            torch.optim.SGD(self.layer[0].parameters(), lr=0.1),
            torch.optim.Adam(self.layer[2].parameters(), lr=0.01),
        ]

    def training_step(self, batch, batch_idx):
        opt0, opt1 = self.optimizers()
        loss = self.step(batch)
        opt0.zero_grad()
        opt1.zero_grad()
        self.manual_backward(loss)
        opt0.step()
        opt1.step()
        return loss


def test_manual_optimization_with_two_optimizers():
    before, after = Spy(), Spy()
    cb = GradStabCallback(max_norm=0.01, log_every_n_steps=1, log_per_layer=True)
    fit(seeded(TwoOptimizers), [before, cb, after], max_steps=6)  # 6 optimizer steps
    assert len(before.grads) == 6
    for i, (b, a) in enumerate(zip(before.grads, after.grads)):
        assert sorted(b) == sorted(NAMES[:2] if i % 2 == 0 else NAMES[2:])
        coef = min(1.0, 0.01 / (pnorm(b.values(), 2) + EPS))
        assert coef < 1
        for n in b:
            torch.testing.assert_close(a[n], b[n] * coef, rtol=2e-7, atol=0)
    sd = cb.state_dict()
    assert [sd["optimizers"][i]["steps"] for i in (0, 1)] == [3, 3]
    assert cb.counters()["clipped_steps"] == 6
    m = cb.last_metrics
    for key in ("grad_2.0_norm_total", "grad/clip_rate", "grad/post_clip_norm_total"):
        assert f"{key}_opt0" in m and f"{key}_opt1" in m
    assert m["grad/post_clip_norm_total_opt1"] == pytest.approx(0.01, rel=1e-5)
    assert "grad_2.0_norm/layer.2.weight" in m and "grad_2.0_norm/layer.0.weight" in m


# ---------------------------------------------------------------------------------- non-finite


class Snapshots(pl.Callback):
    """Parameters and optimizer state before and after every training batch."""

    def __init__(self):
        self.before: list = []
        self.after: list = []

    @staticmethod
    def _take(trainer, pl_module):
        opt = trainer.optimizers[0]
        return (
            {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            copy.deepcopy(opt.state_dict()["state"]),
        )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append(self._take(trainer, pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after.append(self._take(trainer, pl_module))


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("opt", ["adam", "adam-foreach", "adam-fused"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_skip_leaves_parameters_and_optimizer_state_bit_identical(precision, opt, value):
    snaps = Snapshots()
    cb = GradStabCallback(max_norm=0.01, nonfinite="skip", log_every_n_steps=4)
    model = seeded(lambda: Net(opt=opt, bad={2: value}))
    fit(model, [snaps, cb], max_steps=4, precision=precision)
    for step, (b, a) in enumerate(zip(snaps.before, snaps.after)):
        if step == 2:
            assert _same(b, a), "the skipped step changed parameters or optimizer state"
        else:
            assert not _same(b[0], a[0])  # healthy steps do move the parameters
    assert snaps.after[-1][1][0]["step"] == 3  # Adam counted 3 steps, not 4
    assert cb.counters() == {
        "steps": 4,
        "clipped_steps": 3,
        "nonfinite_steps": 1,
        "skipped_steps": 1,
    }
    assert cb.last_metrics["grad/skipped_steps"] == 1
    assert cb.last_metrics["grad/clip_rate"] == 0.75


def test_skip_with_bf16_gradients():
    snaps = Snapshots()
    cb = GradStabCallback(mode="layer", max_norm=0.5, nonfinite="skip")
    fit(
        seeded(lambda: Net(opt="adam", bad={1: math.nan})),
        [snaps, cb],
        max_steps=3,
        precision="bf16-true",
    )
    assert _same(snaps.before[1], snaps.after[1])
    assert not _same(snaps.before[2][0], snaps.after[2][0])
    assert cb.counters()["skipped_steps"] == 1


@pytest.mark.parametrize("value", [math.nan, -math.inf])
def test_zero_policy_zeroes_the_step_gradients(value):
    after, snaps = Spy(), Snapshots()
    cb = GradStabCallback(max_norm=1.0, nonfinite="zero", log_every_n_steps=1)
    fit(seeded(lambda: Net(bad={1: value})), [snaps, cb, after], max_steps=3)
    assert all(float(g.abs().max()) == 0 for g in after.grads[1].values())
    assert any(float(g.abs().max()) > 0 for g in after.grads[2].values())
    assert _same(snaps.before[1][0], snaps.after[1][0])  # SGD without momentum: no move
    c = cb.counters()
    assert (c["nonfinite_steps"], c["skipped_steps"], c["steps"]) == (1, 0, 3)


def test_ignore_policy_lets_nan_through_and_counts_it():
    after = Spy()
    cb = GradStabCallback(max_norm=1.0, log_every_n_steps=2)
    model = seeded(lambda: Net(bad={1: math.nan}))
    fit(model, [cb, after], max_steps=2)
    assert all(torch.isnan(g).all() for g in after.grads[1].values())  # NaN coefficient
    assert torch.isnan(model.layer[0].weight).all()
    assert cb.last_metrics["grad/nonfinite_steps"] == 1
    assert math.isnan(cb.last_metrics["grad_2.0_norm_total"])


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": 1.0},  # the kernel checks before writing
        {"max_norm": {0: 1.0, 1: 2.0}},  # several units: a read-only check first
        {"mode": "layer", "max_norm": 0.1},
        {"mode": "layer", "max_norm": 0.1, "group_by": "module"},
        {"mode": "value", "clip_value": 0.01},
    ],
)
def test_raise_names_the_parameter_and_changes_nothing(kw):
    before = Spy()
    cb = GradStabCallback(nonfinite="raise", **kw)
    groups = isinstance(kw.get("max_norm"), dict)
    model = seeded(lambda: Net(bad={2: math.inf}, groups=groups))
    msg = r"non-finite gradient at optimizer step 2: parameter 'layer.2.weight' has 1 NaN/Inf"
    with pytest.raises(RuntimeError, match=msg):
        fit(model, [before, cb], max_steps=4)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad.double(), before.grads[-1][n]), n


# ---------------------------------------------------------------------------------- logging


def test_logged_keys_in_csv(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    cb = GradStabCallback(max_norm=0.5, log_every_n_steps=2, log_per_layer=True)
    fit(seeded(Net), [cb], max_steps=6, logger=logger, log_every_n_steps=1)
    path = tmp_path / "run" / "version_0" / "metrics.csv"
    rows = list(csv.DictReader(path.open()))
    ours = [r for r in rows if r.get("grad_2.0_norm_total")]
    assert [int(r["step"]) for r in ours] == [1, 3, 5]
    expected = {
        "grad_2.0_norm_total",
        "grad/post_clip_norm_total",
        "grad/clip_coef",
        "grad/clip_rate",
        "grad/nonfinite_steps",
        "grad/skipped_steps",
        *(f"grad_2.0_norm/{n}" for n in NAMES),
        *(f"grad/max_abs/{n}" for n in NAMES),
    }
    assert expected <= set(rows[0])
    for k in expected:
        assert float(ours[-1][k]) == pytest.approx(cb.last_metrics[k], rel=1e-6)
    assert float(ours[-1]["grad/clip_rate"]) == 1.0
    assert float(ours[-1]["grad/post_clip_norm_total"]) == pytest.approx(0.5, rel=1e-5)


def test_log_every_defaults_to_the_trainers(tmp_path):
    cb = GradStabCallback(max_norm=0.5)
    logged = []

    class Logger(CSVLogger):
        def log_metrics(self, metrics, step=None):
            if "grad_2.0_norm_total" in metrics:
                logged.append(step)
            super().log_metrics(metrics, step)

    fit(seeded(Net), [cb], max_steps=7, logger=Logger(tmp_path), log_every_n_steps=3)
    assert logged == [2, 5]
    assert cb.last_metrics["grad/clip_rate"] == 1.0


class HostReads:
    """Counts host reads of tensor values between ``start()`` and ``stop()``."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self, monkeypatch):
        self.active = False
        self.count = 0
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)

            def counted(t, *args, _orig=orig, **kw):
                # the pure-PyTorch kernel reads CPU values by design (free there): not counted
                if self.active and sys._getframe(1).f_code.co_filename != reference.__file__:
                    self.count += 1
                return _orig(t, *args, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def start(self):
        self.count, self.active = 0, True

    def stop(self) -> int:
        self.active = False
        return self.count


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": 0.5},
        {"max_norm": 0.5, "nonfinite": "zero"},
        {"mode": "layer", "max_norm": 0.1, "log_per_layer": True},
        {"mode": "layer", "max_norm": 0.1, "group_by": "module"},
        {"mode": "value", "clip_value": 0.01},
        {"mode": None},
        {"max_norm": {1: 0.1}},
    ],
)
def test_no_host_read_on_steps_that_do_not_log(kw, monkeypatch):
    # pretend the gradients live on an accelerator, where "zero" must not read its flag
    monkeypatch.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
    reads = HostReads(monkeypatch)
    counts = []

    class Start(pl.Callback):
        def on_before_optimizer_step(self, *args):
            reads.start()

    class Stop(pl.Callback):
        def on_before_optimizer_step(self, *args):
            counts.append(reads.stop())

    cb = GradStabCallback(log_every_n_steps=3, **kw)
    fit(seeded(lambda: Net(groups=True)), [Start(), cb, Stop()], max_steps=6)
    assert counts[0] == counts[1] == counts[3] == counts[4] == 0
    assert counts[2] >= 1 and counts[5] >= 1  # logging steps read (the counter does count)


# ---------------------------------------------------------------------------------- state


def _resume_callback():
    return GradStabCallback(max_norm=1e-3, nonfinite="skip", log_every_n_steps=3)


def test_checkpoint_resume_continues_counts_exactly(tmp_path):
    bad = {2: math.nan, 5: math.inf}
    full = _resume_callback()
    fit(seeded(lambda: Net(bad=bad)), [full], max_steps=8)

    first = _resume_callback()
    trainer = fit(seeded(lambda: Net(bad=bad)), [first], max_steps=4)
    ckpt = tmp_path / "half.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=False)["callbacks"][first.state_key]
    assert saved == first.state_dict()
    assert saved["optimizers"][0] == {
        "steps": 4,
        "clipped_steps": 3,
        "nonfinite_steps": 1,
        "skipped_steps": 1,
        "window_steps": 1,
        "window_clipped": 1,
    }

    second = _resume_callback()
    make_trainer([second], max_steps=8).fit(seeded(lambda: Net(bad=bad)), ckpt_path=ckpt)
    assert second.state_dict() == full.state_dict()
    assert second.counters() == {
        "steps": 8,
        "clipped_steps": 6,
        "nonfinite_steps": 2,
        "skipped_steps": 2,
    }
    # the log at step 6 covers steps 4-6, across the resume: 2 of 3 clipped (step 6 skipped)
    counted = ("grad/clip_rate", "grad/nonfinite_steps", "grad/skipped_steps")
    for k in counted:
        assert second.last_metrics[k] == full.last_metrics[k]
    assert second.last_metrics["grad/clip_rate"] == pytest.approx(2 / 3)


def test_state_dict_defaults_and_two_instances(tmp_path):
    cb = GradStabCallback(max_norm=1.0)
    cb.load_state_dict({"optimizers": {0: {"steps": 7}}})
    assert cb.counters() == {
        "steps": 7,
        "clipped_steps": 0,
        "nonfinite_steps": 0,
        "skipped_steps": 0,
    }
    cb.load_state_dict({})
    assert cb.counters()["steps"] == 0

    a = GradStabCallback(max_norm=1e-3)
    b = GradStabCallback(mode=None, log_prefix="watch", log_every_n_steps=1)
    assert a.state_key != b.state_key
    trainer = fit(seeded(Net), [b, a], max_steps=3)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=False)["callbacks"]
    assert saved[a.state_key]["optimizers"][0]["clipped_steps"] == 3
    assert saved[b.state_key]["optimizers"][0]["steps"] == 3
    assert b.last_metrics["watch/clip_rate"] == 0.0
    # the monitor sits before the clip: it sees the pre-clip norm, which the clip then caps
    assert b.last_metrics["watch/clip_coef"] == 1.0
    assert b.last_metrics["grad_2.0_norm_total"] > 1e-3


def test_pickle_round_trip():
    cb = GradStabCallback(mode="layer", max_norm={0: 0.5}, group_by="module", log_every_n_steps=2)
    fresh = pickle.loads(pickle.dumps(cb))
    assert fresh.state_key == cb.state_key
    fit(seeded(Net), [cb], max_steps=3)
    clone = pickle.loads(pickle.dumps(cb))
    assert clone.state_dict() == cb.state_dict()
    assert clone.counters()["steps"] == 3
    assert copy.deepcopy(cb).state_dict() == cb.state_dict()
    fit(seeded(Net), [clone], max_steps=2)  # the clone trains on
    assert clone.counters()["steps"] == 5


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"max_norm": -1.0}, ValueError, "max_norm must be a positive finite number; got -1.0"),
        ({"max_norm": 0}, ValueError, "max_norm must be a positive finite number; got 0"),
        ({"max_norm": math.nan}, ValueError, "max_norm must be a positive finite number; got nan"),
        ({"max_norm": "1"}, TypeError, "max_norm must be a positive finite number.*got '1'"),
        ({"max_norm": True}, TypeError, "max_norm .*got True"),
        (
            {"max_norm": {0: -2}},
            ValueError,
            r"max_norm\[0\] must be a positive finite number; got -2",
        ),
        ({"max_norm": {"a": 1}}, TypeError, "the keys of max_norm must be param group indices"),
        ({"max_norm": {}}, ValueError, "max_norm as a dict must name at least one param group"),
        ({}, ValueError, "mode='norm' needs max_norm"),
        ({"mode": "value", "max_norm": 1.0}, ValueError, "mode='value' needs clip_value"),
        ({"mode": "value", "clip_value": 1, "max_norm": 1}, ValueError, "max_norm=1 is not used"),
        ({"mode": None, "max_norm": 1.0}, ValueError, "mode=None only monitors, so max_norm=1.0"),
        ({"mode": "global", "max_norm": 1.0}, ValueError, "mode must be one of .*got 'global'"),
        ({"max_norm": 1, "norm_type": 0}, ValueError, "norm_type must be a positive number"),
        ({"max_norm": 1, "norm_type": "two"}, ValueError, "norm_type .*'two'"),
        (
            {"max_norm": 1, "group_by": "module"},
            ValueError,
            "group_by='module' .* needs mode='layer'",
        ),
        (
            {"mode": "layer", "max_norm": 1, "group_by": "tensor"},
            ValueError,
            "group_by must be one",
        ),
        ({"max_norm": 1, "nonfinite": "drop"}, ValueError, "nonfinite must be one of .*got 'drop'"),
        ({"max_norm": 1, "log_every_n_steps": -1}, ValueError, "log_every_n_steps must be >= 0"),
        ({"max_norm": 1, "log_every_n_steps": 2.0}, TypeError, "log_every_n_steps must be .*2.0"),
        ({"max_norm": 1, "log_per_layer": 1}, TypeError, "log_per_layer must be True or False"),
        ({"max_norm": 1, "log_prefix": "a/"}, ValueError, "log_prefix must be .*got 'a/'"),
    ],
)
def test_constructor_errors_name_argument_and_value(kw, exc, match):
    with pytest.raises(exc, match=f"GradStabCallback: {match}"):
        GradStabCallback(**kw)


def test_positional_arguments_are_refused():
    with pytest.raises(TypeError):
        GradStabCallback("norm", 1.0)  # type: ignore[misc]


def test_refuses_trainer_gradient_clip_val():
    trainer = make_trainer([GradStabCallback(max_norm=1.0)], gradient_clip_val=0.5)
    with pytest.raises(MisconfigurationException, match=r"Trainer\(gradient_clip_val=0.5"):
        trainer.fit(seeded(Net))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_monitor_only_beside_lightning_gradient_clip_val(algorithm, caplog):
    """mode=None clips nothing: it runs next to Lightning's clipping, sees the gradients before
    Lightning clips them (Lightning clips after the callbacks' hook), and says so."""
    bound = 0.05 if algorithm == "norm" else 0.01
    clip = {"gradient_clip_val": bound, "gradient_clip_algorithm": algorithm}
    ref = seeded(Net)
    fit(ref, [], max_steps=4, **clip)
    before, after = Spy(), Spy()
    cb = GradStabCallback(mode=None, log_every_n_steps=1, history=4)
    ours = seeded(Net)
    with caplog.at_level("INFO"):
        fit(ours, [before, cb, after], max_steps=4, **clip)
    for a, b in zip(ref.parameters(), ours.parameters()):
        assert torch.equal(a, b)  # Lightning's clip alone decided the steps
    for b, a in zip(before.grads, after.grads):  # the callback changed no gradient
        assert all(torch.equal(b[n], a[n]) for n in NAMES)
    # what it logged and recorded is the pre-clip gradient (Lightning clips after the hook)
    pre = pnorm(before.grads[-1].values(), 2)
    assert pre > bound * 2  # so Lightning did clip
    assert cb.last_metrics["grad_2.0_norm_total"] == pytest.approx(pre, rel=1e-6)
    assert cb.history.data().total_norm[-1].item() == pytest.approx(pre, rel=1e-6)
    assert cb.counters()["steps"] == 4
    assert "monitors the gradients before Trainer(gradient_clip_val=" in caplog.text


def test_monitor_only_beside_a_gradstab_optimizer():
    class Wrapped(Net):
        def configure_optimizers(self):
            return GradStabOptimizer(torch.optim.SGD(self.parameters(), lr=0.1), max_norm=0.05)

    before = Spy()
    cb = GradStabCallback(mode=None, log_every_n_steps=1)
    model = seeded(Wrapped)
    trainer = fit(model, [before, cb], max_steps=3)
    assert cb.last_metrics["grad_2.0_norm_total"] == pytest.approx(
        pnorm(before.grads[-1].values(), 2), rel=1e-6
    )
    assert trainer.optimizers[0].counters()["clipped_steps"] == 3  # the wrapper clipped


class MemoryLogger(pl.loggers.Logger):
    """Keeps every ``log_metrics`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


def _gradstab_rows(logger: MemoryLogger) -> dict[int, dict[str, float]]:
    return {s: m for s, m in logger.rows if "grad/clip_coef" in m}


@pytest.mark.parametrize("policy", ["skip", "zero"])
def test_skipped_or_zeroed_step_logs_coefficient_zero(policy):
    logger = MemoryLogger()
    cb = GradStabCallback(max_norm=1.0, nonfinite=policy, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="NaN/Inf"):
        fit(seeded(lambda: Net(bad={2: math.nan})), [cb], max_steps=4, logger=logger)
    rows = _gradstab_rows(logger)
    assert rows[2]["grad/clip_coef"] == 0.0 and rows[2]["grad/post_clip_norm_total"] == 0.0
    assert all(0 < rows[s]["grad/clip_coef"] <= 1 for s in (0, 1, 3))


def test_ignored_nan_step_logs_a_nan_coefficient():
    logger = MemoryLogger()
    cb = GradStabCallback(max_norm=1.0, log_every_n_steps=1)
    with pytest.warns(UserWarning, match="1 with NaN/Inf gradients"):  # the fit-end line
        fit(seeded(lambda: Net(bad={1: math.nan})), [cb], max_steps=2, logger=logger)
    assert math.isnan(_gradstab_rows(logger)[1]["grad/clip_coef"])


def test_all_zero_gradients_log_coefficient_one():
    class Zero(Net):
        def on_after_backward(self):
            for p in self.parameters():
                p.grad.zero_()

    logger = MemoryLogger()
    cb = GradStabCallback(max_norm=1.0, log_every_n_steps=1)
    fit(seeded(Zero), [cb], max_steps=2, logger=logger)
    assert [m["grad/clip_coef"] for m in _gradstab_rows(logger).values()] == [1.0, 1.0]


def test_skipped_steps_warn_rate_limited_and_at_fit_end():
    """A NaN storm of 12 steps: warnings at the 1st and 10th skipped step, and the fit-end line
    with the counts."""
    cb = GradStabCallback(max_norm=1.0, nonfinite="skip", log_every_n_steps=0)
    model = seeded(lambda: Net(bad={s: math.nan for s in range(1, 13)}))
    with pytest.warns(UserWarning) as record:
        fit(model, [cb], max_steps=14)
    texts = [str(w.message) for w in record if "GradStabCallback" in str(w.message)]
    assert texts[0].startswith(
        "GradStabCallback: optimizer step 1 skipped: its gradients hold NaN/Inf values "
        "(nonfinite='skip'); 1 step skipped in this process. The next warning comes at 10 "
        "such steps"
    )
    assert texts[1].startswith("GradStabCallback: optimizer step 10 skipped")
    assert texts[2] == (
        "GradStabCallback(mode='norm', nonfinite='skip'): 14 optimizer steps, 2 clipped, 12 "
        "with NaN/Inf gradients, 12 skipped"
    )
    assert len(texts) == 3


def test_zeroed_step_warns_at_once_on_the_cpu():
    cb = GradStabCallback(max_norm=1.0, nonfinite="zero", log_every_n_steps=0)
    with pytest.warns(UserWarning) as record:
        fit(seeded(lambda: Net(bad={1: math.inf})), [cb], max_steps=3)
    texts = [str(w.message) for w in record if "GradStabCallback" in str(w.message)]
    assert texts[0].startswith(
        "GradStabCallback: optimizer step 1: its gradients hold NaN/Inf values and were zeroed"
    )
    assert texts[1].endswith("1 with NaN/Inf gradients, 0 skipped, 1 zeroed")


def test_zeroed_step_off_the_cpu_warns_when_the_counters_are_read(monkeypatch):
    """Off the CPU "zero" reads nothing on the host: its warning comes at the next logging
    step (simulated on the CPU by taking the device path)."""
    monkeypatch.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
    cb = GradStabCallback(max_norm=1.0, nonfinite="zero", log_every_n_steps=4)
    with pytest.warns(UserWarning) as record:
        fit(seeded(lambda: Net(bad={1: math.nan})), [cb], max_steps=6)
    texts = [str(w.message) for w in record if "GradStabCallback" in str(w.message)]
    assert texts[0].startswith(
        "GradStabCallback: NaN/Inf gradients were zeroed at some of the optimizer steps up to 3"
    )
    assert texts[1].endswith("1 zeroed")


def test_healthy_fit_ends_with_an_info_line(caplog, recwarn):
    cb = GradStabCallback(max_norm=0.05, nonfinite="skip")
    with caplog.at_level("INFO"):
        fit(seeded(Net), [cb], max_steps=3)
    assert (
        "GradStabCallback(mode='norm', nonfinite='skip'): 3 optimizer steps, 3 clipped, 0 with "
        "NaN/Inf gradients, 0 skipped"
    ) in caplog.text
    assert not [w for w in recwarn if "GradStabCallback" in str(w.message)]


def test_refuses_a_gradstab_optimizer():
    class Wrapped(Net):
        def configure_optimizers(self):
            return GradStabOptimizer(torch.optim.SGD(self.parameters(), lr=0.1), max_norm=1.0)

    with pytest.raises(MisconfigurationException, match="would both clip the same gradients"):
        fit(seeded(Wrapped), [GradStabCallback(max_norm=1.0)], max_steps=1)


def test_exported_lazily():
    assert gradstab.GradStabCallback is GradStabCallback
    assert "GradStabCallback" in gradstab.__all__
    assert re.search(r"lightning", GradStabCallback.__doc__ or "", re.I)
