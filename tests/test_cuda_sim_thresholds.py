"""The CUDA kernels of the adaptive thresholds' rules (csrc/cuda/threshold_kernels.cu), run on
the CPU execution harness, against the CPU's compiled rules (``gradstab._C.zscore_threshold``
/ ``percentile_threshold``, the same arithmetic): bounds and states bit for bit, step after
step, on nasty norm sequences, per-tensor states over several warps and blocks, and every
warp schedule (the concurrent one included).
"""

from __future__ import annotations

import os

import pytest
import torch
from gradstab_testing import cuda_sim_harness as sim
from gradstab_testing.threshold_cases import CASES, norm_sequence

from gradstab import _extension
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold

F64 = torch.float64

pytestmark = pytest.mark.skipif(
    _extension.zscore_threshold is None, reason="gradstab._C (with the threshold rules) not built"
)


@pytest.fixture(scope="module", autouse=True)
def _harness():
    if sim.compiler() is None and os.environ.get("GRADSTAB_CUDA_SIM_REQUIRED") != "1":
        pytest.skip("no C++ compiler (set CXX, or install g++): the CUDA kernels cannot be run")
    sim.load()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    )


def _sim_z(
    thr: ZScoreThreshold, st: dict, g, judge: bool, update: bool, *, schedule: int, seed: int
):
    return torch.ops.gradstab_sim.threshold_z(
        g, st["mean"], st["var"], st["count"], st["spikes"], st["warmup"],
        thr.alpha, thr.z_thresh, thr.eps, thr.max_norm, thr.warmup_steps,
        thr.RULES.index(thr.rule), thr.update_on_spike == "skip", judge, update, schedule, seed,
    )  # fmt: skip


def _sim_p(
    thr: PercentileThreshold, st: dict, g, judge: bool, update: bool, *, schedule: int, seed: int
):
    return torch.ops.gradstab_sim.threshold_p(
        g, st["history"], st["count"], thr.percentile, thr.max_norm, thr.warmup_steps,
        thr.include_current, judge, update, schedule, seed,
    )  # fmt: skip


@pytest.mark.parametrize("schedule", [0, 1, 2, 3])
@pytest.mark.parametrize("shape", [(), (40,)])
@pytest.mark.parametrize("kind,kw", CASES)
def test_kernel_equals_the_cpu_rule_bit_for_bit(kind, kw, shape, schedule):
    make = ZScoreThreshold if kind == "z" else PercentileThreshold
    run = _sim_z if kind == "z" else _sim_p
    cpu = make(**kw)
    mirror = make(**kw)
    norms = norm_sequence(5 + schedule, 30 if shape else 60, shape, per_entry=True)
    cpu.update(norms[0])  # creates the state; the kernel works on a copy of it
    mirror.load_state_dict(cpu.state_dict())
    for step, g in enumerate(norms[1:]):
        st = mirror._state
        if not cpu.needs_norm:  # before the step, no norm: judge only, nothing changes
            want_pre = cpu.threshold(device="cpu").expand(shape) if shape else cpu.threshold()
            got_pre = run(mirror, st, None, True, False, schedule=schedule, seed=step)
            if not shape:
                assert _same(got_pre, want_pre), (step, got_pre, want_pre)
        want = cpu.threshold_and_update(g)
        got = run(mirror, st, g, True, True, schedule=schedule, seed=step)
        assert _same(got, want), (step, got, want)
        sa, sb = cpu.state_dict()["state"], mirror.state_dict()["state"]
        assert all(_same(sa[k], sb[k]) for k in sa), step
        assert sim.last_stats()["launches"] == 1


def test_update_only_and_judge_only_calls():
    thr = PercentileThreshold(50.0, history=4)
    thr.update(torch.tensor(2.0, dtype=F64))
    st = {k: v.clone() for k, v in thr._state.items()}
    before = {k: v.clone() for k, v in st.items()}
    bound = _sim_p(thr, st, torch.tensor(9.0, dtype=F64), True, False, schedule=0, seed=0)
    assert float(bound) == 5.5  # the median of {2, 9}, and 9 is above it
    assert all(torch.equal(st[k], before[k]) for k in st)  # judged only: state unchanged
    out = _sim_p(thr, st, torch.tensor(9.0, dtype=F64), False, True, schedule=0, seed=0)
    assert out.numel() == 0  # no bound asked for
    assert st["count"].item() == 2 and st["history"][1].item() == 9.0


def test_kernel_arguments_are_checked_with_the_cpu_words():
    thr = ZScoreThreshold(warmup_steps=2)
    thr.update(torch.tensor(1.0, dtype=F64))
    st = {k: v.clone() for k, v in thr._state.items()}
    st["count"] = st["count"].double()
    with pytest.raises(ValueError, match="state tensor 'count' must be Long"):
        _sim_z(thr, st, torch.tensor(1.0, dtype=F64), True, True, schedule=0, seed=0)
