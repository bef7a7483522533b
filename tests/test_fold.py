"""The clip and the skip folded into a torch fused optimizer's own pass (issue 12, item 1).

``fold=None`` (the default) or ``True``: in mode ``"norm"`` around ``Adam``/``AdamW``/``SGD``/
``Adagrad`` with ``fused=True``, gradstab measures the gradients (one read, nothing written),
sets ``optimizer.grad_scale = 1 / c`` and, for ``nonfinite="skip"``, ``optimizer.found_inf``,
and the fused step divides, skips and writes the clipped gradients back into ``.grad``. The
oracle is the explicit clip (``fold=False``) on the same loop, and torch's own optimizers.

Tolerance (:data:`RTOL`, :data:`ATOL`). The explicit clip writes ``fp32(g * c64)`` (one
rounding); the fold lets the optimizer compute ``fp32(g / fp32(1 / c))``, where ``c`` comes
from the float32 total the op returns instead of the kernel's float64 one: at most four
roundings of 2**-24 between the two clipped gradients, ``4 * 2**-24`` relative, and exactly
nothing on a step that does not clip (``c == 1``: ``grad_scale == 1``). An optimizer turns a
relative gradient change ``d`` into an update change of at most ``~2 d`` of the update
(Adam's second moment), far below one ulp of the parameter, so after ``STEPS`` steps the
parameters can differ by a rounding flip of at most one ulp per step: ``STEPS * 2**-23``
relative to parameters of magnitude <= 1. The tolerance is twice that.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import warnings

import pytest
import torch
from torch import nn

import gradstab
from gradstab import GradStabCallback, GradStabOptimizer
from gradstab._clipping import fold as fold_mod

STEPS = 20
NAN_AT = 7  # the step whose gradient gets a NaN (not the first: see the SGD test)
RTOL = ATOL = 2 * STEPS * 2**-23
MAX_NORM = 0.5


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest on a busy two-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _reads(request, monkeypatch):
    """How the fold may read the coefficient: ``"device-like"`` (the default here) never on
    the host, as on CUDA, so every step folds; ``"cpu"`` (tests parametrized with ``reads``)
    as on the CPU, where a step that neither clips nor skips sets nothing."""
    callspec = getattr(request.node, "callspec", None)
    reads = callspec.params.get("reads", "device-like") if callspec else "device-like"
    if reads != "cpu":
        monkeypatch.setattr(fold_mod, "_read_is_free", lambda t: False)
    return reads


READS = pytest.mark.parametrize("reads", ["cpu", "device-like"])


# ---------------------------------------------------------------------------------- helpers


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def make_inner(kind: str, params, fused: bool = True) -> torch.optim.Optimizer:
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2, fused=fused)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=fused)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=1e-2, momentum=0.9, fused=fused)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=1e-2, fused=fused)
    raise AssertionError(kind)


def inputs(step: int, gen: torch.Generator) -> torch.Tensor:
    # every third batch is large: those steps clip, the others do not
    return torch.randn(32, 8, generator=gen) * (4.0 if step % 3 == 0 else 0.05)


def loss_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - x.sum(1, keepdim=True)).pow(2).mean()


def snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    sd = copy.deepcopy(opt.state_dict())
    sd.pop("gradstab", None)
    return [p.detach().clone() for p in model.parameters()], sd


def same(x, y) -> bool:
    """Bit-identical (NaN equal to NaN)."""
    if isinstance(x, torch.Tensor):
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.view(-1), y.view(-1))
    if isinstance(x, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (tuple, list)):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
    return x == y


def close(x, y, msg: str = "") -> None:
    if isinstance(x, torch.Tensor):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL, equal_nan=True, msg=msg)
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), msg
        for k in x:
            close(x[k], y[k], f"{msg}.{k}")
    elif isinstance(x, (tuple, list)):
        assert len(x) == len(y), msg
        for i, (a, b) in enumerate(zip(x, y)):
            close(a, b, f"{msg}[{i}]")
    else:
        assert x == y, msg


class Seen:
    """A step pre-hook on the wrapped optimizer: what it reads inside ``step()``."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.scales: list[float | None] = []
        self.found: list[float | None] = []
        opt.register_step_pre_hook(self)

    def __call__(self, opt, args, kwargs) -> None:
        s, f = getattr(opt, "grad_scale", None), getattr(opt, "found_inf", None)
        self.scales.append(None if s is None else float(s))
        self.found.append(None if f is None else float(f))


