"""The CUDA kernels (csrc/cuda) executed on the CPU: the execution harness of csrc/testing/cuda_sim.

``norm_kernels.cu`` and ``agc_kernels.cu`` are compiled unchanged as host C++ against stand-in CUDA
headers and run on a simulated grid (one thread per CUDA thread, a warp's lanes meeting at every
shuffle, vote and ``__syncwarp``), through the torch-free plans the real launchers use
(``norm_plan``, ``agc_plan``). Results are compared with :mod:`gradstab.reference` and float64
oracles on the kernels' case tables (``gradstab_testing.kernel_cases``, which the op tests
also run on every device in ``DEVICES``); clipped gradients bit for bit where the arithmetic is
documented. The harness also checks every gradient/parameter access
(bounds, alignment, writes only where allowed) and that all 32 lanes reach every collective; a
ThreadSanitizer run of a torch-free driver checks the inter-warp hand-offs.

The harness is built at the first test (about a minute on two cores; cached under
``build/cuda_sim/``). A build failure fails the tests; they are skipped only when there is no
C++ compiler (and never when ``GRADSTAB_CUDA_SIM_REQUIRED=1``, as in CI).
"""

from __future__ import annotations

import math
import os
import re

import pytest
import torch
from gradstab_testing import cuda_sim_harness as sim
from gradstab_testing.cuda_sim_harness import Launch
from gradstab_testing.kernel_cases import (
    AGC_LAYOUTS,
    CLIP_OPS,
    CLIP_SPECS,
    EPS,
    FLOAT_DTYPES,
    LAYOUTS,
    MIXED_SPECS,
    RTOL32,
    RTOL64,
    SIZES,
    agc_clipped_rows,
    agc_oracle,
    agc_pairs,
    assert_agc,
    assert_agc_stats,
    assert_stats,
    bits,
    cpu_copies,
    make_grad,
    make_list,
    oracle_norms,
    randn,
    rtol_of,
    scaled,
    units,
)
from gradstab_testing.oracles import (
    assert_grads_match,
    assert_stats_match,
    assert_ulp_close,
    scale_ulps,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gradstab import reference

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def _harness():
    """Build and load the harness once per session (a failed build fails every test)."""
    if sim.compiler() is None and os.environ.get("GRADSTAB_CUDA_SIM_REQUIRED") != "1":
        pytest.skip("no C++ compiler (set CXX, or install g++): the CUDA kernels cannot be run")
    sim.load()
    sim.start_tsan_build()  # on the other core while the tests run; the last test waits for it


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clip_list(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    return make_list(CLIP_SPECS, _gen(seed), scale)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(bits(a), bits(b))


def _ref_clip(op: str, grads, bound: float, p: float = 2.0):
    b = torch.tensor(bound, dtype=torch.float64)
    if op == "clip_norm":
        return reference.clip_norm(grads, b, p, EPS, False)
    if op == "clip_norm_per_layer":
        return reference.clip_norm_per_layer(grads, b, p, EPS)
    if op == "normalize_per_layer":
        return reference.normalize_per_layer(grads, b, p, EPS)
    return reference.clip_value(grads, b, p)


def _writes(stats: dict[str, int]) -> int:
    return stats["stores"] + stats["vec_stores"]


# ------------------------------------------------------------------------ the stand-ins --


def test_float16_and_bfloat16_conversions_match_pytorch():
    """The stand-in cuda_fp16.h/cuda_bf16.h round as the GPU: every float16 widens exactly,
    and floats narrow to nearest even (ties, subnormals, overflow) as PyTorch's conversions."""
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    want = every.view(torch.float16).float()
    got = sim.convert(every, 2)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan) and torch.equal(bits(got[~nan]), bits(want[~nan]))
    # every float16 and bfloat16 value, the midpoints between neighbours (ties) and their
    # neighbours, around subnormals and the overflow threshold, plus random floats
    h = every.view(torch.float16).float()[~nan]
    b = every.view(torch.bfloat16).float()
    b = b[~torch.isnan(b)]
    edges = torch.tensor([65504.0, 65519.99, 65520.0, 3e38, 2.0**-24, 2.0**-25, 2.0**-26, 1e-45])
    rand = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=_gen(1), dtype=torch.int64)
    samples = [h, b, edges, -edges, rand.to(torch.int32).view(torch.float32)]
    for vals in (h, b):
        s = vals.sort().values
        mid = (s[1:].double() + s[:-1].double()) / 2
        samples += [mid.float(), torch.nextafter(mid.float(), torch.tensor(math.inf))]
    x = torch.cat(samples)
    x = x[~torch.isnan(x)]
    for kind, dtype in ((0, torch.float16), (1, torch.bfloat16)):
        got = sim.convert(x, kind)
        want = x.to(dtype).view(torch.int16)
        assert torch.equal(got, want), (dtype, x[got != want][:5])
    assert sim.convert(torch.tensor([math.nan]), 0).item() == 0x7FFF  # the GPU's canonical NaN
    assert sim.convert(torch.tensor([-math.nan]), 1).item() == 0x7FFF


# ------------------------------------------------------------------------- statistics --


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grad_stats_matches_reference_and_float64(dtype, layout):
    grads = [make_grad(n, dtype, layout, _gen(1)) for n in SIZES]
    got = sim.norm_op("grad_stats", grads)
    rtol = RTOL64 if dtype == torch.float64 else RTOL32
    assert_stats(got, reference.grad_stats(cpu_copies(grads), 2.0), rtol)
    torch.testing.assert_close(got[0].double(), oracle_norms(grads, 2.0), rtol=rtol, atol=0)
    s = sim.last_stats()
    assert s["loads"] + s["vec_loads"] > 0 and _writes(s) == 0  # checked, read-only


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, math.inf])
def test_norm_types_on_a_mixed_dtype_list(p):
    gen = _gen(2)
    grads = [
        make_grad(n, dtype, layout, gen, scale=0.01 * (i + 1))
        for i, (n, dtype, layout) in enumerate(MIXED_SPECS)
    ]
    got = sim.norm_op("grad_stats", grads, norm_type=p)
    want = reference.grad_stats(cpu_copies(grads), p)
    # p not in {1, 2, inf}: |x|^p by pow per element, in double
    assert_stats(got, want, RTOL32 if p in (1.0, 2.0, math.inf) else 2e-6)
    torch.testing.assert_close(got[0].double(), oracle_norms(grads, p), rtol=2e-6, atol=0)


