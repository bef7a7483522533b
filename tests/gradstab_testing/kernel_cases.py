"""Case tables and oracles of the kernels' tests: the same sizes (around the vector and work-unit
boundaries), dtypes, layouts, clip lists and AGC shapes, built on any device, and the float64
oracles they are checked against. Shared by the device-parametrised op tests (``test_ops.py``,
``test_agc.py``, ...: every device in ``DEVICES``), the GPU-only tests (``test_cuda.py``) and the
CUDA kernels on the CPU execution harness (``test_cuda_sim.py``).

Example:
    >>> import torch
    >>> g = make_grad(5, torch.float32, "offset", torch.Generator().manual_seed(0))
    >>> g.storage_offset(), g.numel()
    (1, 5)
"""

from __future__ import annotations

import math

import torch

from .oracles import assert_grads_match, assert_ulp_close, scale_ulps

EPS = 1e-6
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Sizes around the kernel's boundaries: 16-byte vectors (2-8 elements), 32 lanes, units of
#: 16 KB (2048-8192 elements), several units per tensor.
SIZES = (0, 1, 7, 63, 64, 65, 2047, 2049, 4095, 4096, 4097, 8191, 8193, 16385, 65537, 300_007)
#: Layouts of :func:`make_grad`.
LAYOUTS = ("contiguous", "offset", "offset3", "strided", "transposed")
#: Relative tolerance of norms against float64 oracles: 1e-6 (the contract) for lists holding
#: float16/bfloat16/float32 gradients (float32 partial sums of at most 8 terms, then double),
#: 1e-12 for float64-only lists (double throughout).
RTOL32 = 1e-6
RTOL64 = 1e-12

#: A mixed list for the norm types: (numel, dtype, layout), scaled by 0.01 * (i + 1).
MIXED_SPECS = (
    (4097, torch.float16, "offset"),
    (8193, torch.bfloat16, "contiguous"),
    (65537, torch.float32, "offset3"),
    (2049, torch.float32, "strided"),
    (0, torch.bfloat16, "contiguous"),
    (777, torch.float16, "transposed"),
)
#: The clipping tests' list: every dtype and layout, plus a float64 gradient (float64 results:
#: the coefficient is known exactly).
CLIP_SPECS = (
    (300_007, torch.float32, "contiguous"),
    (65537, torch.bfloat16, "offset"),
    (8193, torch.float16, "offset3"),
    (4097, torch.float32, "strided"),
    (2049, torch.bfloat16, "transposed"),
    (0, torch.float16, "contiguous"),
    (1, torch.float32, "contiguous"),
    (777, torch.float64, "offset"),
)
CLIP_OPS = ("clip_norm", "clip_norm_per_layer", "clip_value", "normalize_per_layer")

#: conv 4-D, linear 2-D, 1-D, 0-D, zero-size (no units; units of no elements), units just
#: under and over the kernel's 4,096-element work item (longer ones are split into pieces),
#: a long 1-D unit, many short units.
AGC_SHAPES = (
    (6, 3, 3, 3),
    (5, 7),
    (9,),
    (),
    (0, 4),
    (3, 0),
    (3, 4096),
    (3, 4097),
    (2, 70_001),
    (140_003,),
    (300, 33),
)
AGC_LAYOUTS = ("contiguous", "offset", "transposed", "channels_last")


# ------------------------------------------------------------------------------- inputs --


def randn(shape, dtype, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    """Standard normal float32 values times ``scale``, rounded to ``dtype``, on ``gen``'s device."""
    x = torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32) * scale
    return x.to(dtype)


