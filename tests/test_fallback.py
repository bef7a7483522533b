"""The pure-PyTorch path, in subprocesses (the extension is chosen at import):

- ``GRADSTAB_DISABLE_EXT=1``: ``backend_info`` says ``reference`` and why, and the public
  functions give the compiled path's results on the same inputs (to the C++-vs-reference
  tolerances of test_ops.py: exact counts, max-abs and value clipping, 1 ulp otherwise).
  Disabling the extension on purpose is silent (no build hint: it is built).
- the extension missing (its import fails): the same results, and one RuntimeWarning, on the
  first call only, naming the build command; ``backend_info`` gives the same advice.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from gradstab_testing.oracles import (
    FP32_ACCUM_RTOL,
    FP64_RTOL,
    GradSpec,
    as_params,
    assert_bitwise_equal,
    assert_grads_match,
    assert_stats_match,
    child_env,
    make_grads,
)

import gradstab

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORM_TYPES = (2.0, 1.0, math.inf, 3.0)

SPECS = [
    GradSpec((70_000,), torch.float32, scale_exp=0, seed=1),
    GradSpec((30, 40), torch.bfloat16, "transposed", scale_exp=-1, seed=2),
    GradSpec((2, 3, 4, 5), torch.float16, "channels_last", scale_exp=0, seed=3),
    GradSpec((0, 5), torch.float32, seed=4),
    GradSpec((25, 3), torch.float32, "strided", scale_exp=1, seed=5, special="nan"),
    GradSpec((11,), torch.float32, scale_exp=2, seed=6),
]
WITH_F64 = [*SPECS[:3], GradSpec((17,), torch.float64, scale_exp=3, seed=7)]

CHILD = r"""
import sys, warnings
mode, inputs, outputs = sys.argv[1:4]
if mode == "missing":
    sys.modules["gradstab._C"] = None  # makes `from gradstab import _C` raise ImportError
import torch
import gradstab
from gradstab_testing.oracles import as_params

cases = torch.load(inputs)
results = {"backend_info": gradstab.backend_info(), "runs": []}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for grads, p, bound in cases:
        run = {}
        fresh = lambda: [g.clone() for g in grads]
        ps = as_params([None, *fresh()])
        run["stats"] = tuple(gradstab.grad_stats(ps, norm_type=p))
        gs = fresh()
        run["total"] = gradstab.clip_grad_norm_(as_params(gs), torch.tensor(bound), p)
        run["clip_norm"] = gs
        gs = fresh()
        run["layer_norms"] = gradstab.clip_grad_norm_per_layer_(as_params(gs), bound, p)
        run["clip_layer"] = gs
        gs = fresh()
        gradstab.clip_grad_value_(as_params(gs), bound / 10)
        run["clip_value"] = gs
        results["runs"].append(run)
results["warnings"] = [
    (w.category.__name__, str(w.message), w.filename) for w in caught
]
torch.save(results, outputs)
"""


def _cases():
    out = []
    for specs in (SPECS, WITH_F64):
        for p in NORM_TYPES:
            out.append((make_grads(specs), p, 0.5))
    return out


def run_child(mode, tmp_path):
    cases = _cases()
    inputs, outputs = tmp_path / "inputs.pt", tmp_path / "outputs.pt"
    torch.save(cases, inputs)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = child_env(OMP_NUM_THREADS="1")
    env.pop("GRADSTAB_DISABLE_EXT", None)
    if mode == "disabled":
        env["GRADSTAB_DISABLE_EXT"] = "1"
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(inputs), str(outputs)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=str(tmp_path),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cases, torch.load(outputs, weights_only=False), str(script)


def compare_with_compiled_path(cases, results):
    """The child's (reference) results against this process' (C++) on the same inputs."""
    for (grads, p, bound), run in zip(cases, results["runs"]):
        what = f"p={p}, dtypes {[g.dtype for g in grads]}"
        rtol = FP64_RTOL if all(g.dtype == torch.float64 for g in grads) else FP32_ACCUM_RTOL

        def fresh(grads=grads):
            return [g.clone() for g in grads]

        stats = gradstab.grad_stats(as_params([None, *fresh()]), norm_type=p)
        assert_stats_match(stats, run["stats"], grads, f"grad_stats {what}")
        assert_bitwise_equal(stats.max_abs, run["stats"][1])
        gs = fresh()
        total = gradstab.clip_grad_norm_(as_params(gs), torch.tensor(bound), p)
        assert_stats_match((*stats[:3], total), (*run["stats"][:3], run["total"]), grads, what)
        assert_grads_match(gs, run["clip_norm"], rtol, f"clip_grad_norm_ {what}")
        gs = fresh()
        norms = gradstab.clip_grad_norm_per_layer_(as_params(gs), bound, p)
        assert_stats_match((norms, *stats[1:]), (run["layer_norms"], *run["stats"][1:]), grads)
        assert_grads_match(gs, run["clip_layer"], rtol, f"per-layer {what}")
        gs = fresh()
        gradstab.clip_grad_value_(as_params(gs), bound / 10)
        for a, b in zip(gs, run["clip_value"]):
            assert_bitwise_equal(a, b, f"clip_grad_value_ {what}")
            assert a.stride() == b.stride()


@pytest.mark.usefixtures("cpp_kernel")
def test_disabled_extension_uses_reference_kernels_with_the_same_results(tmp_path):
    cases, results, _ = run_child("disabled", tmp_path)
    info = results["backend_info"]
    assert info["cpu"]["kernel"] == "reference"
    assert "GRADSTAB_DISABLE_EXT=1" in info["cpu"]["reason"]
    assert info["cuda"]["kernel"] == "reference"
    compare_with_compiled_path(cases, results)
    gradstab_warnings = [w for w in results["warnings"] if "gradstab" in w[1]]
    assert gradstab_warnings == [], "disabling the extension on purpose is silent"


@pytest.mark.usefixtures("cpp_kernel")
def test_missing_extension_warns_once_and_gives_the_same_results(tmp_path):
    cases, results, script = run_child("missing", tmp_path)
    info = results["backend_info"]
    assert info["cpu"]["kernel"] == "reference"
    assert "pip install --no-build-isolation" in info["cpu"]["reason"]
    compare_with_compiled_path(cases, results)
    ours = [w for w in results["warnings"] if "gradstab" in w[1]]
    assert len(ours) == 1, ours  # 40 calls, one warning
    category, message, filename = ours[0]
    assert category == "RuntimeWarning"
    assert "no compiled CPU kernel" in message and "pip install --no-build-isolation" in message
    assert filename == script  # attributed to the caller's line, not to gradstab