def test_float32_lanes_redo_in_double_and_float64_is_rescued_by_max_abs():
    """float32 lane sums that overflow (3e30^2) or underflow (1e-30^2) are redone in double; a
    norm beyond float32 is inf; float64 and p-power sums that overflow or underflow double are
    recomputed scaled by the max |x|; the total is then taken from the norms."""
    f32 = [
        torch.full((5000,), 3e30),
        torch.full((7000,), 1e-30),
        torch.full((3,), 3e38),
        torch.full((9000,), 1e30).to(torch.bfloat16),
        torch.full((9000,), 1e-20).to(torch.bfloat16),
        torch.full((20,), 1e-7).to(torch.float16),  # subnormal float16: squares underflow
    ]
    norms, _, nonfinite, total = sim.norm_op("grad_stats", f32)
    want = oracle_norms(f32, 2.0)
    finite = torch.isfinite(want.float())
    assert math.isinf(norms[2]) and math.isinf(total) and int(nonfinite.sum()) == 0
    assert_ulp_close(norms[finite], want[finite], 1, "float32 results")
    f64 = [
        torch.full((5000,), 1e200, dtype=torch.float64),
        torch.full((3000,), 1e-200, dtype=torch.float64),
        make_grad(4097, torch.float32, "contiguous", _gen(5)),
        torch.full((7,), 3e38),  # a float32 norm beyond float32, reported in float64
    ]
    got = sim.norm_op("grad_stats", f64)
    assert_stats(got, reference.grad_stats(cpu_copies(f64), 2.0), RTOL32)
    assert math.isclose(float(got[0][0]), 1e200 * math.sqrt(5000), rel_tol=1e-12)
    assert math.isclose(float(got[0][1]), 1e-200 * math.sqrt(3000), rel_tol=1e-12)
    assert math.isclose(float(got[0][3]), 3e38 * math.sqrt(7), rel_tol=1e-6)
    x = torch.full((1000,), 1e10)  # |x|^40 overflows double: the p-norm is rescued too
    assert math.isclose(
        float(sim.norm_op("grad_stats", [x], norm_type=40.0)[3]),
        1e10 * 1000 ** (1 / 40),
        rel_tol=1e-6,
    )


def test_max_abs_rescue_in_every_dtype_with_heads_and_tails():
    """p-powers that overflow (bfloat16 1e30^40, float32 1e10^40) or underflow (float16 6e-8^40,
    float64 1e-200^2) double are recomputed scaled by the max |x|, scalar head and tail
    included (odd lengths, views one element in); the total then comes from the norms, over
    more than 32 tensors."""
    gen = _gen(21)
    specs = [
        (torch.bfloat16, 1e30, 9001, 40.0),
        (torch.float32, 1e10, 1001, 40.0),
        (torch.float16, 6e-8, 8193, 40.0),  # the smallest subnormal: 2^-24
        (torch.float64, 1e-200, 3001, 2.0),
        (torch.float64, 1e200, 2049, 2.0),
    ]
    for dtype, v, n, p in specs:
        x = torch.full((n + 1,), v, dtype=dtype)[1:]
        x[::7] = -x[::7]
        filler = [make_grad(64, torch.float32, "contiguous", gen) for _ in range(34)]
        grads = [x, *filler]
        got = sim.norm_op("grad_stats", grads, norm_type=p)
        want = reference.grad_stats(cpu_copies(grads), p)
        assert_stats(got, want, 2e-6)
        magnitude = float(x[0].abs().double())
        assert math.isclose(float(got[0][0]), magnitude * n ** (1 / p), rel_tol=2e-6), dtype


@pytest.mark.parametrize(
    ("gdtype", "wdtype", "p"),
    [
        (torch.bfloat16, torch.float16, 1.0),
        (torch.float16, torch.float64, 3.0),
        (torch.float64, torch.bfloat16, 1.0),
        (torch.float64, torch.float64, 3.0),
    ],
)
def test_agc_other_norm_types_on_other_dtypes(gdtype, wdtype, p):
    grads, params = agc_pairs(70, gdtype, wdtype, "offset", shapes=[(40, 33), (2, 9001)])
    expected = agc_oracle(grads, params, 0.05, 1e-3, p)
    got = sim.agc(grads, params, 0.05, 1e-3, p)
    assert_agc(grads, params, got, expected, f"{gdtype}/{wdtype} p={p}")