def assert_folded_where_due(reads: str, out, skipped=(), zeroed=()) -> None:
    """Every step of ``out`` (a :func:`run_loop`) handed a ``grad_scale`` to the wrapped step,
    except, with CPU reads, a step that neither clipped nor was skipped (nothing to fold): one
    whose logged coefficient is 1, or a ``zeroed`` one (logged 0, folded with coefficient 1)."""
    coefs = [m["grad/clip_coef"] for m in out["logged"]]
    for i, (c, s) in enumerate(zip(coefs, out["seen"].scales)):
        unclipped = 0.999 < c < 1.001 or i in zeroed
        due = reads != "cpu" or i in skipped or not unclipped
        assert (s is not None) == due, (i, c, s)


def run_loop(kind: str, fold, *, nonfinite="skip", bad=None, steps=STEPS, **kw):
    """``steps`` optimizer steps of one loop; returns what the comparisons need."""
    bad = {NAN_AT: math.nan} if bad is None else bad
    model = make_model()
    logged: list[dict[str, float]] = []
    opt = GradStabOptimizer(
        make_inner(kind, model.parameters()),
        max_norm=kw.pop("max_norm", MAX_NORM),
        nonfinite=nonfinite,
        fold=fold,
        log_every_n_steps=1,
        log_fn=lambda m, s: logged.append(dict(m)),
        **kw,
    )
    seen = Seen(opt.optimizer)
    gen = torch.Generator().manual_seed(1)
    grads, snaps = [], []
    for i in range(steps):
        opt.zero_grad()
        loss_of(model, inputs(i, gen)).backward()
        if i in bad:
            model[2].weight.grad[0, 3] = bad[i]
        before = snapshot(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the skip/zero notices
            opt.step()
        snaps.append((before, snapshot(model, opt)))
        grads.append([p.grad.detach().clone() for p in model.parameters()])
    return {
        "model": model,
        "opt": opt,
        "seen": seen,
        "logged": logged,
        "grads": grads,
        "snaps": snaps,
    }


# ---------------------------------------------------------------------------------- wrapper


@READS
@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "adagrad"])
def test_folded_steps_equal_the_explicit_clip(kind, reads):
    """20 steps (some clip, some do not, one NaN step skipped): parameters, optimizer state,
    ``.grad`` after each step, counters and metrics equal the explicit clip's.

    On the CPU (the coefficient reads for free) a step that neither clips nor skips sets
    nothing; "device-like" turns the free read off, as on CUDA: every step is folded."""
    ours = run_loop(kind, None)
    ref = run_loop(kind, False)
    coefs = [m["grad/clip_coef"] for m in ours["logged"]]
    scales, found = ours["seen"].scales, ours["seen"].found
    # the fold happened: grad_scale = 1/c, found_inf for "skip", 1 on the NaN step
    assert scales[NAN_AT] is not None and found[NAN_AT] == 1.0
    for i, (c, s, f) in enumerate(zip(coefs, scales, found)):
        if i == NAN_AT:
            continue
        if reads == "cpu" and c > 0.999:  # no clip: nothing to fold, the optimizer's own step
            assert s is None and f is None, i
            continue
        # the inverse coefficient: 1 where the step did not clip, 1/c where it did
        assert s == pytest.approx(1.0 / c, rel=1e-6), i
        # fused SGD's first step (no momentum buffer yet) decides a skip on the host instead
        assert f == (None if kind == "sgd" and i == 0 else 0.0), i
    assert all(s is None for s in ref["seen"].scales)  # fold=False: the explicit clip
    clipped = sum(c < 0.999 for i, c in enumerate(coefs) if i != NAN_AT)
    assert 3 <= clipped <= STEPS - 3  # some steps clip, some do not

    for (n, a), b in zip(ours["model"].named_parameters(), ref["model"].parameters()):
        close(a, b, n)
    sa, sb = ours["opt"].state_dict(), ref["opt"].state_dict()
    assert sa.pop("gradstab") == sb.pop("gradstab")  # counters
    close(sa, sb, "state")
    # after a folded step .grad holds the clipped gradient (the fused step writes g / (1/c));
    # after a skipped one, the gradient as it came (the explicit clip multiplied it by NaN)
    for i, (ga, gb) in enumerate(zip(ours["grads"], ref["grads"])):
        if i != NAN_AT:
            close(ga, gb, f"grad after step {i}")
    assert int(torch.isnan(ours["grads"][NAN_AT][2]).sum()) == 1
    assert all(torch.isnan(g).all() for g in ref["grads"][NAN_AT])
    # metrics: the same keys; the first step (identical inputs) bit for bit
    assert ours["logged"][0] == ref["logged"][0]
    for i, (ma, mb) in enumerate(zip(ours["logged"], ref["logged"])):
        assert ma.keys() == mb.keys()
        for k in ma:
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-7, nan_ok=True), (i, k)
    assert ours["opt"].counters() == {
        "steps": STEPS,
        "clipped_steps": clipped,
        "nonfinite_steps": 1,
        "skipped_steps": 1,
    }


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd", "adagrad"])
def test_folded_skip_leaves_parameters_and_state_bit_identical(kind):
    out = run_loop(kind, True, steps=NAN_AT + 2)
    for i, (before, after) in enumerate(out["snaps"]):
        assert same(before, after) == (i == NAN_AT), i
    if kind != "sgd":  # the step count went back: one step fewer than calls
        assert float(out["opt"].state[out["model"][0].weight]["step"]) == NAN_AT + 1


