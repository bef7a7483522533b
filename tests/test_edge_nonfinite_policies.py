"""Every non-finite policy with several clipping units: dict thresholds, ``group_by="module"``.

A ``{param_group: threshold}`` dict makes one clipping unit per param group, and
``group_by="module"`` cuts a unit into one part per module, so the gradients of one step go
through several op calls. A policy is about the *step*, not about the call that saw the NaN
(docs/lightning.md, the GradStabOptimizer docstring): ``"zero"`` zeroes every gradient of the
step, ``"skip"`` takes no optimizer step at all, ``"raise"`` changes no gradient, ``"ignore"``
clips the healthy units exactly as if the NaN were not there. Here the NaN sits in the last
module of the last group, so a policy applied only to the call (unit, part) that holds it
leaves the other units' gradients or parameters changed.

The model has two param groups of two ``Linear`` modules each; SGD with momentum, so a zeroed
step still moves the parameters (momentum) while a skipped one does not. Step 0 is healthy,
step 1 holds the NaN, step 2 is healthy again. Oracles: float64 formulas per unit and part
(torch.linalg.vector_norm), the AGC rule of tests/test_agc.py, bit-for-bit snapshots.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import agc_oracle, assert_bitwise_equal
from torch import nn

from gradstab import GradStabOptimizer, _clipping

EPS = 1e-6
AGC_EPS = 1e-3
POLICIES = ("ignore", "zero", "skip", "raise")

#: (mode, options): two units (dict thresholds); "layer"/"normalize" also by module.
CONFIGS = {
    "norm": {"mode": "norm", "max_norm": {0: 0.05, 1: 0.1}},
    "layer-module": {"mode": "layer", "max_norm": {0: 0.05, 1: 0.02}, "group_by": "module"},
    "normalize-module": {
        "mode": "normalize",
        "target_norm": {0: 0.5, 1: 2.0},
        "group_by": "module",
    },
    "value": {"mode": "value", "clip_value": {0: 0.01, 1: 0.02}},
    "agc": {"mode": "agc", "clip_factor": {0: 0.01, 1: 0.02}},
}
NAMES = ("l0", "l1", "l2", "l3")
BAD = "l3.weight"  # the last module of the last group
BAD_STEP = 1

pytestmark = pytest.mark.usefixtures("one_thread")


def model_and_groups(device: str = "cpu") -> tuple[nn.Module, list[dict]]:
    torch.manual_seed(0)
    model = nn.Sequential()
    for name, (i, o) in zip(NAMES, ((6, 8), (8, 8), (8, 8), (8, 3))):
        model.add_module(name, nn.Linear(i, o))
    model.to(device)
    groups = [
        {"params": [*model.l0.parameters(), *model.l1.parameters()]},
        {"params": [*model.l2.parameters(), *model.l3.parameters()]},
    ]
    return model, groups


def batch(step: int, device: str) -> torch.Tensor:
    return torch.randn(16, 6, generator=torch.Generator().manual_seed(step)).to(device)


def backward(model: nn.Module, step: int) -> None:
    """Gradients of step ``step``; at :data:`BAD_STEP` one element of ``l3.weight`` is NaN."""
    x = batch(step, next(model.parameters()).device)
    h = x
    for name in NAMES:
        h = getattr(model, name)(h)
        if name != NAMES[-1]:
            h = torch.tanh(h)
    h.pow(2).mean().backward()
    if step == BAD_STEP:
        with torch.no_grad():
            model.l3.weight.grad[1, 2] = math.nan


def _threshold(cfg: dict) -> dict[int, float]:
    return next(
        v for k, v in cfg.items() if k in ("max_norm", "clip_value", "target_norm", "clip_factor")
    )


def expected_unit(cfg: dict, grads: dict[str, torch.Tensor], weights, group: int):
    """Float64 oracle of a healthy unit's clipped gradients (``grads``: name -> float64)."""
    mode, bound = cfg["mode"], _threshold(cfg)[group]
    mods = NAMES[:2] if group == 0 else NAMES[2:]
    names = [f"{m}.{k}" for m in mods for k in ("weight", "bias")]

    def norm(ns: list[str]) -> float:
        return float(torch.linalg.vector_norm(torch.cat([grads[n].reshape(-1) for n in ns])))

    out = {}
    if mode == "norm":
        coef = min(1.0, bound / (norm(names) + EPS))
        out = {n: grads[n] * coef for n in names}
    elif mode == "value":
        out = {n: grads[n].clamp(-bound, bound) for n in names}
    elif mode == "agc":
        out = {n: agc_oracle(grads[n], weights[n], bound, AGC_EPS)[0] for n in names}
    else:  # by module: one coefficient per module's joint norm
        for m in mods:
            ns = [f"{m}.weight", f"{m}.bias"]
            coef = bound / (norm(ns) + EPS)
            if mode == "layer":
                coef = min(1.0, coef)
            out.update({n: grads[n] * coef for n in ns})
    return out


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Bitwise copies of parameters, gradients and momentum buffers, by name."""
    snap = {}
    for n, p in model.named_parameters():
        snap["param." + n] = p.detach().clone()
        if p.grad is not None:
            snap["grad." + n] = p.grad.detach().clone()
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            snap["momentum." + n] = buf.clone()
    return snap


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> None:
    """The entries of ``a`` and ``b`` whose key starts with ``prefix`` are bitwise equal."""
    keys = [k for k in a if k.startswith(prefix)]
    assert keys == [k for k in b if k.startswith(prefix)], (keys, list(b))
    for k in keys:
        assert_bitwise_equal(b[k], a[k], k)


def moved(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether some parameter differs between the snapshots ``a`` and ``b``."""
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith("param."))


