"""Multi-process helpers for the distributed tests (CPU, gloo, 2 processes):
tests/test_distributed.py (``gradstab.distributed``, the functions and ops on sharded gradients)
and tests/test_callback_distributed.py (``GradStabOptimizer`` / ``GradStabCallback``).

Two uses:

* :func:`run_scenarios` spawns ``WORLD`` processes (``torch.multiprocessing``, start method
  ``spawn``) that join one gloo group through a ``FileStore`` and run the named scenarios of
  :data:`SCENARIOS` in order: :data:`FUNCTION_SCENARIOS` (ZeRO-style flat shards with
  ``process_group=``, FSDP2 ``fully_shard``, hand-made DTensors, the reduction API) and
  :data:`WRAPPER_SCENARIOS` (``GradStabOptimizer`` on FSDP2 and on ZeRO-style shards, each
  against a single-process run of the same wrapper on the full model).  A scenario collects
  failed checks (:class:`Checks`) instead of asserting, so a failure on one rank does not leave
  the other waiting in a collective; every rank writes ``{scenario: None or error text}`` to a
  JSON file that the parent reads.
* :func:`run_lightning` runs ``python -m gradstab_testing.distributed lightning KIND OUT_DIR``,
  which trains a tiny model with Lightning (``strategy="ddp"``, 2 CPU processes; Lightning
  starts rank 1 by re-running the command) and writes one JSON file per rank: for ``clip``,
  the norms ``gradstab.clip_grad_norm_`` returned in ``on_before_optimizer_step``; for
  ``callback``, the metrics of every step of ``GradStabCallback``, its counters and the
  adaptive threshold's state.  :func:`lightning_clip_reference` and
  :func:`lightning_callback_reference` replay the same steps in one process on the union of
  both ranks' batches.

Every oracle is computed in float64 with PyTorch's own functions on the full gradients
(which each rank rebuilds from the same seed, or gathers with ``DTensor.full_tensor()``), or is
a single-process run on the full model.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

import gradstab
from gradstab import GradStabOptimizer
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold

WORLD = 2
EPS = 1e-6


# --------------------------------------------------------------------------- harness


def _worker(rank: int, names: list[str], store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, str | None] = {}
    out = os.path.join(out_dir, f"rank{rank}.json")
    try:
        for name in names:
            try:
                SCENARIOS[name](rank)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
            with open(out, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_scenarios(names: list[str], timeout: float = 240.0) -> dict[str, list[str | None]]:
    """Run ``names`` on ``WORLD`` spawned ranks; ``{name: [rank 0 error or None, ...]}``."""
    import torch.multiprocessing as mp  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        ctx = mp.start_processes(
            _worker,
            args=(names, store_path, tmp),
            nprocs=WORLD,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed scenarios still running after {timeout} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        per_rank = []
        for r in range(WORLD):
            with open(os.path.join(tmp, f"rank{r}.json")) as f:
                per_rank.append(json.load(f))
    return {n: [per_rank[r].get(n, "scenario did not run") for r in range(WORLD)] for n in names}


class Checks:
    """Collects failed checks; :meth:`done` raises them all at the end of a scenario."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.failures: list[str] = []

    def close(self, what: str, got: Tensor, want: Tensor, rtol: float, atol: float = 0.0) -> None:
        got64, want64 = got.detach().double().cpu(), want.detach().double().cpu()
        if got64.shape != want64.shape:
            self.failures.append(f"{what}: shape {list(got64.shape)} != {list(want64.shape)}")
            return
        if not torch.allclose(got64, want64, rtol=rtol, atol=atol, equal_nan=True):
            err = (got64 - want64).abs().nan_to_num(math.inf).max().item()
            self.failures.append(
                f"{what}: got {got64.flatten()[:6].tolist()} want {want64.flatten()[:6].tolist()} "
                f"(max abs err {err:.3g})"
            )

    def true(self, what: str, cond: bool) -> None:
        if not cond:
            self.failures.append(what)

    def same_on_all_ranks(self, what: str, t: Tensor) -> None:
        """Bitwise equality of ``t`` across ranks (a collective: every rank must call it)."""
        vals: list[object] = [None] * WORLD
        dist.all_gather_object(vals, t.detach().cpu().double().reshape(-1).tolist())
        self.true(
            f"{what}: differs across ranks: {vals}", all(repr(v) == repr(vals[0]) for v in vals)
        )

    def done(self) -> None:
        dist.barrier()
        if self.failures:
            raise AssertionError(f"rank {self.rank}:\n  " + "\n  ".join(self.failures))


# --------------------------------------------------------------------------- float64 oracle


def pnorm64(x: Tensor, p: float) -> Tensor:
    """p-norm in float64 with PyTorch's ``vector_norm``, scaled by max-abs against overflow."""
    x = x.detach().double().reshape(-1)
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    m = x.abs().amax()
    if math.isinf(p) or not (bool(torch.isfinite(m)) and m > 0):
        return torch.linalg.vector_norm(x, p)
    return m * torch.linalg.vector_norm(x / m, p)


