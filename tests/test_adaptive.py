"""Adaptive thresholds (``gradstab.adaptive``): ZClip-style z-score and AutoClip-style percentile.

Oracles: hand-computed values for short sequences, and plain-Python float64 models of the
documented rules (written from the docstrings, no tensors) for long random sequences with
spikes and non-finite norms.
"""

from __future__ import annotations

import collections
import inspect
import io
import math
import random
import re

import numpy as np
import pytest
import torch

import gradstab
from gradstab._extension import has_kernel
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold, clip_

INF = math.inf
NAN = math.nan


def t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def bounds_of(thr, norms, *, with_norm=True):
    """Threshold before each update (as a float), then the update."""
    out = []
    for g in norms:
        b = thr.threshold(t(g)) if with_norm else thr.threshold()
        out.append(float(b))
        thr.update(t(g))
    return out


# ----------------------------------------------------------------------------- plain models


def zclip_model(norms, *, alpha, z_thresh, warmup, rule, cap, eps, skip):
    buf, mu, var, count, out = [], 0.0, 0.0, 0, []
    for g in norms:
        spike, target = False, INF
        if count >= warmup:
            sigma = math.sqrt(var)
            z = (g - mu) / (sigma + eps)
            spike = z > z_thresh
            if rule == "adaptive_scaling":
                target = mu + (z_thresh**2 / z) * sigma if spike else INF
            elif rule == "mean":
                target = mu
            else:
                target = mu + z_thresh * (sigma + eps)
        bound = target if spike else INF
        out.append(min(bound, cap) if cap is not None else bound)
        if not math.isfinite(g):
            continue
        if count < warmup:
            buf.append(g)
            count += 1
            if count == warmup:
                mu = math.fsum(buf) / warmup
                var = math.fsum((x - mu) ** 2 for x in buf) / warmup
            continue
        count += 1
        if spike and skip:
            continue
        x = target if spike else g
        mu = alpha * mu + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mu) ** 2
    return out


def interp_percentile(values, q):
    v = sorted(values)
    r = q / 100 * (len(v) - 1)
    lo = math.floor(r)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (r - lo) * (v[hi] - v[lo])


def autoclip_model(norms, *, q, history, include_current, warmup, cap):
    hist, count, out = collections.deque(maxlen=history), 0, []
    for g in norms:
        if include_current:
            h = list(hist) + ([g] if math.isfinite(g) else [])
            h = h[-history:]
            n = count + (1 if math.isfinite(g) else 0)
            p = interp_percentile(h, q) if h else INF
            bound = p if g > p else INF
        else:
            n = count
            bound = interp_percentile(list(hist), q) if hist else INF
        if n < max(warmup, 1):
            bound = INF
        out.append(min(bound, cap) if cap is not None else bound)
        if math.isfinite(g):
            hist.append(g)
            count += 1
    return out


def random_norms(seed, n=80):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        g = abs(rng.gauss(1.0, 0.1)) * (1 + i / n)  # a drifting, noisy norm
        r = rng.random()
        if r < 0.08:
            g *= rng.choice([5, 20, 1e3])  # spikes
        elif r < 0.11:
            g = rng.choice([NAN, INF])
        out.append(g)
    return out


def assert_seq_close(got, want, rtol=1e-12):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        if math.isinf(b) or math.isnan(b):
            assert a == b or (math.isnan(a) and math.isnan(b)), (i, a, b)
        else:
            assert math.isclose(a, b, rel_tol=rtol, abs_tol=0), (i, a, b)


# ------------------------------------------------------------------------------- z-score


def test_zscore_warmup_then_statistics_by_hand():
    thr = ZScoreThreshold(warmup_steps=3, rule="mean")
    for g in (1.0, NAN, 2.0, INF, 3.0):  # non-finite norms do not count toward the warm-up
        assert float(thr.threshold(t(100.0))) == INF  # warm-up: nothing clipped
        thr.update(t(g))
    st = thr.statistics()
    assert float(st["mean"]) == 2.0
    assert math.isclose(float(st["std"]) ** 2, 2 / 3, rel_tol=1e-15)
    assert int(st["count"]) == 3
    # z = (2.5 - 2) / (0.8165 + 1e-6) = 0.61 <= 2.5: no clip; z(10) = 9.8 > 2.5: clip to the mean
    assert float(thr.threshold(t(2.5))) == INF
    assert float(thr.threshold(t(10.0))) == 2.0


