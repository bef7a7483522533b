"""Unit-wise adaptive gradient clipping (``gradstab.adaptive_clip_grad_``, op ``adaptive_clip``).

The oracle is the paper's rule (Brock et al. 2021, eq. 3) written out unit by unit in float64
(``gradstab_testing.oracles.agc_oracle``): ``max_i = clip_factor * max(||W_i||, eps)``;
``G_i *= max_i / ||G_i||`` iff ``||G_i|| > max_i``. The kernels (C++ on CPU, pure PyTorch) are
checked against it and against each other; the tests that take a ``device`` run on every
device in ``DEVICES`` (the CUDA kernel on a GPU).
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    agc_oracle,
    agc_unit_rows,
    assert_bitwise_equal,
    assert_grads_match,
    assert_rel_close,
    assert_ulp_close,
    child_env,
    clone_grads,
    scale_ulps,
)

import gradstab
from gradstab import reference
from gradstab._extension import has_kernel
from gradstab._library import OPS

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
CPP = has_kernel("cpu")
#: "op": the dispatcher (the compiled kernel of the tensors' device: C++ on CPU, CUDA on CUDA);
#: "reference": the pure-PyTorch kernel, called directly.
KERNELS = ["op", "reference"] if CPP else ["reference"]

# conv 4-D, linear 2-D, 1-D, 0-D, zero-size, and units longer than the kernel's 65,536-element
# work item (split into pieces)
SHAPES = [(6, 3, 3, 3), (5, 7), (9,), (), (0, 4), (3, 0), (2, 70_001), (140_003,)]


def run(kernel: str, grads, params, clip_factor=0.01, eps=1e-3, *, p=2.0):
    if kernel == "op":
        return OPS["adaptive_clip"](grads, params, clip_factor, eps, p)
    return reference.adaptive_clip(grads, params, clip_factor, eps, p)


def ulp_close(actual: torch.Tensor, expected64: torch.Tensor, rtol64: float = 1e-6) -> bool:
    """``actual`` equals ``expected64`` within :func:`scale_ulps` of actual's dtype.

    The kernels' unit norms are exact to ~1e-7 relative (float32 partial sums), so the
    rounded result may differ from the float64 oracle's rounding by one ulp; float32 is
    multiplied by the coefficient rounded to float32 (PyTorch's arithmetic), one more.
    """
    a = actual.to(torch.float64)
    if actual.dtype == torch.float64:
        tol = rtol64 * expected64.abs()
    else:
        eps = torch.finfo(actual.dtype).eps
        tiny = torch.finfo(actual.dtype).smallest_normal
        tol = torch.clamp(expected64.abs() * eps, min=tiny) * 1.01 * scale_ulps(actual.dtype)
    both_nan = torch.isnan(a) & torch.isnan(expected64)
    same_inf = torch.isinf(a) & (a == expected64)
    return bool(((a - expected64).abs() <= tol).logical_or(both_nan).logical_or(same_inf).all())


def make_pairs(shapes, gdtype, wdtype, seed, *, wscale=1.0, gscale=0.02):
    gen = torch.Generator().manual_seed(seed)
    grads, params = [], []
    for s in shapes:
        w = torch.randn(s, generator=gen, dtype=torch.float64) * wscale
        # a spread of gradient/weight ratios so that some units clip and others do not
        g = torch.randn(s, generator=gen, dtype=torch.float64) * gscale
        if len(s) >= 2 and s[0] > 1:
            g *= torch.logspace(-1, 1, s[0], dtype=torch.float64).reshape(-1, *[1] * (len(s) - 1))
        grads.append(g.to(gdtype))
        params.append(w.to(wdtype))
    return grads, params


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gdtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_float64_oracle(kernel, gdtype, seed):
    grads, params = make_pairs(SHAPES, gdtype, torch.float32, seed)
    params[1][2].zero_()  # a zero-weight unit: eps floor
    expected = [agc_oracle(g, w, 0.01, 1e-3) for g, w in zip(grads, params)]
    norms, clipped, nonfinite, total = run(kernel, grads, params)
    rd = torch.float64 if gdtype == torch.float64 else torch.float32
    assert norms.dtype == rd and total.dtype == rd and clipped.dtype == torch.int64
    for g, (want, n), c in zip(grads, expected, clipped.tolist()):
        assert ulp_close(g, want)
        assert c == n
    assert sum(n for _, n in expected) > 0  # the case really clips
    assert any(n < agc_unit_rows(g).shape[0] for g, (_, n) in zip(grads, expected) if g.numel())
    assert nonfinite.tolist() == [0] * len(grads)


def test_stats_are_pre_clip_norms():
    grads, params = make_pairs(SHAPES, torch.float32, torch.float32, 3)
    before = [torch.linalg.vector_norm(g.double()) for g in grads]
    for kernel in KERNELS:
        gs = [g.clone() for g in grads]
        norms, _, _, total = run(kernel, gs, params)
        torch.testing.assert_close(norms.double(), torch.stack(before), rtol=1e-6, atol=0)
        torch.testing.assert_close(
            total.double(), torch.linalg.vector_norm(torch.stack(before)), rtol=1e-6, atol=0
        )


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_other_norm_types(kernel, p):
    grads, params = make_pairs([(4, 5, 2), (6,), (3, 9)], torch.float32, torch.float32, 5)
    expected = [agc_oracle(g, w, 0.05, 1e-3, p) for g, w in zip(grads, params)]
    _, clipped, _, _ = run(kernel, grads, params, 0.05, 1e-3, p=p)
    for g, (want, n), c in zip(grads, expected, clipped.tolist()):
        assert ulp_close(g, want) and c == n


@pytest.mark.parametrize("kernel", KERNELS)
def test_mixed_dtypes_params_and_grads_differ(kernel):
    shapes = [(4, 3, 2, 2), (5, 6), (7,), (3, 8)]
    gdtypes = [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    wdtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    gen = torch.Generator().manual_seed(7)
    grads = [(torch.randn(s, generator=gen) * 0.05).to(d) for s, d in zip(shapes, gdtypes)]
    params = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, wdtypes)]
    expected = [agc_oracle(g, w, 0.01, 1e-3) for g, w in zip(grads, params)]
    norms, clipped, _, _ = run(kernel, grads, params)
    assert norms.dtype == torch.float64  # one float64 gradient
    for g, (want, n), c in zip(grads, expected, clipped.tolist()):
        assert ulp_close(g, want) and c == n


def _noncontiguous(gen):
    """(grad, param) pairs with strided, transposed and channels_last layouts."""
    base_g = torch.randn(6, 10, generator=gen) * 0.05
    base_w = torch.randn(10, 6, generator=gen)  # contiguous weight, transposed gradient
    conv_g = (torch.randn(8, 3, 3, 3, generator=gen) * 0.05).to(memory_format=torch.channels_last)
    conv_w = torch.randn(8, 3, 3, 3, generator=gen)
    wide = torch.randn(5, 12, generator=gen) * 0.05
    return [
        (base_g.t(), base_w),  # transposed gradient (units not contiguous)
        (torch.randn(10, 6, generator=gen) * 0.05, torch.randn(6, 10, generator=gen).t()),
        (conv_g, conv_w.to(memory_format=torch.channels_last)),  # channels_last both
        (wide[:, ::2], torch.randn(5, 12, generator=gen)[:, 1::2]),  # strided slices
        (torch.randn(9, generator=gen)[::3] * 0.05, torch.randn(3, 2, generator=gen)[:, 0]),
    ]


@pytest.mark.parametrize("kernel", KERNELS)
def test_non_contiguous(kernel):
    gen = torch.Generator().manual_seed(11)
    pairs = _noncontiguous(gen)
    grads = [g for g, _ in pairs]
    params = [w for _, w in pairs]
    storages = [(g.data_ptr(), g.stride()) for g in grads]
    expected = [agc_oracle(g, w, 0.01, 1e-3) for g, w in pairs]
    _, clipped, _, _ = run(kernel, grads, params)
    for g, (want, n), c, (ptr, stride) in zip(grads, expected, clipped.tolist(), storages):
        assert ulp_close(g, want) and c == n
        assert (g.data_ptr(), g.stride()) == (ptr, stride)  # written in place


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_weights_use_eps_floor(kernel, device):
    g = torch.full((3, 4), 0.5, device=device)
    w = torch.zeros(3, 4, device=device)
    w[1] = 1.0  # norm 2
    _, clipped, _, _ = run(kernel, [g], [w], 0.1, 1e-3)
    assert clipped.tolist() == [3]
    norms = torch.linalg.vector_norm(g.cpu().double(), dim=1)
    torch.testing.assert_close(norms, torch.tensor([1e-4, 0.2, 1e-4], dtype=torch.float64))
    # eps = 0: zero-weight units are clipped to zero; zero gradients stay zero (no 0/0)
    g = torch.tensor([[1.0, 2.0], [0.0, 0.0]], device=device)
    _, clipped, _, _ = run(kernel, [g], [torch.zeros(2, 2, device=device)], 0.1, 0.0)
    assert clipped.tolist() == [1]
    assert torch.equal(g.cpu(), torch.zeros(2, 2))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_follow_the_float64_formula(kernel, gdtype):
    g = torch.tensor(
        [
            [0.5, float("nan"), 0.5],  # NaN unit: comparison false, unchanged
            [0.5, float("inf"), -0.5],  # inf unit: coefficient 0 -> 0, NaN (inf * 0), -0
            [3.0, 4.0, 0.0],  # ordinary unit, clipped
            [0.1, 0.1, 0.1],  # weight norm NaN: max_norm NaN, unchanged
        ],
        dtype=gdtype,
    )
    w = torch.ones(4, 3)
    w[3, 0] = float("nan")
    want, n = agc_oracle(g, w, 0.1, 1e-3)
    norms, clipped, nonfinite, total = run(kernel, [g], [w], 0.1, 1e-3)
    assert ulp_close(g, want)
    assert torch.equal(torch.isnan(g), torch.isnan(want))
    assert clipped.tolist() == [n] == [2]
    assert nonfinite.tolist() == [2]
    assert math.isnan(float(norms[0])) and math.isnan(float(total))


@pytest.mark.parametrize("kernel", KERNELS)
def test_huge_and_tiny_values(kernel):
    g = torch.tensor([[3e30, 4e30], [3e-30, 4e-30]], dtype=torch.float32)
    w = torch.tensor([[1e38, 1e38], [1e-30, 0.0]], dtype=torch.float32)
    norms, clipped, _, _ = run(kernel, [g], [w], 1e-8, 0.0)
    assert math.isfinite(float(norms[0]))
    torch.testing.assert_close(float(norms[0]), 5e30, rtol=1e-6, atol=0)
    want, n = agc_oracle(torch.tensor([[3e30, 4e30], [3e-30, 4e-30]]), w, 1e-8, 0.0)
    assert ulp_close(g, want) and clipped.tolist() == [n] == [2]
    g64 = torch.tensor([1e200, 1e200], dtype=torch.float64)
    norms, clipped, _, _ = run(kernel, [g64], [torch.tensor([1e300, 0.0], dtype=torch.float64)])
    torch.testing.assert_close(float(norms[0]), math.sqrt(2) * 1e200, rtol=1e-12, atol=0)
    assert clipped.tolist() == [0]


@pytest.mark.skipif(not CPP, reason="needs the C++ kernel")
@pytest.mark.parametrize("gdtype", DTYPES)
def test_cpp_agrees_with_reference(gdtype):
    grads, params = make_pairs([*SHAPES, (300, 40), (33, 5, 5)], gdtype, torch.float32, 21)
    g_ref = [g.clone() for g in grads]
    a = OPS["adaptive_clip"](grads, params, 0.01, 1e-3, 2.0)
    b = reference.adaptive_clip(g_ref, params, 0.01, 1e-3, 2.0)
    torch.testing.assert_close(a[0], b[0], rtol=1e-6, atol=0)
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
    torch.testing.assert_close(a[3], b[3], rtol=1e-6, atol=0)
    for x, y in zip(grads, g_ref):
        assert ulp_close(x, y.double())


@pytest.mark.skipif(not CPP, reason="needs the C++ kernel")
def test_deterministic_across_runs_and_threads():
    grads, params = make_pairs(
        [(64, 32, 3, 3), (3, 70_001), (200_000,)], torch.float32, torch.float32, 4
    )
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 1):
            torch.set_num_threads(n)
            gs = [g.clone() for g in grads]
            stats = OPS["adaptive_clip"](gs, params, 0.01, 1e-3, 2.0)
            results.append((gs, stats))
    finally:
        torch.set_num_threads(threads)
    for gs, stats in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(gs, results[0][0]))
        assert all(torch.equal(a, b) for a, b in zip(stats, results[0][1]))


@pytest.mark.skipif(not CPP, reason="needs the C++ kernel")
def test_unclipped_units_are_not_written():
    # A read-only view would fail if written; instead watch that bits of unclipped units,
    # including a NaN payload, survive exactly and that nothing is touched when no unit clips.
    g = torch.randn(4, 100) * 1e-6
    w = torch.randn(4, 100)
    g[2, 5] = float("nan")
    before = g.clone()
    _, clipped, _, _ = OPS["adaptive_clip"]([g], [w], 0.01, 1e-3, 2.0)
    assert clipped.tolist() == [0]
    assert torch.equal(g.view(torch.int32), before.view(torch.int32))


# ------------------------------------------ gradients that share memory (views, duplicates) --


def unit_coefs(g: torch.Tensor, w: torch.Tensor, clip_factor: float, eps: float, p: float = 2.0):
    """Float64 AGC coefficient of every unit of ``g`` (1 where not clipped), unit by unit."""
    rows_g = agc_unit_rows(g.detach().to(torch.float64))
    rows_w = agc_unit_rows(w.detach().to(torch.float64))
    coefs = torch.ones(rows_g.shape[0], dtype=torch.float64)
    for i in range(rows_g.shape[0]):
        gn = float(torch.linalg.vector_norm(rows_g[i], p))
        wn = float(torch.linalg.vector_norm(rows_w[i], p))
        max_norm = clip_factor * (eps if wn < eps else wn)
        if gn > max_norm:
            coefs[i] = max_norm / gn
    return coefs


def sequential_oracle(buf: torch.Tensor, views, params, clip_factor=0.01, eps=1e-3):
    """Float64 copy of ``buf`` after AGC on the gradients ``view(buf)`` for each view.

    The contract for gradients (and parameters) that share memory: every unit is decided
    from the data as it was on entry, then the gradients are scaled in list order, each by
    its entry coefficients (a gradient passed twice is scaled twice). ``params`` may be
    callables of ``buf`` as well (a parameter aliasing a gradient).
    """
    out = buf.detach().to(torch.float64).clone()
    entry = out.clone()
    ws = [w(entry) if callable(w) else w for w in params]
    coefs = [unit_coefs(view(entry), w, clip_factor, eps) for view, w in zip(views, ws)]
    for view, c in zip(views, coefs):
        v = view(out)
        v.mul_(c.reshape(-1, *[1] * (v.dim() - 1)) if v.dim() >= 2 else c)  # in place in out
    return out


def _assert_buffer(actual: torch.Tensor, expected64: torch.Tensor, scalings: int, what: str):
    """A buffer against its float64 oracle: :func:`scale_ulps` per scaling of an element."""
    if actual.dtype == torch.float64:  # float64 norms (and weights): 1e-12 per scaling
        assert_grads_match([actual], [expected64], 1e-12 * scalings, what)
    else:
        assert_ulp_close(actual, expected64, scale_ulps(actual.dtype, scalings), what)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("needs_clip", [True, False])
def test_expanded_gradient_refused_before_any_write(kernel, needs_clip):
    """An expanded gradient (elements sharing memory) cannot be written in place: if one of
    its units must be clipped, a ValueError names it and no gradient changes at all (the
    others would have been clipped in the parallel pass before); if none must, the call
    clips the others and leaves it alone."""
    gen = torch.Generator().manual_seed(30)
    grads = [
        torch.randn(64, 2048, generator=gen) * 0.5,  # parallel pass, clipped
        torch.randn(70_001, generator=gen).to(torch.bfloat16),  # a long unit (pieces)
        (torch.randn(40, 30, generator=gen) * 0.5).t(),  # strided units: a copy, written back
        torch.randn(1, 5, generator=gen).expand(3, 5),  # expanded: row 0 shared by all rows
    ]
    params = [
        torch.randn(64, 2048, generator=gen),
        torch.randn(70_001, generator=gen),
        torch.randn(30, 40, generator=gen),
        torch.full((3, 5), 1.0 if needs_clip else 1e6),
    ]
    base = grads[3]._base if grads[3]._base is not None else grads[3]
    before = [g.clone() for g in grads]
    base_before = base.clone()
    if needs_clip:
        with pytest.raises(
            ValueError, match=r"gradient 3 of 4 \(shape \[3, 5\]\) must be clipped.*No gradient"
        ):
            run(kernel, grads, params)
        for g, b in zip(grads, before):
            assert_bitwise_equal(g, b, "no gradient may change")
    else:
        expected = [agc_oracle(g, w, 0.01, 1e-3) for g, w in zip(grads, params)]
        _, clipped, _, _ = run(kernel, grads, params)
        assert clipped.tolist() == [n for _, n in expected]
        assert clipped[:3].min() > 0 and int(clipped[3]) == 0
        for g, (want, _) in zip(grads[:3], expected):
            assert ulp_close(g, want)
    assert_bitwise_equal(base, base_before, "the expanded gradient's memory")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_duplicate_gradient_is_clipped_twice_in_list_order(kernel, dtype, num_threads):
    """The same gradient twice (with its parameter twice): both entries decided on the entry
    data, then scaled one after the other (coefficient squared), deterministically. The
    parallel pass used to scale it from two threads at once (some units once, some twice)."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(31)
    spread = torch.logspace(-3, 0, 256, dtype=torch.float64)[:, None]  # some units clip
    x = (torch.randn(256, 300, generator=gen, dtype=torch.float64) * spread).to(dtype)
    w = torch.randn(256, 300, generator=gen, dtype=dtype)  # float64: exact coefficients
    other_g = torch.randn(5, 7, generator=gen, dtype=dtype)
    other_w = torch.randn(5, 7, generator=gen)
    want_other, _ = agc_oracle(other_g, other_w, 0.01, 1e-3)
    want = sequential_oracle(x, [lambda b: b, lambda b: b], [w, w])
    n_clipped = int((unit_coefs(x, w, 0.01, 1e-3) < 1).sum())
    assert 0 < n_clipped < 256
    results = []
    for _ in range(3):
        g = x.clone()
        og = other_g.clone()
        norms, clipped, _, total = run(kernel, [g, og, g], [w, other_w, w])
        assert clipped.tolist() == [n_clipped, int(clipped[1]), n_clipped]
        entry = torch.linalg.vector_norm(x.double())
        torch.testing.assert_close(norms[0].double(), entry, rtol=1e-6, atol=0)
        torch.testing.assert_close(norms[2], norms[0], rtol=0, atol=0)  # statistics on entry
        _assert_buffer(g, want, 2, "duplicate")
        assert ulp_close(og, want_other)
        results.append((g, norms, clipped, total))
    for g, *stats in results[1:]:  # run to run: bit-identical
        assert_bitwise_equal(g, results[0][0], "rerun")
        for a, b in zip(stats, results[0][1:]):
            assert_bitwise_equal(a, b, "rerun stats")


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlapping_views_are_clipped_in_list_order(kernel, dtype, num_threads):
    """Overlapping views of one buffer (rows shared by two gradients, a transposed view with
    its units across the others', a long 1-D unit over everything): each view's units are
    decided on the entry data, and the views are scaled in list order."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(32)
    spread = torch.logspace(-4, -1, 80_000, dtype=torch.float64)  # some units clip
    buf = (torch.randn(80_000, generator=gen, dtype=torch.float64) * spread).to(dtype)
    views = [
        lambda b: b[:40_000].view(200, 200),
        lambda b: b[30_000:70_000].view(400, 100),  # its first 100 rows are rows 150..199 above
        lambda b: b[:40_000].view(200, 200).t(),  # units are columns: processed on a copy
        lambda b: b[10_000:],  # one unit of 70,000 elements: pieces
    ]

    def rows(n):  # weight norms growing along dim 0: some units clip, others not
        return torch.logspace(-3, 1, n, dtype=dtype)[:, None]

    params = [
        torch.randn(200, 200, generator=gen, dtype=dtype) * rows(200),
        torch.randn(400, 100, generator=gen, dtype=dtype) * rows(400),
        torch.randn(200, 200, generator=gen, dtype=dtype) * rows(200),
        torch.full((70_000,), 0.01, dtype=dtype),
    ]
    want = sequential_oracle(buf, views, params)
    for v, w in zip(views, params):
        c = unit_coefs(v(buf), w, 0.01, 1e-3)
        assert (c < 1).any(), "clipped units"
        assert c.numel() == 1 or (c == 1).any(), "and units not clipped"
    got = buf.clone()
    grads = [v(got) for v in views]
    stats = run(kernel, grads, params)
    ref_stats = reference.grad_stats([v(buf) for v in views], 2.0)
    torch.testing.assert_close(stats[0], ref_stats[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(stats[3], ref_stats[3], rtol=1e-6, atol=0)
    _assert_buffer(got, want, 4, "overlapping views")  # an element lies in up to 4 views


@pytest.mark.parametrize("kernel", KERNELS)
def test_parameter_aliasing_a_gradient_is_read_on_entry(kernel, num_threads):
    """A parameter that is (a view of) another pair's gradient: its unit norms are those of
    the data on entry, not of the half-clipped gradient another thread is writing."""
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(33)
    spread = torch.logspace(-4, 0, 300)[:, None]
    buf = torch.randn(2, 300, 200, generator=gen) * torch.stack([spread, spread.flip(0)])
    w1 = torch.randn(300, 200, generator=gen) * 0.5
    views = [lambda b: b[0], lambda b: b[1]]
    params = [lambda b: b[1], w1]  # gradient 0's parameter is gradient 1
    want = sequential_oracle(buf, views, params)
    got = buf.clone()
    _, clipped, _, _ = run(kernel, [got[0], got[1]], [got[1], w1])
    assert clipped.tolist() == [
        int((unit_coefs(buf[0], buf[1], 0.01, 1e-3) < 1).sum()),
        int((unit_coefs(buf[1], w1, 0.01, 1e-3) < 1).sum()),
    ]
    assert 0 < int(clipped[0]) < 300 and 0 < int(clipped[1]) < 300
    _assert_buffer(got, want, 1, "aliased parameter")
    # the same tensor as gradient and parameter: every unit clipped to clip_factor * norm
    g = torch.randn(50, 40, generator=gen)
    g0 = g.clone()
    run(kernel, [g], [g])
    assert_grads_match([g], [g0.double() * 0.01], 1e-12, "g clipped by its own norm")


@pytest.mark.skipif(not CPP, reason="needs the C++ kernel")
def test_memory_sharing_agrees_with_reference_and_interleaved_views_are_fine(num_threads):
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(34)
    buf = torch.randn(3, 100_000, generator=gen) * 0.05
    w = torch.randn(3, 50_000, generator=gen)
    a, b = buf.clone(), buf.clone()
    out_cpp = run("op", [a[:, ::2], a[:, 1::2], a[:, ::2]], [w, w, w])
    out_ref = run("reference", [b[:, ::2], b[:, 1::2], b[:, ::2]], [w, w, w])
    for x, y in zip(out_cpp, out_ref):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)
    assert_ulp_close(a, b.double(), 2, "C++ against the reference")
    # interleaved disjoint views (conservatively written one at a time): as if separate
    c = buf.clone()
    grads = [c[:, ::2], c[:, 1::2]]
    separate = clone_grads(grads)
    OPS["adaptive_clip"](grads, [w, w], 0.01, 1e-3, 2.0)
    OPS["adaptive_clip"](separate, [w, w], 0.01, 1e-3, 2.0)
    for x, y in zip(grads, separate):
        assert_bitwise_equal(x.contiguous(), y.contiguous(), "interleaved views")


def test_functional_api_skips_none_and_returns_stats():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 4)
    conv = torch.nn.Conv2d(2, 3, 3)
    frozen = torch.nn.Parameter(torch.randn(5))  # no grad: skipped
    params = [*lin.parameters(), *conv.parameters(), frozen]
    for p in params[:-1]:
        p.grad = torch.randn_like(p)
    expected = [agc_oracle(p.grad, p, 0.02, 1e-3) for p in params[:-1]]
    stats = gradstab.adaptive_clip_grad_(params, clip_factor=0.02)
    assert isinstance(stats, gradstab.AGCStats)
    assert stats.clipped.tolist() == [n for _, n in expected]
    for p, (want, _) in zip(params[:-1], expected):
        assert ulp_close(p.grad, want)
    assert frozen.grad is None
    one = torch.nn.Parameter(torch.ones(3))
    one.grad = torch.ones(3)
    assert gradstab.adaptive_clip_grad_(one, 0.5).clipped.tolist() == [1]  # a single tensor
    empty = gradstab.adaptive_clip_grad_([frozen])
    assert empty.norms.shape == (0,) and float(empty.total_norm) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"clip_factor": 0.0}, ValueError, "clip_factor must be a positive number, got 0.0"),
        ({"clip_factor": -1}, ValueError, "clip_factor must be a positive number, got -1"),
        ({"clip_factor": float("nan")}, ValueError, "clip_factor .* got nan"),
        ({"clip_factor": "0.1"}, TypeError, "clip_factor .* got '0.1'"),
        ({"clip_factor": True}, TypeError, "clip_factor .* got True"),
        ({"eps": -1e-3}, ValueError, "eps must be a finite number >= 0, got -0.001"),
        ({"eps": float("inf")}, ValueError, "eps .* got inf"),
        ({"eps": None}, TypeError, "eps .* got None"),
        ({"norm_type": 0}, ValueError, "norm_type .* got 0"),
        ({"norm_type": "fro"}, ValueError, "norm_type .* got 'fro'"),
    ],
)
def test_bad_arguments_name_argument_and_value(kwargs, exc, match):
    w = torch.nn.Parameter(torch.ones(3, 2))
    w.grad = torch.full((3, 2), 5.0)
    before = w.grad.clone()
    with pytest.raises(exc, match=match):
        gradstab.adaptive_clip_grad_([w], **kwargs)
    assert torch.equal(w.grad, before)


def test_bad_parameters_argument():
    with pytest.raises(TypeError, match="parameters must be a tensor or an iterable"):
        gradstab.adaptive_clip_grad_(3)
    with pytest.raises(TypeError, match=r"parameters\[1\] is a str"):
        gradstab.adaptive_clip_grad_([torch.ones(1), "w"])


@pytest.mark.parametrize("kernel", KERNELS)
def test_op_errors_leave_gradients_unchanged(kernel):
    good_g = torch.full((2, 3), 5.0)
    before = good_g.clone()
    cases = [
        ([good_g], [], ValueError, "one parameter per gradient, got 1 gradients and 0"),
        ([good_g], [torch.ones(3, 2)], ValueError, r"shape \[3, 2\] but its gradient .*\[2, 3\]"),
        ([good_g], [torch.ones(2, 3, dtype=torch.int32)], TypeError, "parameter 0 of 1 has dtype"),
        (
            [good_g, torch.ones(2, dtype=torch.int64)],
            [torch.ones(2, 3), torch.ones(2)],
            TypeError,
            "gradient 1 of 2 has dtype",
        ),
        ([good_g], [torch.ones(2, 3).to_sparse()], ValueError, "parameter 0 of 1 has layout"),
    ]
    for grads, params, exc, match in cases:
        with pytest.raises(exc, match=match):
            run(kernel, grads, params)
        assert torch.equal(good_g, before)
    for lam, eps, p, match in [
        (0.0, 1e-3, 2.0, "clip_factor"),
        (0.1, -1.0, 2.0, "eps"),
        (0.1, 1e-3, -2.0, "norm_type"),
    ]:
        with pytest.raises(ValueError, match=match):
            run(kernel, [good_g], [torch.ones(2, 3)], lam, eps, p=p)
        assert torch.equal(good_g, before)


def test_opcheck():
    gen = torch.Generator().manual_seed(2)
    grads = [
        torch.randn(4, 3, generator=gen),
        torch.randn(5, generator=gen).to(torch.bfloat16),
        torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)[:, :, 0],
    ]
    params = [
        torch.randn(4, 3, generator=gen),
        torch.randn(5, generator=gen),
        torch.randn(3, 2, generator=gen),
    ]
    torch.library.opcheck(
        torch.ops.gradstab.adaptive_clip.default, (grads, params, 0.05, 1e-3, 2.0)
    )
    torch.library.opcheck(torch.ops.gradstab.adaptive_clip.default, ([], [], 0.05, 1e-3, 2.0))


def test_meta_tensors_need_no_data():
    grads = [torch.empty(4, 3, device="meta"), torch.empty(5, device="meta", dtype=torch.float64)]
    params = [torch.empty(4, 3, device="meta"), torch.empty(5, device="meta")]
    norms, clipped, _, total = OPS["adaptive_clip"](grads, params, 0.01, 1e-3, 2.0)
    assert norms.device.type == "meta" and norms.shape == (2,) and norms.dtype == torch.float64
    assert clipped.dtype == torch.int64 and total.shape == ()


def test_pure_pytorch_path_in_subprocess(tmp_path):
    code = """
import torch, gradstab
assert gradstab.backend_info()["cpu"]["kernel"] == "reference"
w = torch.nn.Parameter(torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
w.grad = torch.tensor([[0.3, 0.4], [0.1, 0.0]])
s = gradstab.adaptive_clip_grad_([w], clip_factor=0.01)
assert s.clipped.tolist() == [2], s
torch.testing.assert_close(w.grad, torch.tensor([[0.03, 0.04], [1e-5, 0.0]]))
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env=child_env(GRADSTAB_DISABLE_EXT="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_timm_style_baseline_agrees_and_differs_only_below_1e_6():
    from gradstab.tools.bench import timm_style_agc  # noqa: PLC0415

    grads, params = make_pairs([(6, 3, 3, 3), (5, 7), (9,)], torch.float64, torch.float64, 8)
    ours = [torch.nn.Parameter(w.clone()) for w in params]
    theirs = [torch.nn.Parameter(w.clone()) for w in params]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    gradstab.adaptive_clip_grad_(ours, 0.01)
    timm_style_agc(theirs, 0.01)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=0)
    # max_norm = 1e-4 * max(0, 1e-3) = 1e-7 < 1e-6: timm divides by max(||g||, 1e-6) and so
    # over-clips a gradient of norm 5e-7 by 1e-7 / 1e-6 to 5e-8; the paper's rule to 1e-7.
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    a.grad = torch.tensor([3e-7, 4e-7], dtype=torch.float32)
    b.grad = a.grad.clone()
    gradstab.adaptive_clip_grad_([a], 1e-4)
    timm_style_agc([b], 1e-4)
    assert float(torch.linalg.vector_norm(a.grad)) == pytest.approx(1e-7, rel=1e-6)
    assert float(torch.linalg.vector_norm(b.grad)) == pytest.approx(5e-8, rel=1e-6)


def test_bench_agc_mode_smoke():
    from gradstab.tools.bench import bench_one  # noqa: PLC0415

    rows = bench_one(
        "many-small",
        "fp32",
        ["agc", "agc-healthy"],
        device=torch.device("cpu"),
        warmup=0,
        repeats=1,
    )
    names = {(r.mode, r.contestant) for r in rows}
    assert ("agc", "timm-style loop") in names and ("agc-healthy", "gradstab") in names
    ours = [r for r in rows if r.kind == "gradstab"]
    assert all(r.floor_fraction is not None and r.floor_fraction > 0 for r in ours)


# --------------------------- the kernels' AGC case tables (kernel_cases), on every device --
# Units around the kernels' work items (kernel_cases.AGC_SHAPES), every dtype and layout,
# against the float64 oracle (kernel_cases.agc_oracle) and the reference kernel on CPU copies.


def agc_call(grads, params, clip_factor=0.01, eps=1e-3, p=2.0):
    return torch.ops.gradstab.adaptive_clip(grads, params, clip_factor, eps, p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gdtype", kc.FLOAT_DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "offset", "transposed", "channels_last"])
def test_agc_matches_float64_oracle_and_reference(device, gdtype, layout):
    grads, params = kc.agc_pairs(50, gdtype, torch.float32, layout, device=device)
    params[1][2].zero_()  # a zero-weight unit: the eps floor
    before = kc.cpu_copies(grads)
    expected = kc.agc_oracle(grads, params)
    assert 0 < sum(expected[1]) < sum(kc.units(g).shape[0] for g in grads if g.numel())
    got = agc_call(grads, params)
    kc.assert_agc(grads, params, got, expected, f"{gdtype} {layout}")
    ref_grads = kc.clones(before)
    ref = reference.adaptive_clip(ref_grads, kc.cpu_copies(params), 0.01, 1e-3, 2.0)
    kc.assert_agc_stats(got, ref, kc.rtol_of(grads))
    oracle = kc.oracle_norms(before, 2.0)
    torch.testing.assert_close(got[0].cpu().double(), oracle, rtol=kc.RTOL32, atol=0)
    for g, r in zip(grads, ref_grads):
        if g.dtype != torch.float64:
            assert_ulp_close(g.cpu(), r.double(), scale_ulps(g.dtype), "against the reference")


@pytest.mark.parametrize("device", DEVICES)
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
def test_agc_mixed_dtypes(device, gdtype, wdtype):
    grads, params = kc.agc_pairs(51, gdtype, wdtype, device=device)
    expected = kc.agc_oracle(grads, params)
    kc.assert_agc(grads, params, agc_call(grads, params), expected, f"{gdtype}/{wdtype}")


@pytest.mark.parametrize("device", DEVICES)
def test_agc_mixed_dtype_list_gives_float64_results(device):
    g1, w1 = kc.agc_pairs(
        52, torch.bfloat16, torch.float32, shapes=[(64, 100), (3, 5000)], device=device
    )
    g2, w2 = kc.agc_pairs(53, torch.float64, torch.float64, shapes=[(7, 9)], device=device)
    g3, w3 = kc.agc_pairs(54, torch.float16, torch.bfloat16, shapes=[(200,)], device=device)
    grads, params = g1 + g2 + g3, w1 + w2 + w3
    expected = kc.agc_oracle(grads, params)
    got = agc_call(grads, params)
    assert got[0].dtype == got[3].dtype == torch.float64
    kc.assert_agc(grads, params, got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1.0, 3.0, math.inf])
def test_agc_other_norm_types(device, p):
    grads, params = kc.agc_pairs(55, torch.float32, torch.float32, device=device)
    expected = kc.agc_oracle(grads, params, 0.05, 1e-3, p)
    got = agc_call(grads, params, 0.05, 1e-3, p)
    kc.assert_agc(grads, params, got, expected, f"p={p}")


@pytest.mark.parametrize("device", DEVICES)
def test_agc_statistics_are_pre_clip(device):
    grads, params = kc.agc_pairs(56, torch.float32, torch.float32, device=device)
    before = kc.cpu_copies(grads)
    norms, _, nonfinite, total = agc_call(grads, params)
    oracle = kc.oracle_norms(before, 2.0)
    torch.testing.assert_close(norms.cpu().double(), oracle, rtol=kc.RTOL32, atol=0)
    torch.testing.assert_close(
        total.cpu().double(), torch.linalg.vector_norm(oracle), rtol=kc.RTOL32, atol=0
    )
    assert nonfinite.tolist() == [0] * len(grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("gdtype", [torch.bfloat16, torch.float32, torch.float64])
def test_agc_nonfinite_follow_the_float64_formula(device, gdtype):
    g = torch.tensor(
        [
            [0.5, math.nan, 0.5],  # NaN unit: comparison false, unchanged
            [0.5, math.inf, -0.5],  # inf unit: coefficient 0 -> 0, NaN (inf * 0), -0
            [3.0, 4.0, 0.0],  # ordinary unit, clipped
            [0.1, 0.1, 0.1],  # weight norm NaN: max_norm NaN, unchanged
        ],
        dtype=gdtype,
        device=device,
    )
    w = torch.ones(4, 3, device=device)
    w[3, 0] = math.nan
    long_g = torch.full((2, 9000), 0.5, dtype=gdtype, device=device)  # the same in long units
    long_g[0, 8500] = math.inf
    long_g[1, 3] = math.nan
    long_w = torch.ones(2, 9000, device=device)
    grads, params = [g, long_g], [w, long_w]
    want, counts = kc.agc_oracle(grads, params, 0.1, 1e-3)
    norms, clipped, nonfinite, total = agc_call(grads, params, 0.1, 1e-3)
    assert clipped.tolist() == counts == [2, 1]
    assert nonfinite.tolist() == [2, 2]
    for a, e in zip(grads, want):
        assert torch.equal(torch.isnan(a.cpu()), torch.isnan(e))
        fin = ~torch.isnan(e)
        assert_ulp_close(a.cpu()[fin], e[fin], scale_ulps(a.dtype))
    assert math.isnan(float(norms[0])) and math.isnan(float(total))


@pytest.mark.parametrize("device", DEVICES)
def test_agc_huge_and_tiny_values(device):
    g = torch.tensor([[3e30, 4e30], [3e-30, 4e-30]], device=device)  # squares over/underflow fp32
    w = torch.tensor([[1e38, 1e38], [1e-30, 0.0]], device=device)
    norms, clipped, _, _ = agc_call([g], [w], 1e-8, 0.0)
    assert math.isclose(float(norms[0]), 5e30, rel_tol=1e-6)
    want, counts = kc.agc_oracle([torch.tensor([[3e30, 4e30], [3e-30, 4e-30]])], [w], 1e-8, 0.0)
    assert clipped.tolist() == counts == [2]
    assert_ulp_close(g.cpu(), want[0], scale_ulps(g.dtype))
    g64 = torch.full((2, 5000), 1e200, dtype=torch.float64, device=device)  # rescued by max |x|
    w64 = torch.full((2, 5000), 1e300, dtype=torch.float64, device=device)
    w64[1] = 1e190
    norms, clipped, _, total = agc_call([g64], [w64], 0.01, 1e-3)
    row = 1e200 * math.sqrt(5000)
    assert math.isclose(float(norms[0]), row * math.sqrt(2), rel_tol=1e-12)
    assert math.isclose(float(total), row * math.sqrt(2), rel_tol=1e-12)
    assert clipped.tolist() == [1]
    assert bool((g64[0] == 1e200).all())
    coef = 0.01 * 1e190 * math.sqrt(5000) / row
    assert_rel_close(g64[1].cpu(), torch.full((5000,), 1e200 * coef, dtype=torch.float64), 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_agc_unclipped_units_and_healthy_steps_are_not_written(device):
    grads, params = kc.agc_pairs(58, torch.float32, torch.float32, "transposed", device=device)
    # strided: processed on a copy, written back only where a unit changed
    grads += [kc.randn((1000,), torch.bfloat16, kc.generator(58, device))[::2]]
    params += [torch.ones(500, device=device)]
    grads[1][0, 0] = -0.0
    grads[2][4] = math.nan  # a NaN unit is not clipped: its payload survives
    before = [kc.bits(g) for g in grads]
    gaps = kc.bits(grads[-1]._base[1::2])
    _, clipped, _, _ = agc_call(grads, params, 1e6)  # nothing clipped: nothing written
    assert clipped.tolist() == [0] * len(grads)
    assert all(torch.equal(kc.bits(g), b) for g, b in zip(grads, before))
    # some units clipped: every other unit keeps its bits; the strided gaps are never touched
    rows = [kc.agc_clipped_rows(g, w) for g, w in zip(grads, params)]
    assert any(r.any() for r in rows) and any((~r).any() for r in rows)
    agc_call(grads, params)
    for g, b, r in zip(grads, before, rows):
        if g.numel() == 0:
            continue
        got_rows = kc.bits(g).reshape(r.shape[0], g.numel() // r.shape[0])
        want_rows = b.reshape(r.shape[0], g.numel() // r.shape[0])
        assert torch.equal(got_rows[~r], want_rows[~r])
    assert torch.equal(kc.bits(grads[-1]._base[1::2]), gaps)


@pytest.mark.parametrize("device", DEVICES)
def test_agc_strided_gradients_written_back(device):
    gen = kc.generator(59, device)
    base = kc.randn((40, 60), torch.float32, gen, scale=0.5)
    grads = [base[:, ::2], kc.randn((30, 20), torch.float16, gen).t()]  # both on copies
    params = [torch.randn(40, 30, device=device), torch.randn(20, 30, device=device)]
    before = kc.cpu_copies(grads)
    gaps = kc.bits(base[:, 1::2])
    expected = kc.agc_oracle(before, params)
    assert min(expected[1]) > 0
    kc.assert_agc(grads, params, agc_call(grads, params), expected)
    assert torch.equal(kc.bits(base[:, 1::2]), gaps)


@pytest.mark.parametrize("device", DEVICES)
def test_agc_opcheck_and_compile(device):
    grads, params = kc.agc_pairs(
        72, torch.float32, torch.float32, shapes=[(4, 3), (5,), (3, 5000)], device=device
    )
    torch.library.opcheck(
        torch.ops.gradstab.adaptive_clip.default, (grads, params, 0.05, 1e-3, 2.0)
    )
    ps = []
    for g, w in zip(*kc.agc_pairs(73, torch.float32, torch.float32, device=device)):
        q = torch.nn.Parameter(w)
        q.grad = g
        ps.append(q)
    ref = [p.grad.clone() for p in ps]
    ref_stats = agc_call(ref, [p.detach() for p in ps])

    @torch.compile(fullgraph=True)
    def step(parameters):
        return gradstab.adaptive_clip_grad_(parameters, clip_factor=0.01)

    stats = step(ps)
    assert torch.equal(kc.bits(stats.total_norm), kc.bits(ref_stats[3]))
    assert all(torch.equal(kc.bits(p.grad), kc.bits(r)) for p, r in zip(ps, ref))
