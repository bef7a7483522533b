"""Names of per-parameter statistics with ``None``, frozen and tied (duplicate) parameters.

The ops see only the gradients that exist; the callback and the wrapper must map each row of
their statistics back to its parameter's name by the *kept indices*, never by position. A
model whose parameters without a gradient sit in the middle (a module never called, a frozen
weight before a trained bias in one module), with a weight tied under two names
(``named_parameters()`` lists it once), in one param group or split into two, is run in every
mode; the per-parameter metrics (``log_per_layer=True``), the recorded history (``history=``)
and the clipped gradients must all belong to the right name. A mapping by position shifts
every name after the first gap onto its neighbour's norm.

Oracles: float64 ``torch.linalg.vector_norm`` and max-abs of the gradients recorded before the
clip, the clip formulas in float64, the AGC rule of tests/test_agc.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import agc_oracle
from torch import nn

from gradstab import GradStabOptimizer, PercentileThreshold

EPS = 1e-6
AGC_EPS = 1e-3

pytestmark = pytest.mark.usefixtures("one_thread")

#: mode -> (threshold option, a threshold that clips this model's gradients)
MODES = {
    "norm": ("max_norm", 0.05),
    "layer": ("max_norm", 0.02),
    "value": ("clip_value", 0.01),
    "agc": ("clip_factor", 0.01),
    "normalize": ("target_norm", 0.5),
}
#: parameters that never get a gradient: a module never called, a frozen weight
NO_GRAD = ("unused.weight", "unused.bias", "frozen.weight")


class Gappy(nn.Module):
    """``a`` (used), ``unused`` (never called), ``frozen`` (its weight needs no gradient, its
    bias does: a gap inside one module), ``tied`` (its weight is ``a.weight``: one parameter,
    two names), ``b``. ``named_parameters()``: a.weight, a.bias, unused.weight, unused.bias,
    frozen.weight, frozen.bias, tied.bias, b.weight, b.bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.unused = nn.Linear(6, 5)
        self.frozen = nn.Linear(5, 5)
        self.frozen.weight.requires_grad_(False)
        self.tied = nn.Linear(6, 5)
        self.tied.weight = self.a.weight
        self.b = nn.Linear(5, 3)
        with torch.no_grad():  # distinct scales: a shifted name gets a visibly wrong norm
            self.b.weight.mul_(4.0)
            self.tied.bias.mul_(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x)) + torch.tanh(0.5 * self.tied(x))
        return self.b(self.frozen(h))


def make_model(device: str) -> Gappy:
    torch.manual_seed(0)
    return Gappy().to(device)


def backward(model: Gappy, step: int) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
    x = x.to(next(model.parameters()).device)
    (model(x) - 1.0).pow(2).mean().mul(3.0 + step).backward()


def param_groups(model: Gappy, split: bool) -> list[dict]:
    """All parameters in one group, or two groups, each with parameters without a gradient
    before some with one."""
    if not split:
        return [{"params": list(model.parameters())}]  # the tied weight once
    p = dict(model.named_parameters())
    first = ["a.weight", "unused.weight", "unused.bias", "a.bias"]
    second = ["frozen.weight", "frozen.bias", "tied.bias", "b.weight", "b.bias"]
    return [{"params": [p[n] for n in first]}, {"params": [p[n] for n in second]}]


def options(mode: str, split: bool, group_by: str) -> dict:
    name, value = MODES[mode]
    return {
        "mode": mode,
        name: {0: value, 1: 2 * value} if split else value,
        "group_by": group_by,
    }


def expected_clip(mode: str, thr, pre, weights, groups_of):
    """Float64 oracle of the clipped gradients by name (``pre``: name -> float64 gradient).

    ``groups_of``: the names of each param group that have a gradient; ``thr``: one
    threshold or one per group (dict).
    """
    out = {}
    for gi, names in enumerate(groups_of):
        bound = thr[gi] if isinstance(thr, dict) else thr
        if mode == "norm":
            total = float(torch.linalg.vector_norm(torch.cat([pre[n].reshape(-1) for n in names])))
            out.update({n: pre[n] * min(1.0, bound / (total + EPS)) for n in names})
        for n in names if mode != "norm" else ():
            g = pre[n]
            norm = float(torch.linalg.vector_norm(g))
            if mode == "layer":
                out[n] = g * min(1.0, bound / (norm + EPS))
            elif mode == "normalize":
                out[n] = g * (bound / (norm + EPS))
            elif mode == "value":
                out[n] = g.clamp(-bound, bound)
            else:
                out[n] = agc_oracle(g, weights[n], bound, AGC_EPS)[0]
    return out


def _groups_with_grad(model: Gappy, groups: list[dict]) -> list[list[str]]:
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"] if p.grad is not None] for g in groups]