def test_zscore_adaptive_scaling_and_ema_by_hand():
    a, zt, eps = 0.9, 2.0, 1e-6
    thr = ZScoreThreshold(alpha=a, z_thresh=zt, warmup_steps=2, eps=eps)
    thr.update(t(1.0))
    thr.update(t(3.0))  # mu = 2, var = 1, sigma = 1
    # ordinary norm 2.5: z = 0.5, no clip; EMA: mu = 0.9*2 + 0.1*2.5 = 2.05,
    # var = 0.9*1 + 0.1*(2.5 - 2.05)^2 = 0.92025
    assert float(thr.threshold(t(2.5))) == INF
    thr.update(t(2.5))
    mu, var = 2.05, 0.9 + 0.1 * 0.45**2
    st = thr.statistics()
    assert math.isclose(float(st["mean"]), mu, rel_tol=1e-15)
    assert math.isclose(float(st["std"]) ** 2, var, rel_tol=1e-14)
    # spike 12: z = (12 - mu) / (sigma + eps), target = mu + zt^2 / z * sigma
    sigma = math.sqrt(var)
    z = (12 - mu) / (sigma + eps)
    target = mu + zt**2 / z * sigma
    assert math.isclose(float(thr.threshold(t(12.0))), target, rel_tol=1e-14)
    assert target < mu + zt * sigma  # harder than the detection bound
    thr.update(t(12.0))  # clipped update: the EMA sees the target, not 12
    mu2 = a * mu + (1 - a) * target
    var2 = a * var + (1 - a) * (target - mu2) ** 2
    st = thr.statistics()
    assert math.isclose(float(st["mean"]), mu2, rel_tol=1e-14)
    assert math.isclose(float(st["std"]) ** 2, var2, rel_tol=1e-13)
    assert int(st["spikes"]) == 1


def test_zscore_skip_update_on_spike():
    thr = ZScoreThreshold(warmup_steps=2, update_on_spike="skip")
    for g in (1.0, 3.0):
        thr.update(t(g))
    before = {k: v.clone() for k, v in thr.state_dict()["state"].items()}
    thr.update(t(50.0))  # spike: statistics unchanged, counters move
    after = thr.state_dict()["state"]
    assert torch.equal(after["mean"], before["mean"]) and torch.equal(after["var"], before["var"])
    assert int(after["count"]) == 3 and int(after["spikes"]) == 1
    thr.update(t(2.5))  # not a spike: EMA moves
    assert float(thr.statistics()["mean"]) == pytest.approx(0.97 * 2 + 0.03 * 2.5, rel=1e-15)


def test_zscore_threshold_rule_is_known_before_the_step_and_cap():
    thr = ZScoreThreshold(warmup_steps=2, rule="threshold", max_norm=2.5, z_thresh=1.0, eps=0.0)
    assert not thr.needs_norm
    assert float(thr.threshold()) == 2.5  # warm-up: only the cap
    for g in (1.0, 3.0):
        thr.update(t(g))
    assert float(thr.threshold()) == 2.5  # mu + 1 * sigma = 3 > cap
    thr.update(t(2.0))  # mu 2, var = 0.97 * 1 = 0.97
    assert float(thr.threshold()) == 2.5
    uncapped = ZScoreThreshold(warmup_steps=2, rule="threshold", z_thresh=1.0, eps=0.0)
    for g in (1.0, 3.0, 2.0):
        uncapped.update(t(g))
    assert float(uncapped.threshold()) == pytest.approx(2.0 + math.sqrt(0.97), rel=1e-15)
    # the cap never enters the statistics
    assert torch.equal(thr.statistics()["mean"], uncapped.statistics()["mean"])


