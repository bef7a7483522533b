"""Shared test helpers: random gradients, float64 oracles and ulp comparisons.

Reusable by every test file (``from gradstab_testing.oracles import ...``; pytest puts
``tests/`` on ``sys.path``, ``pythonpath`` in pyproject.toml):

- :class:`GradSpec`, :func:`grad_specs`, :func:`make_grad`, :func:`make_grads`: hypothesis
  strategies for lists of random gradients of any dtype (float16, bfloat16, float32,
  float64), shape (zero-size included), layout (contiguous, transposed, sliced with a step,
  channels_last), magnitude (subnormal to near the dtype's maximum) and NaN/Inf content.
- :func:`as_params`: parameters holding given gradients (``None`` allowed).
- :func:`oracle_stats`, :func:`oracle_clip_norm_`, :func:`oracle_clip_value_`: independent
  float64 oracles built on ``torch.linalg.vector_norm`` and ``torch.nn.utils``;
  :func:`agc_oracle`: adaptive gradient clipping (the paper's rule) unit by unit in float64.
- :func:`assert_ulp_close`, :func:`ulp_distance`, :func:`assert_bitwise_equal`,
  :func:`snapshot`: comparisons that treat NaN, infinities and signed zeros exactly.
- :func:`child_env`: the environment of a child Python process that imports the same gradstab
  as the tests (the source tree, or an installed copy) and this package.

Example:
    >>> import torch
    >>> from gradstab_testing.oracles import GradSpec, make_grad, oracle_stats
    >>> g = make_grad(GradSpec((3, 4), torch.float32, "transposed", scale_exp=2, seed=1))
    >>> g.is_contiguous(), oracle_stats([g], 2.0).total_norm.dtype
    (False, torch.float64)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from hypothesis import strategies as st
from torch import Tensor

import gradstab

#: The directory gradstab was imported from (the repository, or site-packages for an installed
#: copy), and ``tests/``, which holds this package: what a child process needs on its path.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(gradstab.__file__)))
TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_env(**extra: str) -> dict[str, str]:
    """``os.environ`` plus ``extra``, with ``PYTHONPATH`` leading to the gradstab this process
    imported and to ``tests/`` (so the child can ``import gradstab_testing``). Run the child
    outside the repository (``cwd``), or as a script, so that a source tree in its working
    directory cannot shadow an installed copy."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (PACKAGE_PARENT, TESTS_DIR, os.environ.get("PYTHONPATH", "")) if p
    )
    return env


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
LAYOUTS = ("contiguous", "transposed", "strided", "channels_last")
SPECIALS = (None, "nan", "inf", "-inf", "mixed")

#: Decimal exponent range of the random magnitudes per dtype: from subnormal (or just above
#: float16's smallest subnormal) to about a tenth of the largest finite value divided by the
#: largest standard-normal draw, so the values themselves stay finite.
SCALE_RANGE = {
    torch.float16: (-7, 3),
    torch.bfloat16: (-40, 36),
    torch.float32: (-44, 36),
    torch.float64: (-318, 306),
}

#: Norm types the fused loops specialise (2, 1, inf) and some general ones.
NORM_TYPES = (2.0, 1.0, math.inf, 3.0, 0.5, 1.5)

#: A value written into the skipped elements of "strided" gradients' storage; tests may
#: check it is never touched.
GAP_SENTINEL = 7.0


