"""The unit axis of adaptive gradient clipping: which dimension of a weight holds its units.

AGC (:func:`gradstab.adaptive_clip_grad_`) bounds each *unit*'s gradient by the norm of that
unit's weights; a unit is one output unit of a layer (a row of a ``torch.nn.Linear`` weight, an
output channel of a convolution).  Most PyTorch layers put the output axis first, so dim 0 is
the default; some do not, and there AGC along dim 0 would clip per *input* unit, silently:

====================================================================  ======================  ====
layer                                                                 weight                  axis
====================================================================  ======================  ====
``nn.Linear``, ``nn.Bilinear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``  ``[out, ...]``          0
(a row per token), RNN/LSTM/GRU weights, ``MultiheadAttention``
``in_proj_weight``, anything not listed here
``nn.ConvTranspose1d/2d/3d``                                          ``[in, out/groups, k]``  1
Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's           ``[in, out]``            1
attention and MLP projections)
====================================================================  ======================  ====

:func:`agc_unit_dims` walks a module and gives the unit axis of each of its parameters by
those rules: a module of class ``torch.nn.modules.conv._ConvTransposeNd``, or one whose class
is named ``Conv1D`` and whose ``nf`` attribute equals its 2-D weight's ``shape[1]`` (how
transformers defines it; transformers itself is not imported).  With ``groups > 1`` a transposed
convolution's dim-1 slice holds one output channel of every group: a unit is then ``groups``
output channels.  :func:`unit_dims` resolves the ``unit_dim`` argument of
:func:`gradstab.adaptive_clip_grad_` (an int, a mapping, or a callable).

Example:
    >>> import torch, gradstab
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ConvTranspose1d(3, 2, 5))
    >>> dims = gradstab.agc_unit_dims(model)
    >>> [dims[p] for p in model.parameters()]  # Linear weight, bias; ConvTranspose weight, bias
    [0, 0, 1, 0]
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["UnitDim", "agc_unit_dims", "unit_axis_first", "unit_dims"]

#: What ``adaptive_clip_grad_(..., unit_dim=)`` takes: one axis for every parameter, a mapping
#: ``{parameter: axis}`` (parameters not in it: 0), or a callable ``parameter -> axis or None``.
UnitDim = Union[int, Mapping[Tensor, int], Callable[[Tensor], Optional[int]]]


def _module_unit_dim(module: torch.nn.Module) -> int:
    """The unit axis of ``module``'s weight (0 unless its layout is known to differ)."""
    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        return 1
    weight = getattr(module, "weight", None)
    if (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, Tensor)
        and weight.dim() == 2
        and getattr(module, "nf", None) == weight.shape[1]
    ):
        return 1
    return 0


