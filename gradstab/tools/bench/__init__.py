"""``python -m gradstab bench``: time gradstab against PyTorch and a memory-bandwidth floor.

Modules: :mod:`.sets` (parameter sets), :mod:`.config` (modes, repeats), :mod:`.timing`
(timer, rounds, result rows), :mod:`.modes` (contestants and checks per mode), :mod:`.runner`
(:func:`bench_one`), :mod:`.cuda` (GPU-only additions), :mod:`.table`, :mod:`.command`
(options and the run), :mod:`.train` (``--train``: a Lightning training loop).

Gradient sets are built from the published shapes of real models (GPT-2 small,
ResNet-50) plus a set of 1,000 small tensors, filled with ``torch.randn`` (never
zeros) and attached as ``.grad`` of ``nn.Parameter`` objects.  For every set, dtype
and mode, all contestants run in the same process, interleaved round-robin (one call
of each per round, the starting contestant rotating from round to round) so that a
noisy machine slows them all alike.  The table reports medians and interquartile
ranges of the timed rounds, the ratio ``torch_median / gradstab_median`` and the
fraction of the floor ``floor_ms / gradstab_median``, where the floor is the least
memory traffic the mode needs, timed on a flat buffer of the same number of bytes: one
read (``healthy``, ``stats``), one read+write (``value``), or one read plus one
read+write (``clip``, which must know the norm before it writes).

Modes:
    ``healthy``: ``clip_grad_norm_`` with ``max_norm = 1e6 x`` the total norm
    (nothing is clipped).  ``clip``: ``max_norm = 0.5 x`` the initial total norm;
    after each timed call an untimed ``torch._foreach_mul_(grads, 2.0)`` restores the
    scale, so every repeat really clips.  ``stats``: ``gradstab.grad_stats`` against
    ``torch._foreach_norm`` alone (and Lightning's ``grad_norm`` when installed).
    ``value``: ``clip_grad_value_`` at the 99.9th percentile of ``|g|``; the few
    clamped elements are restored (untimed) after each call.
    ``agc``: ``gradstab.adaptive_clip_grad_`` (unit-wise AGC, clip factor 0.01, on
    ``randn`` weights) against the per-parameter PyTorch loop of timm's
    ``adaptive_clip_grad`` (the same formula); every unit is clipped, and the gradients
    are restored (untimed) after each call.  ``agc-healthy``: the same with clip factor
    1000, so no unit is clipped.  The floor of AGC reads the weights as well: one read
    plus one read+write (``agc``), two reads (``agc-healthy``).
    ``adaptive``: a healthy step clipped with an adaptive threshold,
    ``gradstab.adaptive.clip_(params, PercentileThreshold(90, history=1000,
    include_current=False))`` (an AutoClip-style percentile, the bound known before the step:
    one fused pass), against the same healthy step with a fixed threshold
    (``gradstab.clip_grad_norm_``): the ratio (fixed / adaptive, < 1 when adaptive is slower)
    is the price of adapting.  The history is primed with 1,000 norms ten times the real one,
    so the step stays healthy for the first 901 calls.  ``adaptive-zscore``: the same with
    ``ZScoreThreshold()`` (ZClip's defaults; its rule judges this step's norm, so it measures
    it first: two reads), primed with norms 0.9x and 1.1x the real one.
    ``fold``: a whole clip + optimizer step with ``AdamW(fused=True)`` (lr 1e-6, on
    ``randn`` weights), ``max_norm = 0.5 x`` the total norm, four ways on one optimizer:
    ``GradStabOptimizer`` with the clip folded into the fused step (``fold=True``: one read,
    the coefficient in ``grad_scale``), the same with the explicit clip (``fold=False``: one
    read, one read+write, then the step), ``torch.nn.utils.clip_grad_norm_`` then the step,
    and the unclipped step alone; the gradients are restored (untimed) after each clipped
    call. Its floor is the unclipped step plus one read; "torch/gradstab" of the explicit row
    is explicit / folded.

On CUDA (``--device cuda``; CUDA events time each call) three things are added, and the CPU
run is unchanged: the ``llama1b`` set (Llama 3.2 1B, 1.24 B parameters; timed by default only on
CUDA, on the CPU only when named); rotated inputs: a set smaller than 3x the GPU's L2 cache is
timed on several identical copies (at most 16), cycled call by call, so that every call reads
gradients the previous calls evicted from L2, as a training step does (gradstab's CUDA
descriptor-table cache holds 32 lists of gradients, so every copy stays a cache hit, and the
warm-up covers every copy); and a summary of achieved bandwidth (the least traffic of the mode
over the median time) against the flat-buffer floor of the same run, with the project's
targets. The direct C++ entry ``gradstab._C.cuda_fast_path`` is timed as an extra row when the
extension has it.

Example:
    $ python -m gradstab bench --quick
    $ python -m gradstab bench --set gpt2 --dtype fp32,bf16 --mode clip --json out.json
    $ python -m gradstab bench --device cuda --set gpt2,many-small,llama1b --mode healthy,clip
"""

from gradstab.tools.bench.command import add_arguments, run
from gradstab.tools.bench.config import MODES, BenchError
from gradstab.tools.bench.cuda import cuda_summary, rotation_copies
from gradstab.tools.bench.modes import primed_threshold, timm_style_agc
from gradstab.tools.bench.runner import bench_one
from gradstab.tools.bench.sets import (
    GPU_SETS,
    PARAM_SETS,
    gpt2_small_shapes,
    llama32_1b_shapes,
    many_small_shapes,
    resnet50_shapes,
)
from gradstab.tools.bench.table import format_table
from gradstab.tools.bench.timing import Result

__all__ = [
    "GPU_SETS",
    "MODES",
    "PARAM_SETS",
    "BenchError",
    "Result",
    "add_arguments",
    "bench_one",
    "cuda_summary",
    "format_table",
    "gpt2_small_shapes",
    "llama32_1b_shapes",
    "many_small_shapes",
    "primed_threshold",
    "resnet50_shapes",
    "rotation_copies",
    "run",
    "timm_style_agc",
]
