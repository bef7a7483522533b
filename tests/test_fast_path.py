"""The eager CPU shortcut (``gradstab._C.cpu_fast_path``) against the dispatcher path.

``gradstab.functional`` hands CPU calls to ``cpu_fast_path``, which reads ``p.grad`` in C++
and runs the CPU kernels directly.  It must give bit-identical results and the same errors
as the dispatcher path (``torch.ops.gradstab.*``), and decline -- touching nothing -- for
anything the dispatcher should see: tensor subclasses, dispatch and function modes,
non-CPU gradients, ``torch.compile``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import gradstab
from gradstab import _extension, functional

pytestmark = pytest.mark.skipif(
    _extension.cpu_fast_path is None, reason="gradstab._C (with cpu_fast_path) is not built"
)

FAST = _extension.cpu_fast_path
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _params(seed: int, with_double: bool = True) -> list[torch.nn.Parameter]:
    """Parameters with random grads: mixed dtypes and shapes, a None grad, zero-size,
    non-contiguous, a NaN-free mix of magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(5, 7), (0,), (1000,), (3,), (65, 17), (2, 3, 4), (1,)]
    out = []
    for i, shape in enumerate(shapes):
        dtype = DTYPES[i % (4 if with_double else 3)]
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        scale = 10.0 ** float(torch.randint(-3, 4, (), generator=gen))
        g = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
        p.grad = g.to(dtype)
        out.append(p)
    # a transposed (non-contiguous) grad and a parameter without a grad
    t = torch.nn.Parameter(torch.zeros(9, 4))
    t.grad = torch.randn(4, 9, generator=gen).t()
    out.append(t)
    out.append(torch.nn.Parameter(torch.zeros(4)))
    return out


def _clone(params: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    out = []
    for p in params:
        q = torch.nn.Parameter(p.detach().clone())
        if p.grad is not None:
            q.grad = p.grad.clone(memory_format=torch.preserve_format)
            if not p.grad.is_contiguous():
                q.grad = p.grad.t().clone().t()  # keep the transposed layout
        out.append(q)
    return out


@pytest.fixture
def dispatcher_only(monkeypatch: pytest.MonkeyPatch):
    """Run gradstab.functional with the shortcut switched off."""

    def run(fn, *args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(functional, "cpu_fast_path", None)
            return fn(*args, **kwargs)

    return run


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _grads_same(a: list[torch.nn.Parameter], b: list[torch.nn.Parameter]) -> bool:
    return all((x.grad is None and y.grad is None) or _same(x.grad, y.grad) for x, y in zip(a, b))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_fast_path_bit_identical_to_dispatcher(seed, norm_type, dispatcher_only):
    base = _params(seed)
    total = float(
        gradstab.reference.grad_stats([p.grad for p in base if p.grad is not None], norm_type)[3]
    )
    for name, call in [
        ("grad_stats", lambda ps: gradstab.grad_stats(ps, norm_type)),
        ("clip_grad_norm_", lambda ps: gradstab.clip_grad_norm_(ps, 0.3 * total, norm_type)),
        (
            "clip_grad_norm_per_layer_",
            lambda ps: gradstab.clip_grad_norm_per_layer_(ps, 0.05 * total, norm_type),
        ),
        ("clip_grad_value_", lambda ps: gradstab.clip_grad_value_(ps, 0.5)),
    ]:
        a, b = _clone(base), _clone(base)
        # the shortcut must really be taken for these plain parameters
        assert FAST(0, a, norm_type, 0.0, 1e-6, False) is not None
        ra, rb = call(a), dispatcher_only(call, b)
        if isinstance(ra, tuple):
            assert all(_same(x, y) for x, y in zip(ra, rb)), name
        elif ra is not None:
            assert _same(ra, rb), name
        assert _grads_same(a, b), name


def test_fast_path_generator_and_single_tensor(dispatcher_only):
    base = _params(7)
    a, b = _clone(base), _clone(base)
    ra = gradstab.clip_grad_norm_((p for p in a), 1.0)
    rb = dispatcher_only(gradstab.clip_grad_norm_, (p for p in b), 1.0)
    assert _same(ra, rb) and _grads_same(a, b)
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 4.0, 0.0])
    assert float(gradstab.clip_grad_norm_(p, 1.0)) == 5.0
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0]))


def test_fast_path_cpu_tensor_bound_is_used():
    base = _params(3, with_double=False)
    a, b = _clone(base), _clone(base)
    gradstab.clip_grad_norm_(a, torch.tensor(0.5))
    gradstab.clip_grad_norm_(b, 0.5)
    assert _grads_same(a, b)


