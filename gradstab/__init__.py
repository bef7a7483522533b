"""gradstab: fused gradient statistics and clipping against exploding and vanishing gradients.

Example:
    >>> import torch, gradstab
    >>> model = torch.nn.Linear(4, 2)
    >>> model(torch.randn(8, 4)).sum().backward()
    >>> total = gradstab.clip_grad_norm_(model.parameters(), max_norm=1.0)
"""

import importlib.util

from gradstab import (
    _library,  # noqa: F401  (defines the ops before the extension registers kernels)
    distributed,
    init,
    norm,
)
from gradstab._extension import backend_info
from gradstab._version import __version__
from gradstab.adaptive import PercentileThreshold, ZScoreThreshold
from gradstab.diagnosis import Diagnosis, GradHistory, HistoryData, diagnose
from gradstab.functional import (
    AGCStats,
    GradStats,
    adaptive_clip_grad_,
    agc_unit_dims,
    clip_grad_norm_,
    clip_grad_norm_per_layer_,
    clip_grad_value_,
    clip_grads_with_norm_,
    get_total_norm,
    grad_stats,
    normalize_grad_per_layer_,
)
from gradstab.optimizer import GradStabOptimizer

__all__ = [
    "AGCStats",
    "Diagnosis",
    "GradHistory",
    "GradStabOptimizer",
    "GradStats",
    "HistoryData",
    "PercentileThreshold",
    "ZScoreThreshold",
    "__version__",
    "adaptive_clip_grad_",
    "agc_unit_dims",
    "backend_info",
    "clip_grad_norm_",
    "clip_grad_norm_per_layer_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "diagnose",
    "distributed",
    "get_total_norm",
    "grad_stats",
    "init",
    "norm",
    "normalize_grad_per_layer_",
]
if importlib.util.find_spec("lightning") is not None:
    __all__.append("GradStabCallback")  # lightning is an optional extra


def __getattr__(name: str) -> object:
    # GradStabCallback needs lightning, an optional extra: imported on first use only.
    if name == "GradStabCallback":
        try:
            from gradstab.callback import GradStabCallback  # noqa: PLC0415
        except ModuleNotFoundError as exc:
            if exc.name is None or not exc.name.startswith("lightning"):
                raise
            raise ImportError(
                "gradstab.GradStabCallback needs Lightning: pip install 'lightning>=2.2' "
                "(or gradstab[lightning]); gradstab.GradStabOptimizer works without it"
            ) from exc
        return GradStabCallback
    raise AttributeError(f"module 'gradstab' has no attribute {name!r}")