@pytest.mark.parametrize("gdtype", [torch.float16, torch.bfloat16, torch.float32])
def test_agc_max_abs_rescue_of_p_powers(gdtype):
    """Rows whose p-powers overflow or underflow double (p = 40) are recomputed scaled by
    their max |x|, for short rows and rows split into pieces."""
    v = 6e-8 if gdtype == torch.float16 else 1e10  # (6e-8: float16's smallest subnormal)
    g = [torch.full((3, 101), v, dtype=gdtype), torch.full((2, 9001), v, dtype=gdtype)]
    w = [torch.ones(3, 101), torch.ones(2, 9001)]
    norms, clipped, _, total = sim.agc(g, w, 1e-3, 0.0, 40.0)
    magnitude = float(torch.tensor(v, dtype=gdtype).double())
    assert math.isclose(float(norms[0]), magnitude * 303 ** (1 / 40), rel_tol=2e-6)
    assert math.isclose(float(norms[1]), magnitude * 18002 ** (1 / 40), rel_tol=2e-6)
    assert math.isclose(float(total), magnitude * 18305 ** (1 / 40), rel_tol=2e-6)
    want = agc_oracle(
        [torch.full((3, 101), v, dtype=gdtype), torch.full((2, 9001), v, dtype=gdtype)],
        w,
        1e-3,
        0.0,
        40.0,
    )
    assert clipped.tolist() == want[1]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_counts_and_nan_max(dtype):
    a = make_grad(70000, dtype, "offset", _gen(6))
    idx = torch.randperm(70000, generator=_gen(6))[:37]
    a[idx[:20]] = math.nan
    a[idx[20:30]] = math.inf
    a[idx[30:]] = -math.inf
    b = make_grad(9000, dtype, "contiguous", _gen(7))
    b[8999] = math.inf
    c = make_grad(100, dtype, "contiguous", _gen(8))
    grads = [a, b, c]
    got = sim.norm_op("grad_stats", grads)
    want = reference.grad_stats(cpu_copies(grads), 2.0)
    assert_stats(got, want, RTOL64 if dtype == torch.float64 else RTOL32)
    assert got[2].tolist() == [37, 1, 0]
    assert math.isnan(float(got[1][0])) and math.isinf(float(got[1][1]))
    assert math.isnan(float(got[3]))
    for p in (1.0, 3.0, math.inf):
        assert_stats(
            sim.norm_op("grad_stats", grads, norm_type=p),
            reference.grad_stats(cpu_copies(grads), p),
            2e-6,
        )


def test_empty_and_zero_size_lists():
    zero = [torch.empty(0, dtype=d) for d in FLOAT_DTYPES[:3]] + [torch.empty(0, 5)]
    want = reference.grad_stats(zero, 2.0)
    for op in ("grad_stats", *CLIP_OPS):
        assert_stats(sim.norm_op(op, zero, 1.0, bound_on_device=True), want, RTOL32)
    assert_stats(sim.norm_op("grad_stats", []), reference.grad_stats([], 2.0), RTOL32)
    norms, clipped, nonfinite, total = sim.agc(zero, [torch.empty_like(g) for g in zero])
    assert norms.tolist() == [0.0] * 4 and clipped.tolist() == [0] * 4
    assert nonfinite.tolist() == [0] * 4 and float(total) == 0.0


# -------------------------------------------------------------------------- clipping --


@pytest.mark.parametrize("max_norm", [1e9, 10.0, 0.0])
def test_clip_norm_bit_exact(max_norm):
    grads = _clip_list(7)
    before = cpu_copies(grads)
    got = sim.norm_op("clip_norm", grads, max_norm, bound_on_device=max_norm == 10.0)
    assert_stats(got, reference.grad_stats(before, 2.0), RTOL32)
    total = float(got[3])  # float64: the kernel's own total, exactly
    coef = min(1.0, max_norm / (total + EPS))
    for g, b in zip(grads, before):
        assert _bits_equal(g, b if coef >= 1.0 else scaled(b, coef)), (g.dtype, g.shape)
    if coef >= 1.0:
        assert _writes(sim.last_stats()) == 0  # a healthy step writes nothing


def test_clip_norm_per_layer_bit_exact():
    grads = _clip_list(9, scale=0.05)
    before = cpu_copies(grads)
    got = sim.norm_op("clip_norm_per_layer", grads, 2.0)
    assert_stats(got, reference.grad_stats(before, 2.0), RTOL32)
    for g, b, norm in zip(grads, before, got[0].tolist()):
        coef = min(1.0, 2.0 / (norm + EPS))
        assert _bits_equal(g, b if coef >= 1.0 else scaled(b, coef)), (g.dtype, g.shape)
    assert any(n > 2.0 for n in got[0].tolist()) and any(0 < n < 2.0 for n in got[0].tolist())


def test_normalize_per_layer_bit_exact():
    grads = _clip_list(33)
    before = cpu_copies(grads)
    got = sim.norm_op("normalize_per_layer", grads, 0.7)
    assert_stats(got, reference.grad_stats(before, 2.0), RTOL32)
    for g, b, norm in zip(grads, before, got[0].tolist()):
        coef = 0.7 / (norm + EPS)  # up or down: no min(1, .)
        assert _bits_equal(g, b if coef == 1.0 else scaled(b, coef)), (g.dtype, g.shape)


@pytest.mark.parametrize(("with_float64", "p"), [(False, 2.0), (True, 2.0), (False, 3.0)])
def test_clip_value_in_pass_and_deferred_bit_exact_with_prior_stats(with_float64, p):
    """float16/bfloat16/float32 lists with p = 2 clamp in the reduce pass; a float64 gradient
    or another p defers the clamp to the scale kernel. Either way: statistics of the entry
    values, then torch.clamp's result bit for bit (NaN kept)."""
    grads = _clip_list(10)
    if not with_float64:
        grads = grads[:-1]
    grads[0][5] = math.nan
    grads[1][7] = math.inf
    before = cpu_copies(grads)
    got = sim.norm_op("clip_value", grads, 1.5, p, bound_on_device=True)
    assert_stats(got, reference.grad_stats(before, p), 2e-6)
    deferred = with_float64 or p != 2.0
    log = sim.last_log()
    assert any(line.startswith("scale") for line in log) == deferred, log
    vt = torch.tensor(1.5, dtype=torch.float64)
    for g, b in zip(grads, before):
        assert _bits_equal(g, torch.clamp(b, min=-vt.to(b.dtype), max=vt.to(b.dtype)))


