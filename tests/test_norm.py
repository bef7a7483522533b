"""Tests of gradstab.norm: weight standardisation layers, conversion, norm insertion.

Oracles: the WS / Scaled-WS formulas recomputed here in float64, torch.nn.functional
linear/conv2d/layer_norm, torch.autograd.gradcheck, and Monte-Carlo statistics.
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
from gradstab.norm import (
    ScaledWSConv2d,
    ScaledWSLinear,
    WSConv2d,
    WSLinear,
    add_normalization_,
    convert_weight_standardization_,
    nf_gamma,
    standardize_weight,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _oracle(w: torch.Tensor, eps: float = 1e-4, scaled: bool = False, gain=None, gamma=1.0):
    """The standardised weight, from the formulas, row by row in float64."""
    w64 = w.detach().double().reshape(w.shape[0], -1)
    n = w64.shape[1]
    rows = []
    for i in range(w64.shape[0]):
        row = w64[i]
        mu = row.sum() / n
        ss = ((row - mu) ** 2).sum()  # N * sigma^2
        if scaled:
            g = 1.0 if gain is None else gain.detach().double().reshape(-1)[i]
            rows.append(g * gamma * (row - mu) / torch.sqrt(ss + eps))
        else:
            rows.append(math.sqrt(n) * (row - mu) / torch.sqrt(ss + eps))
    return torch.stack(rows).reshape(w.shape)


# ----------------------------------------------------------------------------- standardisation


@pytest.mark.parametrize("shape", [(16, 32), (8, 4, 3, 3), (5, 2), (3, 7, 1, 5)])
def test_standardize_weight_matches_formula(shape):
    w = torch.randn(shape) * 0.3 + torch.randn(shape[0], *[1] * (len(shape) - 1))
    out = standardize_weight(w)
    torch.testing.assert_close(out.double(), _oracle(w), rtol=1e-5, atol=1e-5)
    rows = out.double().reshape(shape[0], -1)
    assert rows.mean(1).abs().max() < 1e-5
    # unit variance, up to eps: var = N sigma^2 / (N sigma^2 + eps)
    ss = w.double().reshape(shape[0], -1).var(1, correction=0) * rows.shape[1]
    torch.testing.assert_close(rows.var(1, correction=0), ss / (ss + 1e-4), rtol=1e-5, atol=0)
    exact = standardize_weight(w.double(), eps=0.0).reshape(shape[0], -1).var(1, correction=0)
    torch.testing.assert_close(exact, torch.ones_like(exact), rtol=1e-12, atol=0)
    gain, gamma = torch.rand(shape[0], *[1] * (len(shape) - 1)) + 0.5, 1.7
    out = standardize_weight(w, scaled=True, gain=gain, gamma=gamma)
    torch.testing.assert_close(
        out.double(), _oracle(w, scaled=True, gain=gain, gamma=gamma), rtol=1e-5, atol=1e-6
    )
    out = standardize_weight(w.double(), scaled=True, gain=gain.double(), gamma=gamma, eps=0.0)
    sq_norm = out.reshape(shape[0], -1).square().sum(1)
    torch.testing.assert_close(sq_norm, (gain.reshape(-1).double() * gamma) ** 2)


def test_standardize_weight_non_contiguous_low_precision_and_constant_rows():
    w = torch.randn(32, 16).T  # non-contiguous [16, 32]
    torch.testing.assert_close(standardize_weight(w).double(), _oracle(w), rtol=1e-5, atol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        out = standardize_weight(w.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), _oracle(w.to(dtype)), rtol=1e-2, atol=1e-2)
    const = torch.zeros(4, 9)
    const[1] = 3.0
    out = standardize_weight(const)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))


def test_nf_gamma():
    assert nf_gamma("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-6)
    assert nf_gamma(None) == 1.0
    z = torch.randn(2_000_000, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for act in (nn.GELU(), nn.SiLU(), nn.Tanh()):
        assert nf_gamma(act) == pytest.approx(1 / act(z).std().item(), rel=4e-3)


def test_scaled_ws_preserves_signal_variance():
    # NF-ResNet claim: relu(z) -> ScaledWS(gamma = nf_gamma("relu")) has unit variance again
    layer = ScaledWSLinear(1024, 1024, bias=False, gamma=nf_gamma("relu"))
    x = torch.relu(torch.randn(512, 1024))
    with torch.no_grad():
        y = layer(x)
    assert y.var().item() == pytest.approx(1.0, rel=0.1)


# ----------------------------------------------------------------------------- WS layers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ws_layers_forward_matches_oracle(dtype):
    lin = WSLinear(24, 10, dtype=dtype)
    x = torch.randn(6, 24, dtype=dtype)
    want = F.linear(x.double(), _oracle(lin.weight), lin.bias.double())
    torch.testing.assert_close(lin(x).double(), want, rtol=1e-5, atol=1e-5)

    conv = WSConv2d(3, 8, 3, padding=1, stride=2, dtype=dtype)
    x = torch.randn(2, 3, 9, 9, dtype=dtype)
    want = F.conv2d(x.double(), _oracle(conv.weight), conv.bias.double(), stride=2, padding=1)
    torch.testing.assert_close(conv(x).double(), want, rtol=1e-5, atol=1e-5)

    sconv = ScaledWSConv2d(4, 6, 3, gamma=1.5, dtype=dtype)
    with torch.no_grad():
        sconv.gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 4, 7, 7, dtype=dtype)
    w = _oracle(sconv.weight, scaled=True, gain=sconv.gain, gamma=1.5)
    torch.testing.assert_close(
        sconv(x).double(), F.conv2d(x.double(), w, sconv.bias.double()), rtol=1e-5, atol=1e-5
    )
    assert sconv.gain.shape == (6, 1, 1, 1) and ScaledWSLinear(3, 5).gain.shape == (5, 1)


def test_forward_uses_standardized_weight_seen_by_hook():
    # intercept the weight F.linear receives
    lin = WSLinear(64, 16)
    with torch.no_grad():
        lin.weight.mul_(7.0).add_(3.0)
    seen = {}

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                seen["w"] = args[1].detach().clone()
            return func(*args, **(kwargs or {}))

    with Spy():
        lin(torch.randn(2, 64))
    w = seen["w"].double()
    assert w.mean(1).abs().max() < 1e-6
    ones = torch.ones(16, dtype=torch.float64)  # up to eps / (N sigma^2) ~ 6e-6
    torch.testing.assert_close(w.var(1, correction=0), ones, rtol=2e-5, atol=0)


@pytest.mark.parametrize("cls", [WSLinear, ScaledWSLinear])
def test_gradients_flow_and_gradcheck(cls):
    layer = cls(6, 4, dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    params = dict(layer.named_parameters())
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0
    # WS is invariant to shifting and scaling a row: its gradient has zero mean per row and
    # is orthogonal to the centred row
    g = params["weight"].grad
    centred = layer.weight - layer.weight.mean(1, keepdim=True)
    assert g.mean(1).abs().max() < 1e-10
    assert (g * centred).sum(1).abs().max() < 1e-3 * g.abs().sum()

    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    gain = torch.rand(4, 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(standardize_weight, (w,))
    assert torch.autograd.gradcheck(
        lambda w, g: standardize_weight(w, scaled=True, gain=g, gamma=1.3), (w, gain)
    )


def test_ws_constructor_errors_and_state_dict():
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        WSLinear(1, 4)
    with pytest.raises(ValueError, match="fan-in of at least 2"):
        ScaledWSConv2d(1, 4, 1)
    with pytest.raises(ValueError, match="eps"):
        WSConv2d(3, 4, 3, eps=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        ScaledWSLinear(3, 4, gamma=0.0)
    plain = nn.Conv2d(3, 4, 3)
    ws = WSConv2d(3, 4, 3)
    ws.load_state_dict(plain.state_dict())
    assert torch.equal(ws.weight, plain.weight)
    scaled = ScaledWSConv2d(3, 4, 3)
    assert set(scaled.state_dict()) == {"weight", "bias", "gain"}
    assert "eps=" in repr(ws) and "gamma=" in repr(scaled)


# ----------------------------------------------------------------------------- conversion


def _standardised_(layer: nn.Module, scaled: bool) -> None:
    """Overwrite a layer's weight with an already standardised one."""
    with torch.no_grad():
        w = layer.weight
        rows = w.reshape(w.shape[0], -1)
        rows -= rows.mean(1, keepdim=True)
        if scaled:
            rows /= rows.norm(dim=1, keepdim=True)
        else:
            rows /= rows.std(1, correction=0, keepdim=True)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU())
        self.attn = nn.MultiheadAttention(8, 2)
        self.tiny = nn.Linear(1, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.body(torch.relu(self.stem(x))).mean((2, 3))
        return self.head(h + self.tiny(h[:, :1]))


@pytest.mark.parametrize("scaled", [False, True])
def test_conversion_keeps_parameters_and_outputs(scaled):
    net = _Net()
    for m in (net.stem, net.body[0], net.head):
        _standardised_(m, scaled)
    x = torch.randn(2, 3, 6, 6)
    before = net(x)
    params = {n: p for n, p in net.named_parameters()}
    called = []
    net.head.register_forward_hook(lambda *_: called.append(1))
    with pytest.warns(UserWarning, match=r"\['tiny'\]"):
        names = convert_weight_standardization_(net, scaled=scaled)
    assert names == ["stem", "body.0", "head"]
    kinds = (ScaledWSConv2d, ScaledWSLinear) if scaled else (WSConv2d, WSLinear)
    assert type(net.stem) is kinds[0] and type(net.body[0]) is kinds[0]
    assert type(net.head) is kinds[1]
    assert type(net.tiny) is nn.Linear and type(net.attn.out_proj) is not kinds[1]
    for n, p in net.named_parameters():  # same Parameter objects; scaled layers add a gain
        if n in params:
            assert p is params[n]
        else:
            assert scaled and n.endswith(".gain") and torch.equal(p, torch.ones_like(p))
    after = net(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert called == [1]  # hooks survive
    # and it does standardise: a rescaled, shifted weight gives the same output
    with torch.no_grad():
        net.stem.weight.mul_(5.0).add_(2.0)
    again = net(x)
    torch.testing.assert_close(again, after, rtol=1e-4, atol=1e-4)
    again.sum().backward()
    assert net.stem.weight.grad is not None and torch.isfinite(net.stem.weight.grad).all()


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_conversion_device_dtype(device, dtype):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    net = net.to(device=device, dtype=dtype)
    assert convert_weight_standardization_(net, scaled=True, gamma=2.0) == ["0", "2"]
    for m in (net[0], net[2]):
        assert m.gain.device.type == device and m.gain.dtype == dtype
        assert m.gamma == 2.0
    if device == "cpu":
        out = net(torch.randn(2, 3, 6, 6, dtype=dtype))
        assert out.dtype == dtype and out.shape == (2, 2)


def test_conversion_exclude_and_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    assert convert_weight_standardization_(net, exclude=["1"]) == ["0"]
    assert convert_weight_standardization_(net) == ["1.0", "1.1"]  # "0" is no longer nn.Linear
    with pytest.raises(ValueError, match="no module named 'x'"):
        convert_weight_standardization_(net, exclude=["x"])
    with pytest.raises(ValueError, match="gamma"):
        convert_weight_standardization_(nn.Linear(3, 3), scaled=True, gamma=-1.0)
    root = nn.Linear(5, 3)
    assert convert_weight_standardization_(root) == [""]
    assert isinstance(root, WSLinear)


def test_public_submodule():
    assert gradstab.norm.add_normalization_ is add_normalization_
    assert "norm" in gradstab.__all__


# ----------------------------------------------------------------------------- add_normalization_


def _nested():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(8, 48, 3, padding=1),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(48, 16, 3, stride=2), nn.Dropout()),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 32),
        nn.ReLU(),
        nn.Sequential(nn.Linear(32, 10), nn.Dropout()),
    )