def make_grad(
    n: int, dtype: torch.dtype, layout: str, gen: torch.Generator, scale: float = 1.0
) -> torch.Tensor:
    """A gradient of ``n`` elements laid out as ``layout``, on ``gen``'s device.

    contiguous; offset (a view one element into its storage: not 16-byte aligned);
    offset3 (three elements in); strided (every other element: not dense, processed on a
    copy); transposed (dense but permuted: used in place); matrix (2-D contiguous).
    """
    if layout == "contiguous":
        return randn((n,), dtype, gen, scale)
    if layout == "offset":
        return randn((n + 1,), dtype, gen, scale)[1:]
    if layout == "offset3":
        return randn((n + 3,), dtype, gen, scale)[3:]
    if layout == "strided":
        return randn((2 * n,), dtype, gen, scale)[::2]
    rows = max(1, math.isqrt(max(n, 1)))
    cols = max(1, n // rows)
    if layout == "transposed":
        return randn((cols, rows), dtype, gen, scale).t()
    if layout == "matrix":
        return randn((rows, cols), dtype, gen, scale)
    raise ValueError(layout)


def make_list(specs, gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    """Gradients of ``(numel, dtype, layout)`` specs, in order, all scaled by ``scale``."""
    return [make_grad(n, d, layout, gen, scale) for n, d, layout in specs]


def generator(seed: int, device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed`` (each device draws its own values)."""
    return torch.Generator(device=device).manual_seed(seed)


def bound(value: float, device) -> torch.Tensor:
    """``value`` as the ops' bound argument: a float64 0-d tensor on ``device``."""
    return torch.tensor(value, dtype=torch.float64, device=device)


def clip_list(seed: int, device, scale: float = 1.0) -> list[torch.Tensor]:
    """:data:`CLIP_SPECS` on ``device``: every dtype and layout, plus a float64 gradient
    (float64 results: the coefficient is known exactly)."""
    return make_list(CLIP_SPECS, generator(seed, device), scale)


def clones(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """``g.clone()`` of each (dense tensors keep their strides, strided views become dense)."""
    return [g.clone() for g in grads]


def as_param(g: torch.Tensor) -> torch.nn.Parameter:
    """A parameter (uninitialised, like ``g``) whose ``.grad`` is ``g`` itself."""
    p = torch.nn.Parameter(torch.empty_like(g))
    p.grad = g
    return p


def agc_place(x: torch.Tensor, dtype: torch.dtype, layout: str, device) -> torch.Tensor:
    """``x`` (CPU float64) as a ``device`` tensor of ``dtype`` laid out as ``layout``.

    contiguous; offset (one element into its storage: rows not 16-byte aligned); transposed
    (last two dims swapped in memory: units are not blocks, processed on a copy);
    channels_last (4-D: units are still blocks, used in place).
    """
    shape = tuple(x.shape)
    if layout == "offset":
        out = torch.empty(x.numel() + 1, dtype=dtype, device=device)[1:].view(shape)
    elif layout == "transposed" and len(shape) >= 2:
        swapped = (*shape[:-2], shape[-1], shape[-2])
        out = torch.empty(swapped, dtype=dtype, device=device).transpose(-1, -2)
    elif layout == "channels_last" and len(shape) == 4:
        out = torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)
    else:
        out = torch.empty(shape, dtype=dtype, device=device)
    return out.copy_(x.to(dtype))


def agc_pairs(seed: int, gdtype, wdtype, layout="contiguous", shapes=AGC_SHAPES, *, device="cpu"):
    """(grads, params) on ``device``: randn weights, gradients spread over rows so that some
    units are clipped and others not (clip factor 0.01)."""
    gen = torch.Generator().manual_seed(seed)
    grads, params = [], []
    for s in shapes:
        w = torch.randn(s, generator=gen, dtype=torch.float64)
        g = torch.randn(s, generator=gen, dtype=torch.float64) * 0.02
        if len(s) >= 2 and s[0] > 1:
            g *= torch.logspace(-1, 1, s[0], dtype=torch.float64).reshape(-1, *[1] * (len(s) - 1))
        grads.append(agc_place(g, gdtype, layout, device))
        params.append(agc_place(w, wdtype, layout, device))
    return grads, params


# ------------------------------------------------------------------------------ oracles --


def result_dtype(grads) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def rtol_of(grads) -> float:
    return RTOL64 if all(g.dtype == torch.float64 for g in grads) else RTOL32


def cpu_copies(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.detach().cpu().clone() for g in grads]


def assert_stats(got, want, rtol: float) -> None:
    """Our stats against a reference: counts and max exact, norms within rtol."""
    norms, max_abs, nonfinite, total = (t.cpu() for t in got)
    w_norms, w_max, w_nonfinite, w_total = (t.cpu() for t in want)
    assert norms.dtype == w_norms.dtype and total.dtype == w_total.dtype
    assert torch.equal(nonfinite, w_nonfinite), (nonfinite, w_nonfinite)
    torch.testing.assert_close(max_abs, w_max, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(norms, w_norms, rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(total, w_total, rtol=rtol, atol=0, equal_nan=True)


def oracle_norms(grads: list[torch.Tensor], p: float) -> torch.Tensor:
    """float64 per-tensor norms from torch.linalg.vector_norm (inputs of normal range); 0 for
    a zero-size tensor (vector_norm refuses the inf-norm of no elements)."""
    return torch.stack(
        [
            torch.linalg.vector_norm(g.detach().cpu().double().reshape(-1), p)
            if g.numel()
            else torch.zeros((), dtype=torch.float64)
            for g in grads
        ]
    )


def scaled(g: torch.Tensor, coef: float) -> torch.Tensor:
    """``g * coef`` with the kernels' rounding, computed on the CPU: PyTorch's ``mul_`` by the
    coefficient in the gradient's dtype (float16/bfloat16/float32: in float32 by ``float(coef)``,
    float64 in float64), except that float32 multiplies by the float64 coefficient and rounds
    once where ``|coef|`` lies outside float32's normal range (``< FLT_MIN`` or ``> FLT_MAX``)."""
    x = g.detach().cpu()
    if x.dtype == torch.float64:
        return x * coef
    cf = torch.tensor(coef, dtype=torch.float64).float()
    f32 = torch.finfo(torch.float32)
    if x.dtype == torch.float32 and not f32.tiny <= abs(coef) <= f32.max:
        return (x.double() * coef).float()
    return (x.float() * cf).to(x.dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The bit patterns of ``t`` (a CPU integer tensor), for exact comparisons."""
    t = t.detach().cpu().contiguous()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.view(view)


def units(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float64 CPU rows: one per slice along dim 0, one row for 0-/1-D tensors."""
    t = t.detach().cpu().to(torch.float64)
    return (
        t.reshape(1, t.numel()) if t.dim() <= 1 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
    )


def row_norms(rows: torch.Tensor, p: float) -> torch.Tensor:
    """Float64 p-norm of every row (0 for rows of no elements)."""
    if rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.float64)
    return torch.linalg.vector_norm(rows, p, dim=1)


def agc_oracle(grads, params, clip_factor=0.01, eps=1e-3, p=2.0):
    """Float64 expected gradients and clipped-unit counts: the paper's rule unit by unit, with
    norms from torch.linalg.vector_norm on CPU float64 copies."""
    out, counts = [], []
    for g, w in zip(grads, params):
        rg, rw = units(g), units(w)
        gn = row_norms(rg, p)
        wn = row_norms(rw, p)
        max_norm = clip_factor * torch.where(wn < eps, eps, wn)  # a NaN weight norm stays NaN
        clipped = gn > max_norm
        coef = torch.where(clipped, max_norm / gn, torch.ones_like(gn))
        out.append((rg * coef[:, None]).reshape(g.shape))
        counts.append(int(clipped.sum()))
    return out, counts


def agc_rtol(g: torch.Tensor, w: torch.Tensor) -> float:
    """Accuracy of a float64 gradient's coefficient: float64 norms only if W is float64 too."""
    return 1e-12 if w.dtype == torch.float64 else 1e-6


def assert_agc(grads, params, got, expected, what=""):
    """AGC results against ``expected = agc_oracle(...)``: counts exact, gradients within
    :func:`scale_ulps` (float64: within the accuracy of the coefficient)."""
    want, counts = expected
    norms, clipped, nonfinite, total = (t.cpu() for t in got)
    rd = result_dtype(grads)
    assert norms.dtype == total.dtype == rd and clipped.dtype == nonfinite.dtype == torch.int64
    assert clipped.tolist() == counts, (what, clipped.tolist(), counts)
    for i, (g, w, e) in enumerate(zip(grads, params, want)):
        if g.dtype == torch.float64:
            assert_grads_match([g.cpu()], [e], agc_rtol(g, w), f"{what} grad {i}")
        else:
            where = f"{what} grad {i} ({g.dtype}, {tuple(g.shape)})"
            assert_ulp_close(g.cpu(), e, scale_ulps(g.dtype), where)


def assert_agc_stats(got, want, rtol: float) -> None:
    """AGC statistics against the reference's: counts exact, norms within ``rtol``."""
    norms, clipped, nonfinite, total = (t.cpu() for t in got)
    assert norms.dtype == want[0].dtype and total.dtype == want[3].dtype
    assert torch.equal(clipped, want[1]) and torch.equal(nonfinite, want[2])
    torch.testing.assert_close(norms, want[0], rtol=rtol, atol=0, equal_nan=True)
    torch.testing.assert_close(total, want[3], rtol=rtol, atol=0, equal_nan=True)


def agc_clipped_rows(g: torch.Tensor, w: torch.Tensor, clip_factor=0.01, eps=1e-3):
    """Which units of ``g`` the rule clips (float64, on the CPU)."""
    gn = row_norms(units(g), 2.0)
    wn = row_norms(units(w), 2.0)
    return gn > clip_factor * torch.where(wn < eps, eps, wn)
