"""``python -m gradstab bench``: time gradstab against PyTorch and a memory-bandwidth floor.

Gradient sets are built from the published shapes of real models (GPT-2 small,
ResNet-50) plus a set of 1,000 small tensors, filled with ``torch.randn`` (never
zeros) and attached as ``.grad`` of ``nn.Parameter`` objects.  For every set, dtype
and mode, all contestants run in the same process, interleaved round-robin (one call
of each per round, the starting contestant rotating from round to round) so that a
noisy machine slows them all alike.  The table reports medians and interquartile
ranges of the timed rounds, the ratio ``torch_median / gradstab_median`` and the
fraction of the floor ``floor_ms / gradstab_median``, where the floor is the least
memory traffic the mode needs, timed on a flat buffer of the same number of bytes: one
read (``healthy``, ``stats``), one read+write (``value``), or one read plus one
read+write (``clip``, which must know the norm before it writes).

Modes:
    ``healthy``: ``clip_grad_norm_`` with ``max_norm = 1e6 x`` the total norm
    (nothing is clipped).  ``clip``: ``max_norm = 0.5 x`` the initial total norm;
    after each timed call an untimed ``torch._foreach_mul_(grads, 2.0)`` restores the
    scale, so every repeat really clips.  ``stats``: ``gradstab.grad_stats`` against
    ``torch._foreach_norm`` alone (and Lightning's ``grad_norm`` when installed).
    ``value``: ``clip_grad_value_`` at the 99.9th percentile of ``|g|``; the few
    clamped elements are restored (untimed) after each call.
    ``agc``: ``gradstab.adaptive_clip_grad_`` (unit-wise AGC, clip factor 0.01, on
    ``randn`` weights) against the per-parameter PyTorch loop of timm's
    ``adaptive_clip_grad`` (the same formula); every unit is clipped, and the gradients
    are restored (untimed) after each call.  ``agc-healthy``: the same with clip factor
    1000, so no unit is clipped.  The floor of AGC reads the weights as well: one read
    plus one read+write (``agc``), two reads (``agc-healthy``).
    ``adaptive``: a healthy step clipped with an adaptive threshold,
    ``gradstab.adaptive.clip_(params, PercentileThreshold(90, history=1000,
    include_current=False))`` (an AutoClip-style percentile, the bound known before the step:
    one fused pass), against the same healthy step with a fixed threshold
    (``gradstab.clip_grad_norm_``): the ratio (fixed / adaptive, < 1 when adaptive is slower)
    is the price of adapting.  The history is primed with 1,000 norms ten times the real one,
    so the step stays healthy for the first 901 calls.  ``adaptive-zscore``: the same with
    ``ZScoreThreshold()`` (ZClip's defaults; its rule judges this step's norm, so it measures
    it first: two reads), primed with norms 0.9x and 1.1x the real one.

On CUDA (``--device cuda``; CUDA events time each call) three things are added, and the CPU
run is unchanged: the ``llama1b`` set (Llama 3.2 1B, 1.24 B parameters; timed by default only on
CUDA, on the CPU only when named); rotated inputs: a set smaller than 3x the GPU's L2 cache is
timed on several identical copies (at most 16), cycled call by call, so that every call reads
gradients the previous calls evicted from L2, as a training step does (gradstab's CUDA
descriptor-table cache holds 32 lists of gradients, so every copy stays a cache hit, and the
warm-up covers every copy); and a summary of achieved bandwidth (the least traffic of the mode
over the median time) against the flat-buffer floor of the same run, with the project's
targets. The direct C++ entry ``gradstab._C.cuda_fast_path`` is timed as an extra row when the
extension has it.

Example:
    $ python -m gradstab bench --quick
    $ python -m gradstab bench --set gpt2 --dtype fp32,bf16 --mode clip --json out.json
    $ python -m gradstab bench --device cuda --set gpt2,many-small,llama1b --mode healthy,clip
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import gradstab
from gradstab import bench_train
from gradstab.adaptive import AdaptiveThreshold, PercentileThreshold, ZScoreThreshold
from gradstab.adaptive import clip_ as adaptive_clip_

__all__ = [
    "PARAM_SETS",
    "BenchError",
    "Result",
    "add_arguments",
    "gpt2_small_shapes",
    "llama32_1b_shapes",
    "many_small_shapes",
    "primed_threshold",
    "resnet50_shapes",
    "run",
    "timm_style_agc",
]

Shapes = list[tuple[str, tuple[int, ...]]]

AGC_MODES = ("agc", "agc-healthy")
ADAPTIVE_MODES = ("adaptive", "adaptive-zscore")
MODES = ("healthy", "clip", "stats", "value", *AGC_MODES, *ADAPTIVE_MODES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: Default timed rounds per set, chosen so ``--set all`` (fp32 and bf16, healthy and
#: clip) takes under ~3 minutes on a 2-core CPU VM; ``--repeats`` overrides.
DEFAULT_REPEATS = {"gpt2": 60, "resnet50": 150, "many-small": 300}
#: ``--quick``: a README smoke run (many-small and resnet50, fp32) in well under 30 s.
QUICK_SETS = ("many-small", "resnet50")
QUICK_REPEATS = {"gpt2": 10, "resnet50": 20, "many-small": 60}
DEFAULT_WARMUP = 3
QUICK_WARMUP = 2

#: Relative tolerance of the correctness check of the total norm (fp32 gradients).
NORM_RTOL = 1e-5


class BenchError(RuntimeError):
    """A check before timing failed; the benchmark is aborted."""


# --------------------------------------------------------------------------------------
# Parameter sets from published shapes
# --------------------------------------------------------------------------------------


def gpt2_small_shapes() -> Shapes:
    """Parameter shapes of GPT-2 small (Hugging Face ``GPT2Model`` layout).

    ``Conv1D`` weights are stored ``(in, out)``; ``lm_head`` is tied to ``wte`` and so
    not counted.  How the totals check out (d = 768)::

        wte 50257 x 768 = 38,597,376      wpe 1024 x 768 = 786,432
        per block, 12 tensors:
          weights  c_attn 768x2304 + attn.c_proj 768x768 + c_fc 768x3072
                   + mlp.c_proj 3072x768 = 12 d^2              = 7,077,888
          vectors  ln_1 2d + c_attn.b 3d + attn.c_proj.b d + ln_2 2d
                   + c_fc.b 4d + mlp.c_proj.b d = 13 d          =     9,984
                                                        block  = 7,087,872
        12 blocks = 85,054,464;  ln_f 2d = 1,536
        total = 38,597,376 + 786,432 + 85,054,464 + 1,536 = 124,439,808
        tensors = 2 + 12 x 12 + 2 = 148

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order.

    Example:
        >>> shapes = gpt2_small_shapes()
        >>> len(shapes), shapes[0]
        (148, ('wte.weight', (50257, 768)))
    """
    vocab, n_ctx, d, n_layer = 50257, 1024, 768, 12
    shapes: Shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    _check_totals("gpt2", shapes, tensors=148, params=124_439_808)
    return shapes


def resnet50_shapes() -> Shapes:
    """Parameter shapes of ResNet-50 (torchvision ``resnet50`` layout).

    Convolutions have no bias; each BatchNorm contributes weight and bias (running
    statistics are buffers, not parameters).  Bottleneck stages have 3, 4, 6, 3 blocks
    of widths 64, 128, 256, 512 (expansion 4); the first block of each stage has a
    1x1 ``downsample`` convolution + BatchNorm.  How the totals check out::

        stem   conv1 64x3x7x7 + bn1                       =      9,536   (3 tensors)
        layer1 3 blocks  (downsample 64 -> 256)           =    215,808  (30 tensors)
        layer2 4 blocks  (downsample 256 -> 512)          =  1,219,584  (39 tensors)
        layer3 6 blocks  (downsample 512 -> 1024)         =  7,098,368  (57 tensors)
        layer4 3 blocks  (downsample 1024 -> 2048)        = 14,964,736  (30 tensors)
        fc     1000x2048 + 1000                           =  2,049,000   (2 tensors)
        total                                             = 25,557,032 (161 tensors)

    (9 tensors per block, 3 per downsample: 16 x 9 + 4 x 3 + 3 + 2 = 161.)

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order.

    Example:
        >>> shapes = resnet50_shapes()
        >>> len(shapes), shapes[-2]
        (161, ('fc.weight', (1000, 2048)))
    """
    expansion = 4
    shapes: Shapes = []

    def bn(name: str, c: int) -> None:
        shapes.extend([(name + ".weight", (c,)), (name + ".bias", (c,))])

    shapes.append(("conv1.weight", (64, 3, 7, 7)))
    bn("bn1", 64)
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        out_ch = width * expansion
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            shapes.append((pre + "conv1.weight", (width, in_ch, 1, 1)))
            bn(pre + "bn1", width)
            shapes.append((pre + "conv2.weight", (width, width, 3, 3)))
            bn(pre + "bn2", width)
            shapes.append((pre + "conv3.weight", (out_ch, width, 1, 1)))
            bn(pre + "bn3", out_ch)
            if b == 0:
                shapes.append((pre + "downsample.0.weight", (out_ch, in_ch, 1, 1)))
                bn(pre + "downsample.1", out_ch)
            in_ch = out_ch
    shapes += [("fc.weight", (1000, in_ch)), ("fc.bias", (1000,))]
    _check_totals("resnet50", shapes, tensors=161, params=25_557_032)
    return shapes


def many_small_shapes(count: int = 1000, low: int = 256, high: int = 4096, seed: int = 0) -> Shapes:
    """``count`` 1-D tensors of sizes uniform in ``[low, high]`` (a fixed seed).

    Stands for the biases, norms and adapters of a large model: launch- and
    dispatch-bound rather than bandwidth-bound.  With the defaults the mean size is
    about 2,176 elements, so about 8.7 MB in fp32 (checked to lie in 8-9.5 MB).

    Args:
        count: number of tensors.
        low: smallest size (elements).
        high: largest size (elements), inclusive.
        seed: seed of the generator drawing the sizes.

    Returns:
        ``(name, shape)`` pairs.

    Example:
        >>> shapes = many_small_shapes()
        >>> len(shapes), 256 <= min(s[0] for _, s in shapes)
        (1000, True)
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    shapes: Shapes = [(f"small.{i}", (n,)) for i, n in enumerate(sizes)]
    if (count, low, high) == (1000, 256, 4096):
        fp32_bytes = 4 * sum(sizes)
        if not 8.0e6 <= fp32_bytes <= 9.5e6:
            raise BenchError(f"many-small: {fp32_bytes / 1e6:.2f} MB in fp32, expected 8-9.5 MB")
    return shapes