def check_step(policy: str, cfg: dict, model, *, before, pre, after_clip, after_step) -> None:
    """The bad step's outcome for ``policy``.

    ``before``/``after_step``: snapshots around ``step()``; ``pre``: float64 pre-clip
    gradients by name; ``after_clip``: float64 gradients as the wrapped optimizer saw them
    (``None`` if it was not called).
    """
    weights = {n[6:]: v.double().cpu() for n, v in before.items() if n[:6] == "param."}
    if policy == "skip":
        assert after_clip is None, "the wrapped optimizer stepped on a skipped step"
        assert_same(before, after_step, "param.")
        assert_same(before, after_step, "momentum.")
    elif policy == "zero":
        assert after_clip is not None
        for n, g in after_clip.items():  # every gradient of the step, in every unit and part
            assert torch.equal(g, torch.zeros_like(g)), f"{n} was not zeroed"
        for n, p in model.named_parameters():
            assert torch.isfinite(p).all(), n
        assert moved(before, after_step), "the momentum should still move the parameters"
    elif policy == "ignore":
        assert after_clip is not None
        healthy = expected_unit(cfg, pre, weights, 0)
        for n, want in healthy.items():
            torch.testing.assert_close(after_clip[n], want, rtol=1e-5, atol=1e-12, msg=n)
        assert torch.isnan(after_clip[BAD]).any(), "the NaN was removed"
        assert torch.isnan(model.l3.weight).any(), "ignore lets the NaN reach the step"
        assert torch.isfinite(model.l0.weight).all()


class Recorder(torch.optim.SGD):
    """SGD that records (float64 copies of) the gradients it is given at each step."""

    def __init__(self, groups, model: nn.Module) -> None:
        super().__init__(groups, lr=0.1, momentum=0.9)
        self.seen: list[dict[str, torch.Tensor] | None] = []
        self._names = {id(p): n for n, p in model.named_parameters()}

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append(
            {
                self._names[id(p)]: p.grad.double().cpu().clone()
                for g in self.param_groups
                for p in g["params"]
                if p.grad is not None
            }
        )
        return super().step(closure)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_wrapper_policy_covers_every_unit_and_part(config, policy, device):
    """GradStabOptimizer: the policy acts on the whole step, whichever unit holds the NaN."""
    run_wrapper(CONFIGS[config], policy, device)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_wrapper_zero_without_a_host_read_masks_every_gradient(config, monkeypatch):
    """Off the CPU, "zero" reads no flag on the host: it masks every gradient of the step on
    the device instead. The CPU takes that path here once the host read is said not to be free
    (a GPU runs it in the test above)."""
    monkeypatch.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
    run_wrapper(CONFIGS[config], "zero", "cpu")


def run_wrapper(cfg: dict, policy: str, device: str) -> None:
    """Three steps of the wrapper (the second with the NaN), each checked against its oracle."""
    model, groups = model_and_groups(device)
    inner = Recorder(groups, model)
    opt = GradStabOptimizer(inner, nonfinite=policy, module=model, **cfg)
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        pre = {n: p.grad.double().cpu().clone() for n, p in model.named_parameters()}
        before = snapshot(model, inner)
        seen = len(inner.seen)
        if policy == "raise" and step == BAD_STEP:
            with pytest.raises(RuntimeError, match=rf"parameter '{BAD}' has 1 NaN/Inf"):
                opt.step()
            assert_same(before, snapshot(model, inner), "")  # no gradient, parameter, state
            continue
        opt.step()
        after_clip = inner.seen[-1] if len(inner.seen) > seen else None
        if step == BAD_STEP:
            check_step(
                policy,
                cfg,
                model,
                before=before,
                pre=pre,
                after_clip=after_clip,
                after_step=snapshot(model, inner),
            )
        elif step == 0 or policy != "ignore":  # healthy: every unit clipped by its oracle
            assert after_clip is not None
            weights = {n[6:]: v.double().cpu() for n, v in before.items() if n[:6] == "param."}
            for group in (0, 1):
                for n, want in expected_unit(cfg, pre, weights, group).items():
                    torch.testing.assert_close(after_clip[n], want, rtol=1e-5, atol=1e-12)
    c = opt.counters()
    assert c["steps"] == (2 if policy == "raise" else 3)
    # "ignore": the NaN reached the parameters, so step 2's gradients hold NaN too
    assert c["nonfinite_steps"] == {"raise": 0, "ignore": 2}.get(policy, 1)
    assert c["skipped_steps"] == (1 if policy == "skip" else 0)


