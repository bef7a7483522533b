"""GPU tests of the fused CUDA kernels (csrc/cuda); every test is skipped without CUDA.

The ops (``torch.ops.gradstab.*`` through the dispatcher, and the direct entry point
``gradstab._C.cuda_fast_path``) are checked against independent oracles: the pure-PyTorch
reference kernels (:mod:`gradstab.reference`) run on CPU copies, float64 norms from
``torch.linalg.vector_norm``, the C++ CPU kernel, and hand-computed cases. Clipped gradients are
compared bit for bit with the documented arithmetic (float32/float64: multiply by the float64
coefficient and round once; float16/bfloat16: multiply in float32) wherever the coefficient is
known exactly (a list holding a float64 gradient returns float64 results).

Run on a GPU machine with ``benchmarks/gpu/run_gpu_checks.sh`` (build, these tests, the
compute-sanitizer runs, the benchmark) or ``python -m pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing import kernel_cases
from gradstab_testing.kernel_cases import (
    AGC_SHAPES,
    CLIP_OPS,
    CLIP_SPECS,
    EPS,
    FLOAT_DTYPES,
    MIXED_SPECS,
    RTOL32,
    RTOL64,
    SIZES,
)
from gradstab_testing.oracles import (
    DESIGN_RTOL,
    assert_bitwise_equal,
    assert_grads_match,
    assert_rel_close,
    assert_stats_match,
    assert_ulp_close,
    oracle_stats,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradstab
from gradstab import reference
from gradstab._extension import has_kernel

#: Every GPU test carries this mark; the tests of the benchmark's CUDA additions at the end run
#: anywhere.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

DEV = "cuda"
OPS = torch.ops.gradstab


def _ext():
    return gradstab._extension._C


@pytest.fixture(autouse=True)
def _cuda_kernel():
    if not torch.cuda.is_available():
        yield
        return
    if not has_kernel("cuda"):
        pytest.fail(
            "gradstab._C has no CUDA kernel: build it on this machine with "
            "`TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .`"
        )
    yield
    _ext()._cuda_set_max_blocks(0)
    torch.cuda.set_sync_debug_mode(0)


# ------------------------------------------------------------------------------- inputs --


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device=DEV).manual_seed(seed)


# The case tables and oracles are kernel_cases' (shared with test_cuda_sim.py, which runs the
# same kernels on the CPU execution harness); these names keep this file's spelling.
_randn = kernel_cases.randn
_make = kernel_cases.make_grad
_cpu = kernel_cases.cpu_copies
_rd = kernel_cases.result_dtype
_rtol = kernel_cases.rtol_of
_assert_stats = kernel_cases.assert_stats
_oracle_norms = kernel_cases.oracle_norms
_scaled = kernel_cases.scaled
_bits = kernel_cases.bits
_units = kernel_cases.units
_row_norms = kernel_cases.row_norms
_agc_oracle = kernel_cases.agc_oracle
_agc_rtol = kernel_cases.agc_rtol
_assert_agc = kernel_cases.assert_agc
_assert_agc_stats = kernel_cases.assert_agc_stats
_agc_clipped_rows = kernel_cases.agc_clipped_rows


def _clip_list(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Every dtype and layout, plus a float64 gradient (float64 results: exact coefficients)."""
    return kernel_cases.make_list(CLIP_SPECS, _gen(seed), scale)


def _agc_place(x: torch.Tensor, dtype: torch.dtype, layout: str) -> torch.Tensor:
    return kernel_cases.agc_place(x, dtype, layout, DEV)


def _agc_pairs(seed: int, gdtype, wdtype, layout="contiguous", shapes=AGC_SHAPES):
    return kernel_cases.agc_pairs(seed, gdtype, wdtype, layout, shapes, device=DEV)


def _clone(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.clone() for g in grads]


def _bound(v: float) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float64, device=DEV)


# ----------------------------------------------------------------------------- basics --


@gpu
def test_cuda_kernel_registered_and_described():
    info = gradstab.backend_info()["cuda"]
    assert info["kernel"] == "cuda", info
    for op in (
        "grad_stats",
        "clip_norm",
        "clip_norm_per_layer",
        "clip_value",
        "normalize_per_layer",
    ):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"gradstab::{op}", "CUDA"), op
    build = _ext().build_info()
    assert build["cuda"] is True
    assert "CUDA runtime" in build["cuda_kernel"]


@gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "offset3", "strided", "transposed"])
def test_grad_stats_matches_reference_and_float64(dtype, layout):
    gen = _gen(1)
    grads = [_make(n, dtype, layout, gen) for n in SIZES]
    got = OPS.grad_stats(grads, 2.0)
    want = reference.grad_stats(_cpu(grads), 2.0)
    rtol = RTOL64 if dtype == torch.float64 else RTOL32
    _assert_stats(got, want, rtol)
    oracle = _oracle_norms(grads, 2.0)
    torch.testing.assert_close(got[0].cpu().double(), oracle, rtol=rtol, atol=0)


@gpu
@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 0.5, math.inf])
def test_norm_types_on_a_mixed_dtype_list(p):
    gen = _gen(2)
    grads = [
        _make(n, dtype, layout, gen, scale=0.01 * (i + 1))
        for i, (n, dtype, layout) in enumerate(MIXED_SPECS)
    ]
    got = OPS.grad_stats(grads, p)
    want = reference.grad_stats(_cpu(grads), p)
    # p not in {1, 2, inf}: |x|^p by pow per element, in double.
    _assert_stats(got, want, RTOL32 if p in (1.0, 2.0, math.inf) else 2e-6)
    torch.testing.assert_close(got[0].cpu().double(), _oracle_norms(grads, p), rtol=2e-6, atol=0)


@gpu
def test_float64_in_the_list_gives_float64_results():
    gen = _gen(3)
    grads = [_make(5000, torch.bfloat16, "contiguous", gen), _make(3, torch.float64, "offset", gen)]
    got = OPS.grad_stats(grads, 2.0)
    assert all(t.dtype == torch.float64 for t in (got[0], got[1], got[3]))
    assert got[2].dtype == torch.int64
    _assert_stats(got, reference.grad_stats(_cpu(grads), 2.0), RTOL32)


@gpu
def test_agrees_with_the_cpu_kernel():
    if not has_kernel("cpu"):
        pytest.skip("no C++ CPU kernel in this build")
    gen = _gen(4)
    grads = [_make(n, d, "contiguous", gen) for d in FLOAT_DTYPES for n in (3, 4097, 70000)]
    got = OPS.grad_stats(grads, 2.0)
    cpu = OPS.grad_stats(_cpu(grads), 2.0)  # the CPU kernel, same contract
    _assert_stats(got, cpu, RTOL32)  # both within the contract of the float64 norm


@gpu
def test_empty_list_with_device_bound():
    norms, max_abs, nonfinite, total = OPS.clip_norm([], _bound(1.0), 2.0, EPS, False)
    assert norms.numel() == max_abs.numel() == nonfinite.numel() == 0
    assert float(total) == 0.0


# ---------------------------------------------------------------- extremes, non-finite --


@gpu
def test_float32_norm_neither_overflows_nor_underflows():
    big = torch.full((5000,), 3e30, device=DEV)  # squares overflow float32
    tiny = torch.full((7000,), 1e-30, device=DEV)  # squares underflow float32
    huge = torch.full((3,), 3e38, device=DEV)  # the norm itself exceeds float32: inf
    norms, _, nonfinite, _ = OPS.grad_stats([big, tiny, huge], 2.0)
    norms = norms.cpu().double()
    assert math.isclose(norms[0], 3e30 * math.sqrt(5000), rel_tol=1e-6)
    assert math.isclose(norms[1], 1e-30 * math.sqrt(7000), rel_tol=1e-6)
    assert math.isinf(norms[2]) and int(nonfinite.sum()) == 0
    pair = torch.tensor([1e30, 1e30], device=DEV)
    assert math.isclose(float(OPS.grad_stats([pair], 2.0)[3]), 1.4142135e30, rel_tol=1e-6)


@gpu
def test_float64_overflow_and_underflow_are_rescued():
    gen = _gen(5)
    grads = [
        torch.full((5000,), 1e200, dtype=torch.float64, device=DEV),
        torch.full((3000,), 1e-200, dtype=torch.float64, device=DEV),
        _make(4097, torch.float32, "contiguous", gen),
    ]
    got = OPS.grad_stats(grads, 2.0)
    _assert_stats(got, reference.grad_stats(_cpu(grads), 2.0), RTOL32)
    assert math.isclose(float(got[0][0]), 1e200 * math.sqrt(5000), rel_tol=1e-12)
    assert math.isclose(float(got[0][1]), 1e-200 * math.sqrt(3000), rel_tol=1e-12)
    # a p-norm whose p-powers overflow double is rescued the same way
    x = torch.full((1000,), 1e10, device=DEV)
    assert math.isclose(float(OPS.grad_stats([x], 40.0)[3]), 1e10 * 1000 ** (1 / 40), rel_tol=1e-6)


@gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nonfinite_counts_and_nan_max(dtype):
    gen = _gen(6)
    a = _make(70000, dtype, "offset", gen)
    idx = torch.randint(0, 70000, (37,), generator=torch.Generator().manual_seed(6))
    a[idx[:20]] = float("nan")
    a[idx[20:30]] = float("inf")
    a[idx[30:]] = -float("inf")
    b = _make(9000, dtype, "contiguous", gen)
    b[8999] = float("inf")
    c = _make(100, dtype, "contiguous", gen)
    grads = [a, b, c]
    got = OPS.grad_stats(grads, 2.0)
    want = reference.grad_stats(_cpu(grads), 2.0)
    _assert_stats(got, want, RTOL64 if dtype == torch.float64 else RTOL32)
    n_nonfinite = int((~torch.isfinite(a.cpu())).sum())
    assert got[2].tolist() == [n_nonfinite, 1, 0]
    assert math.isnan(float(got[1][0])) and math.isinf(float(got[1][1]))
    assert math.isnan(float(got[3]))


# -------------------------------------------------------------------------- clipping --


@gpu
@pytest.mark.parametrize("max_norm", [1e9, 10.0, 0.0])
def test_clip_norm_bit_exact(max_norm):
    grads = _clip_list(7)
    before = _cpu(grads)
    got = OPS.clip_norm(grads, _bound(max_norm), 2.0, EPS, False)
    _assert_stats(got, reference.grad_stats(before, 2.0), RTOL32)
    total = float(got[3])  # float64: the kernel's own total, exactly
    coef = min(1.0, max_norm / (total + EPS))
    for g, b in zip(grads, before):
        want = b if coef >= 1.0 else _scaled(b, coef)
        assert torch.equal(_bits(g), _bits(want)), (g.dtype, g.shape)


@gpu
def test_clip_norm_float32_results_match_reference():
    gen = _gen(8)
    grads = [_make(n, d, "contiguous", gen) for n in (9000, 70001) for d in FLOAT_DTYPES[:3]]
    ref = _cpu(grads)
    got = OPS.clip_norm(grads, _bound(3.0), 2.0, EPS, False)
    want = reference.clip_norm(ref, torch.tensor(3.0, dtype=torch.float64), 2.0, EPS, False)
    _assert_stats(got, want, RTOL32)
    for g, r in zip(grads, ref):
        ulp = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 4e-7}[g.dtype]
        torch.testing.assert_close(g.cpu(), r, rtol=ulp, atol=0)


@gpu
def test_clip_norm_per_layer_bit_exact():
    grads = _clip_list(9, scale=0.05)
    before = _cpu(grads)
    got = OPS.clip_norm_per_layer(grads, _bound(2.0), 2.0, EPS)
    _assert_stats(got, reference.grad_stats(before, 2.0), RTOL32)
    for g, b, norm in zip(grads, before, got[0].tolist()):
        coef = min(1.0, 2.0 / (norm + EPS))
        want = b if coef >= 1.0 else _scaled(b, coef)
        assert torch.equal(_bits(g), _bits(want)), (g.dtype, g.shape)
    assert any(n > 2.0 for n in got[0].tolist()) and any(0 < n < 2.0 for n in got[0].tolist())


@gpu
def test_normalize_per_layer_bit_exact():
    grads = _clip_list(33)
    before = _cpu(grads)
    got = OPS.normalize_per_layer(grads, _bound(0.7), 2.0, EPS)
    _assert_stats(got, reference.grad_stats(before, 2.0), RTOL32)
    for g, b, norm in zip(grads, before, got[0].tolist()):
        coef = 0.7 / (norm + EPS)  # up or down: no min(1, .)
        want = b if coef == 1.0 else _scaled(b, coef)
        assert torch.equal(_bits(g), _bits(want)), (g.dtype, g.shape)


@gpu
@pytest.mark.parametrize("with_float64", [False, True])
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_clip_value_bit_exact_and_prior_stats(with_float64, p):
    grads = _clip_list(10)
    if not with_float64:
        grads = grads[:-1]
    grads[0][5] = float("nan")
    grads[1][7] = float("inf")
    before = _cpu(grads)
    got = OPS.clip_value(grads, _bound(1.5), p)
    # statistics of the gradients as they were (the float64 / p-norm path clamps afterwards)
    _assert_stats(got, reference.grad_stats(before, p), 2e-6)
    ref = _clone(before)
    reference.clip_value(ref, torch.tensor(1.5, dtype=torch.float64), p)
    for g, b, r in zip(grads, before, ref):
        vt = torch.tensor(1.5, dtype=torch.float64).to(b.dtype)
        assert torch.equal(_bits(g), _bits(torch.clamp(b, min=-vt, max=vt)))  # NaN kept
        assert torch.equal(_bits(g), _bits(r))


@gpu
def test_healthy_clip_leaves_every_bit_alone():
    grads = _clip_list(11)
    grads[2][0] = -0.0
    before = [_bits(g) for g in grads]
    OPS.clip_norm(grads, _bound(1e30), 2.0, EPS, False)
    OPS.clip_norm_per_layer(grads, _bound(1e30), 2.0, EPS)
    OPS.clip_value(grads, _bound(1e30), 2.0)
    assert all(torch.equal(_bits(g), b) for g, b in zip(grads, before))


@gpu
@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value"])
def test_strided_and_expanded_gradients_written_back_only_when_changed(op):
    gen = _gen(31)
    base = _randn((3, 1), torch.float32, gen)
    grads = [
        base.expand(3, 500),  # overlapping memory: copy_ into it would be refused
        _randn((1000,), torch.bfloat16, gen)[::2],
        torch.full((2,), 0.25, dtype=torch.float64, device=DEV),  # float64 results: exact
    ]

    def call(bound):
        if op == "clip_norm":
            return OPS.clip_norm(grads, _bound(bound), 2.0, EPS, False)
        if op == "clip_norm_per_layer":
            return OPS.clip_norm_per_layer(grads, _bound(bound), 2.0, EPS)
        return OPS.clip_value(grads, _bound(bound), 2.0)

    before = _cpu(grads)
    call(1e9)  # healthy: nothing changes, nothing is written back
    assert all(torch.equal(_bits(g), _bits(b)) for g, b in zip(grads, before))
    got = call(0.1)
    for i, (g, b) in enumerate(zip(grads, before)):
        if op == "clip_value":
            vt = torch.tensor(0.1, dtype=torch.float64).to(b.dtype)
            want = torch.clamp(b, min=-vt, max=vt)
        else:
            norm = float(got[3] if op == "clip_norm" else got[0][i])
            coef = min(1.0, 0.1 / (norm + EPS))
            want = _scaled(b, coef)
        assert torch.equal(_bits(g), _bits(want)), i


@gpu
@pytest.mark.parametrize("total_on", ["cuda", "cpu"])
def test_clip_with_norm_scales_by_the_given_total_and_writes_nothing_at_one(total_on):
    gen = _gen(41)
    base = _randn((3, 1), torch.float32, gen)
    grads = [*_clip_list(5), base.expand(3, 50), _randn((400,), torch.bfloat16, gen)[::2]]
    before = _cpu(grads)
    total = torch.tensor(8.0, dtype=torch.float64, device=total_on)
    OPS.clip_with_norm(grads, _bound(1e9), total, EPS)  # coefficient 1: every bit stays
    assert all(torch.equal(_bits(g), _bits(b)) for g, b in zip(grads, before))
    OPS.clip_with_norm(grads, _bound(0.5), total, EPS)
    coef = 0.5 / (8.0 + EPS)
    for i, (g, b) in enumerate(zip(grads, before)):
        assert torch.equal(_bits(g), _bits(_scaled(b, coef))), i
    nan = torch.tensor(float("nan"), device=total_on)
    OPS.clip_with_norm(grads, _bound(1.0), nan, EPS)  # NaN total: NaN gradients, as PyTorch
    assert all(bool(g.float().isnan().all()) for g in grads if g.numel())


