"""The public functions against PyTorch's own clipping on float64 copies (the oracle).

``clip_grad_norm_`` and ``clip_grad_value_`` are drop-ins for ``torch.nn.utils``'s: the same
clipped values (to the rounding explained in ``helpers.assert_grads_match``), the same input
forms (a tensor, a list, a generator, ``None`` grads), the same NaN/Inf behaviour; the norms
are returned in float32 (float64 with any float64 grad) and never overflow for finite grads.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    FP32_ACCUM_RTOL,
    FP64_RTOL,
    GAP_SENTINEL,
    NORM_TYPES,
    GradSpec,
    as_params,
    assert_bitwise_equal,
    assert_grads_match,
    assert_norms_match,
    assert_rel_close,
    assert_stats_match,
    assert_ulp_close,
    clone_grads,
    grad_lists,
    make_grad,
    make_grads,
    oracle_clip_norm_,
    oracle_clip_value_,
    oracle_stats,
    result_dtype,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import gradstab
from gradstab import reference

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def assert_total_match(total, expected, grads, what=""):
    """The returned total norm against the float64 oracle (tolerances as assert_stats_match)."""
    assert total.dtype == result_dtype(grads) and total.shape == (), (total.dtype, total.shape)
    if total.dtype == torch.float32:
        assert_ulp_close(total, expected, 1, what)
    else:
        rtol = FP64_RTOL if all(g.dtype == torch.float64 for g in grads) else FP32_ACCUM_RTOL
        assert_rel_close(total, expected, rtol, what)


def coef_rtol(grads):
    """Accuracy of a clip coefficient derived from the total norm of ``grads``."""
    return FP64_RTOL if all(g.dtype == torch.float64 for g in grads) else FP32_ACCUM_RTOL


@st.composite
def params_with_none(draw, **kwargs):
    """(parameters, their grads in order): random grads with some ``None`` grads between."""
    specs = draw(grad_lists(min_size=0, max_size=5, **kwargs))
    grads = make_grads(specs)
    entries = []
    for g in grads:
        if draw(st.booleans()) and draw(st.booleans()):
            entries.append(None)
        entries.append(g)
    if draw(st.booleans()):
        entries.append(None)
    return as_params(entries), grads, specs


def as_form(params, form):
    """``params`` as a list, a tuple, a generator, or (one parameter) a bare tensor."""
    if form == "tuple":
        return tuple(params)
    if form == "generator":
        return (p for p in params)
    if form == "tensor" and len(params) == 1:
        return params[0]
    return list(params)


def check_gaps(grads, specs):
    """The skipped elements between a strided gradient's elements are never written."""
    for g, spec in zip(grads, specs):
        if spec.layout == "strided" and g.numel():
            gaps = g._base[1::2]
            assert bool((gaps == GAP_SENTINEL).all()), "a strided gradient's gap was written"


# ----------------------------------------------------------------------- clip_grad_norm_ --


@settings(max_examples=50)
@given(
    data=params_with_none(),
    p=st.sampled_from(NORM_TYPES),
    max_exp=st.integers(-6, 6),
    bound_form=st.sampled_from(["float", "int", "f32 tensor", "f64 tensor"]),
    form=st.sampled_from(["list", "tuple", "generator", "tensor"]),
    foreach=st.sampled_from([None, True, False]),
)
def test_clip_grad_norm_matches_torch_on_float64(  # noqa: PLR0917
    data, p, max_exp, bound_form, form, foreach
):
    params, grads, specs = data
    max_norm = {
        "float": 10.0**max_exp,
        "int": max(0, max_exp),
        "f32 tensor": torch.tensor(10.0**max_exp),
        "f64 tensor": torch.tensor(10.0**max_exp, dtype=torch.float64),
    }[bound_form]
    bound = float(max_norm)
    strides = [g.stride() for g in grads]
    if grads:
        expected_grads, _ = oracle_clip_norm_(grads, bound, p)
        exact_total = oracle_stats(grads, p).total_norm
    total = gradstab.clip_grad_norm_(as_form(params, form), max_norm, p, foreach=foreach)
    if not grads:
        assert torch.equal(total, torch.tensor(0.0))
        return
    assert_total_match(total, exact_total, grads, f"total p={p}")
    assert_grads_match(grads, expected_grads, coef_rtol(grads), f"clip p={p} max_norm={bound}")
    assert [g.stride() for g in grads] == strides
    assert all(p.grad is g for p, g in zip([q for q in params if q.grad is not None], grads))
    check_gaps(grads, specs)


