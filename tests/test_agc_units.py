"""The AGC unit axis: ``adaptive_clip_grad_(..., unit_dim=)`` and ``gradstab.agc_unit_dims``.

Hugging Face's GPT-2 keeps its projections in ``Conv1D`` layers whose weights are ``[in, out]``;
AGC along dim 0 clips them per *input* unit, silently.  The oracle here is AGC written out in
float64 on the unit axis moved to the front, and the equivalence of a ``Conv1D`` layer with the
``nn.Linear`` holding the transposed weight.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import assert_grads_match

import gradstab


class Conv1D(torch.nn.Module):
    """The layout of ``transformers.pytorch_utils.Conv1D``: weight ``[nx, nf]``, ``y = x W + b``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf))
        self.bias = torch.nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def oracle_agc(w, g, dim, clip_factor=0.01, *, eps=1e-3, p=2.0):
    """AGC in float64 with the units along ``dim`` (0-/1-D: one unit)."""
    w64, g64 = w.detach().double(), g.detach().double()
    if w64.dim() < 2:
        wu, gu = w64.reshape(1, -1), g64.reshape(1, -1)
    else:
        rest = math.prod(w64.shape) // max(w64.shape[dim], 1) if w64.shape[dim] else 0
        wu = w64.movedim(dim, 0).reshape(w64.shape[dim], rest)
        gu = g64.movedim(dim, 0).reshape(g64.shape[dim], rest)
    wn = torch.linalg.vector_norm(wu, p, dim=1)
    gn = torch.linalg.vector_norm(gu, p, dim=1)
    max_norm = clip_factor * torch.clamp(wn, min=eps)
    clipped = gn > max_norm
    coef = torch.where(clipped, max_norm / gn, torch.ones_like(gn))
    out = gu * coef[:, None]
    if w64.dim() < 2:
        return out.reshape(g64.shape), int(clipped.sum())
    moved = g64.movedim(dim, 0).shape
    return out.reshape(moved).movedim(0, dim), int(clipped.sum())


