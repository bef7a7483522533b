"""The training path's eager shortcut (``gradstab._clipping.shortcut``) against the dispatcher.

A :class:`~gradstab.GradStabOptimizer` step whose clip is one op on one device runs it through
``gradstab._C.cpu_fast_path`` (as ``gradstab.functional`` does) and, on the CPU, reads its
flags on the host.  Everything a user sees must be what the dispatcher path gives: the clipped
gradients bit for bit, the metrics (per layer, with parameters that have no gradient), the
counters, the skip decisions, the ``"raise"`` error; and the step must really take the shortcut
where it applies and decline where it does not.
"""

from __future__ import annotations

import math

import pytest
import torch

import gradstab
from gradstab import _clipping, _extension
from gradstab._library import OPS
from gradstab.adaptive import PercentileThreshold

pytestmark = pytest.mark.skipif(
    _extension.cpu_fast_path is None, reason="gradstab._C (with cpu_fast_path) is not built"
)

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SHAPES = [(5, 7), (0,), (300,), (3,), (33, 17), (2, 3, 4), (1,), (9, 4), (4,)]
NO_GRAD = 8  # the parameter that never has a gradient
BOUND = {"norm": "max_norm", "layer": "max_norm", "value": "clip_value", "normalize": "target_norm"}


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(s, dtype=DTYPES[i % 4])) for i, s in enumerate(SHAPES)]


def _grads(step: int) -> list[torch.Tensor | None]:
    """Step ``step``'s gradients: mixed dtypes and magnitudes, a transposed one, a NaN (step 3),
    an Inf (step 5), none for one parameter."""
    gen = torch.Generator().manual_seed(100 + step)
    out: list[torch.Tensor | None] = []
    for i, s in enumerate(SHAPES):
        if i == NO_GRAD:
            out.append(None)
            continue
        scale = 10.0 ** float(torch.randint(-2, 3, (), generator=gen))
        g = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        if i == 7:  # non-contiguous: the transpose of a (4, 9) tensor
            g = (torch.randn(4, 9, generator=gen, dtype=torch.float64) * scale).t()
        out.append(g.to(DTYPES[i % 4]))
    if step == 3:
        out[0][1, 2] = math.nan  # type: ignore[index]
    if step == 5:
        out[2][7] = -math.inf  # type: ignore[index]
    return out