def check_metrics(metrics: dict, mode: str, pre: dict, prefix: str = "") -> None:
    """Per-parameter keys exist exactly for the parameters with a gradient, with their values.

    ``pre``: name -> float64 pre-clip gradient (names as the model gives them).
    """
    norm_keys = {k for k in metrics if k.startswith("grad_2.0_norm/")}
    assert norm_keys == {f"grad_2.0_norm/{prefix}{n}" for n in pre}
    for n, g in pre.items():
        want = float(torch.linalg.vector_norm(g))
        got = metrics[f"grad_2.0_norm/{prefix}{n}"]
        assert got == pytest.approx(want, rel=1e-6), f"norm logged under {n!r} is not its own"
        if mode == "agc":
            continue  # the second statistic is the number of clipped units (checked apart)
        got = metrics[f"grad/max_abs/{prefix}{n}"]
        assert got == pytest.approx(float(g.abs().max()), rel=1e-6), f"max_abs of {n!r}"


def check_history(history, names: list[str], pre_by_step: list[dict], prefix: str = "") -> None:
    """The history's columns are ``names``; every recorded row holds each name's own norm and
    max-abs, and NaN where it had no gradient."""
    d = history.data()
    assert d.names == [f"{prefix}{n}" for n in names]
    for row, pre in enumerate(pre_by_step):
        for col, name in enumerate(d.names):
            n = name.removeprefix(prefix)
            if n not in pre:
                assert math.isnan(d.norms[row, col]), f"{n} has no gradient but a norm"
                continue
            want = float(torch.linalg.vector_norm(pre[n]))
            assert float(d.norms[row, col]) == pytest.approx(want, rel=1e-6), n
            if not torch.isnan(d.max_abs[row, col]):  # AGC records no max-abs
                assert float(d.max_abs[row, col]) == pytest.approx(float(pre[n].abs().max()))
            assert int(d.nonfinite[row, col]) == 0


#: every mode by parameter, and the modes that also group by module
MODE_GROUPING = [(m, "param") for m in MODES] + [("layer", "module"), ("normalize", "module")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("split", [False, True], ids=["one-group", "dict-two-groups"])
@pytest.mark.parametrize(("mode", "group_by"), MODE_GROUPING)
def test_wrapper_names_rows_by_kept_index(mode, group_by, split, device):
    """Per-parameter metrics, clipped gradients (by parameter: each name's own oracle), AGC's
    clipped units and the history rows all belong to the right name."""
    model = make_model(device)
    groups = param_groups(model, split)
    logged: list[dict] = []
    opt = GradStabOptimizer(
        torch.optim.SGD(groups, lr=0.01),
        module=model,
        log_every_n_steps=1,
        log_fn=lambda m, s: logged.append(m),
        log_per_layer=True,
        history=4,
        **options(mode, split, group_by),
    )
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    pres = []
    for step in range(2):
        opt.zero_grad()
        backward(model, step)
        pre = {
            n: p.grad.double().cpu().clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        assert not set(pre) & set(NO_GRAD) and len(pre) == 6
        weights = {n: p.detach().double().cpu().clone() for n, p in model.named_parameters()}
        clip = opt.clip()  # the clip alone: the gradients as the optimizer step would see them
        assert clip is False
        check_metrics(logged[-1], mode, pre)
        if group_by == "param":
            thr = options(mode, split, group_by)[MODES[mode][0]]
            want = expected_clip(mode, thr, pre, weights, _groups_with_grad(model, groups))
            for n, p in model.named_parameters():
                if n in want:
                    torch.testing.assert_close(
                        p.grad.double().cpu(), want[n], rtol=1e-5, atol=1e-12, msg=n
                    )
        if mode == "agc":
            thr = options(mode, split, group_by)["clip_factor"]
            for gi, names in enumerate(_groups_with_grad(model, groups)):
                b = thr[gi] if isinstance(thr, dict) else thr
                for n in names:
                    want_units = agc_oracle(pre[n], weights[n], b, AGC_EPS)[1]
                    assert logged[-1][f"grad/agc_clipped_units/{n}"] == want_units, n
        opt.optimizer.step()
        pres.append(pre)
    check_history(opt.history, order, pres)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["norm", "layer"])
def test_wrapper_without_module_names_by_position_in_the_optimizer(mode, device):
    """Without ``module=`` names are ``param_groups.<g>.<i>`` of the optimizer's lists; the
    gaps keep their own index."""
    model = make_model(device)
    groups = param_groups(model, split=True)
    logged: list[dict] = []
    opt = GradStabOptimizer(
        torch.optim.SGD(groups, lr=0.01),
        log_every_n_steps=1,
        log_fn=lambda m, s: logged.append(m),
        log_per_layer=True,
        history=2,
        **options(mode, True, "param"),
    )
    backward(model, 0)
    by_param = {}
    for gi, g in enumerate(groups):
        for i, p in enumerate(g["params"]):
            if p.grad is not None:
                by_param[f"param_groups.{gi}.{i}"] = p.grad.double().cpu().clone()
    opt.clip()
    check_metrics(logged[-1], mode, by_param)
    order = [
        f"param_groups.{gi}.{i}" for gi, g in enumerate(groups) for i in range(len(g["params"]))
    ]
    check_history(opt.history, order, [by_param])


@pytest.mark.parametrize("device", DEVICES)
def test_layer_adaptive_thresholds_follow_their_own_tensor(device):
    """``mode="layer"`` with a per-tensor adaptive threshold: the bound used and logged under a
    name is the maximum of *that* tensor's earlier norms (percentile 100 of its history, the
    current norm excluded; none yet at the first step: inf), and its gradient is clipped by it.
    The loss grows each step, so later steps clip."""
    model = make_model(device)
    logged: list[dict] = []
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        mode="layer",
        max_norm=PercentileThreshold(100.0, history=8, include_current=False),
        module=model,
        log_every_n_steps=1,
        log_fn=lambda m, s: logged.append(m),
        log_per_layer=True,
    )
    earlier: dict[str, list[float]] = {}
    for step in range(3):
        opt.zero_grad()
        backward(model, step)
        pre = {
            n: p.grad.double().cpu().clone()
            for n, p in model.named_parameters()
            if p.grad is not None
        }
        opt.clip()
        keys = {k for k in logged[-1] if k.startswith("grad/clip_threshold/")}
        assert keys == {f"grad/clip_threshold/{n}" for n in pre}
        grads = dict(model.named_parameters())
        for n, g in pre.items():
            bound = max(earlier.get(n, [math.inf]))
            assert logged[-1][f"grad/clip_threshold/{n}"] == pytest.approx(bound, rel=1e-6), n
            norm = float(torch.linalg.vector_norm(g))
            want = g * min(1.0, bound / (norm + EPS))
            torch.testing.assert_close(grads[n].grad.double().cpu(), want, rtol=1e-5, atol=0)
            earlier.setdefault(n, []).append(norm)
        opt.optimizer.step()


