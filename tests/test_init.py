"""Tests of gradstab.init: activation-aware initialisation and LSUV.

Oracles: torch.nn.init.calculate_gain, torch.nn.init._calculate_fan_in_and_fan_out,
Monte-Carlo estimates of E[f(z)^2] in float64, hand-counted fans, and output statistics
measured here with independent forward hooks.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradstab
from gradstab.init import init_model_, layer_fans, lsuv_, nonlinearity_gain


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _mc_gain(act: nn.Module, n: int = 2_000_000) -> float:
    """1 / sqrt(E[f(z)^2]) by Monte Carlo in float64 (independent of the quadrature)."""
    g = torch.Generator().manual_seed(1234)
    z = torch.randn(n, dtype=torch.float64, generator=g)
    with torch.no_grad():
        return 1.0 / math.sqrt(act(z).square().mean().item())


# --------------------------------------------------------------------------------- gains


@pytest.mark.parametrize(
    ("spec", "torch_name", "param"),
    [
        ("relu", "relu", None),
        ("leaky_relu", "leaky_relu", 0.01),
        (nn.LeakyReLU(0.2), "leaky_relu", 0.2),
        (nn.PReLU(), "leaky_relu", 0.25),
        (nn.PReLU(init=0.1), "leaky_relu", 0.1),
        (nn.RReLU(0.1, 0.3), "leaky_relu", 0.2),
        ("tanh", "tanh", None),
        (nn.Sigmoid(), "sigmoid", None),
        ("linear", "linear", None),
        (None, "linear", None),
        (nn.Identity(), "linear", None),
    ],
)
def test_gain_matches_calculate_gain(spec, torch_name, param):
    scheme, gain = nonlinearity_gain(spec)
    assert gain == pytest.approx(nn.init.calculate_gain(torch_name, param), rel=1e-6)
    assert scheme == ("xavier" if torch_name in ("tanh", "sigmoid", "linear") else "kaiming")


@pytest.mark.parametrize(
    "act",
    [
        nn.GELU(),
        nn.GELU(approximate="tanh"),
        nn.SiLU(),
        nn.ELU(),
        nn.ELU(alpha=0.5),
        nn.CELU(alpha=2.0),
        nn.Mish(),
        nn.Softplus(beta=2.0),
        nn.Hardswish(),
        nn.ReLU6(),
        nn.SELU(),
    ],
)
def test_gain_second_moment_rule(act):
    scheme, gain = nonlinearity_gain(act)
    assert scheme == "kaiming"
    assert gain == pytest.approx(_mc_gain(act), rel=4e-3)


def test_gain_rule_reproduces_he_for_relu_family():
    # the second-moment rule, applied by Monte Carlo, gives PyTorch's gains for ReLU/LeakyReLU
    assert _mc_gain(nn.ReLU()) == pytest.approx(nn.init.calculate_gain("relu"), rel=4e-3)
    assert _mc_gain(nn.LeakyReLU(0.3)) == pytest.approx(
        nn.init.calculate_gain("leaky_relu", 0.3), rel=4e-3
    )


def test_unknown_nonlinearity_errors():
    with pytest.raises(ValueError, match="unknown nonlinearity 'relu7'"):
        nonlinearity_gain("relu7")
    with pytest.raises(ValueError, match="activation module"):
        nonlinearity_gain(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="nonlinearity"):
        init_model_(nn.Sequential(nn.Linear(2, 2)), "swishy")
    with pytest.raises(ValueError, match="default"):
        init_model_(nn.Sequential(nn.Linear(2, 2)), default="nope")


# --------------------------------------------------------------------------------- fans


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(7, 5), nn.Conv1d(3, 8, 5), nn.Conv2d(4, 6, (3, 2)), nn.Conv3d(2, 3, 3)],
)
def test_fans_match_torch_for_plain_layers(layer):
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    assert layer_fans(layer) == (fan_in, fan_out)


def test_fans_grouped_strided_transposed_hand_counted():
    # depthwise 3x3 conv, stride 2: each output reads 1 channel x 9 taps; each input feeds
    # 1 channel x 9 taps / 4 outputs on average
    assert layer_fans(nn.Conv2d(16, 16, 3, stride=2, groups=16)) == (9.0, 9.0 / 4)
    # transposed 4x4, stride 2 (DCGAN): each output sums 32 channels x 4 taps
    assert layer_fans(nn.ConvTranspose2d(32, 8, 4, stride=2)) == (32 * 16 / 4, 8 * 16)
    # count it: one output position of a 1-D transposed conv, away from the borders
    conv = nn.ConvTranspose1d(1, 1, 5, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    counts = conv(torch.ones(1, 1, 40))[0, 0, 10:-10]
    assert counts.mean().item() == pytest.approx(layer_fans(conv)[0], rel=0.05)


# --------------------------------------------------------------------------------- init_model_


def _theory(scheme: str, gain: float, fan_in: float, fan_out: float) -> float:
    if scheme == "kaiming":
        return gain / math.sqrt(fan_in)
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize(
    ("act", "torch_name", "param"),
    [
        (nn.ReLU(), "relu", None),
        (nn.LeakyReLU(0.1), "leaky_relu", 0.1),
        (nn.PReLU(), "leaky_relu", 0.25),
        (nn.Tanh(), "tanh", None),
        (nn.Sigmoid(), "sigmoid", None),
        (nn.GELU(), None, None),
        (nn.SiLU(), None, None),
        (nn.ELU(), None, None),
    ],
)
def test_large_layer_std_matches_theory(act, torch_name, param):
    net = nn.Sequential(nn.Linear(512, 512), act, nn.Linear(512, 512))
    summary = init_model_(net)
    gain = nn.init.calculate_gain(torch_name, param) if torch_name else _mc_gain(act)
    scheme = "xavier" if torch_name in ("tanh", "sigmoid") else "kaiming"
    std = net[0].weight.std().item()
    assert std == pytest.approx(_theory(scheme, gain, 512, 512), rel=0.05)
    rec = summary[0]
    assert (rec.scheme, rec.source) == (scheme, "inferred")
    assert rec.gain == pytest.approx(gain, rel=4e-3)
    assert rec.std == pytest.approx(std, rel=1e-6)
    # the last layer has no activation after it: Xavier, gain 1
    assert net[2].weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.05)
    assert summary[1].nonlinearity == "linear"


@pytest.mark.parametrize(
    ("layer", "fan_in", "fan_out"),
    [
        (nn.Conv2d(64, 128, 3), 576, 1152),
        (nn.Conv2d(128, 128, 3, groups=4), 288, 288),
        (nn.ConvTranspose2d(128, 64, 4, stride=2), 512, 1024),
        (nn.Conv1d(32, 64, 9, stride=3), 288, 192),
    ],
)
@pytest.mark.parametrize("distribution", ["normal", "uniform"])
def test_conv_std_matches_theory(layer, fan_in, fan_out, distribution):
    for act, scheme, gain in ((nn.ReLU(), "kaiming", math.sqrt(2)), (nn.Tanh(), "xavier", 5 / 3)):
        net = nn.Sequential(layer, act)
        (rec,) = init_model_(net, distribution=distribution)
        assert (rec.fan_in, rec.fan_out) == (fan_in, fan_out)
        assert rec.scheme == scheme
        want = _theory(scheme, gain, fan_in, fan_out)
        assert layer.weight.std().item() == pytest.approx(want, rel=0.05)
        assert rec.target_std == pytest.approx(want)
        if distribution == "uniform":
            assert layer.weight.abs().max().item() <= math.sqrt(3) * want * (1 + 1e-6)


def test_mode_fan_out():
    net = nn.Sequential(nn.Linear(256, 1024), nn.ReLU())
    init_model_(net, mode="fan_out")
    assert net[0].weight.std().item() == pytest.approx(math.sqrt(2 / 1024), rel=0.05)


def test_inference_in_nested_sequentials():
    net = nn.Sequential(
        nn.Linear(8, 8),  # 0 -> LeakyReLU(0.2) after BN and dropout, two levels down
        nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.1), nn.Sequential(nn.LeakyReLU(0.2))),
        nn.Linear(8, 8),  # 2 -> directly into another Linear: identity
        nn.Sequential(nn.Sequential(nn.Linear(8, 8))),  # 3.0.0 -> leaves two levels: Tanh
        nn.Identity(),
        nn.Tanh(),
        nn.Sequential(nn.Linear(8, 8), nn.Sequential()),  # 6.0 -> GELU after an empty Sequential
        nn.Sequential(nn.GELU(), nn.Linear(8, 4), nn.Dropout()),  # 7.1 -> model output
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = init_model_(net)
    got = {r.name: (r.nonlinearity, r.scheme, r.source) for r in summary}
    assert got == {
        "0": ("LeakyReLU(negative_slope=0.2)", "kaiming", "inferred"),
        "2": ("linear", "xavier", "inferred"),
        "3.0.0": ("Tanh()", "xavier", "inferred"),
        "6.0": ("GELU(approximate='none')", "kaiming", "inferred"),
        "7.1": ("linear", "xavier", "inferred"),
    }
    assert summary[0].gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.2))
    assert summary[2].gain == pytest.approx(5 / 3)


class _Custom(nn.Module):
    """Layers used in a custom forward with functional activations."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.head = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
        self.tail = nn.Sequential(nn.Linear(4, 4), nn.Sigmoid())

    def forward(self, x):
        return self.tail(self.head(F.gelu(self.fc1(x))))


