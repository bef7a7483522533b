"""GradStabOptimizer under Lightning Fabric (``fabric.setup(model, optimizer)``).

fp32 and bf16-mixed run for real on the CPU and must equal the same loop without Fabric, bit
for bit.  16-mixed: Fabric refuses ``precision="16-mixed"`` on the CPU (it falls back to
bf16-mixed), so the CPU test passes Fabric its fp16 precision plugin with a CPU GradScaler,
which runs Fabric's scaler path (scale in ``backward``, ``scaler.step`` unscales, then the
wrapper clips); the same test on CUDA uses ``precision="16-mixed"`` and skips without CUDA.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch import nn

pytest.importorskip("lightning.fabric")

from lightning.fabric import Fabric
from lightning.fabric.plugins.precision import MixedPrecision

import gradstab

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings(
        "ignore:.*GradScaler is enabled, but CUDA is not available.*:UserWarning",
        "ignore:.*step 2 skipped.*:UserWarning",
    ),
]

EPS = 1e-6
STEPS = 5
NAN_STEP = 2


class Recorder(torch.optim.SGD):
    """SGD that keeps a float64 copy of the gradients it is stepped with."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, lr=lr)
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        self.seen.append([p.grad.double().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))


def batch(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 8, generator=g).to(device), torch.randn(32, 2, generator=g).to(device)


def make_opt(model: nn.Module, **kw) -> gradstab.GradStabOptimizer:
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return gradstab.GradStabOptimizer(inner, max_norm=0.1, nonfinite="skip", module=model, **kw)


def train(precision: str, *, fabric: bool) -> tuple[list[torch.Tensor], dict[str, int], list]:
    """STEPS AdamW steps with a NaN planted at NAN_STEP, with or without Fabric."""
    model = make_model()
    logged: list[tuple[int, dict[str, float]]] = []
    opt = make_opt(model, log_every_n_steps=1, log_fn=lambda m, s: logged.append((s, m)))
    x, y = batch()
    if fabric:
        f = Fabric(accelerator="cpu", devices=1, precision=precision)
        model, opt = f.setup(model, opt)
        backward = f.backward
        autocast = contextlib.nullcontext  # Fabric's module wrapper autocasts the forward
    else:
        backward = torch.Tensor.backward
        dtype = torch.bfloat16 if precision == "bf16-mixed" else None

        def autocast():
            return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)

    for step in range(STEPS):
        opt.zero_grad()
        with autocast():
            out = model(x)
        loss = nn.functional.mse_loss(out.float(), y)
        backward(loss)
        if step == NAN_STEP:
            next(model.parameters()).grad[0, 0] = math.nan
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return params, opt.counters(), logged


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fabric_equals_the_plain_loop(precision):
    params, counters, logged = train(precision, fabric=True)
    ref_params, ref_counters, ref_logged = train(precision, fabric=False)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    assert counters == ref_counters
    assert counters == {
        "steps": STEPS,
        "clipped_steps": STEPS - 1,
        "nonfinite_steps": 1,
        "skipped_steps": 1,
    }
    assert [s for s, _ in logged] == list(range(1, STEPS + 1))
    for (_, m), (_, r) in zip(logged, ref_logged, strict=True):
        assert m.keys() == r.keys()
        assert all(m[k] == r[k] or (math.isnan(m[k]) and math.isnan(r[k])) for k in m), (m, r)
    assert logged[NAN_STEP][1]["grad/clip_coef"] == 0.0  # the skipped step


def test_fabric_optimizer_forwards_gradstab_attributes():
    model = make_model()
    f = Fabric(accelerator="cpu", devices=1)
    _, opt = f.setup(model, make_opt(model))
    assert isinstance(opt, gradstab.GradStabOptimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.counters()["steps"] == 0 and opt.last_metrics == {}


def _fp16_fabric(device: str) -> Fabric:
    if device == "cpu":  # Fabric(precision="16-mixed") falls back to bf16 on the CPU
        plugin = MixedPrecision(precision="16-mixed", device="cpu")
        return Fabric(accelerator="cpu", devices=1, plugins=[plugin])
    return Fabric(accelerator="cuda", devices=1, precision="16-mixed")


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
def test_fp16_scaler_unscales_before_the_clip(device):
    """The wrapper clips the unscaled gradients; the scaler skips the overflowing step (the
    wrapper is not even called then) and the logged norms are unscaled."""
    f = _fp16_fabric(device)
    scaler = f._precision.scaler
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()
    model = make_model()
    inner = Recorder(model.parameters(), lr=0.1)
    logged: list[tuple[int, dict[str, float]]] = []
    max_norm = 0.05
    opt = gradstab.GradStabOptimizer(
        inner, max_norm=max_norm, log_every_n_steps=1, log_fn=lambda m, s: logged.append((s, m))
    )
    model, opt = f.setup(model, opt)
    x, y = batch(f.device)
    expected: list[list[torch.Tensor]] = []
    pre_norms: list[float] = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x).float(), y)
        f.backward(loss)
        grads = [p.grad for p in model.parameters()]
        scale = float(scaler.get_scale())
        assert scale > 1  # the gradients are scaled here
        if step == NAN_STEP:
            grads[0][0, 0] = math.inf
        else:
            unscaled = [g.double() / scale for g in grads]
            norm = math.sqrt(sum(float(u.pow(2).sum()) for u in unscaled))
            coef = min(1.0, max_norm / (norm + EPS))
            expected.append([u * coef for u in unscaled])
            pre_norms.append(norm)
        opt.step()
    assert len(inner.seen) == STEPS - 1  # the scaler skipped the overflowing step
    for seen, want in zip(inner.seen, expected):
        for s, w in zip(seen, want):
            torch.testing.assert_close(s.cpu(), w.cpu(), rtol=1e-5, atol=1e-9)
    assert opt.counters()["steps"] == STEPS - 1
    assert [m["grad_2.0_norm_total"] for _, m in logged] == pytest.approx(pre_norms, rel=1e-5)