@pytest.mark.parametrize("rule", ZScoreThreshold.RULES)
@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_zscore_matches_model_on_long_sequences(rule, skip, cap):
    norms = random_norms(ZScoreThreshold.RULES.index(rule) * 4 + 2 * skip + (cap is None))
    kw = {"alpha": 0.9, "z_thresh": 2.0, "eps": 1e-6}
    thr = ZScoreThreshold(
        warmup_steps=5,
        rule=rule,
        max_norm=cap,
        update_on_spike="skip" if skip else "clipped",
        **kw,
    )
    got = bounds_of(thr, norms)
    want = zclip_model(norms, warmup=5, rule=rule, cap=cap, skip=skip, **kw)
    assert_seq_close(got, want)
    assert any(math.isfinite(b) for b in want)  # the sequence really has spikes clipped


# ---------------------------------------------------------------------------- percentile


def test_percentile_partially_filled_and_wrapped_by_hand():
    thr = PercentileThreshold(percentile=10.0, history=4, include_current=False)
    assert float(thr.threshold()) == INF  # no history yet
    for g in (5.0, 1.0, 3.0):
        thr.update(t(g))
    # sorted 1, 3, 5: rank 0.1 * 2 = 0.2 -> 1 + 0.2 * (3 - 1) = 1.4
    assert float(thr.threshold()) == pytest.approx(1.4, rel=1e-15)
    for g in (4.0, 9.0, 8.0):  # wraps: keeps 3, 4, 9, 8 (5 and 1 overwritten)
        thr.update(t(g))
    # sorted 3, 4, 8, 9: rank 0.3 -> 3 + 0.3 * 1 = 3.3
    assert float(thr.threshold()) == pytest.approx(3.3, rel=1e-15)
    assert int(thr.statistics()["count"]) == 6
    med = PercentileThreshold(percentile=50.0, history=3, include_current=False)
    for g in (1.0, 2.0, 3.0, 4.0, 5.0):
        med.update(t(g))
    assert float(med.threshold()) == 4.0  # 3, 4, 5


def test_percentile_include_current_by_hand():
    thr = PercentileThreshold(percentile=50.0, history=3)
    assert thr.needs_norm
    assert float(thr.threshold(t(7.0))) == INF  # history [7]: 7 is its own median
    thr.update(t(7.0))
    thr.update(t(1.0))
    # history after adding 100: 7, 1, 100 -> median 7 < 100: clip to 7
    assert float(thr.threshold(t(100.0))) == 7.0
    assert float(thr.threshold(t(5.0))) == INF  # 1, 5, 7 -> median 5, not above it
    thr.update(t(2.0))
    # full ring (7, 1, 2): adding 50 replaces the oldest, 7 -> 1, 2, 50 -> median 2
    assert float(thr.threshold(t(50.0))) == 2.0
    assert float(thr.threshold(t(NAN))) == INF  # a NaN norm is not clipped


def test_percentile_warmup_and_cap():
    thr = PercentileThreshold(percentile=0.0, warmup_steps=3, include_current=False, max_norm=9.0)
    out = []
    for g in (4.0, NAN, 6.0, 5.0, 20.0):
        out.append(float(thr.threshold()))
        thr.update(t(g))
    assert out == [9.0, 9.0, 9.0, 9.0, 4.0]  # cap until 3 finite norms, then their minimum


@pytest.mark.parametrize("include_current", [True, False])
@pytest.mark.parametrize(("q", "history"), [(10.0, 7), (50.0, 200), (95.0, 30), (100.0, 5)])
def test_percentile_matches_model_and_numpy(include_current, q, history):
    norms = random_norms(int(q) + history)
    thr = PercentileThreshold(
        percentile=q, history=history, include_current=include_current, warmup_steps=2
    )
    got = bounds_of(thr, norms, with_norm=include_current)
    want = autoclip_model(
        norms, q=q, history=history, include_current=include_current, warmup=2, cap=None
    )
    assert_seq_close(got, want)
    finite = [g for g in norms if math.isfinite(g)][-history:]
    np_value = float(np.percentile(np.array(finite), q))
    assert math.isclose(float(thr.statistics()["percentile"]), np_value, rel_tol=1e-12)


