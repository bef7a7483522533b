"""The ``torch.ops.gradstab`` ops against float64 oracles, and the C++ kernel against the
pure-PyTorch reference kernel (``gradstab.reference``, called directly).

C++ kernel vs reference, what is exact and what is not (measured, then asserted below):

- non-finite counts, max-abs and value-clipped gradients: bit-identical;
- float32-reported norms: within 1 ulp. The reference sums in float64; the C++ kernel sums
  float16/bfloat16/float32 gradients in float32 lanes added in double per block (about 1e-9
  relative on random data), so the two doubles differ slightly and their float32 roundings
  occasionally land one ulp apart;
- float64-reported norms: relative 1e-12 for float64 gradients (float64 sums in a different
  order), float32 epsilon for lower-precision gradients (their float32 lanes);
- norm-clipped gradients: within 1 ulp (float64 gradients: the norm's relative tolerance),
  since the coefficient comes from the norm.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    DESIGN_RTOL,
    FP32_ACCUM_RTOL,
    FP64_RTOL,
    NORM_TYPES,
    GradSpec,
    assert_bitwise_equal,
    assert_grads_match,
    assert_rel_close,
    assert_stats_match,
    assert_ulp_close,
    child_env,
    clone_grads,
    grad_lists,
    make_grad,
    make_grads,
    oracle_stats,
    result_dtype,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import gradstab  # defines the ops
from gradstab import reference

OPS = torch.ops.gradstab
EPS = 1e-6
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one intra-op thread unless a test sets more (see conftest.one_thread)
pytestmark = pytest.mark.usefixtures("one_thread")


def f64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def run_op(name: str, grads, norm_type: float, bound: float, impl: str = "op"):
    """Run op ``name`` (via the dispatcher, or ``impl="reference"``) on ``grads`` in place; the
    bound is a float64 tensor on the gradients' device."""
    fns = {
        "op": {
            "grad_stats": OPS.grad_stats,
            "clip_norm": OPS.clip_norm,
            "clip_norm_per_layer": OPS.clip_norm_per_layer,
            "clip_value": OPS.clip_value,
            "normalize_per_layer": OPS.normalize_per_layer,
        },
        "reference": {
            "grad_stats": reference.grad_stats,
            "clip_norm": reference.clip_norm,
            "clip_norm_per_layer": reference.clip_norm_per_layer,
            "clip_value": reference.clip_value,
            "normalize_per_layer": reference.normalize_per_layer,
        },
    }[impl]
    if name == "grad_stats":
        return fns[name](grads, norm_type)
    b = f64(bound).to(grads[0].device if grads else "cpu")
    if name == "clip_norm":
        return fns[name](grads, b, norm_type, EPS, False)
    if name in ("clip_norm_per_layer", "normalize_per_layer"):
        return fns[name](grads, b, norm_type, EPS)
    return fns[name](grads, b, norm_type)


OP_NAMES = ("grad_stats", "clip_norm", "clip_norm_per_layer", "clip_value")


# ------------------------------------------------------------------ ops vs float64 oracle --


@settings(max_examples=60)
@given(specs=grad_lists(min_size=0, max_size=5, big=True), p=st.sampled_from(NORM_TYPES))
def test_grad_stats_matches_float64_oracle(specs, p):
    grads = make_grads(specs)
    before = clone_grads(grads)
    stats = OPS.grad_stats(grads, p)
    assert_stats_match(stats, oracle_stats(grads, p), grads, f"p={p}")
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b, "grad_stats must not write")


@pytest.mark.parametrize(
    ("dtype", "values", "norm"),
    [
        # finite gradients never give an infinite norm, tiny ones are not flushed to zero
        (torch.float32, [1e30, 1e30], math.sqrt(2) * 1e30),
        (torch.float32, [1e-30, 1e-30], math.sqrt(2) * 1e-30),
        (torch.float32, [3e38, -3e38, 1e38], math.sqrt(19) * 1e38),
        (torch.float32, [1e-45, -1e-45, 3e-45], None),  # subnormals
        (torch.float16, [60000.0, -60000.0, 60000.0], math.sqrt(3) * 60000),
        (torch.float16, [6e-8, 6e-8], None),  # float16 subnormals
        (torch.bfloat16, [3e38, 3e38], None),  # the norm exceeds float32: the only inf
        (torch.bfloat16, [1e-38, 1e-38, 1e-38, 1e-38], None),
        (torch.float64, [1e300, 1e300], math.sqrt(2) * 1e300),
        (torch.float64, [1e-300, 1e-300], math.sqrt(2) * 1e-300),
        (torch.float64, [5e-324, 5e-324, 5e-324, 5e-324], None),
    ],
)
@pytest.mark.parametrize("n_repeat", [1, 3000])
def test_no_overflow_or_underflow(dtype, values, norm, n_repeat):
    """Hand-checked extremes, short (scalar tail loop) and long (vector loop, 2048-blocks).

    The long ones repeat a few values, the float32 lanes' worst case: within the DESIGN
    bound there, within 1 ulp of the float64 value for the short ones.
    """
    g = torch.tensor(values * n_repeat, dtype=torch.float64).to(dtype)
    for p in (2.0, 1.0, math.inf, 3.0):
        stats = OPS.grad_stats([g], p)
        expected = oracle_stats([g], p)
        if n_repeat == 1 or g.dtype == torch.float64 or math.isinf(p):
            assert_stats_match(stats, expected, [g], f"p={p}")
        else:
            assert torch.equal(stats[2], expected[2]) and torch.equal(stats[1], expected[1].float())
            assert_rel_close(stats[0], expected[0].float(), DESIGN_RTOL, f"p={p}")
            assert_rel_close(stats[3], expected[3].float(), DESIGN_RTOL, f"p={p}")
        exact = float(expected.total_norm)
        if exact < torch.finfo(stats[3].dtype).max:  # finite unless the result dtype overflows
            assert math.isfinite(float(stats[3])) and float(stats[3]) > 0, (p, stats)
        else:
            assert float(stats[3]) == math.inf
    hand_norm = None if norm is None else norm * math.sqrt(n_repeat)
    if hand_norm is not None and hand_norm < torch.finfo(result_dtype([g])).max:
        hand = torch.tensor(hand_norm, dtype=torch.float64)
        norm2 = OPS.grad_stats([g], 2.0)[3]
        if n_repeat == 1:
            assert_ulp_close(norm2, hand, 1, "hand value")
        else:
            assert_rel_close(norm2, hand, DESIGN_RTOL, "hand value")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("n", [64, 2048, 4096 + 64 + 5, 300_007])