def test_warning_for_unknown_activation_and_default():
    net = _Custom()
    with pytest.warns(UserWarning, match=r"2 layer\(s\)") as rec:
        summary = init_model_(net)
    message = str(rec[0].message)
    assert "fc1" in message and "head.2" in message and "F.relu" in message
    assert rec[0].filename == __file__  # points at the caller of init_model_
    assert "head.0" not in message and "tail.0" not in message
    by_name = {r.name: r for r in summary}
    assert by_name["fc1"].source == "default"
    assert by_name["fc1"].gain == pytest.approx(math.sqrt(2))
    assert by_name["head.0"].source == "inferred"
    assert by_name["tail.0"].nonlinearity == "Sigmoid()"
    # another default
    with pytest.warns(UserWarning, match="'linear'"):
        summary = init_model_(net, default=None)
    assert {r.name: r.gain for r in summary}["fc1"] == 1.0


def test_nonlinearity_dict_overrides_and_silences():
    net = _Custom()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = init_model_(net, {"fc1": "gelu", "head.2": None})
    by_name = {r.name: r for r in summary}
    assert by_name["fc1"].source == "given"
    assert by_name["fc1"].gain == pytest.approx(_mc_gain(nn.GELU()), rel=4e-3)
    assert by_name["head.2"].scheme == "xavier"
    assert by_name["head.0"].source == "inferred"
    # a prefix key covers the subtree; a type key applies where no name matches
    summary = init_model_(net, {"head": "tanh", nn.Linear: nn.LeakyReLU(0.5)})
    by_name = {r.name: r for r in summary}
    assert by_name["head.0"].gain == by_name["head.2"].gain == pytest.approx(5 / 3)
    assert by_name["fc1"].gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.5))
    assert by_name["tail.0"].gain == pytest.approx(nn.init.calculate_gain("leaky_relu", 0.5))
    with pytest.raises(ValueError, match="no module named 'fc9'"):
        init_model_(net, {"fc9": "relu"})
    with pytest.raises(ValueError, match="unknown nonlinearity"):
        init_model_(net, {"fc1": "relux"})
    with pytest.raises(TypeError, match="dict keys"):
        init_model_(net, {3: "relu"})


