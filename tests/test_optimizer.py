"""GradStabOptimizer in plain PyTorch loops (CPU), with GradScaler, LR schedulers and Lightning.

Oracles: the same loop with ``torch.nn.utils.clip_grad_norm_`` / ``clip_grad_value_`` before
the step, and float64 arithmetic on recorded gradients.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from gradstab_testing.oracles import child_env
from torch import nn

from gradstab import GradStabOptimizer, reference

EPS = 1e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest, and immune to a busy machine's stalls."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def batches(n: int, seed: int = 1, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(3 * torch.randn(32, 8, generator=gen)).to(dtype) for _ in range(n)]


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1).pow(2).mean()


def make_inner(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    kw = {"adam": {}, "adam-foreach": {"foreach": True}, "adam-fused": {"fused": True}}[kind]
    return torch.optim.AdamW(params, lr=0.01, **kw)


def grads_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}


def pnorm(ts, p: float = 2.0) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]), p))


class HostReads:
    """Counts host reads of tensor values while active (item, tolist, bool(), float(), ...)."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")

    def __init__(self, monkeypatch) -> None:
        self.active, self.count = False, 0
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)

            def counted(t, *args, _orig=orig, **kw):
                # the pure-PyTorch kernel reads CPU values by design (free there): not counted
                if self.active and sys._getframe(1).f_code.co_filename != reference.__file__:
                    self.count += 1
                return _orig(t, *args, **kw)

            monkeypatch.setattr(torch.Tensor, name, counted)


# ---------------------------------------------------------------------------------- clipping


@pytest.mark.parametrize("kind", ["sgd", "adam", "adam-fused"])
@pytest.mark.parametrize("mode", ["norm", "value"])
def test_matches_torch_clip_then_step(kind, mode):
    """Same loop clipped by torch.nn.utils: "value" is bit-identical; "norm" differs only in
    the rounding of the coefficient (float32 in torch, float64 here), a few 1e-7 relative per
    step, far below the tolerance after 8 steps."""
    bound = 0.5 if mode == "norm" else 0.02
    ref = make_model()
    ref_opt = make_inner(kind, ref.parameters())
    ours = make_model()
    kw = {"max_norm": bound} if mode == "norm" else {"mode": "value", "clip_value": bound}
    opt = GradStabOptimizer(make_inner(kind, ours.parameters()), **kw)
    clipped = 0
    for x in batches(8):
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        if mode == "norm":
            clipped += float(torch.nn.utils.clip_grad_norm_(ref.parameters(), bound)) > bound
        else:
            torch.nn.utils.clip_grad_value_(ref.parameters(), bound)
        ref_opt.step()
        opt.zero_grad()
        loss_of(ours, x).backward()
        opt.step()
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        if mode == "value":
            assert torch.equal(a, b), n
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
    assert opt.counters()["steps"] == 8
    if mode == "norm":
        assert 0 < clipped == opt.counters()["clipped_steps"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "layer", "max_norm": 0.3},
        {"mode": "layer", "max_norm": 0.3, "group_by": "module"},
        {"mode": "norm", "max_norm": 0.4, "norm_type": 1.0},
        {"mode": "norm", "max_norm": 0.05, "norm_type": math.inf},
    ],
)
def test_clip_matches_float64_oracle(kw, dtype):
    model = make_model(dtype=dtype)
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), module=model, **kw)
    loss_of(model, batches(1, dtype=dtype)[0]).backward()
    before = grads_of(model)
    assert opt.clip() is False
    after = grads_of(model)
    p = kw.get("norm_type", 2.0)
    if kw["mode"] == "norm":
        units = [list(before)]
    elif kw.get("group_by") == "module":
        units = [["0.weight", "0.bias"], ["2.weight", "2.bias"]]
    else:
        units = [[n] for n in before]
    # scaled as PyTorch's mul_: fp32/bf16 in float32 (by the coefficient rounded to float32:
    # two roundings), fp64 in float64
    rtol = {torch.float32: 2e-7, torch.bfloat16: 2**-8, torch.float64: 1e-15}[dtype]
    coefs = []
    for unit in units:
        coef = min(1.0, kw["max_norm"] / (pnorm([before[n] for n in unit], p) + EPS))
        coefs.append(coef)
        for n in unit:
            torch.testing.assert_close(after[n], before[n] * coef, rtol=rtol, atol=0)
    assert min(coefs) < 1


