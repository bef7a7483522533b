"""What each mode times: the gradients of one (set, dtype), the correctness checks run before
timing, and the contestants (gradstab, PyTorch, the floor, timm-style AGC, adaptive
thresholds).

Example:
    >>> from gradstab.tools.bench.modes import timm_style_agc
    >>> callable(timm_style_agc)
    True
"""

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import gradstab
from gradstab.adaptive import AdaptiveThreshold, PercentileThreshold, ZScoreThreshold
from gradstab.adaptive import clip_ as adaptive_clip_
from gradstab.tools.bench.config import (
    ADAPTIVE_MODES,
    AGC_MODES,
    NORM_RTOL,
    STEP_MODES,
    BenchError,
)
from gradstab.tools.bench.sets import Shapes
from gradstab.tools.bench.timing import Contestant, Result


def make_params(
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


def check_total_norm(
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


def pick_value_bound(grads: list[Tensor], seed: int) -> float:
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


class Outliers:
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


def core_contestants(
    mode: str,
    *,
    params: list[nn.Parameter],
    flat: Tensor,
    total: float,
    value_bound: float,
    outliers: Outliers | None,
) -> list[Contestant]:
    if mode in AGC_MODES:
        return _agc_contestants(mode, params, flat)
    if mode in ADAPTIVE_MODES:
        return _adaptive_contestants(mode, params, flat, total)
    if mode in STEP_MODES:
        return _fold_contestants(params, flat, total)
    grads = [p.grad for p in params]
    clip_fn = torch.nn.utils.clip_grad_norm_
    floors = [
        Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
    ]
    if mode in ("clip", "value"):
        floors.append(
            Contestant(
                "floor: read+write (flat.mul_)",
                "floor",
                lambda: flat.mul_(1.0),
                floor="read+write",
            )
        )
    if mode in ("healthy", "clip"):
        max_norm = total * (1e6 if mode == "healthy" else 0.5)
        after = (lambda: torch._foreach_mul_(grads, 2.0)) if mode == "clip" else None
        # the training path: the wrapper's clip of the same gradients (no optimizer step)
        wrapper = gradstab.GradStabOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=max_norm)
        return [
            Contestant(
                "gradstab", "gradstab", lambda: gradstab.clip_grad_norm_(params, max_norm), after
            ),
            Contestant(
                "gradstab GradStabOptimizer.clip()", "gradstab-wrapper", wrapper.clip, after
            ),
            Contestant(
                "torch foreach=True",
                "baseline",
                lambda: clip_fn(params, max_norm, foreach=True),
                after,
            ),
            Contestant(
                "torch foreach=False",
                "baseline",
                lambda: clip_fn(params, max_norm, foreach=False),
                after,
            ),
            *floors,
        ]
    if mode == "stats":
        out = [
            Contestant("gradstab", "gradstab", lambda: gradstab.grad_stats(params)),
            Contestant("torch._foreach_norm", "baseline", lambda: torch._foreach_norm(grads, 2.0)),
        ]
        grad_norm = _lightning_grad_norm()
        if grad_norm is not None:
            holder = nn.Module()
            holder.params = nn.ParameterList(params)
            out.append(
                Contestant("lightning grad_norm", "baseline", lambda: grad_norm(holder, 2.0))
            )
        return out + floors
    # value
    assert outliers is not None
    v = value_bound
    value_fn = torch.nn.utils.clip_grad_value_
    return [
        Contestant(
            "gradstab",
            "gradstab",
            lambda: gradstab.clip_grad_value_(params, v),
            outliers.restore,
        ),
        Contestant(
            "torch foreach=True",
            "baseline",
            lambda: value_fn(params, v, foreach=True),
            outliers.restore,
        ),
        Contestant(
            "torch foreach=False",
            "baseline",
            lambda: value_fn(params, v, foreach=False),
            outliers.restore,
        ),
        *floors,
    ]


def check_mode(
    mode: str,
    where: str,
    *,
    params: list[nn.Parameter],
    total: float,
    value_bound: float,
    outliers: Outliers | None,
) -> None:
    """One untimed call of gradstab in ``mode``, checked against a float64 reference."""
    if mode in AGC_MODES:
        _agc_check(mode, where, params)
        return
    if mode in ADAPTIVE_MODES:
        _adaptive_check(mode, where, params, total)
        return
    if mode in STEP_MODES:
        _fold_check(where, params, total)
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


def floor_ms(mode: str, rows: Sequence[Result]) -> float:
    """The floor of ``mode``: the least memory traffic any implementation needs.

    ``healthy`` and ``stats`` read every gradient once: one read (the faster of
    ``flat.sum`` and ``flat.amax``).  ``value`` reads and writes once: ``flat.mul_``.
    ``clip`` must know the norm before writing anything, so (unless the gradients fit in
    cache) it reads once and then reads and writes once: read + read+write. ``fold``: the
    unclipped optimizer step plus one read (the norm).
    """
    read = min(r.median_ms for r in rows if r.floor == "read")
    if mode in STEP_MODES:
        return read + min(r.median_ms for r in rows if r.floor == "step")
    if mode in AGC_MODES:  # the weights are read too (same bytes as the gradients here)
        if mode == "agc-healthy":
            return 2 * read
        return read + min(r.median_ms for r in rows if r.floor == "read+write")
    if mode in ("healthy", "stats", *ADAPTIVE_MODES):
        return read
    write = min(r.median_ms for r in rows if r.floor == "read+write")
    return write if mode == "value" else read + write


AGC_CLIP_FACTOR = {"agc": 0.01, "agc-healthy": 1000.0}


def fill_weights(params: list[nn.Parameter], seed: int) -> None:
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


def _agc_contestants(mode: str, params: list[nn.Parameter], flat: Tensor) -> list[Contestant]:
    grads = [p.grad for p in params]
    cf = AGC_CLIP_FACTOR[mode]
    after = None
    if mode == "agc":  # every unit is clipped: restore the gradients after each call
        saved = [g.clone() for g in grads]

        def after() -> None:
            torch._foreach_copy_(grads, saved)

    floors = [
        Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
    ]
    if mode == "agc":
        floors.append(
            Contestant(
                "floor: read+write (flat.mul_)", "floor", lambda: flat.mul_(1.0), floor="read+write"
            )
        )
    return [
        Contestant("gradstab", "gradstab", lambda: gradstab.adaptive_clip_grad_(params, cf), after),
        Contestant("timm-style loop", "baseline", lambda: timm_style_agc(params, cf), after),
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
) -> list[Contestant]:
    thr = primed_threshold(mode, total, params[0].grad.device)
    fixed = 1e6 * total
    name = "gradstab PercentileThreshold" if mode == "adaptive" else "gradstab ZScoreThreshold"
    return [
        Contestant(name, "gradstab", lambda: adaptive_clip_(params, thr)),
        Contestant("fixed threshold", "baseline", lambda: gradstab.clip_grad_norm_(params, fixed)),
        Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
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


#: ``fold``: the learning rate of the timed AdamW steps (tiny: the weights barely move).
FOLD_LR = 1e-6


def _fold_contestants(params: list[nn.Parameter], flat: Tensor, total: float) -> list[Contestant]:
    """Clip + fused AdamW step, four ways, on one optimizer (one set of moments), and the step
    with ``grad_scale = 1``: what torch's fused step costs once any ``grad_scale`` is set (it
    then writes every gradient back), the least a folded clipping step can cost besides its read.

    Every call clips (``max_norm = 0.5 x`` the total norm); the gradients are restored
    (untimed) after each call, since a clipped step leaves them scaled.
    """
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    max_norm = 0.5 * total
    inner = torch.optim.AdamW(params, lr=FOLD_LR, fused=True)
    folded = gradstab.GradStabOptimizer(inner, max_norm=max_norm, fold=True)
    explicit = gradstab.GradStabOptimizer(inner, max_norm=max_norm, fold=False)

    def restore() -> None:
        torch._foreach_copy_(grads, saved)

    def torch_clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        inner.step()

    one = torch.ones((), dtype=torch.float32, device=params[0].device)

    def scaled_step() -> None:  # the fused step as a fold runs it: .grad written back (g / 1)
        inner.grad_scale = one
        try:
            inner.step()
        finally:
            del inner.grad_scale

    return [
        Contestant("gradstab folded (clip + step)", "gradstab", folded.step, restore),
        Contestant("gradstab explicit (clip + step)", "baseline", explicit.step, restore),
        Contestant("torch clip_grad_norm_ + step", "baseline", torch_clip_step, restore),
        Contestant("AdamW step alone (no clip)", "floor", inner.step, floor="step"),
        Contestant("AdamW step, grad_scale=1 (no clip)", "floor", scaled_step, floor="scaled"),
        Contestant("floor: read (flat.sum)", "floor", flat.sum, floor="read"),
        Contestant("floor: read (flat.amax)", "floor", flat.amax, floor="read"),
    ]


def _fold_check(where: str, params: list[nn.Parameter], total: float) -> None:
    """One explicit and one folded clip + step (throwaway AdamW optimizers): each leaves the
    clipped gradients in ``.grad``, the original ones times the coefficient (checked on the
    first and the last tensor). The gradients are restored after each; the weights moved by a
    step of lr 1e-6."""
    grads = [p.grad for p in params]
    saved = [g.clone() for g in grads]
    max_norm = 0.5 * total
    coef = min(1.0, max_norm / (total + 1e-6))
    rtol = 1e-6 if grads[0].dtype == torch.float32 else 2**-7
    for fold in (False, True):
        opt = gradstab.GradStabOptimizer(
            torch.optim.AdamW(params, lr=FOLD_LR, fused=True), max_norm=max_norm, fold=fold
        )
        opt.step()
        for i in (0, len(grads) - 1):
            if not torch.allclose(grads[i].double(), saved[i].double() * coef, rtol=rtol, atol=0):
                raise BenchError(
                    f"{where}: after a {'folded' if fold else 'explicit'} clip + step, tensor "
                    f"{i}'s .grad is not the original times {coef:.6g}"
                )
        torch._foreach_copy_(grads, saved)