def _check_totals(name: str, shapes: Shapes, tensors: int, params: int) -> None:
    n = sum(math.prod(s) for _, s in shapes)
    if len(shapes) != tensors or n != params:
        raise BenchError(
            f"{name}: {len(shapes)} tensors / {n:,} params, expected {tensors} / {params:,}"
        )


#: Set name -> shape builder.
PARAM_SETS: dict[str, Callable[[], Shapes]] = {
    "gpt2": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "many-small": many_small_shapes,
}


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


class _Timer:
    """Times one call: ``perf_counter`` on CPU, CUDA events (after a sync) on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_ms(self, fn: Callable[[], object]) -> float:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


@dataclass
class _Contestant:
    name: str
    kind: str  # "gradstab", "baseline" or "floor"
    fn: Callable[[], object]
    after: Callable[[], object] | None = None  # untimed, after every call
    floor: str | None = None  # "read" or "read+write" for floor rows
    times_ms: list[float] = field(default_factory=list)


@dataclass
class Result:
    """Timings of one contestant on one (set, dtype, mode).

    Attributes:
        set: parameter set name.
        dtype: ``"fp32"`` or ``"bf16"``.
        mode: ``"healthy"``, ``"clip"``, ``"stats"`` or ``"value"``.
        contestant: display name.
        kind: ``"gradstab"``, ``"baseline"`` or ``"floor"``.
        times_ms: every timed repeat, in milliseconds, in round order.
        nbytes: bytes of gradients (or of the flat floor buffer).
        ratio: ``median / gradstab median`` for baselines (higher: gradstab faster).
        floor_ms: for gradstab, the floor of the mode (see ``_floor_ms``).
        floor_fraction: ``floor_ms / median`` for gradstab (1.0 = at the floor).
        floor: for floor rows, ``"read"`` or ``"read+write"``.
    """

    set: str
    dtype: str
    mode: str
    contestant: str
    kind: str
    times_ms: list[float]
    nbytes: int
    ratio: float | None = None
    floor_ms: float | None = None
    floor_fraction: float | None = None
    floor: str | None = None

    @property
    def median_ms(self) -> float:
        """Median of the timed repeats."""
        return statistics.median(self.times_ms)

    @property
    def iqr_ms(self) -> float:
        """Interquartile range (q3 - q1) of the timed repeats."""
        q1, q3 = _quartiles(self.times_ms)
        return q3 - q1

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of all fields plus the summary statistics."""
        q1, q3 = _quartiles(self.times_ms)
        return {
            "set": self.set,
            "dtype": self.dtype,
            "mode": self.mode,
            "contestant": self.contestant,
            "kind": self.kind,
            "floor": self.floor,
            "nbytes": self.nbytes,
            "median_ms": self.median_ms,
            "q1_ms": q1,
            "q3_ms": q3,
            "iqr_ms": q3 - q1,
            "min_ms": min(self.times_ms),
            "ratio": self.ratio,
            "floor_ms": self.floor_ms,
            "floor_fraction": self.floor_fraction,
            "times_ms": self.times_ms,
        }


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _run_rounds(contestants: list[_Contestant], timer: _Timer, warmup: int, repeats: int) -> None:
    """Round-robin: one call of each contestant per round, the first one rotating."""
    n = len(contestants)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(warmup + repeats):
            for k in range(n):
                c = contestants[(r + k) % n]
                ms = timer.time_ms(c.fn)
                if c.after is not None:
                    c.after()
                if r >= warmup:
                    c.times_ms.append(ms)
            timer.sync()
    finally:
        if gc_was_enabled:
            gc.enable()


# --------------------------------------------------------------------------------------
# One (set, dtype): gradients, checks, contestants
# --------------------------------------------------------------------------------------


