"""The benchmark's modes, dtypes, default repeats and tolerances, and its error type.

Example:
    >>> from gradstab.tools.bench.config import MODES
    >>> "healthy" in MODES
    True
"""

import torch

AGC_MODES = ("agc", "agc-healthy")
ADAPTIVE_MODES = ("adaptive", "adaptive-zscore")
#: Modes that time an optimizer step (clip + fused AdamW step), not the clip alone.
STEP_MODES = ("fold",)
MODES = ("healthy", "clip", "stats", "value", *AGC_MODES, *ADAPTIVE_MODES, *STEP_MODES)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

#: Default timed rounds per set, chosen so ``--set all`` (fp32 and bf16, healthy and
#: clip) takes under ~3 minutes on a 2-core CPU VM; ``--repeats`` overrides.
DEFAULT_REPEATS = {"gpt2": 60, "resnet50": 150, "many-small": 300}
#: ``--quick``: a README smoke run (many-small and resnet50, fp32) in well under 30 s.
QUICK_SETS = ("many-small", "resnet50")
QUICK_REPEATS = {"gpt2": 10, "resnet50": 20, "many-small": 60}
DEFAULT_WARMUP = 3
QUICK_WARMUP = 2

#: Relative tolerance of the correctness check of the total norm (fp32 gradients).
NORM_RTOL = 1e-5


class BenchError(RuntimeError):
    """A check before timing failed; the benchmark is aborted."""
