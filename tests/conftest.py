"""pytest configuration shared by all gradstab tests.

- The shared helpers are the package ``tests/gradstab_testing`` (oracles, kernel case
  tables, the CUDA execution harness, the distributed scenarios, ``DEVICES``): pytest's
  ``pythonpath = ["tests"]`` (pyproject.toml) makes ``import gradstab_testing`` work.
- Hypothesis profiles: ``default`` -- what CI and the README's test command run --
  derandomized and with no example database, so a run draws the same examples on every
  machine and a red CI reproduces anywhere, whatever an earlier local run saved; ``explore``
  (``HYPOTHESIS_PROFILE=explore``) draws fresh random examples and keeps failing ones in
  ``.hypothesis/``: turn each failure it finds into a fixed ``@example`` on the test. Both have
  no deadline (the first call of an op or a compiled function is slow on a busy machine). Each
  test sets its own moderate ``max_examples`` so the suite stays fast on two cores.
- ``pytest -ra`` folds the skips of the GPU tests (reason ``needs a CUDA device``, or
  ``needs CUDA``) into one summary line, ``SKIPPED [N] tests/conftest.py: needs a CUDA
  device ...``, instead of one line per test function; other skips are listed as usual.
- A test parametrised with ``device="cuda"`` (``gradstab_testing.devices.DEVICES``) fails when
  ``gradstab._C`` has no CUDA kernel, rather than quietly testing the pure-PyTorch fallback on
  the GPU (``tests/test_cuda.py`` does the same for its own tests).
- Fixtures: ``cpp_kernel`` skips a test unless the compiled C++ CPU kernel serves CPU;
  ``num_threads`` restores torch's intra-op thread count after a test changes it;
  ``one_thread`` runs a test with one intra-op thread (opt in per module with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``): on a loaded 2-core machine,
  two OpenMP threads make small torch ops 5-20x slower, and the tests that need the
  kernels' parallel paths set two threads themselves.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
settings.register_profile("default", derandomize=True, database=None, **_COMMON)
settings.register_profile("explore", **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

_GPU_SKIP = re.compile(r"^(Skipped: )?needs (a )?CUDA( device)?$")
GPU_SKIP_REASON = (
    "Skipped: needs a CUDA device (the GPU tests; benchmarks/gpu/run_gpu_checks.sh runs them "
    "on a GPU machine)"
)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Give every "needs a CUDA device" skip one location and reason, so that ``-ra`` folds
    them into one line (pytest folds skips of equal location and reason)."""
    longrepr = report.longrepr
    if (
        report.skipped
        and isinstance(longrepr, tuple)
        and len(longrepr) == 3
        and _GPU_SKIP.match(str(longrepr[2]))
    ):
        report.longrepr = (__file__, None, GPU_SKIP_REASON)


@pytest.fixture(autouse=True)
def _cuda_cases_test_the_cuda_kernel(request: pytest.FixtureRequest) -> None:
    """Fail a ``device="cuda"`` case when gradstab's build has no CUDA kernel."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("device") != "cuda":
        return
    from gradstab._extension import has_kernel  # noqa: PLC0415

    if not has_kernel("cuda"):
        pytest.fail(
            "gradstab._C has no CUDA kernel: build it on this machine with "
            "`TORCH_CUDA_ARCH_LIST=9.0 pip install --no-build-isolation --no-deps -e .`"
        )


@pytest.fixture
def cpp_kernel() -> None:
    """Skip unless ``gradstab._C`` registered its C++ kernel for CPU."""
    import gradstab  # noqa: PLC0415

    info = gradstab.backend_info()["cpu"]
    if info["kernel"] != "cpp":
        pytest.skip(f"the C++ CPU kernel is not in use: {info['reason']}")


@pytest.fixture
def num_threads():
    """Restore ``torch.get_num_threads()`` after the test."""
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """Run the test with ``torch.set_num_threads(1)``, restoring the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