def test_clip_grad_norm_on_a_model_matches_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4)
    )
    model[0].bias.requires_grad_(False)  # a parameter without a grad
    model(torch.randn(5, 3, 8, 8)).square().sum().backward()
    model = model.to(memory_format=torch.channels_last)
    ref = [p.grad.double().clone() for p in model.parameters() if p.grad is not None]
    ref_params = as_params(ref)
    ref_total = torch.nn.utils.clip_grad_norm_(ref_params, 0.1)
    total = gradstab.clip_grad_norm_(model.parameters(), 0.1)  # a generator
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert_ulp_close(total, ref_total, 1)
    assert_grads_match(grads, [q.grad for q in ref_params], FP32_ACCUM_RTOL)


def test_clipped_values_are_multiplied_as_pytorch_multiplies():
    """fp16/bf16/fp32: x * float32(coef) in float32, fp64: in float64, as PyTorch's mul_.

    Small integers have an exactly computable norm (every partial sum of their squares is
    exact, in float32 lanes and in double), so the kernel's float64 coefficient is known
    exactly here and the clipped values can be checked bit for bit.
    """
    x = torch.randint(-100, 101, (1001,), generator=torch.Generator().manual_seed(0)).double()
    coef = 0.7 / (math.sqrt(float((x * x).sum())) + 1e-6)
    c32 = torch.tensor(coef, dtype=torch.float32)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        g = x.to(dtype)
        params = as_params([g.clone()])
        gradstab.clip_grad_norm_(params, 0.7)
        if dtype == torch.float64:
            expected = x * coef
        else:
            expected = (g.float() * c32).to(dtype)
        assert_bitwise_equal(params[0].grad, expected, str(dtype))
        if dtype == torch.float32:  # the test can tell: rounding once from float64 differs
            assert not torch.equal((x * coef).float(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_a_coefficient_below_float32s_normal_range_keeps_its_bits(device):
    """Where float32(coef) would be subnormal, float32 gradients are multiplied in float64.

    A total norm of ~3e12 clipped to 1e-30 needs a coefficient of ~3e-43, which float32 holds
    with only ~8 significant bits. The gradients are small integers times 2**30, so their norm
    is computed exactly (as in the test above) and the result can be checked bit for bit.
    """
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(1, 101, (1001,), generator=gen).double() * 2.0**30
    coef = 1e-30 / (math.sqrt(float((x * x).sum())) + 1e-6)
    assert 0 < coef < torch.finfo(torch.float32).tiny
    params = as_params([x.float().to(device)])
    gradstab.clip_grad_norm_(params, 1e-30)
    expected = (x * coef).float()
    assert_bitwise_equal(params[0].grad.cpu(), expected, "float32, subnormal coefficient")
    assert not torch.equal(x.float() * torch.tensor(coef, dtype=torch.float32), expected)


def test_finite_grads_never_give_an_infinite_norm_and_are_clipped():
    """PyTorch returns inf here and zeroes the gradients; gradstab clips them correctly."""
    g = torch.tensor([1e30, 1e30])
    params = as_params([g])
    total = gradstab.clip_grad_norm_(params, 1.0)
    assert_ulp_close(total, torch.tensor(math.sqrt(2) * 1e30, dtype=torch.float64), 1)
    assert_ulp_close(g, torch.full((2,), 1 / math.sqrt(2), dtype=torch.float64), 1)
    tiny = torch.full((1000,), 1e-30)
    assert float(gradstab.grad_stats(as_params([tiny])).total_norm) > 0
    assert float(torch.linalg.vector_norm(tiny)) == 0.0  # what PyTorch's float32 sum gives


@pytest.mark.parametrize("special", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("error_if_nonfinite", [False])
def test_nonfinite_grads_clipped_like_pytorch(special, error_if_nonfinite):
    """NaN total: every gradient becomes NaN; Inf total: coefficient 0 (Inf * 0 = NaN)."""
    grads = [torch.tensor([1.0, special, -2.0]), torch.randn(4, 3), torch.randn(5)]
    ref = [g.clone() for g in grads]
    total = gradstab.clip_grad_norm_(as_params(grads), 1.0, error_if_nonfinite=error_if_nonfinite)
    ref_total = torch.nn.utils.clip_grad_norm_(as_params(ref), 1.0, foreach=False)
    assert (math.isnan(float(total)) and math.isnan(float(ref_total))) or float(total) == float(
        ref_total
    )
    for g, r in zip(grads, ref):
        assert torch.equal(torch.isnan(g), torch.isnan(r))
        assert torch.equal(g[~torch.isnan(g)], r[~torch.isnan(r)])


def test_max_norm_tensor_gives_the_same_bits_as_the_number():
    specs = [GradSpec((40, 30), torch.float32, "transposed", 1, 3), GradSpec((9,), torch.bfloat16)]
    results = []
    for bound in (0.25, torch.tensor(0.25), torch.tensor(0.25, dtype=torch.float64)):
        grads = make_grads(specs)
        total = gradstab.clip_grad_norm_(as_params(grads), bound)
        norms = gradstab.clip_grad_norm_per_layer_(as_params(make_grads(specs)), bound)
        results.append((total, norms, grads))
    for total, norms, grads in results[1:]:
        assert_bitwise_equal(total, results[0][0])
        assert_bitwise_equal(norms, results[0][1])
        for a, b in zip(grads, results[0][2]):
            assert_bitwise_equal(a, b)


def test_empty_inputs_like_pytorch():
    none_only = as_params([None, None])
    for params in ([], (), iter([]), none_only):
        assert torch.equal(gradstab.clip_grad_norm_(params, 1.0), torch.tensor(0.0))
    assert torch.equal(torch.nn.utils.clip_grad_norm_([], 1.0), torch.tensor(0.0))
    norms = gradstab.clip_grad_norm_per_layer_(none_only, 1.0)
    assert norms.shape == (0,) and norms.dtype == torch.float32
    assert gradstab.clip_grad_value_(none_only, 1.0) is None
    stats = gradstab.grad_stats(none_only)
    assert [t.shape for t in stats] == [(0,), (0,), (0,), ()]
    assert stats.nonfinite.dtype == torch.int64 and float(stats.total_norm) == 0.0


# ------------------------------------------------------------------------------ grad_stats --


@settings(max_examples=40)
@given(data=params_with_none(big=True), p=st.sampled_from(NORM_TYPES))
def test_grad_stats_fields(data, p):
    params, grads, _ = data
    before = clone_grads(grads)
    stats = gradstab.grad_stats(params, norm_type=p)
    assert isinstance(stats, gradstab.GradStats)
    if not grads:
        assert stats.norms.shape == (0,)
        return
    assert all(t.device == grads[0].device for t in stats)
    assert_stats_match(stats, oracle_stats(grads, p), grads, f"p={p}")
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b)


def test_grad_stats_counts_params_with_a_grad_in_order():
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([-7.0]).half(), torch.zeros(0)]
    params = as_params([None, grads[0], None, grads[1], grads[2], None])
    stats = gradstab.grad_stats(params)
    assert stats.norms.tolist() == [5.0, 7.0, 0.0]
    assert stats.max_abs.tolist() == [4.0, 7.0, 0.0]
    assert stats.nonfinite.tolist() == [0, 0, 0]
    assert stats.norms.dtype == torch.float32  # float16 grads: float32 results
    assert float(stats.total_norm) == pytest.approx(math.sqrt(74), rel=1e-7)
    assert gradstab.grad_stats(params, math.inf).total_norm.item() == 7.0
    assert gradstab.grad_stats(params, 1).total_norm.item() == 14.0
    with_f64 = as_params([grads[0], torch.tensor([1.0], dtype=torch.float64)])
    assert gradstab.grad_stats(with_f64).norms.dtype == torch.float64


def test_grad_stats_of_a_single_tensor():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    p.grad = torch.tensor([[1.0, math.inf], [math.nan, -2.0]])
    stats = gradstab.grad_stats(p)
    assert stats.nonfinite.tolist() == [2]
    assert math.isnan(stats.max_abs.item()) and math.isnan(stats.total_norm.item())


# ----------------------------------------------------------------------- clip_grad_value_ --


@settings(max_examples=40)
@given(
    data=params_with_none(),
    v_exp=st.integers(-6, 4),
    bound_form=st.sampled_from(["float", "tensor"]),
    form=st.sampled_from(["list", "generator", "tensor"]),
)
def test_clip_grad_value_matches_torch(data, v_exp, bound_form, form):
    params, grads, specs = data
    v = 10.0**v_exp
    same_dtype = [torch.empty_strided(g.shape, g.stride(), dtype=g.dtype).copy_(g) for g in grads]
    if grads:  # (PyTorch fails on an empty list)
        torch.nn.utils.clip_grad_value_(as_params(same_dtype), v, foreach=False)
    expected64 = oracle_clip_value_(grads, v)
    clip_value = v if bound_form == "float" else torch.tensor(v, dtype=torch.float64)
    assert gradstab.clip_grad_value_(as_form(params, form), clip_value) is None
    for g, s, e in zip(grads, same_dtype, expected64):
        assert_bitwise_equal(g, s, "vs torch.nn.utils.clip_grad_value_ in the grad's dtype")
        # float16/bfloat16 round the bound to float32 first, as PyTorch's opmath does
        assert_ulp_close(g, e, 1, "vs float64 oracle")
    check_gaps(grads, specs)


# -------------------------------------------------------------- clip_grad_norm_per_layer_ --


@settings(max_examples=40)
@given(data=params_with_none(), p=st.sampled_from(NORM_TYPES), max_exp=st.integers(-4, 4))
def test_clip_grad_norm_per_layer_is_torch_clip_per_tensor(data, p, max_exp):
    """Oracle: torch.nn.utils.clip_grad_norm_ on each float64 copy on its own."""
    params, grads, specs = data
    max_norm = 10.0**max_exp
    expected = [oracle_clip_norm_([g], max_norm, p) for g in grads]
    exact = oracle_stats(grads, p)
    norms = gradstab.clip_grad_norm_per_layer_(params, max_norm, p)
    assert norms.shape == (len(grads),)
    if grads:
        assert_norms_match(norms, exact.norms, grads, "per-layer")
    for g, (e, _) in zip(grads, expected):
        assert_grads_match([g], e, coef_rtol([g]), f"per-layer p={p}")
    check_gaps(grads, specs)


def test_per_layer_coefficient_is_one_minus_nothing():
    """A gradient under the bound is untouched; one above is scaled to the bound."""
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    norms = gradstab.clip_grad_norm_per_layer_(as_params([a, b]), 1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert_bitwise_equal(b, torch.tensor([0.3, 0.4]))
    assert_ulp_close(a, torch.tensor([3.0, 4.0], dtype=torch.float64) / (5 + 1e-6), 1)


# ---------------------------------------------------------------------------- backend_info --


def test_backend_info_names_a_kernel_and_a_reason():
    info = gradstab.backend_info()
    assert set(info) >= {"cpu", "cuda"}
    for entry in info.values():
        assert entry["kernel"] in ("cpp", "cuda", "reference")
        assert isinstance(entry["reason"], str) and entry["reason"]
    from gradstab import _extension  # noqa: PLC0415

    if _extension._C is not None:
        assert info["cpu"]["kernel"] == "cpp"
        assert "gradstab._C loaded" in info["cpu"]["reason"]
    else:
        assert info["cpu"]["kernel"] == "reference"
        assert "pip install" in info["cpu"]["reason"]
    if not torch.cuda.is_available():
        assert "no CUDA device visible" in info["cuda"]["reason"]


def test_layouts_are_kept():
    g = make_grad(GradSpec((2, 3, 4, 5), torch.float32, "channels_last", 2, 1))
    gradstab.clip_grad_norm_(as_params([g]), 0.1)
    assert g.is_contiguous(memory_format=torch.channels_last)
    assert float(torch.linalg.vector_norm(g.double())) == pytest.approx(0.1, rel=1e-6)


def test_results_on_the_grads_device_without_reading_it_on_the_host():
    """On a device other than the CPU ("meta" here: its tensors have no values, so any host
    read raises), every function runs, with its bound as a 0-d tensor on that device, and
    returns results on that device in the documented dtypes."""
    dev = torch.device("meta")
    grads = [
        torch.empty(5, 3, device=dev, dtype=torch.bfloat16),
        torch.empty(7, device=dev),
        torch.empty(0, device=dev),
    ]
    params = as_params([grads[0], None, grads[1], grads[2]])
    stats = gradstab.grad_stats(params)
    assert [t.device.type for t in stats] == ["meta"] * 4
    assert [t.shape for t in stats] == [(3,), (3,), (3,), ()]
    assert stats.norms.dtype == torch.float32 and stats.nonfinite.dtype == torch.int64
    bound = torch.tensor(1.0, device=dev)
    total = gradstab.clip_grad_norm_(params, bound)
    assert total.device.type == "meta" and total.shape == () and total.dtype == torch.float32
    norms = gradstab.clip_grad_norm_per_layer_(params, bound)
    assert norms.device.type == "meta" and norms.shape == (3,)
    assert gradstab.clip_grad_value_(params, bound) is None
    f64 = as_params([torch.empty(2, device=dev, dtype=torch.float64), grads[1]])
    assert gradstab.grad_stats(f64).total_norm.dtype == torch.float64


@pytest.mark.parametrize("device", DEVICES)
def test_functional_api_on_the_devices_parameters(device):
    """The public functions on parameters of the device: results on that device, the total
    against the reference kernel on CPU copies."""
    grads = kc.clip_list(26, device)
    params = [kc.as_param(g) for g in grads]
    before = kc.cpu_copies(grads)
    total = gradstab.clip_grad_norm_(params, max_norm=1.0)
    want = reference.grad_stats(before, 2.0)[3]
    assert total.device.type == device
    torch.testing.assert_close(total.cpu(), want, rtol=kc.RTOL32, atol=0)
    stats = gradstab.grad_stats(params)
    assert stats.norms.device.type == device
