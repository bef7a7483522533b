"""Distributed statistics and clipping (gradstab.distributed), on CPU with gloo and 2 processes.

The multi-process scenarios live in ``tests/gradstab_testing/distributed.py``
(``FUNCTION_SCENARIOS``); one spawn runs them all (a module fixture), and each test below
reports one scenario.  In-process tests cover the exponent-binned reduction and the
single-process routing.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import gradstab

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from gradstab_testing import distributed as dh  # noqa: E402
from gradstab_testing import kernel_cases as kc  # noqa: E402
from gradstab_testing.oracles import assert_bitwise_equal, child_env  # noqa: E402

from gradstab import distributed as gd  # noqa: E402

# --------------------------------------------------------------------------- 2-process scenarios


@pytest.fixture(scope="module")
def scenario_results():
    return dh.run_scenarios(list(dh.FUNCTION_SCENARIOS))


@pytest.mark.parametrize("name", list(dh.FUNCTION_SCENARIOS))
def test_two_process_scenario(scenario_results, name):
    """See the scenario's docstring in tests/gradstab_testing/distributed.py."""
    errors = [e for e in scenario_results[name] if e is not None]
    assert not errors, "\n".join(errors)


# --------------------------------------------------------------------------- Lightning DDP


def test_lightning_ddp_two_cpu_processes(tmp_path):
    """Lightning strategy="ddp", 2 CPU processes: the norm is identical on both ranks and
    equals one process on the union of the ranks' batches."""
    pytest.importorskip("lightning")
    runs = dh.run_lightning("clip", tmp_path)
    assert all(run["world_size"] == dh.WORLD for run in runs)
    norms = [run["norms"] for run in runs]
    assert len(norms[0]) == dh.CLIP_STEPS
    assert norms[0] == norms[1], f"norms differ across ranks: {norms}"
    reference = dh.lightning_clip_reference()
    assert norms[0] == pytest.approx(reference, rel=1e-5), (norms[0], reference)
    assert all(n > dh.CLIP_MAX_NORM for n in reference)  # the clip did act


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.0, 0.5, 1.5, 7.0])
@pytest.mark.parametrize("exp10", [-320, -300, -200, -40, 0, 38, 150, 300])
def test_binned_sum_matches_float64_oracle(p, exp10):
    """The exponent-binned sum of p-powers gives the p-norm across float64's whole range."""
    gen = torch.Generator().manual_seed(abs(exp10) + int(10 * p))
    x = torch.rand(37, generator=gen, dtype=torch.float64) * 10.0**exp10
    got = gd._from_bins(gd._to_bins(x, p).sum(0), p)
    m = x.amax()
    want = m * torch.linalg.vector_norm(x / m, p)
    if math.isinf(float(want)):
        assert math.isinf(float(got))
    else:
        assert float(got) == pytest.approx(float(want), rel=1e-13 if p == int(p) else 1e-12)


def test_binned_sum_edge_values():
    nan, inf = math.nan, math.inf

    def norm(values, p=2.0):
        x = torch.tensor(values, dtype=torch.float64)
        return float(gd._from_bins(gd._to_bins(x, p).sum(0), p))

    assert norm([1e308, 1e308]) == pytest.approx(math.sqrt(2) * 1e308, rel=1e-15)
    assert norm([1e-310, 1e-310]) == pytest.approx(math.sqrt(2) * 1e-310, rel=1e-3)  # subnormal
    assert norm([1.7e308, 1.7e308]) == inf  # the norm itself is past float64
    assert norm([1e300, 3.0, 1e-300]) == 1e300
    assert norm([0.0, 0.0]) == 0.0
    assert norm([]) == 0.0
    assert norm([inf, 1.0]) == inf
    assert math.isnan(norm([inf, nan, 1.0]))
    assert math.isnan(norm([nan], 1.0))
    # one bin per value, per row
    rows = torch.tensor([[3.0, 4.0], [1e200, 1e200]], dtype=torch.float64)
    got = gd._from_bins(gd._to_bins(rows, 2.0), 2.0)
    torch.testing.assert_close(got, rows, rtol=0, atol=0)