def oracle(full: list[Tensor], p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-tensor norms, max-abs, non-finite counts and the total of the full gradients."""
    norms = torch.stack([pnorm64(g, p) for g in full])
    maxabs = torch.stack(
        [
            g.double().abs().amax() if g.numel() else torch.zeros((), dtype=torch.float64)
            for g in full
        ]
    )
    nonfinite = torch.stack([(~torch.isfinite(g)).sum() for g in full])
    flat = torch.cat([g.detach().double().reshape(-1) for g in full])
    return norms, maxabs, nonfinite, pnorm64(flat, p)


def clip_coef(max_norm: float, norm: Tensor) -> Tensor:
    return torch.clamp(max_norm / (norm + EPS), max=1.0)


def rtol_of(dtype: torch.dtype) -> float:
    """Relative tolerance of one rounding to ``dtype`` (plus slack)."""
    return {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[
        dtype
    ]


# --------------------------------------------------------------------------- ZeRO-style shards


def _zero_setup(
    rank: int, seed: int, dtypes: list[torch.dtype], scale: float = 1.0
) -> tuple[list[Tensor], list[torch.nn.Parameter], list[tuple[int, int]], list[torch.nn.Parameter]]:
    """Full gradients (same on every rank), this rank's flat shard of each, and replicated ones.

    Shard boundaries are random, and include a tensor wholly on rank 0 (rank 1 holds an
    empty shard), one wholly on rank 1, and a zero-size tensor.
    """
    gen = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (13,), (3, 4), (6,), (0,), (2, 3, 2)]
    full = []
    for i, shape in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        full.append((torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dt))
    cuts = []
    for i, g in enumerate(full):
        n = g.numel()
        cut = {1: n, 3: 0}.get(i, int(torch.randint(0, n + 1, (1,), generator=gen)) if n else 0)
        cuts.append((0, cut) if rank == 0 else (cut, n))
    params = []
    for g, (a, b) in zip(full, cuts):
        p = torch.nn.Parameter(torch.zeros(b - a, dtype=g.dtype))
        p.grad = g.reshape(-1)[a:b].clone()
        params.append(p)
    # Replicated on both ranks (identical): a non-contiguous one and a small one.
    rep_full = [
        (torch.randn(4, 6, generator=gen, dtype=torch.float64) * scale).to(dtypes[0]).t(),
        (torch.randn(3, generator=gen, dtype=torch.float64) * scale).to(dtypes[-1]),
    ]
    reps = []
    for g in rep_full:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g.clone() if g.is_contiguous() else g.clone().t().contiguous().t()
        gradstab.distributed.mark_replicated(p)
        reps.append(p)
    return full + rep_full, params + reps, cuts, reps


def _zero_check_all(ck: Checks, rank: int, seed: int, dtypes: list[torch.dtype], scale: float):
    group = dist.group.WORLD
    rd = torch.float64 if torch.float64 in dtypes else torch.float32
    for p in (2.0, 1.0, math.inf, 3.0):
        full, params, cuts, _ = _zero_setup(rank, seed, dtypes, scale)
        n64, m64, nf, tot64 = oracle(full, p)
        tag = f"zero p={p} dtypes={dtypes} scale={scale}"

        st = gradstab.grad_stats(params, p, process_group=group)
        ck.close(f"{tag} grad_stats.norms", st.norms, n64, rtol_of(rd))
        ck.close(f"{tag} grad_stats.max_abs", st.max_abs, m64, rtol_of(rd))
        ck.true(f"{tag} nonfinite {st.nonfinite.tolist()}", st.nonfinite.tolist() == nf.tolist())
        ck.close(f"{tag} grad_stats.total", st.total_norm, tot64, rtol_of(rd))
        ck.true(f"{tag} dtypes {st.norms.dtype} {st.total_norm.dtype}", st.norms.dtype == rd)
        ck.same_on_all_ranks(f"{tag} grad_stats", torch.cat([st.norms, st.total_norm[None]]))

        max_norm = float(tot64) / 3  # clips
        total = gradstab.clip_grad_norm_(params, max_norm, p, process_group=group)
        ck.close(f"{tag} clip total", total, tot64, rtol_of(rd))
        ck.true(f"{tag} total dtype {total.dtype}", total.dtype == rd)
        ck.same_on_all_ranks(f"{tag} clip total", total)
        coef = clip_coef(max_norm, tot64)
        for i, (prm, g) in enumerate(zip(params, full)):
            want = _local_part(g, cuts, i) * coef
            ck.close(f"{tag} clipped grad {i}", prm.grad, want, 2 * rtol_of(prm.grad.dtype))

        # the decomposed API: get_total_norm (replicated tensors marked themselves), then
        # clip_grads_with_norm_ by that global total (no group needed)
        full, params, cuts, reps = _zero_setup(rank, seed, dtypes, scale)
        for prm in reps:
            gradstab.distributed.mark_replicated(prm.grad)
        t = gradstab.get_total_norm([prm.grad for prm in params], p, process_group=group)
        ck.close(f"{tag} get_total_norm", t, tot64, rtol_of(rd))
        ck.true(f"{tag} get_total_norm dtype {t.dtype}", t.dtype == rd)
        ck.same_on_all_ranks(f"{tag} get_total_norm", t)
        gradstab.clip_grads_with_norm_(params, max_norm, t)
        for i, (prm, g) in enumerate(zip(params, full)):
            want = _local_part(g, cuts, i) * coef
            ck.close(f"{tag} clip by total, grad {i}", prm.grad, want, 2 * rtol_of(prm.grad.dtype))

        full, params, cuts, _ = _zero_setup(rank, seed, dtypes, scale)
        before = [prm.grad.clone() for prm in params]
        total = gradstab.clip_grad_norm_(params, float(tot64) * 2 + 1, p, process_group=group)
        ck.true(
            f"{tag} no clip when under the bound",
            all(torch.equal(a, prm.grad) for a, prm in zip(before, params)),
        )

        full, params, cuts, _ = _zero_setup(rank, seed, dtypes, scale)
        bound = float(n64[0]) / 2
        norms = gradstab.clip_grad_norm_per_layer_(params, bound, p, process_group=group)
        ck.close(f"{tag} per-layer norms", norms, n64, rtol_of(rd))
        coefs = clip_coef(bound, n64)
        for i, (prm, g) in enumerate(zip(params, full)):
            want = _local_part(g, cuts, i) * coefs[i]
            ck.close(f"{tag} per-layer grad {i}", prm.grad, want, 2 * rtol_of(prm.grad.dtype))


def _local_part(g: Tensor, cuts: list[tuple[int, int]], i: int) -> Tensor:
    if i >= len(cuts):  # replicated: whole
        return g.double()
    a, b = cuts[i]
    return g.reshape(-1)[a:b].double()


def scenario_zero_shards(rank: int) -> None:
    """(1) process_group with flat shards equals one process on the full gradients."""
    ck = Checks(rank)
    _zero_check_all(ck, rank, 1, [torch.float32, torch.bfloat16, torch.float16], 1.0)
    _zero_check_all(ck, rank, 2, [torch.float64, torch.float32], 1.0)
    ck.done()


def scenario_zero_overflow(rank: int) -> None:
    """Norms whose p-powers leave float64's range on the way (the reduction must not overflow)."""
    ck = Checks(rank)
    _zero_check_all(ck, rank, 3, [torch.float64], 1e250)
    _zero_check_all(ck, rank, 4, [torch.float64], 1e-250)
    _zero_check_all(ck, rank, 5, [torch.float32], 1e30)  # squares past float32's range
    ck.done()


def _poison(setup, i: int, flat_index: int, value: float) -> None:
    """Set element ``flat_index`` of logical tensor ``i`` (and of whichever shard holds it)."""
    full, params, cuts = setup
    full[i].reshape(-1)[flat_index] = value
    a, b = cuts[i]
    if a <= flat_index < b:
        params[i].grad[flat_index - a] = value


def scenario_zero_nonfinite(rank: int) -> None:
    """NaN and inf in one rank's shard: propagated to every rank, counts summed."""
    ck = Checks(rank)
    group = dist.group.WORLD
    for p in (2.0, math.inf, 1.0):
        for kind in ("nan", "inf", "both"):
            full, params, cuts, _ = _zero_setup(rank, 6, [torch.float32])
            # Tensor 3 lives wholly on rank 1, tensor 1 wholly on rank 0.
            if kind in ("nan", "both"):
                _poison((full, params, cuts), 3, 4, math.nan)
            if kind in ("inf", "both"):
                _poison((full, params, cuts), 1, 0, -math.inf)
                _poison((full, params, cuts), 1, 5, math.inf)
            n64, m64, nf, tot64 = oracle(full, p)
            tag = f"nonfinite {kind} p={p}"
            st = gradstab.grad_stats(params, p, process_group=group)
            ck.close(f"{tag} norms", st.norms, n64, 1e-6)
            ck.close(f"{tag} max_abs", st.max_abs, m64, 1e-6)
            ck.true(f"{tag} counts {st.nonfinite.tolist()}", st.nonfinite.tolist() == nf.tolist())
            ck.close(f"{tag} total", st.total_norm, tot64, 1e-6)
            ck.same_on_all_ranks(f"{tag} stats", torch.cat([st.norms, st.max_abs]))

            before = [prm.grad.clone() for prm in params]
            try:
                gradstab.clip_grad_norm_(
                    params, 1.0, p, error_if_nonfinite=True, process_group=group
                )
                ck.true(f"{tag}: error_if_nonfinite did not raise", False)
            except RuntimeError as e:
                ck.true(f"{tag}: message {e}", "non-finite" in str(e))
            ck.true(
                f"{tag}: grads changed by a failed clip",
                all(_nan_equal(a, prm.grad) for a, prm in zip(before, params)),
            )
            total = gradstab.clip_grad_norm_(params, 1.0, p, process_group=group)
            ck.close(f"{tag} clip total", total, tot64, 1e-6)
            finite = params[0].grad
            if kind == "inf":  # coefficient 0: finite values become 0, as in PyTorch
                ck.true(f"{tag} zeroed", bool((finite == 0).all()))
            else:  # coefficient NaN: everything NaN, as in PyTorch
                ck.true(f"{tag} NaN-scaled", bool(finite.isnan().all()))
    ck.done()


def _nan_equal(a: Tensor, b: Tensor) -> bool:
    return bool(torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def scenario_zero_empty_rank(rank: int) -> None:
    """A rank that holds no gradient at all still joins the reduction (ZeRO, uneven split)."""
    ck = Checks(rank)
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(7)
    full = [torch.randn(5, generator=gen), torch.randn(2, 2, generator=gen)]
    held = [torch.nn.Parameter(torch.zeros_like(g)) for g in full] if rank == 0 else []
    no_grad = torch.nn.Parameter(torch.zeros(3))  # no grad on any rank: skipped
    for p in (2.0, math.inf):
        tot64 = oracle(full, p)[3]
        for prm, g in zip(held, full):
            prm.grad = g.clone()
        params = [*held, no_grad]
        total = gradstab.clip_grad_norm_(params, float(tot64) / 2, p, process_group=group)
        ck.close(f"empty rank p={p} total", total, tot64, 1e-6)
        ck.same_on_all_ranks(f"empty rank p={p}", total)
        for prm, g in zip(held, full):
            ck.close(
                f"empty rank p={p} clipped",
                prm.grad,
                g.double() * clip_coef(float(tot64) / 2, tot64),
                1e-6,
            )
    ck.done()


# --------------------------------------------------------------------------- DTensor / FSDP2


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    # Linear(7, ...) has 7 rows: shards 4 + 3; Linear(3, 1) has 1 row: rank 1's shard is empty.
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7),
        torch.nn.Tanh(),
        torch.nn.Linear(7, 3),
        torch.nn.Tanh(),
        torch.nn.Linear(3, 1),
    )