def test_clip_value_deferred_clamps_float64_heads_and_tails():
    """float64 gradients defer the clamp to the scale kernel; the scalar head (a view one
    element in) and tail (an odd length) are clamped like the vectors."""
    g = torch.linspace(-6.0, 6.0, 12, dtype=torch.float64)[1:]
    g[0], g[-1] = 5.0, -5.0
    before = g.clone()
    sim.norm_op("clip_value", [g], 1.0)
    assert any(line.startswith("scale") for line in sim.last_log())
    assert _bits_equal(g, torch.clamp(before, -1.0, 1.0))


@pytest.mark.parametrize("op", CLIP_OPS)
def test_clip_ops_with_float32_results_match_reference(op):
    grads = [
        make_grad(n, d, "contiguous", _gen(8)) for n in (9000, 70001) for d in FLOAT_DTYPES[:3]
    ]
    ref = cpu_copies(grads)
    got = sim.norm_op(op, grads, 3.0 if op != "clip_value" else 0.5)
    want = _ref_clip(op, ref, 3.0 if op != "clip_value" else 0.5)
    assert_stats_match(got, want, ref, op)
    for g, r in zip(grads, ref):
        assert_ulp_close(g, r, 1, f"{op} {g.dtype}")


def test_healthy_clips_leave_every_bit_alone_and_write_nothing():
    grads = _clip_list(11)
    grads[2][0] = -0.0
    before = [bits(g) for g in grads]
    for op in CLIP_OPS[:3]:
        sim.norm_op(op, grads, 1e30)
        assert _writes(sim.last_stats()) == 0, op
    assert all(torch.equal(bits(g), b) for g, b in zip(grads, before))


@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value"])
def test_strided_and_expanded_gradients_written_back_only_when_changed(op):
    base = randn((3, 1), torch.float32, _gen(31))
    storage = randn((1000,), torch.bfloat16, _gen(32))
    grads = [
        base.expand(3, 500),  # overlapping memory: written back with equal values
        storage[::2],
        torch.full((2,), 0.25, dtype=torch.float64),  # float64 results: exact
    ]
    gaps = bits(storage[1::2])
    before = cpu_copies(grads)
    sim.norm_op(op, grads, 1e9)  # healthy: nothing changes, nothing is written back
    assert all(_bits_equal(g, b) for g, b in zip(grads, before))
    assert _writes(sim.last_stats()) == 0
    got = sim.norm_op(op, grads, 0.1)
    assert any(line.startswith("writeback") for line in sim.last_log())
    for i, (g, b) in enumerate(zip(grads, before)):
        if op == "clip_value":
            vt = torch.tensor(0.1, dtype=torch.float64).to(b.dtype)
            want = torch.clamp(b, min=-vt, max=vt)
        else:
            norm = float(got[3] if op == "clip_norm" else got[0][i])
            want = scaled(b, min(1.0, 0.1 / (norm + EPS)))
        assert _bits_equal(g, want), i
    assert torch.equal(bits(storage[1::2]), gaps)  # the write-back touches only its elements


def test_strided_gradient_beyond_12_dims_is_copied_back():
    base = randn((3,) * 13, torch.float32, _gen(43), scale=2.0)
    g = base[(slice(0, 2),) * 13]  # 13 dimensions that do not merge: copied back always
    before = g.clone()
    got = sim.norm_op("clip_norm", [g, torch.zeros(1, dtype=torch.float64)], 0.5)
    assert any(line.startswith("copy back") for line in sim.last_log())
    assert _bits_equal(g, scaled(before, min(1.0, 0.5 / (float(got[3]) + EPS))))


def test_nan_gradients_give_nan_coefficient_and_nan_grads():
    grads = [
        make_grad(5000, torch.float32, "contiguous", _gen(12)),
        make_grad(10, torch.bfloat16, "offset", _gen(13)),
    ]
    grads[0][3] = math.nan
    sim.norm_op("clip_norm", grads, 1.0)
    assert all(bool(torch.isnan(g).all()) for g in grads)  # as torch.nn.utils.clip_grad_norm_


# ----------------------------------------------------- shared memory, list order, grids --


@pytest.mark.parametrize("op", CLIP_OPS)
def test_duplicate_gradient_written_twice_in_list_order(op):
    x = randn((300_007,), torch.float32, _gen(40), scale=3.0)
    x[17] = math.inf if op == "clip_value" else 5.0
    small = randn((5,), torch.float32, _gen(41))
    g = x.clone()
    got = sim.norm_op(op, [g, small.clone(), g], 0.5)
    log = sim.last_log()
    # statistics first, then one scale launch per gradient over its own units, in list order
    # (work order puts both 74-unit entries first: units [0, 74), [74, 148), then [148, 149))
    scales = [line.split(" grid")[0] for line in log if line.startswith("scale")]
    assert scales == ["scale [0, 74)", "scale [148, 149)", "scale [74, 148)"], log
    g_ref = x.clone()
    want = _ref_clip(op, [g_ref, small.clone(), g_ref], 0.5)
    assert_stats_match(got, want, [g_ref, small, g_ref], op)
    assert_ulp_close(g, g_ref, 2, op)  # two roundings, each may differ by one ulp


@pytest.mark.parametrize("op", CLIP_OPS)
def test_overlapping_views_match_reference(op):
    """Overlapping dense views, a strided view across them (processed on a copy, re-read before
    its turn) and a transposed slice: the reference on the same views is the oracle."""

    def views(buf):
        return [buf[:70_000], buf[60_000:], buf[::3], buf.view(1000, 130).t()[2:50:5]]

    buf = torch.linspace(-5, 5, 130_000, dtype=torch.float32)
    buf_ref = buf.clone()
    g, g_ref = views(buf), views(buf_ref)
    got = sim.norm_op(op, g, 0.5)
    assert any(line.startswith("refresh") for line in sim.last_log())
    want = _ref_clip(op, g_ref, 0.5)
    assert_stats_match(got, want, g_ref, op)
    assert_ulp_close(buf, buf_ref, 4, f"{op}: shared buffer")