@gpu
def test_clip_with_norm_matches_torch_clip_grads_with_norm():
    gen = _gen(42)
    ours = [torch.nn.Parameter(_randn((s,), torch.float32, gen)) for s in (3, 70_000, 0, 129)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = _randn(a.shape, torch.float32, gen) if a.numel() else torch.zeros(0, device=DEV)
        b.grad = a.grad.clone()
    total = torch.nn.utils.get_total_norm([p.grad for p in theirs])
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    gradstab.clip_grads_with_norm_(ours, 1.0, total)
    assert has_kernel("cuda")
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@gpu
def test_nan_gradients_give_nan_coefficient_and_nan_grads():
    gen = _gen(12)
    grads = [
        _make(5000, torch.float32, "contiguous", gen),
        _make(10, torch.bfloat16, "offset", gen),
    ]
    grads[0][3] = float("nan")
    OPS.clip_norm(grads, _bound(1.0), 2.0, EPS, False)
    assert all(bool(torch.isnan(g).all()) for g in grads)  # as torch.nn.utils.clip_grad_norm_


@gpu
def test_error_if_nonfinite_raises_before_any_change():
    grads = _clip_list(13)
    grads[3][100] = float("inf")
    before = [_bits(g) for g in grads]
    with pytest.raises(RuntimeError, match=r"non-finite .*the first in gradient 3 of 8"):
        OPS.clip_norm(grads, _bound(1.0), 2.0, EPS, True)
    assert all(torch.equal(_bits(g), b) for g, b in zip(grads, before))
    total = gradstab.clip_grad_norm_([_param(g) for g in grads[:3]], 1.0, error_if_nonfinite=True)
    assert math.isfinite(float(total))


# ------------------------- the CPU suite's bug classes: shared memory, overflow, statistics --


def _run_clip(op: str, grads, bound: float, p: float = 2.0, impl=OPS):
    """``op`` on ``grads`` through ``impl`` (the dispatcher or :mod:`gradstab.reference`)."""
    dev = grads[0].device if grads else DEV
    b = torch.tensor(bound, dtype=torch.float64, device=dev)
    if op == "clip_norm":
        return impl.clip_norm(grads, b, p, EPS, False)
    if op == "clip_norm_per_layer":
        return impl.clip_norm_per_layer(grads, b, p, EPS)
    if op == "normalize_per_layer":
        return impl.normalize_per_layer(grads, b, p, EPS)
    return impl.clip_value(grads, b, p)


@gpu
@pytest.mark.parametrize("op", CLIP_OPS)
@pytest.mark.parametrize("blocks", [0, 1])
def test_duplicate_gradient_written_twice_in_list_order(op, blocks):
    """The same gradient twice: statistics of the entry values, then scaled (clamped) twice
    in list order, as the CPU kernel and PyTorch's loops do, bit-identically run to run. Both
    entries' units used to be scaled concurrently by different warps (some elements once, some
    twice), and value clipping's in-pass clamp raced with the other entry's reads."""
    _ext()._cuda_set_max_blocks(blocks)
    x = _randn((300_007,), torch.float32, _gen(40), scale=3.0)
    x[17] = float("inf")  # value clipping: counted on entry, by both entries
    if op != "clip_value":
        x[17] = 5.0
    small = _randn((5,), torch.float32, _gen(41))
    results = []
    for _ in range(2):
        g = x.clone()
        grads = [g, small.clone(), g]
        got = _run_clip(op, grads, 0.5)
        results.append((got, g))
    g_ref = x.cpu().clone()
    want = _run_clip(op, [g_ref, small.cpu().clone(), g_ref], 0.5, impl=reference)
    got, g = results[0]
    assert_stats_match(tuple(t.cpu() for t in got), want, [g_ref, small, g_ref], op)
    assert_ulp_close(g.cpu(), g_ref, 2, op)  # two roundings, each may differ by one ulp
    if op == "clip_norm":  # PyTorch's own loop on float64 copies
        p = torch.nn.Parameter(torch.zeros(x.numel(), dtype=torch.float64))
        q = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
        p.grad, q.grad = x.cpu().double(), small.cpu().double()
        torch.nn.utils.clip_grad_norm_([p, q, p], 0.5, foreach=False)
        assert_ulp_close(g.cpu(), p.grad, 2, "vs torch.nn.utils.clip_grad_norm_")
    again, g2 = results[1]
    assert_bitwise_equal(g2.cpu(), g.cpu(), f"{op} rerun")
    for a, b in zip(again, got):
        assert_bitwise_equal(a.cpu(), b.cpu(), f"{op} rerun stats")


@gpu
@pytest.mark.parametrize("op", CLIP_OPS)
def test_overlapping_views_match_reference(op):
    """Overlapping dense views, a strided view across them (processed on a copy, re-read
    before its turn) and a transposed slice: the reference kernel on the same views of a CPU
    buffer is the oracle (entry statistics, writes in list order)."""

    def views(buf):
        return [buf[:70_000], buf[60_000:], buf[::3], buf.view(1000, 130).t()[2:50:5]]

    buf = torch.linspace(-5, 5, 130_000, dtype=torch.float32, device=DEV)
    buf_ref = buf.cpu().clone()
    g, g_ref = views(buf), views(buf_ref)
    got = _run_clip(op, g, 0.5)
    want = _run_clip(op, g_ref, 0.5, impl=reference)
    assert_stats_match(tuple(t.cpu() for t in got), want, g_ref, op)
    # an element lies in up to 4 of the views: up to 4 roundings, each may differ by one ulp
    assert_ulp_close(buf.cpu(), buf_ref, 4, f"{op}: shared buffer")


@gpu
def test_interleaved_views_and_same_storage_disjoint_views_are_fine():
    buf = torch.arange(1.0, 200_001.0, device=DEV)
    ref = buf.clone()
    OPS.clip_norm([buf[::2], buf[1::2]], _bound(1.0), 2.0, EPS, False)  # conservative path
    OPS.clip_norm([ref], _bound(1.0), 2.0, EPS, False)
    assert_ulp_close(buf.cpu(), ref.cpu().double(), 1)
    a = torch.arange(1.0, 20_001.0, device=DEV)
    b = a.clone()
    OPS.clip_norm_per_layer([a[:10_000], a[10_000:]], _bound(1.0), 2.0, EPS)  # adjacent
    OPS.clip_norm_per_layer([b[:10_000].clone(), b[10_000:].clone()], _bound(1.0), 2.0, EPS)
    c = b.clone()
    OPS.clip_norm_per_layer([c[:10_000], c[10_000:]], _bound(1.0), 2.0, EPS)
    assert_bitwise_equal(a.cpu(), c.cpu(), "adjacent views")


def _unmergeable_expanded(device) -> torch.Tensor:
    """A 14-dimensional expanded view whose dimensions cannot be merged to 12 or fewer."""
    base = torch.randn((2, 1) * 7, device=device)
    return base.expand((2, 2) * 7)


@gpu
@pytest.mark.parametrize("op", CLIP_OPS)
def test_expanded_gradient_beyond_12_dims_refused_before_any_write(op):
    """Such a gradient could only be written back by copy_, which refuses overlapping
    memory: it used to raise only after the other gradients had been scaled (or clamped in
    the reduce pass). Now a ValueError names it before anything is launched."""
    big = _randn((70_000,), torch.float32, _gen(42), scale=3.0)
    odd = _unmergeable_expanded(DEV)
    grads = [big, odd]
    before = [_bits(g) for g in grads]
    with pytest.raises(ValueError, match=r"gradient 1 of 2 .* more than 12 dimensions"):
        _run_clip(op, grads, 0.1)
    assert all(torch.equal(_bits(g), b) for g, b in zip(grads, before))
    _assert_stats(OPS.grad_stats(grads, 2.0), reference.grad_stats(_cpu(grads), 2.0), RTOL32)


@gpu
def test_strided_gradient_beyond_12_dims_is_written_back():
    base = _randn((2,) * 13 + (3,), torch.float32, _gen(43), scale=2.0)
    g = base[..., ::2]  # 14 dimensions, strided, no overlap: copied back with copy_
    before = g.cpu().clone()
    f64 = torch.zeros(1, dtype=torch.float64, device=DEV)  # float64 results: the exact total
    got = OPS.clip_norm([g, f64], _bound(0.5), 2.0, EPS, False)
    coef = min(1.0, 0.5 / (float(got[3]) + EPS))
    assert torch.equal(_bits(g), _bits(_scaled(before, coef)))
    assert torch.equal(_bits(base[..., 1]), _bits(base.cpu()[..., 1]))  # gaps untouched


@gpu
def test_float32_total_beyond_float32_range_is_inf_and_error_if_nonfinite_raises():
    """A float32 total above FLT_MAX is reported as inf (not an error), and
    error_if_nonfinite=True must then raise: it used to check the float64 total, which is
    finite, and so clipped without the error the caller asked for."""
    vals = [3e38, -3e38, 1e38]
    g = torch.tensor(vals, device=DEV)
    norms, _, nonfinite, total = OPS.grad_stats([g], 2.0)
    assert math.isinf(float(total)) and math.isinf(float(norms[0]))
    assert int(nonfinite[0]) == 0
    before = _bits(g)
    with pytest.raises(RuntimeError, match="overflowed its result dtype"):
        OPS.clip_norm([g], _bound(1.0), 2.0, EPS, True)
    assert torch.equal(_bits(g), before)
    ref = torch.tensor(vals)
    want = reference.clip_norm([ref], torch.tensor(1.0, dtype=torch.float64), 2.0, EPS, False)
    got = OPS.clip_norm([g], _bound(1.0), 2.0, EPS, False)  # scaled by 1 / 4.36e38
    assert math.isinf(float(got[3])) and math.isinf(float(want[3]))
    assert_ulp_close(g.cpu(), ref, 1, "scaled by the float64 coefficient")
    exact = math.sqrt(19) * 1e38
    assert_rel_close(g.cpu().double().norm(), torch.tensor(1.0, dtype=torch.float64), 1e-6)
    assert exact > torch.finfo(torch.float32).max
    # beside a float64 gradient the results are float64: the same total is finite, no error
    g32 = torch.tensor(vals, device=DEV)
    total64 = OPS.clip_norm(
        [g32, torch.zeros(1, dtype=torch.float64, device=DEV)], _bound(1.0), 2.0, EPS, True
    )[3]
    assert math.isclose(float(total64), exact, rel_tol=1e-6)


@gpu
def test_clip_value_returns_statistics_of_the_gradients_on_entry():
    """Infs are counted (and max-abs is inf) before the clamp replaces them; a float64 norm
    that needs the max-abs rescue, and a p-norm, are computed from the unclamped values."""
    fused = torch.tensor([math.inf, 1.0, -math.inf, 0.5], device=DEV)  # float32, p = 2: fused
    norms, max_abs, nonfinite, total = OPS.clip_value([fused], _bound(1.0), 2.0)
    assert nonfinite.tolist() == [2] and math.isinf(float(max_abs[0]))
    assert math.isinf(float(norms[0])) and math.isinf(float(total))
    assert fused.tolist() == [1.0, 1.0, -1.0, 0.5]
    g64 = torch.full((3000,), 1e200, dtype=torch.float64, device=DEV)  # deferred clamp
    before = _cpu([g64])
    norms, max_abs, _, _ = OPS.clip_value([g64], _bound(1.0), 2.0)
    assert math.isclose(float(norms[0]), 1e200 * math.sqrt(3000), rel_tol=1e-12)
    assert float(max_abs[0]) == 1e200 and bool((g64 == 1.0).all())
    _assert_stats(
        (norms, max_abs, torch.zeros(1, dtype=torch.int64), norms[0]),
        (*reference.grad_stats(before, 2.0)[:3], reference.grad_stats(before, 2.0)[0][0]),
        RTOL64,
    )
    big = torch.full((1000,), 1e10, device=DEV)  # |x|^40 overflows double: rescued
    got = OPS.clip_value([big, torch.tensor([math.inf], device=DEV)], _bound(1.0), 40.0)
    assert math.isclose(float(got[0][0]), 1e10 * 1000 ** (1 / 40), rel_tol=1e-6)
    assert got[2].tolist() == [0, 1] and bool((big == 1.0).all())


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("n", [64, 2048, 4096 + 64 + 5, 300_007])
def test_float32_accumulation_within_design_bound(dtype, p, n):
    """Constant-valued data, the float32 partial sums' worst case: within 1e-6 of float64."""
    for v in (1.8972415924072266, 1.5936895608901978, 1.0 + 3 * 2.0**-23, 0.1, 3.3):
        for layout in ("contiguous", "offset"):
            g = torch.full((n + 1,), v, dtype=dtype, device=DEV)
            g = g[1:] if layout == "offset" else g[:n]
            norms, _, _, total = OPS.grad_stats([g, g[:7].double()], p)  # float64 results
            exact = oracle_stats([g.cpu(), g[:7].cpu().double()], p)
            assert_rel_close(norms[0].cpu(), exact.norms[0], DESIGN_RTOL, f"{v} {layout}")
            assert_rel_close(total.cpu(), exact.total_norm, DESIGN_RTOL, f"{v} {layout}")


# ------------------------------------------------------------ determinism, sync, graphs --


def _all_ops(grads: list[torch.Tensor], bound: torch.Tensor):
    out = [OPS.grad_stats(grads, 2.0)]
    out.append(OPS.clip_norm(grads, bound, 2.0, EPS, False))
    out.append(OPS.clip_norm_per_layer(grads, bound, 2.0, EPS))
    out.append(OPS.clip_value(grads, bound * 0.01, 2.0))
    out.append(OPS.grad_stats(grads, 3.0))
    return out


@gpu
def test_bit_identical_across_runs_and_grid_sizes():
    base = _clip_list(14, scale=3.0)
    results = []
    for blocks in (0, 1, 3, 0):
        _ext()._cuda_set_max_blocks(blocks)
        grads = _clone(base)
        outs = _all_ops(grads, _bound(5.0))
        results.append(([_bits(t) for out in outs for t in out], [_bits(g) for g in grads]))
    first = results[0]
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(first[0], other[0]))
        assert all(torch.equal(a, b) for a, b in zip(first[1], other[1]))


