"""What only the GPU has, for the fused CUDA kernels (csrc/cuda); skipped without CUDA.

The op tests themselves (statistics and clipping against the reference kernel and float64
oracles, on the kernels' case tables: ``test_ops.py``, ``test_agc.py``, ``test_errors.py``,
``test_functional.py``, ``test_compile.py``, ``test_dropin.py``, ...) are parametrised over
``gradstab_testing.devices.DEVICES`` and run on CUDA there. This file holds what has no CPU
counterpart: the CUDA build and its kernel registrations; the CUDA kernel against the C++ CPU
kernel; results independent of the grid size (``_cuda_set_max_blocks``); no host
synchronisation; CUDA graph capture and replay; the descriptor-table cache (hits, eviction,
tables built in a capture, on one stream and used on another); side streams; the direct entry
point ``gradstab._C.cuda_fast_path``; where the CUDA kernels differ from the CPU kernel on
purpose (expanded gradients, CPU bounds, errors across devices); tensors over 2**31 elements;
and the benchmark's CUDA additions (which run anywhere). Clipped gradients are compared bit for
bit with the documented arithmetic (``kernel_cases.scaled``: PyTorch's multiply in the gradient's
dtype, float32 in double where the coefficient is not a normal float32) wherever the coefficient
is known exactly.

Run on a GPU machine with ``benchmarks/gpu/run_gpu_checks.sh`` (build, these tests and every
device-parametrised test's CUDA case, the compute-sanitizer runs, the benchmark) or
``python -m pytest -q tests/test_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing import kernel_cases
from gradstab_testing.kernel_cases import CLIP_OPS, EPS, FLOAT_DTYPES, RTOL32
from gradstab_testing.oracles import (
    assert_bitwise_equal,
    assert_grads_match,
    assert_stats_match,
    assert_ulp_close,
    scale_ulps,
)

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
# The case tables and oracles are kernel_cases' (shared with the device-parametrised op tests
# and test_cuda_sim.py); these names keep this file's spelling, on DEV.
_randn = kernel_cases.randn
_make = kernel_cases.make_grad
_cpu = kernel_cases.cpu_copies
_assert_stats = kernel_cases.assert_stats
_scaled = kernel_cases.scaled
_bits = kernel_cases.bits
_units = kernel_cases.units
_agc_oracle = kernel_cases.agc_oracle
_assert_agc = kernel_cases.assert_agc
_assert_agc_stats = kernel_cases.assert_agc_stats
_clone = kernel_cases.clones
_param = kernel_cases.as_param


def _gen(seed: int) -> torch.Generator:
    return kernel_cases.generator(seed, DEV)


def _bound(v: float) -> torch.Tensor:
    return kernel_cases.bound(v, DEV)


def _clip_list(seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    """Every dtype and layout, plus a float64 gradient (float64 results: exact coefficients)."""
    return kernel_cases.clip_list(seed, DEV, scale)


def _agc_pairs(seed: int, gdtype, wdtype, layout="contiguous", shapes=kernel_cases.AGC_SHAPES):
    return kernel_cases.agc_pairs(seed, gdtype, wdtype, layout, shapes, device=DEV)


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
def test_agrees_with_the_cpu_kernel():
    if not has_kernel("cpu"):
        pytest.skip("no C++ CPU kernel in this build")
    gen = _gen(4)
    grads = [_make(n, d, "contiguous", gen) for d in FLOAT_DTYPES for n in (3, 4097, 70000)]
    got = OPS.grad_stats(grads, 2.0)
    cpu = OPS.grad_stats(_cpu(grads), 2.0)  # the CPU kernel, same contract
    _assert_stats(got, cpu, RTOL32)  # both within the contract of the float64 norm


# ----------------------------------------------- clipping: where CUDA differs from the CPU --


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


# ------------------------------ shared memory: grid sizes, and where CUDA differs from CPU --


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


# ------------------------------------------------------- adaptive_clip (AGC) on the GPU --


def _agc_call(grads, params, clip_factor=0.01, eps=1e-3, p=2.0):
    return OPS.adaptive_clip(grads, params, clip_factor, eps, p)


@gpu
def test_agc_kernel_registered():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradstab::adaptive_clip", "CUDA")


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
    assert_ulp_close(g.cpu(), twice.reshape(x.shape), scale_ulps(g.dtype, 2))
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
        assert_ulp_close(g.cpu(), c.double(), scale_ulps(g.dtype))


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