@pytest.mark.parametrize(
    "kw",
    [
        {"mode": "norm", "max_norm": 0.4},
        {"mode": "layer", "max_norm": 0.3},
        {"mode": "layer", "max_norm": 0.3, "group_by": "module"},
        {"mode": "norm", "max_norm": 0.4, "nonfinite": "raise"},
    ],
)
def test_two_phase_path_equals_the_fused_ops(kw, monkeypatch):
    """The path of parts whose norms must be combined first (several devices; sharded
    gradients later), forced on one CPU device: statistics, coefficients, then scaling."""
    from gradstab import _clipping  # noqa: PLC0415

    models, metrics = [], []
    for forced in (False, True):
        if forced:
            for where in (_clipping.parts, _clipping.step):
                monkeypatch.setattr(where, "needs_two_phase", lambda kind, per_dev: kind != "stats")
        model = make_model()
        opt = GradStabOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            module=model,
            log_every_n_steps=1,
            log_per_layer=True,
            **kw,
        )
        for x in batches(3):
            opt.zero_grad()
            loss_of(model, x).backward()
            opt.step()
        models.append(model)
        metrics.append(opt.last_metrics)
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert metrics[0].keys() == metrics[1].keys()
    for k in metrics[0]:
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-6), k
    if kw.get("nonfinite") == "raise":  # the forced path still refuses before changing anything
        model[0].weight.grad[0, 0] = math.nan
        before = grads_of(model)
        with pytest.raises(RuntimeError, match=r"parameter '0\.weight'"):
            opt.step()
        assert all(
            torch.equal(g.nan_to_num(), before[n].nan_to_num()) for n, g in grads_of(model).items()
        )


def test_per_param_group_thresholds_and_add_param_group():
    model = make_model()
    inner = torch.optim.SGD(model[0].parameters(), lr=0.1)
    opt = GradStabOptimizer(inner, max_norm={0: 0.1, 1: 0.01}, module=model)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.05})
    assert opt.param_groups is inner.param_groups and len(inner.param_groups) == 2
    loss_of(model, batches(1)[0]).backward()
    before = grads_of(model)
    opt.clip()
    after = grads_of(model)
    for names, bound in ((["0.weight", "0.bias"], 0.1), (["2.weight", "2.bias"], 0.01)):
        coef = min(1.0, bound / (pnorm([before[n] for n in names]) + EPS))
        assert coef < 1
        for n in names:
            torch.testing.assert_close(after[n], before[n] * coef, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match=r"max_norm=\{0: 0.1, 1: 0.01\} names param group"):
        GradStabOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), max_norm={0: 0.1, 1: 0.01}
        ).clip()


def test_monitor_only_and_log_fn():
    model = make_model()
    logged = []
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        mode=None,
        module=model,
        log_every_n_steps=2,
        log_fn=lambda metrics, step: logged.append((step, metrics)),
        log_per_layer=True,
        log_prefix="health",
    )
    seen = []
    for x in batches(4):
        opt.zero_grad()
        loss_of(model, x).backward()
        seen.append(grads_of(model))
        opt.step()
    assert [s for s, _ in logged] == [2, 4]
    m = logged[-1][1]
    assert m is opt.last_metrics
    assert m["grad_2.0_norm_total"] == pytest.approx(pnorm(seen[-1].values()), rel=1e-6)
    assert m["health/post_clip_norm_total"] == m["grad_2.0_norm_total"]
    assert m["health/clip_coef"] == 1.0 and m["health/clip_rate"] == 0.0
    for n, g in seen[-1].items():
        assert m[f"grad_2.0_norm/{n}"] == pytest.approx(float(g.norm()), rel=1e-6)
        assert m[f"health/max_abs/{n}"] == pytest.approx(float(g.abs().max()), rel=1e-6)