LAUNCHES = [
    Launch(grid=1),
    Launch(),
    Launch(grid=3, schedule="reversed"),
    Launch(resident=64, schedule="shuffled", seed=1),
    Launch(grid=40, schedule="shuffled", seed=2),  # 320 warps: more than the units
]
#: Every CUDA thread a std::thread (costly on two cores: a smaller list).
CONCURRENT = Launch(grid=2, schedule="concurrent")


def _all_ops(grads, launch: Launch):
    out = [sim.norm_op("grad_stats", grads, launch=launch)]
    out.append(sim.norm_op("clip_norm", grads, 5.0, launch=launch))
    out.append(sim.norm_op("clip_norm_per_layer", grads, 5.0, launch=launch))
    out.append(sim.norm_op("clip_value", grads, 0.05, launch=launch))
    out.append(sim.norm_op("normalize_per_layer", grads, 5.0, 3.0, launch=launch))
    return out


def test_bit_identical_across_grids_and_schedules():
    """Every result and every gradient bit for bit the same for grids of 1 block to more warps
    than units, any order of the warps, and all warps at once: fixed-order reductions."""
    base = _clip_list(14, scale=3.0)
    results = []
    for launch in LAUNCHES:
        grads = [g.clone() for g in base]
        outs = _all_ops(grads, launch)
        results.append(([bits(t) for out in outs for t in out], [bits(g) for g in grads]))
    for launch, other in zip(LAUNCHES[1:], results[1:]):
        assert all(torch.equal(a, b) for a, b in zip(results[0][0], other[0])), launch
        assert all(torch.equal(a, b) for a, b in zip(results[0][1], other[1])), launch


def test_concurrent_schedule_gives_the_same_bits():
    """All warps at once (every CUDA thread a std::thread, lanes meeting at barriers): the
    same results as one warp at a time, for every op and AGC."""
    gen = _gen(17)
    base = [
        make_grad(9000, torch.float32, "offset", gen),
        make_grad(20_000, torch.bfloat16, "contiguous", gen),
        make_grad(3000, torch.float64, "strided", gen),
    ]
    results = []
    for launch in (Launch(grid=2), CONCURRENT):
        grads = [g.clone() for g in base]
        outs = _all_ops(grads, launch)
        results.append(([bits(t) for out in outs for t in out], [bits(g) for g in grads]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][0], results[1][0]))
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    g, w = agc_pairs(18, torch.float32, torch.float32, shapes=[(40, 30), (2, 9000)])
    a = sim.agc([x.clone() for x in g], w, launch=Launch(grid=2))
    b = sim.agc([x.clone() for x in g], w, launch=CONCURRENT)
    assert all(_bits_equal(x, y) for x, y in zip(a, b))


def test_strided_gradient_over_many_units_is_scaled_through_its_copy():
    """A strided gradient spanning 25 units: processed on its contiguous copy, written back
    element by element (the gaps between its elements never touched)."""
    storage = randn((200_000,), torch.float32, _gen(19))
    g = storage[::2]  # 100,000 elements: 25 units of the copy
    gaps = bits(storage[1::2])
    before = g.clone()
    f64 = torch.full((3,), 0.5, dtype=torch.float64)  # float64 results: the exact coefficient
    got = sim.norm_op("clip_norm", [g, f64], 10.0)
    assert "writeback 0 grid 391" in sim.last_log()
    assert _bits_equal(g, scaled(before, min(1.0, 10.0 / (float(got[3]) + EPS))))
    assert torch.equal(bits(storage[1::2]), gaps)


@pytest.mark.parametrize("max_norm", [0.5, 1e-30])
def test_float32_is_scaled_in_double_only_where_the_coefficient_is_not_a_normal_float32(max_norm):
    """As the CPU kernel: float32(coef) in float32, or in double where it would be subnormal."""
    g = make_grad(50_000, torch.float32, "contiguous", _gen(71), scale=1e8)
    before = g.clone()
    got = sim.norm_op("clip_norm", [g, torch.ones(3, dtype=torch.float64)], max_norm)
    coef = max_norm / (float(got[3]) + EPS)
    subnormal = coef < torch.finfo(torch.float32).tiny
    assert subnormal == (max_norm == 1e-30)
    assert _bits_equal(g, scaled(before, coef))
    in_float = before * torch.tensor(coef, dtype=torch.float64).float()
    in_double = (before.double() * coef).float()
    assert not torch.equal(in_float, in_double)
    assert _bits_equal(g, in_double if subnormal else in_float)


def test_normalize_coefficient_of_exactly_one_writes_nothing():
    """normalize_per_layer writes a gradient unless its coefficient is exactly 1."""
    g = make_grad(5000, torch.float64, "contiguous", _gen(20))
    norm = float(sim.norm_op("grad_stats", [g])[0][0])
    before = g.clone()
    sim.norm_op("normalize_per_layer", [g], norm + EPS)  # target / (norm + eps) == 1 exactly
    assert _writes(sim.last_stats()) == 0 and _bits_equal(g, before)
    sim.norm_op("normalize_per_layer", [g], 2 * (norm + EPS))
    assert _bits_equal(g, scaled(before, 2.0))


def test_two_launches_in_a_row_on_one_scratch_buffer():
    """The counters left by a call must be zeroed by the next (or no warp would ever finish a
    tensor): the same scratch buffer twice gives the same, correct results."""
    grads = _clip_list(15)
    keep = Launch(reuse_scratch=True)
    first = sim.norm_op("grad_stats", grads, launch=keep)
    second = sim.norm_op("grad_stats", grads, launch=keep)
    assert all(_bits_equal(a, b) for a, b in zip(first, second))
    assert_stats(second, reference.grad_stats(cpu_copies(grads), 2.0), RTOL32)
    g, w = agc_pairs(16, torch.float32, torch.float32)
    a = sim.agc([x.clone() for x in g], w, launch=keep)
    b = sim.agc([x.clone() for x in g], w, launch=keep)
    assert all(_bits_equal(x, y) for x, y in zip(a, b))


