"""Statistics under float32 overflow and underflow, returned by every op that returns them.

The CPU kernel sums float16/bfloat16/float32 gradients in float32 lanes over 512-element
blocks and redoes in double a range whose float32 lanes overflowed or underflowed (a clamping
call: the block, before clamping it), hence also one odd block among ordinary ones; float64 sums
(and sums for p other than 1, 2, inf) that overflow are rescued per tensor by re-reading the
gradient scaled by its max-abs. A clip op must report the statistics of the gradients as they
were on entry, although it writes them in the same pass (``clip_value`` clamps each block
right after reading it). Hence gradients of 1,000 elements (one full block, one partial block,
a scalar tail), of several blocks, and of several 65,536-element chunks, with magnitudes whose
squares (or, for p = 1, whose block sums) overflow float32, or whose squares underflow it.
A test with two elements takes the scalar tail and never overflows a block: that is how the
removal of the block-level redo once went unnoticed.

Oracles: :func:`helpers.oracle_stats` (``torch.linalg.vector_norm`` in float64 on a copy taken
before the op), ``torch.nn.utils`` clipping on float64 copies, the AGC rule in float64 with
those norms, and hand-computed values.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    GAP_SENTINEL,
    GradSpec,
    assert_grads_match,
    assert_stats_match,
    make_grad,
    oracle_clip_norm_,
    oracle_clip_value_,
    oracle_stats,
)

import gradstab  # noqa: F401  (defines the ops)
from gradstab import reference

OPS = torch.ops.gradstab
EPS = 1e-6

pytestmark = pytest.mark.usefixtures("one_thread")

#: 1,000 elements: a 512-element block, a 480-element block and an 8-element scalar tail;
#: 5,000: ten blocks; 140,000: three 65,536-element chunks (the last one partial).
SIZES = (1_000, 5_000, 140_000)

#: Decimal exponent e of the magnitudes (uniform in [1, 3) * 10**e) per dtype and case.
#: "huge": squares overflow float32 (bfloat16, float32) or double (float64); float16 cannot
#: overflow a float32 sum, so its "huge" is near its own maximum. "huge_l1" (p = 1): a float32
#: lane's 32 values overflow float32; float64 sums of |x| stay finite (the norm is the sum).
#: "tiny": squares underflow float32 (float64: double); float16 values are subnormal. An L1
#: norm of values that overflow a float32 lane exceeds the float32 range itself, so "huge_l1"
#: calls get a float64 gradient as well: their results are float64.
SCALE = {
    torch.float16: {"huge": 4, "huge_l1": 4, "tiny": -6},
    torch.bfloat16: {"huge": 20, "huge_l1": 37, "tiny": -25},
    torch.float32: {"huge": 20, "huge_l1": 37, "tiny": -25},
    torch.float64: {"huge": 160, "huge_l1": 300, "tiny": -170},
}
DTYPES = tuple(SCALE)
OP_NAMES = (
    "grad_stats",
    "clip_norm",
    "clip_norm_per_layer",
    "normalize_per_layer",
    "clip_value",
    "adaptive_clip",
)
NORM_TYPES = (2.0, 1.0, math.inf, 3.0)
AGC_EPS = 0.0  # no floor: tiny weights still give a bound below the tiny gradients' norms


def _f64(x: float, device: str) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, device=device)


def run(op: str, grads, bound: float, p: float, *, impl: str = "op", weights=None):
    """Run ``op`` in place through the dispatcher (``impl="op"``) or the reference kernel."""
    fns = OPS if impl == "op" else reference
    device = grads[0].device.type
    if op == "grad_stats":
        return getattr(fns, op)(grads, p)
    if op == "clip_norm":
        return getattr(fns, op)(grads, _f64(bound, device), p, EPS, False)
    if op in ("clip_norm_per_layer", "normalize_per_layer"):
        return getattr(fns, op)(grads, _f64(bound, device), p, EPS)
    if op == "clip_value":
        return getattr(fns, op)(grads, _f64(bound, device), p)
    assert op == "adaptive_clip"
    return getattr(fns, op)(grads, weights, bound, AGC_EPS, p)


def magnitudes(n: int, dtype: torch.dtype, e: int, seed: int) -> torch.Tensor:
    """``n`` values of random sign and magnitude uniform in ``[1, 3) * 10**e``, in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    mag = (1.0 + 2.0 * torch.rand(n, dtype=torch.float64, generator=gen)) * 10.0**e
    sign = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return (mag * sign).to(dtype)