def test_sgd_momentum_first_step_skip_is_decided_on_the_host():
    """Fused SGD makes its momentum buffers with empty_like on its first step and keeps them
    when found_inf skips it: that first skip must not go to found_inf."""
    out = run_loop("sgd", None, bad={0: math.nan}, steps=3)
    before, after = out["snaps"][0]
    assert same(before, after)
    assert after[1]["state"] == {}  # no momentum buffer (uninitialized memory) was kept
    assert len(out["seen"].scales) == 2  # the wrapped step was not called at step 0
    ref = run_loop("sgd", False, bad={0: math.nan}, steps=3)
    for a, b in zip(out["model"].parameters(), ref["model"].parameters()):
        close(a, b)
    # step 1 still has no buffer (host decides); from step 2 the skip goes to the device
    assert out["seen"].found == [None, 0.0]


@READS
@pytest.mark.parametrize(
    ("policy", "value"),
    [("zero", math.nan), ("zero", math.inf), ("ignore", math.nan), ("ignore", -math.inf)],
)
def test_other_policies_equal_the_explicit_clip(policy, value, reads):
    """Policy "zero": the zeroed step runs with a coefficient of 1 (not 1/NaN); "ignore": the
    NaN coefficient (or 0 for an infinite norm) reaches the weights as in the explicit clip."""
    ours = run_loop("adamw", None, nonfinite=policy, bad={2: value}, steps=4)
    ref = run_loop("adamw", False, nonfinite=policy, bad={2: value}, steps=4)
    if policy == "zero":
        assert_folded_where_due(reads, ours, zeroed=(2,))
    else:
        assert_folded_where_due(reads, ours, skipped=(2,))  # a NaN or 0 coefficient
    assert all(f is None for f in ours["seen"].found)  # no skip: found_inf stays unset
    for a, b in zip(ours["model"].parameters(), ref["model"].parameters()):
        close(a, b)
    close(ours["opt"].state_dict()["state"], ref["opt"].state_dict()["state"])
    if policy == "zero":
        assert ours["seen"].scales[2] == (None if reads == "cpu" else 1.0)
        assert all(torch.isfinite(p).all() for p in ours["model"].parameters())
    else:
        assert not all(torch.isfinite(p).all() for p in ours["model"].parameters())


def test_raise_names_the_parameter_and_changes_nothing():
    model = make_model()
    opt = GradStabOptimizer(
        make_inner("adamw", model.parameters()), max_norm=MAX_NORM, nonfinite="raise", fold=True
    )
    loss_of(model, torch.randn(4, 8)).backward()
    opt.step()
    opt.zero_grad()
    loss_of(model, torch.randn(4, 8)).backward()
    model[2].bias.grad[0] = math.inf
    snap = snapshot(model, opt)
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"parameter 'param_groups.0.3'"):
        opt.step()
    assert same(snap, snapshot(model, opt))
    assert same(grads, [p.grad for p in model.parameters()])
    assert not hasattr(opt.optimizer, "grad_scale")
    assert opt.counters()["steps"] == 1