def _train(opt, model, steps, bad=()):
    for i, x in enumerate(batches(steps)):
        opt.zero_grad()
        loss_of(model, x).backward()
        if i in bad:
            model[2].weight.grad[0, 0] = math.nan
        opt.step()


def test_log_fn_without_a_period_logs_every_50_steps():
    model = make_model()
    logged = []
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01),
        max_norm=1.0,
        log_fn=lambda metrics, step: logged.append(step),
    )
    _train(opt, model, 101)
    assert logged == [50, 100]


def test_no_log_fn_no_period_never_logs():
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), max_norm=1.0)
    _train(opt, model, 51)
    assert opt.last_metrics == {}


def test_log_fn_with_period_zero_warns_that_it_is_never_called():
    model = make_model()
    with pytest.warns(UserWarning, match=r"log_fn=.* is never called with log_every_n_steps=0"):
        GradStabOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01),
            max_norm=1.0,
            log_every_n_steps=0,
            log_fn=print,
        )


def test_skipped_steps_warn_rate_limited():
    """A warning at the 1st and the 10th skipped step, not at every one."""
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), nonfinite="skip",
                            max_norm=1.0)  # fmt: skip
    with pytest.warns(UserWarning) as record:
        _train(opt, model, 14, bad=range(1, 13))
    texts = [str(w.message) for w in record if "skipped" in str(w.message)]
    assert len(texts) == 2
    assert texts[0].startswith(
        "GradStabOptimizer: optimizer step 1 skipped: its gradients hold NaN/Inf values "
        "(nonfinite='skip'); 1 step skipped in this process. The next warning comes at 10 "
        "such steps"
    )
    assert (
        "optimizer step 10 skipped" in texts[1] and "10 steps skipped in this process" in texts[1]
    )
    assert opt.counters()["skipped_steps"] == 12


def test_zeroed_step_warns():
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), nonfinite="zero",
                            max_norm=1.0)  # fmt: skip
    match = (
        r"optimizer step 0: its gradients hold NaN/Inf values and were zeroed "
        r"\(nonfinite='zero'\); 1 step zeroed in this process"
    )
    with pytest.warns(UserWarning, match=match):
        _train(opt, model, 2, bad=[0])


def test_healthy_steps_do_not_warn(recwarn):
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), nonfinite="skip",
                            max_norm=1.0)  # fmt: skip
    _train(opt, model, 3)
    assert not [w for w in recwarn if "GradStab" in str(w.message)]


def test_closure_is_evaluated_once_before_the_clip():
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1e-3)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = loss_of(model, batches(1)[0])
        loss.backward()
        return loss

    w = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and calls == [1]
    # the update was clipped: every parameter moved by at most lr * max_norm in total
    moved = math.sqrt(sum(float((p.detach() - q).pow(2).sum()) for p, q in [(model[0].weight, w)]))
    assert 0 < moved <= 0.1 * 1e-3 * (1 + 1e-5)


# ---------------------------------------------------------------------------------- non-finite


def _snapshot(model, opt):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        copy.deepcopy(opt.state_dict()),
    )


def _same(x, y) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return x == y