def test_reduce_without_group_is_local():
    """With no group the reduction is the identity: statistics of whole tensors."""
    norms = torch.tensor([3.0, 4.0, 0.0])
    st = gd.reduce_stats(norms, norms.clone(), torch.tensor([0, 2, 0]), 2.0, None)
    torch.testing.assert_close(st.norms, norms)
    assert st.nonfinite.tolist() == [0, 2, 0]
    assert float(st.total_norm) == 5.0
    assert float(gd.reduce_total(norms, math.inf, None)) == 4.0
    assert float(gd.reduce_total(torch.zeros(0), 2.0, None)) == 0.0


def _params(grads):
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros_like(g))
        p.grad = g.clone()
        out.append(p)
    return out


@pytest.mark.parametrize("p", [2.0, 1.0, math.inf])
def test_single_process_layout_matches_ops(p):
    """The distributed code path on whole tensors (no group) equals the fused ops."""
    gen = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(5, 3, generator=gen),
        torch.randn(4, generator=gen).to(torch.bfloat16),
        torch.randn(0),
        torch.randn(6, 2, generator=gen).t(),
    ]
    st = gd.grad_stats(grads, p)
    ref = torch.ops.gradstab.grad_stats(grads, p)
    for a, b in zip(st, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    a, b = [g.clone() for g in grads], [g.clone() for g in grads]
    tot = gd.clip_grad_norm_(a, 0.5, p)
    ref_tot = gradstab.clip_grad_norm_(_params(b), 0.5, p)
    torch.testing.assert_close(tot, ref_tot, rtol=1e-6, atol=0)
    bb = _params(grads)
    gradstab.clip_grad_norm_(bb, 0.5, p)
    for x, y in zip(a, bb):
        torch.testing.assert_close(
            x, y.grad, rtol=1e-2 if x.dtype == torch.bfloat16 else 2e-6, atol=0
        )


def test_process_group_validation():
    w = _params([torch.ones(2)])
    with pytest.raises(
        TypeError, match=r"process_group must be a torch\.distributed\.ProcessGroup"
    ):
        gradstab.clip_grad_norm_(w, 1.0, process_group="world")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialized"):
            gradstab.grad_stats(w, process_group=_FakeGroup())
    assert w[0].grad.tolist() == [1.0, 1.0]  # nothing written


class _FakeGroup(dist.ProcessGroup if hasattr(dist, "ProcessGroup") else object):
    def __init__(self) -> None:
        super().__init__(0, 1)


def test_mark_replicated():
    a = torch.nn.Parameter(torch.zeros(2))
    assert not gd.is_replicated(a)
    gd.mark_replicated(a)
    assert gd.is_replicated(a)
    with pytest.raises(TypeError, match="argument 0 is a list"):
        gd.mark_replicated([a])


def test_plain_calls_do_not_import_distributed_tensor(tmp_path):
    """The single-process path imports no DTensor machinery."""
    code = (
        "import sys, torch, gradstab\n"
        "w = torch.nn.Parameter(torch.zeros(3)); w.grad = torch.ones(3)\n"
        "gradstab.clip_grad_norm_([w], 1.0); gradstab.grad_stats([w])\n"
        "gradstab.clip_grad_norm_per_layer_([w], 1.0)\n"
        "print('torch.distributed.tensor' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False"], out.stdout + out.stderr


@pytest.mark.parametrize("coef", [0.3, 2.5, 4e-41, 1e-45, 0.0, 1.0])
def test_scaling_on_cpu_rounds_as_the_kernels(coef):
    """``scale_``/``scale_each_`` (the sharded paths' multiply) give the ops' bits on the CPU:
    PyTorch's float32 multiply, and float64 rounded once where the coefficient is subnormal."""
    gen = torch.Generator().manual_seed(5)
    xs = [torch.randn(1000, generator=gen, dtype=torch.float64) * 1e8 for _ in range(3)]
    ts = [xs[0].float(), xs[1].bfloat16(), xs[2]]
    one, each = [t.clone() for t in ts], [t.clone() for t in ts]
    gd.scale_(one, torch.tensor(coef, dtype=torch.float64))
    gd.scale_each_(each, torch.full((3,), coef, dtype=torch.float64))
    for a, b, t in zip(one, each, ts):
        want = t if coef == 1.0 else kc.scaled(t, coef)
        assert_bitwise_equal(a, want, f"scale_ {t.dtype} by {coef}")
        assert_bitwise_equal(b, want, f"scale_each_ {t.dtype} by {coef}")
