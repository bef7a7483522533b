"""``python -m gradstab demo``: vanishing and exploding gradients, diagnosed and fixed.

Five runs train one after the other on the same generated data with the same seed, each in a
Lightning ``Trainer`` with a progress bar and one :class:`gradstab.GradStabCallback` that keeps
the run's gradient history (``history=``; monitor-only, ``mode=None``, in the runs that do not
clip) and diagnoses it at the end of ``fit``:

(a) a deep sigmoid MLP with PyTorch's default initialisation: the per-layer gradient norms
    collapse toward the input and the net does not learn; the diagnosis says *vanishing*;
(b) the same MLP fixed: ReLU, :func:`gradstab.init.init_model_` and LayerNorm layers inserted
    by :func:`gradstab.norm.add_normalization_`: healthy, it learns;
(c) a deep ReLU MLP initialised too large (weight std ``2 / sqrt(fan_in)``, twice He's
    variance): without clipping the first SGD steps blow the weights up and the loss becomes
    NaN; the diagnosis says *exploding* and *non-finite*;
(d) the same net, the same initial weights, with :class:`gradstab.GradStabCallback`: the
    total gradient norm is clipped to ``--max-norm`` and non-finite steps would be skipped; it
    trains;
(e) the same again with an adaptive threshold, :class:`gradstab.PercentileThreshold`
    (AutoClip: the ``--percentile``-th percentile of the norms seen so far) under a hard cap of
    ``--max-norm``.  The cap does the clipping while the norms are large (every adaptive rule
    tried lets this net blow up without one); the percentile takes over once the norms have
    come down.  The table shows the range of thresholds it used.

Every number printed comes from these runs: per run a table (final training loss, validation
accuracy, smallest and largest per-layer gradient norm, steps clipped and skipped, the clip
threshold, the verdict of :func:`gradstab.diagnose` and its prescriptions), then a comparison
whose last column gives the prescriptions of (a) and (c) and which of them (b), (d) and (e)
apply.  With matplotlib
installed, a per-layer gradient-norm heatmap and a total-norm curve per run go to ``--out``.

Needs ``lightning`` (``pip install "gradstab[demo]"``); matplotlib is optional.  The models
and the data are small: the default settings take well under two minutes on two CPU cores.
The model builders and the data are public (:func:`make_data`, :func:`sigmoid_mlp`,
:func:`fixed_mlp`, :func:`exploding_mlp`) for the scripts in ``examples/``.

Example:
    $ python -m gradstab demo
    $ python -m gradstab demo --tiny --no-plots --runs a,b
"""

from gradstab.tools.demo.command import add_arguments, config_from_args, run, run_demo
from gradstab.tools.demo.models import exploding_mlp, fixed_mlp, make_data, mlp, sigmoid_mlp
from gradstab.tools.demo.output import comparison_table, conclusions, run_table
from gradstab.tools.demo.runs import (
    RUNS,
    DemoConfig,
    DemoResults,
    RunInfo,
    RunResult,
    adaptive_threshold,
    train_run,
    verdict,
)

__all__ = [
    "RUNS",
    "DemoConfig",
    "DemoResults",
    "RunInfo",
    "RunResult",
    "adaptive_threshold",
    "add_arguments",
    "comparison_table",
    "conclusions",
    "config_from_args",
    "exploding_mlp",
    "fixed_mlp",
    "make_data",
    "mlp",
    "run",
    "run_demo",
    "run_table",
    "sigmoid_mlp",
    "train_run",
    "verdict",
]
