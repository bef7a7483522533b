"""The ``torch.nn.utils`` habits gradstab's functions keep (issue 11, "torch drop-in").

- torch's decomposed API: :func:`gradstab.get_total_norm` (one fused read) and
  :func:`gradstab.clip_grads_with_norm_` (``torch.ops.gradstab.clip_with_norm``: no read and
  no write at coefficient 1);
- ``norm_type`` 0, negative and ``-inf`` with ``torch.linalg.vector_norm``'s meanings;
- gradients on several devices in one call, grouped by device as torch groups them;
- torch's warning for an empty generator.

The oracles are torch's own functions on float64 copies.  Tests of single ops run on every
device present (``DEVICES``); the several-devices logic also runs on the CPU alone, with the
grouping split into fake device groups.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    GradSpec,
    as_params,
    assert_grads_match,
    assert_rel_close,
    assert_untouched,
    make_grads,
    snapshot,
)

import gradstab
from gradstab import _devices, functional, reference
from gradstab._library import OPS

INF, NAN = math.inf, math.nan
NONPOSITIVE = [0.0, -0.5, -1.0, -2.0, -3.5, -INF]
EMPTY_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."


def grads_on(device, specs=None, special=None):
    """Nasty but finite-magnitude gradients: mixed dtypes, non-contiguous, a zero-size one, a
    zero element (``special`` puts NaN/Inf into the second)."""
    specs = specs or [
        GradSpec((7, 5), torch.float32, "transposed", scale_exp=0, seed=1),
        GradSpec((40,), torch.float64, "strided", scale_exp=1, seed=2, special=special),
        GradSpec((0, 3), torch.float32, seed=3),
        GradSpec((3, 2, 4, 2), torch.bfloat16, "channels_last", scale_exp=-1, seed=4),
        GradSpec((6,), torch.float16, scale_exp=0, seed=5),
    ]
    grads = [g.to(device) for g in make_grads(specs)]
    grads[0][1, 1] = 0.0  # a zero element: p <= 0 norms see it
    return grads


def torch_total(grads, p):
    """torch's get_total_norm of float64 copies; zero-size tensors left out for p < 0 and inf,
    where torch refuses them (they contribute nothing: gradstab's identity)."""
    kept = [g.detach().double() for g in grads if g.numel() or 0 <= p < INF]
    return torch.nn.utils.get_total_norm(kept, p, foreach=False)


def torch_norm(g, p):
    x = g.detach().double().reshape(-1)
    if x.numel() == 0 and (p < 0 or p == INF):
        return torch.tensor(INF if p < 0 else 0.0, dtype=torch.float64)
    return torch.linalg.vector_norm(x, p)


def assert_value(actual, expected, rtol=1e-6, what=""):
    assert_rel_close(actual.detach().cpu().double(), expected.detach().cpu().double(), rtol, what)


# ------------------------------------------------------------------ get_total_norm, clip by --


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 3.0, 0.5, *NONPOSITIVE])
@pytest.mark.parametrize("special", [None, "nan", "inf"])
def test_get_total_norm_is_torchs(device, p, special):
    grads = grads_on(device, special=special)
    snap = snapshot(grads)
    total = gradstab.get_total_norm(grads, p)
    assert_untouched(grads, snap)
    assert total.device == grads[0].device and total.dtype == torch.float64
    assert_value(total, torch_total(grads, p), what=f"p={p}")
    # a single tensor, a generator, tensors that require grad (read under no_grad)
    single = grads[1]
    assert_value(gradstab.get_total_norm(single, p), torch_total([single], p))
    assert_value(gradstab.get_total_norm((g for g in grads), p), total, rtol=0)
    leaf = torch.ones(3, requires_grad=True, device=device)
    out = gradstab.get_total_norm([leaf * 2], p)
    assert not out.requires_grad
    assert gradstab.get_total_norm([]).item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_norm", [0.5, 1e9])
