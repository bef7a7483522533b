"""Version counters: every op that writes gradients bumps them, on every path.

PyTorch's in-place ops bump a tensor's version counter, and autograd uses it to refuse a
backward through a tensor that was changed after it was saved (a gradient kept for double
backward, for instance). gradstab's writing ops do the same for every gradient they were given
(written or not, as their schema marks them all as written): through the dispatcher (an
ADInplaceOrView kernel, csrc/common/version_counter.cpp, or its Python twin without the extension),
through the eager shortcut (``functional`` -> ``cpu_fast_path`` / ``cuda_fast_path``), and on
the pure-PyTorch path (run in a subprocess with ``GRADSTAB_DISABLE_EXT=1``). ``grad_stats``
reads only and bumps nothing; an op that raises changes nothing and bumps nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import child_env

import gradstab

OPS = torch.ops.gradstab
EPS = 1e-6


def _grads(device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [
        torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        for shape, dtype in [
            ((5, 7), torch.float32),
            ((0,), torch.float16),
            ((300,), torch.bfloat16),
        ]
    ]


def _dispatcher_calls(device: str, bound: float):
    b = torch.tensor(bound, device=device)
    return {
        "clip_norm": lambda g: OPS.clip_norm(g, b, 2.0, EPS, False),
        "clip_norm_per_layer": lambda g: OPS.clip_norm_per_layer(g, b, 2.0, EPS),
        "clip_value": lambda g: OPS.clip_value(g, b, 2.0),
        "normalize_per_layer": lambda g: OPS.normalize_per_layer(g, b, 2.0, EPS),
        "adaptive_clip": lambda g: OPS.adaptive_clip(
            g, [torch.ones_like(x) for x in g], bound, 1e-3, 2.0
        ),
    }


def _functional_calls(bound: float):
    return {
        "clip_grad_norm_": lambda ps: gradstab.clip_grad_norm_(ps, bound),
        "clip_grad_norm_per_layer_": lambda ps: gradstab.clip_grad_norm_per_layer_(ps, bound),
        "clip_grad_value_": lambda ps: gradstab.clip_grad_value_(ps, bound),
        "normalize_grad_per_layer_": lambda ps: gradstab.normalize_grad_per_layer_(ps, bound),
        "adaptive_clip_grad_": lambda ps: gradstab.adaptive_clip_grad_(ps, bound),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bound", [1e9, 1e-3], ids=["healthy", "clipping"])
@pytest.mark.parametrize(
    "name",
    ["clip_norm", "clip_norm_per_layer", "clip_value", "normalize_per_layer", "adaptive_clip"],
)
def test_dispatcher_bumps_every_given_gradient(device, bound, name):
    grads = _grads(device)
    before = [g._version for g in grads]
    _dispatcher_calls(device, bound)[name](grads)
    assert all(g._version > v for g, v in zip(grads, before)), name


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bound", [1e9, 1e-3], ids=["healthy", "clipping"])
@pytest.mark.parametrize(
    "name",
    [
        "clip_grad_norm_",
        "clip_grad_norm_per_layer_",
        "clip_grad_value_",
        "normalize_grad_per_layer_",
        "adaptive_clip_grad_",
    ],
)
def test_functional_api_bumps_every_gradient(device, bound, name):
    params = [torch.nn.Parameter(torch.ones_like(g)) for g in _grads(device)]
    for p, g in zip(params, _grads(device)):
        p.grad = g
    frozen = torch.nn.Parameter(torch.ones(3, device=device))  # no grad: skipped
    before = [p.grad._version for p in params]
    _functional_calls(bound)[name]([params[0], frozen, *params[1:]])
    assert all(p.grad._version > v for p, v in zip(params, before)), name


@pytest.mark.parametrize("device", DEVICES)
def test_reading_ops_bump_nothing(device):
    grads = _grads(device)
    before = [g._version for g in grads]
    OPS.grad_stats(grads, 2.0)
    params = [torch.nn.Parameter(torch.ones_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    gradstab.grad_stats(params)
    assert [g._version for g in grads] == before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["functional", "dispatcher"])
def test_an_op_that_raises_bumps_nothing(device, path):
    grads = _grads(device)
    grads[0][0, 0] = float("nan")
    before = [g._version for g in grads]
    with pytest.raises(RuntimeError, match="non-finite"):
        if path == "dispatcher":
            OPS.clip_norm(grads, torch.tensor(1.0, device=device), 2.0, EPS, True)
        else:
            params = [torch.nn.Parameter(torch.ones_like(g)) for g in grads]
            for p, g in zip(params, grads):
                p.grad = g
            gradstab.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
    assert [g._version for g in grads] == before


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", ["functional", "dispatcher"])
def test_autograd_refuses_a_backward_through_a_clipped_saved_gradient(device, path):
    x = torch.randn(6, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
    loss = (gx * gx).sum()  # saves gx for the backward
    if path == "dispatcher":
        OPS.clip_norm([gx], torch.tensor(1e-3, device=device), 2.0, EPS, False)
    else:
        holder = torch.nn.Parameter(torch.zeros(6, device=device))
        holder.grad = gx.detach()  # shares gx's version counter
        gradstab.clip_grad_norm_([holder], 1e-3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_inference_tensors_are_accepted(device):
    with torch.inference_mode():
        g = torch.randn(10, device=device)
    OPS.clip_norm([g], torch.tensor(1e-3, device=device), 2.0, EPS, False)
    p = torch.nn.Parameter(torch.zeros(10, device=device))
    with torch.inference_mode():
        p.grad = torch.randn(10, device=device)
    gradstab.clip_grad_norm_([p], 1e-3)
    torch.testing.assert_close(
        torch.linalg.vector_norm(p.grad.double()),
        torch.tensor(1e-3, dtype=torch.float64, device=device),
        rtol=1e-5,
        atol=0,
    )


@pytest.mark.skipif(
    os.environ.get("GRADSTAB_DISABLE_EXT") == "1", reason="already the pure-PyTorch path"
)
def test_pure_pytorch_path_follows_the_same_rule(tmp_path):
    here = os.path.abspath(__file__)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", here, "-k", "not pure"],
        env=child_env(GRADSTAB_DISABLE_EXT="1", PYTHONWARNINGS="ignore"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
