"""PyTorch's own clip-grad tests, run against ``torch.nn.utils`` and gradstab side by side.

The cases are those of PyTorch's ``test/test_nn.py`` (``TestNNDeviceType``:
``test_clip_grad_norm``, ``test_clip_grad_value``, ``test_clip_grad_norm_multi_device``,
``test_clip_grad_norm_error_if_nonfinite``), rewritten for pytest with the same inputs, norm
types and assertions.  Every case runs through one harness on both implementations (the
``api`` fixture): a case that fails for torch is a wrong transcription, not a gradstab bug.

Where gradstab differs from torch on purpose (README, "API"), the harness says so in one place
and checks that the difference is exactly the documented one:

- the returned norm is float32 (float64 when a gradient is float64), not the gradients' dtype
  (torch's ``assertEqual`` would compare dtypes; here values are compared, and the dtype rule of
  each implementation is checked separately);
- finite gradients never give an infinite norm: where torch's norm over- or underflows to inf
  (``2e200`` in float64 with ``p = 2`` or ``3.5``; ``p < 0`` where ``|x| ** p`` underflows),
  gradstab's is finite, so ``error_if_nonfinite=True`` does not raise (:func:`_nonfinite`).
"""

from __future__ import annotations

import math
import re
import warnings
from itertools import product
from types import SimpleNamespace

import pytest
import torch
from gradstab_testing.devices import DEVICES
from torch import nn

import gradstab

INF, NAN = math.inf, math.nan

APIS = {
    "torch": SimpleNamespace(
        name="torch",
        clip_grad_norm_=torch.nn.utils.clip_grad_norm_,
        clip_grad_value_=torch.nn.utils.clip_grad_value_,
        get_total_norm=torch.nn.utils.get_total_norm,
        clip_grads_with_norm_=torch.nn.utils.clip_grads_with_norm_,
    ),
    "gradstab": SimpleNamespace(
        name="gradstab",
        clip_grad_norm_=gradstab.clip_grad_norm_,
        clip_grad_value_=gradstab.clip_grad_value_,
        get_total_norm=gradstab.get_total_norm,
        clip_grads_with_norm_=gradstab.clip_grads_with_norm_,
    ),
}

EMPTY_GENERATOR = "`parameters` is an empty generator, no gradient clipping will occur."


@pytest.fixture(params=list(APIS))
def api(request):
    return APIS[request.param]


def assert_value(actual, expected, *, dtype):
    """torch's ``assertEqual`` on values (its default tolerances for ``dtype``), the returned
    dtype checked by :func:`check_norm_dtype` instead."""
    torch.testing.assert_close(
        torch.as_tensor(actual).to(dtype), torch.as_tensor(expected).to(dtype), check_device=False
    )