def _make_params(
    shapes: Shapes, dtype: torch.dtype, device: torch.device, seed: int
) -> list[nn.Parameter]:
    """Parameters (never read, so left uninitialized) with ``randn`` gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for _, shape in shapes:
        p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
        p.grad = torch.randn(shape, dtype=dtype, device=device, generator=gen)
        params.append(p)
    return params


def _ref_norms(grads: list[Tensor]) -> Tensor:
    """Per-tensor 2-norms in float64."""
    return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads])


def _ref_total(grads: list[Tensor]) -> float:
    return float(torch.linalg.vector_norm(_ref_norms(grads)))


def _close(a: float, b: float, rtol: float) -> bool:
    return abs(a - b) <= rtol * abs(b)


def _check_total_norm(
    set_name: str, dtype: str, params: list[nn.Parameter]
) -> tuple[float, dict[str, float]]:
    """gradstab's total norm against a float64 reference and torch's; abort if off.

    gradstab must match the float64 norm within ``NORM_RTOL``.  It must also match
    ``torch.nn.utils.clip_grad_norm_`` within ``NORM_RTOL`` plus torch's own distance
    from the float64 norm: torch accumulates large fp32 tensors in fp32 (4e-5 relative
    error on ResNet-50, 8e-4 on GPT-2 small), and bf16 grads give it a bf16 norm.

    Returns:
        gradstab's total norm, and the relative errors of gradstab and torch.
    """
    grads = [p.grad for p in params]
    ref = _ref_total(grads)
    ours = float(gradstab.clip_grad_norm_(params, max_norm=math.inf))
    theirs = float(torch.nn.utils.clip_grad_norm_(params, max_norm=math.inf, foreach=True))
    err = {"gradstab_vs_fp64": abs(ours - ref) / ref, "torch_vs_fp64": abs(theirs - ref) / ref}
    where = f"{set_name}/{dtype}"
    if not _close(ours, ref, NORM_RTOL):
        raise BenchError(
            f"{where}: gradstab total norm {ours!r} differs from the float64 reference "
            f"{ref!r} by more than rtol={NORM_RTOL}"
        )
    if not _close(ours, theirs, NORM_RTOL + err["torch_vs_fp64"]):
        raise BenchError(
            f"{where}: gradstab total norm {ours!r} differs from torch.nn.utils."
            f"clip_grad_norm_ {theirs!r} by more than rtol={NORM_RTOL} + torch's own error "
            f"{err['torch_vs_fp64']:.2g} (float64 reference {ref!r})"
        )
    return ours, err


def _value_bound(grads: list[Tensor], seed: int) -> float:
    """About the 99.9th percentile of ``|g|`` over all gradients (from a sample)."""
    flat_sizes = torch.tensor([g.numel() for g in grads], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    want = 1 << 20
    picks = torch.multinomial(flat_sizes, want, replacement=True, generator=gen)
    counts = torch.bincount(picks, minlength=len(grads)).tolist()
    samples = []
    for g, k in zip(grads, counts):
        if k:
            idx = torch.randint(g.numel(), (k,), generator=gen).to(g.device)
            samples.append(g.reshape(-1)[idx].float().abs().cpu())
    return float(torch.quantile(torch.cat(samples), 0.999))


class _Outliers:
    """Elements beyond ``±v`` and their values, to undo a clamp (untimed) after each call."""

    def __init__(self, grads: list[Tensor], v: float) -> None:
        self.grads = grads
        self.entries: list[tuple[Tensor, Tensor, Tensor]] = []
        self.count = 0
        for g in grads:
            flat = g.view(-1)
            idx = (flat.abs() > v).nonzero().squeeze(1)
            if idx.numel():
                self.entries.append((flat, idx, flat[idx].clone()))
                self.count += idx.numel()

    def restore(self) -> None:
        for flat, idx, vals in self.entries:
            flat.index_copy_(0, idx, vals)

    def check_clamped(self, v: float, where: str) -> None:
        bad = max(float(g.abs().amax()) for g in self.grads)
        if bad > v:
            raise BenchError(f"{where}: gradstab.clip_grad_value_ left |g| = {bad} > {v}")
        for flat, idx, vals in self.entries:
            want = vals.clamp(-v, v)
            if not torch.equal(flat[idx], want):
                raise BenchError(f"{where}: gradstab.clip_grad_value_ clamped values wrongly")


def _lightning_grad_norm() -> Callable[..., Any] | None:
    try:
        from lightning.pytorch.utilities import grad_norm  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return grad_norm


def _contestants(
    mode: str,
    *,
    params: list[nn.Parameter],
    flat: Tensor,
    total: float,
    value_bound: float,
    outliers: _Outliers | None,
) -> list[_Contestant]:
    if mode in AGC_MODES:
        return _agc_contestants(mode, params, flat)
    if mode in ADAPTIVE_MODES:
        return _adaptive_contestants(mode, params, flat, total)
    grads = [p.grad for p in params]
    clip_fn = torch.nn.utils.clip_grad_norm_
    floors = [
        _Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        _Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
    ]
    if mode in ("clip", "value"):
        floors.append(
            _Contestant(
                "floor: read+write (flat.mul_)",
                "floor",
                lambda: flat.mul_(1.0),
                floor="read+write",
            )
        )
    if mode in ("healthy", "clip"):
        max_norm = total * (1e6 if mode == "healthy" else 0.5)
        after = (lambda: torch._foreach_mul_(grads, 2.0)) if mode == "clip" else None
        return [
            _Contestant(
                "gradstab", "gradstab", lambda: gradstab.clip_grad_norm_(params, max_norm), after
            ),
            _Contestant(
                "torch foreach=True",
                "baseline",
                lambda: clip_fn(params, max_norm, foreach=True),
                after,
            ),
            _Contestant(
                "torch foreach=False",
                "baseline",
                lambda: clip_fn(params, max_norm, foreach=False),
                after,
            ),
            *floors,
        ]
    if mode == "stats":
        out = [
            _Contestant("gradstab", "gradstab", lambda: gradstab.grad_stats(params)),
            _Contestant("torch._foreach_norm", "baseline", lambda: torch._foreach_norm(grads, 2.0)),
        ]
        grad_norm = _lightning_grad_norm()
        if grad_norm is not None:
            holder = nn.Module()
            holder.params = nn.ParameterList(params)
            out.append(
                _Contestant("lightning grad_norm", "baseline", lambda: grad_norm(holder, 2.0))
            )
        return out + floors
    # value
    assert outliers is not None
    v = value_bound
    value_fn = torch.nn.utils.clip_grad_value_
    return [
        _Contestant(
            "gradstab",
            "gradstab",
            lambda: gradstab.clip_grad_value_(params, v),
            outliers.restore,
        ),
        _Contestant(
            "torch foreach=True",
            "baseline",
            lambda: value_fn(params, v, foreach=True),
            outliers.restore,
        ),
        _Contestant(
            "torch foreach=False",
            "baseline",
            lambda: value_fn(params, v, foreach=False),
            outliers.restore,
        ),
        *floors,
    ]


def _check_mode(
    mode: str,
    where: str,
    *,
    params: list[nn.Parameter],
    total: float,
    value_bound: float,
    outliers: _Outliers | None,
) -> None:
    """One untimed call of gradstab in ``mode``, checked against a float64 reference."""
    if mode in AGC_MODES:
        _agc_check(mode, where, params)
        return
    if mode in ADAPTIVE_MODES:
        _adaptive_check(mode, where, params, total)
        return
    grads = [p.grad for p in params]
    if mode == "clip":
        gradstab.clip_grad_norm_(params, 0.5 * total)
        after = _ref_total(grads)
        torch._foreach_mul_(grads, 2.0)
        if not _close(after, 0.5 * total, 1e-3):
            raise BenchError(f"{where}: after clipping to {0.5 * total}, the norm is {after}")
    elif mode == "stats":
        stats = gradstab.grad_stats(params)
        ref = _ref_norms(grads)
        if not torch.allclose(stats.norms.double(), ref, rtol=NORM_RTOL, atol=0):
            raise BenchError(f"{where}: gradstab.grad_stats norms differ from float64 norms")
        amax = torch.stack([g.abs().amax().float() for g in grads])
        if not torch.equal(stats.max_abs.float(), amax) or int(stats.nonfinite.sum()) != 0:
            raise BenchError(f"{where}: gradstab.grad_stats max_abs/nonfinite are wrong")
    elif mode == "value":
        assert outliers is not None
        gradstab.clip_grad_value_(params, value_bound)
        outliers.check_clamped(value_bound, where)
        outliers.restore()


def _floor_ms(mode: str, rows: Sequence[Result]) -> float:
    """The floor of ``mode``: the least memory traffic any implementation needs.

    ``healthy`` and ``stats`` read every gradient once: one read (the faster of
    ``flat.sum`` and ``flat.amax``).  ``value`` reads and writes once: ``flat.mul_``.
    ``clip`` must know the norm before writing anything, so (unless the gradients fit in
    cache) it reads once and then reads and writes once: read + read+write.
    """
    read = min(r.median_ms for r in rows if r.floor == "read")
    if mode in AGC_MODES:  # the weights are read too (same bytes as the gradients here)
        if mode == "agc-healthy":
            return 2 * read
        return read + min(r.median_ms for r in rows if r.floor == "read+write")
    if mode in ("healthy", "stats", *ADAPTIVE_MODES):
        return read
    write = min(r.median_ms for r in rows if r.floor == "read+write")
    return write if mode == "value" else read + write


# --------------------------------------------------------------------------------------
# Adaptive gradient clipping (modes agc, agc-healthy)
# --------------------------------------------------------------------------------------

#: Clip factor per AGC mode: 0.01 clips every unit of randn gradients on randn weights,
#: 1000 clips none.
AGC_CLIP_FACTOR = {"agc": 0.01, "agc-healthy": 1000.0}


def _fill_weights(params: list[nn.Parameter], seed: int) -> None:
    """``randn`` weights (AGC reads them; the other modes never do)."""
    gen = torch.Generator(device=params[0].device).manual_seed(seed + 2)
    with torch.no_grad():
        for p in params:
            p.normal_(generator=gen)


def timm_style_agc(
    params: Sequence[nn.Parameter], clip_factor: float, eps: float = 1e-3, norm_type: float = 2.0
) -> None:
    """The baseline: timm's ``adaptive_clip_grad`` loop, one parameter at a time.

    Unit-wise norms over every dimension but the first (the whole tensor for 0-/1-D
    parameters); ``max_norm = clip_factor * max(||W_i||, eps)``; units with
    ``||G_i|| >= max_norm`` are scaled by ``max_norm / max(||G_i||, 1e-6)``.  The same
    values as gradstab's rule whenever ``max_norm >= 1e-6`` (always, with these defaults).

    Args:
        params: parameters whose ``.grad`` is clipped in place.
        clip_factor: lambda.
        eps: floor of the weight norm.
        norm_type: p of the norms.

    Example:
        >>> w = nn.Parameter(torch.ones(2, 2)); w.grad = torch.ones(2, 2)
        >>> timm_style_agc([w], 0.5); w.grad
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    for p in params:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad.detach()
        dims = tuple(range(1, w.ndim)) if w.ndim > 1 else None
        keep = w.ndim > 1
        max_norm = torch.linalg.vector_norm(w, norm_type, dim=dims, keepdim=keep)
        max_norm = max_norm.clamp_(min=eps).mul_(clip_factor)
        grad_norm = torch.linalg.vector_norm(g, norm_type, dim=dims, keepdim=keep)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        g.copy_(torch.where(grad_norm < max_norm, g, clipped))