@pytest.mark.parametrize(
    "threshold",
    [
        lambda: gradstab.ZScoreThreshold(warmup_steps=3),
        lambda: gradstab.PercentileThreshold(90.0, history=8),
    ],
    ids=["zscore", "percentile"],
)
@READS
def test_adaptive_thresholds_and_history_equal_the_explicit_clip(threshold, reads):
    ours = run_loop("adamw", None, max_norm=threshold(), history=STEPS, steps=12)
    ref = run_loop("adamw", False, max_norm=threshold(), history=STEPS, steps=12)
    assert_folded_where_due(reads, ours, skipped=(NAN_AT,))
    for a, b in zip(ours["model"].parameters(), ref["model"].parameters()):
        close(a, b)
    ta = ours["opt"].state_dict()["gradstab"]["thresholds"]
    tb = ref["opt"].state_dict()["gradstab"]["thresholds"]
    close(ta, tb)
    ha, hb = ours["opt"].history.data(), ref["opt"].history.data()
    for field in ("norms", "total_norm", "post_clip_norm", "clip_threshold", "skipped"):
        a, b = getattr(ha, field), getattr(hb, field)
        assert a.shape == b.shape, field
        if a.dtype == bool:
            assert (a == b).all(), field
        else:
            close(torch.as_tensor(a), torch.as_tensor(b), field)
    assert list(hb.skipped).index(True) == NAN_AT  # the skip is recorded on both paths


# ---------------------------------------------------------------------------------- attributes


def test_attributes_are_set_inside_the_step_and_gone_after():
    model = make_model()
    inner = make_inner("adamw", model.parameters())
    opt = GradStabOptimizer(inner, max_norm=1e-3, nonfinite="skip")
    seen = Seen(inner)
    for _ in range(3):
        opt.zero_grad()
        loss_of(model, torch.randn(8, 8)).backward()
        opt.step()
        assert "grad_scale" not in vars(inner) and "found_inf" not in vars(inner)
    assert all(s is not None and s > 1 for s in seen.scales)  # clipped: 1/c > 1
    assert seen.found == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("reads", ["cpu"])
def test_nothing_to_fold_needs_coefficient_one_no_skip_and_a_free_read(reads):
    f64 = torch.float64
    one, half = torch.tensor(1.0, dtype=f64), torch.tensor(0.5, dtype=f64)
    yes, no = torch.tensor(True), torch.tensor(False)
    assert fold_mod.nothing_to_fold(one, None) and fold_mod.nothing_to_fold(one, no)
    assert not fold_mod.nothing_to_fold(one, yes)  # a skip is folded into found_inf
    assert not fold_mod.nothing_to_fold(torch.nextafter(one, half), None)  # any clip folds
    assert not fold_mod.nothing_to_fold(torch.tensor(math.nan, dtype=f64), None)
    # a value off the CPU is never read on the host
    assert not fold_mod.nothing_to_fold(one.to("meta"), None)
    assert not fold_mod.nothing_to_fold(one, no.to("meta"))


def test_apply_combines_with_what_is_there_and_restore_puts_it_back():
    inner = make_inner("adamw", make_model().parameters())
    amp, found = torch.tensor(8.0), torch.tensor(0.0)
    inner.grad_scale, inner.found_inf = amp, found
    applied = fold_mod.apply(inner, torch.tensor(4.0), torch.tensor(True))
    assert float(inner.grad_scale) == 32.0  # the scale already there times 1/c
    assert float(inner.found_inf) == 1.0  # either says skip
    fold_mod.restore(applied)
    assert inner.grad_scale is amp and inner.found_inf is found
    applied = fold_mod.apply(inner, torch.tensor(2.0), None)
    assert float(inner.grad_scale) == 16.0 and inner.found_inf is found
    inner.grad_scale = replaced = torch.tensor(3.0)  # replaced by someone else since
    fold_mod.restore(applied)
    assert inner.grad_scale is replaced
    del inner.grad_scale, inner.found_inf
    fold_mod.restore(fold_mod.apply(inner, torch.tensor(2.0), torch.tensor(False)))
    assert "grad_scale" not in vars(inner) and "found_inf" not in vars(inner)


def test_attributes_are_removed_when_the_step_raises():
    model = make_model()
    inner = make_inner("adamw", model.parameters())
    opt = GradStabOptimizer(inner, max_norm=1e-3)

    def boom(o, args, kwargs):
        raise ValueError("boom")

    handle = inner.register_step_pre_hook(boom)
    loss_of(model, torch.randn(8, 8)).backward()
    with pytest.raises(ValueError, match="boom"):
        opt.step()
    assert "grad_scale" not in vars(inner)
    handle.remove()


# ---------------------------------------------------------------------------------- host reads


