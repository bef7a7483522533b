"""``agc_unit_dim`` of GradStabOptimizer and GradStabCallback (mode="agc").

The oracle is a float64 AGC written here from the rule (Brock et al. 2021): for every unit
(a slice along the unit axis) ``g_u *= min(1, lambda * max(||w_u||, eps) / ||g_u||)``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

import gradstab

LAM, EPS = 0.01, 1e-3


class Conv1D(torch.nn.Module):
    """Hugging Face's layout: weight [in, out], ``nf`` = out (transformers is not imported)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = torch.nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = torch.nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        Conv1D(6, 5), torch.nn.Tanh(), torch.nn.Linear(6, 4), torch.nn.Tanh(), Conv1D(3, 4)
    )


def _oracle(weight: torch.Tensor, grad: torch.Tensor, dim: int) -> torch.Tensor:
    w, g = weight.double().movedim(dim, 0), grad.double().movedim(dim, 0)
    if w.dim() < 2:
        w, g = w.reshape(1, -1), g.reshape(1, -1)
    wn = w.reshape(w.shape[0], -1).norm(dim=1).clamp_min(EPS)
    gn = g.reshape(g.shape[0], -1).norm(dim=1)
    coef = torch.where(gn > LAM * wn, LAM * wn / gn, torch.ones_like(gn))
    out = g * coef.reshape(-1, *([1] * (g.dim() - 1)))
    return out.reshape(grad.double().movedim(dim, 0).shape).movedim(0, dim).to(grad.dtype)


def _grads(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():  # large enough that most units clip
        p.grad = torch.randn(p.shape, generator=gen) * 3.0


def _expected(model: torch.nn.Module, dims: dict) -> dict[str, torch.Tensor]:
    return {
        n: _oracle(p.detach(), p.grad, dims.get(n, 0) if p.dim() >= 2 else 0)
        for n, p in model.named_parameters()
    }


def _check(model, want, rtol=1e-5):
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=rtol, atol=1e-7, msg=n)


CONV1D_DIMS = {"0.weight": 1, "4.weight": 1}


def test_optimizer_auto_reads_module_layouts():
    model = _model(0)
    _grads(model, 1)
    want = _expected(model, CONV1D_DIMS)
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), mode="agc", clip_factor=LAM, module=model
    )
    opt.clip()
    _check(model, want)
    # and it differs from dim 0 there (the test would not notice a wrong axis otherwise)
    model0 = _model(0)
    _grads(model0, 1)
    assert not torch.allclose(want["0.weight"], _expected(model0, {})["0.weight"])


def test_optimizer_without_module_uses_dim_0_and_explicit_values_are_honoured():
    model = _model(0)
    _grads(model, 2)
    want = _expected(model, {})
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), mode="agc", clip_factor=LAM
    )
    opt.clip()
    _check(model, want)

    model = _model(0)
    _grads(model, 3)
    want = _expected(model, {"0.weight": 1, "2.weight": 1, "4.weight": 1})
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), mode="agc", clip_factor=LAM, agc_unit_dim=-1
    )
    opt.clip()
    _check(model, want)

    model = _model(0)
    _grads(model, 4)
    w4 = model[4].weight
    want = _expected(model, {"4.weight": 1})
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0),
        mode="agc",
        clip_factor=LAM,
        module=model,
        agc_unit_dim={w4: 1},  # an explicit mapping wins over "auto": 0.weight on dim 0
    )
    opt.clip()
    _check(model, want)


def test_callback_auto_reads_the_lightningmodule(tmp_path):
    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _model(0)

        def training_step(self, batch, _):
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    class SetGrads(pl.Callback):  # runs before gradstab's hook (callbacks run in list order)
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            _grads(pl_module.net, 6)
            want = _expected(pl_module.net, {"0.weight": 1, "4.weight": 1})
            pl_module.want = {"net." + n: t for n, t in want.items()}

    class Capture(pl.Callback):  # runs after it
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            pl_module.got = {n: p.grad.clone() for n, p in pl_module.named_parameters()}

    module = Module()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 5)))
    trainer = pl.Trainer(
        max_steps=1,
        callbacks=[SetGrads(), gradstab.GradStabCallback(mode="agc", clip_factor=LAM), Capture()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    assert set(module.got) == set(module.want)
    for n, t in module.want.items():
        torch.testing.assert_close(module.got[n], t, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("cls", ["callback", "optimizer"])
def test_bad_agc_unit_dim_is_refused_naming_it(cls):
    def make(**kw):
        if cls == "callback":
            return gradstab.GradStabCallback(**kw)
        return gradstab.GradStabOptimizer(
            torch.optim.SGD([torch.nn.Parameter(torch.ones(2))]), **kw
        )

    with pytest.raises(ValueError, match=r"agc_unit_dim must be .*got 'rows'"):
        make(mode="agc", agc_unit_dim="rows")
    with pytest.raises(TypeError, match="agc_unit_dim"):
        make(mode="agc", agc_unit_dim=1.5)
    with pytest.raises(ValueError, match="agc_unit_dim=1 is only used with mode='agc'"):
        make(mode="norm", max_norm=1.0, agc_unit_dim=1)


def test_out_of_range_axis_names_the_option_and_the_parameter():
    model = _model(0)
    _grads(model, 7)
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), mode="agc", agc_unit_dim=2
    )
    with pytest.raises(ValueError, match=r"agc_unit_dim.*shape \[5, 6\]"):
        opt.clip()