@pytest.mark.parametrize("p", [2.0, INF, -1.0, 0.0])
def test_clip_grads_with_norm_is_torchs(device, max_norm, p):
    grads = grads_on(device)
    expected = [g.detach().double().clone() for g in grads]
    total = gradstab.get_total_norm(grads, p)
    torch.nn.utils.clip_grads_with_norm_(as_params(expected), max_norm, total.double())
    params = as_params(grads)
    assert gradstab.clip_grads_with_norm_(params, max_norm, total) is None
    assert_grads_match(grads, expected, 1e-12, f"p={p}")
    # a 0-d bound on the device, a number as total, a [1]-shaped total
    gradstab.clip_grads_with_norm_(params, torch.tensor(max_norm, device=device), float(total))
    gradstab.clip_grads_with_norm_(params, max_norm, total.reshape(1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [2.0, 1.0, INF, 3.0])
def test_decomposed_api_is_clip_grad_norm(device, p):
    """get_total_norm then clip_grads_with_norm_ gives clip_grad_norm_'s values (the
    coefficient from the float32-rounded total: within one ulp)."""
    a = grads_on(device)
    b = [g.clone() for g in a]
    total_a = gradstab.clip_grad_norm_(as_params(a), 1.0, p)
    total_b = gradstab.get_total_norm(b, p)
    gradstab.clip_grads_with_norm_(as_params(b), 1.0, total_b)
    assert torch.equal(total_a, total_b)
    assert_grads_match(b, [g.double() for g in a], 1e-15, "decomposed")


@pytest.mark.parametrize("device", DEVICES)
def test_clip_with_norm_matches_torch_clip_grads_with_norm(device):
    """torch's own total, then gradstab's clip_grads_with_norm_ beside torch's: a zero-size
    gradient and one of several work units among them."""
    gen = kc.generator(42, device)
    ours = [torch.nn.Parameter(kc.randn((s,), torch.float32, gen)) for s in (3, 70_000, 0, 129)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs):
        a.grad = (
            kc.randn(a.shape, torch.float32, gen) if a.numel() else torch.zeros(0, device=device)
        )
        b.grad = a.grad.clone()
    total = torch.nn.utils.get_total_norm([p.grad for p in theirs])
    torch.nn.utils.clip_grads_with_norm_(theirs, 1.0, total)
    gradstab.clip_grads_with_norm_(ours, 1.0, total)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_get_total_norm_reads_once_per_device(device, monkeypatch):
    calls = []
    real = OPS["grad_stats"]
    monkeypatch.setitem(OPS, "grad_stats", lambda gs, p: calls.append(len(gs)) or real(gs, p))
    grads = grads_on(device)
    gradstab.get_total_norm(grads)
    assert calls == [len(grads)]


def test_clip_with_norm_writes_nothing_at_coefficient_one(cpp_kernel):
    """An expanded (stride-0) gradient cannot be written: at coefficient 1 the op does not
    touch it; below 1 it is refused before anything changes (CPU kernel and reference)."""
    for impl in (OPS["clip_with_norm"], reference.clip_with_norm):
        healthy = torch.full((5,), 2.0)
        expanded = torch.ones(1).expand(4)
        grads = [healthy, expanded]
        before = healthy._version
        impl(grads, torch.tensor(10.0, dtype=torch.float64), torch.tensor(3.0), 1e-6)
        assert torch.equal(healthy, torch.full((5,), 2.0))
        with pytest.raises(ValueError, match=r"gradient 1 of 2 .* must be scaled"):
            impl(grads, torch.tensor(1.0, dtype=torch.float64), torch.tensor(3.0), 1e-6)
        assert torch.equal(healthy, torch.full((5,), 2.0))
        impl([healthy], torch.tensor(1.0, dtype=torch.float64), torch.tensor(3.0), 1e-6)
        torch.testing.assert_close(healthy, torch.full((5,), 2.0 / (3.0 + 1e-6)))
        assert healthy._version > before  # a writing op bumps version counters


def test_clip_with_norm_opcheck():
    grads = [torch.randn(5, 3), torch.randn(4, dtype=torch.float64)]
    args = (grads, torch.tensor(0.5, dtype=torch.float64), torch.tensor(3.0), 1e-6)
    torch.library.opcheck(torch.ops.gradstab.clip_with_norm.default, args)


@pytest.mark.parametrize(
    ("total", "exc", "pattern"),
    [
        (torch.ones(2), ValueError, r"total_norm must be a tensor holding one real number"),
        (torch.tensor(True), ValueError, r"total_norm must be .* dtype torch\.bool"),
        ("1", TypeError, r"total_norm must be a tensor or a number, got '1'"),
    ],
)
def test_clip_grads_with_norm_bad_total(total, exc, pattern):
    grads = grads_on("cpu")
    snap = snapshot(grads)
    with pytest.raises(exc, match=rf"gradstab\.clip_grads_with_norm_: {pattern}"):
        gradstab.clip_grads_with_norm_(as_params(grads), 1.0, total)
    assert_untouched(grads, snap)


# --------------------------------------------------------------- norm_type 0 and negative --


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", NONPOSITIVE)
@pytest.mark.parametrize("special", [None, "nan", "inf"])
def test_nonpositive_norm_types_are_torchs(device, p, special):
    grads = grads_on(device, special=special)
    stats = gradstab.grad_stats(as_params(grads), p)
    for i, g in enumerate(grads):
        assert_value(stats.norms[i], torch_norm(g, p), what=f"norm {i}")
    assert_value(stats.total_norm, torch_total(grads, p), what="total")
    assert stats.norms.dtype == torch.float64  # a float64 gradient is present
    # clip_grad_norm_ against torch's on float64 copies
    for max_norm in (0.5, 1e9):
        mine = [g.clone() for g in grads]
        ref = [g.double() for g in grads]
        total = gradstab.clip_grad_norm_(as_params(mine), max_norm, p)
        kept = [q for q in as_params(ref) if q.numel() or p == 0]
        want = torch.nn.utils.clip_grad_norm_(kept, max_norm, p, foreach=False)
        assert_value(total, want, what="clip total")
        assert_grads_match(mine, ref, 1e-12, f"clip p={p}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", NONPOSITIVE)
def test_nonpositive_norm_types_per_layer(device, p):
    grads = grads_on(device)
    norms64 = torch.stack([torch_norm(g, p) for g in grads])
    for fn, coef in (
        (gradstab.clip_grad_norm_per_layer_, lambda n: torch.clamp(0.7 / (n + 1e-6), max=1.0)),
        (gradstab.normalize_grad_per_layer_, lambda n: 0.7 / (n + 1e-6)),
    ):
        mine = [g.clone() for g in grads]
        norms = fn(as_params(mine), 0.7, norm_type=p)
        assert_value(norms, norms64, what=fn.__name__)
        want = [g.double() * c for g, c in zip(grads, coef(norms64.cpu()).to(device))]
        assert_grads_match(mine, want, 1e-12, fn.__name__)


def test_nonpositive_norm_types_are_refused_where_sharded():
    grads = grads_on("cpu")
    snap = snapshot(grads)
    for fn in (gradstab.clip_grad_norm_, gradstab.clip_grad_norm_per_layer_):
        with pytest.raises(ValueError, match=r"norm_type -1\.0 is not supported for sharded"):
            fn(as_params(grads), 1.0, -1.0, process_group=object())
    with pytest.raises(ValueError, match="not supported for sharded"):
        gradstab.grad_stats(as_params(grads), 0.0, process_group=object())
    with pytest.raises(ValueError, match="not supported for sharded"):
        gradstab.get_total_norm(grads, -INF, process_group=object())
    assert_untouched(grads, snap)


def test_nonpositive_empty_tensor_identity():
    """A zero-size gradient's p < 0 norm is inf (the identity of the minimum; it adds nothing
    to the total), where torch.linalg.vector_norm raises."""
    g = [torch.zeros(0), torch.tensor([2.0, 4.0])]
    stats = gradstab.grad_stats(as_params(g), -1.0)
    assert stats.norms[0].item() == INF
    assert stats.total_norm.item() == pytest.approx(1 / (1 / 2 + 1 / 4))
    assert gradstab.grad_stats(as_params(g[:1]), -INF).total_norm.item() == INF
    assert gradstab.grad_stats(as_params(g), 0.0).total_norm.item() == 1.0  # torch's count


def test_agc_still_refuses_nonpositive_norm_types():
    w = torch.nn.Parameter(torch.ones(2, 2))
    w.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="norm_type must be a positive number or inf, got 0"):
        gradstab.adaptive_clip_grad_([w], norm_type=0)