@dataclass(frozen=True)
class GradSpec:
    """Recipe for one random gradient (see :func:`make_grad`).

    Attributes:
        shape: logical shape.
        dtype: floating dtype.
        layout: ``contiguous``, ``transposed`` (last two dims swapped in memory, needs
            ``ndim >= 2``), ``strided`` (every other element of a larger buffer along dim 0,
            needs ``ndim >= 1``) or ``channels_last`` (needs ``ndim == 4``).
        scale_exp: values are standard normal draws times ``10**scale_exp``.
        seed: seed of the values (and of the positions of special values).
        special: ``None``, ``"nan"``, ``"inf"``, ``"-inf"`` or ``"mixed"`` (one NaN, one
            +inf, one -inf), written at random positions (if the tensor has elements).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    layout: str = "contiguous"
    scale_exp: int = 0
    seed: int = 0
    special: str | None = None


def _storage_for(spec: GradSpec) -> Tensor:
    """An uninitialised tensor of ``spec.shape`` with ``spec.layout``'s memory layout."""
    shape, dtype = spec.shape, spec.dtype
    if spec.layout == "contiguous":
        return torch.empty(shape, dtype=dtype)
    if spec.layout == "transposed":
        swapped = (*shape[:-2], shape[-1], shape[-2])
        return torch.empty(swapped, dtype=dtype).transpose(-1, -2)
    if spec.layout == "strided":
        big = torch.full((2 * shape[0], *shape[1:]), GAP_SENTINEL, dtype=dtype)
        return big[::2]
    if spec.layout == "channels_last":
        return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    raise ValueError(f"unknown layout {spec.layout!r}")


def make_grad(spec: GradSpec) -> Tensor:
    """Build the gradient ``spec`` describes (deterministic in ``spec``).

    Args:
        spec: the recipe.

    Returns:
        A CPU tensor with the requested shape, dtype, memory layout and values.

    Example:
        >>> g = make_grad(GradSpec((2, 3, 4, 5), torch.bfloat16, "channels_last", seed=3))
        >>> g.is_contiguous(memory_format=torch.channels_last)
        True
    """
    gen = torch.Generator().manual_seed(spec.seed)
    vals = torch.randn(spec.shape, dtype=torch.float64, generator=gen) * 10.0**spec.scale_exp
    n = vals.numel()
    if spec.special is not None and n > 0:
        specials = {
            "nan": [math.nan],
            "inf": [math.inf],
            "-inf": [-math.inf],
            "mixed": [math.nan, math.inf, -math.inf],
        }[spec.special]
        pos = torch.randint(0, n, (len(specials),), generator=gen)
        flat = vals.view(-1)
        for p, v in zip(pos.tolist(), specials):
            flat[p] = v
    out = _storage_for(spec)
    out.copy_(vals.to(spec.dtype))
    return out


def make_grads(specs: Sequence[GradSpec]) -> list[Tensor]:
    """:func:`make_grad` of each spec."""
    return [make_grad(s) for s in specs]


@st.composite
def grad_specs(
    draw: st.DrawFn,
    *,
    dtypes: Sequence[torch.dtype] = DTYPES,
    max_numel: int = 3000,
    specials: bool = True,
    extreme: bool = True,
    big: bool = False,
) -> GradSpec:
    """Hypothesis strategy of one :class:`GradSpec`.

    Args:
        draw: hypothesis' draw function (supplied by ``@st.composite``).
        dtypes: dtypes to choose from.
        max_numel: the most elements one gradient has (zero-size gradients are included).
        specials: whether NaN/Inf may be written into the gradient.
        extreme: magnitudes over the dtype's whole range (subnormal to near the maximum);
            otherwise ``10**-3`` to ``10**3``.
        big: sometimes draw a 1-D gradient of 65,537 to 140,000 elements (several of the
            C++ kernel's 65,536-element chunks, a partial last one).

    Returns:
        A strategy of specs.
    """
    dtype = draw(st.sampled_from(list(dtypes)))
    if big and draw(st.booleans()):
        shape: tuple[int, ...] = (draw(st.integers(65_537, 140_000)),)
    else:
        ndim = draw(st.integers(0, 4))
        dims = []
        budget = max_numel
        for _ in range(ndim):
            d = draw(st.integers(0, max(1, min(budget, 64))))
            dims.append(d)
            budget = max(1, budget // max(d, 1))
        shape = tuple(dims)
    layouts = ["contiguous"]
    if len(shape) >= 1:
        layouts.append("strided")
    if len(shape) >= 2:
        layouts.append("transposed")
    if len(shape) == 4:
        layouts.append("channels_last")
    layout = draw(st.sampled_from(layouts))
    lo, hi = SCALE_RANGE[dtype] if extreme else (-3, 3)
    scale_exp = draw(st.integers(lo, hi))
    special = draw(st.sampled_from(SPECIALS)) if specials else None
    seed = draw(st.integers(0, 2**31 - 1))
    return GradSpec(shape, dtype, layout, scale_exp, seed, special)


def grad_lists(min_size: int = 1, max_size: int = 5, **kwargs) -> st.SearchStrategy:
    """Hypothesis strategy of lists of :class:`GradSpec` (kwargs go to :func:`grad_specs`)."""
    return st.lists(grad_specs(**kwargs), min_size=min_size, max_size=max_size)


def as_params(grads: Sequence[Tensor | None]) -> list[torch.nn.Parameter]:
    """Parameters (zero-filled, matching shape and dtype) whose ``.grad`` are ``grads``.

    A ``None`` entry gives a float32 parameter of shape ``(2,)`` without a grad.
    """
    params = []
    for g in grads:
        if g is None:
            params.append(torch.nn.Parameter(torch.zeros(2)))
            continue
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype, device=g.device))
        p.grad = g
        params.append(p)
    return params