def _set(params: list[torch.nn.Parameter], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone(memory_format=torch.preserve_format)


def _make(mode: str | None, nonfinite: str, logs: list) -> gradstab.GradStabOptimizer:
    params = _params()
    kw = {} if mode is None else {BOUND[mode]: 1.5}
    return gradstab.GradStabOptimizer(
        torch.optim.SGD(params, lr=0.0),
        mode=mode,
        nonfinite=nonfinite,
        log_every_n_steps=2,
        log_per_layer=True,
        log_fn=lambda m, s: logs.append((s, m)),
        history=16,
        **kw,
    )


def _same_metrics(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(x == y or (math.isnan(x) and math.isnan(y)) for x, y in ((a[k], b[k]) for k in a))


def _run(opt, steps: int, monkeypatch, *, dispatcher: bool = False, device_flags: bool = False):
    """Clip ``steps`` steps; returns per step the gradients after the clip, the skip decision
    (or the error message) and the counters."""
    out = []
    with monkeypatch.context() as m:
        if dispatcher:
            m.setattr(_extension, "cpu_fast_path", None)
        if device_flags:
            m.setattr(_clipping.step, "_host_read_is_free", lambda parts: False)
        params = opt.param_groups[0]["params"]
        for s in range(steps):
            _set(params, _grads(s))
            try:
                result: object = opt.clip()
            except RuntimeError as exc:
                result = str(exc)
            grads = [None if p.grad is None else p.grad.clone() for p in params]
            out.append((grads, result, opt.counters()))
    return out


@pytest.mark.parametrize("nonfinite", ["ignore", "skip", "zero", "raise"])
@pytest.mark.parametrize("mode", [None, "norm", "layer", "value", "normalize"])
def test_shortcut_step_equals_the_dispatcher_step(mode, nonfinite, monkeypatch):
    logs: dict[str, list] = {"fast": [], "slow": [], "dev": []}
    fast = _run(_make(mode, nonfinite, logs["fast"]), 8, monkeypatch)
    slow = _run(_make(mode, nonfinite, logs["slow"]), 8, monkeypatch, dispatcher=True)
    dev = _run(_make(mode, nonfinite, logs["dev"]), 8, monkeypatch, device_flags=True)
    for step, (f, s, d) in enumerate(zip(fast, slow, dev)):
        for gf, gs, gd in zip(f[0], s[0], d[0]):
            if gs is None:
                assert gf is None and gd is None
                continue
            assert gf.dtype == gs.dtype and gf.stride() == gs.stride()
            assert torch.equal(gf.nan_to_num(7.0), gs.nan_to_num(7.0)), step
            assert torch.equal(gd.nan_to_num(7.0), gs.nan_to_num(7.0)), step
        assert f[1] == s[1] == d[1], step  # skip decision, or the same error message
        assert f[2] == s[2] == d[2], step  # counters
    if nonfinite == "raise":
        assert "'1'" not in str(slow[3][1]) and "param_groups.0.0" in str(slow[3][1])
    assert len(logs["fast"]) == len(logs["slow"]) == len(logs["dev"]) >= 3
    for (sf, mf), (ss, ms), (sd, md) in zip(logs["fast"], logs["slow"], logs["dev"]):
        assert sf == ss == sd
        assert _same_metrics(mf, ms) and _same_metrics(md, ms), (mf, ms, md)
    if mode is not None:  # the per-layer rows name the parameters that had a gradient
        assert any(k.endswith("param_groups.0.7") for k in logs["fast"][0][1])
        assert not any(k.endswith("param_groups.0.8") for k in logs["fast"][0][1])


def test_counters_see_clipped_and_nonfinite_steps(monkeypatch):
    """An independent count: the steps whose total norm exceeds the bound, and the NaN/Inf ones."""
    opt = _make("norm", "skip", [])
    out = _run(opt, 8, monkeypatch)
    want_clipped = want_bad = 0
    for s in range(8):
        gs = [g.to(torch.float64) for g in _grads(s) if g is not None]
        total = float(
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        )
        if not math.isfinite(total):
            want_bad += 1
        elif total > 1.5:
            want_clipped += 1
    counters = out[-1][2]
    assert counters["nonfinite_steps"] == counters["skipped_steps"] == want_bad == 2
    assert counters["clipped_steps"] == want_clipped > 0
    assert [r for _, r, _ in out] == [s in (3, 5) for s in range(8)]


class _Spy:
    def __init__(self, monkeypatch) -> None:
        self.fast = 0
        self.ops: list[str] = []
        real = _extension.cpu_fast_path

        def fast(*args):
            self.fast += 1
            return real(*args)

        monkeypatch.setattr(_extension, "cpu_fast_path", fast)
        for name, op in list(OPS.items()):

            def spy(*args, _op=op, _name=name):
                self.ops.append(_name)
                return _op(*args)

            monkeypatch.setitem(OPS, name, spy)


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": 1.0},
        {"mode": "layer", "max_norm": 1.0},
        {"mode": "value", "clip_value": 0.1},
        {"mode": "normalize", "target_norm": 1.0},
        {"mode": None},
        {"max_norm": 1.0, "nonfinite": "raise"},
    ],
)
def test_the_step_takes_the_shortcut(kw, monkeypatch):
    params = _params()
    opt = gradstab.GradStabOptimizer(torch.optim.SGD(params, lr=0.0), **kw)
    spy = _Spy(monkeypatch)
    for s in (0, 1, 2):
        _set(params, _grads(s))
        opt.clip()
    assert spy.fast == 3 and spy.ops == []


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": PercentileThreshold(50.0, include_current=False)},  # adaptive
        {"mode": "layer", "max_norm": 1.0, "group_by": "module"},  # a part per module
        {"mode": "agc", "clip_factor": 0.01},
        {"mode": "layer", "max_norm": 1.0, "nonfinite": "raise"},  # a read-only check first
    ],
)
def test_the_step_declines_where_the_shortcut_does_not_apply(kw, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = gradstab.GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), module=model, **kw
    )
    spy = _Spy(monkeypatch)
    model(torch.randn(5, 4)).sum().backward()
    opt.clip()
    assert spy.fast == 0 and spy.ops