@gpu
def test_no_host_sync_in_clip_calls():
    grads = _clip_list(15)
    fresh = _clip_list(16)  # never seen: the descriptor table is built inside the checked region
    params = [_param(g) for g in _clip_list(17)]
    bound = _bound(1.0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for gs in (grads, fresh, grads):
            _all_ops(gs, bound)
        gradstab.clip_grad_norm_(params, bound)
        gradstab.clip_grad_norm_(params, 1.0)  # a float: filled on the device
        gradstab.clip_grad_norm_per_layer_(params, bound)
        gradstab.clip_grad_value_(params, bound)
        gradstab.grad_stats(params)
        _ext().cuda_fast_path(1, params, 2.0, 1.0, EPS, False)
        _ext().cuda_fast_path(3, params, 2.0, bound, EPS, False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def _param(g: torch.Tensor) -> torch.nn.Parameter:
    p = torch.nn.Parameter(torch.empty_like(g))
    p.grad = g
    return p


@gpu
@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value", "grad_stats"])
@pytest.mark.parametrize("warm", [True, False])
def test_cuda_graph_capture_and_replay(op, warm):
    grads = _clip_list(18)
    bound = _bound(1.0)

    def call(gs, b):
        if op == "clip_norm":
            return OPS.clip_norm(gs, b, 2.0, EPS, False)
        if op == "clip_norm_per_layer":
            return OPS.clip_norm_per_layer(gs, b, 2.0, EPS)
        if op == "clip_value":
            return OPS.clip_value(gs, b, 2.0)
        return OPS.grad_stats(gs, 2.0)

    if warm:  # a strided gradient gets a fresh contiguous copy (a new table) on every call
        grads = [g for g in grads if g.is_non_overlapping_and_dense()]
    built = _ext()._cuda_cache_info()["built_in_capture"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if warm:  # the eager call builds the descriptor table: the graph only reads it
            call(grads, bound)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call(grads, bound)
    info = _ext()._cuda_cache_info()
    assert info["built_in_capture"] == built + (0 if warm else 1)
    assert info["retained"] >= 1
    for trial, (seed, b) in enumerate([(19, 0.5), (20, 1e9), (21, 3.0)]):
        fresh = _clip_list(seed, scale=1.0 + trial)
        if warm:
            fresh = [f for f in fresh if f.is_non_overlapping_and_dense()]
        for g, f in zip(grads, fresh):
            g.copy_(f)
        bound.fill_(b)
        # the same values in the same layouts (results depend on each gradient's address
        # modulo 16 bytes, which decides the vector/scalar split, so clones would not do)
        expect_grads = _clip_list(seed, scale=1.0 + trial)
        if warm:
            expect_grads = [f for f in expect_grads if f.is_non_overlapping_and_dense()]
        expect = call(expect_grads, _bound(b))
        graph.replay()
        torch.cuda.synchronize()
        for got_t, want_t in zip(out, expect):
            assert torch.equal(_bits(got_t), _bits(want_t)), (op, trial)
        for g, w in zip(grads, expect_grads):
            assert torch.equal(_bits(g), _bits(w)), (op, trial)


@gpu
def test_table_built_in_capture_serves_eager_calls_and_other_graphs():
    grads = [g for g in _clip_list(32) if g.is_non_overlapping_and_dense()]  # stable pointers
    want = reference.grad_stats(_cpu(grads), 2.0)
    built = _ext()._cuda_cache_info()["built_in_capture"]
    first = torch.cuda.CUDAGraph()
    with torch.cuda.graph(first):  # never seen eagerly: the table is built in the capture
        out_first = OPS.grad_stats(grads, 2.0)
    second = torch.cuda.CUDAGraph()
    with torch.cuda.graph(second):  # a hit on a table that no eager call has written yet
        out_second = OPS.grad_stats(grads, 2.0)
    assert _ext()._cuda_cache_info()["built_in_capture"] == built + 1
    second.replay()  # before the first graph ever ran
    torch.cuda.synchronize()
    _assert_stats(out_second, want, RTOL32)
    _assert_stats(OPS.grad_stats(grads, 2.0), want, RTOL32)  # eager hit on that table
    first.replay()
    torch.cuda.synchronize()
    _assert_stats(out_first, want, RTOL32)


@gpu
def test_error_if_nonfinite_refused_during_capture():
    grads = _clip_list(22)
    OPS.clip_norm(grads, _bound(1.0), 2.0, EPS, False)
    bound = _bound(1.0)  # made before the capture (a host-to-device copy)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph"), torch.cuda.graph(graph):
        OPS.clip_norm(grads, bound, 2.0, EPS, True)


@gpu
def test_side_stream_and_cache_invalidation():
    ext = _ext()
    gen = _gen(23)
    x = _randn((4096,), torch.float32, gen)
    first = ext._cuda_cache_info()
    OPS.grad_stats([x], 2.0)
    OPS.grad_stats([x], 2.0)
    info = ext._cuda_cache_info()
    assert info["hits"] >= first["hits"] + 1
    # same pointer, another dtype and element count: a new table, right answers
    for y in (x.view(torch.bfloat16), x.view(torch.float16)[:777], x[:100], x.view(torch.float64)):
        _assert_stats(OPS.grad_stats([y], 2.0), reference.grad_stats(_cpu([y]), 2.0), RTOL32)
    # reallocated gradients (a freed block is likely reused at the same address)
    shapes = [(1000,), (3000,), (70000,)]
    del x, y
    grads = []
    for seed in range(3):
        del grads  # freed blocks are likely handed out again at the same addresses
        grads = [_randn(s, torch.float32, _gen(30 + seed)) for s in shapes[: seed + 1]]
        _assert_stats(OPS.grad_stats(grads, 2.0), reference.grad_stats(_cpu(grads), 2.0), RTOL32)
    # another stream, and the table shared with it
    side = torch.cuda.Stream()
    grads = _clip_list(24)
    want = reference.grad_stats(_cpu(grads), 2.0)
    OPS.grad_stats(grads, 2.0)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = OPS.grad_stats(grads, 2.0)
    torch.cuda.current_stream().wait_stream(side)
    _assert_stats(got, want, RTOL32)
    assert ext._cuda_cache_info()["misses"] > first["misses"]


@gpu
def test_more_gradient_lists_than_the_table_cache_holds_in_a_loop():
    """40 distinct lists (the LRU keeps 32) cycled three times with no synchronisation: every
    call misses and evicts; every result is checked against the reference run in the same
    order on CPU copies."""
    ext = _ext()
    lists = [
        [
            _randn((257 * (i + 1),), torch.float32, _gen(500 + i)),
            _randn((3, 33), torch.bfloat16, _gen(600 + i)),
        ]
        for i in range(40)
    ]
    cpu_lists = [_cpu(g) for g in lists]
    bounds = [_bound(0.5 + (i % 3)) for i in range(40)]
    first = ext._cuda_cache_info()
    got, want = [], []
    for _ in range(3):
        for i, grads in enumerate(lists):
            got.append(OPS.clip_norm(grads, bounds[i], 2.0, EPS, False))
            want.append(reference.clip_norm(cpu_lists[i], bounds[i].cpu(), 2.0, EPS, False))
    info = ext._cuda_cache_info()
    assert info["misses"] - first["misses"] >= 120  # every call evicted the list's own table
    assert info["entries"] <= 32
    for a, b in zip(got, want):
        _assert_stats(a, b, RTOL32)
    for grads, ref in zip(lists, cpu_lists):
        for g, r in zip(grads, ref):
            torch.testing.assert_close(
                g.cpu(), r, rtol=2e-2 if g.dtype == torch.bfloat16 else 1e-6, atol=0
            )


@gpu
def test_table_built_on_one_stream_used_at_once_on_another():
    """A miss on stream A (the table's copy queued there) and, with no wait_stream between, the
    same list on stream B: B must wait for the copy on the device (the cache's event)."""
    a, b = torch.cuda.Stream(), torch.cuda.Stream()
    for seed in range(20):
        grads = [
            _randn((4096 * (seed + 1) + 3,), torch.float32, _gen(700 + seed)),
            _randn((999,), torch.float16, _gen(800 + seed)),
        ]
        want = reference.grad_stats(_cpu(grads), 2.0)
        a.wait_stream(torch.cuda.current_stream())
        b.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(a):
            got_a = OPS.grad_stats(grads, 2.0)
        with torch.cuda.stream(b):
            got_b = OPS.grad_stats(grads, 2.0)
        torch.cuda.current_stream().wait_stream(a)
        torch.cuda.current_stream().wait_stream(b)
        _assert_stats(got_a, want, RTOL32)
        _assert_stats(got_b, want, RTOL32)


@gpu
@pytest.mark.parametrize("device_bound", [False, True])
def test_lists_of_only_zero_size_gradients_on_every_op(device_bound):
    grads = [torch.empty(0, dtype=d, device=DEV) for d in FLOAT_DTYPES[:3]] + [
        torch.empty((0, 5), dtype=torch.float32, device=DEV)
    ]
    bound = _bound(1.0) if device_bound else torch.tensor(1.0, dtype=torch.float64)
    want = reference.grad_stats(_cpu(grads), 2.0)
    calls = {
        "grad_stats": lambda: OPS.grad_stats(grads, 2.0),
        "clip_norm": lambda: OPS.clip_norm(grads, bound, 2.0, EPS, True),
        "clip_norm_per_layer": lambda: OPS.clip_norm_per_layer(grads, bound, 2.0, EPS),
        "clip_value": lambda: OPS.clip_value(grads, bound, 2.0),
        "normalize_per_layer": lambda: OPS.normalize_per_layer(grads, bound, 2.0, EPS),
    }
    for name, call in calls.items():
        _assert_stats(call(), want, RTOL32)
        assert all(g.device.type == "cuda" for g in call()), name
    norms, clipped, nonfinite, total = OPS.adaptive_clip(
        grads, [torch.empty_like(g) for g in grads], 0.01, 1e-3, 2.0
    )
    assert norms.tolist() == [0.0] * 4 and clipped.tolist() == [0] * 4
    assert nonfinite.tolist() == [0] * 4 and float(total) == 0.0
    params = [_param(g) for g in grads]
    assert float(gradstab.clip_grad_norm_(params, 1.0)) == 0.0  # the eager CUDA shortcut


# ------------------------------------------------------------------- API, errors, misc --


@gpu
def test_fast_path_matches_dispatcher():
    ext = _ext()
    base = _clip_list(25, scale=2.0)
    names = ["grad_stats", "clip_norm", "clip_norm_per_layer", "clip_value", "normalize_per_layer"]
    for op, name in enumerate(names):
        a, b = _clone(base), _clone(base)
        params = [_param(g) for g in a]
        params.insert(2, torch.nn.Parameter(torch.zeros(3, device=DEV)))  # no grad: skipped
        got = ext.cuda_fast_path(op, params, 2.0, 1.0, EPS, False)
        args = {
            "grad_stats": (b, 2.0),
            "clip_norm": (b, _bound(1.0), 2.0, EPS, False),
            "clip_norm_per_layer": (b, _bound(1.0), 2.0, EPS),
            "clip_value": (b, _bound(1.0), 2.0),
            "normalize_per_layer": (b, _bound(1.0), 2.0, EPS),
        }[name]
        want = getattr(OPS, name)(*args)
        assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(got, want)), name
        assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b)), name


