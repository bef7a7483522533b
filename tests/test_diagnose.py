"""gradstab.GradHistory (device-side recorder) and gradstab.diagnose (the detector).

The recorder is checked against PyTorch's own float64 norms; the detector on networks whose
behaviour is known: a deep sigmoid MLP (vanishing toward the input), a deep tanh MLP with a
large init (exploding toward the input), unused/detached/zero-gradient parameters and dead
ReLU units (dead), injected NaNs (first step and parameter), and healthy Kaiming-initialised
ReLU MLPs (no false alarm).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import gradstab
from gradstab.diagnosis import GradHistory, HistoryData, diagnose

# --------------------------------------------------------------------------- helpers


def mlp(act: type[nn.Module] | None, depth: int, width: int, d_in: int, init=None) -> nn.Sequential:
    """``depth`` Linear layers (the last one to 1 output) with ``act`` between them."""
    layers: list[nn.Module] = []
    d = d_in
    for i in range(depth):
        out = width if i < depth - 1 else 1
        lin = nn.Linear(d, out)
        if init is not None:
            init(lin)
        layers.append(lin)
        if i < depth - 1 and act is not None:
            layers.append(act())
        d = out
    return nn.Sequential(*layers)


def normal_init(std_times_sqrt_fan_in: float):
    def init(lin: nn.Linear) -> None:
        nn.init.normal_(lin.weight, 0.0, std_times_sqrt_fan_in / math.sqrt(lin.in_features))
        nn.init.zeros_(lin.bias)

    return init


def kaiming(lin: nn.Linear) -> None:
    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
    nn.init.zeros_(lin.bias)


def train(model: nn.Module, steps: int, d_in: int, lr: float = 1e-2, seed: int = 0, **kw):
    """SGD on random regression data; records every step; returns (history, last grads)."""
    gen = torch.Generator().manual_seed(seed)
    h = GradHistory(model, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for s in range(steps):
        opt.zero_grad()
        x = torch.randn(64, d_in, generator=gen)
        y = torch.randn(64, 1, generator=gen)
        nn.functional.mse_loss(model(x), y).backward()
        h.record_step(s)
        opt.step()
    return h


# --------------------------------------------------------------------------- the detector


def test_sigmoid_mlp_vanishes_in_first_layers():
    torch.manual_seed(0)
    model = mlp(nn.Sigmoid, depth=20, width=32, d_in=16)  # PyTorch's default init
    h = train(model, steps=6, d_in=16)
    d = gradstab.diagnose(h)
    # oracle, independent of the detector: the first layer's gradient is far below the last's
    first, last = model[0].weight.grad.norm(), model[38].weight.grad.norm()
    assert first < 1e-8 * last
    assert d.vanishing_gradients and not d.healthy
    for name in ("0.weight", "0.bias", "2.weight", "4.weight"):
        assert name in d.vanishing
    for name in ("36.weight", "38.weight", "38.bias"):
        assert name not in d.vanishing
    assert d.depth_trend is not None and d.depth_trend.direction == "vanishing"
    assert d.depth_trend.growth_toward_input < 0.5
    assert d.depth_trend.decades_toward_input < -10
    # the healthy output end is not called "exploding" (the depth trend explains it)
    assert not d.exploding and d.exploding_layers == []
    assert d.nonfinite is None and d.dead == []
    text = str(d)
    assert "vanishing" in text and "0.weight" in text
    worst = sorted(d.layers, key=lambda r: r.decades_vs_median)[0]
    assert worst.name in ("0.weight", "0.bias") and "vanishing" in worst.status


def test_tanh_mlp_with_large_init_explodes_toward_the_input():
    torch.manual_seed(0)
    model = mlp(nn.Tanh, depth=20, width=32, d_in=16, init=normal_init(5.0))
    h = train(model, steps=5, d_in=16, lr=0.0)  # backpropagate only: the init stays
    d = gradstab.diagnose(h)
    grads = [model[2 * i].weight.grad.norm().item() for i in range(20)]
    assert grads[0] > 100 * grads[-1]  # oracle: norms really grow toward the input
    assert d.exploding and not d.healthy
    assert d.depth_trend is not None and d.depth_trend.direction == "exploding"
    (dt,) = [t for t in d.depth_trends if t.kind == "weight"]
    assert dt.direction == "exploding"
    assert dt.growth_toward_input > 1.2 and dt.decades_toward_input >= 2
    assert dt.layers == [f"{2 * i}.weight" for i in range(20)]
    # the small output end is not called "vanishing" (the depth trend explains it)
    assert d.vanishing == []
    assert "exploding gradients by depth" in str(d)


def test_relu_mlp_with_large_init_has_huge_norms():
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=20, width=32, d_in=16, init=normal_init(3.0))
    h = train(model, steps=3, d_in=16, lr=0.0)
    d = gradstab.diagnose(h)
    assert d.exploding
    assert d.large_steps == [0, 1, 2]
    assert float(h.data().total_norm.min()) > 1e6


@pytest.mark.parametrize("seed", [0, 1])
def test_healthy_relu_mlp_raises_no_alarm(seed):
    torch.manual_seed(seed)
    model = mlp(nn.ReLU, depth=4, width=64, d_in=16, init=kaiming)
    h = train(model, steps=20, d_in=16, lr=1e-2, seed=seed, track_units=True)
    d = gradstab.diagnose(h)
    assert d.healthy, str(d)
    assert d.findings() == []
    assert "healthy" in str(d)
    assert d.depth_trend is not None and d.depth_trend.direction == "flat"


class _DeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 16)
        self.unused = nn.Linear(16, 4)  # never called
        self.det = nn.Linear(16, 16)  # output detached
        self.zeroed = nn.Linear(16, 16)  # output multiplied by 0: gradient exactly zero
        self.c = nn.Linear(16, 1)
        with torch.no_grad():
            self.b.bias[:3] = -1e3  # units 0..2 of b never fire: dead ReLU units

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.b(h))
        h = h + 0.1 * self.det(h).detach() + 0.0 * self.zeroed(h)
        return self.c(h)


def test_unused_detached_zero_and_dead_units_are_reported():
    torch.manual_seed(0)
    model = _DeadNet()
    h = train(model, steps=8, d_in=8, lr=1e-3, track_units=True)
    d = gradstab.diagnose(h)
    kinds = {x.name: x.kind for x in d.dead}
    assert kinds["unused.weight"] == kinds["unused.bias"] == "no-grad"
    assert kinds["det.weight"] == kinds["det.bias"] == "no-grad"
    assert kinds["zeroed.weight"] == kinds["zeroed.bias"] == "zero"
    units = [x for x in d.dead if x.kind == "units"]
    assert len(units) == 1
    assert units[0].name == "b" and units[0].units == [0, 1, 2] and units[0].total_units == 16
    assert units[0].params == ["b.weight", "b.bias"]
    # oracle: those rows really had zero gradient, the others not
    assert torch.all(model.b.weight.grad[:3] == 0) and torch.all(
        model.b.weight.grad[3:].abs().sum(1) > 0
    )
    for name in ("a.weight", "a.bias", "c.weight", "c.bias"):
        assert name not in kinds
    rows = {r.name: r for r in d.layers}
    assert "no-grad" in rows["unused.weight"].status and "dead" in rows["zeroed.bias"].status
    assert "dead-units" in rows["b.weight"].status
    assert not d.healthy and "dead:" in str(d)


def test_dead_units_need_all_steps_zero():
    # a unit with a non-zero gradient at one step of the window is not dead
    h = GradHistory.from_names(["l.weight", "l.bias"], shapes=[(3, 2), (3,)], track_units=True)
    for step in range(4):
        gw = torch.zeros(3, 2)
        gb = torch.zeros(3)
        gw[2] = 1.0
        gb[2] = 1.0
        if step == 1:
            gw[1, 0] = 0.5  # unit 1 fires once
        stats = gradstab.grad_stats([_p(gw), _p(gb)])
        h.record(stats, ["l.weight", "l.bias"], grads=[gw, gb], step=step)
    d = diagnose(h)
    units = [x for x in d.dead if x.kind == "units"]
    assert [u.units for u in units] == [[0]]
    # a window after the firing step: unit 1 is dead there too
    d2 = diagnose(h, window=2)
    assert [u.units for u in d2.dead if u.kind == "units"] == [[0, 1]]


def _p(g: torch.Tensor) -> torch.Tensor:
    p = torch.zeros_like(g, requires_grad=True)
    p.grad = g
    return p


def test_nan_injected_in_one_gradient_is_located():
    torch.manual_seed(0)
    model = mlp(nn.Tanh, depth=6, width=16, d_in=8)
    h = GradHistory(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for s in range(10):
        opt.zero_grad()
        model(torch.randn(16, 8)).pow(2).mean().backward()
        if s == 4:
            model[4].weight.grad[1, 2] = float("nan")
        if s == 6:
            model[2].bias.grad[0] = float("inf")
        h.record_step(s)
        if s not in (4, 6):  # skip the poisoned steps, as the skip policy would
            opt.step()
    d = gradstab.diagnose(h)
    nf = d.nonfinite
    assert nf is not None and nf.exact
    assert nf.step == 4 and nf.origin == "4.weight" and nf.affected == ["4.weight"]
    assert nf.steps == [4, 6]
    rows = {r.name: r for r in d.layers}
    assert rows["4.weight"].status[0] == "nonfinite-origin"
    assert rows["4.weight"].nonfinite_steps == 1
    assert "nonfinite" in rows["2.bias"].status
    assert rows["0.weight"].nonfinite_steps == 0
    assert "step 4" in str(d) and "'4.weight'" in str(d)


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (a NaN born inside the backward pass)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def test_nan_born_in_backward_origin_is_first_in_backward_order():
    torch.manual_seed(0)
    lins = nn.ModuleList([nn.Linear(8, 8) for _ in range(5)])
    names = [n for n, _ in lins.named_parameters()]
    h = GradHistory(lins)
    for s in range(3):
        lins.zero_grad()
        x = torch.randn(4, 8)
        for i, lin in enumerate(lins):
            x = torch.tanh(lin(x))
            if s == 2 and i == 2:
                x = _NanGrad.apply(x)  # gradients of layers 0..2 become NaN
        x.sum().backward()
        h.record_step(s)
    nf = gradstab.diagnose(h).nonfinite
    assert nf is not None and nf.step == 2
    assert nf.affected == names[:6]  # 0.weight .. 2.bias, network order
    assert nf.origin == "2.bias" and nf.first_in_network_order == "0.weight"


def test_first_nonfinite_survives_the_ring_buffer():
    w = nn.Parameter(torch.zeros(3))
    h = GradHistory([("w", w)], capacity=4)
    for s in range(10):
        w.grad = torch.full((3,), float("nan") if s == 1 else 1.0)
        h.record_step(s)
    data = h.data()
    assert data.steps == [6, 7, 8, 9]
    assert data.first_nonfinite == (1, ["w"])
    d = diagnose(h)
    assert d.nonfinite is not None and d.nonfinite.step == 1 and d.nonfinite.steps == []


def test_total_norm_spike_is_reported_at_its_step():
    torch.manual_seed(0)
    model = mlp(nn.ReLU, depth=3, width=32, d_in=8, init=kaiming)
    h = GradHistory(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for s in range(30):
        opt.zero_grad()
        loss = model(torch.randn(32, 8)).pow(2).mean()
        (loss * (1000.0 if s == 20 else 1.0)).backward()
        h.record_step(s)
        if s != 20:
            opt.step()
    d = gradstab.diagnose(h)
    assert [sp.step for sp in d.spikes] == [20]
    sp = d.spikes[0]
    assert 300 < sp.ratio < 3000 and sp.robust_z >= 6
    assert d.exploding and d.vanishing == []
    assert "spike" in str(d)


def _data(norm_rows: list[list[float]], names: list[str], shapes=None) -> HistoryData:
    norms = torch.tensor(norm_rows, dtype=torch.float64)
    return HistoryData(
        names=names,
        steps=list(range(len(norm_rows))),
        norms=norms,
        present=~torch.isnan(norms),
        total_norm=norms.nan_to_num(0).pow(2).sum(1).sqrt(),
        shapes=shapes,
    )


@pytest.mark.parametrize(
    "run_length, sustain, flagged", [(4, 5, False), (5, 5, True), (2, 2, True)]
)
def test_vanishing_needs_a_sustained_run(run_length, sustain, flagged):
    # hand-made: 5 weight tensors at norm 1, tensor "w2" 1000x smaller on `run_length`
    # consecutive steps of 10 (and 2 steps apart, to break runs)
    names = [f"w{i}" for i in range(5)]
    rows = []
    for s in range(10):
        low = s in range(1, 1 + run_length) or s == 8
        rows.append([1e-3 if (i == 2 and low) else 1.0 for i in range(5)])
    d = diagnose(_data(rows, names), sustain_steps=sustain)
    assert (d.vanishing == ["w2"]) is flagged
    assert {r.name: r for r in d.layers}["w2"].vanishing_steps == run_length


def test_rms_metric_counts_only_the_nonzero_elements():
    # hand-made: four (10, 10) weights of norm 10; l1's gradient is 96% exact zeros (dead
    # units), so its rms over the 4 nonzero elements is 10 / sqrt(4) = 5, not 10 / sqrt(100) = 1;
    # a zero fraction that is NaN (not recorded) counts every element
    names = [f"l{i}.weight" for i in range(4)]
    rows = [[10.0, 10.0, 10.0, 10.0]] * 4
    data = _data(rows, names, [(10, 10)] * 4)
    zf = torch.zeros(4, 4, dtype=torch.float64)
    zf[:, 1] = 0.96
    zf[:, 2] = math.nan
    data.zero_fraction = zf
    d = diagnose(data)
    assert d.metric == "rms"
    got = {r.name: r.median_metric for r in d.layers}
    assert got["l1.weight"] == pytest.approx(5.0)
    assert got["l0.weight"] == got["l2.weight"] == pytest.approx(1.0)


def test_vanish_threshold_is_in_decades_against_the_group_median():
    names = ["a.weight", "b.weight", "c.weight", "d.weight", "a.bias", "b.bias", "c.bias"]
    # biases are 100x smaller than weights (own group: not vanishing); b.weight is 10^-2.5
    rows = [[1.0, 10**-2.5, 1.0, 1.0, 0.01, 0.01, 0.01] for _ in range(6)]
    d = diagnose(_data(rows, names), metric="norm")
    assert d.metric == "norm"
    assert d.vanishing == ["b.weight"]
    r = {x.name: x for x in d.layers}
    assert r["b.weight"].decades_vs_median == pytest.approx(-2.5)
    assert r["a.bias"].decades_vs_median == pytest.approx(0.0)
    assert diagnose(_data(rows, names), vanish_decades=3.0).vanishing == []


def test_rms_metric_compares_per_element_magnitude():
    # a (1000, 1000) weight with norm 1000 has rms 1, like a (10,) bias of norm sqrt(10)
    names = ["l0.weight", "l1.weight", "l2.weight", "l3.weight"]
    shapes = [(1000, 1000), (10, 10), (10, 10), (10, 10)]
    rows = [[1000.0, 10.0, 10.0, 10.0]] * 6
    d = diagnose(_data(rows, names, shapes))
    assert d.metric == "rms"
    assert [round(r.median_metric, 9) for r in d.layers] == [1.0, 1.0, 1.0, 1.0]
    assert d.healthy
    # the same norms compared as norms: l0 is 2 decades above the others
    assert diagnose(_data(rows, names, shapes), metric="norm").exploding_layers == ["l0.weight"]


# --------------------------------------------------------------------------- the recorder


def _random_grads(seed: int):
    gen = torch.Generator().manual_seed(seed)
    specs = [
        ("emb", (50, 8), torch.float32),
        ("w16", (7, 5), torch.float16),
        ("bf", (33,), torch.bfloat16),
        ("w64", (4, 6), torch.float64),
        ("nc", (6, 8), torch.float32),  # non-contiguous gradient
        ("empty", (0, 3), torch.float32),
        ("none", (5,), torch.float32),  # no gradient
        ("scalar", (), torch.float32),
    ]
    named = []
    for name, shape, dtype in specs:
        p = nn.Parameter((torch.randn(shape, generator=gen) * 3).to(dtype))
        if name == "none":
            p.grad = None
        elif name == "nc":
            big = torch.randn(8, 12, generator=gen)
            p.grad = big.t()[:8, :6].t()  # (6, 8) non-contiguous view
            assert not p.grad.is_contiguous()
        else:
            g = torch.randn(shape, generator=gen) * 10 ** float(
                torch.randint(-3, 3, (), generator=gen)
            )
            g = g * (torch.rand(shape, generator=gen) > 0.3)  # exact zeros
            p.grad = g.to(dtype)
        named.append((name, p))
    return named


@pytest.mark.parametrize("seed", range(4))
def test_recorded_values_match_float64_oracle(seed):
    named = _random_grads(seed)
    h = GradHistory(named, capacity=8)
    h.record_step(step=3)
    data = h.data()
    assert data.steps == [3]
    assert data.names == [n for n, _ in named]
    assert data.shapes == [tuple(p.shape) for _, p in named]
    for i, (_, p) in enumerate(named):
        if p.grad is None:
            assert not data.present[0, i] and math.isnan(data.norms[0, i])
            assert math.isnan(data.zero_fraction[0, i])
            continue
        g = p.grad.to(torch.float64)
        assert data.present[0, i]
        want_norm = torch.linalg.vector_norm(g).item()
        assert data.norms[0, i].item() == pytest.approx(want_norm, rel=1e-6, abs=1e-30)
        want_max = g.abs().max().item() if g.numel() else 0.0
        assert data.max_abs[0, i].item() == pytest.approx(want_max, rel=1e-6)
        assert data.nonfinite[0, i].item() == 0
        if g.numel():
            want_zf = (g == 0).sum().item() / g.numel()
            assert data.zero_fraction[0, i].item() == pytest.approx(want_zf, abs=1e-9)
        else:
            assert math.isnan(data.zero_fraction[0, i])
        want_pn = torch.linalg.vector_norm(p.detach().to(torch.float64)).item()
        assert data.param_norms[0, i].item() == pytest.approx(want_pn, rel=1e-5)
    all_g = torch.cat([p.grad.to(torch.float64).flatten() for _, p in named if p.grad is not None])
    assert data.total_norm[0].item() == pytest.approx(
        torch.linalg.vector_norm(all_g).item(), rel=1e-6
    )


def test_nonfinite_counts_are_recorded_per_tensor():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(3))
    a.grad = torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])
    b.grad = torch.tensor([1.0, 2.0, 2.0])
    h = GradHistory([("a", a), ("b", b)])
    h.record_step()
    data = h.data()
    assert data.nonfinite[0].tolist() == [3.0, 0.0]
    assert data.norms[0, 1].item() == 3.0
    assert data.nonfinite_step.tolist() == [True]
    assert data.first_nonfinite == (0, ["a"])


def test_ring_buffer_keeps_the_last_rows_in_order():
    w = nn.Parameter(torch.zeros(2))
    h = GradHistory([("w", w)], capacity=3)
    for s in range(7):
        w.grad = torch.tensor([float(s + 1), 0.0])
        h.record_step(10 * s)
    assert len(h) == 3
    data = h.data()
    assert data.steps == [40, 50, 60]
    assert data.norms[:, 0].tolist() == [5.0, 6.0, 7.0]
    assert data.zero_fraction[:, 0].tolist() == [0.5, 0.5, 0.5]
    assert h.data(last=2).steps == [50, 60]
    h.reset()
    assert len(h) == 0 and h.data().num_steps == 0


def test_same_step_merges_into_one_row_and_totals_combine():
    names = ["a", "b", "c"]
    h = GradHistory.from_names(names)
    ga, gb = torch.tensor([3.0, 4.0]), torch.tensor([12.0])
    h.record(gradstab.grad_stats([_p(ga)]), ["a"], post_clip_norm=1.0, step=5)
    h.record(gradstab.grad_stats([_p(gb)]), ["b"], post_clip_norm=2.0, skipped=True, step=5)
    data = h.data()
    assert data.steps == [5]
    assert data.present[0].tolist() == [True, True, False]
    assert data.norms[0, :2].tolist() == [5.0, 12.0] and math.isnan(data.norms[0, 2])
    assert data.total_norm[0].item() == pytest.approx(13.0)
    assert data.post_clip_norm[0].item() == pytest.approx(math.sqrt(5.0))
    assert data.skipped.tolist() == [True]


def test_record_takes_several_parts_and_a_scale():
    h = GradHistory.from_names(["x", "y", "z"])
    sx = gradstab.grad_stats([_p(torch.tensor([6.0, 8.0]))])
    syz = gradstab.grad_stats([_p(torch.tensor([2.0])), _p(torch.tensor([-4.0]))])
    h.record([sx, syz], ["x", "y", "z"], scale=torch.tensor(2.0), clip_threshold=0.5)
    data = h.data()
    assert data.norms[0].tolist() == [5.0, 1.0, 2.0]
    assert data.max_abs[0].tolist() == [4.0, 1.0, 2.0]
    assert data.total_norm[0].item() == pytest.approx(math.sqrt(30.0))
    assert data.clip_threshold.tolist() == [0.5]


def test_extras_every_computes_extras_on_some_steps_only():
    w = nn.Parameter(torch.ones(4))
    h = GradHistory([("w", w)], extras_every=2)
    for s in range(4):
        w.grad = torch.tensor([0.0, 1.0, 1.0, 1.0])
        h.record_step(s)
    zf = h.data().zero_fraction[:, 0].tolist()
    assert zf[0] == 0.25 and math.isnan(zf[1]) and zf[2] == 0.25 and math.isnan(zf[3])


def test_bad_arguments_are_refused_with_clear_messages():
    w = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="capacity must be an integer >= 1, got 0"):
        GradHistory([("w", w)], capacity=0)
    with pytest.raises(ValueError, match="'w' appears more than once"):
        GradHistory.from_names(["w", "w"])
    with pytest.raises(ValueError, match="no parameters to record"):
        GradHistory(nn.ReLU())
    with pytest.raises(TypeError, match="item 0"):
        GradHistory([w])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="norm_type"):
        GradHistory([("w", w)], norm_type=-1)
    with pytest.raises(ValueError, match="track_units=True needs the parameters' shapes"):
        GradHistory.from_names(["w"], track_units=True)
    h = GradHistory.from_names(["w", "v"])
    stats = gradstab.grad_stats([_p(torch.ones(2))])
    with pytest.raises(KeyError, match="'q' is not one of the 2 names"):
        h.record(stats, ["q"])
    with pytest.raises(ValueError, match="1 rows but 2 names"):
        h.record(stats)
    with pytest.raises(TypeError, match="GradStats"):
        h.record([torch.ones(2)], ["w"])  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="record_step needs the parameters"):
        h.record_step()
    with pytest.raises(ValueError, match="metric must be one of"):
        diagnose(h, metric="bogus")
    with pytest.raises(ValueError, match="vanish_decades must be a positive number, got 0"):
        diagnose(h, vanish_decades=0)
    with pytest.raises(TypeError, match="GradHistory or a HistoryData"):
        diagnose(object())  # type: ignore[arg-type]
    fresh = GradHistory.from_names(["w"])
    with pytest.raises(TypeError, match="post_clip_norm must be a number"):
        fresh.record(stats, ["w"], post_clip_norm="big")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="skipped must be a bool"):
        fresh.record(stats, ["w"], skipped=1)  # type: ignore[arg-type]
    assert len(fresh) == 0  # nothing recorded by a refused call
    with pytest.raises(ValueError, match="needs parameter norms"):
        h.record(stats, ["w"])
        diagnose(h, metric="ratio")


def test_report_is_machine_readable_and_printable():
    torch.manual_seed(0)
    model = mlp(nn.Sigmoid, depth=12, width=16, d_in=8)
    h = train(model, steps=6, d_in=8, track_units=True)
    d = h.diagnose(metric="ratio")
    assert d.metric == "ratio"
    blob = json.loads(json.dumps(d.to_dict()))
    assert blob["vanishing_gradients"] is True and blob["healthy"] is False
    assert blob["vanishing"] == d.vanishing and blob["thresholds"]["vanish_decades"] == 2.0
    assert len(blob["layers"]) == 24
    plain = d.table(top=5, use_rich=False)
    lines = plain.splitlines()
    assert lines[0].split()[:3] == ["#", "parameter", "grad"] and len(lines) == 7
    assert "vanishing" in lines[2]
    try:
        import rich  # noqa: F401, PLC0415
    except ImportError:
        pass
    else:
        assert "parameter" in d.table(top=5, use_rich=True)


def test_empty_history_diagnoses_to_nothing():
    h = GradHistory(nn.Linear(2, 2))
    d = diagnose(h)
    assert d.steps == 0 and d.healthy and "no steps recorded" in str(d)
    assert json.dumps(d.to_dict())


def test_diagnose_takes_shapes_from_a_model():
    model = nn.Sequential(nn.Linear(100, 10), nn.Linear(10, 10), nn.Linear(10, 10))
    names = [n for n, _ in model.named_parameters()]
    rows = [[10.0, 1.0, 1.0, 1.0, 1.0, 1.0]] * 5
    data = _data(rows, names)
    assert diagnose(data).metric == "norm"
    d = diagnose(data, model=model)
    assert d.metric == "rms"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recording_on_cuda_does_not_synchronize():
    model = mlp(nn.ReLU, depth=4, width=64, d_in=16, init=kaiming).cuda()
    h = GradHistory(model, track_units=True, capacity=4)
    model(torch.randn(8, 16, device="cuda")).sum().backward()
    h.record_step(0)  # warm-up: allocation and index caches
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for s in range(1, 6):
            h.record_step(s)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert h.data().steps == [2, 3, 4, 5]