def _agc_contestants(mode: str, params: list[nn.Parameter], flat: Tensor) -> list[_Contestant]:
    grads = [p.grad for p in params]
    cf = AGC_CLIP_FACTOR[mode]
    after = None
    if mode == "agc":  # every unit is clipped: restore the gradients after each call
        saved = [g.clone() for g in grads]

        def after() -> None:
            torch._foreach_copy_(grads, saved)

    floors = [
        _Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        _Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
    ]
    if mode == "agc":
        floors.append(
            _Contestant(
                "floor: read+write (flat.mul_)", "floor", lambda: flat.mul_(1.0), floor="read+write"
            )
        )
    return [
        _Contestant(
            "gradstab", "gradstab", lambda: gradstab.adaptive_clip_grad_(params, cf), after
        ),
        _Contestant("timm-style loop", "baseline", lambda: timm_style_agc(params, cf), after),
        *floors,
    ]


def _agc_check(mode: str, where: str, params: list[nn.Parameter]) -> None:
    """gradstab's AGC against the timm-style loop in float64, one tensor at a time."""
    cf = AGC_CLIP_FACTOR[mode]
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    stats = gradstab.adaptive_clip_grad_(params, cf)
    units = sum(p.shape[0] if p.dim() >= 2 else 1 for p in params)
    want = units if mode == "agc" else 0
    if int(stats.clipped.sum()) != want:
        raise BenchError(f"{where}: {int(stats.clipped.sum())} units clipped, expected {want}")
    rtol = 1e-5 if grads[0].dtype == torch.float32 else 1e-2
    for i, (p, g0) in enumerate(zip(params, saved)):
        p64 = nn.Parameter(p.detach().double())
        p64.grad = g0.double()
        timm_style_agc([p64], cf)
        err = float(torch.linalg.vector_norm(p.grad.double() - p64.grad))
        ref = float(torch.linalg.vector_norm(p64.grad))
        if err > rtol * ref:
            raise BenchError(
                f"{where}: tensor {i}: gradstab AGC differs from the float64 timm-style loop "
                f"by {err / ref:.2e} relative (tolerance {rtol})"
            )
    torch._foreach_copy_(grads, saved)


# --------------------------------------------------------------------------------------
# Adaptive thresholds (modes adaptive, adaptive-zscore)
# --------------------------------------------------------------------------------------


