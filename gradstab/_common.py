"""The bottom layer of gradstab: what several modules need, importing nothing else from gradstab.

Every layer may import this module; it imports only the standard library and torch, so it can
never close an import cycle (``tests/test_layout.py`` checks). What lives here is what would
otherwise be copied between layers:

- the statistics tuples the ops' results are returned as (:class:`GradStats`,
  :class:`AGCStats`);
- argument checks with one wording everywhere (:func:`check_norm_type`, :func:`check_bound`,
  :func:`check_flag`, :func:`check_foreach`, :func:`check_real`, :func:`check_int`);
- "parameters -> gradients" (:func:`param_list`, :func:`collect_grads`,
  :func:`consume_generator`, :func:`by_device`);
- DTensor detection without importing ``torch.distributed.tensor`` (:func:`is_dtensor`).

Example:
    >>> import torch
    >>> from gradstab._common import check_norm_type, collect_grads
    >>> w = torch.nn.Parameter(torch.zeros(2)); w.grad = torch.ones(2)
    >>> collect_grads([w, torch.nn.Parameter(torch.zeros(1))], "demo")
    [tensor([1., 1.])]
    >>> check_norm_type("inf", "demo")
    inf
"""

from __future__ import annotations

import math
import numbers
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple, Union

import torch
from torch import Tensor

__all__ = [
    "EMPTY_GENERATOR_MESSAGE",
    "EPS",
    "AGCStats",
    "GradStats",
    "TensorOrTensors",
    "by_device",
    "check_bound",
    "check_flag",
    "check_foreach",
    "check_int",
    "check_norm_type",
    "check_real",
    "collect_grads",
    "consume_generator",
    "is_dtensor",
    "param_list",
]

TensorOrTensors = Union[Tensor, Iterable[Tensor]]

#: The epsilon PyTorch adds to the total norm in ``clip_grad_norm_``.
EPS = 1e-6

#: The warning ``torch.nn.utils.clip_grad_norm_`` gives for a generator that yields nothing (an
#: exhausted ``model.parameters()``); gradstab's clipping functions give the same one.
EMPTY_GENERATOR_MESSAGE = "`parameters` is an empty generator, no gradient clipping will occur."


class GradStats(NamedTuple):
    """Per-tensor gradient statistics, all on the gradients' device.

    Attributes:
        norms: ``[T]`` p-norm of each gradient.
        max_abs: ``[T]`` largest absolute value of each gradient (NaN if it holds a NaN).
        nonfinite: ``[T]`` int64 count of NaN/Inf elements of each gradient.
        total_norm: ``[]`` p-norm of all gradients viewed as one vector.

    Floating fields are float64 if any gradient is float64, float32 otherwise.
    """

    norms: Tensor
    max_abs: Tensor
    nonfinite: Tensor
    total_norm: Tensor


class AGCStats(NamedTuple):
    """What :func:`gradstab.adaptive_clip_grad_` returns, all on the gradients' device.

    Attributes:
        norms: ``[T]`` p-norm of each gradient before clipping.
        clipped: ``[T]`` int64 number of units of each gradient that were clipped.
        nonfinite: ``[T]`` int64 count of NaN/Inf elements of each gradient.
        total_norm: ``[]`` p-norm of all gradients (as one vector) before clipping.

    Floating fields are float64 if any gradient is float64, float32 otherwise.  The number
    of units of a parameter ``p`` is ``p.shape[0]`` if ``p.dim() >= 2``, else 1.
    """

    norms: Tensor
    clipped: Tensor
    nonfinite: Tensor
    total_norm: Tensor


# ------------------------------------------------------------------------ parameters -> grads


def param_list(parameters: TensorOrTensors, fn: str) -> list[Tensor]:
    """``parameters`` (a tensor or an iterable of tensors) as a list, each item checked.

    Raises:
        TypeError: ``parameters`` is not iterable, or an item is not a tensor.
    """
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        params = list(parameters)
    except TypeError:
        raise TypeError(
            f"{fn}: parameters must be a tensor or an iterable of tensors, "
            f"got {type(parameters).__name__}"
        ) from None
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{fn}: parameters[{i}] is a {type(p).__name__}, not a tensor")
    return params


def consume_generator(parameters: TensorOrTensors, stacklevel: int = 3) -> TensorOrTensors:
    """A generator as a list (consumed once, here); anything else as it is.

    Warns, as ``torch.nn.utils.clip_grad_norm_`` does (same condition: a generator object,
    ``types.GeneratorType``, that yields nothing; same text), when the generator is empty: an
    exhausted ``model.parameters()``, or a generator passed a second time.

    Args:
        parameters: what the caller passed as ``parameters``.
        stacklevel: passed to ``warnings.warn``; the default points at the caller's caller
            (the user's call of a public function that calls this).
    """
    if isinstance(parameters, types.GeneratorType):
        params = list(parameters)
        if not params:
            warnings.warn(EMPTY_GENERATOR_MESSAGE, stacklevel=stacklevel)
        return params
    return parameters


