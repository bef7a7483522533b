"""Prescriptions of gradstab.diagnose: each finding's likely cause and remedy, from evidence.

Small real networks trained for a few dozen CPU steps; every assertion is checked against
evidence independent of the code under test: the model's actual modules, the initial weights
copied before training, numpy percentiles of the recorded norms, a rerun with the prescribed
threshold, and the networks retrained after the remedy was applied.
"""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from torch import nn

import gradstab
from gradstab.diagnosis import HistoryData
from gradstab.diagnosis.prescriptions import prescribe

# --------------------------------------------------------------------------- helpers


def mlp(act: type[nn.Module], depth: int, width: int, d_in: int, d_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def scaled_normal_(model: nn.Module, std_times_sqrt_fan_in: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std_times_sqrt_fan_in / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)


def train_classifier(model, steps, *, lr=0.05, seed=0, d_in=16, classes=4):
    """SGD (momentum 0.9) on random classification batches; returns (history, losses)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    h = gradstab.GradHistory(model)
    losses = []
    for s in range(steps):
        x = torch.randn(32, d_in, generator=gen)
        y = (x[:, :classes].argmax(1) + (x[:, -1] > 0).long()) % classes
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.item())
        h.record_step(s)
        opt.step()
    return h, losses


def kinds(d) -> list[str]:
    return [p.kind for p in d.prescriptions]


def one(d, kind: str):
    found = [p for p in d.prescriptions if p.kind == kind]
    assert len(found) == 1, (kind, kinds(d), str(d))
    return found[0]


# --------------------------------------------------------------------------- vanishing


def sigmoid_net() -> nn.Sequential:
    torch.manual_seed(0)
    return mlp(nn.Sigmoid, depth=10, width=32, d_in=16, d_out=4)  # PyTorch's default init


def test_deep_sigmoid_mlp_gets_activation_normalisation_and_init_prescriptions():
    model = sigmoid_net()
    init = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    h, _ = train_classifier(model, steps=12)
    d = gradstab.diagnose(h)
    assert d.vanishing_gradients
    # the model's actual Sigmoid modules, named
    sigmoids = [n for n, m in model.named_modules() if isinstance(m, nn.Sigmoid)]
    assert len(sigmoids) == 10
    act = d.prescriptions[0]
    assert (act.rank, act.kind, act.finding) == (1, "activation", "vanishing")
    assert act.evidence["activations"] == sigmoids
    assert act.evidence["types"] == ["Sigmoid"]
    assert "init_model_" in act.call and "nn.ReLU" in act.remedy
    # normalisation: the model really has none
    assert not any(isinstance(m, (nn.LayerNorm, nn.BatchNorm1d)) for m in model.modules())
    norm = one(d, "normalization")
    assert norm.call == 'gradstab.norm.add_normalization_(model, kind="layer")'
    # init scale: the initial weights' std against Xavier (gain 1 before a Sigmoid and before
    # nothing), computed here from the copies taken before training
    ini = one(d, "init")
    rows = {r["layer"]: r for r in ini.evidence["layers"]}
    assert set(rows) == set(init)
    for name, w in init.items():
        fan_out, fan_in = w.shape
        xavier = math.sqrt(2.0 / (fan_in + fan_out))
        expected = float(w.double().pow(2).mean().sqrt()) / xavier
        assert rows[name]["ratio"] == pytest.approx(expected, rel=1e-5)
    assert ini.evidence["compounded"] == pytest.approx(
        math.prod(r["ratio"] for r in rows.values()), rel=1e-9
    )
    assert ini.evidence["compounded"] < 0.1
    # ranked; and a plain nn.Sequential stack of 11 layers: no skip connection possible
    assert kinds(d) == ["activation", "normalization", "init", "residual"]
    text = str(d)
    assert "prescriptions" in text and "'1', '3', '5'" in text and "Sigmoid" in text
    assert "add_normalization_" in text


def test_applying_the_sigmoid_prescription_makes_the_net_healthy():
    model = sigmoid_net()
    d = gradstab.diagnose(train_classifier(model, steps=12)[0])
    names = one(d, "activation").evidence["activations"]
    for name in names:  # the remedy, as prescribed
        setattr(model, name, nn.ReLU())
    gradstab.norm.add_normalization_(model, kind="layer")
    gradstab.init.init_model_(model, generator=torch.Generator().manual_seed(0))
    d2 = gradstab.diagnose(train_classifier(model, steps=12)[0])
    assert d2.healthy, str(d2)
    assert d2.prescriptions == []


def test_without_the_model_the_vanishing_cause_is_left_open():
    model = sigmoid_net()
    h, _ = train_classifier(model, steps=12)
    d = gradstab.diagnose(h.data())  # host data: no model
    assert d.vanishing_gradients
    assert kinds(d) == ["need-model"]
    assert d.prescriptions[0].missing and d.evidence_missing
    assert "model=" in d.prescriptions[0].call
    # the same history diagnosed with the model gets the model-based prescriptions
    assert kinds(gradstab.diagnose(h.data(), model=model))[0] == "activation"
    # a model whose names do not match is no evidence, and says so
    other = gradstab.diagnose(h.data(), model=nn.Sequential(nn.Linear(2, 2)))
    assert kinds(other) == ["need-model"]
    assert any("names" in m for m in other.evidence_missing)


# --------------------------------------------------------------------------- exploding


def relu_too_large() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=8, width=64, d_in=16, d_out=4)
    scaled_normal_(model, 2.0)  # He for ReLU is sqrt(2): twice its variance
    return model


def test_relu_net_initialised_too_large_gets_the_init_prescription():
    model = relu_too_large()
    init = {
        n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)
    }
    h, losses = train_classifier(model, steps=20)
    assert not all(math.isfinite(v) for v in losses)  # oracle: it really blew up
    d = gradstab.diagnose(h)
    assert d.exploding
    assert kinds(d) == ["clip", "init"]  # no vanishing remedy for an exploding net
    ini = one(d, "init")
    assert ini.finding == "exploding" and ini.call.startswith("gradstab.init.init_model_(model)")
    rows = {r["layer"]: r for r in ini.evidence["layers"]}
    assert set(rows) == set(init)
    output = list(init)[-1]
    for name, w in init.items():
        fan_out, fan_in = w.shape
        target = (
            math.sqrt(2.0 / (fan_in + fan_out))  # the output layer: no activation, Xavier
            if name == output
            else math.sqrt(2.0 / fan_in)  # He for the ReLU that follows
        )
        assert rows[name]["ratio"] == pytest.approx(
            float(w.double().pow(2).mean().sqrt()) / target, rel=1e-5
        )
    assert ini.evidence["compounded"] > 10
    assert ini.evidence["weights_from"] == ["weights at step 0"]


def test_init_prescription_needs_weights_off_scale():
    """The same exploding history with the weights re-initialised by init_model_ (and no
    parameter norms, so the current weights are read): no init prescription."""
    model = relu_too_large()
    h, _ = train_classifier(model, steps=20)
    data = h.data()
    d = gradstab.diagnose(data, model=model)
    assert "init" in kinds(d)
    with torch.no_grad():
        gradstab.init.init_model_(model, generator=torch.Generator().manual_seed(0))
    no_pn = HistoryData(**{**data.__dict__, "param_norms": None})
    d2 = gradstab.diagnose(no_pn, model=model)
    assert d2.exploding and "clip" in kinds(d2) and "init" not in kinds(d2)


OUTLIERS = (30, 45, 60)
STEPS = 80


def train_with_outliers(max_norm=None, nonfinite="skip", outliers=OUTLIERS):
    """A He-initialised ReLU regression net; at ``outliers`` a batch 300x too large arrives."""
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=2, width=64, d_in=16, d_out=1)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if max_norm is not None:
        opt = gradstab.GradStabOptimizer(opt, max_norm=max_norm, nonfinite=nonfinite)
    h = gradstab.GradHistory(model)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for s in range(STEPS):
        x = torch.randn(32, 16, generator=gen)
        y = 2 * x[:, :1]
        if s in outliers:
            x = 300 * x
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        h.record_step(s)
        opt.step()
    return model, h, losses


def test_exploding_net_gets_a_threshold_its_clip_rate_and_it_keeps_a_rerun_finite():
    _, h, losses = train_with_outliers()
    assert not math.isfinite(losses[-1])  # oracle: without clipping the run dies
    d = gradstab.diagnose(h)
    # He-initialised: no init prescription; exploding: no vanishing remedy
    assert kinds(d) == ["clip"]
    clip = d.prescriptions[0]
    assert (clip.kind, clip.finding, clip.rank) == ("clip", "exploding", 1)
    total = h.data().total_norm.numpy()
    # the healthy steps: every step before the first outlier batch (the net is NaN after it)
    p95 = float(np.percentile(total[: OUTLIERS[0]], 95))
    thr = clip.evidence["threshold"]
    assert p95 <= thr <= p95 * 1.01  # rounded up to 3 significant digits
    assert clip.evidence["healthy_steps"] == list(range(OUTLIERS[0]))
    finite = total[np.isfinite(total)]
    would = int((finite > thr).sum())
    assert clip.evidence["would_clip"] == would and clip.evidence["steps"] == STEPS
    assert clip.evidence["clip_fraction"] == pytest.approx(would / STEPS)
    assert clip.evidence["nonfinite_steps"] == int((~np.isfinite(total)).sum())
    assert f"would have clipped {would} of {STEPS} steps" in str(d)
    assert OUTLIERS[0] in clip.evidence["spike_steps"]
    # the one-line callback; rerun with exactly what it says
    m = re.fullmatch(
        r'gradstab\.GradStabCallback\(max_norm=([0-9.e+-]+), nonfinite="skip"\)', clip.call
    )
    assert m is not None and float(m.group(1)) == thr
    model2, _, losses2 = train_with_outliers(max_norm=float(m.group(1)))
    assert all(math.isfinite(v) for v in losses2)
    assert all(bool(torch.isfinite(p).all()) for p in model2.parameters())


def test_few_healthy_steps_get_an_adaptive_threshold_capped_at_the_upper_bound():
    early = (3, *range(10, STEPS, 7))  # 3 healthy steps, then outliers every 7 steps
    _, h, losses = train_with_outliers(outliers=early)
    assert not math.isfinite(losses[-1])  # oracle: without clipping the run dies
    clip = one(gradstab.diagnose(h), "clip")
    thr = clip.evidence["threshold"]
    assert clip.evidence["healthy_steps"] == [0, 1, 2] and clip.evidence["adaptive"]
    want = (
        "gradstab.GradStabCallback(max_norm=gradstab.PercentileThreshold(10, "
        f'include_current=False, max_norm={thr:g}), nonfinite="skip")'
    )
    assert clip.call == want and "too few to fix a threshold" in clip.remedy
    cb = eval(clip.call, {"gradstab": gradstab})  # the call is valid code
    assert isinstance(cb.max_norm, gradstab.PercentileThreshold)
    assert cb.max_norm.max_norm == thr and cb.nonfinite == "skip"
    # rerun with it: finite, and it still learns (the fixed upper bound alone keeps the run
    # finite but lets the outliers' norm through at every one of them)
    bound = gradstab.PercentileThreshold(10, include_current=False, max_norm=thr)
    _, _, adaptive = train_with_outliers(max_norm=bound, outliers=early)
    _, _, fixed = train_with_outliers(max_norm=thr, outliers=early)
    assert all(math.isfinite(v) for v in adaptive)
    normal = [i for i in range(40, STEPS) if i not in early]
    assert np.median([adaptive[i] for i in normal]) < np.median([fixed[i] for i in normal])
    assert np.median([adaptive[i] for i in normal]) < adaptive[0]


def test_steady_growth_gets_lr_decay_and_a_flat_run_with_a_spike_does_not():
    gen = torch.Generator().manual_seed(0)
    s_n = 60
    noise = 1 + 0.1 * torch.rand(s_n, 4, generator=gen, dtype=torch.float64)
    growth = torch.logspace(0, 7, s_n, dtype=torch.float64)[:, None] * noise  # 1 -> 1e7
    flat = noise.clone()
    flat[40] *= 1e4  # one spike

    def data(norms):
        return HistoryData(
            names=[f"w{i}" for i in range(4)],
            steps=list(range(s_n)),
            norms=norms,
            present=torch.ones(s_n, 4, dtype=torch.bool),
            total_norm=norms.pow(2).sum(1).sqrt(),
        )

    d = gradstab.diagnose(data(growth))
    assert d.exploding
    lr = one(d, "lr-decay")
    assert lr.evidence["growth"] == pytest.approx(1e7, rel=0.3)
    assert lr.evidence["r2"] > 0.95
    d2 = gradstab.diagnose(data(flat))
    assert [s.step for s in d2.spikes] == [40]
    assert "lr-decay" not in kinds(d2) and kinds(d2)[0] == "clip"


# --------------------------------------------------------------------------- recurrent


class RNNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.RNN(4, 32, batch_first=True)
        self.fc = nn.Linear(32, 1)
        with torch.no_grad():
            self.rnn.weight_hh_l0.mul_(2.0)  # recurrent weights twice PyTorch's default scale

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.fc(out[:, -1])


def train_rnn(max_norm=None, orthogonal=False, steps=60):
    torch.manual_seed(0)
    model = RNNNet()
    if orthogonal:
        gradstab.init.init_model_(model, {"fc": None}, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if max_norm is not None:
        opt = gradstab.GradStabOptimizer(opt, max_norm=max_norm, nonfinite="skip")
    h = gradstab.GradHistory(model)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for s in range(steps):
        x = torch.randn(16, 40, 4, generator=gen)
        y = x[:, :5, 0].sum(1, keepdim=True)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        losses.append(loss.item())
        h.record_step(s)
        opt.step()
    return model, h, losses


def test_rnn_gets_orthogonal_recurrent_init_and_clipping():
    model, h, _ = train_rnn()
    norms = h.data().total_norm
    # oracle: the gradient exploded (on some CPUs torch's RNN reaches inf/NaN within the 60
    # steps, so the largest finite norm is the one to look at)
    assert float(norms[torch.isfinite(norms)].max()) > 1e6
    d = gradstab.diagnose(h)
    assert d.exploding
    assert kinds(d)[:2] == ["clip", "recurrent-init"]
    assert not {"activation", "normalization", "residual"} & set(kinds(d))
    rec = one(d, "recurrent-init")
    assert rec.call == "gradstab.init.init_model_(model)"
    (w,) = rec.evidence["recurrent_weights"]
    assert w["weight"] == "rnn.weight_hh_l0"
    weight = model.rnn.weight_hh_l0.detach().double()
    assert w["finite"] == bool(torch.isfinite(weight).all())
    if w["finite"]:  # where torch's RNN reached NaN the weights have no singular values
        sv = torch.linalg.svdvals(weight)
        assert w["max_singular_value"] == pytest.approx(float(sv.max()), rel=1e-9)
        assert w["min_singular_value"] == pytest.approx(float(sv.min()), rel=1e-9)
    thr = one(d, "clip").evidence["threshold"]
    assert f"{thr:g}" in rec.remedy  # the recurrent remedy names the clip it goes with
    # applying both: orthogonal recurrent weights (singular values 1) and the threshold
    _, _, losses2 = train_rnn(max_norm=thr, orthogonal=True)
    assert all(math.isfinite(v) for v in losses2)
    m = RNNNet()
    gradstab.init.init_model_(m, {"fc": None})
    assert torch.allclose(torch.linalg.svdvals(m.rnn.weight_hh_l0.detach()), torch.ones(32))


# --------------------------------------------------------------------------- healthy, other


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_net_gets_no_prescription(seed):
    torch.manual_seed(seed)
    model = mlp(nn.ReLU, depth=3, width=64, d_in=16, d_out=4)
    gradstab.init.init_model_(model, generator=torch.Generator().manual_seed(seed))
    h, _ = train_classifier(model, steps=30, lr=0.01, seed=seed)
    d = gradstab.diagnose(h)
    assert d.healthy, str(d)
    assert d.prescriptions == [] and d.evidence_missing == []
    assert d.to_dict()["prescriptions"] == []
    assert "prescriptions" not in str(d)


def test_nan_without_a_rise_is_a_numerical_fault_not_an_explosion():
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=3, width=32, d_in=8, d_out=1)
    gradstab.init.init_model_(model, generator=torch.Generator().manual_seed(0))
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), mode=None, nonfinite="skip"
    )
    h = gradstab.GradHistory(model)
    for s in range(20):
        opt.zero_grad()
        out = model(torch.randn(16, 8))
        loss = out.pow(2).mean()
        if s == 12:  # a numerical fault: sqrt's derivative at 0 is infinite, times 0 is NaN
            loss = loss + (0 * out.sum()).sqrt()
        loss.backward()
        h.record_step(s)
        opt.step()
    d = gradstab.diagnose(h)
    assert d.nonfinite is not None and d.nonfinite.step == 12
    assert kinds(d) == ["skip-nonfinite"]
    p = d.prescriptions[0]
    assert p.call == 'gradstab.GradStabCallback(nonfinite="skip")'
    assert p.evidence["first_step"] == 12


def test_every_prescription_and_its_evidence_is_in_to_dict():
    model = sigmoid_net()
    d = gradstab.diagnose(train_classifier(model, steps=12)[0])
    _, h, _ = train_with_outliers()
    for diag in (d, gradstab.diagnose(h)):
        blob = json.loads(json.dumps(diag.to_dict()))
        assert len(blob["prescriptions"]) == len(diag.prescriptions) > 0
        for p, q in zip(diag.prescriptions, blob["prescriptions"]):
            assert q["rank"] == p.rank and q["kind"] == p.kind and q["call"] == p.call
            assert q["cause"] == p.cause and q["evidence"]
            assert set(q["evidence"]) == set(p.evidence)
        assert [q["rank"] for q in blob["prescriptions"]] == list(
            range(1, len(diag.prescriptions) + 1)
        )


def test_prescribe_is_empty_for_an_empty_or_healthy_history():
    h = gradstab.GradHistory(nn.Linear(3, 1))
    assert prescribe(gradstab.diagnose(h), h.data(), h.model) == ([], [])


def test_optimizer_with_and_without_module():
    for module in (True, False):
        model = sigmoid_net()
        kw = {"module": model} if module else {}
        wrap = lambda opt, kw=kw: gradstab.GradStabOptimizer(opt, mode=None, history=20, **kw)  # noqa: E731
        gen = torch.Generator().manual_seed(0)
        opt = wrap(torch.optim.SGD(model.parameters(), lr=0.05))
        for _ in range(10):
            opt.zero_grad()
            x = torch.randn(32, 16, generator=gen)
            nn.functional.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
            opt.step()
        d = opt.diagnose()
        assert d.vanishing_gradients
        assert kinds(d)[0] == ("activation" if module else "need-model")


def test_clip_percentile_is_validated_and_used():
    _, h, _ = train_with_outliers()
    total = h.data().total_norm.numpy()[: OUTLIERS[0]]
    d = gradstab.diagnose(h, clip_percentile=50)
    thr = one(d, "clip").evidence["threshold"]
    assert float(np.median(total)) <= thr <= float(np.median(total)) * 1.01
    for bad in (0, -1, 101, float("nan")):
        with pytest.raises(ValueError, match="clip_percentile"):
            gradstab.diagnose(h, clip_percentile=bad)