def two_grads(dtype: torch.dtype, n: int, e: int, device: str) -> list[torch.Tensor]:
    """A contiguous gradient of ``n`` elements and a strided one of ``n // 2`` (every other
    element of a buffer, processed on a copy and written back)."""
    dense = magnitudes(n, dtype, e, seed=n).to(device)
    buf = torch.full((n // 2 * 2,), GAP_SENTINEL, dtype=dtype, device=device)
    strided = buf[::2]
    strided.copy_(magnitudes(n // 2, dtype, e, seed=n + 1))
    return [dense, strided]


def _expected_grads(op: str, before, bound: float, p: float, weights=None):
    """Float64 oracle of the gradients after ``op`` (and, for AGC, the clipped-unit counts)."""
    if op == "grad_stats":
        return [g.double() for g in before], None
    if op == "clip_norm":
        return oracle_clip_norm_(before, bound, p)[0], None
    if op == "clip_value":
        return oracle_clip_value_(before, bound), None
    if op in ("clip_norm_per_layer", "normalize_per_layer"):
        out = []
        for g in before:
            norm = oracle_stats([g], p).total_norm
            coef = bound / (norm + EPS)
            if op == "clip_norm_per_layer":
                coef = torch.clamp(coef, max=1.0)
            out.append(g.double() * coef)
        return out, None
    # AGC of 1-D gradients (one unit each), with the overflow-free norms of oracle_stats
    out, clipped = [], []
    for g, w in zip(before, weights):
        gn, wn = oracle_stats([g], p).total_norm, oracle_stats([w], p).total_norm
        max_norm = bound * torch.clamp(wn, min=AGC_EPS)
        clip = bool(gn > max_norm)
        out.append(g.double() * (max_norm / gn if clip else 1.0))
        clipped.append(int(clip))
    return out, torch.tensor(clipped)


#: (size, p): every norm type on block sizes; p = 2 also over several chunks.
SIZE_P = [(n, p) for n in SIZES[:2] for p in NORM_TYPES] + [(SIZES[2], 2.0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ["huge", "tiny"])
@pytest.mark.parametrize(("n", "p"), SIZE_P)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OP_NAMES)
def test_stats_are_those_on_entry_under_overflow(op, dtype, n, case, p, device):  # noqa: PLR0917
    """Every op returns the float64 oracle's pre-clip statistics, and clips as the oracle."""
    if case == "huge" and p == 1.0:
        case = "huge_l1"
    e = SCALE[dtype][case]
    bound = 10.0**e if op != "adaptive_clip" else 1e-3  # every value (or unit) is clipped
    # the reference kernel (CPU) on block sizes: it has no blocks or chunks of its own
    for impl in ["op", "reference"] if device == "cpu" and n < SIZES[2] else ["op"]:
        grads = two_grads(dtype, n, e, device)
        if case == "huge_l1":
            grads.append(torch.tensor([1.0, -2.0], dtype=torch.float64, device=device))
        before = [g.cpu().clone() for g in grads]
        weights = [
            magnitudes(g.numel(), dtype, e, seed=7).reshape(g.shape).to(device) for g in grads
        ]
        stats = run(op, grads, bound, p, impl=impl, weights=weights)
        expected = oracle_stats(before, p)
        what = f"{impl} {op} {dtype} n={n} {case} p={p}"
        stats = [s.cpu() for s in stats]
        units = stats[1]
        if op == "adaptive_clip":  # (norms, clipped units, nonfinite, total): no max-abs
            stats[1] = expected.max_abs.to(stats[0].dtype)
        assert_stats_match(stats, expected, before, what)
        want, clipped = _expected_grads(op, before, bound, p, weights=[w.cpu() for w in weights])
        if clipped is not None:
            assert torch.equal(units, clipped), (what, units, clipped)
            assert clipped[:2].tolist() == [1, 1], what  # AGC did clip: the path is taken
        if op == "clip_value":  # the clamp: exact
            for g, w in zip(grads, want):
                assert torch.equal(g.cpu(), w.to(g.dtype)), what
        else:
            rtol = 1e-12 if dtype == torch.float64 else 2.0**-23
            assert_grads_match([g.cpu() for g in grads], want, rtol, what)
        assert not grads[1].is_contiguous()  # still the strided view that was passed


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_issue_example_float32_overflow_total_is_pre_clip(op, device):
    """1,000 float32 values of 1e20 (clip at 1): pre-clip total sqrt(1000) * 1e20, not 31.6."""
    x = float(torch.tensor(1e20, dtype=torch.float32))  # 1e20 rounded to float32
    g = torch.full((1_000,), 1e20, dtype=torch.float32, device=device)
    w = torch.full_like(g, 1e20)
    stats = run(op, [g], 1.0 if op != "adaptive_clip" else 1e-3, 2.0, weights=[w])
    want = math.sqrt(1_000) * x  # 3.1623e21
    assert float(stats[0][0]) == pytest.approx(want, rel=1e-6)
    assert float(stats[3]) == pytest.approx(want, rel=1e-6)
    if op != "adaptive_clip":
        assert float(stats[1][0]) == x
    if op == "clip_value":
        assert torch.equal(g, torch.ones_like(g))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", OP_NAMES)
def test_mixed_dtypes_one_call_overflowing_each_its_own_way(op, device):
    """float16 near its max, bfloat16 and float32 overflowing float32 squares, float64
    overflowing double, in one call: float64 results, each tensor's own oracle."""
    specs = [
        GradSpec((1_000,), torch.float16, scale_exp=3, seed=1),
        GradSpec((3, 700), torch.bfloat16, "transposed", scale_exp=20, seed=2),
        GradSpec((70_000,), torch.float32, scale_exp=20, seed=3),
        GradSpec((1_000,), torch.float64, "strided", scale_exp=160, seed=4),
        GradSpec((2_000,), torch.float32, scale_exp=-25, seed=5),
    ]
    grads = [make_grad(s) for s in specs]
    before = [g.clone() for g in grads]
    grads = [g.to(device) if device != "cpu" else g for g in grads]
    weights = [torch.ones_like(g) for g in grads]
    stats = [
        s.cpu()
        for s in run(op, grads, 1.0 if op != "adaptive_clip" else 1e-3, 2.0, weights=weights)
    ]
    expected = oracle_stats(before, 2.0)
    if op == "adaptive_clip":  # (norms, clipped units, nonfinite, total): no max-abs
        stats[1] = expected.max_abs.to(stats[0].dtype)
    assert_stats_match(stats, expected, before, op)


#: (dtype, bound): bounds at and around the value that rounds to Inf in the dtype (float16:
#: 65520; bfloat16: just below FLT_MAX; float32: beyond FLT_MAX), and a finite one below.
NEAR_MAX_BOUNDS = [
    (torch.float16, 65504.0),
    (torch.float16, 65519.0),
    (torch.float16, 65520.0),
    (torch.float16, 1e5),
    (torch.bfloat16, 3.38e38),
    (torch.bfloat16, 3.4e38),
    (torch.float32, 3.4e38),
    (torch.float32, 1e39),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", [100, 995], ids=["in-a-block", "in-the-tail"])
@pytest.mark.parametrize(("dtype", "bound"), NEAR_MAX_BOUNDS, ids=str)
def test_clip_value_counts_each_inf_once_whatever_the_bound_rounds_to(dtype, bound, where, device):
    """An Inf is counted once, before the clamp, also when the bound rounds to Inf in the
    gradient's dtype (the clamp then writes the Inf back): float16 with a bound >= 65520 once
    reported 2 for one Inf. Values near the dtype's maximum, one Inf, one -Inf, one NaN."""
    finfo = torch.finfo(dtype)
    vals = torch.linspace(-0.99, 0.99, 1_000, dtype=torch.float64) * finfo.max
    vals[where], vals[where + 1], vals[where + 2] = math.inf, -math.inf, math.nan
    for impl in ["op", "reference"] if device == "cpu" else ["op"]:
        g = vals.to(dtype).to(device)
        before = g.cpu().clone()
        stats = [s.cpu() for s in run("clip_value", [g], bound, 2.0, impl=impl)]
        assert stats[2].tolist() == [3], f"{impl}: {stats[2].tolist()} non-finite, not 3"
        assert_stats_match(stats, oracle_stats([before], 2.0), [before], impl)
        want = oracle_clip_value_([before], bound)[0].to(dtype)
        assert torch.equal(torch.isnan(g.cpu()), torch.isnan(want))
        ok = ~torch.isnan(want)
        assert torch.equal(g.cpu()[ok], want[ok]), impl  # PyTorch's clamp: Inf stays Inf
        # a second clip of the clipped gradient counts what is left in it
        again = run("clip_value", [g], bound, 2.0, impl=impl)[2].cpu()
        assert torch.equal(again, oracle_stats([g.cpu()], 2.0).nonfinite), impl


#: (dtype, decimal exponent): one block whose float32 lane sums overflow (float16: values
#: near its maximum, which cannot overflow a lane) or whose squares underflow float32.
ODD_BLOCK = [
    (torch.float32, 20),
    (torch.float32, -25),
    (torch.bfloat16, 20),
    (torch.bfloat16, -25),
    (torch.float16, 4),
    (torch.float16, -6),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("start", [0, 1_536, 4_096], ids=["first", "middle", "last-full"])
@pytest.mark.parametrize(("dtype", "e"), ODD_BLOCK, ids=str)
@pytest.mark.parametrize("op", OP_NAMES)
def test_one_odd_block_among_ordinary_ones(op, dtype, e, start, device):
    """A 5,000-element gradient of ordinary values with one 512-element block of huge or tiny
    ones, first, in the middle or the last full one (the CPU kernel asks whether its float32
    lanes overflowed or underflowed once per range, and per block only when clamping): the
    statistics are the float64 oracle's, and the clip the oracle's clip."""
    g = magnitudes(5_000, dtype, -1, seed=start)
    g[start : start + 512] = magnitudes(512, dtype, e, seed=start + 1)
    g = g.to(device)
    before = [g.cpu().clone()]
    w = magnitudes(5_000, dtype, -1, seed=9).to(device)
    bound = 0.05 if op != "adaptive_clip" else 1e-3  # below every norm: every path writes
    stats = [s.cpu() for s in run(op, [g], bound, 2.0, weights=[w])]
    expected = oracle_stats(before, 2.0)
    what = f"{op} {dtype} 1e{e} at {start}"
    if op == "adaptive_clip":  # (norms, clipped units, nonfinite, total): no max-abs
        stats[1] = expected.max_abs.to(stats[0].dtype)
    assert_stats_match(stats, expected, before, what)
    want, _ = _expected_grads(op, before, bound, 2.0, weights=[w.cpu()])
    if op == "clip_value":
        assert torch.equal(g.cpu(), want[0].to(dtype)), what
    else:
        assert_grads_match([g.cpu()], want, 2.0**-23, what)