def clone_grads(grads: Sequence[Tensor]) -> list[Tensor]:
    """Copies of ``grads`` with the same values, dtypes, shapes and (where possible) strides.

    A gradient whose elements share memory (an expanded view) is copied contiguously.
    """
    out = []
    for g in grads:
        if any(st == 0 and n > 1 for st, n in zip(g.stride(), g.shape)):
            out.append(g.detach().contiguous().clone())
        else:
            out.append(torch.empty_strided(g.shape, g.stride(), dtype=g.dtype).copy_(g))
    return out


# ------------------------------------------------------------------------------ oracles --


class OracleStats(NamedTuple):
    """Float64 statistics of a gradient list (see :func:`oracle_stats`)."""

    norms: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    total_norm: Tensor


def _pow2_scale(m: float) -> float:
    """A power of two near ``m`` (1 for 0, inf or NaN): dividing by it is exact."""
    if m == 0 or not math.isfinite(m):
        return 1.0
    return 2.0 ** math.frexp(m)[1]


def _norm64(x: Tensor, p: float) -> Tensor:
    """p-norm of float64 ``x`` by ``torch.linalg.vector_norm``, free of overflow/underflow.

    The values are first divided by a power of two near their max-abs (exact), so float64
    extremes (``1e300``, ``1e-310``) do not overflow or underflow the sum of powers.
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    s = _pow2_scale(float(x.abs().amax()))
    return torch.linalg.vector_norm(x / s, p) * s


def oracle_stats(grads: Sequence[Tensor], norm_type: float) -> OracleStats:
    """Independent float64 statistics: ``torch.linalg.vector_norm`` per tensor and in total.

    Args:
        grads: gradients of any floating dtype.
        norm_type: p of the p-norm.

    Returns:
        float64 norms, max-abs (NaN-propagating) and the total norm, int64 non-finite counts.

    Example:
        >>> oracle_stats([torch.tensor([3.0, 4.0])], 2.0).total_norm
        tensor(5., dtype=torch.float64)
    """
    norms, maxabs, nonfinite = [], [], []
    for g in grads:
        x = g.detach().to(torch.float64).reshape(-1)
        norms.append(_norm64(x, norm_type))
        maxabs.append(x.abs().amax() if x.numel() else torch.zeros((), dtype=torch.float64))
        nonfinite.append((~torch.isfinite(x)).sum())
    if not grads:
        z = torch.zeros((0,), dtype=torch.float64)
        return OracleStats(z, z, torch.zeros((0,), dtype=torch.int64), torch.zeros(()).double())
    n = torch.stack(norms)
    return OracleStats(n, torch.stack(maxabs), torch.stack(nonfinite), _norm64(n, norm_type))


def result_dtype(grads: Sequence[Tensor]) -> torch.dtype:
    """The dtype gradstab reports statistics in: float64 if any grad is float64, else float32."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32