def test_global_nonlinearity_string():
    net = _Custom()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = init_model_(net, "tanh")
    assert {r.gain for r in summary} == {5 / 3}
    assert {r.source for r in summary} == {"given"}


def test_zero_biases_and_norm_reset():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        for p in [*net.parameters(), *lin.parameters()]:
            p.uniform_(1.0, 2.0)
    init_model_(net)
    assert torch.equal(net[0].bias, torch.zeros(4))
    assert torch.equal(net[1].weight, torch.ones(4)) and torch.equal(net[1].bias, torch.zeros(4))
    init_model_(lin, zero_bias=False, reset_norm=False)
    assert bool((lin.bias >= 1.0).all())


def test_summary_records_and_table():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, groups=1), nn.ReLU(), nn.Flatten())
    net.append(nn.Linear(16, 2))
    summary = init_model_(net)
    assert isinstance(summary, list) and len(summary) == 2
    conv, lin = summary
    assert (conv.name, conv.type, conv.fan_in, conv.fan_out) == ("0", "Conv2d", 27, 16 * 9 / 4)
    assert (conv.scheme, conv.nonlinearity) == ("kaiming", "ReLU()")
    assert conv.std == pytest.approx(net[0].weight.std().item())
    assert conv.target_std == pytest.approx(math.sqrt(2 / 27))
    assert (lin.name, lin.type, lin.scheme, lin.gain) == ("3", "Linear", "xavier", 1.0)
    text = str(summary)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["name", "type", "fan_in", "fan_out"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split()[:2] == ["0", "Conv2d"] and lines[3].split()[:2] == ["3", "Linear"]
    assert repr(summary) == text


def test_generator_reproducible_and_dtypes():
    def make(dtype):
        return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.LSTM(512, 8)).to(dtype)

    a, b = make(torch.float32), make(torch.float32)
    init_model_(a, generator=torch.Generator().manual_seed(5))
    init_model_(b, generator=torch.Generator().manual_seed(5))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    for dtype in (torch.float64, torch.bfloat16, torch.float16):
        net = make(dtype)
        summary = init_model_(net)
        assert net[0].weight.dtype == dtype
        assert summary[0].std == pytest.approx(math.sqrt(2 / 512), rel=0.05)