def check_norm_dtype(api, norm, grad_dtype):
    """torch returns the gradients' dtype; gradstab float32, or float64 for float64 grads."""
    if api.name == "torch":
        assert norm.dtype == grad_dtype
    else:
        assert norm.dtype == (torch.float64 if grad_dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------ test_clip_grad_norm --


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("norm_type", [1, 2, INF])
def test_clip_grad_norm(api, device, dtype, foreach, norm_type):
    l = nn.Linear(10, 10).to(device, dtype)  # noqa: E741 (torch's names)
    max_norm = 2

    def compute_norm(norm_type):
        norm_type = float(norm_type)
        if norm_type != INF:
            total_norm = 0
            for p in l.parameters():
                total_norm += p.grad.data.abs().pow(norm_type).sum()
            return pow(total_norm, 1.0 / norm_type)
        return max(p.grad.data.abs().max() for p in l.parameters())

    def compare_scaling(grads):
        p_scale = [p.grad.data.div(g).view(-1) for p, g in zip(l.parameters(), grads)]
        scale = torch.cat(p_scale)
        assert_value(scale.std(), 0, dtype=dtype)
        return scale[0]

    grads = (
        torch.arange(1.0, 101, device=device, dtype=dtype).view(10, 10),
        torch.ones(10, device=device, dtype=dtype).div(1000),
    )
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p.data)
    norm_before = compute_norm(norm_type)
    norm = api.clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_value(norm, norm_before, dtype=dtype)
    check_norm_dtype(api, norm, dtype)
    assert_value(norm_after, max_norm, dtype=dtype)
    assert norm_after <= norm_before
    compare_scaling(grads)

    # the decomposed API (torch >= 2.6)
    for p, g in zip(l.parameters(), grads):
        p._grad = g.clone().view_as(p)
    norm_before = compute_norm(norm_type)
    total_norm = api.get_total_norm(
        [p.grad for p in l.parameters()], norm_type=norm_type, foreach=foreach
    )
    api.clip_grads_with_norm_(l.parameters(), max_norm, total_norm, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_value(total_norm, norm_before, dtype=dtype)
    check_norm_dtype(api, total_norm, dtype)
    assert_value(norm_after, max_norm, dtype=dtype)
    assert norm_after <= norm_before
    compare_scaling(grads)

    # small gradients are left unchanged
    grads = (
        torch.rand(10, 10, device=device, dtype=dtype).div(10000),
        torch.ones(10, device=device, dtype=dtype).div(500),
    )
    for p, g in zip(l.parameters(), grads):
        p.grad.data.copy_(g)
    norm_before = compute_norm(norm_type)
    norm = api.clip_grad_norm_(l.parameters(), max_norm, norm_type=norm_type, foreach=foreach)
    norm_after = compute_norm(norm_type)
    assert_value(norm, norm_before, dtype=dtype)
    assert_value(norm_before, norm_after, dtype=dtype)
    assert norm_after <= max_norm
    scale = compare_scaling(grads)
    assert_value(scale, 1, dtype=dtype)

    # a single tensor as input
    p1 = torch.randn(10, 10, device=device, dtype=dtype)
    p2 = torch.randn(10, 10, device=device, dtype=dtype)
    g = torch.arange(1.0, 101, device=device, dtype=dtype).view(10, 10)
    p1._grad = g.clone()
    p2._grad = g.clone()
    api.clip_grad_norm_(p1, max_norm, norm_type=norm_type, foreach=foreach)
    api.clip_grad_norm_([p2], max_norm, norm_type=norm_type, foreach=foreach)
    assert_value(p1.grad, p2.grad, dtype=dtype)

    # a warning when the parameters generator is exhausted
    params = l.parameters()
    for _ in params:
        pass
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        api.clip_grad_norm_(params, max_norm, norm_type=norm_type, foreach=foreach)
    assert len(w) == 1
    assert str(w[0].message) == EMPTY_GENERATOR


# ----------------------------------------------------------------------- test_clip_grad_value --


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_value(api, device, foreach):
    l = nn.Linear(10, 10).to(device)  # noqa: E741
    clip_value = 2.5
    grad_w = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    grad_b = torch.ones(10, device=device).mul_(2)
    for grad_list in [[grad_w, grad_b], [grad_w, None]]:
        for p, g in zip(l.parameters(), grad_list):
            p._grad = g.clone().view_as(p.data) if g is not None else g
        api.clip_grad_value_(l.parameters(), clip_value, foreach=foreach)
        for p in filter(lambda p: p.grad is not None, l.parameters()):
            assert p.grad.data.max() <= clip_value
            assert p.grad.data.min() >= -clip_value

    # a single tensor as input
    p1, p2 = torch.randn(10, 10, device=device), torch.randn(10, 10, device=device)
    g = torch.arange(-50.0, 50, device=device).view(10, 10).div_(5)
    p1._grad = g.clone()
    p2._grad = g.clone()
    api.clip_grad_value_(p1, clip_value, foreach=foreach)
    api.clip_grad_value_([p2], clip_value, foreach=foreach)
    assert torch.equal(p1.grad, p2.grad)


# ---------------------------------------------------------- test_clip_grad_norm_multi_device --

DEVICE_PAIRS = []
if torch.cuda.is_available():
    DEVICE_PAIRS.append(("cpu", "cuda:0"))
    if torch.cuda.device_count() >= 2:
        DEVICE_PAIRS.append(("cuda:0", "cuda:1"))


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer1 = nn.Linear(10, 10)
        self.layer2 = nn.Linear(10, 10)


@pytest.mark.skipif(not DEVICE_PAIRS, reason="needs a CUDA device (torch's test needs two)")
@pytest.mark.parametrize("devices", DEVICE_PAIRS)
@pytest.mark.parametrize("foreach", [False, True])
def test_clip_grad_norm_multi_device(api, devices, foreach):
    test_model = _TwoLayers()
    test_model.layer1.to(devices[0])
    test_model.layer2.to(devices[1])
    ref_model = _TwoLayers().to(devices[0])
    for norm_type in [2.0, INF]:
        for p in test_model.parameters():
            p.grad = torch.ones_like(p)
        for p in ref_model.parameters():
            p.grad = torch.ones_like(p)
        norm = api.clip_grad_norm_(test_model.parameters(), 0.5, norm_type, foreach=foreach)
        expected = api.clip_grad_norm_(ref_model.parameters(), 0.5, norm_type, foreach=foreach)
        assert norm.device == torch.device(devices[0])
        assert_value(norm, expected, dtype=torch.float32)
        for p, pe in zip(test_model.parameters(), ref_model.parameters()):
            assert_value(p.grad.to(devices[0]), pe.grad, dtype=torch.float32)


# ------------------------------------------------- test_clip_grad_norm_error_if_nonfinite --

NORMS_POS = [0.1, 1, 2, 3.5, INF]
NORMS_NEG = [-0.1, -1, -2, -3.5]
NORMS_EXCEPT_0 = NORMS_POS + NORMS_NEG
NORMS_ALL = [*NORMS_EXCEPT_0, 0]

# (grad_only_one_elem, prefix_finite_grad_param, scalars, norms_nonfinite, norms_finite):
# torch's table, torch's expectations.
NONFINITE_CASES = [
    # an infinite grad
    (False, False, [INF, -INF], NORMS_EXCEPT_0, [0]),
    (False, True, [INF, -INF], NORMS_POS, [*NORMS_NEG, 0]),
    (True, False, [INF, -INF], NORMS_POS, [*NORMS_NEG, 0]),
    (True, True, [INF, -INF], NORMS_POS, [*NORMS_NEG, 0]),
    # a NaN grad
    (False, False, [NAN], NORMS_EXCEPT_0, [0]),
    (False, True, [NAN], NORMS_EXCEPT_0, [0]),
    (True, False, [NAN], NORMS_EXCEPT_0, [0]),
    (True, True, [NAN], NORMS_EXCEPT_0, [0]),
    # a grad that never errors
    (False, False, [2e22, -2e22], [], NORMS_ALL),
    (False, True, [2e22, -2e22], [], NORMS_ALL),
    (True, False, [2e22, -2e22], [], NORMS_ALL),
    (True, True, [2e22, -2e22], [], NORMS_ALL),
    # a grad whose norm over- or underflows to inf in torch for some norm orders
    (False, False, [2e200, -2e200], [3.5, 2, -2, -3.5], [INF, 1, 0.1, 0, -1, -0.1]),
    (False, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, INF, 1, 0.1, 0]),
    (True, False, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, INF, 1, 0.1, 0]),
    (True, True, [2e200, -2e200], [3.5, 2], [*NORMS_NEG, INF, 1, 0.1, 0]),
]