def test_fast_path_same_errors(dispatcher_only):
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, float("nan"), 2.0])
    msgs = []
    for run in (lambda f, *a, **k: f(*a, **k), dispatcher_only):
        with pytest.raises(RuntimeError, match="non-finite") as info:
            run(gradstab.clip_grad_norm_, [p], 1.0, error_if_nonfinite=True)
        msgs.append(str(info.value))
        assert torch.equal(p.grad.isnan(), torch.tensor([False, True, False]))
        assert p.grad[0] == 1.0 and p.grad[2] == 2.0  # unchanged
    assert msgs[0] == msgs[1]


def test_fast_path_empty_and_no_grads():
    assert FAST(0, [], 2.0, 0.0, 1e-6, False) is None
    assert FAST(0, [torch.nn.Parameter(torch.zeros(2))], 2.0, 0.0, 1e-6, False) is None
    assert float(gradstab.clip_grad_norm_([torch.nn.Parameter(torch.zeros(2))], 1.0)) == 0.0


class _Sub(torch.Tensor):
    pass


class _MyParam(torch.nn.Parameter):
    pass


def _with_grad(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    p.grad = g
    return p


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(
            lambda: [_with_grad(torch.zeros(3).as_subclass(_Sub).requires_grad_(), torch.ones(3))],
            id="tensor-subclass",
        ),
        pytest.param(
            lambda: [_with_grad(_MyParam(torch.zeros(3)), torch.ones(3))], id="parameter-subclass"
        ),
        pytest.param(
            lambda: [
                _with_grad(torch.nn.Parameter(torch.zeros(3)), torch._neg_view(torch.ones(3)))
            ],
            id="neg-bit-grad",
        ),
        pytest.param(lambda: [object()], id="not-a-tensor"),
        pytest.param(lambda: (x for x in [torch.nn.Parameter(torch.zeros(1))]), id="generator"),
    ],
)
def test_fast_path_declines(make):
    items = make()
    before = [getattr(x, "grad", None) for x in items] if isinstance(items, list) else None
    assert FAST(1, items, 2.0, 1e-3, 1e-6, False) is None
    if before is not None:
        for x, g in zip(items, before):
            if g is not None:
                assert torch.equal(x.grad, torch.ones(3) if not g.is_neg() else g)


def test_dispatch_mode_sees_the_op():
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    with Record():
        assert FAST(1, [p], 2.0, 1.0, 1e-6, False) is None
        total = gradstab.clip_grad_norm_([p], 1.0)
    assert any("gradstab.clip_norm" in s for s in seen), seen
    assert float(total) == 5.0


def test_function_mode_declines():
    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    with Passthrough():
        assert FAST(0, [p], 2.0, 0.0, 1e-6, False) is None
        assert float(gradstab.grad_stats([p]).total_norm) == 5.0


def test_meta_grads_take_the_dispatcher_path():
    p = torch.nn.Parameter(torch.zeros(2, device="meta"))
    p.grad = torch.zeros(2, device="meta")
    assert FAST(0, [p], 2.0, 0.0, 1e-6, False) is None
    stats = gradstab.grad_stats([p])
    assert stats.norms.device.type == "meta"


def test_compiled_call_does_not_use_the_shortcut():
    p = torch.nn.Parameter(torch.zeros(4))

    @torch.compile(fullgraph=True, backend="eager")
    def clip(params, bound):
        return gradstab.clip_grad_norm_(params, bound)

    p.grad = torch.tensor([3.0, 4.0, 0.0, 0.0])
    total = clip([p], torch.tensor(1.0, dtype=torch.float64))
    assert float(total) == 5.0
    assert torch.allclose(p.grad, torch.tensor([0.6, 0.8, 0.0, 0.0]))


def test_op_codes_are_the_extensions_one_definition():
    """functional, the extension and the CUDA harness use the codes of csrc/common/codes.h."""
    from gradstab_testing import cuda_sim_harness  # noqa: PLC0415 - imported only here

    assert _extension.OP_CODES == {
        "grad_stats": 0,
        "clip_norm": 1,
        "clip_norm_per_layer": 2,
        "clip_value": 3,
        "normalize_per_layer": 4,
    }
    assert cuda_sim_harness.OP_CODES == _extension.OP_CODES
    with pytest.raises(ValueError, match="unknown op code 5"):
        FAST(5, _params(0), 2.0, 1.0, 1e-6, False)


@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("gradstab::grad_stats", gradstab.grad_stats),
        ("gradstab::clip_norm", lambda ps: gradstab.clip_grad_norm_(ps, 0.5)),
        ("gradstab::clip_value", lambda ps: gradstab.clip_grad_value_(ps, 0.01)),
    ],
)
def test_shortcut_calls_show_in_the_profiler_under_the_ops_name(name, call, monkeypatch):
    params = _params(3)
    seen = []
    real = functional.cpu_fast_path

    def spy(*args):
        out = real(*args)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(functional, "cpu_fast_path", spy)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call(params)
    assert seen == [True]  # the shortcut served the call (the dispatcher did not run)
    names = [e.name for e in prof.events()]
    assert names.count(name) == 1, sorted(set(names))