def oracle_clip_norm_(
    grads: Sequence[Tensor], max_norm: float, norm_type: float
) -> tuple[list[Tensor], Tensor]:
    """Global-norm clipping of float64 copies of ``grads`` by ``torch.nn.utils.clip_grad_norm_``.

    Zero-size gradients are left out of PyTorch's call (their inf-norm raises there; they
    contribute nothing). Where PyTorch's own float64 norm overflows (float64 gradients near
    1e300), the copies are clipped with PyTorch's formula ``min(1, max_norm / (total +
    1e-6))`` applied to the overflow-free :func:`oracle_stats` total instead.

    Args:
        grads: gradients (not modified).
        max_norm: the bound.
        norm_type: p.

    Returns:
        The clipped float64 copies and the float64 total norm.
    """
    params = as_params([g.detach().to(torch.float64).clone() for g in grads])
    # zero-size grads left out: they change nothing, and PyTorch refuses their inf-norm
    nonempty = [p for p in params if p.numel()]
    total = torch.nn.utils.clip_grad_norm_(nonempty, max_norm, norm_type, foreach=False)
    exact = oracle_stats(grads, norm_type).total_norm
    if torch.isfinite(exact) and not torch.isfinite(total):  # PyTorch's float64 sum overflowed
        coef = torch.clamp(max_norm / (exact + 1e-6), max=1.0)
        return [g.detach().to(torch.float64) * coef for g in grads], exact
    return [p.grad for p in params], total


def oracle_clip_value_(grads: Sequence[Tensor], clip_value: float) -> list[Tensor]:
    """``torch.nn.utils.clip_grad_value_`` applied to float64 copies of ``grads``."""
    params = as_params([g.detach().to(torch.float64).clone() for g in grads])
    if params:  # (PyTorch fails on an empty list)
        torch.nn.utils.clip_grad_value_(params, clip_value, foreach=False)
    return [p.grad for p in params]


def agc_unit_rows(t: Tensor) -> Tensor:
    """``t`` viewed as AGC units: one row per slice along dim 0, one row for 0-/1-D tensors."""
    return (
        t.reshape(1, t.numel()) if t.dim() <= 1 else t.reshape(t.shape[0], math.prod(t.shape[1:]))
    )


def agc_oracle(g: Tensor, w: Tensor, clip_factor: float, eps: float, p: float = 2.0):
    """Adaptive gradient clipping of one gradient, unit by unit in float64 (Brock et al. 2021,
    eq. 3): ``max_i = clip_factor * max(||W_i||, eps)``; ``G_i *= max_i / ||G_i||`` iff
    ``||G_i|| > max_i``; norms from ``torch.linalg.vector_norm``.

    Returns:
        (the clipped gradient in float64, the number of clipped units).
    """
    g64 = g.detach().to(torch.float64).clone()
    rows_g = agc_unit_rows(g64)
    rows_w = agc_unit_rows(w.detach().to(torch.float64))
    n = 0
    for i in range(rows_g.shape[0]):
        gn = float(torch.linalg.vector_norm(rows_g[i], p))
        wn = float(torch.linalg.vector_norm(rows_w[i], p))
        max_norm = clip_factor * (eps if wn < eps else wn)  # NaN weight norm stays NaN
        if gn > max_norm:
            rows_g[i] *= max_norm / gn
            n += 1
    return rows_g.reshape(g.shape), n


# ---------------------------------------------------------------------------- comparisons --