def _fsdp_model() -> torch.nn.Module:
    """:func:`_mlp` under FSDP2 ``fully_shard`` (each Linear, then the whole) on all ranks."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _mlp()
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp_mlp(rank: int) -> torch.nn.Module:
    """:func:`_fsdp_model` with the gradients of one batch (the same on all ranks)."""
    model = _fsdp_model()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(11))
    model(x).pow(2).sum().backward()
    return model


def scenario_fsdp2(rank: int) -> None:
    """(2) FSDP2 fully_shard on a tiny MLP: gradstab equals one process and torch's own clip."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    ck = Checks(rank)
    ref = _mlp()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(11))
    ref(x).pow(2).sum().backward()
    ref_grads = [p.grad for p in ref.parameters()]
    for p in (2.0, math.inf, 1.0):
        model = _fsdp_mlp(rank)
        params = list(model.parameters())
        ck.true("FSDP2 grads are DTensors", all(isinstance(q.grad, DTensor) for q in params))
        ck.true(
            "an empty local shard exists on rank 1",
            rank == 0 or any(q.grad.to_local().numel() == 0 for q in params),
        )
        full = [q.grad.full_tensor() for q in params]
        for i, (f, r) in enumerate(zip(full, ref_grads)):
            ck.close(f"FSDP2 grad {i} vs single process", f, r, 1e-5, 1e-7)
        n64, m64, nf, tot64 = oracle(full, p)
        tag = f"fsdp2 p={p}"
        st = gradstab.grad_stats(params, p)
        ck.close(f"{tag} norms", st.norms, n64, 1e-6)
        ck.close(f"{tag} max_abs", st.max_abs, m64, 1e-6)
        ck.true(f"{tag} counts", st.nonfinite.tolist() == nf.tolist())
        ck.close(f"{tag} total", st.total_norm, tot64, 1e-6)
        ck.close(f"{tag} total vs single process", st.total_norm, oracle(ref_grads, p)[3], 1e-5)
        ck.same_on_all_ranks(f"{tag} stats", torch.cat([st.norms, st.total_norm[None]]))

        # torch's own clip on a copy of the DTensor grads: a second, independent oracle.
        # (Not for p = inf: torch 2.13's _foreach_norm refuses the empty shard of rank 1.)
        copies = [torch.nn.Parameter(q.detach().clone()) for q in params]
        for c, q in zip(copies, params):
            c.grad = q.grad.detach().clone()
        max_norm = float(tot64) / 4
        with_torch = not math.isinf(p)
        if with_torch:
            torch_total = torch.nn.utils.clip_grad_norm_(copies, max_norm, p).full_tensor()
        total = gradstab.clip_grad_norm_(params, max_norm, p)
        ck.close(f"{tag} clip total", total, tot64, 1e-6)
        if with_torch:
            ck.close(f"{tag} clip total vs torch", total, torch_total, 1e-6)
        ck.same_on_all_ranks(f"{tag} clip total", total)
        coef = clip_coef(max_norm, tot64)
        for i, (q, f, c) in enumerate(zip(params, full, copies)):
            ck.true(f"{tag} grad {i} still a DTensor", isinstance(q.grad, DTensor))
            got = q.grad.full_tensor()
            ck.close(f"{tag} clipped grad {i}", got, f.double() * coef, 2e-6, 1e-12)
            if with_torch:
                want = c.grad.full_tensor()
                ck.close(f"{tag} clipped grad {i} vs torch", got, want, 2e-6, 1e-12)

        # the decomposed API on DTensor grads: gradstab's total is a plain tensor, the same on
        # every rank; clip_grads_with_norm_ scales the local shards (a DTensor total is made
        # whole: torch's get_total_norm returns one)
        model = _fsdp_mlp(rank)
        params = list(model.parameters())
        t = gradstab.get_total_norm([q.grad for q in params], p)
        ck.close(f"{tag} get_total_norm", t, tot64, 1e-6)
        ck.true(f"{tag} get_total_norm is plain", not isinstance(t, DTensor))
        ck.same_on_all_ranks(f"{tag} get_total_norm", t)
        total_arg = t
        if with_torch:
            total_arg = torch.nn.utils.get_total_norm([q.grad for q in params], p)
            ck.true(f"{tag} torch's total is a DTensor", isinstance(total_arg, DTensor))
        gradstab.clip_grads_with_norm_(params, max_norm, total_arg)
        for i, (q, f) in enumerate(zip(params, full)):
            ck.true(f"{tag} clip by total, grad {i} still a DTensor", isinstance(q.grad, DTensor))
            got = q.grad.full_tensor()
            ck.close(f"{tag} clip by total, grad {i}", got, f.double() * coef, 2e-6, 1e-12)

        model = _fsdp_mlp(rank)
        params = list(model.parameters())
        full = [q.grad.full_tensor() for q in params]
        bound = float(n64.median())
        norms = gradstab.clip_grad_norm_per_layer_(params, bound, p)
        ck.close(f"{tag} per-layer norms", norms, n64, 1e-6)
        coefs = clip_coef(bound, n64)
        for i, (q, f) in enumerate(zip(params, full)):
            ck.close(
                f"{tag} per-layer grad {i}",
                q.grad.full_tensor(),
                f.double() * coefs[i],
                2e-6,
                1e-12,
            )
    ck.done()


