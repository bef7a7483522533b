"""Build and call the CPU execution harness of gradstab's CUDA kernels (csrc/testing/cuda_sim).

The harness compiles ``csrc/cuda/norm_kernels.cu`` and ``csrc/cuda/agc_kernels.cu`` unchanged
as host C++ against stand-in CUDA headers and runs the kernels on a simulated grid (one thread
per CUDA thread), through the same torch-free launch plans as the real launchers.
:func:`load` builds it as a PyTorch C++ extension (cached under ``build/cuda_sim/`` in the
repository, so reruns only relink what changed) and :func:`norm_op` / :func:`agc` run the
simulated ops on CPU tensors.

Example:
    >>> import torch
    >>> load()
    >>> g = torch.tensor([3.0, 4.0])
    >>> float(norm_op("grad_stats", [g])[3])
    5.0
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/gradstab_testing/ is two down
SIM_DIR = ROOT / "csrc" / "testing" / "cuda_sim"
BUILD_DIR = ROOT / "build" / "cuda_sim"
#: Flags of every translation unit: -ffp-contract=off keeps a * b + c two roundings, as the
#: kernels' __fmul_rn/__fadd_rn are; -fno-strict-aliasing for the kernels' 16-byte type punning.
CFLAGS = [
    "-O1",
    "-ffp-contract=off",
    "-fno-strict-aliasing",
    "-pthread",
    "-DGRADSTAB_CUDA_SIM=1",
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    "-Wno-unknown-pragmas",  # the kernels' #pragma unroll (nvcc's)
]
PLAN_SOURCES = [
    ROOT / "csrc" / "common" / "overlap.cpp",
    ROOT / "csrc" / "cuda" / "plan_common.cpp",
    ROOT / "csrc" / "cuda" / "norm_plan.cpp",
    ROOT / "csrc" / "cuda" / "agc_plan.cpp",
]
SOURCES = [
    SIM_DIR / "binding.cpp",
    SIM_DIR / "runtime.cpp",
    SIM_DIR / "sim_device.cpp",
    SIM_DIR / "sim_kernels.cpp",
    SIM_DIR / "sim_agc.cpp",
    SIM_DIR / "sim_thresholds.cpp",
    ROOT / "csrc" / "common" / "threshold_args.cpp",
    SIM_DIR / "selftest_kernels.cpp",
    *PLAN_SOURCES,
]
INCLUDES = [SIM_DIR / "include", SIM_DIR, ROOT / "csrc"]

OP_CODES = {
    "grad_stats": 0,
    "clip_norm": 1,
    "clip_norm_per_layer": 2,
    "clip_value": 3,
    "normalize_per_layer": 4,
}
SCHEDULES = {"in_order": 0, "reversed": 1, "shuffled": 2, "concurrent": 3}
EPS = 1e-6

_loaded = False
#: Seconds the last :func:`load` took (compile included), for the test log.
load_seconds = 0.0


def compiler() -> str | None:
    """The C++ compiler torch's extension builder would use, or None if there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


def load() -> None:
    """Compile (if needed) and load the harness into this process as ``torch.ops.gradstab_sim``.

    Raises:
        RuntimeError: the build failed (the compiler's output is in the message).
    """
    global _loaded, load_seconds
    if _loaded:
        return
    from torch.utils.cpp_extension import load as load_extension  # noqa: PLC0415

    start = time.monotonic()
    # GRADSTAB_CUDA_SIM_CFLAGS: extra compiler and linker flags for a one-off build in its own
    # directory, e.g. "--coverage -O0" to measure which kernel lines the tests execute.
    extra = os.environ.get("GRADSTAB_CUDA_SIM_CFLAGS", "").split()
    build = BUILD_DIR / f"torch-{torch.__version__}"
    if extra:
        build = build.with_name(
            build.name + "-" + hashlib.sha256(" ".join(extra).encode()).hexdigest()[:8]
        )
    build.mkdir(parents=True, exist_ok=True)
    load_extension(
        name="gradstab_cuda_sim",
        sources=[str(s) for s in SOURCES],
        extra_include_paths=[str(p) for p in INCLUDES],
        extra_cflags=[*CFLAGS, *extra],
        extra_ldflags=["-pthread", *extra],
        build_directory=str(build),
        is_python_module=False,
        verbose=False,
    )
    load_seconds = time.monotonic() - start
    _loaded = True


