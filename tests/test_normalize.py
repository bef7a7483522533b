"""``gradstab.normalize_grad_per_layer_`` and the ``gradstab::normalize_per_layer`` op.

Oracle: the coefficient ``target / (||g||_p + 1e-6)`` in float64 from PyTorch's own
``torch.linalg.vector_norm``, applied as PyTorch multiplies in the gradient's dtype
(``kernel_cases.scaled``).  The compiled kernel, the pure-PyTorch reference and the eager CPU
shortcut must agree bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from hypothesis import given, settings
from hypothesis import strategies as st

import gradstab
from gradstab import _extension, functional, reference

EPS = 1e-6
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _oracle(g: torch.Tensor, target: float, p: float) -> torch.Tensor:
    g64 = g.double()
    n = torch.linalg.vector_norm(g64, p) if g.numel() else torch.zeros((), dtype=torch.float64)
    coef = target / (n + EPS)
    return kc.scaled(g, float(coef))  # PyTorch's multiply in the gradient's dtype


def _grads(seed: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = int(torch.randint(0, 3000, (), generator=gen))
        scale = 10.0 ** float(torch.randint(-6, 5, (), generator=gen))
        dtype = DTYPES[int(torch.randint(0, 4, (), generator=gen))]
        g = (torch.randn(size, generator=gen, dtype=torch.float64) * scale).to(dtype)
        if i % 3 == 0 and size > 4:
            g = g[::2]  # non-contiguous
        out.append(g)
    return out


def _params(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    ps = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g.clone() if g.is_contiguous() else g.clone()[...]
        ps.append(p)
    return ps


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 6),
    target=st.sampled_from([1.0, 0.01, 37.5]),
    p=st.sampled_from([2.0, 1.0, math.inf, 3.0]),
)
def test_matches_float64_oracle(seed, n, target, p):
    grads = _grads(seed, n)
    params = _params(grads)
    norms = gradstab.normalize_grad_per_layer_(params, target, p)
    for g, prm, got_norm in zip(grads, params, norms):
        want = _oracle(g, target, p)
        # one rounding of the product (1 ulp of the dtype), plus the float64 rounding by which
        # gradstab's norm (its own summation order, up to a few thousand terms) may differ
        # from torch's; float32 also rounds the coefficient to float32, where that difference
        # can flip its last bit (one more ulp)
        ulps = 2 if g.dtype == torch.float32 else 1
        rel = ulps * torch.finfo(g.dtype).eps + 64 * torch.finfo(torch.float64).eps
        tol = rel * want.double().abs() + torch.finfo(g.dtype).tiny
        assert torch.all((prm.grad.double() - want.double()).abs() <= tol)
        ref_norm = torch.linalg.vector_norm(g.double(), p) if g.numel() else torch.tensor(0.0)
        assert math.isclose(float(got_norm), float(ref_norm), rel_tol=2e-7, abs_tol=1e-45)
        if g.numel() and float(ref_norm) > 0 and g.dtype in (torch.float32, torch.float64):
            new = float(torch.linalg.vector_norm(prm.grad.double(), p))
            assert math.isclose(
                new, target * float(ref_norm) / (float(ref_norm) + EPS), rel_tol=1e-5
            )


@pytest.mark.parametrize("seed", range(3))
def test_compiled_kernel_agrees_with_reference(seed):
    """The reference sums squares in float64, the compiled kernel in float32 lanes of up to
    128 terms added in double (relative error ~1e-8): the norms agree to 1e-7, the rescaled
    gradients to one unit in the last place of their dtype (float64: a few, from the norms)."""
    grads = _grads(seed, 8)
    a = [g.clone() for g in grads]
    b = [g.clone() for g in grads]
    target = torch.tensor(0.5, dtype=torch.float64)
    ra = torch.ops.gradstab.normalize_per_layer(a, target, 2.0, EPS)
    rb = reference.normalize_per_layer(b, target, 2.0, EPS)
    for x, y in zip(ra, rb):
        assert x.dtype == y.dtype
        assert torch.allclose(x.double(), y.double(), rtol=1e-7, atol=0)
    for x, y in zip(a, b):
        rel = torch.finfo(x.dtype).eps + 8 * torch.finfo(torch.float64).eps
        ulp = rel * y.double().abs() + torch.finfo(x.dtype).tiny
        assert torch.all((x.double() - y.double()).abs() <= ulp)


def test_shortcut_equals_dispatcher(monkeypatch):
    grads = _grads(11, 10)
    a, b = _params(grads), _params(grads)
    ra = gradstab.normalize_grad_per_layer_(a, 2.0)
    monkeypatch.setattr(functional, "cpu_fast_path", None)
    rb = gradstab.normalize_grad_per_layer_(b, 2.0)
    assert torch.equal(ra, rb)
    assert all(torch.equal(x.grad, y.grad) for x, y in zip(a, b))


def test_zero_nan_and_unit_coefficient():
    z = torch.nn.Parameter(torch.zeros(4))
    z.grad = torch.zeros(4)
    nan = torch.nn.Parameter(torch.zeros(2))
    nan.grad = torch.tensor([1.0, float("nan")])
    norms = gradstab.normalize_grad_per_layer_([z, nan], 1.0)
    assert torch.equal(z.grad, torch.zeros(4))
    assert torch.isnan(nan.grad).all()
    assert torch.isnan(norms[1])
    # norm 0.5 exactly and target = 0.5 + eps: the coefficient is exactly 1, nothing written
    one = torch.nn.Parameter(torch.zeros(1))
    one.grad = torch.tensor([-0.5])
    ptr = one.grad.data_ptr()
    gradstab.normalize_grad_per_layer_([one], 0.5 + EPS)
    assert one.grad.data_ptr() == ptr and float(one.grad) == -0.5


def test_bad_arguments_leave_grads_alone():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, 2.0, 3.0])
    for bad, exc in [
        (-1.0, ValueError),
        (float("nan"), ValueError),
        ("x", TypeError),
        (True, TypeError),
    ]:
        with pytest.raises(exc, match="target_norm"):
            gradstab.normalize_grad_per_layer_([p], bad)
    with pytest.raises(ValueError, match="norm_type"):  # (0 and negative p are accepted)
        gradstab.normalize_grad_per_layer_([p], 1.0, norm_type=float("nan"))
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 3.0]))
    assert gradstab.normalize_grad_per_layer_([torch.nn.Parameter(torch.zeros(1))]).numel() == 0


def test_opcheck():
    grads = [torch.randn(5, 3), torch.randn(7, dtype=torch.float64)]
    torch.library.opcheck(
        torch.ops.gradstab.normalize_per_layer.default,
        ([g.clone() for g in grads], torch.tensor(1.0, dtype=torch.float64), 2.0, EPS),
    )


def test_under_torch_compile():
    p = torch.nn.Parameter(torch.zeros(2))

    @torch.compile(fullgraph=True, backend="eager")
    def f(params, target):
        return gradstab.normalize_grad_per_layer_(params, target)

    p.grad = torch.tensor([3.0, 4.0])
    norms = f([p], torch.tensor(10.0, dtype=torch.float64))
    assert float(norms[0]) == 5.0
    assert torch.allclose(p.grad, torch.tensor([6.0, 8.0]))


@pytest.mark.skipif(_extension.cpu_fast_path is None, reason="extension not built")
def test_backend_serves_cpu():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("gradstab::normalize_per_layer", "CPU")