def scenario_dtensor_mixed(rank: int) -> None:
    """Hand-made DTensors: uneven Shard(0), Shard(1), Replicate, a plain tensor, NaN, Partial."""
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.tensor import (  # noqa: PLC0415
        DTensor,
        Partial,
        Replicate,
        Shard,
        distribute_tensor,
    )

    ck = Checks(rank)
    mesh = init_device_mesh("cpu", (WORLD,))
    gen = torch.Generator().manual_seed(21)
    # A 2-D mesh (1 x 2, as HSDP with one replica): its sharded dimension is another process
    # group, so the tensors on it form a second sharding domain, interleaved with the first.
    mesh2 = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replica", "shard"))
    specs = [
        (None, (4,)),  # plain tensor first: whole on every rank, counted once
        ([Shard(0)], (5, 3)),  # uneven: 3 + 2 rows
        ([Replicate()], (6,)),  # replicated: counted once
        ([Shard(1)], (2, 7)),
        ([Shard(0)], (1,)),  # rank 1's shard is empty
        ([Replicate(), Shard(0)], (3, 2)),  # on mesh2
        ([Shard(0)], (0, 3)),  # zero-size
        ([Shard(0), Replicate()], (4,)),  # on mesh2: size-1 dim sharded = whole on each rank
        ([Replicate(), Shard(1)], (2, 5)),  # on mesh2
    ]

    def build(dtype: torch.dtype, nan_on_rank1: bool = False):
        full, params = [], []
        for placements, shape in specs:
            g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
            full.append(g)
            if placements is None:
                prm = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
                prm.grad = g.clone()
            else:
                m = mesh2 if len(placements) == 2 else mesh
                prm = torch.nn.Parameter(
                    distribute_tensor(torch.zeros(shape, dtype=dtype), m, placements)
                )
                prm.grad = distribute_tensor(g.clone(), m, placements)
            params.append(prm)
        if nan_on_rank1:
            full[3][1, -1] = math.nan  # Shard(1) of 7 columns: the last is on rank 1
            if rank == 1:
                params[3].grad.to_local()[1, -1] = math.nan
        return full, params

    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        for p in (2.0, math.inf, 1.0):
            tag = f"mixed {dtype} p={p}"
            full, params = build(dtype)
            lay = gradstab.distributed.layout([q.grad for q in params])
            ck.true(f"{tag} domains {lay.domain}", lay.domain == [-1, 0, -1, 0, 0, 0, 0, -1, 0])
            n64, m64, nf, tot64 = oracle(full, p)
            st = gradstab.grad_stats(params, p)
            rt = 1e-12 if dtype == torch.float64 else 1e-6
            ck.close(f"{tag} norms", st.norms, n64, rt)
            ck.close(f"{tag} max_abs", st.max_abs, m64, rt)
            ck.close(f"{tag} total", st.total_norm, tot64, rt)
            ck.same_on_all_ranks(f"{tag} stats", torch.cat([st.norms, st.total_norm[None]]))
            max_norm = float(tot64) / 2
            total = gradstab.clip_grad_norm_(params, max_norm, p)
            ck.close(f"{tag} clip total", total, tot64, rt)
            coef = clip_coef(max_norm, tot64)
            for i, (q, f) in enumerate(zip(params, full)):
                got = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
                ck.close(f"{tag} clipped {i}", got, f.double() * coef, 2 * rtol_of(dtype))

    for p in (2.0, math.inf):
        full, params = build(torch.float32, nan_on_rank1=True)
        n64, m64, nf, tot64 = oracle(full, p)
        st = gradstab.grad_stats(params, p)
        tag = f"mixed NaN p={p}"
        ck.true(
            f"{tag} norms {st.norms.tolist()}",
            bool(st.norms[3].isnan()) and not bool(st.norms[1].isnan()),
        )
        ck.true(f"{tag} max_abs", bool(st.max_abs[3].isnan()))
        ck.true(f"{tag} counts {st.nonfinite.tolist()}", st.nonfinite.tolist() == nf.tolist())
        ck.true(f"{tag} total", bool(st.total_norm.isnan()))
        total = gradstab.clip_grad_norm_(params, 1.0, p)
        ck.true(f"{tag} clip total {total}", bool(total.isnan()))

    # Two sharding domains interleaved: ZeRO-style plain shards over a group of their own
    # (process_group=) between DTensors on the default group; the plain tensor that every rank
    # holds whole is marked replicated.
    pg = dist.new_group(list(range(WORLD)))
    for p in (2.0, math.inf):
        tag = f"two domains p={p}"
        full, params = build(torch.float32)
        gradstab.distributed.mark_replicated(params[0])
        z = torch.randn(9, generator=gen)
        zp = torch.nn.Parameter(torch.zeros(4 if rank == 0 else 5))
        zp.grad = (z[:4] if rank == 0 else z[4:]).clone()
        full.insert(2, z)
        params.insert(2, zp)
        lay = gradstab.distributed.layout(
            [q.grad for q in params], [gradstab.distributed.is_replicated(q) for q in params], pg
        )
        ck.true(f"{tag} domains {lay.domain}", lay.domain == [-1, 1, 0, -1, 1, 1, 1, 1, -1, 1])
        n64, m64, nf, tot64 = oracle(full, p)
        st = gradstab.grad_stats(params, p, process_group=pg)
        ck.close(f"{tag} norms", st.norms, n64, 1e-6)
        ck.close(f"{tag} max_abs", st.max_abs, m64, 1e-6)
        ck.close(f"{tag} total", st.total_norm, tot64, 1e-6)
        max_norm = float(tot64) / 2
        total = gradstab.clip_grad_norm_(params, max_norm, p, process_group=pg)
        ck.close(f"{tag} clip total", total, tot64, 1e-6)
        coef = clip_coef(max_norm, tot64)
        got = params[2].grad
        want = (z[:4] if rank == 0 else z[4:]).double() * coef
        ck.close(f"{tag} clipped plain shard", got, want, 2e-6)
        ck.close(f"{tag} clipped DTensor", params[1].grad.full_tensor(), full[1] * coef, 2e-6)

    # clip_grad_value_ is elementwise: DTensors (first or later in the list) clamp shard-wise.
    full, params = build(torch.float32)
    for order in (params, params[1:] + params[:1]):
        gradstab.clip_grad_value_(order, 0.5)
    for i, (q, f) in enumerate(zip(params, full)):
        got = q.grad.full_tensor() if hasattr(q.grad, "full_tensor") else q.grad
        ck.close(f"clip_grad_value_ {i}", got, f.double().clamp(-0.5, 0.5), 1e-7)

    # A Partial gradient (reduction pending) is refused before any collective or write.
    prm = torch.nn.Parameter(distribute_tensor(torch.zeros(4), mesh, [Replicate()]))
    prm.grad = DTensor.from_local(torch.ones(4), mesh, [Partial()])
    try:
        gradstab.clip_grad_norm_([prm], 1.0)
        ck.true("Partial grad accepted", False)
    except ValueError as e:
        ck.true(f"Partial message: {e}", "Partial" in str(e))
    ck.done()