# ------------------------------------------------------------------------- several devices --


def _fake_groups(ts):
    """Split CPU tensors into three interleaved 'device' groups (i % 3), as if on 3 devices."""
    groups = {}
    for i, _ in enumerate(ts):
        groups.setdefault(i % 3, []).append(i)
    return [(ts[0].device, ix) for ix in groups.values()]


@pytest.fixture
def fake_devices(monkeypatch):
    """The CPU gradients split into interleaved groups; the eager shortcuts off (they take the
    single-device path before any grouping)."""
    monkeypatch.setattr(functional, "by_device", _fake_groups)
    monkeypatch.setattr(functional, "cpu_fast_path", None)
    monkeypatch.setattr(functional, "cuda_fast_path", None)
    calls = []
    real = OPS["grad_stats"]
    monkeypatch.setitem(OPS, "grad_stats", lambda gs, p: calls.append(len(gs)) or real(gs, p))
    return calls


@pytest.mark.parametrize("p", [2.0, INF, 1.5, -1.0, 0.0])
def test_several_devices_give_the_one_device_results(fake_devices, p):
    grads = grads_on("cpu") + grads_on("cpu")[:2]
    one = [g.clone() for g in grads]
    with pytest.MonkeyPatch.context() as mp:  # the real, one-group path
        mp.setattr(functional, "by_device", lambda ts: [(ts[0].device, list(range(len(ts))))])
        want_stats = gradstab.grad_stats(as_params(one), p)
        want_total = gradstab.clip_grad_norm_(as_params(one), 0.5, p)
    fake_devices.clear()
    stats = gradstab.grad_stats(as_params(grads), p)
    if p > 0:
        assert fake_devices == [3, 2, 2]  # one read per group
    for a, b in zip(stats, want_stats):
        assert_value(a, b, rtol=1e-6 if a.is_floating_point() else 0)
    assert_value(gradstab.get_total_norm(grads, p), want_total)
    total = gradstab.clip_grad_norm_(as_params(grads), 0.5, p)
    assert_value(total, want_total)
    # a group without float64 gradients reports float32 norms: with float64 gradients on
    # another device the combined total is accurate to float32 rounding (the 1e-6 contract)
    assert_grads_match(grads, [g.double() for g in one], 1e-6, "several devices")