@pytest.mark.parametrize("kind", ["sgd", "adam", "adam-foreach", "adam-fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_skip_leaves_parameters_and_state_bit_identical(kind, dtype, value):
    model = make_model(dtype=dtype)
    opt = GradStabOptimizer(make_inner(kind, model.parameters()), max_norm=0.5, nonfinite="skip")
    xs = batches(3, dtype=dtype)
    for i, x in enumerate(xs):
        opt.zero_grad()
        loss_of(model, x).backward()
        if i == 1:
            model[2].weight.grad[1, 3] = value
        snap = _snapshot(model, opt)
        opt.step()
        assert _same(snap[0], _snapshot(model, opt)[0]) == (i == 1)
        if i == 1:
            state = _snapshot(model, opt)[1]
            state.pop("gradstab"), snap[1].pop("gradstab")
            assert _same(snap[1], state)
    assert opt.counters() == {
        "steps": 3,
        "clipped_steps": 2,
        "nonfinite_steps": 1,
        "skipped_steps": 1,
    }
    if kind != "sgd":
        assert float(opt.state[model[0].weight]["step"]) == 2


def test_zero_policy_zeroes_gradients_but_steps():
    model = make_model()
    opt = GradStabOptimizer(make_inner("adam", model.parameters()), max_norm=0.5, nonfinite="zero")
    loss_of(model, batches(1)[0]).backward()
    model[0].bias.grad[0] = -math.inf
    opt.step()
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())
    assert float(opt.state[model[0].weight]["step"]) == 1  # the step ran (on zero gradients)
    assert opt.counters()["nonfinite_steps"] == 1 and opt.counters()["skipped_steps"] == 0


@pytest.mark.parametrize("mode", ["norm", "layer", "value"])
def test_raise_names_parameter_and_changes_nothing(mode):
    model = make_model()
    kw = {"clip_value": 1e-3} if mode == "value" else {"max_norm": 1e-3}
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        mode=mode,
        nonfinite="raise",
        module=model,
        **kw,
    )
    loss_of(model, batches(1)[0]).backward()
    model[2].bias.grad[2] = math.nan
    model[2].weight.grad[0, 0] = math.inf
    before, params = grads_of(model), _snapshot(model, opt)[0]
    with pytest.raises(RuntimeError, match=r"parameter '2.weight' has 1 NaN/Inf .*\(2 of 4"):
        opt.step()
    after = grads_of(model)
    for n in before:
        assert torch.equal(before[n].nan_to_num(), after[n].nan_to_num()), n
    assert _same(params, _snapshot(model, opt)[0])


def test_ignore_policy_propagates_nan():
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=1.0)
    loss_of(model, batches(1)[0]).backward()
    model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert torch.isnan(model[2].weight).all()  # NaN total norm -> NaN coefficient, as in torch
    assert opt.counters()["nonfinite_steps"] == 1


# ---------------------------------------------------------------------------------- forwarding