@settings(max_examples=12, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            st.integers(0, 20_000),
            st.sampled_from(FLOAT_DTYPES),
            st.sampled_from(LAYOUTS),
            st.sampled_from([1e-3, 1.0, 1e3]),
        ),
        min_size=1,
        max_size=8,
    ),
    p=st.sampled_from([1.0, 2.0, math.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_lists_match_reference(specs, p, seed):
    gen = _gen(seed)
    grads = [make_grad(n, d, layout, gen, scale) for n, d, layout, scale in specs]
    rtol = rtol_of(grads)
    assert_stats(
        sim.norm_op("grad_stats", grads, norm_type=p),
        reference.grad_stats(cpu_copies(grads), p),
        rtol,
    )
    before = cpu_copies(grads)
    got = sim.norm_op("clip_norm_per_layer", grads, 1.0, p, launch=Launch(grid=2))
    assert_stats(got, reference.grad_stats(before, p), rtol)
    if got[0].dtype == torch.float64:
        for g, b, norm in zip(grads, before, got[0].tolist()):
            coef = min(1.0, 1.0 / (norm + EPS))
            assert _bits_equal(g, b if coef >= 1.0 else scaled(b, coef))


# ------------------------------------------------------------------ adaptive_clip (AGC) --


@pytest.mark.parametrize("gdtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", AGC_LAYOUTS)
def test_agc_matches_float64_oracle_and_reference(gdtype, layout):
    grads, params = agc_pairs(50, gdtype, torch.float32, layout)
    params[1][2].zero_()  # a zero-weight unit: the eps floor
    before = cpu_copies(grads)
    expected = agc_oracle(grads, params)
    assert 0 < sum(expected[1]) < sum(units(g).shape[0] for g in grads if g.numel())
    got = sim.agc(grads, params)
    assert_agc(grads, params, got, expected, f"{gdtype} {layout}")
    ref_grads = [b.clone() for b in before]
    ref = reference.adaptive_clip(ref_grads, cpu_copies(params), 0.01, 1e-3, 2.0)
    assert_agc_stats(got, ref, rtol_of(grads))
    for g, r in zip(grads, ref_grads):
        if g.dtype != torch.float64:
            assert_ulp_close(g, r.double(), scale_ulps(g.dtype), "against the reference")


@pytest.mark.parametrize(
    ("gdtype", "wdtype"),
    [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float64),
        (torch.float32, torch.bfloat16),
        (torch.float64, torch.float16),
        (torch.float64, torch.float64),
    ],
)
def test_agc_mixed_dtypes(gdtype, wdtype):
    grads, params = agc_pairs(51, gdtype, wdtype)
    expected = agc_oracle(grads, params)
    assert_agc(grads, params, sim.agc(grads, params), expected, f"{gdtype}/{wdtype}")


@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_agc_other_norm_types(p):
    grads, params = agc_pairs(55, torch.float32, torch.float32)
    expected = agc_oracle(grads, params, 0.05, 1e-3, p)
    assert_agc(grads, params, sim.agc(grads, params, 0.05, 1e-3, p), expected, f"p={p}")


@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32, torch.float64])
def test_agc_nonfinite_follow_the_float64_formula(gdtype):
    g = torch.tensor(
        [[0.5, math.nan, 0.5], [0.5, math.inf, -0.5], [3.0, 4.0, 0.0], [0.1, 0.1, 0.1]],
        dtype=gdtype,
    )
    w = torch.ones(4, 3)
    w[3, 0] = math.nan
    long_g = torch.full((2, 9000), 0.5, dtype=gdtype)  # the same in long units (pieces)
    long_g[0, 8500] = math.inf
    long_g[1, 3] = math.nan
    grads, params = [g, long_g], [w, torch.ones(2, 9000)]
    want, counts = agc_oracle(grads, params, 0.1, 1e-3)
    norms, clipped, nonfinite, total = sim.agc(grads, params, 0.1, 1e-3)
    assert clipped.tolist() == counts == [2, 1]
    assert nonfinite.tolist() == [2, 2]
    for a, e in zip(grads, want):
        assert torch.equal(torch.isnan(a), torch.isnan(e))
        fin = ~torch.isnan(e)
        assert_ulp_close(a[fin], e[fin], scale_ulps(a.dtype))
    assert math.isnan(float(norms[0])) and math.isnan(float(total))


def test_agc_nan_weights_in_long_rows_are_never_clipped():
    """A NaN in a parameter's long row (pieces) makes that row's bound NaN: never clipped."""
    g = torch.full((3, 9000), 0.5)
    w = torch.ones(3, 9000)
    w[1, 8999] = math.nan
    expected = agc_oracle([g.clone()], [w], 0.01, 1e-3)
    assert expected[1] == [2]
    assert_agc([g], [w], sim.agc([g], [w], 0.01, 1e-3), expected)