def scenario_reduce_api(rank: int) -> None:
    """The low-level API for the callback: reduce_stats / reduce_total on op statistics."""
    ck = Checks(rank)
    group = dist.group.WORLD
    for p in (2.0, math.inf, 3.0):
        full, params, _cuts, reps = _zero_setup(rank, 8, [torch.float32, torch.float16])
        sharded = [q.grad for q in params[: len(params) - len(reps)]]
        n64, m64, nf, _ = oracle(full[: len(sharded)], p)
        norms, maxabs, nonfinite, _ = torch.ops.gradstab.grad_stats(sharded, p)
        st = gradstab.distributed.reduce_stats(norms, maxabs, nonfinite, p, group)
        ck.close(f"reduce_stats p={p} norms", st.norms, n64, 1e-6)
        ck.close(f"reduce_stats p={p} max_abs", st.max_abs, m64, 1e-6)
        ck.true(f"reduce_stats p={p} counts", st.nonfinite.tolist() == nf.tolist())
        ck.close(f"reduce_stats p={p} total", st.total_norm, pnorm64(n64, p), 1e-6)
        # reduce_total takes any split: here rank 1 passes its parts in reverse order.
        total = gradstab.distributed.reduce_total(norms if rank == 0 else norms.flip(0), p, group)
        ck.close(f"reduce_total p={p}", total, pnorm64(n64, p), 1e-6)
        ck.same_on_all_ranks(f"reduce_total p={p}", total)
        per_group = gradstab.distributed.reduce_stats(norms, None, None, p, [group])
        ck.true(f"reduce_stats without max_abs p={p}", per_group.max_abs is None)
        ck.close(f"reduce_stats group list p={p}", per_group.norms, n64, 1e-6)
    ck.done()