def primed_threshold(mode: str, total: float, device: torch.device) -> AdaptiveThreshold:
    """The adaptive threshold of ``mode``, primed so that a step of norm ``total`` is healthy.

    ``adaptive``: ``PercentileThreshold(90, history=1000, include_current=False)`` with all
    1,000 history slots at ``10 * total`` (the 90th percentile stays above ``total`` until
    901 real norms have come in).  ``adaptive-zscore``: ``ZScoreThreshold()`` fed 50 norms
    alternating ``0.9 * total`` and ``1.1 * total`` (mean ``total``, sigma ``0.1 * total``:
    z = 0).

    Args:
        mode: ``"adaptive"`` or ``"adaptive-zscore"``.
        total: the gradients' total norm.
        device: where the threshold's state lives.

    Returns:
        The threshold.

    Example:
        >>> thr = primed_threshold("adaptive", 2.0, torch.device("cpu"))
        >>> float(thr.threshold(device=torch.device("cpu")))
        20.0
    """
    if mode == "adaptive":
        thr: AdaptiveThreshold = PercentileThreshold(90.0, history=1000, include_current=False)
        norms = [10.0 * total] * 1000
    else:
        thr = ZScoreThreshold()
        norms = [total * (0.9 if i % 2 == 0 else 1.1) for i in range(50)]
    for g in norms:
        thr.update(torch.tensor(g, dtype=torch.float64, device=device))
    return thr


def _adaptive_contestants(
    mode: str, params: list[nn.Parameter], flat: Tensor, total: float
) -> list[_Contestant]:
    thr = primed_threshold(mode, total, params[0].grad.device)
    fixed = 1e6 * total
    name = "gradstab PercentileThreshold" if mode == "adaptive" else "gradstab ZScoreThreshold"
    return [
        _Contestant(name, "gradstab", lambda: adaptive_clip_(params, thr)),
        _Contestant("fixed threshold", "baseline", lambda: gradstab.clip_grad_norm_(params, fixed)),
        _Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        _Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
    ]


def _adaptive_check(mode: str, where: str, params: list[nn.Parameter], total: float) -> None:
    """One call with a primed threshold: the norm is right and nothing is clipped."""
    grads = [p.grad for p in params]
    thr = primed_threshold(mode, total, grads[0].device)
    before = [g.clone() for g in grads]
    got = float(adaptive_clip_(params, thr))
    if not _close(got, total, NORM_RTOL):
        raise BenchError(f"{where}: adaptive clip_ returned norm {got}, expected {total}")
    if not all(torch.equal(a, b) for a, b in zip(grads, before)):
        raise BenchError(f"{where}: the primed adaptive threshold clipped a healthy step")


def bench_one(
    set_name: str,
    dtype_name: str,
    modes: Sequence[str],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    seed: int = 0,
    log: Callable[[str], None] = lambda _: None,
    rotate: int | None = None,
) -> list[Result]:
    """Check, then time every mode on one parameter set and dtype.

    Args:
        set_name: a key of :data:`PARAM_SETS` (or of ``GPU_SETS``).
        dtype_name: a key of ``DTYPES`` (``"fp32"``, ``"bf16"``).
        modes: modes to time, from ``MODES``.
        device: where the gradients live.
        warmup: untimed rounds before the timed ones.
        repeats: timed rounds.
        seed: seed of the gradients' ``randn``.
        log: progress sink (one line per step).
        rotate: CUDA only: number of identical copies of the set to cycle through (``None``:
            :func:`rotation_copies` decides; ignored on the CPU).

    Returns:
        One :class:`Result` per (mode, contestant), with ratios filled in.

    Raises:
        BenchError: a correctness check failed.

    Example:
        >>> rs = bench_one(
        ...     "many-small", "fp32", ["healthy"], device=torch.device("cpu"), warmup=1, repeats=3
        ... )
        >>> [r.contestant for r in rs][:2]
        ['gradstab', 'torch foreach=True']
    """
    shapes = {**PARAM_SETS, **GPU_SETS}[set_name]()
    dtype = DTYPES[dtype_name]
    params = _make_params(shapes, dtype, device, seed)
    if any(m in AGC_MODES for m in modes):
        _fill_weights(params, seed)
    grads = [p.grad for p in params]
    nbytes = sum(g.numel() * g.element_size() for g in grads)
    where = f"{set_name}/{dtype_name}"
    # The floor: one flat float32 randn buffer with as many bytes as the gradients.
    flat = torch.randn(
        nbytes // 4, device=device, generator=torch.Generator(device=device).manual_seed(seed + 1)
    )
    total, norm_err = _check_total_norm(set_name, dtype_name, params)
    log(
        f"{where}: {len(params)} tensors, {nbytes / 1e6:.1f} MB; total norm {total:.8g} checked, "
        f"relative error vs float64: gradstab {norm_err['gradstab_vs_fp64']:.1e}, "
        f"torch {norm_err['torch_vs_fp64']:.1e}"
    )
    value_bound = 0.0
    outliers = None
    if "value" in modes:
        value_bound = _value_bound(grads, seed)
        outliers = _Outliers(grads, value_bound)
        n = sum(g.numel() for g in grads)
        log(
            f"{where}: value bound {value_bound:.4g} clamps {outliers.count:,} of {n:,} "
            f"elements ({100 * outliers.count / n:.3f}%)"
        )
    copies = rotation_copies(nbytes, device, rotate)
    extra = _rotation_copies(params, flat, copies, value_bound if "value" in modes else None)
    if copies > 1:
        log(f"{where}: rotating over {copies} copies ({copies * nbytes / 1e6:.0f} MB) on CUDA")
        warmup = max(warmup, copies)  # every copy seen (and its descriptor table built) first

    timer = _Timer(device)
    results: list[Result] = []
    for mode in modes:
        _check_mode(
            mode,
            f"{where}/{mode}",
            params=params,
            total=total,
            value_bound=value_bound,
            outliers=outliers,
        )
        contestants = _contestants(
            mode,
            params=params,
            flat=flat,
            total=total,
            value_bound=value_bound,
            outliers=outliers,
        )
        if device.type == "cuda":
            contestants = _cuda_contestants(
                mode, [(params, flat, outliers), *extra], total=total, value_bound=value_bound
            )
        t0 = time.perf_counter()
        with torch.no_grad():
            _run_rounds(contestants, timer, warmup, repeats)
        log(f"{where}/{mode}: {warmup}+{repeats} rounds in {time.perf_counter() - t0:.1f} s")
        rows = [
            Result(set_name, dtype_name, mode, c.name, c.kind, c.times_ms, nbytes, floor=c.floor)
            for c in contestants
        ]
        ours = next(r for r in rows if r.kind == "gradstab")
        ours.floor_ms = _floor_ms(mode, rows)
        ours.floor_fraction = ours.floor_ms / ours.median_ms
        for r in rows:
            if r.kind == "baseline":
                r.ratio = r.median_ms / ours.median_ms
        results.extend(rows)
    return results


# --------------------------------------------------------------------------------------
# CUDA-only additions: a 1B-class decoder set, rotated (cold) inputs, the direct entry
# point, a bandwidth summary. Nothing here runs for --device cpu unless a GPU-only set is
# named explicitly.
# --------------------------------------------------------------------------------------