class NoHostReads:
    """Make every Python-level host read of a tensor value raise while active.

    On the CPU this is a proxy for "no device synchronization": ``item``, ``tolist``,
    ``cpu``, ``numpy``, ``bool()``, ``float()``, ``int()`` and ``index`` are the ways Python
    code reads a tensor's value (C++ kernels reading CPU memory are not host syncs).
    """

    METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch, device: torch.device) -> None:
        self.active = False
        for name in self.METHODS:
            orig = getattr(torch.Tensor, name)

            def guarded(t, *args, _orig=orig, _name=name, **kw):
                if self.active and t.device == device:
                    raise AssertionError(f"host read: Tensor.{_name} during a folded step")
                return _orig(t, *args, **kw)

            monkeypatch.setattr(torch.Tensor, name, guarded)

    @contextlib.contextmanager
    def __call__(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def _guarded_loop(opt, model, guard, steps: int, nan_at: int) -> list[bool]:
    moved = []
    gen = torch.Generator().manual_seed(2)
    for i in range(steps):
        opt.zero_grad()
        loss_of(model, inputs(i, gen)).backward()
        if i == nan_at:
            model[0].weight.grad[1, 1] = math.nan
        before = [p.detach().clone() for p in model.parameters()]
        if i < 2:  # warm-up: the first step makes cached bounds and checks the kernel
            opt.step()
        else:
            with guard():
                opt.step()
        moved.append(not same(before, [p.detach() for p in model.parameters()]))
    return moved


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
@pytest.mark.parametrize("adaptive", [False, True], ids=["number", "zscore"])
def test_folded_skip_path_reads_nothing_on_the_host(kind, adaptive, monkeypatch):
    model = make_model()
    thr = gradstab.ZScoreThreshold(warmup_steps=2) if adaptive else MAX_NORM
    opt = GradStabOptimizer(make_inner(kind, model.parameters()), max_norm=thr, nonfinite="skip")
    guard = NoHostReads(monkeypatch, torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either: nothing known on the host
        moved = _guarded_loop(opt, model, guard, steps=6, nan_at=4)
    assert moved == [True, True, True, True, False, True]
    assert opt.counters()["skipped_steps"] == 1


def test_the_guard_catches_the_explicit_skips_host_read(monkeypatch):
    """The same loop with fold=False reads the skip flag on the host: the guard sees it.

    As off the CPU: a CPU step whose flags are free to read takes them on the host anyway.
    """
    from gradstab import _clipping  # noqa: PLC0415

    monkeypatch.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
    model = make_model()
    opt = GradStabOptimizer(
        make_inner("adamw", model.parameters()), max_norm=MAX_NORM, nonfinite="skip", fold=False
    )
    guard = NoHostReads(monkeypatch, torch.device("cpu"))
    with pytest.raises(AssertionError, match=r"host read: Tensor.__bool__"):
        _guarded_loop(opt, model, guard, steps=4, nan_at=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_folded_skip_path_does_not_synchronize_on_cuda():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(dev)
    opt = GradStabOptimizer(
        make_inner("adamw", model.parameters()), max_norm=MAX_NORM, nonfinite="skip", fold=True
    )
    x = torch.randn(32, 8, device=dev)
    snaps = []
    for i in range(6):
        opt.zero_grad()
        loss_of(model, x * (4.0 if i % 2 else 0.05)).backward()
        if i == 3:
            model[0].weight.grad[1, 1] = math.nan
        if i < 2:  # warm-up: cached bounds, the kernel check
            opt.step()
        else:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        snaps.append([p.detach().clone() for p in model.parameters()])
    assert same(snaps[2], snaps[3])  # step 3 skipped on the device
    assert not same(snaps[3], snaps[4])
    assert opt.counters()["skipped_steps"] == 1
    assert all(torch.isfinite(p).all() for p in snaps[-1])


# ---------------------------------------------------------------------------------- GradScaler


def _cpu_scaler(**kw):
    try:
        return torch.amp.GradScaler("cpu", **kw)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"torch.amp.GradScaler('cpu') is not available: {exc}")


@READS
@pytest.mark.parametrize("unscale_first", [False, True])
def test_grad_scaler_composes_with_the_wrapper(unscale_first, reads):
    """scaler.step(opt) unscales before the wrapper's step (it declares no AMP support), then
    the clip folds into the fused step: the same result as the explicit clip; an inf step is
    skipped by the scaler in both."""

    def run(fold):
        model = make_model()
        opt = GradStabOptimizer(make_inner("adamw", model.parameters()), max_norm=0.2, fold=fold)
        seen = Seen(opt.optimizer)
        scaler = _cpu_scaler(init_scale=2.0**12, growth_interval=3)
        gen = torch.Generator().manual_seed(3)
        for i in range(8):
            opt.zero_grad()
            scaler.scale(loss_of(model, inputs(i, gen))).backward()
            if i == 4:
                model[0].bias.grad[0] = math.inf
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
            assert "grad_scale" not in vars(opt.optimizer)
        return model, opt, seen, float(scaler.get_scale())

    ma, oa, sa, scale_a = run(None)
    mb, ob, _, scale_b = run(False)
    assert scale_a == scale_b
    assert len(sa.scales) == 7  # 1 skipped by the scaler
    if reads == "device-like":  # on the CPU the unclipped steps set nothing of gradstab's
        assert all(s is not None for s in sa.scales)
    for a, b in zip(ma.parameters(), mb.parameters()):
        close(a, b)
    close(oa.state_dict()["state"], ob.state_dict()["state"])
    assert oa.counters() == ob.counters()


# ---------------------------------------------------------------------------------- errors


def test_fold_argument_is_checked():
    model = make_model()
    fused = make_inner("adamw", model.parameters())
    for bad in ("yes", 1, 0.0):
        with pytest.raises(TypeError, match=rf"fold must be None.*got {bad!r}"):
            GradStabOptimizer(fused, max_norm=1.0, fold=bad)
        with pytest.raises(TypeError, match=rf"GradStabCallback: fold must be None.*got {bad!r}"):
            GradStabCallback(max_norm=1.0, fold=bad)
    plain = make_inner("adamw", model.parameters(), fused=False)
    with pytest.raises(ValueError, match=r"GradStabOptimizer: fold=True .* AdamW without fused"):
        GradStabOptimizer(plain, max_norm=1.0, fold=True)
    rms = torch.optim.RMSprop(model.parameters())
    with pytest.raises(ValueError, match=r"fold=True .* RMSprop is not one of torch's fused"):
        GradStabOptimizer(rms, max_norm=1.0, fold=True)
    for kw, what in (
        ({"mode": "value", "clip_value": 1.0}, r"mode='value'"),
        ({"mode": "layer", "max_norm": 1.0}, r"mode='layer'"),
        ({"mode": None}, r"mode=None"),
        ({"max_norm": {0: 1.0}}, r"max_norm=\{0: 1.0\}"),
        ({"max_norm": 1.0, "process_group": "world"}, r"process_group='world'"),
    ):
        with pytest.raises(ValueError, match=rf"GradStabOptimizer: fold=True .*{what}"):
            GradStabOptimizer(fused, fold=True, **kw)
        with pytest.raises(ValueError, match=rf"GradStabCallback: fold=True .*{what}"):
            GradStabCallback(fold=True, **kw)
    # automatic: the explicit clip where the fold does not apply, no error
    GradStabOptimizer(plain, max_norm=1.0)
    GradStabOptimizer(fused, mode="value", clip_value=1.0)


def test_a_param_group_added_without_fused_falls_back_or_raises():
    model = make_model()
    a, b = list(model[0].parameters()), list(model[2].parameters())
    for fold in (None, True):
        inner = torch.optim.AdamW(a, lr=1e-2, fused=True)
        opt = GradStabOptimizer(inner, max_norm=1e-3, fold=fold)
        seen = Seen(inner)
        opt.add_param_group({"params": b, "fused": False})
        opt.zero_grad()
        loss_of(model, torch.randn(8, 8)).backward()
        if fold:
            with pytest.raises(ValueError, match=r"fold=True .* without fused=True"):
                opt.step()
        else:
            opt.step()  # the explicit clip: a non-fused group would refuse grad_scale
            assert seen.scales == [None]


def test_explicit_path_where_the_fold_does_not_apply():
    for inner_kind, kw in (
        (False, {"max_norm": 1e-3}),  # not fused
        (True, {"mode": "layer", "max_norm": 1e-3}),  # not "norm"
        (True, {"max_norm": {0: 1e-3}}),  # one coefficient per group
    ):
        model = make_model()
        inner = make_inner("adamw", model.parameters(), fused=inner_kind)
        opt = GradStabOptimizer(inner, **kw)
        seen = Seen(inner)
        loss_of(model, torch.randn(8, 8)).backward()
        opt.step()
        assert seen.scales == [None], kw


# ---------------------------------------------------------------------------------- Lightning


_ADAM_MODULE = importlib.import_module("torch.optim.adam")
_FUSED_ADAM = _ADAM_MODULE._fused_adam


def _lightning():
    return pytest.importorskip("lightning.pytorch")


def _net(opt_kind: str = "adamw", bad=None):
    _lightning()
    from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: PLC0415

    class Net(BoringModel):
        def __init__(self):
            super().__init__()
            self.layer = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 2))
            self.bad = bad or {}

        def on_after_backward(self):
            v = self.bad.get(self.trainer.global_step)
            if v is not None:
                self.layer[2].weight.grad[0, 1] = v

        def configure_optimizers(self):
            if opt_kind == "adamw-plain":
                return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01)
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.01, fused=True)

    torch.manual_seed(0)
    return Net()