_INT_OF = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def _ordered_bits(t: Tensor) -> Tensor:
    """Integers whose order and differences are those of the floats ``t`` (ulp steps)."""
    bits = t.contiguous().view(_INT_OF[t.dtype]).to(torch.int64)
    nbits = 8 * t.element_size()
    magnitude = bits & ((1 << (nbits - 1)) - 1)
    return torch.where(bits < 0, -magnitude, magnitude)


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise distance in units in the last place between same-dtype floats.

    ``+0`` and ``-0`` are 0 apart; the result is meaningless for NaN (check those apart).
    """
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    return (_ordered_bits(a) - _ordered_bits(b)).abs()


def scale_ulps(dtype: torch.dtype, scalings: int = 1) -> int:
    """Ulps by which ``scalings`` in-place scalings of ``dtype`` values may lie from the float64
    product (or from another kernel's, whose coefficient differs in its last float64 bits).

    float32 is multiplied as PyTorch does, by the coefficient rounded to float32: that rounding
    (at most 1 ulp of the result), the product's (1/2 ulp) and the oracle's own (1/2 ulp) make
    2 ulps per scaling. float16/bfloat16 round once from float32 products: 1 ulp per scaling.
    """
    return scalings * (2 if dtype == torch.float32 else 1)


def assert_ulp_close(actual: Tensor, expected: Tensor, ulps: int = 1, what: str = "") -> None:
    """Assert ``actual`` is within ``ulps`` of ``expected`` rounded to ``actual.dtype``.

    NaN must be NaN at the same positions and infinities must match exactly (same sign);
    ``expected`` may have any floating dtype (typically a float64 oracle).

    Args:
        actual: the tested values.
        expected: the reference values (same shape).
        ulps: allowed distance in units in the last place of ``actual.dtype``.
        what: a label for the failure message.
    """
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    exp = expected.detach().to(actual.dtype)
    act = actual.detach()
    nan_a, nan_e = torch.isnan(act), torch.isnan(exp)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN at different positions\n{act}\n{exp}"
    inf_a, inf_e = torch.isinf(act), torch.isinf(exp)
    assert torch.equal(inf_a, inf_e) and torch.equal(act[inf_a], exp[inf_e]), (
        f"{what}: infinities differ\n{act}\n{exp}"
    )
    ok = ~(nan_a | inf_a)
    if ok.any():
        d = ulp_distance(act[ok], exp[ok])
        worst = int(d.max())
        assert worst <= ulps, (
            f"{what}: {worst} ulps apart (allowed {ulps}); actual {act[ok][d.argmax()]!r}, "
            f"expected {expected.detach().reshape(-1)[ok.reshape(-1)][d.argmax()]!r}"
        )


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float, what: str = "") -> None:
    """Assert ``|actual - expected| <= rtol * |expected|`` elementwise, NaN/inf exact."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{what}: NaN differ\n{a}\n{e}"
    fin = torch.isfinite(e)
    assert torch.equal(a[~fin & ~torch.isnan(e)], e[~fin & ~torch.isnan(e)]), f"{what}: inf"
    err = (a[fin] - e[fin]).abs()
    bound = rtol * e[fin].abs()
    assert bool((err <= bound).all()), (
        f"{what}: relative error {float((err / e[fin].abs().clamp_min(1e-300)).max()):.3g} "
        f"> {rtol}\n{a}\n{e}"
    )


def assert_bitwise_equal(actual: Tensor, expected: Tensor, what: str = "") -> None:
    """Assert same dtype, shape and bit patterns (NaN payloads and signed zeros included)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel():
        a = actual.detach().contiguous().view(_INT_OF.get(actual.dtype, actual.dtype))
        e = expected.detach().contiguous().view(_INT_OF.get(expected.dtype, expected.dtype))
        assert torch.equal(a, e), f"{what}: bits differ\n{actual}\n{expected}"


def snapshot(grads: Sequence[Tensor]) -> list[tuple[int, tuple[int, ...], Tensor]]:
    """(data_ptr, stride, bitwise copy) of each gradient, for :func:`assert_untouched`."""
    return [(g.data_ptr(), g.stride(), g.detach().clone()) for g in grads]


def assert_untouched(grads: Sequence[Tensor], snap, what: str = "") -> None:
    """Assert every gradient still has its memory, strides and exact bits from ``snap``."""
    assert len(grads) == len(snap)
    for i, (g, (ptr, stride, bits)) in enumerate(zip(grads, snap)):
        assert g.data_ptr() == ptr and g.stride() == stride, f"{what}: grad {i} was replaced"
        assert_bitwise_equal(g, bits, f"{what}: grad {i}")


# ------------------------------------------------------------------ statistics tolerances --

#: Relative accuracy of a float64-reported norm of a float16/bfloat16/float32 gradient: the
#: kernels accumulate such gradients in float32 lanes (the contract's "fp32 accumulation at
#: least"), each block added in double. On random data the error is ~1e-9; the float32
#: epsilon bounds it comfortably there. (Adversarial data, e.g. a constant-valued block, can
#: reach a few 1e-7: see DESIGN_RTOL.)
FP32_ACCUM_RTOL = 2.0**-23

#: Relative accuracy of a norm of float64 gradients (float64 accumulation, different order).
FP64_RTOL = 1e-12

#: The contract's bound for float32-accumulated norms on any data (docs/design.md, section 3).
DESIGN_RTOL = 1e-6


def assert_stats_match(stats, expected, grads: Sequence[Tensor], what: str = "") -> None:
    """Assert gradstab statistics ``stats`` agree with float64 ``expected`` for ``grads``.

    ``stats`` and ``expected`` are ``(norms, max_abs, nonfinite, total_norm)`` tuples (a
    :class:`gradstab.GradStats`, an op's output, an :class:`OracleStats`). Checks the result
    dtype (float64 if any grad is float64, else float32) and shapes; non-finite counts and
    max-abs exactly; norms within 1 ulp when reported in float32 (the float64-accurate value
    rounded once), and within :data:`FP64_RTOL` / :data:`FP32_ACCUM_RTOL` when reported in
    float64 (by the dtype of the gradient, or of any gradient for the total).
    """
    norms, max_abs, nonfinite, total = stats
    rd = result_dtype(grads)
    t = len(grads)
    assert norms.dtype == max_abs.dtype == total.dtype == rd, (what, norms.dtype, rd)
    assert nonfinite.dtype == torch.int64, what
    assert norms.shape == max_abs.shape == nonfinite.shape == (t,), (what, norms.shape)
    assert total.shape == (), (what, total.shape)
    assert torch.equal(nonfinite, expected[2]), f"{what}: nonfinite {nonfinite} != {expected[2]}"
    assert_ulp_close(max_abs, expected[1], 0, f"{what} max_abs")
    assert_norms_match(norms, expected[0], grads, what)
    if rd == torch.float32:
        assert_ulp_close(total, expected[3], 1, f"{what} total")
        return
    rtol = FP64_RTOL if all(g.dtype == torch.float64 for g in grads) else FP32_ACCUM_RTOL
    assert_rel_close(total, expected[3], rtol, f"{what} total")


def assert_norms_match(norms: Tensor, expected: Tensor, grads: Sequence[Tensor], what="") -> None:
    """Per-tensor norms against float64 ``expected``, tolerances as :func:`assert_stats_match`."""
    assert norms.dtype == result_dtype(grads) and norms.shape == (len(grads),), what
    if norms.dtype == torch.float32:
        assert_ulp_close(norms, expected, 1, f"{what} norms")
        return
    for i, g in enumerate(grads):
        rtol = FP64_RTOL if g.dtype == torch.float64 else FP32_ACCUM_RTOL
        assert_rel_close(norms[i], expected[i], rtol, f"{what} norm {i} ({g.dtype})")


def assert_grads_match(
    actual: Sequence[Tensor], expected: Sequence[Tensor], rtol64: float, what: str = ""
) -> None:
    """Assert clipped gradients agree with their float64 oracle values.

    Float16/bfloat16/float32 gradients: within 1 ulp of the oracle rounded to their dtype
    (gradstab multiplies them in float32, float32 by the coefficient rounded to float32,
    which moves the product by less than 1 ulp, and rounds once; the coefficient itself is
    accurate to far less than an ulp on random data). Float64 gradients: within ``rtol64``
    (the accuracy of the coefficient, i.e. of the norm it comes from) or 1 ulp (subnormal
    results).
    """
    assert len(actual) == len(expected), what
    for i, (a, e) in enumerate(zip(actual, expected)):
        label = f"{what} grad {i} ({a.dtype}, shape {tuple(a.shape)})"
        if a.dtype != torch.float64:
            assert_ulp_close(a, e, 1, label)
            continue
        assert_ulp_close(
            torch.where(torch.isfinite(a), 0.0, a), torch.where(torch.isfinite(e), 0.0, e), 0, label
        )
        fin = torch.isfinite(a) & torch.isfinite(e)
        af, ef = a[fin], e[fin]
        ok = (ulp_distance(af, ef.to(a.dtype)) <= 1) | ((af - ef).abs() <= rtol64 * ef.abs())
        assert bool(ok.all()), f"{label}: differs beyond {rtol64} / 1 ulp\n{af[~ok]}\n{ef[~ok]}"