def llama32_1b_shapes() -> Shapes:
    """Parameter shapes of Llama 3.2 1B (Hugging Face ``LlamaForCausalLM`` layout).

    Published configuration: vocabulary 128,256, hidden size 2,048, MLP size 8,192, 16
    layers, 32 query heads and 8 key/value heads of dimension 64 (so k/v projections are
    512 x 2,048), RMSNorm weights without biases, no linear biases, ``lm_head`` tied to the
    embedding (not counted). ``nn.Linear`` weights are stored ``(out, in)``. The totals::

        embed_tokens 128256 x 2048                     = 262,668,288
        per layer, 9 tensors:
          q_proj, o_proj   2 x 2048 x 2048             =   8,388,608
          k_proj, v_proj   2 x 512 x 2048              =   2,097,152
          gate, up, down   3 x 8192 x 2048             =  50,331,648
          2 RMSNorm weights 2 x 2048                   =       4,096
                                              layer    =  60,821,504
        16 layers = 973,144,064;  final norm 2048
        total = 262,668,288 + 973,144,064 + 2,048 = 1,235,814,400  (the published 1.24 B)
        tensors = 1 + 16 x 9 + 1 = 146

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order.

    Example:
        >>> shapes = llama32_1b_shapes()
        >>> len(shapes), shapes[0]
        (146, ('model.embed_tokens.weight', (128256, 2048)))
    """
    vocab, d, ffn, n_layer, kv = 128256, 2048, 8192, 16, 8 * 64
    shapes: Shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(n_layer):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "self_attn.q_proj.weight", (d, d)),
            (pre + "self_attn.k_proj.weight", (kv, d)),
            (pre + "self_attn.v_proj.weight", (kv, d)),
            (pre + "self_attn.o_proj.weight", (d, d)),
            (pre + "mlp.gate_proj.weight", (ffn, d)),
            (pre + "mlp.up_proj.weight", (ffn, d)),
            (pre + "mlp.down_proj.weight", (d, ffn)),
            (pre + "input_layernorm.weight", (d,)),
            (pre + "post_attention_layernorm.weight", (d,)),
        ]
    shapes.append(("model.norm.weight", (d,)))
    _check_totals("llama1b", shapes, tensors=146, params=1_235_814_400)
    return shapes


#: Sets that ``--set all`` (and the default) include only on CUDA; on the CPU they run only
#: when named.
GPU_SETS: dict[str, Callable[[], Shapes]] = {"llama1b": llama32_1b_shapes}
GPU_REPEATS = {"llama1b": 30}
GPU_QUICK_REPEATS = {"llama1b": 5}

#: Rotation on CUDA: sets smaller than this many L2 caches are timed on copies.
ROTATE_L2_MULTIPLE = 3
#: At most this many copies (gradstab's CUDA descriptor-table cache holds 32 entries).
MAX_ROTATE = 16

#: The GPU targets (the CUDA kernel's issue; AGC from the adaptive-clipping issue), checked by
#: :func:`cuda_summary`: (set or None for any, dtype or None, mode, baseline contestant, least
#: ratio, least fraction of the floor or None).
CUDA_TARGETS = (
    ("gpt2", None, "healthy", "torch foreach=True", 2.5, 0.85),
    (None, None, "clip", "torch foreach=True", 1.3, None),
    ("many-small", None, "healthy", "torch foreach=True", 4.0, None),
    ("llama1b", "bf16", "healthy", "torch foreach=True", 2.5, None),
    (None, None, "stats", "torch._foreach_norm", 1.0, None),
    (None, None, "stats", "lightning grad_norm", 50.0, None),
    ("resnet50", None, "agc", "timm-style loop", 5.0, None),
    # adaptive threshold <= fixed threshold + 5%: fixed / adaptive >= 1 / 1.05
    (None, None, "adaptive", "fixed threshold", 0.952, None),
    (None, None, "adaptive-zscore", "fixed threshold", 0.952, None),
)

#: Bytes each mode must move, in passes over the gradients (see ``_floor_ms``; AGC reads the
#: weights as well).
_TRAFFIC = {
    "healthy": 1,
    "stats": 1,
    "value": 2,
    "clip": 3,
    "agc": 3,
    "agc-healthy": 2,
    "adaptive": 1,
    "adaptive-zscore": 1,
}
#: The baseline each mode's ratio is reported against in the CUDA summary.
_SUMMARY_BASELINE = {
    "stats": "torch._foreach_norm",
    "agc": "timm-style loop",
    "agc-healthy": "timm-style loop",
    "adaptive": "fixed threshold",
    "adaptive-zscore": "fixed threshold",
}