# --------------------------------------------------------------- GradStabOptimizer, FSDP2

#: Steps of the wrapper scenarios; the loss of step 2 is multiplied by :data:`SPIKE`, a
#: gradient spike every option of :data:`FSDP_OPTIONS` clips.
WRAPPER_STEPS = 4
SPIKE = 30.0


def _batches() -> list[Tensor]:
    gen = torch.Generator().manual_seed(21)
    return [torch.randn(8, 5, generator=gen) for _ in range(WRAPPER_STEPS)]


FSDP_OPTIONS = {
    "norm": {"max_norm": 0.5},
    "layer": {"mode": "layer", "max_norm": 0.3},
    "layer-module": {"mode": "layer", "max_norm": 0.3, "group_by": "module"},
    "normalize": {"mode": "normalize", "target_norm": 2.0},  # some scaled up, some down
    "value": {"mode": "value", "clip_value": 0.05},
    "zscore": {"max_norm": ZScoreThreshold(warmup_steps=2, rule="mean")},
    "percentile-layer": {
        "mode": "layer",
        "max_norm": PercentileThreshold(50.0, 8, include_current=False),
    },
}


def _run_wrapper(model: torch.nn.Module, kw: dict) -> tuple:
    """WRAPPER_STEPS steps of SGD wrapped in GradStabOptimizer; the metrics of every step."""
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        module=model,
        log_every_n_steps=1,
        log_per_layer=True,
        history=WRAPPER_STEPS,
        **kw,
    )
    metrics = []
    for s, x in enumerate(_batches()):
        opt.zero_grad()
        (model(x).pow(2).sum() * (SPIKE if s == 2 else 1.0)).backward()
        opt.step()
        metrics.append(dict(opt.last_metrics))
    return opt, metrics


def _full(t: Tensor) -> Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare_metrics(ck: Checks, tag: str, got: list[dict], want: list[dict]) -> None:
    ck.true(f"{tag}: metric keys differ", [sorted(m) for m in got] == [sorted(m) for m in want])
    for s, (g, w) in enumerate(zip(got, want)):
        for k in w:
            if k not in g:
                continue
            a, b = g[k], w[k]
            ok = (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-5)
            ck.true(f"{tag} step {s} {k}: {a} != single process {b}", ok)
    flat = torch.tensor([v for m in got for _, v in sorted(m.items())], dtype=torch.float64)
    ck.same_on_all_ranks(f"{tag} metrics", flat)


def scenario_fsdp2_wrapper(rank: int) -> None:
    """GradStabOptimizer on FSDP2 equals GradStabOptimizer in one process on the full model:
    clipped parameters, every logged metric, counters, adaptive threshold state; identical on
    both ranks; the history on rank 0 only."""
    ck = Checks(rank)
    for name, kw in FSDP_OPTIONS.items():
        ref_opt, ref_metrics = _run_wrapper(_mlp(), kw)
        ref_params = [p.detach() for p in ref_opt.optimizer.param_groups[0]["params"]]
        model = _fsdp_model()  # Linear(3, 1): rank 1's shard of its weight is empty
        opt, metrics = _run_wrapper(model, kw)
        ck.true(f"{name}: the plan is sharded", opt._current_plan().sharded)
        for i, (p, r) in enumerate(zip(model.parameters(), ref_params)):
            ck.close(
                f"{name}: param {i} after {WRAPPER_STEPS} steps", _full(p.detach()), r, 1e-5, 1e-7
            )
        _compare_metrics(ck, name, metrics, ref_metrics)
        ck.true(
            f"{name}: counters {opt.counters()} != {ref_opt.counters()}",
            opt.counters() == ref_opt.counters(),
        )
        ck.true(f"{name}: the spike step was clipped", metrics[2]["grad/clip_coef"] < 1.0)
        thr = opt.state_dict()["gradstab"].get("thresholds", {})
        ref_thr = ref_opt.state_dict()["gradstab"].get("thresholds", {})
        ck.true(f"{name}: threshold keys", sorted(thr) == sorted(ref_thr))
        for key in thr:
            for k, t in thr[key]["state"].items():
                ck.close(f"{name}: threshold state {k}", t, ref_thr[key]["state"][k], 1e-5)
                ck.same_on_all_ranks(f"{name}: threshold state {k}", t)
        ck.true(
            f"{name}: history on rank 0 only",
            (opt.history is not None) == (rank == 0)
            and (rank != 0 or len(opt.history) == WRAPPER_STEPS),
        )
        if rank == 0:
            data, ref_data = opt.history.data(), ref_opt.history.data()
            ck.close(f"{name}: history norms", data.norms, ref_data.norms, 1e-5)
            ck.close(f"{name}: history max_abs", data.max_abs, ref_data.max_abs, 1e-5)
    ck.done()