@gpu
def test_fast_path_declines_what_it_does_not_serve():
    ext = _ext()
    cpu = [_param(torch.randn(10))]
    assert ext.cuda_fast_path(0, cpu, 2.0, 0.0, EPS, False) is None
    mixed = [_param(torch.randn(10, device=DEV)), *cpu]
    assert ext.cuda_fast_path(0, mixed, 2.0, 0.0, EPS, False) is None
    no_grad = [torch.nn.Parameter(torch.ones(2, device=DEV))]
    assert ext.cuda_fast_path(0, no_grad, 2.0, 0.0, EPS, False) is None

    class Sub(torch.Tensor):
        pass

    sub = torch.zeros(4, device=DEV).as_subclass(Sub)
    sub.grad = torch.ones(4, device=DEV)
    assert ext.cuda_fast_path(0, [sub], 2.0, 0.0, EPS, False) is None
    with pytest.raises(ValueError, match="non-negative"):
        ext.cuda_fast_path(1, [_param(torch.ones(4, device=DEV))], 2.0, -1.0, EPS, False)


@gpu
def test_functional_api_on_cuda_parameters():
    grads = _clip_list(26)
    params = [_param(g) for g in grads]
    before = _cpu(grads)
    total = gradstab.clip_grad_norm_(params, max_norm=1.0)
    want = reference.grad_stats(before, 2.0)[3]
    assert total.device.type == "cuda"
    torch.testing.assert_close(total.cpu(), want, rtol=RTOL32, atol=0)
    stats = gradstab.grad_stats(params)
    assert stats.norms.device.type == "cuda"


@gpu
def test_errors_name_the_argument():
    g = torch.randn(10, device=DEV)
    with pytest.raises(ValueError, match="one device"):
        OPS.grad_stats([g, torch.randn(3)], 2.0)
    with pytest.raises(TypeError, match="only float16, bfloat16, float32 and float64"):
        OPS.grad_stats([g, torch.ones(3, dtype=torch.int32, device=DEV)], 2.0)
    with pytest.raises(ValueError, match="norm_type"):
        OPS.grad_stats([g], 0.0)
    with pytest.raises(ValueError, match="max_norm must be a tensor with one element"):
        OPS.clip_norm([g], torch.ones(2, device=DEV), 2.0, EPS, False)
    with pytest.raises(ValueError, match="clip_value must be a non-negative number"):
        OPS.clip_value([g], torch.tensor(-1.0), 2.0)  # a CPU bound is read (and checked)
    before = g.clone()
    with pytest.raises(ValueError):
        OPS.clip_norm([g, torch.ones(2, device=DEV).to_sparse()], _bound(0.1), 2.0, EPS, False)
    assert torch.equal(g, before)


@gpu
def test_cpu_bound_tensor_is_read_on_the_host():
    a, b = _clip_list(27), _clip_list(27)
    got = OPS.clip_norm(a, torch.tensor(0.5), 2.0, EPS, False)
    want = OPS.clip_norm(b, _bound(0.5), 2.0, EPS, False)
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(got, want))
    assert all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


@gpu
def test_opcheck_on_cuda():
    gen = _gen(28)
    grads = [
        _make(5000, torch.float32, "contiguous", gen),
        _make(33, torch.bfloat16, "offset", gen),
    ]
    torch.library.opcheck(OPS.grad_stats.default, (grads, 2.0))
    torch.library.opcheck(OPS.clip_norm.default, (grads, _bound(0.5), 2.0, EPS, False))
    torch.library.opcheck(OPS.clip_norm_per_layer.default, (grads, _bound(0.5), 2.0, EPS))
    torch.library.opcheck(OPS.clip_value.default, (grads, _bound(0.5), 2.0))
    torch.library.opcheck(OPS.normalize_per_layer.default, (grads, _bound(0.5), 2.0, EPS))


