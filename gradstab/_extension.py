"""Loading the compiled extension and reporting which kernel serves each device.

Importing ``gradstab._C`` registers the compiled kernels with the dispatcher.
Setting ``GRADSTAB_DISABLE_EXT=1`` in the environment before ``import gradstab``
skips it, so the pure-PyTorch kernels serve every device (the tests use this).
"""

from __future__ import annotations

import os
import warnings

import torch

from gradstab._library import register_version_bump

BUILD_COMMAND = "pip install --no-build-isolation ."
CUDA_BUILD_COMMAND = "GRADSTAB_FORCE_CUDA=1 pip install --no-build-isolation ."

_C = None
#: ``gradstab._C.cpu_fast_path`` (see gradstab.functional), or None without the extension.
cpu_fast_path = None
#: ``gradstab._C.cuda_fast_path``, or None unless the extension was built with CUDA kernels.
cuda_fast_path = None
#: ``gradstab._C.zscore_threshold`` / ``percentile_threshold``: the adaptive thresholds' rules
#: on a CPU state (see gradstab.adaptive), or None without the extension.
zscore_threshold = None
percentile_threshold = None
#: Their CUDA twins (one kernel launch each), or None unless built with CUDA kernels; the
#: percentile kernel serves histories of at most ``cuda_max_kernel_history`` values.
cuda_zscore_threshold = None
cuda_percentile_threshold = None
cuda_max_kernel_history = 0
#: ``{op name: code}`` of the two shortcuts, from the extension's one definition
#: (csrc/common/codes.h); empty without the extension (filled in place when it loads).
OP_CODES: dict[str, int] = {}
_load_error: str | None = None
_warned: set[str] = set()
#: Device types known to have a compiled kernel.  Only the positive answer is cached: the
#: extension registers its kernels once, when it is imported with gradstab, and never removes
#: them, so a type that has a kernel keeps it (a negative answer is asked again, ~5 us).
_has_kernel_cache: set[str] = set()


def _load() -> None:
    _import_extension()
    if _C is None:  # the C++ kernels bump version counters; the pure-PyTorch path needs this
        register_version_bump()


def _import_extension() -> None:
    global _C, _load_error, cpu_fast_path, cuda_fast_path, zscore_threshold, percentile_threshold
    global cuda_zscore_threshold, cuda_percentile_threshold, cuda_max_kernel_history
    if os.environ.get("GRADSTAB_DISABLE_EXT") == "1":
        _load_error = "disabled by GRADSTAB_DISABLE_EXT=1"
        return
    try:
        from gradstab import _C as ext  # noqa: PLC0415 - optional compiled module
    except ImportError as exc:
        package_dir = os.path.dirname(os.path.abspath(__file__))
        if os.path.exists(os.path.join(os.path.dirname(package_dir), "setup.py")):
            _load_error = (
                f"gradstab was imported from the source tree {package_dir}, which has no built "
                "extension (an installed copy is shadowed by it when you run from the "
                "repository root): build it in place with `pip install --no-build-isolation "
                "-e .`, or run from another directory"
            )
        else:
            _load_error = f"gradstab._C could not be imported ({exc})"
        return
    _C = ext
    cpu_fast_path = getattr(ext, "cpu_fast_path", None)
    cuda_fast_path = getattr(ext, "cuda_fast_path", None)
    zscore_threshold = getattr(ext, "zscore_threshold", None)
    percentile_threshold = getattr(ext, "percentile_threshold", None)
    cuda_zscore_threshold = getattr(ext, "cuda_zscore_threshold", None)
    cuda_percentile_threshold = getattr(ext, "cuda_percentile_threshold", None)
    cuda_max_kernel_history = int(getattr(ext, "CUDA_MAX_KERNEL_HISTORY", 0))
    OP_CODES.update(getattr(ext, "OP_CODES", {}))


def has_kernel(device_type: str) -> bool:
    """Whether a compiled kernel is registered for ``device_type`` ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("gradstab::grad_stats", key)


def backend_info() -> dict[str, dict[str, str]]:
    """Which kernel serves CPU and CUDA gradients, and why.

    Returns:
        ``{"cpu": {"kernel": ..., "reason": ...}, "cuda": {...}}`` where ``kernel``
        is ``"cpp"``, ``"cuda"`` or ``"reference"`` (pure PyTorch).

    Example:
        >>> import gradstab
        >>> gradstab.backend_info()["cpu"]["kernel"] in ("cpp", "reference")
        True
    """
    info: dict[str, dict[str, str]] = {}
    build = dict(_C.build_info()) if _C is not None else {}
    if has_kernel("cpu"):
        info["cpu"] = {
            "kernel": "cpp",
            "reason": f"gradstab._C loaded; C++ kernel running the {build.get('cpu_isa', '?')} "
            "code path",
        }
    else:
        reason = _load_error or "no CPU kernel registered"
        if "pip install" not in reason:
            reason += f"; build it with `{BUILD_COMMAND}`"
        info["cpu"] = {"kernel": "reference", "reason": reason}
    if has_kernel("cuda"):
        info["cuda"] = {"kernel": "cuda", "reason": "gradstab._C built with CUDA kernels"}
    elif _C is not None:
        why = (
            "gradstab._C was built without CUDA kernels (torch without CUDA or no CUDA "
            "toolkit at build time, or no CUDA kernel sources yet)"
        )
        info["cuda"] = {
            "kernel": "reference",
            "reason": f"{why}; rebuild with `{CUDA_BUILD_COMMAND}`",
        }
    else:
        info["cuda"] = {"kernel": "reference", "reason": _load_error or "no CUDA kernel"}
    if not torch.cuda.is_available():
        info["cuda"]["reason"] += " (no CUDA device visible)"
    return info


def warn_if_fallback(device: torch.device, stacklevel: int = 3) -> None:
    """Warn once per device type when the pure-PyTorch kernel serves it.

    ``stacklevel`` is passed to ``warnings.warn``: the default points at the caller of the
    public function that calls this directly; a helper one level deeper passes 4.
    """
    kind = device.type
    if kind in _has_kernel_cache:
        return
    if torch.compiler.is_compiling():
        return  # traced code: warnings are for eager calls, and tracing needs no dispatcher query
    if kind in _warned or kind not in ("cpu", "cuda"):
        return
    if has_kernel(kind):  # a dispatcher query (~5 us): asked until the answer is yes
        _has_kernel_cache.add(kind)
        return
    _warned.add(kind)
    if os.environ.get("GRADSTAB_DISABLE_EXT") == "1":
        return
    command = CUDA_BUILD_COMMAND if kind == "cuda" else BUILD_COMMAND
    warnings.warn(
        f"gradstab: no compiled {kind.upper()} kernel ({_load_error or 'not built'}); using the "
        f"slower pure-PyTorch kernels. Build the extension with `{command}` "
        "(see gradstab.backend_info()).",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


_load()