def test_duplicate_parameter_in_the_optimizer_keeps_its_name():
    """A parameter listed twice (PyTorch warns, then clips it twice in a loop): every row of
    it carries its own name and norm; the gap after it does not shift the others."""
    model = make_model("cpu")
    ps = list(model.parameters())
    with pytest.warns(UserWarning, match="duplicate parameters"):
        inner = torch.optim.SGD([*ps[:2], ps[0], *ps[2:]], lr=0.01)
    logged: list[dict] = []
    opt = GradStabOptimizer(
        inner,
        mode=None,
        module=model,
        log_every_n_steps=1,
        log_fn=lambda m, s: logged.append(m),
        log_per_layer=True,
    )
    backward(model, 0)
    pre = {n: p.grad.double().clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.clip()
    check_metrics(logged[-1], "norm", pre)


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

    class LitGappy(pl.LightningModule):
        """:class:`Gappy` as a LightningModule (parameter names ``net.*``)."""

        def __init__(self, split: bool) -> None:
            super().__init__()
            self.net = make_model("cpu")
            self.split = split

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return (self.net(x) - 1.0).pow(2).mean().mul(3.0 + self.trainer.global_step)

        def train_dataloader(self):
            xs = torch.cat(
                [torch.randn(8, 6, generator=torch.Generator().manual_seed(s)) for s in range(2)]
            )
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs), batch_size=8)

        def configure_optimizers(self):
            return torch.optim.SGD(param_groups(self.net, self.split), lr=0.01)

    class Spy(pl.Callback):
        """Float64 pre-clip gradients by name (``net.`` dropped), at the hook."""

        def __init__(self) -> None:
            self.grads: list[dict[str, torch.Tensor]] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            self.grads.append(
                {
                    n.removeprefix("net."): p.grad.double().clone()
                    for n, p in pl_module.named_parameters()
                    if p.grad is not None
                }
            )


@needs_lightning
@LIGHTNING_WARNINGS
@pytest.mark.parametrize(
    ("mode", "group_by", "split"),
    [
        ("norm", "param", False),
        ("layer", "param", True),
        ("layer", "module", False),
        ("value", "param", True),
        ("agc", "param", False),
        ("normalize", "module", True),
    ],
)
def test_callback_names_rows_by_kept_index(mode, group_by, split):
    """The callback in a Lightning run: per-parameter metrics and history rows by name."""
    spy = Spy()
    cb = GradStabCallback(
        log_every_n_steps=1,
        log_per_layer=True,
        history=4,
        diagnose_on_fit_end=False,
        **options(mode, split, group_by),
    )
    model = LitGappy(split)
    trainer = pl.Trainer(
        callbacks=[spy, cb],
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model)
    assert len(spy.grads) == 2 and len(spy.grads[-1]) == 6
    check_metrics(cb.last_metrics, mode, spy.grads[-1], prefix="net.")
    order = [n.removeprefix("net.") for n, p in model.named_parameters() if p.requires_grad]
    check_history(cb.history, order, spy.grads, prefix="net.")
