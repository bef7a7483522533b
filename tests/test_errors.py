"""Bad input: a clear error naming the argument and the value, and no gradient modified.

Every case puts healthy gradients that the call would clip (a small bound) before the bad
argument or gradient, so a check made too late would show up as a changed gradient.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    GradSpec,
    as_params,
    assert_rel_close,
    assert_ulp_close,
    assert_untouched,
    make_grads,
    snapshot,
)

import gradstab
from gradstab import reference

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

OPS = torch.ops.gradstab
NAN = float("nan")


def healthy_grads():
    """Gradients every clip below would change (norm ~ 50, values up to ~ 10)."""
    return make_grads(
        [
            GradSpec((100_000,), torch.float32, scale_exp=-1, seed=1),  # parallel chunks
            GradSpec((30, 20), torch.bfloat16, "transposed", scale_exp=0, seed=2),
            GradSpec((9,), torch.float64, "strided", scale_exp=1, seed=3),
        ]
    )


def call(fn_name, params, **kwargs):
    fn = getattr(gradstab, fn_name)
    if fn_name == "grad_stats":
        return fn(params, **{k: v for k, v in kwargs.items() if k == "norm_type"})
    if fn_name == "clip_grad_value_":
        kwargs = {k: v for k, v in kwargs.items() if k != "norm_type"}
        kwargs.setdefault("clip_value", 0.01)
        return fn(params, **kwargs)
    kwargs.setdefault("max_norm", 0.01)
    return fn(params, **kwargs)


def expect_error(fn_name, params, grads, exc, pattern, **kwargs):
    snap = snapshot(grads)
    with pytest.raises(exc, match=pattern):
        call(fn_name, params, **kwargs)
    assert_untouched(grads, snap, f"{fn_name} raised but changed a gradient")


# ------------------------------------------------------------------------------- bounds --

BAD_BOUNDS = [
    (-1.0, ValueError, r"non-negative number, got -1\.0"),
    (-1, ValueError, r"non-negative number, got -1"),
    (NAN, ValueError, r"non-negative number, got nan"),
    (-math.inf, ValueError, r"got -inf"),
    ("1", TypeError, r"got '1'"),
    (True, TypeError, r"got True"),
    (None, TypeError, r"got None"),
    ([1.0], TypeError, r"got \[1\.0\]"),
    (torch.tensor(-0.5), ValueError, r"non-negative number, got -0\.5"),
    (torch.tensor(NAN, dtype=torch.float64), ValueError, r"got nan"),
    (torch.ones(2), ValueError, r"one real number, got shape \[2\]"),
    (torch.ones(1, 1), None, None),  # one element: accepted (value 1)
    (torch.tensor(True), ValueError, r"dtype torch\.bool"),
    (torch.tensor(1 + 1j), ValueError, r"dtype torch\.complex"),
    (torch.tensor(1.0, device="meta"), ValueError, r"is on meta but the gradients are on cpu"),
]


@pytest.mark.parametrize(
    "fn_name", ["clip_grad_norm_", "clip_grad_norm_per_layer_", "clip_grad_value_"]
)
@pytest.mark.parametrize(("bound", "exc", "pattern"), BAD_BOUNDS, ids=repr)
def test_bad_bound(fn_name, bound, exc, pattern):
    name = "clip_value" if fn_name == "clip_grad_value_" else "max_norm"
    grads = healthy_grads()
    params = as_params(grads)
    if exc is None:
        call(fn_name, params, **{name: bound})
        return
    expect_error(
        fn_name, params, grads, exc, rf"gradstab\.{fn_name}: {name}.*{pattern}", **{name: bound}
    )


# ---------------------------------------------------------------------------- norm_type --

# 0, negative p and -inf are accepted (torch.linalg.vector_norm's meanings; tests/test_dropin.py)
BAD_NORM_TYPES = [
    (NAN, ValueError, r"got nan"),
    (True, TypeError, r"got True"),
    ("fro", ValueError, r"got 'fro'"),
    ("nuc", ValueError, r"got 'nuc'"),
    (None, TypeError, r"got None"),
    (torch.tensor(2.0), TypeError, r"got tensor\(2\.\)"),
]


@pytest.mark.parametrize("fn_name", ["grad_stats", "clip_grad_norm_", "clip_grad_norm_per_layer_"])
@pytest.mark.parametrize(("norm_type", "exc", "pattern"), BAD_NORM_TYPES, ids=repr)
def test_bad_norm_type(fn_name, norm_type, exc, pattern):
    grads = healthy_grads()
    expect_error(
        fn_name,
        as_params(grads),
        grads,
        exc,
        rf"gradstab\.{fn_name}: norm_type must be a real number \(inf, 0 and negative too\), "
        rf"{pattern}",
        norm_type=norm_type,
    )


@pytest.mark.parametrize("norm_type", ["inf", "2", 2, 0.5, math.inf, 0, "-1", -math.inf])
def test_norm_type_accepted_forms(norm_type):
    """Numbers and numeric strings, as torch.nn.utils.clip_grad_norm_ (float(norm_type))."""
    grads = healthy_grads()
    expected = torch.nn.utils.clip_grad_norm_(
        as_params([g.double().clone() for g in grads]), 1e9, float(norm_type)
    )
    if float(norm_type) < 0:  # torch's |x| ** p of the bfloat16 values' float64 copies: exact
        expected = expected.double()
    total = gradstab.clip_grad_norm_(as_params(grads), 1e9, norm_type)
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


# ---------------------------------------------------------------------------- gradients --


def _bad_grad(kind):
    if kind == "sparse":
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.tensor([0.0, 50.0, 0.0, 1.0]).to_sparse()
        return p, r"gradient 3 of 4 has layout torch\.sparse_coo; only dense", ValueError
    if kind == "complex":
        p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
        p.grad = torch.full((3,), 50 + 1j, dtype=torch.complex64)
        return p, r"gradient 3 of 4 has dtype ComplexFloat; only float16, bfloat16", TypeError
    if kind == "integer":
        p = torch.zeros(3, dtype=torch.int64)
        p.grad = torch.full((3,), 50, dtype=torch.int64)
        return p, r"gradient 3 of 4 has dtype Long; only float16, bfloat16", TypeError
    if kind == "meta":  # a second device
        p = torch.nn.Parameter(torch.zeros(3, device="meta"))
        p.grad = torch.ones(3, device="meta")
        return p, r"one device, gradient 0 is on cpu and gradient 3 on meta", ValueError
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "fn_name", ["grad_stats", "clip_grad_norm_", "clip_grad_norm_per_layer_", "clip_grad_value_"]
)
@pytest.mark.parametrize("kind", ["sparse", "complex", "integer"])
def test_bad_gradient_is_refused_before_any_write(fn_name, kind):
    grads = healthy_grads()
    bad, pattern, exc = _bad_grad(kind)
    bad_grad = bad.grad.clone()
    expect_error(fn_name, [*as_params(grads), bad], grads, exc, pattern)
    assert torch.equal(bad.grad.to_dense(), bad_grad.to_dense())


@pytest.mark.parametrize("first", [True, False])
def test_an_op_refuses_gradients_on_two_devices(first):
    """The ops take one device (the functions group by device: tests/test_dropin.py)."""
    grads = healthy_grads()
    bad, pattern, exc = _bad_grad("meta")
    mixed = [bad.grad, *grads] if first else [*grads, bad.grad]
    if first:
        pattern = r"one device, gradient 0 is on meta and gradient 1 on cpu"
    snap = snapshot(grads)
    with pytest.raises(exc, match=pattern):
        OPS.clip_norm(mixed, torch.tensor(0.01, dtype=torch.float64), 2.0, 1e-6, False)
    assert_untouched(grads, snap)


@pytest.mark.parametrize(
    ("kwargs", "exc", "pattern"),
    [
        ({"error_if_nonfinite": 1}, TypeError, r"error_if_nonfinite must be True or False, got 1"),
        ({"error_if_nonfinite": None}, TypeError, r"error_if_nonfinite must be .* got None"),
        ({"foreach": "yes"}, TypeError, r"foreach must be None, True or False, got 'yes'"),
    ],
)
def test_bad_flags(kwargs, exc, pattern):
    grads = healthy_grads()
    expect_error("clip_grad_norm_", as_params(grads), grads, exc, pattern, **kwargs)


@pytest.mark.parametrize(
    "fn_name", ["grad_stats", "clip_grad_norm_", "clip_grad_norm_per_layer_", "clip_grad_value_"]
)
def test_parameters_that_are_not_tensors(fn_name):
    with pytest.raises(TypeError, match=r"parameters must be a tensor or an iterable of tensors"):
        call(fn_name, 3)
    grads = healthy_grads()
    expect_error(
        fn_name, [*as_params(grads), "w"], grads, TypeError, r"parameters\[3\] is a str, not"
    )


# ---------------------------------------------------------------- error_if_nonfinite=True --


@pytest.mark.parametrize(
    ("values", "pattern"),
    [
        ([1.0, NAN, 2.0], r"is nan; 1 non-finite value\(s\), the first in gradient 3 of 4 "),
        ([math.inf, 1.0, -math.inf], r"is inf; 2 non-finite value\(s\), the first in gradient 3"),
    ],
)
def test_error_if_nonfinite_raises_like_pytorch_before_any_change(values, pattern):
    grads = healthy_grads()
    bad = torch.tensor(values).reshape(1, 3)
    later_bad = torch.tensor([NAN])
    all_grads = [*grads, bad, later_bad]
    params = as_params(all_grads)
    ref = [g.clone().float() for g in all_grads]
    with pytest.raises(RuntimeError, match="error_if_nonfinite"):  # PyTorch raises too
        torch.nn.utils.clip_grad_norm_(as_params(ref[3:4]), 0.01, error_if_nonfinite=True)
    snap = snapshot(all_grads)
    with pytest.raises(RuntimeError, match=re.compile(r"is non-finite.* " + pattern, re.S)) as err:
        gradstab.clip_grad_norm_(params[:3] + params[3:4], 0.01, error_if_nonfinite=True)
    assert "(shape [1, 3])" in str(err.value)
    assert "No gradient was changed" in str(err.value)
    assert_untouched(all_grads, snap)
    # the default clips (NaN total: every gradient becomes NaN, as in PyTorch)
    gradstab.clip_grad_norm_(params, 0.01)
    assert all(bool(torch.isnan(g).all()) for g in all_grads)


def test_error_if_nonfinite_names_the_first_offender():
    grads = [torch.ones(3), torch.tensor([math.inf]), torch.tensor([[NAN, 1.0]])]
    with pytest.raises(RuntimeError, match=r"2 non-finite .* gradient 1 of 3 \(shape \[1\]\)"):
        gradstab.clip_grad_norm_(as_params(grads), 1.0, error_if_nonfinite=True)


# ------------------------------------------------------------------- the kernels themselves --


def _f64(x):
    return torch.tensor(x, dtype=torch.float64)


OP_CALLS = {
    "clip_norm": lambda impl, g, b, p: impl.clip_norm(g, b, p, 1e-6, False),
    "clip_norm_per_layer": lambda impl, g, b, p: impl.clip_norm_per_layer(g, b, p, 1e-6),
    "clip_value": lambda impl, g, b, p: impl.clip_value(g, b, p),
}


@pytest.mark.parametrize("impl", [OPS, reference], ids=["op", "reference"])
@pytest.mark.parametrize("op", list(OP_CALLS))
@pytest.mark.parametrize(
    ("bound", "p", "pattern"),
    [
        (_f64(-1.0), 2.0, r"must be a non-negative number, got -1"),
        (_f64(NAN), 2.0, r"must be a non-negative number, got nan"),
        (torch.ones(2, dtype=torch.float64), 2.0, r"must be a tensor with one element"),
        (_f64(1.0), 0.0, r"norm_type must be a positive number or inf, got 0"),
        (_f64(1.0), -1.0, r"norm_type must be a positive number or inf, got -1"),
        (_f64(1.0), NAN, r"norm_type must be a positive number or inf, got nan"),
    ],
)
def test_kernels_check_their_arguments_before_writing(impl, op, bound, p, pattern):
    """The ops check bounds and norm_type themselves (torch.compile and direct callers skip
    the Python checks), before any gradient changes."""
    grads = healthy_grads()
    snap = snapshot(grads)
    with pytest.raises(ValueError, match=pattern):
        OP_CALLS[op](impl, grads, bound, p)
    assert_untouched(grads, snap)


@pytest.mark.parametrize("impl", [OPS, reference], ids=["op", "reference"])
def test_grad_stats_kernel_checks_norm_type(impl):
    with pytest.raises(ValueError, match="norm_type must be a positive number"):
        impl.grad_stats(healthy_grads(), -3.0)


def test_error_if_nonfinite_when_the_float32_norm_overflows():
    """Finite float32 grads whose norm exceeds float32: the returned norm is inf, so the
    error the caller asked for is raised (as PyTorch does); float64 results do not overflow."""
    grads = [torch.ones(5), torch.tensor([3e38, 3e38, 1.0])]
    snap = snapshot(grads)
    with pytest.raises(RuntimeError, match=r"is inf; no non-finite .*overflowed its result dtype"):
        gradstab.clip_grad_norm_(as_params(grads), 1.0, error_if_nonfinite=True)
    assert_untouched(grads, snap)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(
            as_params([g.clone() for g in grads]), 1.0, error_if_nonfinite=True
        )
    with_f64 = [*grads, torch.zeros(1, dtype=torch.float64)]
    total = gradstab.clip_grad_norm_(as_params(with_f64), 1.0, error_if_nonfinite=True)
    assert total.dtype == torch.float64
    assert float(total) == pytest.approx(math.sqrt(5 + 2 * 9e76 + 1))


# ------------------------------------------------- error_if_nonfinite in the ops, every device --


@pytest.mark.parametrize("device", DEVICES)
def test_error_if_nonfinite_raises_before_any_change(device):
    grads = kc.clip_list(13, device)
    grads[3][100] = float("inf")
    before = [kc.bits(g) for g in grads]
    with pytest.raises(RuntimeError, match=r"non-finite .*the first in gradient 3 of 8"):
        OPS.clip_norm(grads, kc.bound(1.0, device), 2.0, kc.EPS, True)
    assert all(torch.equal(kc.bits(g), b) for g, b in zip(grads, before))
    total = gradstab.clip_grad_norm_(
        [kc.as_param(g) for g in grads[:3]], 1.0, error_if_nonfinite=True
    )
    assert math.isfinite(float(total))


@pytest.mark.parametrize("device", DEVICES)
def test_float32_total_beyond_float32_range_is_inf_and_error_if_nonfinite_raises(device):
    """A float32 total above FLT_MAX is reported as inf (not an error), and
    error_if_nonfinite=True must then raise: it used to check the float64 total, which is
    finite, and so clipped without the error the caller asked for."""
    vals = [3e38, -3e38, 1e38]
    g = torch.tensor(vals, device=device)
    norms, _, nonfinite, total = OPS.grad_stats([g], 2.0)
    assert math.isinf(float(total)) and math.isinf(float(norms[0]))
    assert int(nonfinite[0]) == 0
    before = kc.bits(g)
    with pytest.raises(RuntimeError, match="overflowed its result dtype"):
        OPS.clip_norm([g], kc.bound(1.0, device), 2.0, kc.EPS, True)
    assert torch.equal(kc.bits(g), before)
    ref = torch.tensor(vals)
    want = reference.clip_norm([ref], torch.tensor(1.0, dtype=torch.float64), 2.0, kc.EPS, False)
    got = OPS.clip_norm([g], kc.bound(1.0, device), 2.0, kc.EPS, False)  # scaled by 1 / 4.36e38
    assert math.isinf(float(got[3])) and math.isinf(float(want[3]))
    assert_ulp_close(g.cpu(), ref, 1, "scaled by the float64 coefficient")
    exact = math.sqrt(19) * 1e38
    assert_rel_close(g.cpu().double().norm(), torch.tensor(1.0, dtype=torch.float64), 1e-6)
    assert exact > torch.finfo(torch.float32).max
    # beside a float64 gradient the results are float64: the same total is finite, no error
    g32 = torch.tensor(vals, device=device)
    total64 = OPS.clip_norm(
        [g32, torch.zeros(1, dtype=torch.float64, device=device)],
        kc.bound(1.0, device),
        2.0,
        kc.EPS,
        True,
    )[3]
    assert math.isclose(float(total64), exact, rel_tol=1e-6)