def test_agc_huge_and_tiny_values():
    g = torch.tensor([[3e30, 4e30], [3e-30, 4e-30]])  # squares over/underflow float32
    w = torch.tensor([[1e38, 1e38], [1e-30, 0.0]])
    want, counts = agc_oracle([g.clone()], [w], 1e-8, 0.0)
    norms, clipped, _, _ = sim.agc([g], [w], 1e-8, 0.0)
    assert math.isclose(float(norms[0]), 5e30, rel_tol=1e-6)
    assert clipped.tolist() == counts == [2]
    assert_ulp_close(g, want[0], scale_ulps(g.dtype))
    g64 = torch.full((2, 5000), 1e200, dtype=torch.float64)  # rescued by max |x|
    w64 = torch.full((2, 5000), 1e300, dtype=torch.float64)
    w64[1] = 1e190
    long64 = torch.full((9002,), 1e-200, dtype=torch.float64)[1:]  # long, underflowing, a tail
    norms, clipped, _, total = sim.agc([g64, long64], [w64, torch.ones(9001, dtype=torch.float64)])
    row = 1e200 * math.sqrt(5000)
    assert math.isclose(float(norms[0]), row * math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(float(norms[1]), 1e-200 * math.sqrt(9001), rel_tol=1e-12)
    assert math.isclose(float(total), row * math.sqrt(2), rel_tol=1e-12)
    assert clipped.tolist() == [1, 0] and bool((g64[0] == 1e200).all())
    coef = 0.01 * 1e190 * math.sqrt(5000) / row
    assert_grads_match([g64[1]], [torch.full((5000,), 1e200 * coef, dtype=torch.float64)], 1e-12)


def test_agc_zero_weights_use_eps_floor_and_zero_gradients_stay_zero():
    g = torch.full((3, 4), 0.5)
    w = torch.zeros(3, 4)
    w[1] = 1.0  # norm 2
    _, clipped, _, _ = sim.agc([g], [w], 0.1, 1e-3)
    assert clipped.tolist() == [3]
    torch.testing.assert_close(
        torch.linalg.vector_norm(g.double(), dim=1),
        torch.tensor([1e-4, 0.2, 1e-4], dtype=torch.float64),
    )
    g = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    _, clipped, _, _ = sim.agc([g], [torch.zeros(2, 2)], 0.1, 0.0)
    assert clipped.tolist() == [1] and bool((g == 0).all())


def test_agc_unit_exactly_at_its_bound_is_not_clipped():
    """A unit is clipped only if its norm exceeds clip_factor * ||W||: with G = W and a clip
    factor of 1 the two norms are the same sums in the same order, equal to the last bit, so
    no unit, short or split into pieces, is clipped or written."""
    w = [randn((50, 30), torch.float32, _gen(63)), randn((2, 9000), torch.bfloat16, _gen(64))]
    g = [x.clone() for x in w]
    before = [bits(x) for x in g]
    _, clipped, _, _ = sim.agc(g, w, 1.0, 0.0)
    assert clipped.tolist() == [0, 0] and _writes(sim.last_stats()) == 0
    assert all(torch.equal(bits(x), b) for x, b in zip(g, before))
    _, clipped, _, _ = sim.agc(g, w, 0.5, 0.0)  # just below: every unit, halved
    assert clipped.tolist() == [50, 2]
    assert all(_bits_equal(x, scaled(y, 0.5)) for x, y in zip(g, w))


def test_agc_bit_identical_across_grids_and_schedules():
    base_g, params = agc_pairs(57, torch.float32, torch.float32)
    base_g[0][1, 0, 0, 0] = math.inf
    outs = []
    for launch in LAUNCHES:
        grads = [g.clone() for g in base_g]
        stats = sim.agc(grads, params, launch=launch)
        outs.append(([bits(t) for t in stats], [bits(g) for g in grads]))
    for launch, (stats, grads) in zip(LAUNCHES[1:], outs[1:]):
        assert all(torch.equal(a, b) for a, b in zip(stats, outs[0][0])), launch
        assert all(torch.equal(a, b) for a, b in zip(grads, outs[0][1])), launch


def test_agc_unclipped_units_and_healthy_steps_are_not_written():
    grads, params = agc_pairs(58, torch.float32, torch.float32, "transposed")
    storage = randn((1000,), torch.bfloat16, _gen(58))
    grads += [storage[::2]]  # strided: a copy, written back only if a unit was clipped
    params += [torch.ones(500)]
    grads[1][0, 0] = -0.0
    grads[2][4] = math.nan  # a NaN unit is not clipped: its payload survives
    before = [bits(g) for g in grads]
    gaps = bits(storage[1::2])
    _, clipped, _, _ = sim.agc(grads, params, 1e6)  # nothing clipped: nothing written
    assert clipped.tolist() == [0] * len(grads) and _writes(sim.last_stats()) == 0
    assert all(torch.equal(bits(g), b) for g, b in zip(grads, before))
    rows = [agc_clipped_rows(g, w) for g, w in zip(grads, params)]
    assert any(r.any() for r in rows) and any((~r).any() for r in rows)
    sim.agc(grads, params)
    for g, b, r in zip(grads, before, rows):
        if g.numel() == 0:
            continue
        got_rows = bits(g).reshape(r.shape[0], g.numel() // r.shape[0])
        want_rows = b.reshape(r.shape[0], g.numel() // r.shape[0])
        assert torch.equal(got_rows[~r], want_rows[~r])
    assert torch.equal(bits(storage[1::2]), gaps)


def test_agc_strided_gradients_written_back():
    base = randn((40, 60), torch.float32, _gen(59), scale=0.5)
    grads = [base[:, ::2], randn((30, 20), torch.float16, _gen(60)).t()]  # both on copies
    params = [torch.randn(40, 30, generator=_gen(61)), torch.randn(20, 30, generator=_gen(62))]
    before = cpu_copies(grads)
    gaps = bits(base[:, 1::2])
    expected = agc_oracle(before, params)
    assert min(expected[1]) > 0
    assert_agc(grads, params, sim.agc(grads, params), expected)
    assert torch.equal(bits(base[:, 1::2]), gaps)


@pytest.mark.parametrize("launch", [Launch(), Launch(grid=1, schedule="reversed")])
def test_agc_shared_memory_matches_reference(launch):
    """A gradient twice, overlapping views, a transposed view on a copy, a long unit over
    everything, a parameter that is another pair's gradient: decided on the entry data,
    written in list order, exactly as the reference does it on the same views."""
    gen = _gen(60)
    host = torch.randn(80_000, generator=gen, dtype=torch.float64) * torch.logspace(
        -4, -1, 80_000, dtype=torch.float64
    )

    def views(b):
        return [
            b[:40_000].view(200, 200),
            b[30_000:70_000].view(400, 100),
            b[:40_000].view(200, 200).t(),
            b[10_000:],
            b[:40_000].view(200, 200),
        ]

    def rows(n):
        return torch.logspace(-3, 1, n, dtype=torch.float64)[:, None]

    w_host = [
        torch.randn(200, 200, generator=gen, dtype=torch.float64) * rows(200),
        torch.randn(400, 100, generator=gen, dtype=torch.float64) * rows(400),
        torch.randn(200, 200, generator=gen, dtype=torch.float64) * rows(200),
        torch.full((70_000,), 0.01, dtype=torch.float64),
    ]
    for dtype in (torch.float32, torch.float64):
        buf = host.to(dtype)
        ref_buf = buf.clone()
        params = [w.to(dtype) for w in w_host] + [buf[40_000:].view(200, 200)]
        ref_params = [w.to(dtype) for w in w_host] + [ref_buf[40_000:].view(200, 200)]
        got = sim.agc(views(buf), params, launch=launch)
        assert any(line.startswith("refresh") for line in sim.last_log())
        want = reference.adaptive_clip(views(ref_buf), ref_params, 0.01, 1e-3, 2.0)
        assert_agc_stats(got, want, RTOL32)
        if dtype == torch.float64:
            assert_grads_match([buf], [ref_buf], 5e-12, "shared buffer")
        else:
            assert_ulp_close(buf, ref_buf.double(), 5, "shared buffer")


def test_agc_duplicate_gradient_is_scaled_twice():
    x = randn((256, 300), torch.float32, _gen(61)) * torch.logspace(-3, 0, 256)[:, None]
    w = randn((256, 300), torch.float32, _gen(62))
    g = x.clone()
    stats = sim.agc([g, g], [w, w])
    want, counts = agc_oracle([x], [w])
    assert stats[1].tolist() == counts * 2 and 0 < counts[0] < 256
    coefs = want[0].norm(dim=1) / units(x).norm(dim=1)
    twice = (units(x) * (coefs * coefs)[:, None]).reshape(x.shape)
    assert_ulp_close(g, twice, scale_ulps(g.dtype, 2))


def test_agc_statistics_are_pre_clip():
    grads, params = agc_pairs(56, torch.float32, torch.float32)
    before = cpu_copies(grads)
    norms, _, nonfinite, total = sim.agc(grads, params)
    oracle = oracle_norms(before, 2.0)
    torch.testing.assert_close(norms.double(), oracle, rtol=RTOL32, atol=0)
    torch.testing.assert_close(
        total.double(), torch.linalg.vector_norm(oracle), rtol=RTOL32, atol=0
    )
    assert nonfinite.tolist() == [0] * len(grads)


# ----------------------------------------------------------------------- the checkers --


@pytest.mark.parametrize("schedule", ["in_order", "concurrent"])
@pytest.mark.parametrize(
    ("which", "message"),
    [
        (0, ""),
        (1, r"out-of-bounds 4-byte load at selftest_kernels.cpp:\d+.*0 bytes past its end"),
        (2, r"misaligned 16-byte load at selftest_kernels.cpp:\d+"),
        (3, r"4-byte store at selftest_kernels.cpp:\d+ to read-only memory"),
        (4, r"warp divergence: lane 7 returned from selftest_kernel while lane \d+ waits at "),
        (5, r"warp divergence: lane \d+ is at __syncwarp \(selftest_kernels.cpp:\d+\) but lane"),
        (6, r"partial mask"),
    ],
)
def test_checkers_report_each_fault(which, message, schedule):
    """Each checker fires on a kernel with its fault, names the call site, and does not hang;
    the faultless control reports nothing."""
    got = sim.selftest(which, schedule)
    if not message:
        assert got == ""
    else:
        assert re.search(message, got), got


def test_pointer_not_element_aligned_would_fault_on_the_gpu():
    """A float32 gradient at an address that is 2 modulo 4 (possible on the CPU through
    torch.frombuffer, not for CUDA tensors PyTorch allocates): the kernels' scalar-throughout
    path for such pointers (TensorDesc::align_offset == -1) makes 4-byte loads the GPU cannot
    do. The harness reports the first one instead of passing."""
    g = torch.frombuffer(bytearray(4 * 1000 + 8), dtype=torch.float32, offset=2, count=1000)
    g.copy_(torch.linspace(-1, 1, 1000))
    with pytest.raises(RuntimeError, match=r"misaligned 4-byte load at device_common.cuh:\d+"):
        sim.norm_op("grad_stats", [g])


# ------------------------------------------------------------------ ThreadSanitizer --


def test_thread_sanitizer_finds_no_race_in_the_kernels():
    """The kernels with every CUDA thread a std::thread, built with -fsanitize=thread: every
    norm op and mode, shared gradients, AGC with short and long rows and its deferred path,
    each result checked by the driver. The hand-offs between warps (arrive_last: release
    fence before the count, acquire fence and __syncwarp after the last one) must give every
    read of another warp's record a happens-before edge; shuffles give none. The controls
    show the model is not vacuous: the same hand-off without its release fence is reported."""
    why = sim.tsan_usable()
    if why and os.environ.get("GRADSTAB_CUDA_SIM_REQUIRED") != "1":
        pytest.skip(f"ThreadSanitizer cannot run here: {why}")
    r = sim.run_tsan_driver()
    assert r.returncode == 0 and "ThreadSanitizer" not in r.stderr, r.stdout + r.stderr[-8000:]
    assert "0 failures" in r.stdout
    r = sim.run_tsan_driver("--fenced")
    assert r.returncode == 0 and "ThreadSanitizer" not in r.stderr, r.stderr[-4000:]
    r = sim.run_tsan_driver("--unfenced")
    assert r.returncode == 66 and "WARNING: ThreadSanitizer: data race" in r.stderr, r.stderr
    assert "handoff_kernel" in r.stderr