def agc_unit_dims(module: torch.nn.Module) -> dict[Tensor, int]:
    """The AGC unit axis of every parameter of ``module``, by the layout of its layer.

    ``1`` for the weights of transposed convolutions and of Hugging Face ``Conv1D`` layers
    (``[in, out]``), ``0`` for every other parameter (see the table in
    :mod:`gradstab.agc_units`).  Pass the result as ``unit_dim`` to
    :func:`gradstab.adaptive_clip_grad_`; compute it once (it does not change while the
    parameters stay the same objects).

    Args:
        module: the model.

    Returns:
        ``{parameter: axis}`` for every parameter (keyed by the tensor itself).

    Raises:
        ValueError: a parameter shared by two layers whose layouts disagree.

    Example:
        >>> import torch, gradstab
        >>> class Conv1D(torch.nn.Module):  # the layout of transformers' Conv1D
        ...     def __init__(self, nf, nx):
        ...         super().__init__()
        ...         self.nf = nf
        ...         self.weight = torch.nn.Parameter(torch.zeros(nx, nf))
        >>> layer = Conv1D(nf=6, nx=4)
        >>> gradstab.agc_unit_dims(layer)[layer.weight]
        1
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"gradstab.agc_unit_dims: module must be a torch.nn.Module, got {type(module).__name__}"
        )
    dims: dict[Tensor, int] = {}
    owner: dict[int, str] = {}
    for mod_name, mod in module.named_modules():
        axis = _module_unit_dim(mod)
        for name, q in mod.named_parameters(recurse=False):
            d = axis if name == "weight" and q.dim() >= 2 else 0
            full = f"{mod_name}.{name}" if mod_name else name
            if q in dims and dims[q] != d:
                raise ValueError(
                    f"gradstab.agc_unit_dims: parameter {full!r} is shared with "
                    f"{owner[id(q)]!r}, whose layer has its units on dim {dims[q]}, but this "
                    f"layer has them on dim {d}; pass unit_dim explicitly"
                )
            dims[q] = d
            owner.setdefault(id(q), full)
    return dims


def unit_dims(params: Sequence[Tensor], unit_dim: UnitDim, fn: str) -> list[int]:
    """The unit axis of each parameter, from ``unit_dim``, as a non-negative int.

    0-/1-D parameters get 0 (they are one unit).  For the others the axis given (negative
    counts from the end) must lie in ``[-ndim, ndim)``.

    Raises:
        TypeError: ``unit_dim`` is not an int, a mapping keyed by tensors or a callable, or
            an axis is not an int.
        ValueError: an axis out of range (naming the parameter's position and shape).

    Example:
        >>> import torch
        >>> from gradstab.agc_units import unit_dims
        >>> unit_dims([torch.zeros(3, 4), torch.zeros(3)], -1, "demo")
        [1, 0]
    """
    if isinstance(unit_dim, numbers.Integral) and not isinstance(unit_dim, bool):
        if int(unit_dim) == 0:
            return [0] * len(params)

        def pick(q: Tensor) -> object:
            return unit_dim

    elif isinstance(unit_dim, Mapping):
        if unit_dim and not any(isinstance(k, Tensor) for k in unit_dim):
            raise TypeError(
                f"{fn}: unit_dim as a mapping must be keyed by the parameters themselves "
                f"(e.g. gradstab.agc_unit_dims(model)), got keys such as {next(iter(unit_dim))!r}"
            )

        def pick(q: Tensor) -> object:
            return unit_dim.get(q)  # type: ignore[union-attr]

    elif callable(unit_dim):
        pick = unit_dim  # type: ignore[assignment]
    else:
        raise TypeError(
            f"{fn}: unit_dim must be an int, a mapping {{parameter: dim}} or a callable "
            f"parameter -> dim, got {unit_dim!r}"
        )
    out = []
    for i, q in enumerate(params):
        if q.dim() < 2:
            out.append(0)
            continue
        d = pick(q)
        if d is None:
            out.append(0)
            continue
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(
                f"{fn}: unit_dim for parameter {i} (shape {list(q.shape)}) must be an int, "
                f"got {d!r}"
            )
        n = q.dim()
        if not -n <= int(d) < n:
            raise ValueError(
                f"{fn}: unit_dim for parameter {i} (shape {list(q.shape)}) must be an int in "
                f"[{-n}, {n}), got {d!r}"
            )
        out.append(int(d) % n)
    return out


def unit_axis_first(
    grads: Sequence[Tensor], weights: Sequence[Tensor], dims: Sequence[int]
) -> tuple[list[Tensor], list[Tensor]]:
    """The gradients and weights as ``adaptive_clip`` takes them (dim 0 is the unit axis):
    ``transpose(0, d)`` views where a parameter's unit axis ``d`` (from :func:`unit_dims`) is
    not 0.

    Example:
        >>> import torch
        >>> from gradstab.agc_units import unit_axis_first
        >>> gs, ws = unit_axis_first([torch.zeros(3, 4)], [torch.ones(3, 4)], [1])
        >>> gs[0].shape, ws[0].shape
        (torch.Size([4, 3]), torch.Size([4, 3]))
    """
    gs = [g.transpose(0, d) if d else g for g, d in zip(grads, dims)]
    ws = [w.transpose(0, d) if d else w for w, d in zip(weights, dims)]
    return gs, ws
