"""The training path's eager shortcut: a step whose whole clip is one op on one device goes
through ``gradstab._C.cpu_fast_path`` / ``cuda_fast_path``, as :mod:`gradstab.functional` does.

The compiled shortcut reads ``p.grad`` in C++ and runs the op without the dispatcher's boxing
of a ``Tensor[]`` (about 0.3-0.4 us per tensor) and without a Python loop over ``p.grad``
(about 0.1-0.15 us per parameter): for a thousand small parameters those two were most of a
:class:`~gradstab.GradStabOptimizer` step's clipping time.  The shortcut applies when the plan
is one unit with one part on one device, with a fixed bound (or none: monitoring), a mode whose
op the shortcut serves (``"norm"``, ``"layer"``, ``"value"``, ``"normalize"`` per tensor, or
statistics only), no sharding, no fold, no AMP scale to fold into the bound, and not under
``torch.compile``.  Otherwise (and whenever the compiled shortcut declines: subclasses, modes,
gradients not dense, none at all) the caller takes :func:`~gradstab._clipping.parts.run_unit`,
which gives the same results.

The gradients are listed in Python only if something asks for them (:class:`LazyGrads`): the
``"zero"`` policy, history extras.  The names of the statistics' rows are the part's names
when every parameter has a gradient (the op returns one row per gradient), else listed.

Example:
    >>> import torch
    >>> from gradstab._clipping import build_plan, make_config
    >>> from gradstab._clipping.shortcut import eligible
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> cfg = make_config("demo", mode="norm", max_norm=1.0)
    >>> eligible(build_plan(cfg, [{"params": [w]}], {}, None, "demo")) is not None
    True
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from gradstab import _extension
from gradstab._clipping.parts import _KERNEL_CHECKED, Part, _bound_tensor, _part_grads
from gradstab._clipping.plan import Plan, Unit
from gradstab._common import EPS
from gradstab._extension import OP_CODES, warn_if_fallback

# the op each shortcut-served part kind runs (kinds not here take the dispatcher path)
_OPS = {
    "stats": "grad_stats",
    "norm": "clip_norm",
    "layer": "clip_norm_per_layer",
    "value": "clip_value",
    "normalize": "normalize_per_layer",
}


class LazyGrads(Sequence):
    """``Part.grads`` of a shortcut step: one list (one device) of the parameters' gradients,
    made from ``p.grad`` on first use."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self._params = params
        self._lists: list[list[Tensor]] | None = None

    def _made(self) -> list[list[Tensor]]:
        if self._lists is None:
            self._lists = [[q.grad for q in self._params if q.grad is not None]]
        return self._lists

    def __getitem__(self, i):  # type: ignore[override]
        return self._made()[i]

    def __len__(self) -> int:
        return 1

    def __iter__(self) -> Iterator[list[Tensor]]:
        return iter(self._made())


def eligible(plan: Plan) -> tuple[Unit, torch.device, list[str], list[Tensor]] | None:
    """``(unit, device, names, params)`` when the plan's clip is one op on one device, else
    ``None`` (cached in the plan)."""
    cached = plan.cache.get("shortcut", False)
    if cached is not False:
        return cached
    out = None
    if not plan.sharded and len(plan.units) == 1:
        unit = plan.units[0]
        fixed = unit.bound is None or isinstance(unit.bound, float)
        if fixed and unit.kind in _OPS and len(unit.by_device) == 1:
            groups = unit.by_device[0]
            if len(groups) == 1 and groups[0][0].type in ("cpu", "cuda"):
                d, _, names, params = groups[0]
                out = (unit, d, names, params)
    plan.cache["shortcut"] = out
    return out


def run(plan: Plan, p: float, *, check: bool) -> Part | None:
    """The step's one part through the compiled shortcut, or ``None`` (nothing read or
    written) when it does not apply; the caller then takes the dispatcher path.

    ``check``: the ``"raise"`` policy; served for ``"norm"`` only, whose kernel refuses a
    non-finite total before writing anything (``RuntimeError``); other modes need a read-only
    check before their write, which the dispatcher path makes.
    """
    target = eligible(plan)
    if target is None or torch.compiler.is_compiling():
        return None
    unit, d, names, params = target
    if check and unit.kind != "norm":
        return None
    fast = _extension.cpu_fast_path if d.type == "cpu" else _extension.cuda_fast_path
    if fast is None:
        return None
    kind = unit.kind
    bound = unit.bound
    b = 0.0 if bound is None else bound
    assert isinstance(b, float)
    if d not in _KERNEL_CHECKED:
        warn_if_fallback(d)
        _KERNEL_CHECKED.add(d)
    out = fast(OP_CODES[_OPS[kind]], params, p, b, EPS, check)
    if out is None:
        return None
    stats = out
    if stats[0].shape[0] != len(params):  # some parameters have no gradient: name the rows
        names = _part_grads(unit, 0)[0][2]
    grads = LazyGrads(params)
    if bound is None:
        return Part(kind, names, grads, stats, None, None, None)  # type: ignore[arg-type]
    shown = _bound_tensor(b, d)
    above = shown if kind == "value" else _bound_tensor(b - EPS, d)
    return Part(kind, names, grads, stats, shown, above, None, shown)  # type: ignore[arg-type]


def host_flags(part: Part) -> tuple[bool, bool]:
    """``(non-finite, clipped)`` of a part on the CPU, read on the host (free there).

    A NaN/Inf gradient element makes the total norm non-finite for every ``p``, so the counts
    are read only when the total is not finite (it may also be a finite gradient whose norm
    overflows).
    """
    norms, second, counts, total = part.stats
    t = float(total)
    nonfinite = not math.isfinite(t) and bool(counts.any())
    kind = part.kind
    if kind == "stats" or part.above is None:
        clipped = False
    elif kind == "norm":
        clipped = t > float(part.above)
    elif kind == "value":
        clipped = bool(torch.gt(second, part.above).any())
    else:  # "layer", "normalize": any gradient above the bound
        clipped = bool(torch.gt(norms, part.above).any())
    return nonfinite, clipped
