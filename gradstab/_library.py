"""The ``gradstab`` operator library: schemas, fake kernels and the pure-PyTorch fallback.

Every op is defined here, once, whether or not the compiled extension exists.
The compiled extension (``gradstab._C``) only adds kernels for the ``CPU`` (and,
when built, ``CUDA``) dispatch keys; the reference kernels in
:mod:`gradstab.reference` are registered under ``CompositeExplicitAutograd`` and
so serve every other device.  The fake kernels make the ops traceable by
``torch.compile`` and checkable by ``torch.library.opcheck``.

The norm-clipping ops take the gradients of one device as a list (any mix of float16,
bfloat16, float32 and float64) and return per-tensor statistics of the gradients
*as they were on entry*::

    (norms [T], max_abs [T], nonfinite [T] int64, total_norm [])

with floating results in float64 if any gradient is float64, float32 otherwise.
``adaptive_clip`` (unit-wise AGC) also takes the parameters, read only, and returns
``(norms [T], clipped [T] int64, nonfinite [T] int64, total_norm [])``.
``clip_with_norm`` measures nothing: it scales the gradients by
``min(1, max_norm / (total_norm + eps))`` for a total norm the caller measured (the second half
of ``torch.nn.utils.clip_grads_with_norm_``), writes nothing where that coefficient is 1, and
returns nothing.

Example:
    >>> import torch, gradstab
    >>> g = torch.tensor([3.0, 4.0])
    >>> torch.ops.gradstab.grad_stats([g], 2.0)[3]
    tensor(5.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradstab import reference

__all__ = ["OPS", "SCHEMAS"]

_STATS = "(Tensor norms, Tensor max_abs, Tensor nonfinite, Tensor total_norm)"

#: Op name -> schema; the single place the ops are declared.
SCHEMAS = {
    "grad_stats": f"grad_stats(Tensor[] grads, float norm_type) -> {_STATS}",
    "clip_norm": (
        "clip_norm(Tensor(a!)[] grads, Tensor max_norm, float norm_type, float eps, "
        f"bool error_if_nonfinite) -> {_STATS}"
    ),
    "clip_norm_per_layer": (
        "clip_norm_per_layer(Tensor(a!)[] grads, Tensor max_norm, float norm_type, "
        f"float eps) -> {_STATS}"
    ),
    "clip_value": (
        f"clip_value(Tensor(a!)[] grads, Tensor clip_value, float norm_type) -> {_STATS}"
    ),
    "normalize_per_layer": (
        "normalize_per_layer(Tensor(a!)[] grads, Tensor target_norm, float norm_type, "
        f"float eps) -> {_STATS}"
    ),
}

#: Scale by a given total norm (``gradstab.clip_grads_with_norm_``); ``total_norm`` is a
#: one-element tensor on the gradients' device (or the CPU), never read on the host elsewhere.
SCHEMAS["clip_with_norm"] = (
    "clip_with_norm(Tensor(a!)[] grads, Tensor max_norm, Tensor total_norm, float eps) -> ()"
)

#: Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021): ``params`` are read only.
#: Returns the gradients' pre-clip norms [T], the number of clipped units per gradient [T]
#: (int64), non-finite element counts [T] (int64) and the pre-clip total norm [].
SCHEMAS["adaptive_clip"] = (
    "adaptive_clip(Tensor(a!)[] grads, Tensor[] params, float clip_factor, float eps, "
    "float norm_type) -> (Tensor norms, Tensor clipped, Tensor nonfinite, Tensor total_norm)"
)

_REFERENCE = {
    "grad_stats": reference.grad_stats,
    "clip_norm": reference.clip_norm,
    "clip_norm_per_layer": reference.clip_norm_per_layer,
    "clip_value": reference.clip_value,
    "normalize_per_layer": reference.normalize_per_layer,
    "adaptive_clip": reference.adaptive_clip,
    "clip_with_norm": reference.clip_with_norm,
}

_lib = torch.library.Library("gradstab", "DEF")


def _fake_stats(grads: list[Tensor], *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    reference.check_grads(grads)  # a list mixing devices dispatches here (Meta): refuse it
    n = len(grads)
    device = grads[0].device if n else torch.device("cpu")
    rd = reference.result_dtype(grads)
    return (
        torch.empty((n,), dtype=rd, device=device),
        torch.empty((n,), dtype=rd, device=device),
        torch.empty((n,), dtype=torch.int64, device=device),
        torch.empty((), dtype=rd, device=device),
    )


def _fake_adaptive_clip(
    grads: list[Tensor], params: list[Tensor], clip_factor: float, eps: float, norm_type: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    reference.check_agc_args(grads, params, clip_factor, eps, norm_type)
    n = len(grads)
    device = grads[0].device if n else torch.device("cpu")
    rd = reference.result_dtype(grads)
    return (
        torch.empty((n,), dtype=rd, device=device),
        torch.empty((n,), dtype=torch.int64, device=device),
        torch.empty((n,), dtype=torch.int64, device=device),
        torch.empty((), dtype=rd, device=device),
    )


def _fake_clip_with_norm(
    grads: list[Tensor], max_norm: Tensor, total_norm: Tensor, eps: float
) -> None:
    reference.check_grads(grads)


_FAKE = {"adaptive_clip": _fake_adaptive_clip, "clip_with_norm": _fake_clip_with_norm}

for _name, _schema in SCHEMAS.items():
    _lib.define(_schema)
    _lib.impl(_name, _REFERENCE[_name], "CompositeExplicitAutograd")
    torch.library.register_fake(f"gradstab::{_name}", _FAKE.get(_name, _fake_stats), lib=_lib)

#: Op name -> ``torch.ops.gradstab.<name>.default`` (the resolved overload: no per-call lookup).
OPS = {name: getattr(torch.ops.gradstab, name).default for name in SCHEMAS}

#: The ops that write their first argument, the gradients (``Tensor(a!)[]``).
WRITING_OPS = tuple(name for name, schema in SCHEMAS.items() if "Tensor(a!)[] grads" in schema)


def register_version_bump() -> None:
    """Make every writing op bump the version counters of the gradients it was given.

    The compiled extension does this in C++ (csrc/common/version_counter.cpp); this Python twin is
    registered only when the extension is not loaded, so that the pure-PyTorch path follows the
    same rule (its in-place torch ops alone would bump only the gradients they write).
    """
    below = torch._C._after_ADInplaceOrView_keyset

    def make(op: torch._ops.OpOverload):
        def kernel(keyset, grads, *args):
            with torch._C._AutoDispatchBelowADInplaceOrView():
                out = op.redispatch(keyset & below, grads, *args)
            torch.autograd.graph.increment_version(grads)
            return out

        return kernel

    for name in WRITING_OPS:
        _lib.impl(name, make(OPS[name]), "ADInplaceOrView", with_keyset=True)