def _gen_parameters(scalar, grad_only_one_elem, prefix_finite_grad_param, device):
    param = torch.ones(10, dtype=torch.float64, device=device, requires_grad=True)
    if grad_only_one_elem:
        param[1].mul(scalar).sum().backward()
    else:
        param.mul(scalar).sum().backward()
    if prefix_finite_grad_param:
        prefix_param = torch.ones(1, dtype=torch.float64, device=device, requires_grad=True)
        prefix_param.mul(1).sum().backward()
        return [prefix_param, param]
    return [param]


def _nonfinite(api, torch_says_nonfinite, parameters):
    """Whether ``api``'s norm is non-finite: torch's table, except that gradstab's norm of
    finite gradients is finite (the documented difference)."""
    if api.name == "gradstab" and all(bool(torch.isfinite(p.grad).all()) for p in parameters):
        return False
    return torch_says_nonfinite


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", range(len(NONFINITE_CASES)))
def test_clip_grad_norm_error_if_nonfinite(api, device, foreach, case):
    grad_only_one_elem, prefix, scalars, norms_nonfinite, norms_finite = NONFINITE_CASES[case]

    def run(norm_type, error_if_nonfinite, scalar, is_norm_nonfinite):
        parameters = _gen_parameters(scalar, grad_only_one_elem, prefix, device)
        msg = f"norm_type {norm_type}, error_if_nonfinite {error_if_nonfinite}, scalar {scalar}"
        nonfinite = _nonfinite(api, is_norm_nonfinite, parameters)
        if nonfinite and error_if_nonfinite:
            grads_before = [p.grad.clone() for p in parameters]
            error_msg = f"The total norm of order {float(norm_type)} for gradients"
            with pytest.raises(RuntimeError, match=error_msg) as err:
                api.clip_grad_norm_(
                    parameters, 1, norm_type=norm_type, error_if_nonfinite=True, foreach=foreach
                )
            # stronger than torch's test: torch's whole message, word for word, comes first
            assert str(err.value).startswith(_torch_message(norm_type)), msg
            for before, p in zip(grads_before, parameters):
                assert torch.equal(before.nan_to_num(), p.grad.nan_to_num()), msg
        else:
            norm = api.clip_grad_norm_(
                parameters,
                1,
                norm_type=norm_type,
                error_if_nonfinite=error_if_nonfinite,
                foreach=foreach,
            )
            assert bool(torch.isfinite(norm)) != nonfinite, msg

    for error_if_nonfinite in [False, True]:
        for norm_type, scalar in product(norms_nonfinite, scalars):
            run(norm_type, error_if_nonfinite, scalar, True)
        for norm_type, scalar in product(norms_finite, scalars):
            run(norm_type, error_if_nonfinite, scalar, False)