def scenario_fsdp2_nonfinite(rank: int) -> None:
    """A NaN in one rank's shard only: both ranks see the step as non-finite and skip it
    (parameters unchanged everywhere), or raise the same error."""
    ck = Checks(rank)
    model = _fsdp_model()
    before: list[Tensor] = []

    class Spy(torch.optim.SGD):
        def step(self, closure=None):
            before.append(torch.cat([_full(p.detach()).reshape(-1) for p in model.parameters()]))
            return super().step(closure)

    opt = GradStabOptimizer(
        Spy(model.parameters(), lr=0.1), max_norm=0.5, nonfinite="skip", module=model
    )
    for s, x in enumerate(_batches()[:3]):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        if s == 1 and rank == 1:
            local = model[0].weight.grad.to_local()
            local.view(-1)[0] = math.nan
        opt.step()
    counts = opt.counters()
    ck.true(f"counters {counts}", counts["nonfinite_steps"] == 1 and counts["skipped_steps"] == 1)
    ck.true(f"the wrapped step ran {len(before)} times, not 2", len(before) == 2)
    ck.same_on_all_ranks("counters", torch.tensor(list(counts.values()), dtype=torch.float64))

    model = _fsdp_model()
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), max_norm=0.5, nonfinite="raise", module=model
    )
    opt.zero_grad()
    model(_batches()[0]).pow(2).sum().backward()
    if rank == 1:
        model[2].weight.grad.to_local().view(-1)[-1] = math.inf
    try:
        opt.step()
        ck.true("nonfinite='raise' did not raise", False)
    except RuntimeError as exc:
        ck.true(f"error names 2.weight: {exc}", "'2.weight'" in str(exc))
    ck.done()


# ------------------------------------------------------ GradStabOptimizer, ZeRO-style shards


def scenario_zero_process_group(rank: int) -> None:
    """Flat shards with process_group=: each rank holds a disjoint part of every tensor; a
    replicated (marked) tensor counts once.  Clipped shards equal the clipped full tensors."""
    ck = Checks(rank)
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(7, 3, generator=gen), torch.randn(5, generator=gen)]
    rep = torch.randn(4, generator=gen)  # the same on every rank
    for mode, bound, group in (("norm", 1.0, dist.group.WORLD), ("layer", 0.8, "world")):
        shards = [torch.nn.Parameter(t.reshape(-1)[rank::WORLD].clone()) for t in full]
        for s, t in zip(shards, full):
            s.grad = t.reshape(-1)[rank::WORLD].clone()
        r = torch.nn.Parameter(torch.zeros(4))
        r.grad = rep.clone()
        gradstab.distributed.mark_replicated(r)
        opt = GradStabOptimizer(
            torch.optim.SGD([*shards, r], lr=1.0),
            mode=mode,
            max_norm=bound,
            process_group=group,
            log_every_n_steps=1,
            log_per_layer=True,
        )
        opt.clip()
        ck.true(f"{mode}: the plan is sharded", opt._current_plan().sharded)
        everything = [*full, rep]
        norms = torch.stack([t.double().norm() for t in everything])
        total = norms.norm()
        if mode == "norm":
            coefs = torch.clamp(bound / (total + 1e-6), max=1.0).expand(3)
        else:
            coefs = torch.clamp(bound / (norms + 1e-6), max=1.0)
        for i, (s, t) in enumerate(zip(shards, full)):
            want = t.reshape(-1)[rank::WORLD].double() * coefs[i]
            ck.close(f"{mode}: shard {i}", s.grad, want, 2e-6, 1e-12)
        ck.close(f"{mode}: replicated", r.grad, rep.double() * coefs[2], 2e-6, 1e-12)
        m = opt.last_metrics
        ck.close(f"{mode}: total", torch.tensor(m["grad_2.0_norm_total"]), total, 1e-6)
        for i, name in enumerate(("param_groups.0.0", "param_groups.0.1", "param_groups.0.2")):
            ck.close(
                f"{mode}: norm {name}", torch.tensor(m[f"grad_2.0_norm/{name}"]), norms[i], 1e-6
            )
        ck.same_on_all_ranks(f"{mode}: metrics", torch.tensor(sorted(m.values())))
    ck.done()


#: The scenarios of tests/test_distributed.py: gradstab's functions on sharded gradients.
FUNCTION_SCENARIOS: dict[str, Callable[[int], None]] = {
    "zero_shards": scenario_zero_shards,
    "zero_overflow": scenario_zero_overflow,
    "zero_nonfinite": scenario_zero_nonfinite,
    "zero_empty_rank": scenario_zero_empty_rank,
    "fsdp2": scenario_fsdp2,
    "dtensor_mixed": scenario_dtensor_mixed,
    "reduce_api": scenario_reduce_api,
}
#: The scenarios of tests/test_callback_distributed.py: GradStabOptimizer on sharded models.
WRAPPER_SCENARIOS: dict[str, Callable[[int], None]] = {
    "fsdp2_wrapper": scenario_fsdp2_wrapper,
    "fsdp2_nonfinite": scenario_fsdp2_nonfinite,
    "zero_process_group": scenario_zero_process_group,
}
SCENARIOS = {**FUNCTION_SCENARIOS, **WRAPPER_SCENARIOS}


# --------------------------------------------------------------------------- Lightning DDP

