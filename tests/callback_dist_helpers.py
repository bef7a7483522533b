"""Multi-process helpers for tests/test_callback_distributed.py (CPU, gloo, 2 processes).

* :func:`run_scenarios` spawns ``WORLD`` processes that join one gloo group and run the
  scenarios of :data:`SCENARIOS` (GradStabOptimizer on FSDP2 ``fully_shard`` and on
  ZeRO-style flat shards with ``process_group=``), each against a single-process run of the
  same wrapper on the full model.  Failed checks are collected (``dist_helpers.Checks``), so
  one rank's failure never leaves the other waiting in a collective.
* ``python tests/callback_dist_helpers.py lightning OUT_DIR`` trains with Lightning
  (``strategy="ddp"``, 2 CPU processes) and ``GradStabCallback``, and writes, per rank, the
  metrics of every step, the counters and the adaptive threshold's state;
  :func:`lightning_reference` replays the same steps in one process with
  ``GradStabOptimizer`` on the union of both ranks' batches.
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

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_helpers
from dist_helpers import WORLD, Checks

import gradstab
from gradstab import GradStabOptimizer
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold

STEPS = 4


# --------------------------------------------------------------------------- harness


def _worker(rank: int, names: list[str], store_path: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    results: dict[str, str | None] = {}
    try:
        for name in names:
            try:
                SCENARIOS[name](rank)
                results[name] = None
            except Exception:
                results[name] = traceback.format_exc()
            with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def run_scenarios(names: list[str], timeout: float = 240.0) -> dict[str, list[str | None]]:
    """Run ``names`` on ``WORLD`` spawned ranks; ``{name: [rank 0 error or None, ...]}``."""
    import torch.multiprocessing as mp  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(
            _worker,
            args=(names, os.path.join(tmp, "store"), tmp),
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


# --------------------------------------------------------------------------- FSDP2


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(21)
    return [torch.randn(8, 5, generator=gen) for _ in range(STEPS)]


#: The loss of step 2 is multiplied by this: a gradient spike every option below clips.
SPIKE = 30.0


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
    """STEPS steps of SGD wrapped in GradStabOptimizer; the metrics of every step."""
    opt = GradStabOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        module=model,
        log_every_n_steps=1,
        log_per_layer=True,
        history=STEPS,
        **kw,
    )
    metrics = []
    for s, x in enumerate(_batches()):
        opt.zero_grad()
        (model(x).pow(2).sum() * (SPIKE if s == 2 else 1.0)).backward()
        opt.step()
        metrics.append(dict(opt.last_metrics))
    return opt, metrics


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _fsdp_model():
    from torch.distributed.device_mesh import init_device_mesh  # noqa: PLC0415
    from torch.distributed.fsdp import fully_shard  # noqa: PLC0415

    mesh = init_device_mesh("cpu", (WORLD,))
    model = dist_helpers._mlp()  # Linear(3, 1): rank 1's shard of its weight is empty
    for i in (0, 2, 4):
        fully_shard(model[i], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


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
        ref_opt, ref_metrics = _run_wrapper(dist_helpers._mlp(), kw)
        ref_params = [p.detach() for p in ref_opt.optimizer.param_groups[0]["params"]]
        model = _fsdp_model()
        opt, metrics = _run_wrapper(model, kw)
        ck.true(f"{name}: the plan is sharded", opt._current_plan().sharded)
        for i, (p, r) in enumerate(zip(model.parameters(), ref_params)):
            ck.close(f"{name}: param {i} after {STEPS} steps", _full(p.detach()), r, 1e-5, 1e-7)
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
            (opt.history is not None) == (rank == 0) and (rank != 0 or len(opt.history) == STEPS),
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
    before: list[torch.Tensor] = []

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


# --------------------------------------------------------------------------- ZeRO-style shards


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


SCENARIOS = {
    "fsdp2_wrapper": scenario_fsdp2_wrapper,
    "fsdp2_nonfinite": scenario_fsdp2_nonfinite,
    "zero_process_group": scenario_zero_process_group,
}


# --------------------------------------------------------------------------- Lightning DDP

L_STEPS = 5
L_BATCH = 4  # per rank
L_NAN_STEP = 3  # rank 1's batch holds a NaN at this step


def lightning_callback():
    return gradstab.GradStabCallback(
        max_norm=ZScoreThreshold(warmup_steps=2, rule="mean"),
        nonfinite="skip",
        log_every_n_steps=1,
        log_per_layer=True,
        history=10,
    )


def _lightning_data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    n = L_STEPS * L_BATCH * WORLD
    x, y = torch.randn(n, 6, generator=gen), torch.randn(n, 2, generator=gen)
    x[2 * L_BATCH * WORLD : 3 * L_BATCH * WORLD] *= 20.0  # step 2: a spike
    x[WORLD * L_BATCH * L_NAN_STEP + 1, 0] = math.nan  # step 3, rank 1 (index r + WORLD * j)
    return x, y


def _lightning_net() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def lightning_reference() -> dict:
    """One process, same steps with GradStabOptimizer: batch ``s`` is the union of both
    ranks' batches ``s`` (DistributedSampler without shuffling: rank r gets r, r + WORLD, ...)."""
    x, y = _lightning_data()
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
    for s in range(L_STEPS):
        idx = [r + WORLD * (s * L_BATCH + j) for r in range(WORLD) for j in range(L_BATCH)]
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


def _lightning_main(out_dir: str) -> None:
    import lightning as L  # noqa: PLC0415

    torch.set_num_threads(1)

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _lightning_net()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            data = torch.utils.data.TensorDataset(*_lightning_data())
            sampler = torch.utils.data.DistributedSampler(
                data, self.trainer.world_size, self.trainer.global_rank, shuffle=False
            )
            return torch.utils.data.DataLoader(data, batch_size=L_BATCH, sampler=sampler)

    cb = lightning_callback()
    metrics: list[dict] = []

    class Spy(L.Callback):
        def on_train_batch_end(self, *args) -> None:
            metrics.append(dict(cb.last_metrics))

    trainer = L.Trainer(
        accelerator="cpu",
        devices=WORLD,
        strategy="ddp",
        max_steps=L_STEPS,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb, Spy()],
    )
    trainer.fit(Module())
    thr = cb.state_dict()["optimizers"][0]["thresholds"]["all"]["state"]
    out = {
        "world_size": trainer.world_size,
        "metrics": metrics,
        "counters": cb.counters(),
        "threshold": {k: v.double().reshape(-1).tolist() for k, v in thr.items()},
        "history": None if cb.history is None else len(cb.history),
        "diagnosis_steps": None if cb.diagnosis is None else cb.diagnosis.steps,
    }
    with open(os.path.join(out_dir, f"lightning_rank{trainer.global_rank}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "lightning":
        _lightning_main(sys.argv[2])
    else:
        sys.exit("usage: python tests/callback_dist_helpers.py lightning OUT_DIR")
