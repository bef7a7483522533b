"""Gradients on several devices in one call (model parallelism in one process).

``torch.nn.utils`` groups gradients by device, computes each group's norms on its device and
combines them on the first gradient's device; gradstab's functions do the same with one fused op
per device (:func:`gradstab._common.by_device` makes the groups):

- :func:`combined_stats`: per-tensor statistics in input order and the total norm, combined in
  float64 from the per-tensor norms (``norm_type <= 0`` measured in PyTorch, on every device);
- :func:`clip_by_total`: every group scaled by the coefficient of one total norm
  (``torch.ops.gradstab.clip_with_norm``, which writes nothing where the coefficient is 1);
- :func:`in_order`: per-group results put back in the order of the gradients.

Nothing here reads a device value on the host, but a copy between devices may wait: with
gradients on the CPU and on a GPU, the CPU's group needs the total (on the first gradient's
device) on the CPU, as in torch.  Each device's norms are rounded to its result dtype before
they are combined (float32 unless that device holds a float64 gradient): with float64
gradients on one device and others elsewhere, the total is accurate to float32 rounding.

Example:
    >>> import torch
    >>> from gradstab._common import by_device
    >>> from gradstab._devices import combined_stats
    >>> g = [torch.tensor([3.0]), torch.tensor([4.0])]
    >>> combined_stats(g, 2.0, by_device(g)).total_norm
    tensor(5.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from gradstab import reference
from gradstab._common import EPS, GradStats
from gradstab._extension import warn_if_fallback
from gradstab._library import OPS

__all__ = ["Groups", "clip_by_total", "combined_stats", "in_order", "moved_bound"]

_F64 = torch.float64

#: ``(device, positions)`` of the gradients on each device, as :func:`by_device` makes them.
Groups = list[tuple[torch.device, list[int]]]


def moved_bound(checked: float | Tensor, device: torch.device) -> Tensor:
    """A checked bound on ``device``, for gradients on several devices (a copy, no host read)."""
    if isinstance(checked, Tensor):
        return checked.to(device, _F64)
    return torch.full((), checked, dtype=_F64, device=device)


def in_order(
    parts: list[Tensor], groups: Groups, device: torch.device, dtype: torch.dtype
) -> Tensor:
    """Per-group 1-D results put back in input order, as one tensor on ``device``.

    Made of slices of the parts (no index tensor to copy to the device): one slice per run of
    consecutive gradients on one device.
    """
    if len(groups) == 1:
        return parts[0].to(device, dtype)
    where: dict[int, tuple[int, int]] = {}
    for k, (_, ix) in enumerate(groups):
        for j, i in enumerate(ix):
            where[i] = (k, j)
    pieces: list[list[int]] = []  # [group, start, stop]
    for i in range(len(where)):
        k, j = where[i]
        if pieces and pieces[-1][0] == k:  # (then j follows the piece's last position)
            pieces[-1][2] = j + 1
        else:
            pieces.append([k, j, j + 1])
    return torch.cat([parts[k][a:b].to(device, dtype) for k, a, b in pieces])


def combined_stats(grads: list[Tensor], p: float, groups: Groups) -> GradStats:
    """The statistics of ``grads``: one read per device, combined on the first gradient's device.

    Per-tensor fields in input order; the total is the p-norm of the per-tensor norms (in
    float64), as ``torch.nn.utils.get_total_norm`` combines them.  ``p <= 0`` is computed in
    PyTorch (:func:`gradstab.reference.grad_stats`), on every device.
    """
    parts = []
    for d, ix in groups:
        gs = [grads[i] for i in ix]
        if p > 0:
            warn_if_fallback(d, stacklevel=4)  # for the caller of the public function
            parts.append(OPS["grad_stats"](gs, p))
        else:
            parts.append(reference.grad_stats(gs, p, nonpositive=True))
    if len(parts) == 1:
        return GradStats(*parts[0])
    d0 = grads[0].device
    rd = reference.result_dtype(grads)
    norms = in_order([s[0] for s in parts], groups, d0, _F64)
    return GradStats(
        norms.to(rd),
        in_order([s[1] for s in parts], groups, d0, rd),
        in_order([s[2] for s in parts], groups, d0, torch.int64),
        reference.pnorm64(norms, p).to(rd),
    )


def clip_by_total(
    grads: list[Tensor], groups: Groups, bound: float | Tensor, total: Tensor
) -> None:
    """Scale every gradient by ``min(1, bound / (total + eps))``: one op per device, which writes
    nothing where the coefficient is 1 (on CUDA the pure-PyTorch kernel serves this op: it
    multiplies by 1 rather than read the coefficient on the host)."""
    for d, ix in groups:
        gs = [grads[i] for i in ix]
        OPS["clip_with_norm"](gs, moved_bound(bound, d), total.to(d), EPS)