# --------------------------------------------------------------------------------- Lightning

try:
    import lightning.pytorch as pl
except ImportError:  # the callback tests need Lightning (the wrapper tests above do not)
    pl = None
needs_lightning = pytest.mark.skipif(pl is None, reason="needs lightning")
LIGHTNING_WARNINGS = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning", "ignore:.*treespec.*"
)

if pl is not None:
    from gradstab import GradStabCallback

    class LitModel(pl.LightningModule):
        """The model above as a LightningModule: the same groups, optimizer, NaN injection."""

        def __init__(self) -> None:
            super().__init__()
            self.net, _ = model_and_groups()

        def training_step(self, batch, batch_idx):
            h = batch[0]
            for name in NAMES:
                h = getattr(self.net, name)(h)
                if name != NAMES[-1]:
                    h = torch.tanh(h)
            return h.pow(2).mean()

        def on_after_backward(self) -> None:
            if self.trainer.global_step == BAD_STEP:
                self.net.l3.weight.grad[1, 2] = math.nan

        def train_dataloader(self):
            xs = torch.cat([batch(s, "cpu") for s in range(3)])
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs), batch_size=16)

        def configure_optimizers(self):
            n = self.net
            groups = [
                {"params": [*n.l0.parameters(), *n.l1.parameters()]},
                {"params": [*n.l2.parameters(), *n.l3.parameters()]},
            ]
            return torch.optim.SGD(groups, lr=0.1, momentum=0.9)

    class Spy(pl.Callback):
        """Float64 gradients (by parameter name, ``net.`` dropped) and parameters at the hook."""

        def __init__(self) -> None:
            self.grads: list[dict[str, torch.Tensor]] = []
            self.params: list[dict[str, torch.Tensor]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grads.append(
                {
                    n.removeprefix("net."): p.grad.double().clone()
                    for n, p in pl_module.named_parameters()
                    if p.grad is not None
                }
            )
            self.params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


@needs_lightning
@LIGHTNING_WARNINGS
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_callback_policy_covers_every_unit_and_part(config, policy):
    """GradStabCallback in a Lightning run: the same, seen by spies around the callback."""
    cfg = CONFIGS[config]
    before, after = Spy(), Spy()
    cb = GradStabCallback(nonfinite=policy, **cfg)
    model = LitModel()
    trainer = pl.Trainer(
        callbacks=[before, cb, after],
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    if policy == "raise":
        with pytest.raises(RuntimeError, match=rf"parameter 'net\.{BAD}' has 1 NaN/Inf"):
            trainer.fit(model)
        assert len(before.grads) == BAD_STEP + 1
        for n, p in model.named_parameters():  # no gradient changed, no step taken
            assert_bitwise_equal(p.grad.double(), before.grads[-1][n[4:]], n)
            assert torch.equal(p.detach(), before.params[-1][n]), n
        return
    trainer.fit(model)
    pre, post = before.grads[BAD_STEP], after.grads[BAD_STEP]
    if policy == "skip":  # every gradient dropped, parameters not moved
        assert post == {}
        assert all(torch.equal(before.params[2][n], v) for n, v in before.params[1].items())
    elif policy == "zero":
        assert set(post) == set(pre)
        for n, g in post.items():
            assert torch.equal(g, torch.zeros_like(g)), f"{n} was not zeroed"
        assert not all(torch.equal(before.params[2][n], v) for n, v in before.params[1].items())
    else:  # ignore: the healthy unit clipped by its oracle, the NaN left in place
        weights = {n.removeprefix("net."): v.double() for n, v in before.params[1].items()}
        for n, want in expected_unit(cfg, pre, weights, 0).items():
            torch.testing.assert_close(post[n], want, rtol=1e-5, atol=1e-12, msg=n)
        assert torch.isnan(post[BAD]).any()
    for step in (0, 2):  # healthy steps: both units clipped by their oracles
        if policy == "ignore" and step == 2:
            continue  # the NaN reached the parameters at step 1
        weights = {n.removeprefix("net."): v.double() for n, v in before.params[step].items()}
        for group in (0, 1):
            for n, want in expected_unit(cfg, before.grads[step], weights, group).items():
                torch.testing.assert_close(after.grads[step][n], want, rtol=1e-5, atol=1e-12)
    c = cb.counters()
    assert (c["steps"], c["nonfinite_steps"]) == (3, 2 if policy == "ignore" else 1)
    assert c["skipped_steps"] == (1 if policy == "skip" else 0)