def _probe(monkeypatch):
    """A Lightning callback after gradstab's (what the hook left on the optimizer), and what
    torch's fused Adam function receives. (A step pre-hook would not do: Lightning's closure,
    and with it the hooks, runs inside ``step()``, after the pre-hooks.)"""
    pl = _lightning()

    class Probe(pl.Callback):
        def __init__(self):
            self.hook_attrs, self.step_scales, self.step_found = [], [], []
            self.amp_scales = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.hook_attrs.append(getattr(optimizer, "grad_scale", None) is not None)
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            self.amp_scales.append(None if scaler is None else float(scaler.get_scale()))

    probe = Probe()
    fused_adam = _FUSED_ADAM  # torch's, also when a probe of an earlier fit is still patched

    def recording(*args, grad_scale, found_inf, **kw):
        probe.step_scales.append(None if grad_scale is None else float(grad_scale))
        probe.step_found.append(None if found_inf is None else float(found_inf))
        return fused_adam(*args, grad_scale=grad_scale, found_inf=found_inf, **kw)

    monkeypatch.setattr(_ADAM_MODULE, "_fused_adam", recording)
    return probe


def _fit(
    fold,
    monkeypatch,
    *,
    steps=8,
    bad=None,
    opt_kind="adamw",
    user_unscales=False,
    max_norm=0.05,
    **trainer_kw,
):
    pl = _lightning()
    model = _net(opt_kind, bad)
    if user_unscales:

        def unscale(optimizer):
            model.trainer.precision_plugin.scaler.unscale_(optimizer)

        model.on_before_optimizer_step = unscale
    cb = GradStabCallback(max_norm=max_norm, nonfinite="skip", fold=fold, log_every_n_steps=1)
    probe = _probe(monkeypatch)
    logged: list[dict[str, float]] = []

    class Keep(pl.Callback):
        def on_train_batch_end(self, *args):
            logged.append(dict(cb.last_metrics))

    trainer = pl.Trainer(
        max_steps=steps,
        callbacks=[cb, probe, Keep()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        **trainer_kw,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model)
    return model, cb, probe, trainer, logged


def assert_same_fit(trainer, folded, explicit, *, clipped_steps: int) -> None:
    """A folded fit (``trainer``, its ``(model, callback)``) left no attribute on its optimizer
    and ended where the explicit fit ``(model, callback)`` did: parameters, optimizer state,
    and counters (8 steps, one of them NaN and skipped)."""
    (ma, ca), (mb, cb_) = folded, explicit
    opt = trainer.optimizers[0]
    assert "grad_scale" not in vars(opt) and "found_inf" not in vars(opt)
    for a, b in zip(ma.parameters(), mb.parameters()):
        close(a, b)
    close(opt.state_dict()["state"], mb.trainer.optimizers[0].state_dict()["state"])
    want = {"steps": 8, "clipped_steps": clipped_steps, "nonfinite_steps": 1, "skipped_steps": 1}
    assert ca.counters() == cb_.counters() == want


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_callback_folds_and_equals_the_explicit_clip(precision, monkeypatch):
    ma, ca, pa, ta, la = _fit(None, monkeypatch, bad={3: math.nan}, precision=precision)
    mb, cb_, pb, _, lb = _fit(False, monkeypatch, bad={3: math.nan}, precision=precision)
    # folded: the attributes reach the fused step, gone after it; the explicit path sets none
    assert all(pa.hook_attrs) and all(s is not None for s in pa.step_scales)
    assert pa.step_found[3] == 1.0 and pa.step_found.count(0.0) == 7
    assert not any(pb.hook_attrs) and all(s is None for s in pb.step_scales)
    assert_same_fit(ta, (ma, ca), (mb, cb_), clipped_steps=7)
    assert la[0] == lb[0]  # the first step: identical inputs, identical metrics
    for x, y in zip(la, lb):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7, nan_ok=True), k


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("reads", ["cpu"])
def test_callback_on_the_cpu_folds_only_what_clips_or_skips(reads, monkeypatch):
    """A bound no step reaches and a NaN at step 3: on the CPU the healthy steps hand the fused
    step nothing (it would rewrite every gradient, divided by 1), the NaN step its skip; the
    result is the explicit clip's."""
    ma, ca, pa, ta, _ = _fit(None, monkeypatch, bad={3: math.nan}, max_norm=1e6)
    mb, cb_, _, _, _ = _fit(False, monkeypatch, bad={3: math.nan}, max_norm=1e6)
    assert [s is None for s in pa.step_scales] == [i != 3 for i in range(8)]
    assert pa.step_found[3] == 1.0
    assert_same_fit(ta, (ma, ca), (mb, cb_), clipped_steps=0)


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("user_unscales", [False, True])
def test_callback_folds_under_fp16_grad_scaler(user_unscales, monkeypatch):
    """16-mixed with a CPU GradScaler and fused AdamW: Lightning leaves the gradients scaled;
    the callback sets grad_scale = 1/c (c from the scaled norm and the scaled bound), the
    scaler multiplies its scale in (or, after a user's unscale_, uses ours) and deletes it; an
    inf step is skipped by the scaler's own found_inf. The same parameters as the explicit
    clip, to float rounding."""
    pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: PLC0415

    def plugin():
        return MixedPrecision("16-mixed", "cpu", scaler=_cpu_scaler(init_scale=2.0**8))

    kw = {"plugins": [plugin()], "user_unscales": user_unscales, "bad": {3: math.inf}}
    ma, ca, pa, ta, la = _fit(None, monkeypatch, **kw)
    kw["plugins"] = [plugin()]
    mb, cb_, pb, tb, lb = _fit(False, monkeypatch, **kw)
    assert all(pa.hook_attrs) and not any(pb.hook_attrs)
    assert pa.step_found[3] == 1.0 and pa.step_found.count(0.0) == 7  # the scaler's found_inf
    assert pa.amp_scales == [2.0**8] * 4 + [2.0**7] * 4  # halved after the inf step
    for i, (s, amp, m) in enumerate(zip(pa.step_scales, pa.amp_scales, la)):
        if i == 3:
            continue
        # the scaler's scale times 1/c (just 1/c after the user's unscale_)
        want = (1.0 if user_unscales else amp) / m["grad/clip_coef"]
        assert s == pytest.approx(want, rel=1e-6)
    assert "grad_scale" not in vars(ta.optimizers[0])
    assert "found_inf" not in vars(ta.optimizers[0])
    for a, b in zip(ma.parameters(), mb.parameters()):
        close(a, b)
    close(ta.optimizers[0].state_dict()["state"], tb.optimizers[0].state_dict()["state"])
    want = {"steps": 8, "clipped_steps": 7, "nonfinite_steps": 1, "skipped_steps": 1}
    assert ca.counters() == cb_.counters() == want
    assert la[0] == lb[0]


