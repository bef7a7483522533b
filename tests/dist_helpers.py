"""Multi-process helpers for tests/test_distributed.py (CPU, gloo, 2 processes).

Two uses:

* :func:`run_scenarios` spawns ``WORLD`` processes (``torch.multiprocessing``, start method
  ``spawn``) that join one gloo group through a ``FileStore`` and run the named scenarios of
  :data:`SCENARIOS` in order.  A scenario collects failed checks instead of asserting, so a
  failure on one rank does not leave the other waiting in a collective; every rank writes
  ``{scenario: None or error text}`` to a JSON file that the parent reads.
* ``python tests/dist_helpers.py lightning OUT_DIR`` trains a tiny model with Lightning
  (``strategy="ddp"``, 2 CPU processes; Lightning starts rank 1 by re-running this command)
  and writes, per rank, the norms ``gradstab.clip_grad_norm_`` returned in
  ``on_before_optimizer_step``.  :func:`lightning_reference` replays the same steps in one
  process on the union of both ranks' batches.

Every oracle is computed in float64 with PyTorch's own functions on the full gradients
(which each rank rebuilds from the same seed, or gathers with ``DTensor.full_tensor()``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import tempfile
import time
import traceback
from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor

import gradstab

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


def _fsdp_mlp(rank: int):
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _mlp()
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(11))  # same batch on all ranks
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


SCENARIOS: dict[str, Callable[[int], None]] = {
    "zero_shards": scenario_zero_shards,
    "zero_overflow": scenario_zero_overflow,
    "zero_nonfinite": scenario_zero_nonfinite,
    "zero_empty_rank": scenario_zero_empty_rank,
    "fsdp2": scenario_fsdp2,
    "dtensor_mixed": scenario_dtensor_mixed,
    "reduce_api": scenario_reduce_api,
}


# --------------------------------------------------------------------------- Lightning DDP

LIGHTNING_STEPS = 3
LIGHTNING_BATCH = 4  # per rank
LIGHTNING_MAX_NORM = 0.05


def _lightning_data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(5)
    n = LIGHTNING_STEPS * LIGHTNING_BATCH * WORLD
    return torch.randn(n, 6, generator=gen), torch.randn(n, 2, generator=gen)


def _lightning_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def lightning_reference() -> list[float]:
    """One process, same steps: batch ``s`` is the union of both ranks' batches ``s``."""
    x, y = _lightning_data()
    net = _lightning_net()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    norms = []
    for s in range(LIGHTNING_STEPS):
        # DistributedSampler without shuffling: rank r gets indices r, r + WORLD, ...
        idx = [
            r + WORLD * (s * LIGHTNING_BATCH + j)
            for r in range(WORLD)
            for j in range(LIGHTNING_BATCH)
        ]
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(x[idx]), y[idx]).backward()
        norms.append(float(gradstab.clip_grad_norm_(net.parameters(), LIGHTNING_MAX_NORM)))
        opt.step()
    return norms


def _lightning_main(out_dir: str) -> None:
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
            total = gradstab.clip_grad_norm_(self.parameters(), LIGHTNING_MAX_NORM)
            self.norms.append(float(total))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            # An explicit sampler (use_distributed_sampler=False): rank r gets r, r + WORLD, ...
            data = torch.utils.data.TensorDataset(*_lightning_data())
            sampler = torch.utils.data.DistributedSampler(
                data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
            return torch.utils.data.DataLoader(data, batch_size=LIGHTNING_BATCH, sampler=sampler)

    module = Module()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=LIGHTNING_STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    with open(os.path.join(out_dir, f"lightning_rank{trainer.global_rank}.json"), "w") as f:
        json.dump({"world_size": trainer.world_size, "norms": module.norms}, f)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "lightning":
        _lightning_main(sys.argv[2])
    else:
        sys.exit("usage: python tests/dist_helpers.py lightning OUT_DIR")
