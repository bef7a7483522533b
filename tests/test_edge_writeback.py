"""Write-back of large non-contiguous gradients: every writing op, every layout, several chunks.

A gradient that is not one dense span (a strided or offset strided view) is processed on a
contiguous copy, cut into 65,536-element chunks, and copied back if the op changed it; a dense
but permuted one (transposed, channels_last, an offset view not 16-byte aligned) is written in
place, chunk by chunk, in memory order; an expanded view (stride 0) cannot be written and must
be refused before anything changes. Here the elements an op changes lie only past the first
two chunks (in logical and in memory order), behind a small gradient earlier in the list, so
a write-back decided from the first chunk (or from another tensor's chunks) leaves them
unchanged. The storage around a strided view holds a sentinel that must survive.

Oracles: ``torch.nn.utils`` clipping on float64 copies (:func:`helpers.oracle_clip_norm_`,
:func:`helpers.oracle_clip_value_`), the per-tensor formulas in float64, and the AGC rule unit
by unit (tests/test_agc.py).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from gradstab_testing.devices import DEVICES
from gradstab_testing.oracles import (
    GAP_SENTINEL,
    agc_oracle,
    as_params,
    assert_grads_match,
    assert_ulp_close,
    oracle_clip_norm_,
    oracle_clip_value_,
    oracle_stats,
)

import gradstab

OPS = torch.ops.gradstab
EPS = 1e-6
CHUNK = 1 << 16
WRITE_OPS = (
    "clip_norm",
    "clip_norm_per_layer",
    "normalize_per_layer",
    "clip_value",
    "adaptive_clip",
)
BOUND = 1.0  # max_norm, target_norm, clip_value
CLIP_FACTOR = 0.01  # AGC, weights of ones

pytestmark = pytest.mark.usefixtures("one_thread")


def _strided_2d(base: Callable[..., torch.Tensor]) -> torch.Tensor:
    return base(40, 8_000)[:, ::2]  # the issue's big[:, ::2]: 160,000 elements, copied


def _offset_strided(base):
    return base(41, 8_001)[1:, 1::2]  # starts 8,002 elements in, odd offset: copied


def _strided_3d(base):
    return base(3, 240, 400)[:, ::2, :]  # 144,000 elements, copied


def _transposed(base):
    return base(400, 400).t()  # dense, permuted: written in place in memory order


def _strided_transposed(base):
    return base(400, 800)[:, ::2].t()  # neither dense nor contiguous: copied


def _channels_last(base):
    return base(4, 32, 32, 40).permute(0, 3, 1, 2)  # (4, 40, 32, 32) channels_last, in place


def _offset_dense(base):
    return base(160_003)[3:]  # contiguous, 6/12/24 bytes past an aligned start, in place


#: name -> builder(make_base) of a view with over 2 * 65,536 elements.
LAYOUTS = {
    "strided_2d": _strided_2d,
    "offset_strided": _offset_strided,
    "strided_3d": _strided_3d,
    "transposed": _transposed,
    "strided_transposed": _strided_transposed,
    "channels_last": _channels_last,
    "offset_dense": _offset_dense,
}


def _offsets(v: torch.Tensor) -> torch.Tensor:
    """Memory offset (in elements, from ``v``'s first element) of every element of ``v``."""
    off = torch.zeros(v.shape, dtype=torch.int64)
    for d, (n, s) in enumerate(zip(v.shape, v.stride())):
        shape = [1] * v.dim()
        shape[d] = n
        off = off + torch.arange(n).reshape(shape) * s
    return off


def hot_mask(v: torch.Tensor) -> torch.Tensor:
    """Elements past the first two chunks both in logical (row-major) and in memory order."""
    n = v.numel()
    logical = torch.arange(n).reshape(v.shape)
    mem = _offsets(v)
    lo = 2 * CHUNK
    mask = (logical >= max(lo, int(0.9 * n))) & (mem >= max(lo, int(0.9 * int(mem.max()))))
    assert mask.any() and not mask.reshape(-1)[: 2 * CHUNK].any()
    return mask


def build(layout: str, dtype: torch.dtype, device: str, op: str):
    """(storage, view, float64 values written into the view): the hot elements are beyond
    the bound (|x| in [2, 3)); for clip_value the others are small non-zero values within
    it, for the scaling ops they are 0 (scaling leaves them unchanged)."""
    made: list[torch.Tensor] = []

    def make_base(*shape: int) -> torch.Tensor:
        made.append(torch.full(shape, GAP_SENTINEL, dtype=dtype, device=device))
        return made[-1]

    view = LAYOUTS[layout](make_base)
    assert view.numel() > 2 * CHUNK
    gen = torch.Generator().manual_seed(view.numel())
    hot = hot_mask(view)
    sign = torch.randint(0, 2, view.shape, generator=gen) * 2.0 - 1.0
    big = (2.0 + torch.rand(view.shape, generator=gen, dtype=torch.float64)) * sign
    small = (torch.rand(view.shape, generator=gen, dtype=torch.float64) - 0.5) * 0.5
    background = small if op == "clip_value" else torch.zeros_like(small)
    values = torch.where(hot, big, background).to(dtype).double()
    view.copy_(values)
    return made[0], view, values


def expected_after(op: str, grads64: list[torch.Tensor], weights: list[torch.Tensor]):
    """Float64 oracle of the gradients after ``op`` (CPU tensors)."""
    if op == "clip_norm":
        return oracle_clip_norm_(grads64, BOUND, 2.0)[0]
    if op == "clip_value":
        return oracle_clip_value_(grads64, BOUND)
    if op == "adaptive_clip":
        return [agc_oracle(g, w, CLIP_FACTOR, 1e-3)[0] for g, w in zip(grads64, weights)]
    out = []
    for g in grads64:
        coef = BOUND / (oracle_stats([g], 2.0).total_norm + EPS)
        out.append(g * (torch.clamp(coef, max=1.0) if op == "clip_norm_per_layer" else coef))
    return out


def call(op: str, api: str, grads: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
    """Run ``op`` on ``grads`` through the dispatcher (``api="op"``) or gradstab.functional
    (whose eager shortcut takes the gradients from the parameters)."""
    dev = grads[0].device
    b = torch.tensor(BOUND, dtype=torch.float64, device=dev)
    if api == "op":
        if op == "clip_norm":
            OPS.clip_norm(grads, b, 2.0, EPS, False)
        elif op in ("clip_norm_per_layer", "normalize_per_layer"):
            getattr(OPS, op)(grads, b, 2.0, EPS)
        elif op == "clip_value":
            OPS.clip_value(grads, b, 2.0)
        else:
            OPS.adaptive_clip(grads, weights, CLIP_FACTOR, 1e-3, 2.0)
        return
    params = as_params(grads)
    for prm, w in zip(params, weights):
        prm.data.copy_(w)
    fn = {
        "clip_norm": lambda: gradstab.clip_grad_norm_(params, BOUND),
        "clip_norm_per_layer": lambda: gradstab.clip_grad_norm_per_layer_(params, BOUND),
        "normalize_per_layer": lambda: gradstab.normalize_grad_per_layer_(params, BOUND),
        "clip_value": lambda: gradstab.clip_grad_value_(params, BOUND),
        "adaptive_clip": lambda: gradstab.adaptive_clip_grad_(params, CLIP_FACTOR, 1e-3),
    }[op]
    fn()
    for prm, g in zip(params, grads):
        assert prm.grad is g  # written in place, not replaced


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("api", ["op", "functional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", WRITE_OPS)
def test_changes_past_the_first_chunks_are_written_back(op, layout, dtype, api, device):
    """The gradient equals the oracle's after the op (its changed elements all past the first
    two chunks), is still the view that was passed, and the storage around it is untouched."""
    storage, view, values = build(layout, dtype, device, op)
    # a small, unchanged gradient first: its chunk precedes the big one's in the chunk table
    first = torch.full((100,), 0.25 if op == "clip_value" else 0.0, dtype=dtype, device=device)
    grads = [first, view]
    weights = [torch.ones_like(g) for g in grads]
    outside = storage.clone()
    inside = covered(storage, view)
    want = expected_after(op, [first.double().cpu(), values], [w.cpu() for w in weights])
    call(op, api, grads, weights)
    assert_grads_match([g.cpu() for g in grads], want, 1e-12, f"{op} {layout} {api}")
    hot = hot_mask(view)
    assert not torch.equal(values[hot], view.double().cpu()[hot])  # the op did change them
    assert torch.equal(storage[~inside], outside[~inside]), "the gaps around the view changed"


def covered(storage: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Bool mask shaped like the contiguous ``storage``: where ``view`` has its elements."""
    probe = torch.zeros(storage.shape, dtype=torch.float32, device=storage.device)
    probe.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(1.0)
    return probe != 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", WRITE_OPS)
def test_expanded_view_that_must_change_past_the_first_chunk_is_refused(op, device):
    """(80,000, 1) expanded to (80,000, 2): its changed elements (rows >= 72,000, logical
    index >= 144,000) can only be written through shared memory locations, so the op raises
    before any gradient changes, instead of writing some and not others."""
    base = torch.zeros((80_000, 1), dtype=torch.float32, device=device)
    base[72_000:] = 2.5
    view = base.expand(80_000, 2)
    other = torch.full((1_000,), 3.0, device=device)  # would be changed too
    snap = (base.clone(), other.clone())
    weights = [torch.ones_like(other), torch.ones(80_000, 2, device=device)]
    with pytest.raises(ValueError, match="share one memory location"):
        call(op, "op", [other, view], weights)
    assert torch.equal(base, snap[0]) and torch.equal(other, snap[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["clip_norm", "clip_norm_per_layer", "clip_value", "adaptive_clip"])
def test_expanded_view_with_nothing_to_change_is_read_like_any_other(op, device):
    """The same expanded view within the bound: no error, nothing written, its statistics."""
    base = torch.full((80_000, 1), 1e-3, dtype=torch.float32, device=device)
    base[72_000:] = -2e-3
    snap = base.clone()
    view = base.expand(80_000, 2)
    dev = torch.device(device)
    b = torch.tensor(1e3, dtype=torch.float64, device=dev)  # far above the norm and max-abs
    if op == "clip_norm":
        stats = OPS.clip_norm([view], b, 2.0, EPS, False)
    elif op == "clip_norm_per_layer":
        stats = OPS.clip_norm_per_layer([view], b, 2.0, EPS)
    elif op == "clip_value":
        stats = OPS.clip_value([view], b, 2.0)
    else:  # units are rows of 2 elements; weights of ones: 0.01 * sqrt(2) > sqrt(2) * 2e-3
        stats = OPS.adaptive_clip([view], [torch.ones(80_000, 2, device=dev)], 0.01, 1e-3, 2.0)
    want = oracle_stats([view.cpu()], 2.0)
    assert_ulp_close(stats[0].cpu(), want.norms, 1, op)
    assert_ulp_close(stats[3].cpu(), want.total_norm, 1, op)
    if op != "adaptive_clip":
        assert_ulp_close(stats[1].cpu(), want.max_abs, 0, op)
    assert torch.equal(base, snap)


@pytest.mark.parametrize("device", DEVICES)
def test_issue_example_clip_grad_value_on_big_strided_view(device):
    """clip_grad_value_ on big[:, ::2] (160,000 elements) with outliers only past the first
    chunk: every outlier is clamped, the skipped columns keep their values."""
    big = torch.zeros((40, 8_000), device=device)
    big[30:, 1::2] = 9.0  # the columns the view skips
    big[30:, ::2] = torch.linspace(-5.0, 5.0, 10 * 4_000, device=device).reshape(10, 4_000)
    w = torch.nn.Parameter(torch.zeros(40, 4_000, device=device))
    w.grad = big[:, ::2]
    gradstab.clip_grad_value_([w], 1.0)
    assert float(w.grad.abs().max()) == 1.0
    assert float(big[30:, ::2].abs().max()) == 1.0  # through the view, in the storage
    assert torch.equal(big[30:, 1::2], torch.full_like(big[30:, 1::2], 9.0))