@pytest.mark.filterwarnings("ignore")
def test_callback_fold_true_refuses_a_non_fused_optimizer(monkeypatch):
    with pytest.raises(ValueError, match=r"GradStabCallback: fold=True .*optimizer 0: AdamW"):
        _fit(True, monkeypatch, opt_kind="adamw-plain", steps=1)
    probe = _fit(None, monkeypatch, opt_kind="adamw-plain", steps=2)[2]
    assert probe.hook_attrs == [False, False]  # automatic: the explicit clip


# ---------------------------------------------------------------------------------- bench


def test_bench_fold_mode_times_clip_and_step_four_ways(monkeypatch):
    """``python -m gradstab bench --mode fold``: the folded and the explicit clip + step,
    torch's clip + step and the unclipped step, interleaved; the check before timing catches a
    fold that scales the gradients wrongly."""
    from gradstab.tools.bench import BenchError, bench_one  # noqa: PLC0415

    cpu = torch.device("cpu")
    rows = bench_one("many-small", "fp32", ["fold"], device=cpu, warmup=0, repeats=1)
    assert [(r.contestant, r.kind) for r in rows[:5]] == [
        ("gradstab folded (clip + step)", "gradstab"),
        ("gradstab explicit (clip + step)", "baseline"),
        ("torch clip_grad_norm_ + step", "baseline"),
        ("AdamW step alone (no clip)", "floor"),
        ("AdamW step, grad_scale=1 (no clip)", "floor"),
    ]
    assert rows[0].floor_ms > 0 and rows[1].ratio is not None
    monkeypatch.setattr(fold_mod, "inverse", lambda coef: coef.to(torch.float32))
    with pytest.raises(BenchError, match=r"after a folded clip \+ step, tensor 0's .grad"):
        bench_one("many-small", "fp32", ["fold"], device=cpu, warmup=0, repeats=1)
