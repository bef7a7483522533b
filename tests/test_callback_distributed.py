"""GradStabCallback / GradStabOptimizer with distributed training (CPU, gloo, 2 processes).

Sharded gradients (FSDP2 ``fully_shard``, ZeRO-style flat shards with ``process_group=``) and
Lightning ``strategy="ddp"``: every rank gets the clip, the metrics, the counters and the
adaptive threshold state of one process on the full model.  The scenarios live in
``tests/gradstab_testing/distributed.py`` (``WRAPPER_SCENARIOS``; one spawn runs them all).
"""

from __future__ import annotations

import json
import math

import pytest

dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

from gradstab_testing import distributed as dh  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def scenario_results():
    return dh.run_scenarios(list(dh.WRAPPER_SCENARIOS))


@pytest.mark.parametrize("name", list(dh.WRAPPER_SCENARIOS))
def test_two_process_scenario(scenario_results, name):
    """See the scenario's docstring in tests/gradstab_testing/distributed.py."""
    errors = [e for e in scenario_results[name] if e is not None]
    assert not errors, "\n".join(errors)


def _close(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b or math.isclose(a, b, rel_tol=1e-5)


def test_callback_under_lightning_ddp(tmp_path):
    """strategy="ddp", 2 CPU processes: metrics, counters and the threshold state are
    identical on both ranks and equal GradStabOptimizer in one process on the union of the
    batches (a spike clipped, a NaN on one rank's batch skipped on both); the history and the
    diagnosis exist on rank 0 only."""
    pytest.importorskip("lightning")
    runs = dh.run_lightning("callback", tmp_path)
    assert all(run["world_size"] == dh.WORLD for run in runs)
    assert json.dumps(runs[0]["metrics"]) == json.dumps(runs[1]["metrics"])
    assert runs[0]["counters"] == runs[1]["counters"]
    assert runs[0]["threshold"] == runs[1]["threshold"]
    ref = dh.lightning_callback_reference()
    assert runs[0]["counters"] == ref["counters"]
    assert ref["counters"]["skipped_steps"] == 1 and ref["counters"]["clipped_steps"] >= 1
    got, want = runs[0]["metrics"], ref["metrics"]
    assert len(got) == len(want) == dh.CALLBACK_STEPS
    for s, (g, w) in enumerate(zip(got, want)):
        assert sorted(g) == sorted(w), s
        bad = {k: (g[k], w[k]) for k in w if not _close(g[k], w[k])}
        assert not bad, (s, bad)
    for k, v in ref["threshold"].items():
        assert runs[0]["threshold"][k] == pytest.approx(v, rel=1e-5, nan_ok=True), k
    assert runs[0]["history"] == dh.CALLBACK_STEPS and runs[1]["history"] is None
    assert runs[0]["diagnosis_steps"] == dh.CALLBACK_STEPS and runs[1]["diagnosis_steps"] is None