def _parse_sets(text: str) -> list[str]:
    if [t.strip() for t in text.split(",") if t.strip()] == ["all"]:
        return ["all"]  # resolved by _resolve_sets: GPU-only sets join on CUDA
    return _csv([*PARAM_SETS, *GPU_SETS], allow_all=True)(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _resolve_sets(sets: list[str] | None, quick: bool, device: torch.device) -> list[str]:
    gpu = list(GPU_SETS) if device.type == "cuda" else []
    if sets is None:
        return list(QUICK_SETS) if quick else [*PARAM_SETS, *gpu]
    if sets == ["all"]:
        return [*PARAM_SETS, *gpu]
    return sets


def _default_repeats(set_name: str, quick: bool) -> int:
    table = QUICK_REPEATS if quick else DEFAULT_REPEATS
    if set_name in table:
        return table[set_name]
    return (GPU_QUICK_REPEATS if quick else GPU_REPEATS)[set_name]


def _gpu_description(device: torch.device) -> str:
    prop = torch.cuda.get_device_properties(device)
    l2 = getattr(prop, "L2_cache_size", 0)
    return (
        f"{prop.name}, {prop.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB, "
        f"{prop.total_memory / 2**30:.0f} GiB; CUDA {torch.version.cuda}"
    )


def rotation_copies(nbytes: int, device: torch.device, requested: int | None = None) -> int:
    """How many identical copies of a gradient set to cycle through when timing.

    Args:
        nbytes: bytes of one copy of the gradients.
        device: where they live; on the CPU the answer is always 1.
        requested: ``--rotate`` (``None``: automatic).

    Returns:
        1 on the CPU; on CUDA ``requested`` (at most :data:`MAX_ROTATE`), or enough copies
        to span ``ROTATE_L2_MULTIPLE`` L2 caches (at most :data:`MAX_ROTATE`), so that each
        call reads memory the previous calls evicted from L2.

    Example:
        >>> rotation_copies(8_700_000, torch.device("cpu"))
        1
    """
    if device.type != "cuda":
        return 1
    if requested is not None:
        return max(1, min(requested, MAX_ROTATE))
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 50 * 2**20
    return max(1, min(MAX_ROTATE, math.ceil(ROTATE_L2_MULTIPLE * l2 / max(nbytes, 1))))


def _rotation_copies(
    params: list[nn.Parameter], flat: Tensor, copies: int, value_bound: float | None
) -> list[tuple[list[nn.Parameter], Tensor, _Outliers | None]]:
    """Copies 1..copies-1 of (parameters with cloned gradients, floor buffer, outliers)."""
    out = []
    for _ in range(1, copies):
        clones = []
        for p in params:
            q = nn.Parameter(p.detach().clone())  # the weights too: AGC reads them
            q.grad = p.grad.clone()
            clones.append(q)
        outliers = None
        if value_bound is not None:
            outliers = _Outliers([q.grad for q in clones], value_bound)
        out.append((clones, flat.clone(), outliers))
    return out


class _Rotation:
    """Calls copy k's function, then (untimed) copy k's after-hook and moves to the next copy."""

    def __init__(
        self, fns: list[Callable[[], object]], afters: list[Callable[[], object] | None]
    ) -> None:
        self.fns = fns
        self.afters = afters
        self.k = 0

    def call(self) -> object:
        return self.fns[self.k]()

    def after(self) -> None:
        hook = self.afters[self.k]
        if hook is not None:
            hook()
        self.k = (self.k + 1) % len(self.fns)


def _direct_contestant(
    mode: str, params: list[nn.Parameter], total: float, value_bound: float, after: Any
) -> _Contestant | None:
    """``gradstab._C.cuda_fast_path`` (the C++ entry point, no Python loop) as a contestant."""
    ext = gradstab._extension._C
    fast = getattr(ext, "cuda_fast_path", None) if ext is not None else None
    if fast is None:
        return None
    eps = 1e-6
    if mode not in ("healthy", "clip", "stats", "value"):
        return None  # AGC has no direct entry point
    if mode in ("healthy", "clip"):
        bound = total * (1e6 if mode == "healthy" else 0.5)
        fn = lambda: fast(1, params, 2.0, bound, eps, False)  # noqa: E731
    elif mode == "stats":
        fn = lambda: fast(0, params, 2.0, 0.0, eps, False)  # noqa: E731
    else:
        fn = lambda: fast(3, params, 2.0, value_bound, eps, False)  # noqa: E731
    return _Contestant("gradstab _C.cuda_fast_path", "gradstab-direct", fn, after)


def _cuda_contestants(
    mode: str,
    copies: list[tuple[list[nn.Parameter], Tensor, _Outliers | None]],
    *,
    total: float,
    value_bound: float,
) -> list[_Contestant]:
    """The contestants of ``mode`` on CUDA: the direct entry point added, copies rotated."""
    sets = []
    for params, flat, outliers in copies:
        cs = _contestants(
            mode,
            params=params,
            flat=flat,
            total=total,
            value_bound=value_bound,
            outliers=outliers,
        )
        direct = _direct_contestant(mode, params, total, value_bound, cs[0].after)
        if direct is not None:
            cs.insert(1, direct)
        sets.append(cs)
    if len(sets) == 1:
        return sets[0]
    rotated = []
    for i, c in enumerate(sets[0]):
        rot = _Rotation([s[i].fn for s in sets], [s[i].after for s in sets])
        rotated.append(_Contestant(c.name, c.kind, rot.call, rot.after, floor=c.floor))
    return rotated


def cuda_summary(results: Sequence[Result]) -> str:
    """Achieved bandwidth against the floor of the same run, and the CUDA targets.

    Args:
        results: rows from :func:`bench_one` on CUDA.

    Returns:
        A Markdown table (one line per set, dtype, mode and gradstab entry point) and
        the list of targets with ``met`` / ``NOT met``.

    Example:
        >>> cuda_summary([]).splitlines()[0]
        'CUDA summary: achieved bandwidth = least traffic of the mode / median time.'
    """
    lines = [
        "CUDA summary: achieved bandwidth = least traffic of the mode / median time.",
        "Traffic = gradient bytes x passes (healthy, stats: 1 read; value: 1 read+write = 2;",
        "clip: 1 read + 1 read+write = 3; agc: weights read too, 3; agc-healthy: 2).",
        "floor GB/s = the same traffic / the floor's time (flat buffer, same run).",
        "",
        "| set | dtype | mode | entry | GB/s | floor GB/s | of floor | vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.set, r.dtype, r.mode), []).append(r)
    checks = []
    for (set_name, dtype, mode), rows in groups.items():
        ours = next((r for r in rows if r.kind == "gradstab"), None)
        if ours is None or ours.floor_ms is None:
            continue
        traffic = ours.nbytes * _TRAFFIC[mode]
        floor_gbs = traffic / ours.floor_ms / 1e6
        for r in rows:
            if r.kind not in ("gradstab", "gradstab-direct"):
                continue
            base_name = _SUMMARY_BASELINE.get(mode, "torch foreach=True")
            base = next((b for b in rows if b.contestant == base_name), None)
            ratio = base.median_ms / r.median_ms if base is not None else None
            lines.append(
                f"| {set_name} | {dtype} | {mode} | {r.contestant} | "
                f"{traffic / r.median_ms / 1e6:.0f} | {floor_gbs:.0f} | "
                f"{ours.floor_ms / r.median_ms:.2f} | "
                f"{_fmt(ratio, '.2f')}x {base_name} |"
            )
            for t_set, t_dtype, t_mode, t_base, t_ratio, t_floor in CUDA_TARGETS:
                if t_mode != mode or t_set not in (None, set_name) or t_dtype not in (None, dtype):
                    continue
                t_row = next((b for b in rows if b.contestant == t_base), None)
                if t_row is None:
                    continue
                t_got = t_row.median_ms / r.median_ms
                frac = ours.floor_ms / r.median_ms
                ok = t_got >= t_ratio
                ok = ok and (t_floor is None or frac >= t_floor)
                want = f">= {t_ratio}x {t_base}" + (
                    f", >= {t_floor:.0%} of floor" if t_floor is not None else ""
                )
                checks.append(
                    f"- {set_name}/{dtype}/{mode} ({r.contestant}): {t_got:.2f}x, "
                    f"{frac:.0%} of floor; target {want}: {'met' if ok else 'NOT met'}"
                )
    if checks:
        lines += ["", "GPU targets (H100/H200):", *checks]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def header(argv: Sequence[str], device: torch.device) -> dict[str, str]:
    """Machine, date, versions, backend and command line of this run.

    Args:
        argv: the arguments after ``python -m gradstab``.
        device: the gradients' device.

    Returns:
        An ordered ``{label: value}`` dict (also stored in the JSON output).

    Example:
        >>> header(["bench", "--quick"], torch.device("cpu"))["command"]
        'python -m gradstab bench --quick'
    """
    info = gradstab.backend_info()
    machine = (
        f"{platform.platform()}; CPU: {_cpu_model()}; torch threads: {torch.get_num_threads()}"
    )
    if device.type == "cuda":
        machine += f"; GPU: {_gpu_description(device)}"
    meta = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "machine": machine,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradstab": gradstab.__version__,
        "kernel": f"cpu: {info['cpu']['kernel']} ({info['cpu']['reason']})",
        "commit": _git_commit(),
        "command": "python -m gradstab " + shlex.join(argv),
    }
    if device.type == "cuda":
        meta["kernel"] += f"; cuda: {info['cuda']['kernel']} ({info['cuda']['reason']})"
    probe = _OtherLoad()
    time.sleep(0.5)
    busy = probe.cpus()
    load = _load_average()
    if busy is not None or load is not None:
        parts = []
        if busy is not None:
            parts.append(f"other processes busy on {busy:.2f} of {os.cpu_count()} CPUs now")
        if load is not None:
            parts.append(f"1-minute load average {load:.2f}")
        meta["load"] = "; ".join(parts)
        if busy is not None and busy > 0.1:
            meta["load"] += " -- WARNING: timings will be noisy"
    return meta


def _git_commit() -> str:
    """The checkout's commit (``+dirty`` if modified), or ``"unknown"`` outside git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``)."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    ticks = [int(x) for x in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / os.sysconf("SC_CLK_TCK")


class _OtherLoad:
    """How busy other processes kept the CPUs while the benchmark ran.

    Busy CPU time of the whole machine minus this process's own CPU time, over the
    wall time: a noise indicator (0 on an otherwise idle machine).
    """

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.busy0 = _busy_seconds()
        self.own0 = sum(os.times()[:2])

    def cpus(self) -> float | None:
        """Average number of CPUs other processes kept busy since construction."""
        busy1 = _busy_seconds()
        wall = time.perf_counter() - self.wall0
        if busy1 is None or self.busy0 is None or wall <= 0:
            return None
        own = sum(os.times()[:2]) - self.own0
        return max(0.0, (busy1 - self.busy0 - own) / wall)


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _fmt(x: float | None, spec: str) -> str:
    return "" if x is None else format(x, spec)


def format_table(results: Sequence[Result]) -> str:
    """A Markdown table of the results.

    Args:
        results: rows from :func:`bench_one`.

    Returns:
        The table, one line per result.

    Example:
        >>> r = Result("s", "fp32", "healthy", "gradstab", "gradstab", [1.0, 2.0], 4_000_000)
        >>> print(format_table([r]).splitlines()[2])
        | s | fp32 | healthy | gradstab | 1.500 | 0.500 | 2.67 |  |  |
    """
    cols = [
        "set",
        "dtype",
        "mode",
        "contestant",
        "median ms",
        "IQR ms",
        "GB/s",
        "torch/gradstab",
        "floor/gradstab",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in results:
        cells = [
            r.set,
            r.dtype,
            r.mode,
            r.contestant,
            f"{r.median_ms:.3f}",
            f"{r.iqr_ms:.3f}",
            f"{r.nbytes / r.median_ms / 1e6:.2f}",
            _fmt(r.ratio, ".2f"),
            _fmt(r.floor_fraction, ".2f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


NOTES = """\
Medians of the timed rounds; all contestants interleaved round-robin in one process.
IQR = interquartile range of the timed rounds.
torch/gradstab = torch median / gradstab median (> 1: gradstab faster).
floor/gradstab = floor / gradstab median (1 = at the floor). The floor rows time passes
over a flat fp32 buffer of the same bytes; the floor of healthy and stats is one read
(the faster of flat.sum and flat.amax), of value one read+write (flat.mul_(1.0)), of
clip one read plus one read+write (the norm must be known before anything is written).
GB/s = gradient bytes / median (bytes of one pass over the gradients).
The "torch" of agc modes is the timm-style loop; of adaptive modes, gradstab with a fixed
threshold (there the ratio is fixed / adaptive: below 1, adapting costs that much more)."""


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _csv(choices: Sequence[str], allow_all: bool = False) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        if allow_all and items == ["all"]:
            return list(choices)
        bad = [s for s in items if s not in choices]
        if bad or not items:
            extra = ", all" if allow_all else ""
            raise argparse.ArgumentTypeError(
                f"invalid choice {','.join(bad) or text!r} (choose from {', '.join(choices)}"
                f"{extra}; comma-separated)"
            )
        return list(dict.fromkeys(items))

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``.

    Args:
        parser: the ``bench`` subcommand parser.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> p.parse_args(["--set", "gpt2", "--mode", "clip"]).set
        ['gpt2']
    """
    parser.add_argument(
        "--set",
        type=_parse_sets,
        default=None,
        help="parameter sets, comma-separated: gpt2, resnet50, many-small, llama1b or all "
        "(default: all; with --quick: many-small,resnet50; llama1b is part of all only on "
        "CUDA)",
    )
    parser.add_argument(
        "--dtype",
        type=_csv(list(DTYPES)),
        default=None,
        help="gradient dtypes, comma-separated (default: fp32,bf16; with --quick: fp32)",
    )
    parser.add_argument(
        "--mode",
        type=_csv(MODES),
        default=None,
        help="modes, comma-separated: healthy, clip, stats, value, agc, agc-healthy, "
        "adaptive, adaptive-zscore (default: healthy,clip)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per set/dtype/mode (default per set: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items())
        + "; fewer with --quick)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help=f"untimed rounds first (default {DEFAULT_WARMUP})"
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the gradients: cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the gradients (default 0)")
    parser.add_argument(
        "--rotate",
        type=_positive_int,
        default=None,
        help="CUDA only: time each set on N identical copies, cycled call by call (default: "
        f"enough for {ROTATE_L2_MULTIPLE}x the L2 cache, at most {MAX_ROTATE}; 1 disables)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write all raw timings to PATH")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small smoke run (many-small + resnet50, fp32, few repeats; under ~30 s)",
    )
    bench_train.add_arguments(parser)


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the benchmark described by ``args`` and print the table.

    Args:
        args: parsed options (see :func:`add_arguments`).
        argv: the arguments after ``python -m gradstab``, echoed in the header.

    Returns:
        The exit status: 0, or 1 if a correctness check failed.

    Example:
        >>> p = argparse.ArgumentParser(); add_arguments(p)
        >>> run(p.parse_args(["--quick", "--set", "many-small", "--repeats", "2"]),
        ...     ["bench", "--quick"])  # doctest: +SKIP
        0
    """
    if getattr(args, "train", False):
        return bench_train.run(args, argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gradstab bench: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"gradstab bench: unsupported device {args.device!r}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    sets = _resolve_sets(args.set, args.quick, device)
    dtypes = args.dtype or (["fp32"] if args.quick else list(DTYPES))
    modes = args.mode or ["healthy", "clip"]
    warmup = args.warmup
    if warmup is None:
        warmup = QUICK_WARMUP if args.quick else DEFAULT_WARMUP
    if (args.repeats is not None and args.repeats < 1) or warmup < 0:
        print("gradstab bench: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    meta = header(argv, device)
    for k, v in meta.items():
        print(f"{k + ':':9} {v}")
    print(flush=True)

    def log(msg: str) -> None:
        print(f"[bench] {msg}", file=sys.stderr, flush=True)

    results: list[Result] = []
    other = _OtherLoad()
    t0 = time.perf_counter()
    try:
        for s in sets:
            repeats = args.repeats or _default_repeats(s, args.quick)
            for d in dtypes:
                results += bench_one(
                    s,
                    d,
                    modes,
                    device=device,
                    warmup=warmup,
                    repeats=repeats,
                    seed=args.seed,
                    log=log,
                    rotate=getattr(args, "rotate", None),
                )
                gc.collect()
    except BenchError as exc:
        print(f"gradstab bench: correctness check failed, not timing: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - t0
    other_cpus = other.cpus()

    print(format_table(results))
    print()
    print(NOTES)
    if device.type == "cuda":
        print()
        print(cuda_summary(results))
    print(f"Total time {elapsed:.1f} s.", end="")
    if other_cpus is not None:
        print(
            f" Other processes kept {other_cpus:.2f} of {os.cpu_count()} CPUs busy meanwhile",
            end="",
        )
        if other_cpus > 0.1:
            print(": timings are disturbed, rerun on a quiet machine", end="")
        print(".", end="")
    print()
    if args.json:
        doc = {
            "meta": {
                **meta,
                "elapsed_s": elapsed,
                "other_cpus_busy": other_cpus,
                "warmup": warmup,
                "argv": list(argv),
            },
            "results": [r.to_json() for r in results],
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.write("\n")
        print(f"Raw timings written to {args.json}.")
    return 0