@gpu
def test_torch_compile_fullgraph_on_cuda():
    grads = [g.clone() for g in _clip_list(29)]  # all 16-byte aligned, as any clone of them
    params = [_param(g) for g in grads]
    ref = _clone(grads)

    @torch.compile(fullgraph=True)
    def step(ps, bound):
        return gradstab.clip_grad_norm_(ps, bound)

    total = step(params, _bound(1.0))
    want = OPS.clip_norm(ref, _bound(1.0), 2.0, EPS, False)[3]
    assert torch.equal(_bits(total), _bits(want))
    assert all(torch.equal(_bits(p.grad), _bits(r)) for p, r in zip(params, ref))


@gpu
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(
            st.integers(0, 20_000),
            st.sampled_from(FLOAT_DTYPES),
            st.sampled_from(["contiguous", "offset", "offset3", "strided", "transposed"]),
            st.sampled_from([1e-3, 1.0, 1e3]),
        ),
        min_size=1,
        max_size=12,
    ),
    p=st.sampled_from([1.0, 2.0, math.inf]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_lists_match_reference(specs, p, seed):
    gen = _gen(seed)
    grads = [_make(n, d, layout, gen, scale) for n, d, layout, scale in specs]
    rtol = _rtol(grads)
    _assert_stats(OPS.grad_stats(grads, p), reference.grad_stats(_cpu(grads), p), rtol)
    before = _cpu(grads)
    got = OPS.clip_norm_per_layer(grads, _bound(1.0), p, EPS)
    _assert_stats(got, reference.grad_stats(before, p), rtol)
    if _rd(grads) == torch.float64:
        for g, b, norm in zip(grads, before, got[0].tolist()):
            coef = min(1.0, 1.0 / (norm + EPS))
            assert torch.equal(_bits(g), _bits(b if coef >= 1.0 else _scaled(b, coef)))


# ------------------------------------------------------- adaptive_clip (AGC) on the GPU --


def _agc_call(grads, params, clip_factor=0.01, eps=1e-3, p=2.0):
    return OPS.adaptive_clip(grads, params, clip_factor, eps, p)


@gpu
def test_agc_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradstab::adaptive_clip", "CUDA")


@gpu
@pytest.mark.parametrize("gdtype", FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "transposed", "channels_last"])
def test_agc_matches_float64_oracle_and_reference(gdtype, layout):
    grads, params = _agc_pairs(50, gdtype, torch.float32, layout)
    params[1][2].zero_()  # a zero-weight unit: the eps floor
    before = _cpu(grads)
    expected = _agc_oracle(grads, params)
    assert 0 < sum(expected[1]) < sum(_units(g).shape[0] for g in grads if g.numel())
    got = _agc_call(grads, params)
    _assert_agc(grads, params, got, expected, f"{gdtype} {layout}")
    ref_grads = _clone(before)
    ref = reference.adaptive_clip(ref_grads, _cpu(params), 0.01, 1e-3, 2.0)
    _assert_agc_stats(got, ref, _rtol(grads))
    oracle = _oracle_norms(before, 2.0)
    torch.testing.assert_close(got[0].cpu().double(), oracle, rtol=RTOL32, atol=0)
    for g, r in zip(grads, ref_grads):
        if g.dtype != torch.float64:
            assert_ulp_close(g.cpu(), r.double(), 1, "against the reference")


@gpu
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
    grads, params = _agc_pairs(51, gdtype, wdtype)
    expected = _agc_oracle(grads, params)
    _assert_agc(grads, params, _agc_call(grads, params), expected, f"{gdtype}/{wdtype}")


@gpu
def test_agc_mixed_dtype_list_gives_float64_results():
    g1, w1 = _agc_pairs(52, torch.bfloat16, torch.float32, shapes=[(64, 100), (3, 5000)])
    g2, w2 = _agc_pairs(53, torch.float64, torch.float64, shapes=[(7, 9)])
    g3, w3 = _agc_pairs(54, torch.float16, torch.bfloat16, shapes=[(200,)])
    grads, params = g1 + g2 + g3, w1 + w2 + w3
    expected = _agc_oracle(grads, params)
    got = _agc_call(grads, params)
    assert got[0].dtype == got[3].dtype == torch.float64
    _assert_agc(grads, params, got, expected)


@gpu
@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_agc_other_norm_types(p):
    grads, params = _agc_pairs(55, torch.float32, torch.float32)
    expected = _agc_oracle(grads, params, 0.05, 1e-3, p)
    got = _agc_call(grads, params, 0.05, 1e-3, p)
    _assert_agc(grads, params, got, expected, f"p={p}")


@gpu
def test_agc_statistics_are_pre_clip():
    grads, params = _agc_pairs(56, torch.float32, torch.float32)
    before = _cpu(grads)
    norms, _, nonfinite, total = _agc_call(grads, params)
    oracle = _oracle_norms(before, 2.0)
    torch.testing.assert_close(norms.cpu().double(), oracle, rtol=RTOL32, atol=0)
    torch.testing.assert_close(
        total.cpu().double(), torch.linalg.vector_norm(oracle), rtol=RTOL32, atol=0
    )
    assert nonfinite.tolist() == [0] * len(grads)


@gpu
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32, torch.float64])
def test_agc_nonfinite_follow_the_float64_formula(gdtype):
    g = torch.tensor(
        [
            [0.5, math.nan, 0.5],  # NaN unit: comparison false, unchanged
            [0.5, math.inf, -0.5],  # inf unit: coefficient 0 -> 0, NaN (inf * 0), -0
            [3.0, 4.0, 0.0],  # ordinary unit, clipped
            [0.1, 0.1, 0.1],  # weight norm NaN: max_norm NaN, unchanged
        ],
        dtype=gdtype,
        device=DEV,
    )
    w = torch.ones(4, 3, device=DEV)
    w[3, 0] = math.nan
    long_g = torch.full((2, 9000), 0.5, dtype=gdtype, device=DEV)  # the same in long units
    long_g[0, 8500] = math.inf
    long_g[1, 3] = math.nan
    long_w = torch.ones(2, 9000, device=DEV)
    grads, params = [g, long_g], [w, long_w]
    want, counts = _agc_oracle(grads, params, 0.1, 1e-3)
    norms, clipped, nonfinite, total = _agc_call(grads, params, 0.1, 1e-3)
    assert clipped.tolist() == counts == [2, 1]
    assert nonfinite.tolist() == [2, 2]
    for a, e in zip(grads, want):
        assert torch.equal(torch.isnan(a.cpu()), torch.isnan(e))
        fin = ~torch.isnan(e)
        assert_ulp_close(a.cpu()[fin], e[fin], 1)
    assert math.isnan(float(norms[0])) and math.isnan(float(total))