def test_several_devices_per_layer_value_agc(fake_devices):
    base = grads_on("cpu") + grads_on("cpu")[:2]
    for fn, kwargs in (
        (gradstab.clip_grad_norm_per_layer_, {"max_norm": 0.3}),
        (gradstab.normalize_grad_per_layer_, {"target_norm": 0.3}),
        (gradstab.clip_grad_value_, {"clip_value": 0.2}),
        (gradstab.adaptive_clip_grad_, {"clip_factor": 0.01}),
    ):
        grads = [g.clone() for g in base]
        one = [g.clone() for g in base]
        params, params_one = as_params(grads), as_params(one)
        for q, w in zip(params + params_one, [torch.randn_like(g) for g in base] * 2):
            q.data.copy_(w)
        out = fn(params, **kwargs)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(functional, "by_device", lambda ts: [(ts[0].device, list(range(len(ts))))])
            want = fn(params_one, **kwargs)
        if out is not None:
            for a, b in zip(
                out if isinstance(out, tuple) else [out],
                want if isinstance(want, tuple) else [want],
            ):
                assert_value(a, b, rtol=1e-6)
        assert_grads_match(grads, [g.double() for g in one], 1e-15, fn.__name__)


def test_several_devices_clip_grads_with_norm(fake_devices):
    grads = grads_on("cpu")
    one = [g.clone() for g in grads]
    total = gradstab.get_total_norm(grads)
    gradstab.clip_grads_with_norm_(as_params(grads), 0.5, total)
    gradstab.clip_grads_with_norm_(as_params([*one]), 0.5, total)
    assert_grads_match(grads, [g.double() for g in one], 0, "clip by total")