def test_forwards_optimizer_interface():
    model = make_model()
    inner = make_inner("adam", model.parameters())
    opt = GradStabOptimizer(inner, max_norm=0.5)
    assert opt.optimizer is inner
    assert opt.param_groups is inner.param_groups
    assert opt.defaults is inner.defaults
    assert isinstance(opt, torch.optim.Optimizer)
    for x in batches(2):
        opt.zero_grad()
        loss_of(model, x).backward()
        opt.step()
    assert opt.state is inner.state and len(opt.state) == 4
    opt.zero_grad(set_to_none=False)
    assert all(float(p.grad.abs().max()) == 0 for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert "AdamW" in repr(opt) and "max_norm=0.5" in repr(opt)

    sd = opt.state_dict()
    assert sd["gradstab"]["steps"] == 2 and sd["state"].keys() == inner.state_dict()["state"].keys()
    model2 = make_model()
    opt2 = GradStabOptimizer(make_inner("adam", model2.parameters()), max_norm=0.5)
    opt2.load_state_dict(sd)
    assert opt2.counters()["steps"] == 2
    assert _same(opt2.optimizer.state_dict(), inner.state_dict())
    plain = make_inner("adam", model2.parameters())
    plain.load_state_dict(inner.state_dict())
    opt3 = GradStabOptimizer(plain, max_norm=0.5)
    opt3.load_state_dict(inner.state_dict())  # a plain state dict: counters default to 0
    assert opt3.counters()["steps"] == 0


def test_step_hooks_run():
    model = make_model()
    opt = GradStabOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    assert calls == ["pre", "post"]


def test_lr_scheduler():
    model = make_model()
    opt = GradStabOptimizer(make_inner("sgd", model.parameters()), max_norm=0.5, nonfinite="skip")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        warnings.filterwarnings("ignore", "GradStabOptimizer: optimizer step 1 skipped")
        for i, x in enumerate(batches(3)):
            opt.zero_grad()
            loss_of(model, x).backward()
            if i == 1:
                model[0].weight.grad[0, 0] = math.nan  # skipped: the schedule still advances
            opt.step()
            sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    clone = pickle.loads(pickle.dumps(opt))  # the scheduler's step patch is not pickled
    assert clone.counters() == opt.counters()


def test_pickle_and_deepcopy():
    model = make_model()
    opt = GradStabOptimizer(
        make_inner("adam", model.parameters()),
        mode="layer",
        max_norm=0.3,
        group_by="module",
        module=model,
    )
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.counters() == opt.counters()
    assert opt2.param_groups[0]["params"][0] is model2[0].weight
    for m, o in ((model, opt), (model2, opt2), *[copy.deepcopy((model, opt))]):
        o.zero_grad()
        loss_of(m, batches(1, seed=5)[0]).backward()
        o.step()
    torch.testing.assert_close(model2[0].weight, model[0].weight, rtol=0, atol=0)
    assert opt2.counters()["steps"] == opt.counters()["steps"] == 2


# ---------------------------------------------------------------------------------- GradScaler


def _cpu_scaler(**kw):
    try:
        return torch.amp.GradScaler("cpu", **kw)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not available: {exc}")


@pytest.mark.parametrize("kind", ["adam", "adam-fused"])
def test_grad_scaler_unscales_before_the_clip(kind):
    """scaler.step(opt) unscales (power-of-two scale: exact) before the wrapper clips."""
    ref = make_model()
    ref_opt = make_inner(kind, ref.parameters())
    ours = make_model()
    opt = GradStabOptimizer(make_inner(kind, ours.parameters()), max_norm=0.5)
    scaler = _cpu_scaler(init_scale=2.0**10)
    seen = []

    def spy(o, args, kwargs):
        seen.append(pnorm([p.grad for p in ours.parameters()]))

    # after the wrapped step: the clipped gradients, also where the clip is folded into the
    # fused step (which writes them back into .grad)
    opt.optimizer.register_step_post_hook(spy)
    for x in batches(4):
        ref_opt.zero_grad()
        loss_of(ref, x).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        opt.zero_grad()
        scaler.scale(loss_of(ours, x)).backward()
        scaler.step(opt)
        scaler.update()
    assert len(seen) == 4 and max(seen) <= 0.5 * (1 + 1e-6)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert float(scaler.get_scale()) == 2.0**10


def test_grad_scaler_skips_inf_steps():
    model = make_model()
    opt = GradStabOptimizer(make_inner("adam", model.parameters()), max_norm=0.5, nonfinite="raise")
    scaler = _cpu_scaler(init_scale=2.0**10)
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    model[0].weight.grad[0, 0] = math.inf
    params = _snapshot(model, opt)[0]
    scaler.step(opt)  # found the inf: does not call opt.step(), so no clip and no "raise"
    scaler.update()
    assert _same(params, _snapshot(model, opt)[0])
    assert opt.counters()["steps"] == 0
    assert float(scaler.get_scale()) == 2.0**9


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda m: GradStabOptimizer(m, max_norm=1), TypeError, "optimizer must be a torch.optim"),
        (
            lambda m: GradStabOptimizer(torch.optim.LBFGS(m.parameters()), max_norm=1),
            TypeError,
            "optimizer=LBFGS re-evaluates the closure",
        ),
        (
            lambda m: GradStabOptimizer(
                GradStabOptimizer(torch.optim.SGD(m.parameters(), lr=1), max_norm=1), max_norm=1
            ),
            TypeError,
            "optimizer is already a GradStabOptimizer",
        ),
        (
            lambda m: GradStabOptimizer(
                torch.optim.SGD(m.parameters(), lr=1), mode="layer", max_norm=1, group_by="module"
            ),
            ValueError,
            "group_by='module' needs module=",
        ),
        (
            lambda m: GradStabOptimizer(
                torch.optim.SGD(m.parameters(), lr=1), max_norm=1, module=3
            ),
            TypeError,
            "module must be a torch.nn.Module or None; got 3",
        ),
        (
            lambda m: GradStabOptimizer(
                torch.optim.SGD(m.parameters(), lr=1), max_norm=1, log_fn=1
            ),
            TypeError,
            "log_fn must be callable or None; got 1",
        ),
        (
            lambda m: GradStabOptimizer(
                torch.optim.SGD(m.parameters(), lr=1), max_norm=1, log_every_n_steps=2.0
            ),
            TypeError,
            "log_every_n_steps must be None or an int >= 0; got 2.0",
        ),
        (
            lambda m: GradStabOptimizer(torch.optim.SGD(m.parameters(), lr=1), max_norm=-3),
            ValueError,
            "max_norm must be a positive finite number; got -3",
        ),
        (
            lambda m: GradStabOptimizer(torch.optim.SGD(m.parameters(), lr=1), nonfinite="nan"),
            ValueError,
            "mode='norm' needs max_norm",
        ),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=f"GradStabOptimizer: {match}"):
        make(make_model())


