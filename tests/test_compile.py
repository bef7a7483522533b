"""``torch.compile(fullgraph=True)`` over the public functions: traced without graph breaks
(the ops' fake kernels, mutation declared in the schemas), same results as eager.

Eager and compiled calls run the same C++ kernel on the same values; under compile the
mutated gradients go through functionalization (copies), which may change a gradient's
memory layout and so the order of the float32-lane sums: norms and clipped values are
compared within 1 ulp, counts and max-abs exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from gradstab_testing import kernel_cases as kc
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    GradSpec,
    as_params,
    assert_bitwise_equal,
    assert_ulp_close,
    make_grads,
)

import gradstab

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

SPECS = [
    GradSpec((37, 21), torch.float32, "transposed", scale_exp=1, seed=1),
    GradSpec((300,), torch.bfloat16, scale_exp=0, seed=2),
    GradSpec((2, 3, 4, 5), torch.float32, "channels_last", scale_exp=-1, seed=3),
    GradSpec((0, 3), torch.float32, seed=4),
    GradSpec((50,), torch.float32, "strided", scale_exp=2, seed=5),
]


def step(params, max_norm, clip_value):
    """One of everything: statistics, global, per-layer and value clipping."""
    before = gradstab.grad_stats(params)
    total = gradstab.clip_grad_norm_(params, max_norm)
    layer_norms = gradstab.clip_grad_norm_per_layer_(params, max_norm * 0.5, norm_type=math.inf)
    gradstab.clip_grad_value_(params, clip_value)
    after = gradstab.grad_stats(params, norm_type=1.0)
    return (*before, total, layer_norms, *after)


def _compare(out_c, out_e, grads_c, grads_e):
    for i, (a, b) in enumerate(zip(out_c, out_e)):
        if a.dtype == torch.int64:
            assert torch.equal(a, b), i
        else:
            assert_ulp_close(a, b.double(), 1, f"output {i}")
    for g_c, g_e in zip(grads_c, grads_e):
        assert g_c.stride() == g_e.stride()
        assert_ulp_close(g_c, g_e.double(), 1, "gradient")


def test_compiled_step_matches_eager():
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    for seed_shift, max_norm, clip_value in [(0, 0.5, 0.05), (10, 3.0, 0.2)]:
        specs = [
            GradSpec(s.shape, s.dtype, s.layout, s.scale_exp, s.seed + seed_shift) for s in SPECS
        ]
        grads_e, grads_c = make_grads(specs), make_grads(specs)
        out_e = step(as_params(grads_e), torch.tensor(max_norm), torch.tensor(clip_value))
        if seed_shift:  # new values and bounds: the same graph, no recompilation
            with torch._dynamo.config.patch(error_on_recompile=True):
                out_c = compiled(
                    as_params(grads_c), torch.tensor(max_norm), torch.tensor(clip_value)
                )
        else:
            out_c = compiled(as_params(grads_c), torch.tensor(max_norm), torch.tensor(clip_value))
        _compare(out_c, out_e, grads_c, grads_e)
        assert float(out_e[4]) > max_norm  # the step did clip
        assert_bitwise_equal(out_c[3], out_e[3])  # non-finite counts of the first stats


def test_compiled_negative_max_norm_tensor_is_refused_by_the_kernel():
    """Under compile the Python check of a tensor bound is skipped (it would read the
    value); the kernel checks it, before anything is written."""
    torch._dynamo.reset()

    def clip(params, max_norm):
        return gradstab.clip_grad_norm_(params, max_norm)

    compiled = torch.compile(clip, fullgraph=True, backend="aot_eager")
    grads = make_grads(SPECS[:2])
    before = [g.clone() for g in grads]
    with pytest.raises(ValueError, match="max_norm must be a non-negative number, got -1"):
        compiled(as_params(grads), torch.tensor(-1.0))
    for g, b in zip(grads, before):
        assert_bitwise_equal(g, b)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_fullgraph_clip_is_bit_identical_to_the_op(device):
    """clip_grad_norm_ under torch.compile(fullgraph=True) on the kernels' clip list: the total
    and every clipped gradient bit for bit as the eager op's."""
    # clones: all 16-byte aligned, as any clone of them
    grads = [g.clone() for g in kc.clip_list(29, device)]
    params = [kc.as_param(g) for g in grads]
    ref = kc.clones(grads)

    @torch.compile(fullgraph=True)
    def step(ps, bound):
        return gradstab.clip_grad_norm_(ps, bound)

    total = step(params, kc.bound(1.0, device))
    want = torch.ops.gradstab.clip_norm(ref, kc.bound(1.0, device), 2.0, kc.EPS, False)[3]
    assert torch.equal(kc.bits(total), kc.bits(want))
    assert all(torch.equal(kc.bits(p.grad), kc.bits(r)) for p, r in zip(params, ref))