def test_one_bound_per_param_group_declines(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    groups = [{"params": model[0].parameters()}, {"params": model[1].parameters()}]
    opt = gradstab.GradStabOptimizer(torch.optim.SGD(groups, lr=0.0), max_norm={0: 1.0, 1: 0.5})
    spy = _Spy(monkeypatch)
    model(torch.randn(5, 4)).sum().backward()
    opt.clip()
    assert spy.fast == 0 and spy.ops == ["clip_norm", "clip_norm"]


def test_a_fused_step_folds_instead(monkeypatch):
    """fold: the gradients are measured (one read), the fused step clips; no shortcut op."""
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    opt = gradstab.GradStabOptimizer(torch.optim.AdamW(params, lr=0.1, fused=True), max_norm=0.5)
    spy = _Spy(monkeypatch)
    for p in params:
        p.grad = torch.ones(4)
    opt.step()
    assert spy.fast == 0 and spy.ops == ["grad_stats"]
    want = torch.full((4,), 0.5 / math.sqrt(12.0))  # written back by the fused step
    assert all(torch.allclose(p.grad, want, rtol=1e-6) for p in params)


def test_no_gradient_at_all_declines_and_counts_the_step(monkeypatch):
    params = _params()
    opt = gradstab.GradStabOptimizer(torch.optim.SGD(params, lr=0.0), max_norm=1.0)
    assert opt.clip() is False
    assert opt.counters()["steps"] == 1


def test_the_callback_takes_the_shortcut_and_clips(monkeypatch):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.demos.boring_classes import BoringModel  # noqa: PLC0415

    seen: list[float] = []

    class Check(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            gs = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in gs]))))

    torch.manual_seed(0)
    spy = _Spy(monkeypatch)
    trainer = pl.Trainer(
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        callbacks=[gradstab.GradStabCallback(max_norm=1e-3), Check()],
    )
    trainer.fit(BoringModel())
    assert spy.fast == 3 and spy.ops == []
    assert len(seen) == 3 and all(n <= 1e-3 * (1 + 1e-5) for n in seen)


# --- edges: an overflowing norm of finite gradients, a norm at the bound, value mode


def _clip_once(grads, monkeypatch, *, dispatcher: bool, **kw):
    """One GradStabOptimizer.clip() over fresh parameters with ``grads``: (skip, counters,
    gradients after the clip); ``dispatcher`` disables the compiled shortcut."""
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    opt = gradstab.GradStabOptimizer(torch.optim.SGD(params, lr=0.0), **kw)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    with monkeypatch.context() as m:
        if dispatcher:
            m.setattr(_extension, "cpu_fast_path", None)
        skip = opt.clip()
    return skip, opt.counters(), [p.grad.clone() for p in params]


def _both(grads, monkeypatch, **kw):
    fast = _clip_once(grads, monkeypatch, dispatcher=False, **kw)
    slow = _clip_once(grads, monkeypatch, dispatcher=True, **kw)
    assert fast[0] == slow[0] and fast[1] == slow[1]
    for a, b in zip(fast[2], slow[2]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0))
    return fast


@pytest.mark.parametrize("nonfinite", ["skip", "zero"])
def test_an_overflowing_norm_of_finite_gradients_is_not_a_nonfinite_step(nonfinite, monkeypatch):
    """Every element finite, the float64 total norm overflows to inf: clipped, not non-finite
    (the host flags must look at the NaN/Inf counts, not only at the total)."""
    grads = [torch.full((2,), 1.5e308, dtype=torch.float64)]
    skip, counters, _ = _both(grads, monkeypatch, max_norm=1.0, nonfinite=nonfinite)
    assert skip is False
    assert counters["nonfinite_steps"] == 0 and counters["skipped_steps"] == 0
    assert counters["clipped_steps"] == 1


@pytest.mark.parametrize(
    "kw",
    [
        {"max_norm": 5.0},
        {"mode": "layer", "max_norm": 5.0},
        {"mode": "normalize", "target_norm": 5.0},
    ],
)
def test_a_norm_exactly_at_the_bound_counts_as_clipped(kw, monkeypatch):
    """The kernels scale by b / (norm + eps) < 1 when norm == b, so the step counts as clipped
    (the comparison is against bound - eps, as on the dispatcher path)."""
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])]
    _, counters, after = _both(grads, monkeypatch, **kw)
    assert counters["clipped_steps"] == 1
    assert float(after[0][1]) < 4.0  # it was written (scaled by 5 / (5 + eps))


def test_value_mode_counts_clipped_elements_not_large_norms(monkeypatch):
    """'value' clips elements: a large norm of small elements is not a clipped step."""
    small = [torch.full((100,), 0.1)]  # norm 1.0 > 0.5, every element 0.1 <= 0.5
    _, counters, after = _both(small, monkeypatch, mode="value", clip_value=0.5)
    assert counters["clipped_steps"] == 0 and torch.equal(after[0], small[0])
    big = [torch.tensor([0.1, 0.9])]  # an element above the bound
    _, counters, after = _both(big, monkeypatch, mode="value", clip_value=0.5)
    assert counters["clipped_steps"] == 1 and float(after[0][1]) == 0.5