def test_in_order_puts_group_results_back():
    parts = [torch.tensor([0.0, 3.0, 6.0]), torch.tensor([1.0, 4.0]), torch.tensor([2.0, 5.0])]
    groups = [("a", [0, 3, 6]), ("b", [1, 4]), ("c", [2, 5])]
    out = _devices.in_order(parts, groups, torch.device("cpu"), torch.float64)
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    runs = [torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])]
    out = _devices.in_order(
        runs, [("a", [0, 1]), ("b", [2, 3])], torch.device("cpu"), torch.float32
    )
    assert out.tolist() == [0.0, 1.0, 2.0, 3.0] and out.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("p", [2.0, INF, -1.0])
def test_cpu_and_cuda_in_one_call(p):
    cpu = grads_on("cpu")
    cuda = [g.cuda() for g in grads_on("cpu")]
    mixed = [cpu[0], cuda[1], cpu[2], cuda[3], cpu[4]]
    ref = [g.double().cpu() for g in mixed]
    total = gradstab.clip_grad_norm_(as_params(mixed), 0.5, p)
    kept = [q for q in as_params(ref) if q.numel()]
    want = torch.nn.utils.clip_grad_norm_(kept, 0.5, p, foreach=False)
    assert total.device.type == "cpu"
    assert_value(total, want)
    assert_grads_match([g.cpu() for g in mixed], ref, 1e-12, "cpu+cuda")
    stats = gradstab.grad_stats(as_params(mixed), p)
    assert stats.norms.device.type == "cpu"
    gradstab.clip_grad_value_(as_params(mixed), 0.1)
    assert all(float(g.abs().max()) <= 0.1 for g in mixed if g.numel())


# ------------------------------------------------------------------------ empty generator --


@pytest.mark.parametrize(
    "fn",
    [
        lambda ps: gradstab.clip_grad_norm_(ps, 1.0),
        lambda ps: gradstab.clip_grad_norm_per_layer_(ps, 1.0),
        lambda ps: gradstab.normalize_grad_per_layer_(ps, 1.0),
        gradstab.adaptive_clip_grad_,
        lambda ps: torch.nn.utils.clip_grad_norm_(ps, 1.0),
    ],
)
def test_an_empty_generator_warns_as_torch(fn):
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    params = model.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn(params)  # exhausted
        fn(q for q in [])  # empty from the start
    assert [str(x.message) for x in w] == [EMPTY_GENERATOR] * 2
    assert all(x.filename == __file__ for x in w)  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn([])  # a list: no warning (torch: none)
        fn(model.parameters())
        fn(next(model.parameters()))


def test_clip_grad_value_does_not_warn_as_torch_does_not():
    """torch's clip_grad_value_ gives no warning (it fails on an empty list, an internal
    error); gradstab's does nothing, quietly."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradstab.clip_grad_value_((q for q in []), 1.0)


def test_decomposed_api_and_nonpositive_norms_under_torch_compile():
    """fullgraph=True: get_total_norm and clip_grads_with_norm_ trace through the ops' fake
    kernels; norm_type <= 0 traces through the PyTorch measurement."""
    grads = grads_on("cpu")[:2]
    params = as_params(grads)
    eager = [g.clone() for g in grads]

    bound = torch.tensor(0.5, dtype=torch.float64)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step_l2(params, grads):
        total = gradstab.get_total_norm(grads, 2.0)
        gradstab.clip_grads_with_norm_(params, bound, total)
        return total

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step_negative(params, grads):
        total = gradstab.get_total_norm(grads, -1.0)
        gradstab.clip_grads_with_norm_(params, bound, total)
        return total

    for p, step in ((2.0, step_l2), (-1.0, step_negative)):
        want = gradstab.get_total_norm(eager, p)
        gradstab.clip_grads_with_norm_(as_params(eager), 0.5, want)
        got = step(params, [q.grad for q in params])
        assert_value(got, want, rtol=0)
        assert_grads_match(grads, [g.double() for g in eager], 0, f"compiled p={p}")