def test_float32_accumulation_within_design_bound(device, dtype, p, n):
    """Constant-valued data, the float32 lanes' (partial sums') worst case: within 1e-6
    (DESIGN) of float64, reported in float32 and, beside a float64 gradient, in float64;
    aligned and one element into its storage (not 16-byte aligned)."""
    for v in (1.8972415924072266, 1.5936895608901978, 1.0 + 3 * 2.0**-23, 0.1, 3.3):
        for layout in ("contiguous", "offset"):
            g = torch.full((n + 1,), v, dtype=dtype, device=device)
            g = g[1:] if layout == "offset" else g[:n]
            norm = OPS.grad_stats([g], p)[0][0].double().cpu()
            exact = torch.linalg.vector_norm(g.cpu().double(), p)
            err = float(norm - exact)
            assert abs(err) <= DESIGN_RTOL * float(exact), (v, layout, err)
            norms, _, _, total = OPS.grad_stats([g, g[:7].double()], p)  # float64 results
            exact = oracle_stats([g.cpu(), g[:7].cpu().double()], p)
            assert_rel_close(norms[0].cpu(), exact.norms[0], DESIGN_RTOL, f"{v} {layout}")
            assert_rel_close(total.cpu(), exact.total_norm, DESIGN_RTOL, f"{v} {layout}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n", [5, 64, 64 * 33 + 7])