@gpu
def test_agc_huge_and_tiny_values():
    g = torch.tensor([[3e30, 4e30], [3e-30, 4e-30]], device=DEV)  # squares over/underflow fp32
    w = torch.tensor([[1e38, 1e38], [1e-30, 0.0]], device=DEV)
    norms, clipped, _, _ = _agc_call([g], [w], 1e-8, 0.0)
    assert math.isclose(float(norms[0]), 5e30, rel_tol=1e-6)
    want, counts = _agc_oracle([torch.tensor([[3e30, 4e30], [3e-30, 4e-30]])], [w], 1e-8, 0.0)
    assert clipped.tolist() == counts == [2]
    assert_ulp_close(g.cpu(), want[0], 1)
    g64 = torch.full((2, 5000), 1e200, dtype=torch.float64, device=DEV)  # rescued by max |x|
    w64 = torch.full((2, 5000), 1e300, dtype=torch.float64, device=DEV)
    w64[1] = 1e190
    norms, clipped, _, total = _agc_call([g64], [w64], 0.01, 1e-3)
    row = 1e200 * math.sqrt(5000)
    assert math.isclose(float(norms[0]), row * math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(float(total), row * math.sqrt(2), rel_tol=1e-12)
    assert clipped.tolist() == [1]
    assert bool((g64[0] == 1e200).all())
    coef = 0.01 * 1e190 * math.sqrt(5000) / row
    assert_rel_close(g64[1].cpu(), torch.full((5000,), 1e200 * coef, dtype=torch.float64), 1e-12)


@gpu
def test_agc_zero_weights_use_eps_floor_and_zero_gradients_stay_zero():
    g = torch.full((3, 4), 0.5, device=DEV)
    w = torch.zeros(3, 4, device=DEV)
    w[1] = 1.0  # norm 2
    _, clipped, _, _ = _agc_call([g], [w], 0.1, 1e-3)
    assert clipped.tolist() == [3]
    norms = torch.linalg.vector_norm(g.cpu().double(), dim=1)
    torch.testing.assert_close(norms, torch.tensor([1e-4, 0.2, 1e-4], dtype=torch.float64))
    g = torch.tensor([[1.0, 2.0], [0.0, 0.0]], device=DEV)
    _, clipped, _, _ = _agc_call([g], [torch.zeros(2, 2, device=DEV)], 0.1, 0.0)
    assert clipped.tolist() == [1] and bool((g == 0).all())


@gpu
def test_agc_bit_identical_across_runs_and_grid_sizes():
    base_g, params = _agc_pairs(57, torch.float32, torch.float32)
    base_g[0][1, 0, 0, 0] = math.inf
    outs = []
    for blocks in (0, 1, 3, 0):
        _ext()._cuda_set_max_blocks(blocks)
        grads = _clone(base_g)
        stats = _agc_call(grads, params)
        outs.append(([_bits(t) for t in stats], [_bits(g) for g in grads]))
    for stats, grads in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(stats, outs[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(grads, outs[0][1]))


@gpu
def test_agc_unclipped_units_and_healthy_steps_are_not_written():
    grads, params = _agc_pairs(58, torch.float32, torch.float32, "transposed")
    grads += [_randn((1000,), torch.bfloat16, _gen(58))[::2]]  # strided: copy, no write-back
    params += [torch.ones(500, device=DEV)]
    grads[1][0, 0] = -0.0
    grads[2][4] = math.nan  # a NaN unit is not clipped: its payload survives
    before = [_bits(g) for g in grads]
    gaps = _bits(grads[-1]._base[1::2])
    _, clipped, _, _ = _agc_call(grads, params, 1e6)  # nothing clipped: nothing written
    assert clipped.tolist() == [0] * len(grads)
    assert all(torch.equal(_bits(g), b) for g, b in zip(grads, before))
    # some units clipped: every other unit keeps its bits; the strided gaps are never touched
    rows = [_agc_clipped_rows(g, w) for g, w in zip(grads, params)]
    assert any(r.any() for r in rows) and any((~r).any() for r in rows)
    _agc_call(grads, params)
    for g, b, r in zip(grads, before, rows):
        if g.numel() == 0:
            continue
        got_rows = _bits(g).reshape(r.shape[0], g.numel() // r.shape[0])
        want_rows = b.reshape(r.shape[0], g.numel() // r.shape[0])
        assert torch.equal(got_rows[~r], want_rows[~r])
    assert torch.equal(_bits(grads[-1]._base[1::2]), gaps)


@gpu
def test_agc_strided_gradients_written_back():
    gen = _gen(59)
    base = _randn((40, 60), torch.float32, gen, scale=0.5)
    grads = [base[:, ::2], _randn((30, 20), torch.float16, gen).t()]  # both on copies
    params = [torch.randn(40, 30, device=DEV), torch.randn(20, 30, device=DEV)]
    before = _cpu(grads)
    gaps = _bits(base[:, 1::2])
    expected = _agc_oracle(before, params)
    assert min(expected[1]) > 0
    _assert_agc(grads, params, _agc_call(grads, params), expected)
    assert torch.equal(_bits(base[:, 1::2]), gaps)


@gpu
@pytest.mark.parametrize("blocks", [0, 1])
def test_agc_shared_memory_matches_reference(blocks):
    """A gradient twice, overlapping views, a transposed view on a copy, a long unit over
    everything, a parameter that is another pair's gradient: decided on the entry data,
    written in list order, exactly as the CPU reference does it on the same views."""
    _ext()._cuda_set_max_blocks(blocks)
    gen = torch.Generator().manual_seed(60)
    spread = torch.logspace(-4, -1, 80_000, dtype=torch.float64)
    host = torch.randn(80_000, generator=gen, dtype=torch.float64) * spread

    def views(b):
        return [
            b[:40_000].view(200, 200),
            b[30_000:70_000].view(400, 100),  # its first 100 rows are rows 150..199 above
            b[:40_000].view(200, 200).t(),  # units are columns: processed on a copy
            b[10_000:],  # one unit of 70,000 elements: pieces
            b[:40_000].view(200, 200),  # the first gradient again
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
        buf = host.to(dtype).to(DEV)
        ref_buf = host.to(dtype).clone()
        gv, rv = views(buf), views(ref_buf)
        # the last parameter is memory that gradients 1 and 3 write
        params = [w.to(dtype).to(DEV) for w in w_host] + [buf[40_000:].view(200, 200)]
        ref_params = [w.to(dtype) for w in w_host] + [ref_buf[40_000:].view(200, 200)]
        got = _agc_call(gv, params)
        want = reference.adaptive_clip(rv, ref_params, 0.01, 1e-3, 2.0)
        _assert_agc_stats(got, want, RTOL32)
        if dtype == torch.float64:  # float64 norms on both sides: 1e-12 per scaling
            assert_grads_match([buf.cpu()], [ref_buf], 5e-12, "shared buffer")
        else:  # an element lies in up to 5 views: up to 5 roundings, one ulp apart each
            assert_ulp_close(buf.cpu(), ref_buf.double(), 5, "shared buffer")


@gpu
def test_agc_duplicate_gradient_is_deterministic_and_scaled_twice():
    spread = torch.logspace(-3, 0, 256, device=DEV)[:, None]  # some units clip, others not
    x = _randn((256, 300), torch.float32, _gen(61)) * spread
    w = _randn((256, 300), torch.float32, _gen(62))
    outs = []
    for blocks in (0, 1, 0):
        _ext()._cuda_set_max_blocks(blocks)
        g = x.clone()
        stats = _agc_call([g, g], [w, w])
        outs.append((g, stats))
    g, stats = outs[0]
    want, counts = _agc_oracle([x], [w])
    assert stats[1].tolist() == counts * 2 and 0 < counts[0] < 256
    coefs = want[0].norm(dim=1) / _units(x).norm(dim=1)
    twice = _units(x) * (coefs * coefs)[:, None]
    assert_ulp_close(g.cpu(), twice.reshape(x.shape), 2)
    for g2, s2 in outs[1:]:
        assert torch.equal(_bits(g2), _bits(g))
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(s2, stats))


@gpu
@pytest.mark.parametrize("needs_clip", [True, False])
def test_agc_expanded_gradient_refused_before_any_write(needs_clip):
    """Whether one of its units must be clipped is known only on the device, so an expanded
    gradient is refused on CUDA either way (the CPU kernel refuses it only when it clips),
    with a ValueError naming it and no gradient changed."""
    big = _randn((64, 2048), torch.float32, _gen(63), scale=0.5)
    odd = _randn((1, 5), torch.float32, _gen(64)).expand(3, 5)
    grads = [big, odd]
    w_odd = torch.full((3, 5), 1.0 if needs_clip else 1e6, device=DEV)
    params = [torch.randn(64, 2048, device=DEV), w_odd]
    before = [_bits(g) for g in grads]
    with pytest.raises(ValueError, match=r"gradient 1 of 2 \(shape \[3, 5\]\).*No gradient"):
        _agc_call(grads, params)
    assert all(torch.equal(_bits(g), b) for g, b in zip(grads, before))


@gpu
def test_agc_errors_name_the_argument():
    g = torch.randn(4, 3, device=DEV)
    with pytest.raises(ValueError, match=r"parameter 0 of 1 is on cpu but its gradient is on"):
        _agc_call([g], [torch.randn(4, 3)])
    with pytest.raises(ValueError, match=r"shape \[3, 4\] but its gradient has shape \[4, 3\]"):
        _agc_call([g], [torch.randn(3, 4, device=DEV)])
    with pytest.raises(TypeError, match="parameter 0 of 1 has dtype"):
        _agc_call([g], [torch.ones(4, 3, dtype=torch.int32, device=DEV)])
    with pytest.raises(ValueError, match="clip_factor must be a positive number, got 0"):
        _agc_call([g], [g.clone()], 0.0)
    with pytest.raises(ValueError, match="one parameter per gradient, got 1 gradients and 2"):
        _agc_call([g], [g.clone(), g.clone()])


@gpu
def test_agc_agrees_with_the_cpu_kernel():
    if not has_kernel("cpu"):
        pytest.skip("no C++ CPU kernel in this build")
    grads, params = _agc_pairs(65, torch.float32, torch.float32)
    cpu_grads = _cpu(grads)
    got = _agc_call(grads, params)
    cpu = OPS.adaptive_clip(cpu_grads, _cpu(params), 0.01, 1e-3, 2.0)
    assert torch.equal(got[1].cpu(), cpu[1]) and torch.equal(got[2].cpu(), cpu[2])
    torch.testing.assert_close(got[0].cpu(), cpu[0], rtol=RTOL32, atol=0)
    for g, c in zip(grads, cpu_grads):
        assert_ulp_close(g.cpu(), c.double(), 1)


@gpu
def test_agc_no_host_sync_and_functional_api():
    grads, params = _agc_pairs(66, torch.float32, torch.bfloat16)
    fresh_g, fresh_w = _agc_pairs(67, torch.bfloat16, torch.float32, "transposed")
    counts = _agc_oracle(grads, params)[1]
    ps = []
    for g, w in zip(grads, params):
        q = torch.nn.Parameter(w.to(g.dtype))  # (a .grad must have its parameter's dtype)
        q.grad = g.clone()
        ps.append(q)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _agc_call(grads, params)
        _agc_call(fresh_g, fresh_w)  # a table built inside the checked region
        _agc_call([grads[1], grads[1]], [params[1], params[1]])  # the shared-memory path
        stats = gradstab.adaptive_clip_grad_(ps, clip_factor=0.01)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert isinstance(stats, gradstab.AGCStats) and stats.norms.device.type == "cuda"
    assert stats.clipped.tolist() == counts


@gpu
@pytest.mark.parametrize("warm", [True, False])
def test_agc_cuda_graph_capture_and_replay(warm):
    grads, params = _agc_pairs(68, torch.float32, torch.float32)
    built = _ext()._cuda_cache_info()["built_in_capture"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        if warm:  # the eager call builds the work table: the graph only reads it
            _agc_call(grads, params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _agc_call(grads, params)
    assert _ext()._cuda_cache_info()["built_in_capture"] == built + (0 if warm else 1)
    for trial, seed in enumerate([69, 70]):
        fresh, fresh_w = _agc_pairs(seed, torch.float32, torch.float32)
        for g, f in zip(grads, fresh):
            g.copy_(f)
        for w, f in zip(params, fresh_w):
            w.copy_(f * (1.0 + trial))
        expect_g, expect_w = _clone(grads), _clone(params)
        expect = _agc_call(expect_g, expect_w)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(out, expect):
            assert torch.equal(_bits(a), _bits(b)), trial
        for a, b in zip(grads, expect_g):
            assert torch.equal(_bits(a), _bits(b)), trial


@gpu
def test_agc_on_a_side_stream():
    grads, params = _agc_pairs(71, torch.float32, torch.float32)
    expected = _agc_oracle(grads, params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _agc_call(grads, params)
    torch.cuda.current_stream().wait_stream(side)
    _assert_agc(grads, params, got, expected)


@gpu
def test_agc_opcheck_and_compile_on_cuda():
    grads, params = _agc_pairs(72, torch.float32, torch.float32, shapes=[(4, 3), (5,), (3, 5000)])
    torch.library.opcheck(OPS.adaptive_clip.default, (grads, params, 0.05, 1e-3, 2.0))
    ps = []
    for g, w in zip(*_agc_pairs(73, torch.float32, torch.float32)):
        q = torch.nn.Parameter(w)
        q.grad = g
        ps.append(q)
    ref = [p.grad.clone() for p in ps]
    ref_stats = _agc_call(ref, [p.detach() for p in ps])

    @torch.compile(fullgraph=True)
    def step(parameters):
        return gradstab.adaptive_clip_grad_(parameters, clip_factor=0.01)

    stats = step(ps)
    assert torch.equal(_bits(stats.total_norm), _bits(ref_stats[3]))
    assert all(torch.equal(_bits(p.grad), _bits(r)) for p, r in zip(ps, ref))


@gpu
def test_agc_bench_mode_on_cuda():
    from gradstab.tools.bench import bench_one  # noqa: PLC0415

    rows = bench_one(
        "many-small", "fp32", ["agc", "agc-healthy"], device=torch.device(DEV), warmup=0, repeats=1
    )
    names = {(r.mode, r.contestant) for r in rows}
    assert ("agc", "gradstab") in names and ("agc-healthy", "timm-style loop") in names


# ------------------------------------------------------------------ over 2**31 elements --


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 0


@gpu
@pytest.mark.skipif(_free_bytes() < 16 * 2**30, reason="needs 16 GiB of free GPU memory")
def test_bfloat16_tensor_over_2_pow_31_elements():
    n = 2**31 + 4099
    big = torch.empty(n, dtype=torch.bfloat16, device=DEV)
    chunk = 2**27
    gen = _gen(40)
    for s in range(0, n, chunk):  # filled piece by piece (float32 temporaries stay small)
        e = min(n, s + chunk)
        big[s:e] = torch.randn(e - s, generator=gen, device=DEV).to(torch.bfloat16)
    big[n - 1] = 7.5  # the largest |x|, past 2**31
    small = torch.full((3,), 0.25, dtype=torch.float64, device=DEV)  # float64 results
    sq = torch.zeros((), dtype=torch.float64, device=DEV)
    for s in range(0, n, chunk):
        sq += big[s : min(n, s + chunk)].double().square().sum()
    oracle = math.sqrt(float(sq))
    norms, max_abs, nonfinite, _ = OPS.grad_stats([big, small], 2.0)
    assert math.isclose(float(norms[0]), oracle, rel_tol=RTOL32)
    assert float(max_abs[0]) == 7.5 and int(nonfinite[0]) == 0
    head, tail = big[:4096].clone(), big[-4096:].clone()
    got = OPS.clip_norm([big, small], _bound(oracle / 2), 2.0, EPS, False)
    coef = (oracle / 2) / (float(got[3]) + EPS)
    assert torch.equal(_bits(big[:4096]), _bits(_scaled(head, coef)))
    assert torch.equal(_bits(big[-4096:]), _bits(_scaled(tail, coef)))
    del big
    torch.cuda.empty_cache()


# ------------------------------------------- the benchmark's CUDA additions (run anywhere) --


def test_bench_llama1b_set_has_the_published_totals():
    from gradstab.tools.bench import llama32_1b_shapes  # noqa: PLC0415

    shapes = dict(llama32_1b_shapes())
    assert len(shapes) == 146
    assert sum(math.prod(s) for s in shapes.values()) == 1_235_814_400
    assert shapes["model.layers.15.self_attn.k_proj.weight"] == (512, 2048)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (2048, 8192)


def test_bench_sets_gpu_only_on_cuda_unless_named():
    from gradstab.tools import bench  # noqa: PLC0415

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.command._resolve_sets(None, False, cpu) == ["gpt2", "resnet50", "many-small"]
    assert bench.command._resolve_sets(bench.command._parse_sets("all"), False, cpu) == list(
        bench.PARAM_SETS
    )
    assert bench.command._resolve_sets(None, False, cuda)[-1] == "llama1b"
    assert (
        bench.command._resolve_sets(bench.command._parse_sets("all"), False, cuda)[-1] == "llama1b"
    )
    assert bench.command._resolve_sets(bench.command._parse_sets("llama1b"), False, cpu) == [
        "llama1b"
    ]
    assert bench.command._resolve_sets(None, True, cuda) == list(bench.config.QUICK_SETS)
    assert bench.command._default_repeats("llama1b", False) == bench.sets.GPU_REPEATS["llama1b"]


def test_bench_rotation():
    from gradstab.tools import bench  # noqa: PLC0415

    assert bench.rotation_copies(10, torch.device("cpu")) == 1
    assert bench.rotation_copies(10, torch.device("cuda"), requested=40) == bench.cuda.MAX_ROTATE
    calls = []
    fns = [lambda k=k: calls.append(("fn", k)) for k in range(3)]
    afters = [lambda k=k: calls.append(("after", k)) for k in range(2)] + [None]
    rot = bench.cuda._Rotation(fns, afters)
    for _ in range(4):
        rot.call()
        rot.after()
    assert calls == [
        ("fn", 0),
        ("after", 0),
        ("fn", 1),
        ("after", 1),
        ("fn", 2),
        ("fn", 0),
        ("after", 0),
    ]
    # copies of a set: same gradients, separate memory
    params = [torch.nn.Parameter(torch.zeros(3))]
    params[0].grad = torch.arange(3.0)
    ((copy, flat, outliers),) = bench.cuda.make_rotation_copies(params, torch.ones(4), 2, 1.5)
    assert torch.equal(copy[0].grad, params[0].grad)
    assert copy[0].grad.data_ptr() != params[0].grad.data_ptr()
    assert outliers is not None and outliers.count == 1 and torch.equal(flat, torch.ones(4))


def test_bench_cuda_summary_checks_the_targets():
    from gradstab.tools.bench import Result, cuda_summary  # noqa: PLC0415

    def row(name, kind, ms, floor=None):
        return Result("gpt2", "fp32", "healthy", name, kind, [ms], 400_000_000, floor=floor)

    ours = row("gradstab", "gradstab", 0.16)
    ours.floor_ms = 0.14
    rows = [ours, row("torch foreach=True", "baseline", 0.5), row("floor", "floor", 0.14, "read")]
    text = cuda_summary(rows)
    assert "| gpt2 | fp32 | healthy | gradstab | 2500 | 2857 | 0.88 | 3.12x" in text
    assert "target >= 2.5x torch foreach=True, >= 85% of floor: met" in text
    ours.times_ms = [0.25]
    assert "NOT met" in cuda_summary(rows)

    # A target against another contestant than the mode's summary baseline (stats: the table
    # compares with torch._foreach_norm, one target is Lightning's grad_norm at >= 50x).
    def srow(name, kind, ms):
        return Result("gpt2", "fp32", "stats", name, kind, [ms], 400_000_000)

    ours = srow("gradstab", "gradstab", 0.2)
    ours.floor_ms = 0.14
    rows = [ours, srow("torch._foreach_norm", "baseline", 0.3)]
    rows.append(srow("lightning grad_norm", "baseline", 12.0))
    text = cuda_summary(rows)
    assert "| stats | gradstab | 2000 | 2857 | 0.70 | 1.50x torch._foreach_norm |" in text
    assert "1.50x, 70% of floor; target >= 1.0x torch._foreach_norm: met" in text
    assert "60.00x, 70% of floor; target >= 50.0x lightning grad_norm: met" in text
    rows[2].times_ms = [8.0]
    text = cuda_summary(rows)
    assert "40.00x, 70% of floor; target >= 50.0x lightning grad_norm: NOT met" in text