def _torch_message(norm_type):
    """torch's message, from torch itself (a NaN gradient always triggers it)."""
    p = torch.ones(1, dtype=torch.float64, requires_grad=True)
    p.grad = torch.tensor([NAN], dtype=torch.float64)
    with pytest.raises(RuntimeError) as err:
        torch.nn.utils.clip_grad_norm_([p], 1, norm_type=norm_type, error_if_nonfinite=True)
    return str(err.value)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "norm_type", [0.1, 1, 2, 3.5, INF, -1, -INF, 1e-4, 1e-5, 1e15, 1e16, 123.456, 2 / 3]
)
def test_nonfinite_message_starts_with_torchs_word_for_word(device, norm_type):
    """Every path (the C++ kernels' eager shortcut and dispatcher path, the PyTorch route of
    ``norm_type <= 0``, get_total_norm) starts its message with torch's exact text, the
    norm type printed as Python prints it."""
    want = _torch_message(norm_type)
    grads = [torch.tensor([1.0, NAN], device=device)]
    params = [torch.zeros(2, device=device, requires_grad=True)]
    params[0].grad = grads[0]
    calls = [
        lambda: gradstab.clip_grad_norm_(params, 1.0, norm_type, error_if_nonfinite=True),
        lambda: gradstab.clip_grad_norm_(
            (q for q in params), 1.0, norm_type, error_if_nonfinite=True
        ),
        lambda: gradstab.get_total_norm(grads, norm_type, error_if_nonfinite=True),
    ]
    if norm_type > 0:  # the op itself (the dispatcher path)
        calls.append(
            lambda: torch.ops.gradstab.clip_norm(
                grads, torch.tensor(1.0, dtype=torch.float64), norm_type, 1e-6, True
            )
        )
    for call in calls:
        with pytest.raises(RuntimeError) as err:
            call()
        assert str(err.value).startswith(want), (str(err.value), want)
        assert re.search(r"gradstab: the total norm is nan; 1 non-finite value", str(err.value))