def test_nonfinite_counts_and_nan_propagating_max(dtype, n):
    """NaN/Inf at the first, a middle and the last position (vector loop and scalar tail)."""
    for positions, vals in [
        ([0], [math.nan]),
        ([n // 2], [math.inf]),
        ([n - 1], [-math.inf]),
        ([0, n - 1], [math.inf, math.nan]),
        ([n // 3, n // 2, n - 1], [-math.inf, 1e4, math.inf]),
    ]:
        x = torch.linspace(-1, 1, n, dtype=torch.float64)
        for i, v in zip(positions, vals):
            x[i] = v
        g = x.to(dtype)
        for p in (2.0, 1.0, math.inf, 3.0):
            grads = [g, torch.ones(3)]
            norms, max_abs, nonfinite, total = OPS.grad_stats(grads, p)
            expected = oracle_stats(grads, p)
            assert int(nonfinite[0]) == sum(not math.isfinite(v) for v in vals)
            assert int(nonfinite[1]) == 0
            assert (math.isnan(float(max_abs[0]))) == any(math.isnan(v) for v in vals)
            assert_stats_match((norms, max_abs, nonfinite, total), expected, grads, f"p={p}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern(dtype):
    """All 65,536 float16/bfloat16 bit patterns (subnormals, zeros, Inf, NaN included), each
    widened to float32 by the kernel's vector loads: statistics against the float64 oracle on
    the finite ones and on all, value clipping bit-identical to ``Tensor.clamp``."""
    every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every[torch.isfinite(every)]
    tiny = finite[finite.abs() < 2.0**-10]  # float16: the subnormals and the smallest normals
    for g in (finite, tiny, finite.flip(0), every):
        for p in (2.0, 1.0, math.inf):
            grads = [g.clone()]
            stats = OPS.grad_stats(grads, p)
            assert_stats_match(stats, oracle_stats(grads, p), grads, f"{dtype} p={p}")
    nan = torch.isnan(every)
    for bound in (2.0**-24, 1e-6, 0.5, 1.0, 3.0e38, 65504.0, math.inf):
        g = every.clone()
        run_op("clip_value", [g], 2.0, bound)
        want = every.float().clamp(-bound, bound).to(dtype)  # compared in float32, as PyTorch
        assert torch.equal(g.view(torch.int16)[~nan], want.view(torch.int16)[~nan]), bound
        assert bool(torch.isnan(g[nan]).all()), bound


_ISA_SCRIPT = """
import math, sys, torch, gradstab
ops = torch.ops.gradstab
gen = torch.Generator().manual_seed(0)
out = [gradstab.backend_info()["cpu"]["reason"]]
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n in (5, 16, 17, 511, 512, 513, 4133, 70001, 300000):
        x = (torch.randn(n, generator=gen) * torch.logspace(-3, 3, n)).to(dtype)
        for p in (2.0, 1.0, math.inf):
            g = [x.clone()]
            out.append(ops.clip_norm_per_layer(g, torch.tensor(1e-3, dtype=torch.float64), p, 1e-6))
            out.append(g[0])
        if n > 20:
            x[3], x[n // 2] = math.nan, -math.inf
        out.append(ops.grad_stats([x], 2.0))
torch.save(out, sys.argv[1])
"""


def test_isa_levels_give_bit_identical_results(tmp_path):
    """The 256-bit loop of the x86-64-v3/v4 reductions against the 128-bit baseline loop, run
    in a subprocess with ``GRADSTAB_CPU_ISA=baseline``: per-layer clipped gradients (their
    coefficients carry the float32 lane sums, so a lane that summed other elements shows) and
    statistics, bit for bit."""
    if "C++ kernel" not in gradstab.backend_info()["cpu"]["reason"]:
        pytest.skip("needs the C++ kernel")
    outs = {}
    for level in ("native", "baseline"):
        env = child_env()
        env.pop("GRADSTAB_CPU_ISA", None)
        if level == "baseline":
            env["GRADSTAB_CPU_ISA"] = "baseline"
        path = tmp_path / f"{level}.pt"
        subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, cwd=tmp_path, check=True
        )
        outs[level] = torch.load(path)
    native, baseline = outs["native"], outs["baseline"]
    assert "baseline" in baseline[0], baseline[0]
    if "baseline" in native[0]:
        pytest.skip(f"this CPU has no wider level to compare ({native[0]})")
    assert len(native) == len(baseline)

    def bits(t):
        t = t.reshape(-1)
        if not t.dtype.is_floating_point:
            return t
        return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

    for k, (a, b) in enumerate(zip(native[1:], baseline[1:])):
        for x, y in zip(a, b) if isinstance(a, tuple | list) else [(a, b)]:
            assert torch.equal(bits(x), bits(y)), f"result {k} differs between ISA levels"


# -------------------------------------------------------- C++ kernel vs reference kernel --


@pytest.mark.usefixtures("cpp_kernel")
@settings(max_examples=40)
@given(
    specs=grad_lists(min_size=0, max_size=5, big=True),
    p=st.sampled_from(NORM_TYPES),
    op=st.sampled_from(OP_NAMES),
    bound_exp=st.integers(-8, 8),
)
# A float16 Inf clamped at a bound >= 65520 (Inf in float16) was counted twice (issue 16):
# in a vectorised block, and in the scalar tail.
@example(
    specs=[GradSpec((40,), torch.float16, special="inf", seed=3)],
    p=2.0,
    op="clip_value",
    bound_exp=5,
)
@example(
    specs=[GradSpec((3,), torch.float16, special="inf", seed=3)],
    p=1.0,
    op="clip_value",
    bound_exp=6,
)
def test_cpp_matches_reference(specs, p, op, bound_exp):
    bound = 10.0**bound_exp
    g_cpp, g_ref = make_grads(specs), make_grads(specs)
    torch.set_num_threads(2)  # the C++ kernel's parallel passes (restored by one_thread)
    out_cpp = run_op(op, g_cpp, p, bound)
    torch.set_num_threads(1)
    out_ref = run_op(op, g_ref, p, bound, impl="reference")
    # reference statistics are exact float64 rounded once: the oracle for the C++ ones
    assert_stats_match(out_cpp, out_ref, g_cpp, f"{op} p={p}")
    assert torch.equal(out_cpp[2], out_ref[2])
    assert_bitwise_equal(out_cpp[1], out_ref[1], "max_abs")
    if op in {"clip_value", "grad_stats"}:
        for i, (a, b) in enumerate(zip(g_cpp, g_ref)):
            assert_bitwise_equal(a, b, f"{op} grad {i}")
    else:
        rtol = FP64_RTOL if all(g.dtype == torch.float64 for g in g_cpp) else FP32_ACCUM_RTOL
        assert_grads_match(g_cpp, g_ref, rtol, op)
    for a, spec in zip(g_cpp, specs):
        assert a.stride() == make_grad(spec).stride()


# ---------------------------------------------------------------------- determinism --


def _determinism_grads():
    """Over the serial threshold and several 65,536-element chunks; every dtype, odd layouts."""
    specs = [
        GradSpec((70_001,), torch.float32, scale_exp=0, seed=1),
        GradSpec((200, 400), torch.bfloat16, "transposed", scale_exp=-2, seed=2),
        GradSpec((66_000,), torch.float64, scale_exp=3, seed=3),
        GradSpec((3, 5, 7, 9), torch.float16, "channels_last", scale_exp=-1, seed=4),
        GradSpec((130_000,), torch.float32, "strided", scale_exp=1, seed=5),
        GradSpec((0, 4), torch.float32, seed=6),
    ]
    return make_grads(specs)


@pytest.mark.parametrize("op", OP_NAMES)
@pytest.mark.parametrize("p", [2.0, 1.0, math.inf, 2.5])
def test_bit_identical_run_to_run_and_across_thread_counts(op, p, num_threads):
    outs = []
    for threads in (1, 2, 2, 1):
        torch.set_num_threads(threads)
        grads = _determinism_grads()
        stats = run_op(op, grads, p, 0.5 if op == "clip_value" else 10.0)
        outs.append((stats, grads))
    (s0, g0), rest = outs[0], outs[1:]
    for s, g in rest:
        for a, b in zip(s, s0):
            assert_bitwise_equal(a, b, f"{op} stats")
        for a, b in zip(g, g0):
            assert_bitwise_equal(a, b, f"{op} grads")


# ------------------------------------------------- "a coefficient of 1 writes nothing" --


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_healthy_step_keeps_memory_and_bits(impl):
    """Coefficient 1 (and nothing beyond the value bound): same storage, same bits, same
    strides; strided gradients' gaps are untouched (the write-protected-memory version of
    this test, which also catches value-preserving writes, follows)."""
    specs = [
        GradSpec((300,), torch.float32, seed=1),
        GradSpec((20, 30), torch.float16, "transposed", seed=2),
        GradSpec((40, 3), torch.bfloat16, "strided", seed=3),
        GradSpec((2, 3, 4, 5), torch.float64, "channels_last", seed=4),
        GradSpec((0,), torch.float32, seed=5),
    ]
    for op in OP_NAMES:
        grads = make_grads(specs)
        strided_base = grads[2]._base
        base_before = strided_base.clone()
        ptrs = [g.data_ptr() for g in grads]
        before = clone_grads(grads)
        run_op(op, grads, 2.0, 1e6, impl)
        for g, b, ptr in zip(grads, before, ptrs):
            assert g.data_ptr() == ptr and g.stride() == b.stride()
            assert_bitwise_equal(g, b, op)
        assert_bitwise_equal(strided_base, base_before, f"{op}: strided gradient's storage")


@pytest.mark.parametrize("impl", ["op", "reference"])
def test_clipping_strided_grad_leaves_gaps_alone(impl):
    for op in ("clip_norm", "clip_norm_per_layer", "clip_value"):
        g = make_grad(GradSpec((50, 7), torch.float32, "strided", scale_exp=2, seed=9))
        gaps = g._base[1::2].clone()
        run_op(op, [g], 2.0, 0.5, impl)
        assert_bitwise_equal(g._base[1::2], gaps, f"{op}: gap elements")
        assert float(g.abs().max()) < 100


# ------------------------------------------ gradients that share memory (views, duplicates) --


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value"])
def test_expanded_grad_untouched_when_nothing_to_write(impl, op):
    base = torch.tensor([3.0, -4.0])
    other = torch.randn(5)
    grads = [other, base.expand(3, 2)]
    before = clone_grads(grads)
    run_op(op, grads, 2.0, 1e3, impl)
    assert_bitwise_equal(base, torch.tensor([3.0, -4.0]))
    assert_bitwise_equal(other, before[0])


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value"])
def test_expanded_grad_that_must_change_is_refused_before_any_write(impl, op):
    """An expanded view cannot be written in place (PyTorch's own in-place ops refuse it):
    a clip that must change it raises ValueError naming it, and changes nothing at all."""
    base = torch.tensor([3.0, -4.0])
    big = torch.full((100_000,), 2.0)  # large: the C++ kernel scales it in parallel
    small = torch.full((10,), 2.0)  # small: per-layer mode scales it during the reduction
    grads = [big, small, base.expand(3, 2)]
    before = clone_grads(grads)
    what = "clamped" if op == "clip_value" else "scaled"
    with pytest.raises(ValueError, match=rf"gradient 2 of 3 \(shape \[3, 2\]\) must be {what}"):
        run_op(op, grads, 2.0, 0.5, impl)
    assert_bitwise_equal(base, torch.tensor([3.0, -4.0]))
    for g, b in zip(grads[:2], before[:2]):
        assert_bitwise_equal(g, b, "no gradient may change")


@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value"])
@pytest.mark.parametrize("n", [10, 300_000])
def test_duplicate_grad_is_processed_twice_in_order_like_pytorch(op, n, num_threads):
    """The same gradient passed twice: written twice, in list order, as PyTorch's loops do
    (clip_grad_norm_ scales it by coef**2), deterministically: the parallel passes used to
    race on it (some elements scaled once, some twice, varying run to run)."""
    torch.set_num_threads(2)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 3
    g_cpp, g_ref = x.clone(), x.clone()
    list_cpp = [g_cpp, x[:5].clone(), g_cpp]
    out_cpp = run_op(op, list_cpp, 2.0, 0.5)
    out_ref = run_op(op, [g_ref, x[:5].clone(), g_ref], 2.0, 0.5, impl="reference")
    assert_stats_match(out_cpp, out_ref, list_cpp, op)
    assert_ulp_close(g_cpp, g_ref, 2, op)  # two roundings, each may differ by one ulp
    if op == "clip_norm":
        p = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        q = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        p.grad, q.grad = x.double(), x[:5].double()
        torch.nn.utils.clip_grad_norm_([p, q, p], 0.5, foreach=False)
        assert_ulp_close(g_cpp, p.grad, 2, "vs torch.nn.utils.clip_grad_norm_")
    for _ in range(2):  # run to run
        again = x.clone()
        run_op(op, [again, x[:5].clone(), again], 2.0, 0.5)
        assert_bitwise_equal(again, g_cpp, f"{op} rerun")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", kc.CLIP_OPS)
def test_overlapping_views_match_reference(device, op):
    """Overlapping dense views, a strided view across them (processed on a copy, re-read
    before its turn) and a transposed slice: the reference kernel on the same views of a CPU
    copy of the buffer is the oracle (entry statistics, writes in list order)."""

    def views(buf):
        return [buf[:70_000], buf[60_000:], buf[::3], buf.view(1000, 130).t()[2:50:5]]

    buf = torch.linspace(-5, 5, 130_000, dtype=torch.float32, device=device)
    buf_ref = buf.cpu().clone()
    g, g_ref = views(buf), views(buf_ref)
    got = run_op(op, g, 2.0, 0.5)
    want = run_op(op, g_ref, 2.0, 0.5, impl="reference")
    assert_stats_match(tuple(t.cpu() for t in got), want, g_ref, op)
    # an element lies in up to 4 of the views: up to 4 roundings, each may differ by one ulp
    assert_ulp_close(buf.cpu(), buf_ref, 4, f"{op}: shared buffer")


@pytest.mark.parametrize("device", DEVICES)
def test_interleaved_views_and_same_storage_disjoint_views_are_fine(device):
    """Interleaved views of one buffer (no element shared, written conservatively one at a
    time) clip as the whole buffer does, against the reference and the op itself; adjacent
    views of one storage clip bit for bit as separate tensors."""
    buf = torch.arange(1.0, 200_001.0, device=device)
    whole, ref = buf.clone(), buf.cpu().clone()
    run_op("clip_norm", [buf[::2], buf[1::2]], 2.0, 1.0)  # conservative path
    run_op("clip_norm", [ref], 2.0, 1.0, impl="reference")
    run_op("clip_norm", [whole], 2.0, 1.0)
    assert_ulp_close(buf.cpu(), ref, 1, "against the reference on the whole buffer")
    assert_ulp_close(buf.cpu(), whole.cpu().double(), 1, "against the op on the whole buffer")
    a = torch.arange(1.0, 20_001.0, device=device)
    b = a.clone()
    run_op("clip_norm_per_layer", [a[:10_000], a[10_000:]], 2.0, 1.0)  # adjacent
    run_op("clip_norm_per_layer", [b[:10_000].clone(), b[10_000:].clone()], 2.0, 1.0)
    c = b.clone()
    run_op("clip_norm_per_layer", [c[:10_000], c[10_000:]], 2.0, 1.0)
    assert_bitwise_equal(a.cpu(), c.cpu(), "adjacent views")


# ----------------------------------------------------------------------------- opcheck --


def _opcheck_samples():
    """Fresh argument tuples per op: mixed dtypes, non-contiguous, zero-size, NaN."""

    def grads(seed):
        return make_grads(
            [
                GradSpec((7, 5), torch.float32, "transposed", scale_exp=1, seed=seed),
                GradSpec((33,), torch.bfloat16, "strided", seed=seed + 1),
                GradSpec((2, 3, 4, 5), torch.float16, "channels_last", seed=seed + 2),
                GradSpec((0, 3), torch.float32, seed=seed + 3),
            ]
        )

    yield "grad_stats", lambda: (grads(1), 2.0)
    yield "grad_stats", lambda: ([*grads(2), torch.randn(9, dtype=torch.float64)], math.inf)
    yield "grad_stats", lambda: ([], 2.0)
    yield "clip_norm", lambda: (grads(3), f64(0.5), 2.0, EPS, False)
    yield "clip_norm", lambda: (grads(4), f64(1e9), 1.0, EPS, False)
    # (no NaN samples: opcheck compares eager and traced outputs with NaN != NaN)
    yield (
        "clip_norm",
        lambda: ([torch.tensor([1.0, -2.0]), torch.ones(3, 3)], f64(0.5), 3.0, EPS, False),
    )
    yield "clip_norm_per_layer", lambda: (grads(5), f64(0.5), 2.0, EPS)
    yield "clip_norm_per_layer", lambda: (grads(6), f64(2.0), math.inf, EPS)
    yield "clip_value", lambda: (grads(7), f64(0.5), 2.0)
    yield "clip_value", lambda: (grads(8), f64(1e9), 1.5)


@pytest.mark.parametrize(
    ("name", "make_args"), list(_opcheck_samples()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_opcheck(name, make_args):
    torch.library.opcheck(getattr(OPS, name).default, make_args())


_READ_ONLY_SCRIPT = r"""
import ctypes, math, mmap, sys
import torch
import gradstab
from gradstab import reference

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

def read_only(values):
    # a tensor over write-protected pages: any store into it kills the process (SIGSEGV)
    data = values.contiguous().view(torch.uint8).numpy().tobytes()
    size = (len(data) // mmap.PAGESIZE + 1) * mmap.PAGESIZE
    addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    ctypes.memmove(addr, data, len(data))
    assert libc.mprotect(addr, size, mmap.PROT_READ) == 0
    buf = (ctypes.c_char * len(data)).from_address(addr)
    return torch.frombuffer(buf, dtype=values.dtype).view(values.shape)

gen = torch.Generator().manual_seed(0)
def grads():
    big = read_only(torch.randn(200_000, generator=gen))  # parallel chunks
    base = read_only(torch.randn(64, 33, generator=gen).to(torch.bfloat16))
    return [
        big,
        read_only(torch.randn(300, generator=gen).half()),
        base.t(),  # transposed (dense, read in place)
        base[::2, 1:],  # strided: read through a copy
        read_only(torch.randn(7, dtype=torch.float64, generator=gen)).expand(5, 7),
        big[:1000],  # shares memory with the first: the serial write path
        read_only(torch.tensor([math.nan, 1.0])),  # NaN: nothing beyond the value bound
    ]

f64 = lambda x: torch.tensor(x, dtype=torch.float64)
for impl in (torch.ops.gradstab, reference):
    for p in (2.0, 1.0, math.inf, 3.0):
        g = grads()
        impl.grad_stats(g, p)
        impl.clip_value(g, f64(1e6), p)
        impl.clip_norm_per_layer(g[:-1], f64(1e9), p, 1e-6)
        impl.clip_norm(g[:-1], f64(1e9), p, 1e-6, False)
g = grads()[:-1]
params = []
for x in g:
    q = torch.nn.Parameter(torch.zeros(x.shape, dtype=x.dtype))
    q.grad = x
    params.append(q)
gradstab.grad_stats(params)
gradstab.clip_grad_norm_(params, 1e9)
gradstab.clip_grad_norm_per_layer_(params, 1e9)
gradstab.clip_grad_value_(params, 1e6)
print("no write")
"""


def test_healthy_step_writes_nothing_to_read_only_memory(tmp_path):
    """With every coefficient 1 (and nothing beyond the value bound), no gradient is written
    at all, not even with its own value: the gradients live in write-protected pages, where
    any store kills the process. All four ops, C++ and reference, and the public functions
    (the CPU shortcut); dense, transposed, strided, expanded and memory-sharing gradients."""
    script = tmp_path / "read_only.py"
    script.write_text(_READ_ONLY_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)],
        check=False,
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=120,
    )
    assert proc.returncode == 0 and "no write" in proc.stdout, (
        f"exit status {proc.returncode} (-11: a write hit protected memory)\n"
        f"{proc.stdout}\n{proc.stderr}"
    )


# ------------------------------- the kernels' case tables (kernel_cases), on every device --
# Sizes around the vector and work-unit boundaries, every dtype and layout of the kernels'
# case tables (gradstab_testing.kernel_cases, shared with test_cuda_sim.py); statistics
# against the reference kernel on CPU copies and float64 norms, clipped gradients bit for
# bit against the documented arithmetic (kernel_cases.scaled) where the coefficient is exact.


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", kc.FLOAT_DTYPES)
@pytest.mark.parametrize("layout", kc.LAYOUTS)
def test_grad_stats_matches_reference_and_float64(device, dtype, layout):
    gen = kc.generator(1, device)
    grads = [kc.make_grad(n, dtype, layout, gen) for n in kc.SIZES]
    got = OPS.grad_stats(grads, 2.0)
    want = reference.grad_stats(kc.cpu_copies(grads), 2.0)
    rtol = kc.RTOL64 if dtype == torch.float64 else kc.RTOL32
    kc.assert_stats(got, want, rtol)
    oracle = kc.oracle_norms(grads, 2.0)
    torch.testing.assert_close(got[0].cpu().double(), oracle, rtol=rtol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, math.inf])
def test_norm_types_on_a_mixed_dtype_list(device, p):
    gen = kc.generator(2, device)
    grads = [
        kc.make_grad(n, dtype, layout, gen, scale=0.01 * (i + 1))
        for i, (n, dtype, layout) in enumerate(kc.MIXED_SPECS)
    ]
    got = OPS.grad_stats(grads, p)
    want = reference.grad_stats(kc.cpu_copies(grads), p)
    # p not in {1, 2, inf}: |x|^p by pow per element, in double.
    kc.assert_stats(got, want, kc.RTOL32 if p in (1.0, 2.0, math.inf) else 2e-6)
    torch.testing.assert_close(got[0].cpu().double(), kc.oracle_norms(grads, p), rtol=2e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_in_the_list_gives_float64_results(device):
    gen = kc.generator(3, device)
    grads = [
        kc.make_grad(5000, torch.bfloat16, "contiguous", gen),
        kc.make_grad(3, torch.float64, "offset", gen),
    ]
    got = OPS.grad_stats(grads, 2.0)
    assert all(t.dtype == torch.float64 for t in (got[0], got[1], got[3]))
    assert got[2].dtype == torch.int64
    kc.assert_stats(got, reference.grad_stats(kc.cpu_copies(grads), 2.0), kc.RTOL32)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_list_with_device_bound(device):
    norms, max_abs, nonfinite, total = OPS.clip_norm([], kc.bound(1.0, device), 2.0, EPS, False)
    assert norms.numel() == max_abs.numel() == nonfinite.numel() == 0
    assert float(total) == 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_float32_norm_neither_overflows_nor_underflows(device):
    big = torch.full((5000,), 3e30, device=device)  # squares overflow float32
    tiny = torch.full((7000,), 1e-30, device=device)  # squares underflow float32
    huge = torch.full((3,), 3e38, device=device)  # the norm itself exceeds float32: inf
    norms, _, nonfinite, _ = OPS.grad_stats([big, tiny, huge], 2.0)
    norms = norms.cpu().double()
    assert math.isclose(norms[0], 3e30 * math.sqrt(5000), rel_tol=1e-6)
    assert math.isclose(norms[1], 1e-30 * math.sqrt(7000), rel_tol=1e-6)
    assert math.isinf(norms[2]) and int(nonfinite.sum()) == 0
    pair = torch.tensor([1e30, 1e30], device=device)
    assert math.isclose(float(OPS.grad_stats([pair], 2.0)[3]), 1.4142135e30, rel_tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_float64_overflow_and_underflow_are_rescued(device):
    gen = kc.generator(5, device)
    grads = [
        torch.full((5000,), 1e200, dtype=torch.float64, device=device),
        torch.full((3000,), 1e-200, dtype=torch.float64, device=device),
        kc.make_grad(4097, torch.float32, "contiguous", gen),
    ]
    got = OPS.grad_stats(grads, 2.0)
    kc.assert_stats(got, reference.grad_stats(kc.cpu_copies(grads), 2.0), kc.RTOL32)
    assert math.isclose(float(got[0][0]), 1e200 * math.sqrt(5000), rel_tol=1e-12)
    assert math.isclose(float(got[0][1]), 1e-200 * math.sqrt(3000), rel_tol=1e-12)
    # a p-norm whose p-powers overflow double is rescued the same way
    x = torch.full((1000,), 1e10, device=device)
    assert math.isclose(float(OPS.grad_stats([x], 40.0)[3]), 1e10 * 1000 ** (1 / 40), rel_tol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", kc.FLOAT_DTYPES)
def test_nonfinite_counts_and_nan_max(device, dtype):
    gen = kc.generator(6, device)
    a = kc.make_grad(70000, dtype, "offset", gen)
    idx = torch.randint(0, 70000, (37,), generator=torch.Generator().manual_seed(6))
    a[idx[:20]] = float("nan")
    a[idx[20:30]] = float("inf")
    a[idx[30:]] = -float("inf")
    b = kc.make_grad(9000, dtype, "contiguous", gen)
    b[8999] = float("inf")
    c = kc.make_grad(100, dtype, "contiguous", gen)
    grads = [a, b, c]
    got = OPS.grad_stats(grads, 2.0)
    want = reference.grad_stats(kc.cpu_copies(grads), 2.0)
    kc.assert_stats(got, want, kc.RTOL64 if dtype == torch.float64 else kc.RTOL32)
    n_nonfinite = int((~torch.isfinite(a.cpu())).sum())
    assert got[2].tolist() == [n_nonfinite, 1, 0]
    assert math.isnan(float(got[1][0])) and math.isinf(float(got[1][1]))
    assert math.isnan(float(got[3]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [1e9, 10.0, 0.0])
def test_clip_norm_bit_exact(device, max_norm):
    grads = kc.clip_list(7, device)
    before = kc.cpu_copies(grads)
    got = OPS.clip_norm(grads, kc.bound(max_norm, device), 2.0, EPS, False)
    kc.assert_stats(got, reference.grad_stats(before, 2.0), kc.RTOL32)
    total = float(got[3])  # float64: the kernel's own total, exactly
    coef = min(1.0, max_norm / (total + EPS))
    for g, b in zip(grads, before):
        want = b if coef >= 1.0 else kc.scaled(b, coef)
        assert torch.equal(kc.bits(g), kc.bits(want)), (g.dtype, g.shape)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("max_norm", [0.5, 1e-30])
def test_float32_is_scaled_in_double_only_where_the_coefficient_is_not_a_normal_float32(
    device, impl, max_norm
):
    """float32: x * float32(coef) in float32 (PyTorch's arithmetic), but x * coef in float64,
    rounded once, where float32(coef) is subnormal: a norm of ~2e10 clipped to 1e-30 needs
    coef ~4e-41, of which float32 keeps ~16 bits."""
    g = kc.make_grad(50_000, torch.float32, "contiguous", kc.generator(9, device), scale=1e8)
    f64s = torch.ones(3, dtype=torch.float64, device=device)  # float64 results: the exact coef
    before = g.cpu().clone()
    got = run_op("clip_norm", [g, f64s], 2.0, max_norm, impl)
    coef = max_norm / (float(got[3]) + EPS)
    subnormal = coef < torch.finfo(torch.float32).tiny
    assert subnormal == (max_norm == 1e-30)
    want = kc.scaled(before, coef)
    assert torch.equal(kc.bits(g), kc.bits(want))
    in_float = before * torch.tensor(coef, dtype=torch.float64).float()
    in_double = (before.double() * coef).float()
    assert not torch.equal(in_float, in_double)  # the two arithmetics differ on these values
    assert torch.equal(want, in_double if subnormal else in_float)


@pytest.mark.parametrize("device", DEVICES)
def test_clip_norm_float32_results_match_reference(device):
    gen = kc.generator(8, device)
    grads = [
        kc.make_grad(n, d, "contiguous", gen) for n in (9000, 70001) for d in kc.FLOAT_DTYPES[:3]
    ]
    ref = kc.cpu_copies(grads)
    got = OPS.clip_norm(grads, kc.bound(3.0, device), 2.0, EPS, False)
    want = reference.clip_norm(ref, torch.tensor(3.0, dtype=torch.float64), 2.0, EPS, False)
    kc.assert_stats(got, want, kc.RTOL32)
    for g, r in zip(grads, ref):
        ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 4e-7}[g.dtype]
        torch.testing.assert_close(g.cpu(), r, rtol=ulp, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_clip_norm_per_layer_bit_exact(device):
    grads = kc.clip_list(9, device, scale=0.05)
    before = kc.cpu_copies(grads)
    got = OPS.clip_norm_per_layer(grads, kc.bound(2.0, device), 2.0, EPS)
    kc.assert_stats(got, reference.grad_stats(before, 2.0), kc.RTOL32)
    for g, b, norm in zip(grads, before, got[0].tolist()):
        coef = min(1.0, 2.0 / (norm + EPS))
        want = b if coef >= 1.0 else kc.scaled(b, coef)
        assert torch.equal(kc.bits(g), kc.bits(want)), (g.dtype, g.shape)
    assert any(n > 2.0 for n in got[0].tolist()) and any(0 < n < 2.0 for n in got[0].tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_per_layer_bit_exact(device):
    grads = kc.clip_list(33, device)
    before = kc.cpu_copies(grads)
    got = OPS.normalize_per_layer(grads, kc.bound(0.7, device), 2.0, EPS)
    kc.assert_stats(got, reference.grad_stats(before, 2.0), kc.RTOL32)
    for g, b, norm in zip(grads, before, got[0].tolist()):
        coef = 0.7 / (norm + EPS)  # up or down: no min(1, .)
        want = b if coef == 1.0 else kc.scaled(b, coef)
        assert torch.equal(kc.bits(g), kc.bits(want)), (g.dtype, g.shape)


@pytest.mark.parametrize("device", DEVICES)
def test_healthy_clip_leaves_every_bit_alone(device):
    grads = kc.clip_list(11, device)
    grads[2][0] = -0.0
    before = [kc.bits(g) for g in grads]
    OPS.clip_norm(grads, kc.bound(1e30, device), 2.0, EPS, False)
    OPS.clip_norm_per_layer(grads, kc.bound(1e30, device), 2.0, EPS)
    OPS.clip_value(grads, kc.bound(1e30, device), 2.0)
    assert all(torch.equal(kc.bits(g), b) for g, b in zip(grads, before))


@pytest.mark.parametrize("device", DEVICES)
def test_nan_gradients_give_nan_coefficient_and_nan_grads(device):
    gen = kc.generator(12, device)
    grads = [
        kc.make_grad(5000, torch.float32, "contiguous", gen),
        kc.make_grad(10, torch.bfloat16, "offset", gen),
    ]
    grads[0][3] = float("nan")
    OPS.clip_norm(grads, kc.bound(1.0, device), 2.0, EPS, False)
    assert all(bool(torch.isnan(g).all()) for g in grads)  # as torch.nn.utils.clip_grad_norm_


@pytest.mark.parametrize("device", DEVICES)
def test_strided_gradient_beyond_12_dims_is_written_back(device):
    base = kc.randn((2,) * 13 + (3,), torch.float32, kc.generator(43, device), scale=2.0)
    g = base[..., ::2]  # 14 dimensions, strided, no overlap: copied back with copy_
    before = g.cpu().clone()
    f64 = torch.zeros(1, dtype=torch.float64, device=device)  # float64 results: the exact total
    got = OPS.clip_norm([g, f64], kc.bound(0.5, device), 2.0, EPS, False)
    coef = min(1.0, 0.5 / (float(got[3]) + EPS))
    assert torch.equal(kc.bits(g), kc.bits(kc.scaled(before, coef)))
    assert torch.equal(kc.bits(base[..., 1]), kc.bits(base.cpu()[..., 1]))  # gaps untouched


@pytest.mark.parametrize("device", DEVICES)
def test_clip_value_returns_statistics_of_the_gradients_on_entry(device):
    """Infs are counted (and max-abs is inf) before the clamp replaces them; a float64 norm
    that needs the max-abs rescue, and a p-norm, are computed from the unclamped values."""
    fused = torch.tensor([math.inf, 1.0, -math.inf, 0.5], device=device)  # float32, p = 2: fused
    norms, max_abs, nonfinite, total = OPS.clip_value([fused], kc.bound(1.0, device), 2.0)
    assert nonfinite.tolist() == [2] and math.isinf(float(max_abs[0]))
    assert math.isinf(float(norms[0])) and math.isinf(float(total))
    assert fused.tolist() == [1.0, 1.0, -1.0, 0.5]
    g64 = torch.full((3000,), 1e200, dtype=torch.float64, device=device)  # deferred clamp
    before = kc.cpu_copies([g64])
    norms, max_abs, _, _ = OPS.clip_value([g64], kc.bound(1.0, device), 2.0)
    assert math.isclose(float(norms[0]), 1e200 * math.sqrt(3000), rel_tol=1e-12)
    assert float(max_abs[0]) == 1e200 and bool((g64 == 1.0).all())
    kc.assert_stats(
        (norms, max_abs, torch.zeros(1, dtype=torch.int64), norms[0]),
        (*reference.grad_stats(before, 2.0)[:3], reference.grad_stats(before, 2.0)[0][0]),
        kc.RTOL64,
    )
    big = torch.full((1000,), 1e10, device=device)  # |x|^40 overflows double: rescued
    got = OPS.clip_value(
        [big, torch.tensor([math.inf], device=device)], kc.bound(1.0, device), 40.0
    )
    assert math.isclose(float(got[0][0]), 1e10 * 1000 ** (1 / 40), rel_tol=1e-6)
    assert got[2].tolist() == [0, 1] and bool((big == 1.0).all())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_on_the_kernel_cases(device):
    gen = kc.generator(28, device)
    grads = [
        kc.make_grad(5000, torch.float32, "contiguous", gen),
        kc.make_grad(33, torch.bfloat16, "offset", gen),
    ]
    torch.library.opcheck(OPS.grad_stats.default, (grads, 2.0))
    torch.library.opcheck(OPS.clip_norm.default, (grads, kc.bound(0.5, device), 2.0, EPS, False))
    torch.library.opcheck(OPS.clip_norm_per_layer.default, (grads, kc.bound(0.5, device), 2.0, EPS))
    torch.library.opcheck(OPS.clip_value.default, (grads, kc.bound(0.5, device), 2.0))
    torch.library.opcheck(OPS.normalize_per_layer.default, (grads, kc.bound(0.5, device), 2.0, EPS))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_float64", [False, True])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_clip_value_bit_exact_and_prior_stats(device, with_float64, p):
    grads = kc.clip_list(10, device)
    if not with_float64:
        grads = grads[:-1]
    grads[0][5] = float("nan")
    grads[1][7] = float("inf")
    before = kc.cpu_copies(grads)
    got = OPS.clip_value(grads, kc.bound(1.5, device), p)
    # statistics of the gradients as they were (the float64 / p-norm path clamps afterwards)
    kc.assert_stats(got, reference.grad_stats(before, p), 2e-6)
    ref = kc.clones(before)
    reference.clip_value(ref, torch.tensor(1.5, dtype=torch.float64), p)
    for g, b, r in zip(grads, before, ref):
        vt = torch.tensor(1.5, dtype=torch.float64).to(b.dtype)
        assert torch.equal(kc.bits(g), kc.bits(torch.clamp(b, min=-vt, max=vt)))  # NaN kept
        assert torch.equal(kc.bits(g), kc.bits(r))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(
            st.integers(0, 20_000),
            st.sampled_from(kc.FLOAT_DTYPES),
            st.sampled_from(["contiguous", "offset", "offset3", "strided", "transposed"]),
            st.sampled_from([1e-3, 1.0, 1e3]),
        ),
        min_size=1,
        max_size=12,
    ),
    p=st.sampled_from([1.0, 2.0, math.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_lists_match_reference(device, specs, p, seed):
    gen = kc.generator(seed, device)
    grads = [kc.make_grad(n, d, layout, gen, scale) for n, d, layout, scale in specs]
    rtol = kc.rtol_of(grads)
    kc.assert_stats(OPS.grad_stats(grads, p), reference.grad_stats(kc.cpu_copies(grads), p), rtol)
    before = kc.cpu_copies(grads)
    got = OPS.clip_norm_per_layer(grads, kc.bound(1.0, device), p, EPS)
    kc.assert_stats(got, reference.grad_stats(before, p), rtol)
    if kc.result_dtype(grads) == torch.float64:
        for g, b, norm in zip(grads, before, got[0].tolist()):
            coef = min(1.0, 1.0 / (norm + EPS))
            assert torch.equal(kc.bits(g), kc.bits(b if coef >= 1.0 else kc.scaled(b, coef)))
