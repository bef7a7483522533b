"""The compiled threshold rules (``gradstab._C.zscore_threshold`` / ``percentile_threshold``)
against the tensor-op rules of :mod:`gradstab.adaptive` and independent oracles.

On a CPU state the threshold objects run their rule in one compiled call; elsewhere the tensor
ops do.  Both must give the same bounds and states step after step on nasty norm sequences
(NaN, inf, zeros, ties, huge values, per-tensor states), and the percentile must be numpy's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gradstab_testing.threshold_cases import CASES, norm_sequence

import gradstab
from gradstab import _extension
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold, clip_

pytestmark = pytest.mark.skipif(
    _extension.zscore_threshold is None, reason="gradstab._C (with the threshold rules) not built"
)

F64 = torch.float64


def _tensor_ops(monkeypatch):
    monkeypatch.setattr(_extension, "zscore_threshold", None)
    monkeypatch.setattr(_extension, "percentile_threshold", None)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float64 rounding of sums taken in another order (and NaN == NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.allclose(a, b, rtol=1e-12, atol=0.0, equal_nan=True)


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    return sa.keys() == sb.keys() and all(_close(sa[k], sb[k]) for k in sa)


def _make(kind: str, kw: dict):
    return ZScoreThreshold(**kw) if kind == "z" else PercentileThreshold(**kw)


@pytest.mark.parametrize("shape", [(), (3,)])
@pytest.mark.parametrize("kind,kw", CASES)
def test_compiled_rule_equals_the_tensor_ops(kind, kw, shape, monkeypatch):
    compiled, ops, split = _make(kind, kw), _make(kind, kw), _make(kind, kw)
    for step, g in enumerate(norm_sequence(7, 40, shape)):
        # before the step (no norm), with this step's norm, and judged-and-updated in one call
        if not shape:
            want_pre = None
            with monkeypatch.context() as m:
                _tensor_ops(m)
                if not ops.needs_norm:
                    want_pre = ops.threshold(device="cpu")
            if want_pre is not None:
                assert _close(compiled.threshold(device="cpu"), want_pre), step
        with monkeypatch.context() as m:
            _tensor_ops(m)
            want = ops.threshold(g)
            ops.update(g)
        got_split = split.threshold(g)
        split.update(g)
        got = compiled.threshold_and_update(g)
        assert _close(got, want), (step, got, want)
        assert _close(got_split, want), (step, got_split, want)
        assert _same_state(compiled, ops) and _same_state(split, ops), step


def test_compiled_path_is_taken_on_the_cpu(monkeypatch):
    calls = []
    real = _extension.percentile_threshold

    def spy(*args):
        calls.append(args[-2:])  # (judge, update)
        return real(*args)

    monkeypatch.setattr(_extension, "percentile_threshold", spy)
    thr = PercentileThreshold(50.0, history=8)
    w = torch.nn.Parameter(torch.zeros(3))
    w.grad = torch.ones(3)
    clip_([w], thr)
    thr.threshold(torch.tensor(1.0))
    thr.update(torch.tensor(2.0))
    assert calls == [(True, True), (True, False), (False, True)]


def test_percentile_is_numpys(monkeypatch):
    """An independent oracle: numpy's linear-interpolated percentile of the finite norms kept
    (the last ``history`` of them)."""
    for pct, hist in ((10.0, 50), (50.0, 6), (97.5, 13), (0.0, 3), (100.0, 9)):
        thr = PercentileThreshold(pct, history=hist, include_current=False)
        kept: list[float] = []
        for g in norm_sequence(3, 60, ()):
            v = float(g)
            thr.update(g)
            if math.isfinite(v):
                kept.append(float(g.to(F64)))
            window = kept[-hist:]
            want = float(np.percentile(np.array(window), pct)) if window else math.inf
            got = float(thr.threshold())
            # numpy interpolates from the upper rank past the midpoint: the last bit may differ
            assert got == pytest.approx(want, rel=1e-14, abs=0), (pct, hist, got, want)


def test_zscore_by_hand():
    """A hand-computed sequence: warm-up mean/variance, a spike clipped to ZClip's target,
    the EMA updated with the target."""
    thr = ZScoreThreshold(alpha=0.5, z_thresh=2.0, warmup_steps=2)
    assert math.isinf(float(thr.threshold_and_update(torch.tensor(1.0, dtype=F64))))
    assert math.isinf(float(thr.threshold_and_update(torch.tensor(3.0, dtype=F64))))
    st = thr.statistics()
    assert float(st["mean"]) == 2.0 and float(st["std"]) == 1.0  # population variance 1
    # z = (12 - 2) / (1 + 1e-6) > 2: target = mu + (z_thresh**2 / z) * sigma
    z = 10.0 / (1.0 + 1e-6)
    target = 2.0 + (4.0 / z) * 1.0
    assert float(thr.threshold_and_update(torch.tensor(12.0, dtype=F64))) == target
    mu = 0.5 * 2.0 + 0.5 * target
    var = 0.5 * 1.0 + 0.5 * (target - mu) ** 2
    st = thr.statistics()
    assert float(st["mean"]) == mu and float(st["std"]) == math.sqrt(var)
    assert int(st["spikes"]) == 1 and int(st["count"]) == 3


def test_resumed_threshold_continues_bit_for_bit():
    a = ZScoreThreshold(warmup_steps=3)
    norms = norm_sequence(11, 30, ())
    for g in norms[:15]:
        a.threshold_and_update(g)
    b = ZScoreThreshold(warmup_steps=3)
    b.load_state_dict(a.state_dict())
    for g in norms[15:]:
        assert torch.equal(a.threshold_and_update(g), b.threshold_and_update(g))


def test_compiled_rules_check_their_arguments():
    fn = _extension.zscore_threshold
    z = torch.zeros((), dtype=F64)
    c = torch.zeros((), dtype=torch.int64)
    with pytest.raises(ValueError, match="state tensor 'count' must be Long"):
        fn(z, z.clone(), z.clone(), z.clone(), c.clone(), torch.zeros(2, dtype=F64),
           0.9, 2.5, 1e-6, None, 2, 0, False, True, True)  # fmt: skip
    with pytest.raises(ValueError, match=r"norm has shape \[2\] but the state tracks shape \[\]"):
        fn(torch.zeros(2), z.clone(), z.clone(), c.clone(), c.clone(), torch.zeros(2, dtype=F64),
           0.9, 2.5, 1e-6, None, 2, 0, False, True, True)  # fmt: skip
    with pytest.raises(ValueError, match="warmup_steps must be >= 1, got 0"):
        fn(z, z.clone(), z.clone(), c.clone(), c.clone(), torch.zeros(0, dtype=F64),
           0.9, 2.5, 1e-6, None, 0, 0, False, True, True)  # fmt: skip
    p = _extension.percentile_threshold
    with pytest.raises(ValueError, match="state tensor 'history' must be"):
        p(z, torch.zeros((4, 2), dtype=F64), c.clone(), 50.0, None, 0, True, True, True)
    with pytest.raises(ValueError, match="percentile must be in"):
        p(z, torch.zeros(4, dtype=F64), c.clone(), 101.0, None, 0, True, True, True)
    with pytest.raises(ValueError, match="update needs this step's norm"):
        p(None, torch.zeros(4, dtype=F64), c.clone(), 50.0, None, 0, True, False, True)


def test_a_non_contiguous_or_foreign_state_takes_the_tensor_ops(monkeypatch):
    def boom(*args):
        raise AssertionError("the compiled rule must not see this state")

    thr = PercentileThreshold(50.0, history=4)
    thr.update(torch.tensor(1.0))
    sd = thr.state_dict()
    sd["state"]["history"] = torch.zeros(4, 2, dtype=F64)[:, 0]  # a strided view
    monkeypatch.setattr(_extension, "percentile_threshold", boom)
    other = PercentileThreshold(50.0, history=4)
    other._state = {k: v for k, v in sd["state"].items()}
    other.update(torch.tensor(2.0))  # tensor ops: no error
    assert int(other.statistics()["count"]) == 2


@pytest.mark.parametrize("mode", ["norm", "layer"])
def test_training_step_with_a_rule_that_judges_this_norm_reads_once(mode, monkeypatch):
    """GradStabOptimizer with ZClip's rule: grad_stats, then clip_with_norm (no second read);
    the gradients are those of the float64 oracle: min(1, bound / (norm + eps)) times them."""
    from gradstab._library import OPS  # noqa: PLC0415

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((4, 5), (7,), (0,), (3, 3))]
    oracle = ZScoreThreshold(warmup_steps=3, rule="mean")
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(params, lr=0.0),
        mode=mode,
        max_norm=ZScoreThreshold(warmup_steps=3, rule="mean"),
    )
    calls: list[str] = []
    for name in ("grad_stats", "clip_norm", "clip_norm_per_layer", "clip_with_norm"):
        real = OPS[name]
        monkeypatch.setitem(OPS, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    for step in range(8):
        scale = 40.0 if step in (5, 7) else 1.0
        gs = [torch.randn(p.shape) * scale for p in params]
        for p, g in zip(params, gs):
            p.grad = g.clone()
        norms = torch.stack([torch.linalg.vector_norm(g.double()) for g in gs])
        tracked = torch.linalg.vector_norm(norms) if mode == "norm" else norms
        with monkeypatch.context() as m:
            _tensor_ops(m)  # the oracle's rule: the tensor ops, in float64
            bound = oracle.threshold_and_update(tracked)
        calls.clear()
        opt.clip()
        per = bound.expand(len(gs)) if mode == "layer" else None
        for i, (p, g) in enumerate(zip(params, gs)):
            n = tracked if mode == "norm" else norms[i]
            b = bound if mode == "norm" else per[i]
            coef = torch.clamp(b / (n + 1e-6), max=1.0)
            torch.testing.assert_close(p.grad.double(), g.double() * coef, rtol=1e-6, atol=0)
        assert "clip_norm" not in calls and "clip_norm_per_layer" not in calls
        assert calls.count("grad_stats") == 1
    assert opt.counters()["clipped_steps"] == 2


def test_statistics_are_copies_that_later_updates_leave_alone():
    for thr in (ZScoreThreshold(warmup_steps=1), PercentileThreshold(50.0, history=4)):
        thr.update(torch.tensor(1.0))
        before = {k: v.clone() for k, v in thr.statistics().items()}
        held = thr.statistics()
        thr.update(torch.tensor(5.0))
        assert all(torch.equal(held[k], before[k]) for k in before)
        assert int(thr.statistics()["count"]) == 2


@pytest.mark.parametrize("mode", ["norm", "layer"])
@pytest.mark.parametrize(
    "make",
    [lambda: ZScoreThreshold(warmup_steps=1), lambda: PercentileThreshold(50.0)],
    ids=["zscore", "percentile"],
)
def test_raise_with_a_rule_that_judges_this_norm_refuses_before_writing(make, mode):
    """nonfinite='raise' with a rule that measures first (the one-read path): an Inf gradient
    raises the naming error and no gradient changes."""
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(params, lr=0.0), mode=mode, max_norm=make(), nonfinite="raise"
    )
    for g0 in ([1.0, 1.0, 1.0], [1.0, 2.0, 1.0]):  # past the warm-up
        params[0].grad, params[1].grad = torch.tensor(g0), torch.tensor([1.0, 1.0])
        opt.clip()
    bad = torch.tensor([1.0, math.inf, 1.0])
    params[0].grad, params[1].grad = bad.clone(), torch.tensor([1.0, 1.0])
    with pytest.raises(RuntimeError, match=r"param_groups\.0\.0"):
        opt.clip()
    assert torch.equal(params[0].grad, bad)
    assert torch.equal(params[1].grad, torch.tensor([1.0, 1.0]))


@pytest.mark.parametrize("shape", [(), (2,)])
@pytest.mark.parametrize(
    "make",
    [
        lambda: ZScoreThreshold(warmup_steps=2, rule="adaptive_scaling"),
        lambda: ZScoreThreshold(warmup_steps=1, rule="threshold", z_thresh=1.0),
        lambda: PercentileThreshold(50.0, history=4),
        lambda: PercentileThreshold(90.0, history=3, include_current=False),
    ],
    ids=["z-scaling", "z-threshold", "p-current", "p-history"],
)
def test_threshold_and_update_with_the_tensor_ops_is_threshold_then_update(
    make, shape, monkeypatch
):
    """Where the compiled rule does not serve (no extension, CUDA, torch.compile), the bound of
    threshold_and_update is judged on the state *before* the norm is folded in."""
    monkeypatch.setattr(_extension, "zscore_threshold", None)
    monkeypatch.setattr(_extension, "percentile_threshold", None)
    one, split = make(), make()
    seq = [1.0, 1.2, 0.9, 30.0, 1.1, 0.8, 50.0, math.nan, 2.0, 1.0, 40.0]
    for step, v in enumerate(seq):
        g = torch.full(shape, v, dtype=F64)
        got = one.threshold_and_update(g)
        want = split.threshold(g)
        split.update(g)
        assert torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0)), (step, got, want)
        sa, sb = one.state_dict()["state"], split.state_dict()["state"]
        assert all(torch.equal(sa[k].nan_to_num(7.0), sb[k].nan_to_num(7.0)) for k in sa), step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "make",
    [
        lambda: ZScoreThreshold(warmup_steps=3),
        lambda: PercentileThreshold(10.0, history=50),
        lambda: PercentileThreshold(90.0, history=20, include_current=False, max_norm=4.0),
    ],
    ids=["zscore", "percentile", "percentile-before"],
)
@pytest.mark.parametrize("shape", [(), (70,)])
def test_cuda_kernel_serves_and_equals_the_cpu_rule(make, shape, monkeypatch):
    """On a CUDA state the rule is one kernel launch (no host sync), bit-identical to the CPU."""
    calls = []
    for name in ("cuda_zscore_threshold", "cuda_percentile_threshold"):
        real = getattr(_extension, name)
        monkeypatch.setattr(
            _extension, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a)
        )
    cpu, dev = make(), make()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for norm in norm_sequence(9, 40, shape):
            g = norm.to(F64)
            want = cpu.threshold_and_update(g)
            got = dev.threshold_and_update(g.cuda())
            assert _close(got.cpu(), want) and torch.equal(
                got.cpu().nan_to_num(7), want.nan_to_num(7)
            )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(calls) == 40
    sa, sb = cpu.state_dict()["state"], dev.state_dict()["state"]
    assert all(torch.equal(sa[k].nan_to_num(7), sb[k].cpu().nan_to_num(7)) for k in sa)