def test_add_batch_norm_nested_structure_and_shapes():
    net = _nested()
    x = torch.randn(4, 3, 12, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        added = add_normalization_(net, "batch")
    got = [(r.name, r.after, r.type, r.num_features) for r in added]
    assert got == [
        ("1", "0", "BatchNorm2d", 8),
        ("3.1", "3.0", "BatchNorm2d", 48),
        ("3.3.1", "3.3.0", "BatchNorm2d", 16),
        ("7", "6", "BatchNorm1d", 32),
    ]
    assert [type(m).__name__ for m in net] == [
        "Conv2d", "BatchNorm2d", "ReLU", "Sequential", "AdaptiveAvgPool2d", "Flatten",
        "Linear", "BatchNorm1d", "ReLU", "Sequential",
    ]  # fmt: skip
    assert list(net._modules) == [str(i) for i in range(10)]
    assert [type(m).__name__ for m in net[3]] == ["Conv2d", "BatchNorm2d", "ReLU", "Sequential"]
    assert [type(m).__name__ for m in net[3][3]] == ["Conv2d", "BatchNorm2d", "Dropout"]
    assert [type(m).__name__ for m in net[9]] == ["Linear", "Dropout"]  # output layer skipped
    net.train()
    out = net(x)
    assert out.shape == (4, 10)
    # the inserted norm really normalises the conv output (train mode: batch statistics)
    h = net[1](net[0](x))
    assert h.mean((0, 2, 3)).abs().max() < 1e-5
    # a second call finds every layer already normalised
    assert add_normalization_(net, "batch") == []
    assert "BatchNorm1d" in str(added)


def test_add_layer_and_group_norm():
    net = _nested()
    added = add_normalization_(net, "layer", skip_output=False)
    assert [(r.after, r.type, r.groups) for r in added] == [
        ("0", "GroupNorm", 1),
        ("3.0", "GroupNorm", 1),
        ("3.3.0", "GroupNorm", 1),
        ("6", "LayerNorm", 0),
        ("9.0", "LayerNorm", 0),
    ]
    x = torch.randn(2, 3, 12, 12)
    assert net(x).shape == (2, 10)
    conv_out = net[0](x)  # GroupNorm(1, C) is LayerNorm over (C, H, W)
    torch.testing.assert_close(net[1](conv_out), F.layer_norm(conv_out, conv_out.shape[1:]))
    assert isinstance(net[9][1], nn.LayerNorm)  # skip_output=False: the output layer too

    net = _nested()
    added = add_normalization_(net, "group")  # 32 groups where possible
    assert {(r.num_features, r.groups) for r in added} == {(8, 8), (48, 16), (16, 16), (32, 32)}
    assert net(x).shape == (2, 10)
    net = _nested()
    added = add_normalization_(net, "group", groups=lambda c: c // 8 if c >= 8 else 1)
    assert {(r.num_features, r.groups) for r in added} == {(8, 1), (48, 6), (16, 2), (32, 4)}
    with pytest.raises(ValueError, match="does not divide"):
        add_normalization_(_nested(), "group", groups=lambda c: 5)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_add_normalization_device_dtype(device, dtype):
    net = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.ReLU(),
        nn.Sequential(nn.ConvTranspose1d(4, 6, 3), nn.ReLU()),
        nn.Conv3d(1, 2, 1),
        nn.ReLU(),
    ).to(device=device, dtype=dtype)
    added = add_normalization_(net, eps=1e-3, affine=True, skip_output=False)
    assert [(r.after, r.type) for r in added] == [
        ("0", "BatchNorm1d"),
        ("3.0", "BatchNorm1d"),
        ("4", "BatchNorm3d"),
    ]
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.eps == 1e-3
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                assert t.device.type == device and t.dtype == dtype


def test_add_normalization_custom_forward_warns_and_named_sequential():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.mlp = nn.Sequential(
                OrderedDict(fc1=nn.Linear(4, 8), act=nn.GELU(), fc2=nn.Linear(8, 4))
            )

        def forward(self, x):
            return self.mlp(self.conv(x).mean((2, 3)))

    net = Block()
    with pytest.warns(UserWarning, match=r"1 layer\(s\).*: conv"):
        added = add_normalization_(net, "layer")
    # a named Sequential keeps its keys; not the model output (the model is not a Sequential)
    assert list(net.mlp._modules) == ["fc1", "fc1_norm", "act", "fc2", "fc2_norm"]
    assert [(r.name, r.after) for r in added] == [
        ("mlp.fc1_norm", "mlp.fc1"),
        ("mlp.fc2_norm", "mlp.fc2"),
    ]
    assert net(torch.randn(2, 3, 5, 5)).shape == (2, 4)
    net.mlp.append(nn.ReLU())  # Sequential's own methods still work
    assert isinstance(net.mlp[-1], nn.ReLU)


def test_add_normalization_exclude_after_and_errors():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Conv1d(4, 4, 1)), nn.ReLU())
    added = add_normalization_(net, after=(nn.Linear,), skip_output=False)
    assert [r.after for r in added] == ["0"]
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)), nn.ReLU())
    added = add_normalization_(net, exclude=["2"], skip_output=False)
    assert [r.after for r in added] == ["0"]
    with pytest.raises(ValueError, match="kind"):
        add_normalization_(net, "instance")
    with pytest.raises(TypeError, match="after"):
        add_normalization_(net, after=(nn.ReLU,))
    with pytest.raises(ValueError, match="groups"):
        add_normalization_(net, "group", groups=0)
    with pytest.raises(ValueError, match="no module named"):
        add_normalization_(net, exclude=["9"])
    with pytest.raises(ValueError, match="eps"):
        add_normalization_(net, eps=-1.0)