# ---------------------------------------------------------------------------------- host reads


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": 0.5},
        {"mode": "layer", "max_norm": 0.1, "log_per_layer": True},
        {"mode": "value", "clip_value": 0.01, "nonfinite": "zero"},
        {"mode": None},
    ],
)
def test_no_host_read_on_steps_that_do_not_log(kw, monkeypatch):
    from gradstab import _clipping  # noqa: PLC0415

    monkeypatch.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
    model = make_model()
    opt = GradStabOptimizer(make_inner("adam", model.parameters()), log_every_n_steps=3, **kw)
    reads = HostReads(monkeypatch)
    counts = []
    for x in batches(6):
        opt.zero_grad()
        loss_of(model, x).backward()
        reads.count, reads.active = 0, True
        opt.clip()  # what step() does before it calls the wrapped optimizer's step()
        reads.active = False
        counts.append(reads.count)
        opt.optimizer.step()  # torch's Adam reads its step counts on the host: not counted
    assert counts[0] == counts[1] == counts[3] == counts[4] == 0
    assert counts[2] >= 1 and counts[5] >= 1


def test_import_without_lightning(tmp_path):
    code = (
        "import sys; sys.modules['lightning'] = None\n"
        "import torch, gradstab\n"
        "assert 'GradStabCallback' not in gradstab.__all__\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = gradstab.GradStabOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=1.0)\n"
        "m(torch.randn(4, 3)).sum().backward(); opt.clip()\n"
        "assert float(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).norm()) <= 1.0\n"
        "try:\n"
        "    gradstab.GradStabCallback\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=child_env(),
        cwd=tmp_path,
        check=True,
        timeout=120,
    )
    assert "GradStabCallback needs Lightning" in out.stdout


# ---------------------------------------------------------------------------------- Lightning


def test_returned_from_configure_optimizers(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: PLC0415

    class Wrapped(BoringModel):
        def __init__(self, wrap: bool):
            super().__init__()
            self.wrap = wrap

        def configure_optimizers(self):
            inner = torch.optim.SGD(self.parameters(), lr=0.1)
            opt = GradStabOptimizer(inner, max_norm=0.5, module=self) if self.wrap else inner
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)]

    def run(wrap: bool, **kw):
        torch.manual_seed(0)
        model = Wrapped(wrap)
        trainer = pl.Trainer(
            max_steps=5,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            **kw,
        )
        trainer.fit(model)
        return model, trainer

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        ours, trainer = run(True)
        ref, _ = run(False, gradient_clip_val=0.5)
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt = trainer.optimizers[0]
    assert isinstance(opt, GradStabOptimizer) and opt.counters()["steps"] == 5
    trainer.save_checkpoint(tmp_path / "w.ckpt")
    ckpt = torch.load(tmp_path / "w.ckpt", weights_only=False)
    assert ckpt["optimizer_states"][0]["gradstab"]["steps"] == 5