@dataclass(frozen=True)
class Launch:
    """How the simulated grid runs.

    Attributes:
        schedule: ``in_order``, ``reversed``, ``shuffled`` (warps one at a time) or
            ``concurrent`` (every CUDA thread at once).
        seed: the order of ``shuffled``.
        grid: blocks of every reduce/scale launch, exactly (0: the GPU's persistent grid for
            ``resident`` blocks, fewer when there is less work).
        resident: blocks the simulated GPU holds at once.
        max_blocks: a cap on the persistent grid (the ``_cuda_set_max_blocks`` test hook).
        reuse_scratch: keep the scratch buffer of the previous call (its counters must be
            zeroed again by the plan).
    """

    schedule: str = "in_order"
    seed: int = 0
    grid: int = 0
    resident: int = 4
    max_blocks: int = 0
    reuse_scratch: bool = False

    def args(self) -> tuple[int, int, int, int, int, bool]:
        return (
            SCHEDULES[self.schedule],
            self.seed,
            self.grid,
            self.resident,
            self.max_blocks,
            self.reuse_scratch,
        )


DEFAULT = Launch()


def norm_op(
    op: str,
    grads: list[torch.Tensor],
    bound: float = 0.0,
    norm_type: float = 2.0,
    eps: float = EPS,
    *,
    bound_on_device: bool = False,
    launch: Launch = DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One of the norm ops (``OP_CODES``) on the simulated GPU; writes ``grads`` in place.

    Returns:
        (norms, max_abs, nonfinite, total) as the CUDA op returns them.
    """
    return torch.ops.gradstab_sim.norm(
        OP_CODES[op], grads, bound, bound_on_device, norm_type, eps, *launch.args()
    )


def agc(
    grads: list[torch.Tensor],
    params: list[torch.Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
    norm_type: float = 2.0,
    *,
    launch: Launch = DEFAULT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """adaptive_clip on the simulated GPU; writes ``grads`` in place.

    Returns:
        (norms, clipped, nonfinite, total) as the CUDA op returns them.
    """
    return torch.ops.gradstab_sim.agc(grads, params, clip_factor, eps, norm_type, *launch.args())


def last_stats() -> dict[str, int]:
    """Counters of the last call: launches, warps, collectives, checked loads and stores."""
    names = ("launches", "warps", "collectives", "loads", "stores", "vec_loads", "vec_stores")
    return dict(zip(names, torch.ops.gradstab_sim.last_stats()))


def last_log() -> list[str]:
    """The launch sequence of the last call, one line per launch (``reduce grid 3``, ...)."""
    return torch.ops.gradstab_sim.last_log().splitlines()


def convert(x: torch.Tensor, kind: int) -> torch.Tensor:
    """The stand-in conversions: 0 float32 -> float16 bits, 1 -> bfloat16 bits, 2 back."""
    return torch.ops.gradstab_sim.convert(x, kind)


def selftest(which: int, schedule: str = "in_order") -> str:
    """The simulator's report on a small kernel with fault ``which`` ("" when it finds none):
    0 none, 1 out of bounds, 2 misaligned vector load, 3 store to read-only memory, 4 a lane
    returning before a shuffle, 5 lanes at different collectives, 6 a partial mask."""
    return torch.ops.gradstab_sim.selftest(which, SCHEDULES[schedule])


# ------------------------------------------------------------------ ThreadSanitizer build --

#: The torch-free driver and what it links: the kernels, the plans, the simulator.
TSAN_SOURCES = [
    SIM_DIR / "tsan_driver.cpp",
    SIM_DIR / "runtime.cpp",
    SIM_DIR / "sim_device.cpp",
    SIM_DIR / "sim_kernels.cpp",
    SIM_DIR / "sim_agc.cpp",
    *PLAN_SOURCES,
]
TSAN_FLAGS = ["-std=c++20", "-g1", "-fsanitize=thread", *CFLAGS]
#: ThreadSanitizer's options for the runs: exit status 66 on a report, every report printed.
TSAN_OPTIONS = "exitcode=66 halt_on_error=0 report_signal_unsafe=0"

_tsan_lock = threading.Lock()
_tsan_thread: threading.Thread | None = None
_tsan_result: list[Path | BaseException] = []


def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout


def _digest(paths, extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile(cxx: str, args: list[str], what: str) -> None:
    r = subprocess.run([cxx, *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"compiling {what} failed:\n{r.stderr[-6000:]}")


def tsan_usable() -> str:
    """ "" if a ThreadSanitizer program builds and runs here, else why not (e.g. the kernel's
    address-space layout, which some ThreadSanitizer versions cannot run under)."""
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler"
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "probe.cpp"
        src.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
        exe = Path(d) / "probe"
        r = subprocess.run(
            [cxx, "-fsanitize=thread", "-pthread", str(src), "-o", str(exe)],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            return f"{cxx} -fsanitize=thread cannot build a program: {r.stderr[-500:]}"
        r = subprocess.run([str(exe)], capture_output=True, text=True, check=False, timeout=60)
        if r.returncode != 0:
            return f"a ThreadSanitizer program does not run here: {r.stderr[-500:]}"
    return ""


def _build_tsan_driver() -> Path:
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    headers = [*SIM_DIR.rglob("*.h"), *(ROOT / "csrc" / "cuda").glob("*.cuh")]
    headers += [*(ROOT / "csrc" / "cuda").glob("*.h"), *(ROOT / "csrc" / "cuda").glob("*.cu")]
    headers += [*(ROOT / "csrc" / "common").glob("*.h")]
    key = _digest([*TSAN_SOURCES, *headers], " ".join(TSAN_FLAGS) + _compiler_version(cxx))
    out = BUILD_DIR / f"tsan-{key}"
    exe = out / "tsan_driver"
    if exe.exists():
        return exe
    for old in BUILD_DIR.glob("tsan-*"):  # builds of other sources: never used again
        shutil.rmtree(old, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in INCLUDES]
    jobs = []
    for src in TSAN_SOURCES:
        obj = out / (src.stem + ".o")
        jobs.append(([*TSAN_FLAGS, *includes, "-c", str(src), "-o", str(obj)], src.name, obj))
    with ThreadPoolExecutor(max_workers=max(1, min(2, os.cpu_count() or 1))) as ex:
        for f in [ex.submit(_compile, cxx, args, name) for args, name, _ in jobs]:
            f.result()
    tmp = out / f"tsan_driver.{os.getpid()}"
    _compile(
        cxx,
        ["-fsanitize=thread", "-pthread", *(str(o) for _, _, o in jobs), "-o", str(tmp)],
        "link",
    )
    tmp.replace(exe)
    return exe


def start_tsan_build() -> None:
    """Start building the ThreadSanitizer driver in the background (idempotent)."""
    global _tsan_thread

    def work():
        try:
            _tsan_result.append(_build_tsan_driver())
        except BaseException as exc:  # handed to the test that waits for the build
            _tsan_result.append(exc)

    with _tsan_lock:
        if _tsan_thread is None:
            _tsan_thread = threading.Thread(target=work, daemon=True)
            _tsan_thread.start()


def tsan_driver() -> Path:
    """The ThreadSanitizer build of csrc/testing/cuda_sim/tsan_driver.cpp (cached by a hash of
    its sources and flags under ``build/cuda_sim/``).

    Raises:
        RuntimeError: the build failed.
    """
    start_tsan_build()
    assert _tsan_thread is not None
    _tsan_thread.join()
    result = _tsan_result[0]
    if isinstance(result, BaseException):
        raise RuntimeError(f"the ThreadSanitizer build failed: {result}") from result
    return result


def run_tsan_driver(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the driver with ``args`` under :data:`TSAN_OPTIONS`."""
    env = {**os.environ, "TSAN_OPTIONS": TSAN_OPTIONS}
    return subprocess.run(
        [str(tsan_driver()), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env=env,
    )