def by_device(tensors: Sequence[Tensor]) -> list[tuple[torch.device, list[int]]]:
    """The positions of ``tensors`` grouped by device, devices in order of first appearance.

    One group (the common case) costs one pass of device comparisons.

    Example:
        >>> import torch
        >>> from gradstab._common import by_device
        >>> by_device([torch.zeros(1), torch.zeros(2)])
        [(device(type='cpu'), [0, 1])]
    """
    if not tensors:
        return []
    d0 = tensors[0].device
    if all(t.device == d0 for t in tensors):
        return [(d0, list(range(len(tensors))))]
    groups: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.device, []).append(i)
    return list(groups.items())


def collect_grads(parameters: TensorOrTensors, fn: str) -> list[Tensor]:
    """The gradients of ``parameters``, ``None`` skipped, in order.

    Kept lean (it runs on every step over every parameter): the items are type-checked only
    when reading ``.grad`` fails; dtype, layout and device are checked by the kernels before
    they touch anything.
    """
    if isinstance(parameters, Tensor):
        params = [parameters]
    else:
        try:
            params = list(parameters)
        except TypeError:
            param_list(parameters, fn)  # raises the TypeError
            raise
    grads: list[Tensor] = []
    try:
        for p in params:
            g = p.grad
            if g is not None:
                grads.append(g)
    except AttributeError:
        param_list(params, fn)  # names the item that is not a tensor
        raise
    return grads


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``: O(1), imports nothing.

    A plain tensor answers at once; otherwise the DTensor class is looked up only if its
    module was already imported by someone (no DTensor can exist before that).
    """
    if type(t) is Tensor:
        return False
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


# ------------------------------------------------------------------------------- arguments


def check_norm_type(norm_type: object, fn: str, *, nonpositive: bool = False) -> float:
    """``norm_type`` as a float: a positive number or inf (a string such as ``"inf"`` too).

    Args:
        norm_type: the argument.
        fn: the public function's name, for the message.
        nonpositive: also accept 0, negative numbers and ``-inf`` (the p of
            ``torch.linalg.vector_norm``: 0 counts non-zeros, ``-inf`` is the smallest
            absolute value), as the functions that take them do.

    Raises:
        TypeError: not a real number or a string.
        ValueError: NaN, a string that is no number, or (unless ``nonpositive``) zero or
            negative.
    """
    what = "a real number (inf, 0 and negative too)" if nonpositive else "a positive number or inf"
    if isinstance(norm_type, bool) or not isinstance(norm_type, (numbers.Real, str)):
        raise TypeError(f"{fn}: norm_type must be {what}, got {norm_type!r}")
    try:
        p = float(norm_type)
    except ValueError:
        raise ValueError(f"{fn}: norm_type must be {what}, got {norm_type!r}") from None
    if math.isnan(p) or (p <= 0 and not nonpositive):
        raise ValueError(f"{fn}: norm_type must be {what}, got {norm_type!r}")
    return p


def check_bound(value: object, name: str, fn: str, device: torch.device | None) -> Tensor | float:
    """Validate a non-negative bound (``max_norm``, ``clip_value``, ``target_norm``).

    Returns a float for Python numbers; a tensor is returned as is (0-d) after its value is
    checked when that needs no device sync (CPU tensors; a CPU tensor bound for gradients on
    another device is returned as its float, passed to the device by a fill).

    Raises:
        TypeError: not a number or a tensor.
        ValueError: negative or NaN, a tensor of more than one element or complex/bool, or a
            tensor on another device than ``device``.
    """
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
            raise ValueError(
                f"{fn}: {name} as a tensor must hold one real number, got shape "
                f"{list(value.shape)} and dtype {value.dtype}"
            )
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            v = float(value.reshape(()))
            if math.isnan(v) or v < 0:
                raise ValueError(f"{fn}: {name} must be a non-negative number, got {v}")
            if device is not None and device.type != "cpu":
                return v  # read on the host for free, passed to the device by a fill
        elif device is not None and value.device != device:
            raise ValueError(f"{fn}: {name} is on {value.device} but the gradients are on {device}")
        return value.reshape(())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{fn}: {name} must be a non-negative number or a 0-d tensor, got {value!r}"
        )
    v = float(value)
    if math.isnan(v) or v < 0:
        raise ValueError(f"{fn}: {name} must be a non-negative number, got {value!r}")
    return v


def check_flag(value: object, name: str, fn: str) -> None:
    """Raises TypeError unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")


def check_foreach(foreach: object, fn: str) -> None:
    """Raises TypeError unless ``foreach`` is ``None``, ``True`` or ``False``."""
    if foreach is not None and not isinstance(foreach, bool):
        raise TypeError(f"{fn}: foreach must be None, True or False, got {foreach!r}")


def check_real(value: object, name: str, fn: str, what: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a real number (not a bool) for which ``ok`` holds.

    Raises:
        TypeError: not a real number; ValueError: ``ok`` fails (the message says ``what``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be {what}, got {value!r}")
    v = float(value)
    if not ok(v):
        raise ValueError(f"{fn}: {name} must be {what}, got {value!r}")
    return v


def check_int(value: object, name: str, fn: str, minimum: int = 1) -> int:
    """``value`` as an int if it is an integer (not a bool) ``>= minimum``.

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