LIGHTNING_BATCH = 4  # per rank
#: The ``clip`` run: gradstab.clip_grad_norm_ in on_before_optimizer_step.
CLIP_STEPS = 3
CLIP_MAX_NORM = 0.05
#: The ``callback`` run: GradStabCallback; a spike at step 2, a NaN in rank 1's batch at
#: CALLBACK_NAN_STEP.
CALLBACK_STEPS = 5
CALLBACK_NAN_STEP = 3
LIGHTNING_STEPS = {"clip": CLIP_STEPS, "callback": CALLBACK_STEPS}


def _lightning_data(kind: str) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    n = LIGHTNING_STEPS[kind] * LIGHTNING_BATCH * WORLD
    x, y = torch.randn(n, 6, generator=gen), torch.randn(n, 2, generator=gen)
    if kind == "callback":
        x[2 * LIGHTNING_BATCH * WORLD : 3 * LIGHTNING_BATCH * WORLD] *= 20.0  # step 2: a spike
        # step CALLBACK_NAN_STEP, rank 1 (which gets the indices r + WORLD * j)
        x[WORLD * LIGHTNING_BATCH * CALLBACK_NAN_STEP + 1, 0] = math.nan
    return x, y


def _lightning_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def _union_batch(s: int) -> list[int]:
    """The indices of batch ``s`` of both ranks together (DistributedSampler without
    shuffling: rank r gets r, r + WORLD, ...)."""
    return [
        r + WORLD * (s * LIGHTNING_BATCH + j) for r in range(WORLD) for j in range(LIGHTNING_BATCH)
    ]


def lightning_clip_reference() -> list[float]:
    """The ``clip`` run in one process: batch ``s`` is the union of both ranks' batches ``s``."""
    x, y = _lightning_data("clip")
    net = _lightning_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    norms = []
    for s in range(CLIP_STEPS):
        idx = _union_batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
        norms.append(float(gradstab.clip_grad_norm_(net.parameters(), CLIP_MAX_NORM)))
        opt.step()
    return norms


def lightning_callback() -> gradstab.GradStabCallback:
    return gradstab.GradStabCallback(
        max_norm=ZScoreThreshold(warmup_steps=2, rule="mean"),
        nonfinite="skip",
        log_every_n_steps=1,
        log_per_layer=True,
        history=10,
    )


def lightning_callback_reference() -> dict:
    """The ``callback`` run in one process with GradStabOptimizer: batch ``s`` is the union of
    both ranks' batches ``s``."""
    x, y = _lightning_data("callback")
    net = _lightning_net()
    holder = torch.nn.Module()
    holder.net = net  # parameter names as in the LightningModule: net.0.weight, ...
    opt = GradStabOptimizer(
        torch.optim.SGD(net.parameters(), lr=0.5),
        max_norm=ZScoreThreshold(warmup_steps=2, rule="mean"),
        nonfinite="skip",
        module=holder,
        log_every_n_steps=1,
        log_per_layer=True,
    )
    metrics = []
    for s in range(CALLBACK_STEPS):
        idx = _union_batch(s)
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
        opt.step()
        metrics.append(dict(opt.last_metrics))
    thr = opt.state_dict()["gradstab"]["thresholds"]["all"]["state"]
    return {
        "metrics": metrics,
        "counters": opt.counters(),
        "threshold": {k: v.double().reshape(-1).tolist() for k, v in thr.items()},
    }


def _lightning_main(kind: str, out_dir: str) -> None:
    import lightning as L  # noqa: PLC0415

    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _lightning_net()
            self.norms: list[float] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_before_optimizer_step(self, optimizer) -> None:
            if kind == "clip":
                total = gradstab.clip_grad_norm_(self.parameters(), CLIP_MAX_NORM)
                self.norms.append(float(total))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            # An explicit sampler (use_distributed_sampler=False): rank r gets r, r + WORLD, ...
            data = torch.utils.data.TensorDataset(*_lightning_data(kind))
            sampler = torch.utils.data.DistributedSampler(
                data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
            return torch.utils.data.DataLoader(data, batch_size=LIGHTNING_BATCH, sampler=sampler)

    callbacks = []
    metrics: list[dict] = []
    if kind == "callback":
        cb = lightning_callback()

        class Spy(L.Callback):
            def on_train_batch_end(self, *args) -> None:
                metrics.append(dict(cb.last_metrics))

        callbacks = [cb, Spy()]
    module = Module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=LIGHTNING_STEPS[kind],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module)
    out: dict = {"world_size": trainer.world_size}
    if kind == "clip":
        out["norms"] = module.norms
    else:
        thr = cb.state_dict()["optimizers"][0]["thresholds"]["all"]["state"]
        out |= {
            "metrics": metrics,
            "counters": cb.counters(),
            "threshold": {k: v.double().reshape(-1).tolist() for k, v in thr.items()},
            "history": None if cb.history is None else len(cb.history),
            "diagnosis_steps": None if cb.diagnosis is None else cb.diagnosis.steps,
        }
    with open(os.path.join(out_dir, f"lightning_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)


def run_lightning(kind: str, out_dir: str, timeout: float = 300.0) -> list[dict]:
    """Run ``python -m gradstab_testing.distributed lightning KIND OUT_DIR`` (in ``out_dir``,
    with the gradstab these tests imported) and return what each rank wrote, rank by rank."""
    from .oracles import child_env  # noqa: PLC0415

    env = child_env()
    for k in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):
        env.pop(k, None)
    env["MASTER_ADDR"] = "127.0.0.1"
    proc = subprocess.run(
        [sys.executable, "-m", "gradstab_testing.distributed", "lightning", kind, str(out_dir)],
        env=env,
        cwd=out_dir,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"the Lightning run exited with {proc.returncode}\n"
            + proc.stdout[-3000:]
            + proc.stderr[-3000:]
        )
    runs = []
    for r in range(WORLD):
        with open(os.path.join(out_dir, f"lightning_rank{r}.json")) as f:
            runs.append(json.load(f))
    return runs


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "lightning" and sys.argv[2] in LIGHTNING_STEPS:
        _lightning_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m gradstab_testing.distributed lightning {clip,callback} OUT_DIR")