# ------------------------------------------------------------------------ both / general


def _pairs():
    return [
        lambda: ZScoreThreshold(warmup_steps=4, alpha=0.8, z_thresh=1.5),
        lambda: ZScoreThreshold(warmup_steps=3, rule="mean", update_on_spike="skip"),
        lambda: ZScoreThreshold(warmup_steps=3, rule="threshold", max_norm=4.0),
        lambda: PercentileThreshold(percentile=25.0, history=6),
        lambda: PercentileThreshold(percentile=90.0, history=5, include_current=False),
    ]


@pytest.mark.parametrize("make", _pairs())
@pytest.mark.parametrize("split", [2, 5, 11])
def test_checkpoint_resume_continues_bit_exactly(make, split):
    norms = random_norms(split, n=30)
    whole = make()
    seq_whole = []
    for g in norms:
        seq_whole.append(whole.threshold(t(g)))
        whole.update(t(g))
    first = make()
    seq = []
    for g in norms[:split]:
        seq.append(first.threshold(t(g)))
        first.update(t(g))
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = make()
    resumed.load_state_dict(torch.load(buf))
    for g in norms[split:]:
        seq.append(resumed.threshold(t(g)))
        resumed.update(t(g))
    assert all(torch.equal(a, b) for a, b in zip(seq, seq_whole))
    end_a, end_b = whole.state_dict()["state"], resumed.state_dict()["state"]
    assert all(torch.equal(end_a[k], end_b[k]) for k in end_a)


@pytest.mark.parametrize("make", _pairs())
def test_per_layer_state_is_elementwise(make):
    seqs = [random_norms(s, n=25) for s in range(3)]
    vec = make()
    singles = [make() for _ in seqs]
    for step in range(25):
        g = torch.tensor([s[step] for s in seqs], dtype=torch.float64)
        bv = vec.threshold(g) if vec.needs_norm else vec.threshold()
        bs = [
            (th.threshold(t(s[step])) if th.needs_norm else th.threshold())
            for th, s in zip(singles, seqs)
        ]
        # before any norm, a one-pass rule returns a 0-d bound (it broadcasts)
        torch.testing.assert_close(bv.expand(3), torch.stack(bs), rtol=1e-13, atol=0)
        vec.update(g)
        for th, s in zip(singles, seqs):
            th.update(t(s[step]))