def test_meta_device_model():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.GRU(4, 4)).to("meta")
    summary = init_model_(net)
    assert net[0].weight.is_meta
    assert math.isnan(summary[0].std) and summary[0].target_std > 0


def _orthonormal(w: torch.Tensor) -> bool:
    w = w.double()
    if w.shape[0] <= w.shape[1]:
        eye = w @ w.T
    else:
        eye = w.T @ w
    return torch.allclose(eye, torch.eye(eye.shape[0], dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize(
    ("module", "gates"),
    [
        (nn.LSTM(12, 20, num_layers=2, bidirectional=True), 4),
        (nn.GRU(30, 10, num_layers=2), 3),
        (nn.RNN(6, 9, nonlinearity="relu"), 1),
        (nn.LSTM(12, 20, proj_size=7), 4),
        (nn.LSTMCell(5, 6), 4),
        (nn.GRUCell(5, 6), 3),
        (nn.RNNCell(8, 3), 1),
    ],
)
def test_recurrent_orthogonal_blocks_and_biases(module, gates):
    with torch.no_grad():
        for p in module.parameters():
            p.uniform_(1.0, 2.0)
    summary = init_model_(nn.Sequential(module), lstm_forget_bias=1.0)
    params = dict(module.named_parameters())
    weights = [n for n in params if n.startswith("weight")]
    assert sorted(r.name for r in summary) == sorted(f"0.{n}" for n in weights)
    for name in weights:
        w = params[name]
        blocks = 1 if name.startswith("weight_hr") else gates
        rows = w.shape[0] // blocks
        for b in range(blocks):
            assert _orthonormal(w[b * rows : (b + 1) * rows]), (name, b)
        # blocks are independent draws
        if blocks > 1:
            assert not torch.allclose(w[:rows], w[rows : 2 * rows])
    for name, p in params.items():
        if not name.startswith("bias"):
            continue
        if gates == 4 and name.startswith("bias_ih"):
            h = p.shape[0] // 4
            want = torch.zeros_like(p)
            want[h : 2 * h] = 1.0
            assert torch.equal(p, want), name
        else:
            assert torch.equal(p, torch.zeros_like(p)), name
    rec = summary[0]
    assert rec.std == pytest.approx(rec.target_std, rel=0.15)


def test_recurrent_gain_and_no_forget_bias():
    lstm = nn.LSTM(16, 16)
    init_model_(lstm, recurrent_gain=0.5)
    w = lstm.weight_hh_l0[:16].double()
    assert torch.allclose(w @ w.T, 0.25 * torch.eye(16, dtype=torch.float64), atol=1e-5)
    assert torch.equal(lstm.bias_ih_l0, torch.zeros(64))


# --------------------------------------------------------------------------- residual zero-init


class _Basic(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.downsample = None

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


class _Bottleneck(_Basic):
    def __init__(self, c):
        super().__init__(c)
        self.conv3, self.bn3 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c))

    def forward(self, x):
        y = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.relu(self.downsample(x) + self.bn3(self.conv3(y)))


def test_zero_init_residual_torchvision_style():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Basic(8), _Bottleneck(8))
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="cannot tell"):
        summary = init_model_(net, zero_init_residual=True)
    assert torch.equal(net[1].bn2.weight, torch.zeros(8))
    assert torch.equal(net[2].bn3.weight, torch.zeros(8))
    for bn in (net[1].bn1, net[2].bn1, net[2].bn2, net[2].downsample[1]):
        assert torch.equal(bn.weight, torch.ones(8))
    zeroed = [r.name for r in summary if r.scheme == "zero (residual)"]
    assert zeroed == ["1.bn2", "2.bn3"]
    # the basic block now starts as relu(identity)
    h = net[0](x)
    assert torch.allclose(net[1](h), torch.relu(h))