def _with_grads(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for q in model.parameters():
        q.grad = torch.randn(q.shape, generator=gen) * 0.5
    return model


@pytest.mark.parametrize("device", DEVICES)
def test_conv1d_is_clipped_per_output_unit_like_the_equivalent_linear(device):
    conv = _with_grads(Conv1D(nf=6, nx=4)).to(device)
    lin = torch.nn.Linear(4, 6).to(device)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    lin.weight.grad = conv.weight.grad.T.clone()
    lin.bias.grad = conv.bias.grad.clone()
    dims = gradstab.agc_unit_dims(conv)
    assert dims[conv.weight] == 1 and dims[conv.bias] == 0
    a = gradstab.adaptive_clip_grad_(conv.parameters(), 0.01, unit_dim=dims)
    b = gradstab.adaptive_clip_grad_(lin.parameters(), 0.01)
    assert torch.equal(a.clipped, b.clipped)
    assert int(a.clipped[0]) > 0  # something was clipped
    torch.testing.assert_close(a.norms, b.norms)
    torch.testing.assert_close(conv.weight.grad, lin.weight.grad.T, rtol=0, atol=0)
    torch.testing.assert_close(conv.bias.grad, lin.bias.grad, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_unit_dim_against_the_float64_oracle(device, dtype):
    shapes_dims = [((5, 7), 1), ((3, 4, 2, 2), 1), ((3, 4, 6), -1), ((8,), 0), ((4, 0), 1)]
    gen = torch.Generator().manual_seed(1)
    params = []
    for shape, _ in shapes_dims:
        q = torch.nn.Parameter((torch.randn(shape, generator=gen)).to(device, dtype))
        q.grad = (torch.randn(shape, generator=gen) * 0.3).to(device, dtype)
        params.append(q)
    params[1].grad = params[1].grad.transpose(0, 1).contiguous().transpose(0, 1)  # strided
    want = [oracle_agc(q, q.grad, d % max(q.dim(), 1)) for q, (_, d) in zip(params, shapes_dims)]
    dims = {q: d for q, (_, d) in zip(params, shapes_dims)}
    stats = gradstab.adaptive_clip_grad_(params, 0.01, unit_dim=dims)
    assert stats.clipped.tolist() == [c for _, c in want]
    assert_grads_match([q.grad for q in params], [g for g, _ in want], 1e-12, "agc unit_dim")


def test_unit_dim_forms():
    """An int, a negative int, a callable and a mapping name the same axis: same results."""
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [torch.randn(3, 5, generator=gen), torch.randn(5, generator=gen)]

    def run(form):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        for q, g in zip(params, grads):
            q.grad = g.clone()
        unit_dim = {params[0]: 1} if form == "mapping" else form
        out = gradstab.adaptive_clip_grad_(params, 0.05, unit_dim=unit_dim)
        return out.clipped.tolist(), [q.grad for q in params]

    clipped, want = run(1)
    assert clipped[0] > 0
    assert clipped != run(0)[0]  # the axis matters
    for form in (-1, lambda q: 1 if q.dim() == 2 else None, "mapping"):
        c, got = run(form)
        assert c == clipped
        assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize(
    ("unit_dim", "exc", "pattern"),
    [
        (
            2,
            ValueError,
            r"unit_dim for parameter 0 \(shape \[3, 5\]\) must be an int in \[-2, 2\), got 2",
        ),
        (-3, ValueError, r"must be an int in \[-2, 2\), got -3"),
        (True, TypeError, r"unit_dim must be an int, a mapping .* got True"),
        ("1", TypeError, r"got '1'"),
        ({"w": 1}, TypeError, r"keyed by the parameters themselves .* got keys such as 'w'"),
        (lambda q: 1.0, TypeError, r"unit_dim for parameter 0 \(shape \[3, 5\]\) must be an int"),
    ],
)
def test_bad_unit_dim_is_refused_before_any_write(unit_dim, exc, pattern):
    q = torch.nn.Parameter(torch.ones(3, 5))
    q.grad = torch.full((3, 5), 100.0)
    with pytest.raises(exc, match=rf"gradstab\.adaptive_clip_grad_: .*{pattern}"):
        gradstab.adaptive_clip_grad_([q], unit_dim=unit_dim)
    assert torch.equal(q.grad, torch.full((3, 5), 100.0))


def test_agc_unit_dims_recognises_the_layouts():
    model = torch.nn.ModuleDict(
        {
            "lin": torch.nn.Linear(3, 4),
            "conv": torch.nn.Conv2d(2, 3, 3),
            "deconv": torch.nn.ConvTranspose2d(3, 5, 2),
            "deconv1": torch.nn.ConvTranspose1d(3, 5, 2, groups=1),
            "emb": torch.nn.Embedding(10, 4),
            "c_attn": Conv1D(nf=12, nx=4),
            "lstm": torch.nn.LSTM(4, 3),
            "norm": torch.nn.LayerNorm(4),
        }
    )
    dims = gradstab.agc_unit_dims(model)
    assert len(dims) == len(list(model.parameters()))
    named = {n: dims[q] for n, q in model.named_parameters()}
    assert named == {
        "lin.weight": 0,
        "lin.bias": 0,
        "conv.weight": 0,
        "conv.bias": 0,
        "deconv.weight": 1,
        "deconv.bias": 0,
        "deconv1.weight": 1,
        "deconv1.bias": 0,
        "emb.weight": 0,
        "c_attn.weight": 1,
        "c_attn.bias": 0,
        "lstm.weight_ih_l0": 0,
        "lstm.weight_hh_l0": 0,
        "lstm.bias_ih_l0": 0,
        "lstm.bias_hh_l0": 0,
        "norm.weight": 0,
        "norm.bias": 0,
    }
    # a module named Conv1D whose weight is not [nx, nf] is not taken for transformers' layout
    odd = Conv1D(nf=6, nx=4)
    odd.nf = 4
    assert gradstab.agc_unit_dims(odd)[odd.weight] == 0


def test_agc_unit_dims_tied_weights():
    emb = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = emb.weight  # GPT-2's tied embedding: both dim 0
    assert gradstab.agc_unit_dims(torch.nn.ModuleList([emb, head]))[emb.weight] == 0
    conv = Conv1D(nf=4, nx=4)
    lin = torch.nn.Linear(4, 4)
    lin.weight = conv.weight  # the layouts disagree: refused
    with pytest.raises(ValueError, match=r"parameter '1\.weight' is shared with '0\.weight'"):
        gradstab.agc_unit_dims(torch.nn.ModuleList([conv, lin]))
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        gradstab.agc_unit_dims([conv.weight])