def test_state_dict_errors():
    z = ZScoreThreshold(warmup_steps=3)
    z.update(t(1.0))
    sd = z.state_dict()
    with pytest.raises(ValueError, match="saved by 'ZScoreThreshold', not 'PercentileThreshold'"):
        PercentileThreshold().load_state_dict(sd)
    with pytest.raises(ValueError, match=r"saved with alpha=0.97 but this object has alpha=0.9"):
        ZScoreThreshold(alpha=0.9, warmup_steps=3).load_state_dict(sd)
    other = ZScoreThreshold(alpha=0.9, warmup_steps=3)
    other.load_state_dict(sd, strict=False)  # hyperparameters may change on purpose
    assert torch.equal(other.state_dict()["state"]["warmup"], sd["state"]["warmup"])
    with pytest.raises(ValueError, match="warmup_steps=3 but this object has warmup_steps=4"):
        ZScoreThreshold(warmup_steps=4).load_state_dict(sd, strict=False)
    bad = {**sd, "state": {**sd["state"], "mean": torch.zeros(2, dtype=torch.float64)}}
    with pytest.raises(ValueError, match="state tensor 'mean' has shape"):
        ZScoreThreshold(warmup_steps=3).load_state_dict(bad)
    with pytest.raises(ValueError, match="lacks tensor"):
        ZScoreThreshold(warmup_steps=3).load_state_dict({**sd, "state": {"mean": 1}})
    with pytest.raises(ValueError, match="expected a dict from state_dict"):
        ZScoreThreshold().load_state_dict([1, 2])
    fresh = ZScoreThreshold(warmup_steps=3)
    fresh.load_state_dict(ZScoreThreshold(warmup_steps=3).state_dict())  # nothing seen yet
    assert not fresh.initialized


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda: ZScoreThreshold(alpha=1.0), ValueError, r"alpha must be a number in \[0, 1\)"),
        (lambda: ZScoreThreshold(z_thresh=0), ValueError, "z_thresh .* got 0"),
        (lambda: ZScoreThreshold(warmup_steps=0), ValueError, "warmup_steps .* >= 1, got 0"),
        (lambda: ZScoreThreshold(warmup_steps=2.5), TypeError, "warmup_steps .* got 2.5"),
        (lambda: ZScoreThreshold(rule="median"), ValueError, "rule must be one of"),
        (lambda: ZScoreThreshold(max_norm=0.0), ValueError, "max_norm .* got 0.0"),
        (lambda: ZScoreThreshold(eps=-1), ValueError, "eps .* got -1"),
        (lambda: ZScoreThreshold(update_on_spike="raw"), ValueError, "update_on_spike"),
        (lambda: PercentileThreshold(percentile=101), ValueError, r"percentile .* got 101"),
        (lambda: PercentileThreshold(history=0), ValueError, "history .* got 0"),
        (lambda: PercentileThreshold(include_current=1), TypeError, "include_current .* got 1"),
        (lambda: PercentileThreshold(max_norm="1"), TypeError, "max_norm .* got '1'"),
    ],
)
def test_constructor_errors(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_call_errors():
    thr = ZScoreThreshold()
    with pytest.raises(ValueError, match="needs the current step's norm"):
        thr.threshold()
    with pytest.raises(TypeError, match=r"must be a floating tensor, got torch.int64"):
        thr.update(torch.tensor(3))
    with pytest.raises(TypeError, match=r"must be a tensor .* got str"):
        thr.update("3")
    with pytest.raises(ValueError, match=r"0-d .* or 1-D .* got shape"):
        thr.update(torch.ones(2, 2))
    thr.update(t(1.0))
    with pytest.raises(ValueError, match=r"norm of shape \[3\] but the state tracks shape \[\]"):
        thr.update(torch.ones(3))
    thr.update(2.0)  # a Python number is accepted
    assert int(thr.statistics()["count"]) == 2
    thr.reset()
    assert not thr.initialized


# ----------------------------------------------------------------------------- clip_ helper


def _param(values):
    p = torch.nn.Parameter(torch.zeros(len(values)))
    p.grad = torch.tensor(values)
    return p


def test_clip_norm_mode_two_pass_and_one_pass():
    thr = ZScoreThreshold(warmup_steps=2, rule="mean")
    w = _param([0.0, 0.0])
    for g, want_norm in (([0.3, 0.4], 0.5), ([0.6, 0.8], 1.0), ([30.0, 40.0], 0.75)):
        w.grad = torch.tensor(g)
        total = clip_([w], thr)
        assert float(total) == pytest.approx(math.hypot(*g), rel=1e-6)
        assert float(torch.linalg.vector_norm(w.grad)) == pytest.approx(want_norm, rel=1e-5)
    one = PercentileThreshold(percentile=100.0, include_current=False)  # clip to the max so far
    w.grad = torch.tensor([3.0, 4.0])
    clip_([w], one)  # no history: unchanged
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([6.0, 8.0])
    assert float(clip_([w], one)) == pytest.approx(10.0)
    assert float(torch.linalg.vector_norm(w.grad)) == pytest.approx(5.0, rel=1e-6)


@pytest.mark.parametrize("include_current", [True, False])
def test_clip_layer_mode_tracks_each_tensor(include_current):
    thr = PercentileThreshold(percentile=50.0, include_current=include_current)
    a, b = _param([0.0, 0.0]), _param([0.0])
    history = [([3.0, 4.0], [1.0]), ([6.0, 8.0], [1.0]), ([0.3, 0.4], [100.0])]
    for ga, gb in history:
        a.grad, b.grad = torch.tensor(ga), torch.tensor(gb)
        norms = clip_([a, b], thr, mode="layer")
    assert norms.shape == (2,)
    torch.testing.assert_close(norms, torch.tensor([0.5, 100.0]))
    # a: 0.5 is below its median, unchanged; b: 100 is above its median (1) and clipped to it
    assert torch.equal(a.grad, torch.tensor([0.3, 0.4]))
    assert float(b.grad) == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(thr.statistics()["count"], torch.tensor([3, 3]))


def test_clip_errors_leave_gradients_unchanged():
    w = _param([3.0, 4.0])
    with pytest.raises(TypeError, match="threshold must be a ZScoreThreshold"):
        clip_([w], 1.0)
    with pytest.raises(ValueError, match="mode must be 'norm' or 'layer'"):
        clip_([w], ZScoreThreshold(), mode="value")
    thr = PercentileThreshold(percentile=0.0, include_current=False)
    thr.update(t(1.0))  # scalar state
    with pytest.raises(ValueError, match=r"tracks norms of shape \[\] but mode='layer'"):
        clip_([w], thr, mode="layer")
    assert torch.equal(w.grad, torch.tensor([3.0, 4.0]))
    assert float(clip_([], thr)) == 0.0


# ------------------------------------------------------------------------ no host sync


@pytest.fixture
def no_host_reads(monkeypatch):
    def refuse(*_args, **_kwargs):
        raise AssertionError("a device value was read on the host")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("make", _pairs())
def test_threshold_and_update_read_nothing_on_the_host(make, no_host_reads):
    thr = make()
    for g in random_norms(3, n=12):
        bound = thr.threshold(t(g)) if thr.needs_norm else thr.threshold()
        thr.update(t(g))
    assert isinstance(bound, torch.Tensor)
    thr.state_dict()


@pytest.mark.skipif(not has_kernel("cpu"), reason="the reference CPU kernel reads on the host")
@pytest.mark.parametrize("make", _pairs())
@pytest.mark.parametrize("mode", ["norm", "layer"])
def test_clip_reads_nothing_on_the_host(make, mode, no_host_reads):
    thr = make()
    ps = [_param([1.0, 2.0]), _param([0.5])]
    for g in random_norms(4, n=8):
        ps[0].grad = torch.tensor([g, 1.0])
        ps[1].grad = torch.tensor([0.5])
        clip_(ps, thr, mode=mode)


@pytest.mark.parametrize("make", _pairs())
@pytest.mark.parametrize("mode", ["norm", "layer"])
def test_clip_runs_on_meta_tensors(make, mode):
    """On 'meta' tensors no value exists, so any host read would fail."""
    thr = make()
    ps = [torch.nn.Parameter(torch.empty(3, 2, device="meta")) for _ in range(2)]
    for p in ps:
        p.grad = torch.empty(3, 2, device="meta")
    for _ in range(3):
        out = clip_(ps, thr, mode=mode)
    assert out.device.type == "meta"
    assert next(iter(thr.state_dict()["state"].values())).device.type == "meta"


def test_state_moves_to_the_norms_device():
    thr = ZScoreThreshold(warmup_steps=2)
    thr.update(t(1.0))
    thr.update(torch.empty((), dtype=torch.float32, device="meta"))
    assert thr.state_dict()["state"]["mean"].device.type == "meta"
    assert thr.threshold(torch.empty((), device="meta")).device.type == "meta"


def test_exported_names():
    assert gradstab.ZScoreThreshold is ZScoreThreshold
    assert gradstab.PercentileThreshold is PercentileThreshold


@pytest.mark.parametrize("mode", ["adaptive", "adaptive-zscore"])
def test_bench_adaptive_modes_stay_healthy_and_report_against_fixed(mode):
    """``bench --mode adaptive[-zscore]``: the primed threshold leaves a healthy step alone for
    as many calls as the mode promises (901 for the percentile rule), the rows compare with the
    fixed threshold, and the CUDA summary carries the +5% target for the mode."""
    from gradstab.tools.bench import bench_one, cuda_summary, primed_threshold  # noqa: PLC0415

    w = torch.nn.Parameter(torch.zeros(3, 4))
    w.grad = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    total = float(torch.linalg.vector_norm(w.grad.double()))
    before = w.grad.clone()
    thr = primed_threshold(mode, total, torch.device("cpu"))
    calls = 901 if mode == "adaptive" else 300
    for _ in range(calls):
        got = clip_([w], thr)
    assert torch.equal(w.grad, before)  # never clipped
    assert float(got) == pytest.approx(total, rel=1e-6)
    # after 901 real norms the 90th percentile of the 1,000-norm history is the norm itself
    if mode == "adaptive":
        assert float(thr.threshold()) == pytest.approx(float(got), rel=1e-12)

    rows = bench_one("many-small", "fp32", [mode], device=torch.device("cpu"), warmup=0, repeats=2)
    names = {r.contestant: r for r in rows}
    assert "fixed threshold" in names and names["fixed threshold"].ratio > 0
    ours = [r for r in rows if r.kind == "gradstab"]
    assert len(ours) == 1 and ours[0].floor_fraction > 0
    text = cuda_summary(rows)
    assert f"many-small/fp32/{mode}" in text and "target >= 0.952x fixed threshold" in text


# -------------------------------------------------------------- ZClip's defaults, the docs --

DOCS = __import__("pathlib").Path(__file__).resolve().parents[1] / "docs" / "adaptive.md"


class ZClipModel:
    """ZClip's published algorithm (github.com/bluorion-com/ZClip, ``ZClip.step``), restated
    in float64 for ``mode="zscore"``, ``clip_option="adaptive_scaling"``,
    ``skip_update_on_spike=False``, ``clip_factor=1.0``: its defaults.

    Warm-up: collect ``warmup_steps`` norms (clipping to ``max_grad_norm`` meanwhile, by
    ``torch.nn.utils.clip_grad_norm_``), then mean and population variance.  After: a spike
    ``z = (g - mu) / (sigma + eps) > z_thresh`` gets the bound ``mu + z_thresh * sigma /
    (z / z_thresh)``; the gradients are clipped to ``min(bound or g, max_grad_norm)`` when
    the norm exceeds it (coefficient ``bound / (g + 1e-6)``); the EMA takes the bound (a spike)
    or the norm.
    """

    def __init__(self, alpha=0.97, z_thresh=2.5, max_grad_norm=1.0, eps=1e-6, warmup_steps=25):
        self.alpha, self.z, self.cap, self.eps = alpha, z_thresh, max_grad_norm, eps
        self.warmup = warmup_steps
        self.buffer: list[float] = []
        self.mean = self.var = None

    def step(self, params) -> float:
        total = math.sqrt(sum(float(q.grad.double().square().sum()) for q in params))
        if self.mean is None:
            self.buffer.append(total)
            if len(self.buffer) >= self.warmup:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
            if self.cap is not None:
                torch.nn.utils.clip_grad_norm_(params, self.cap)
            return total
        std = math.sqrt(self.var)
        z = (total - self.mean) / (std + self.eps)
        clip_val = self.mean + self.z * std / (z / self.z) if z > self.z else None
        bound = total if clip_val is None else clip_val
        if self.cap is not None:
            bound = min(bound, self.cap)
        if total > bound:
            for q in params:
                q.grad.mul_(bound / (total + 1e-6))
        x = total if clip_val is None else clip_val
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return total


def _zclip_norms():
    """Norms above the cap in the warm-up, a plateau near 2 with two spikes, then a drift
    below the cap: every branch of ZClip's step."""
    rng = random.Random(11)
    norms = [rng.uniform(1.5, 3.0) for _ in range(25)]
    norms += [rng.uniform(1.8, 2.2) for _ in range(35)]
    norms[40], norms[52] = 10.0, 30.0
    norms += [0.5 - 0.01 * i for i in range(20)]
    return norms


def _docs_zclip_call() -> str:
    text = DOCS.read_text()
    after = text[text.index("The ZClip-equivalent call is:") :]
    return re.search(r"thr = (ZScoreThreshold\([^)]*\))", after).group(1)


@pytest.mark.parametrize("source", ["docs", "docstring"])
def test_the_documented_zclip_call_is_zclip_step_for_step(source):
    call = (
        _docs_zclip_call()
        if source == "docs"
        else re.search(
            r"``(ZScoreThreshold\([^`]*max_norm=1\.0\))``",
            ZScoreThreshold.__init__.__doc__ or ZScoreThreshold.__doc__,
        ).group(1)
    )
    thr = eval(call, {"ZScoreThreshold": ZScoreThreshold})  # the documented text
    model = ZClipModel()
    gen = torch.Generator().manual_seed(3)
    direction = [torch.randn(7, 5, generator=gen, dtype=torch.float64) for _ in range(2)]
    unit = math.sqrt(sum(float(d.square().sum()) for d in direction))
    ours = [torch.nn.Parameter(torch.zeros_like(d)) for d in direction]
    theirs = [torch.nn.Parameter(torch.zeros_like(d)) for d in direction]
    clipped = 0
    for step, n in enumerate(_zclip_norms()):
        for a, b, d in zip(ours, theirs, direction):
            a.grad = d * (n / unit)
            b.grad = d * (n / unit)
        total = clip_(ours, thr)
        assert float(total) == pytest.approx(model.step(theirs), rel=1e-12), step
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0, msg=f"step {step}")
        clipped += not torch.equal(ours[0].grad, direction[0] * (n / unit))
    assert clipped > 30  # the warm-up cap, the spikes and the plateau above the cap
    stats = thr.statistics()
    assert float(stats["mean"]) == pytest.approx(model.mean, rel=1e-12)
    assert float(stats["std"]) == pytest.approx(math.sqrt(model.var), rel=1e-10)