def test_zero_init_residual_names_and_predicate():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8), nn.Dropout())
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            return x + self.proj(x) + self.mlp(x)

    net = nn.Sequential(Block(), Block())
    with pytest.warns(UserWarning):
        summary = init_model_(net, zero_init_residual=["0.mlp", "1.proj"])
    assert torch.equal(net[0].mlp[2].weight, torch.zeros(8, 32))
    assert torch.equal(net[1].proj.weight, torch.zeros(8, 8))
    assert net[0].mlp[0].weight.abs().sum() > 0 and net[1].mlp[2].weight.abs().sum() > 0
    assert [r.name for r in summary if r.scheme == "zero (residual)"] == ["0.mlp.2", "1.proj"]
    with pytest.warns(UserWarning):
        init_model_(net, zero_init_residual=lambda name, m: name.endswith("mlp"))
    assert torch.equal(net[1].mlp[2].weight, torch.zeros(8, 32))
    with pytest.raises(ValueError, match=r"no module named '0\.mlpx'"):
        init_model_(net, zero_init_residual="0.mlpx")
    with pytest.raises(ValueError, match="holds no"):
        init_model_(net, zero_init_residual=["0.mlp.1"])
    with pytest.warns(UserWarning, match="found no torchvision-style"):
        init_model_(nn.Sequential(nn.Linear(2, 2)), zero_init_residual=True)


def test_bad_arguments():
    net = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="mode"):
        init_model_(net, mode="fan_avg")
    with pytest.raises(ValueError, match="distribution"):
        init_model_(net, distribution="trunc")
    with pytest.raises(TypeError, match=r"nn\.Module"):
        init_model_(torch.zeros(2))
    with pytest.raises(ValueError, match="lazy"):
        init_model_(nn.Sequential(nn.LazyLinear(4)))


def test_public_submodule():
    assert gradstab.init.init_model_ is init_model_
    assert "init" in gradstab.__all__


# --------------------------------------------------------------------------------- LSUV


def _output_stds(model: nn.Module, batch: torch.Tensor, names) -> dict[str, float]:
    """Each layer's output std on the batch, in eval mode, via our own hooks."""
    stds: dict[str, float] = {}
    mods = dict(model.named_modules())
    hooks = [
        mods[n].register_forward_hook(lambda _m, _i, o, n=n: stds.__setitem__(n, o.std().item()))
        for n in names
    ]
    was = model.training
    model.eval()
    with torch.no_grad():
        model(batch)
    model.train(was)
    for h in hooks:
        h.remove()
    return stds


def _conv_net():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(16, 16, 3, stride=2), nn.BatchNorm2d(16), nn.ReLU()),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(16 * 7 * 7, 32),
        nn.Tanh(),
        nn.Linear(32, 5),
    )


@pytest.mark.parametrize(("target", "tol"), [(1.0, 0.05), (0.5, 0.02)])
@pytest.mark.parametrize("zero_bias", [True, False])
def test_lsuv_every_layer_within_tol(target, tol, zero_bias):
    net = _conv_net()
    x = torch.randn(64, 3, 16, 16) * 3 + 1
    net.train()
    bn = net[2][1]
    running = bn.running_mean.clone(), bn.running_var.clone()
    report = lsuv_(net, x, target_std=target, tol=tol, zero_bias=zero_bias)
    assert [r.name for r in report] == ["0", "2.0", "5", "7"]
    assert all(r.converged for r in report)
    stds = _output_stds(net, x, [r.name for r in report])
    for r in report:
        assert abs(stds[r.name] / target - 1) <= tol, (r.name, stds[r.name])
        assert r.std == pytest.approx(stds[r.name], rel=1e-4)
        assert r.iterations >= 1
    # training flags restored, BatchNorm statistics untouched
    assert all(m.training for m in net.modules())
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    if zero_bias:
        assert all(r.iterations == 1 for r in report)  # linear in the weight: one step
        assert torch.equal(net[5].bias, torch.zeros(32))
    text = str(report)
    assert text.splitlines()[0].split() == ["name", "type", "iterations", "std", "converged"]


def test_lsuv_orthonormal_start_and_forward_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(24, 4)  # registered first, runs last
            self.early = nn.Linear(16, 24)

        def forward(self, x):
            return self.late(torch.relu(self.early(x)))

    net = Reversed()
    x = torch.randn(128, 16)
    report = lsuv_(net, x, tol=0.01)
    assert [r.name for r in report] == ["early", "late"]
    # orthonormal up to one scalar per layer
    for m in (net.early, net.late):
        w = m.weight.double()
        g = w.T @ w if w.shape[0] > w.shape[1] else w @ w.T
        scale = g.diagonal().mean()
        assert torch.allclose(g / scale, torch.eye(g.shape[0], dtype=torch.float64), atol=1e-5)
    stds = _output_stds(net, x, ["early", "late"])
    assert all(abs(s - 1) <= 0.01 for s in stds.values())


def test_lsuv_batch_forms_and_shared_layer():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, a, b=None):
            return self.out(self.shared(a) + self.shared(b))

    net = TwoInputs()
    a, b = torch.randn(32, 8), torch.randn(32, 8) * 5
    report = lsuv_(net, (a, b))
    assert [r.name for r in report] == ["shared", "out"]
    with torch.no_grad():
        both = torch.cat([net.shared(a), net.shared(b)])
    assert abs(both.std().item() - 1) <= 0.05  # the std over both calls of the layer
    report = lsuv_(net, {"a": a, "b": b})
    assert all(r.converged for r in report)


def test_lsuv_errors():
    net = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="at least 2 samples"):
        lsuv_(net, torch.randn(1, 8))
    with pytest.raises(ValueError, match="at least 2 samples"):
        lsuv_(net, torch.tensor(3.0))
    with pytest.raises(ValueError, match="holds no tensor"):
        lsuv_(net, [1, 2])
    for kwargs, match in (
        ({"target_std": 0.0}, "target_std"),
        ({"tol": 1.5}, "tol"),
        ({"max_iter": 0}, "max_iter"),
    ):
        with pytest.raises(ValueError, match=match):
            lsuv_(net, torch.randn(4, 8), **kwargs)
    with pytest.raises(ValueError, match="no Linear/Conv"):
        lsuv_(nn.Sequential(nn.ReLU()), torch.randn(4, 8))

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(8, 8)
            self.aux_head = nn.Linear(8, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"\['aux_head'\] never receive input"):
        lsuv_(Unused(), torch.randn(16, 8))
    report = lsuv_(Unused(), torch.randn(16, 8), modules=["used"])
    assert [r.name for r in report] == ["used"]
    with pytest.raises(ValueError, match="'nope' is not a Linear"):
        lsuv_(Unused(), torch.randn(16, 8), modules=["nope"])

    class Collapse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 4)
            self.scalar = nn.Linear(1, 1)

        def forward(self, x):
            return self.scalar(self.fc(x).sum().view(1, 1))

    with pytest.raises(ValueError, match=r"scalar \(1 elements\)"):
        lsuv_(Collapse(), torch.randn(16, 8))
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="layer '0' has std 0"):
        lsuv_(net, torch.zeros(16, 8))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # restored
    assert all(m.training for m in net.modules())


def test_lsuv_warns_when_not_converged():
    net = nn.Sequential(nn.Linear(64, 64))
    with torch.no_grad():
        net[0].bias.copy_(torch.linspace(-10, 10, 64))  # bias spread alone has std ~5.9
    with pytest.warns(UserWarning, match="did not come within"):
        report = lsuv_(net, torch.randn(32, 64), zero_bias=False, max_iter=3)
    assert report[0].iterations == 3 and not report[0].converged


def test_lsuv_keeps_dtype():
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).double()
    x = torch.randn(64, 32, dtype=torch.float64)
    report = lsuv_(net, x, tol=0.001)
    assert net[0].weight.dtype == torch.float64
    stds = _output_stds(net, x, ["0", "2"])
    assert all(abs(s - 1) <= 0.001 for s in stds.values())
    assert all(r.converged for r in report)
    # bfloat16 weights: the statistics are accumulated in float64, the tolerance is bf16's
    net = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8)).bfloat16()
    report = lsuv_(net, x.bfloat16(), tol=0.02)
    assert all(r.converged for r in report)


def test_lsuv_ordered_dict_batch_is_kwargs():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, *, x):
            return self.fc(x)

    report = lsuv_(KW(), OrderedDict(x=torch.randn(8, 4)))
    assert report[0].converged