def test_the_defaults_differ_from_zclips_only_by_the_cap_and_the_docs_say_so():
    thr = ZScoreThreshold()
    assert (thr.alpha, thr.z_thresh, thr.warmup_steps, thr.max_norm) == (0.97, 2.5, 25, None)
    assert (thr.rule, thr.eps, thr.update_on_spike) == ("adaptive_scaling", 1e-6, "clipped")
    text = DOCS.read_text()
    # no call is called "ZClip's defaults" without ZClip's cap
    for line in text.splitlines():
        if "ZScoreThreshold(" in line and "ZClip" in line:
            assert "max_norm=1.0" in line, line
    assert _docs_zclip_call() == (
        "ZScoreThreshold(alpha=0.97, z_thresh=2.5, warmup_steps=25, max_norm=1.0)"
    )
    assert "max_grad_norm=1.0" in text


def test_docs_say_what_the_issue_asked():
    """docs/adaptive.md: the first step of an uncapped PercentileThreshold, warmup_steps,
    threshold()'s signature, which way alpha weights the EMA (issue 11)."""
    text = " ".join(DOCS.read_text().split())
    assert "The first step is never clipped by a `PercentileThreshold` without `max_norm`" in text
    assert "`warmup_steps` (`ZScoreThreshold`)" in text
    assert "`warmup_steps` (`PercentileThreshold`, default 0)" in text
    assert "`thr.threshold(total_norm=None, *, device=None) -> Tensor`" in text
    assert "`alpha` weights the *old* statistics: `mu <- alpha * mu + (1 - alpha) * x`" in text
    # ... and each statement holds
    for include_current in (False, True):
        thr = PercentileThreshold(include_current=include_current)
        bound = thr.threshold(t(1e6)) if include_current else thr.threshold()
        assert float(bound) == INF
        assert (
            float(
                PercentileThreshold(include_current=include_current, max_norm=2.0).threshold(t(1e6))
            )
            == 2.0
        )
    z = ZScoreThreshold(alpha=0.9, warmup_steps=2)
    for g in (1.0, 3.0, 2.5):  # warm-up: mean 2, std 1; then 2.5 (z = 0.5, not a spike)
        z.update(t(g))
    assert float(z.statistics()["mean"]) == pytest.approx(0.9 * 2.0 + 0.1 * 2.5)
    sig = inspect.signature(PercentileThreshold.threshold)
    assert list(sig.parameters) == ["self", "total_norm", "device"]
    assert sig.parameters["total_norm"].default is None
    assert sig.parameters["device"].kind is inspect.Parameter.KEYWORD_ONLY
