"""What :mod:`gradstab.init`, :mod:`gradstab.lsuv` and :mod:`gradstab.norm` need to know about a
model's modules: which layers carry weights (:data:`LAYER_TYPES`) and which normalise
(:data:`NORM_TYPES`), the activation that follows a layer and its gain
(:func:`nonlinearity_gain`), a layer's fans (:func:`layer_fans`), the parent of each module,
random and orthogonal fills, and the record tables both entry points print.

Gains. For an activation ``f`` and ``z ~ N(0, 1)``, He et al. (2015) keep the second moment
of the signal through a layer with ``Var(W) = 1 / (fan_in * E[f(z)^2])``, i.e. a gain
``1 / sqrt(E[f(z)^2])``: exactly ``sqrt(2)`` for ReLU and ``sqrt(2 / (1 + a^2))`` for a leaky
ReLU of slope ``a`` (the values of :func:`torch.nn.init.calculate_gain`). gradstab uses the same
criterion for the activations PyTorch has no gain for (GELU, SiLU, ELU, Mish, ...), computing
``E[f(z)^2]`` by numerical integration in float64. Saturating and linear activations (tanh,
sigmoid, identity, ...) get Glorot/Xavier initialisation with PyTorch's gains (5/3 for tanh,
1 otherwise). See :func:`nonlinearity_gain` for the full table.

Example:
    >>> from gradstab._modules import nonlinearity_gain
    >>> nonlinearity_gain("relu")
    ('kaiming', 1.4142135623730951)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.padding import (
    _CircularPadNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
)
from torch.nn.modules.pooling import (
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _AvgPoolNd,
    _LPPoolNd,
    _MaxPoolNd,
)

#: Layers that :func:`init_model_` and :func:`lsuv_` initialise from fans and a gain.
LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: Normalisation layers (reset to the identity; transparent for activation inference).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    _NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

# Modules that sit between a layer and its activation without deciding the gain: skipped when
# looking for "the activation that follows".
_TRANSPARENT: tuple[type[nn.Module], ...] = (
    *NORM_TYPES,
    _DropoutNd,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    _MaxPoolNd,
    _AvgPoolNd,
    _AdaptiveAvgPoolNd,
    _AdaptiveMaxPoolNd,
    _LPPoolNd,
    _ConstantPadNd,
    _ReflectionPadNd,
    _ReplicationPadNd,
    _CircularPadNd,
    nn.Upsample,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
    nn.ChannelShuffle,
)

# Modules whose first operation on their input is linear: a layer followed directly by one of
# these has no activation after it.
_LINEAR_INPUT: tuple[type[nn.Module], ...] = (
    *LAYER_TYPES,
    nn.RNNBase,
    nn.RNNCellBase,
    nn.MultiheadAttention,
    nn.Bilinear,
)

# ---------------------------------------------------------------------------------------------
# Nonlinearities and their gains
# ---------------------------------------------------------------------------------------------

# name -> factory of the activation module with PyTorch's default parameters
_NAMED: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "rrelu": nn.RReLU,
    "elu": nn.ELU,
    "celu": nn.CELU,
    "selu": nn.SELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "softplus": nn.Softplus,
    "hardswish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hardtanh": nn.Hardtanh,
    "softsign": nn.Softsign,
    "hardsigmoid": nn.Hardsigmoid,
}
_IDENTITY_NAMES = ("linear", "identity", "none")

# Activation module types, most specific first (ReLU6 subclasses Hardtanh).
_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU6,
    nn.ReLU,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Hardswish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Softsign,
    nn.Hardsigmoid,
)
# Glorot/Xavier activations and their gains (PyTorch's calculate_gain values where it has one).
_XAVIER_GAINS: dict[type[nn.Module], float] = {
    nn.Tanh: 5.0 / 3.0,
    nn.Sigmoid: 1.0,
    nn.Hardtanh: 1.0,
    nn.Softsign: 1.0,
    nn.Hardsigmoid: 1.0,
}

Nonlinearity = Union[str, nn.Module, None]

_moment_cache: dict[str, tuple[float, float]] = {}


def gauss_moments(act: nn.Module) -> tuple[float, float]:
    """``(E[f(z)], E[f(z)^2])`` for ``z ~ N(0, 1)``, by the trapezoid rule in float64.

    The integrand decays like ``exp(-z^2 / 2)``; on ``[-12, 12]`` with step 1e-3 the error is
    below 1e-7 even for activations with a kink (ReLU).
    """
    key = repr(act)
    if key not in _moment_cache:
        z = torch.linspace(-12.0, 12.0, 24001, dtype=torch.float64)
        density = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
        with torch.no_grad():
            fz = act(z.clone())  # clone: inplace activations must not overwrite z
        if fz.shape != z.shape or fz.dtype != torch.float64:
            raise ValueError(f"cannot integrate the activation {act!r}")
        m1 = torch.trapezoid(density * fz, z).item()
        m2 = torch.trapezoid(density * fz * fz, z).item()
        _moment_cache[key] = (m1, m2)
    return _moment_cache[key]


def _activation_type(module: nn.Module) -> type[nn.Module] | None:
    for t in _ACTIVATION_TYPES:
        if isinstance(module, t):
            return t
    return None


def resolve_nonlinearity(nonlinearity: Nonlinearity, arg: str = "nonlinearity") -> nn.Module | None:
    """The activation module a spec names, or ``None`` for the identity."""
    if nonlinearity is None:
        return None
    if isinstance(nonlinearity, str):
        key = nonlinearity.lower()
        if key in _IDENTITY_NAMES:
            return None
        if key in _NAMED:
            return _NAMED[key]()
        raise ValueError(
            f"{arg}: unknown nonlinearity {nonlinearity!r}; use one of "
            f"{sorted([*_NAMED, *_IDENTITY_NAMES])}, an activation module such as "
            "nn.LeakyReLU(0.2), or None"
        )
    if isinstance(nonlinearity, nn.Identity):
        return None
    if isinstance(nonlinearity, nn.Module) and _activation_type(nonlinearity) is not None:
        return nonlinearity
    raise ValueError(
        f"{arg}: expected a nonlinearity name, a torch.nn activation module or None, got "
        f"{nonlinearity!r}; supported modules: {[t.__name__ for t in _ACTIVATION_TYPES]}"
    )


def _leaky_slope(act: nn.Module) -> float | None:
    """The negative slope of a ReLU-family activation (``None`` for other activations)."""
    if isinstance(act, nn.ReLU):
        return 0.0
    if isinstance(act, nn.LeakyReLU):
        return float(act.negative_slope)
    if isinstance(act, nn.PReLU):  # its initial (current) slope
        return float(act.weight.detach().float().mean())
    if isinstance(act, nn.RReLU):  # evaluation slope: the mean of the training range
        return (float(act.lower) + float(act.upper)) / 2.0
    return None


def scheme_and_gain(act: nn.Module | None) -> tuple[str, float]:
    if act is None:
        return "xavier", 1.0
    t = _activation_type(act)
    if t in _XAVIER_GAINS:
        return "xavier", _XAVIER_GAINS[t]
    slope = _leaky_slope(act)
    if slope is not None:
        gain = math.sqrt(2.0 / (1.0 + slope * slope))
    elif t is nn.SELU:  # E[selu(z)^2] = 1 by construction (Klambauer et al. 2017)
        gain = 1.0
    else:
        gain = 1.0 / math.sqrt(gauss_moments(act)[1])
    return "kaiming", gain


def activation_name(act: nn.Module | None) -> str:
    if act is None:
        return "linear"
    text = repr(act)
    return text.replace("(inplace=True)", "()").replace("inplace=True, ", "")


def nonlinearity_gain(nonlinearity: Nonlinearity) -> tuple[str, float]:
    """The initialisation scheme and gain :func:`init_model_` uses before an activation.

    ======================================  =======  =========================================
    activation                              scheme   gain
    ======================================  =======  =========================================
    ReLU                                    kaiming  sqrt(2)
    LeakyReLU(a), PReLU (current slope a),  kaiming  sqrt(2 / (1 + a^2))
    RReLU (a = (lower + upper) / 2)
    SELU                                    kaiming  1 (``E[selu(z)^2] = 1``; calculate_gain
                                                     says 3/4, but PyTorch's docs recommend 1
                                                     for self-normalising networks)
    GELU, SiLU, ELU, CELU, Mish, Softplus,  kaiming  1 / sqrt(E[f(z)^2]), z ~ N(0, 1), by
    Hardswish, ReLU6                                 numerical integration (GELU: ~1.534)
    Tanh                                    xavier   5/3
    Sigmoid, Hardtanh, Softsign,            xavier   1
    Hardsigmoid
    identity (``None``, ``"linear"``)       xavier   1
    ======================================  =======  =========================================

    Kaiming means ``std = gain / sqrt(fan_in)`` (``fan_out`` with ``mode="fan_out"``); Xavier
    means ``std = gain * sqrt(2 / (fan_in + fan_out))``.

    Args:
        nonlinearity: a name (``"relu"``, ``"leaky_relu"`` (slope 0.01), ``"gelu"``, ``"tanh"``,
            ``"linear"``, ...), an activation module (``nn.LeakyReLU(0.2)``), or ``None``.

    Returns:
        ``(scheme, gain)`` with scheme ``"kaiming"`` or ``"xavier"``.

    Example:
        >>> from gradstab._modules import nonlinearity_gain
        >>> nonlinearity_gain("relu")
        ('kaiming', 1.4142135623730951)
        >>> nonlinearity_gain("tanh")[1]
        1.6666666666666667
    """
    return scheme_and_gain(resolve_nonlinearity(nonlinearity))


# ---------------------------------------------------------------------------------------------
# Fans
# ---------------------------------------------------------------------------------------------


def layer_fans(layer: nn.Module) -> tuple[float, float]:
    """``(fan_in, fan_out)`` of a Linear/Conv/ConvTranspose layer: the average number of inputs
    summed into one output element, and of output elements one input element feeds.

    - ``Linear``: ``(in_features, out_features)``.
    - ``ConvNd``: ``(in/groups * K, out/groups * K / S)``, ``K`` = kernel volume, ``S`` = product
      of the strides.
    - ``ConvTransposeNd``: ``(in/groups * K / S, out/groups * K)``.

    For Linear and ungrouped stride-1 convolutions these are :mod:`torch.nn.init`'s fans.
    PyTorch's formula counts ``out * K`` as the fan-out of a grouped conv (``groups`` times too
    many: a depthwise conv's fan-out is ``K``) and reads a ConvTranspose weight as if it were a
    Conv weight (its fan-in comes out as ``out/groups * K``); the counts above are the true ones
    (borders ignored), which is what the variance arguments of He and Glorot need.

    Example:
        >>> from torch import nn
        >>> from gradstab._modules import layer_fans
        >>> layer_fans(nn.Conv2d(8, 16, 3, stride=2))
        (72.0, 36.0)
    """
    if isinstance(layer, nn.Linear):
        return float(layer.in_features), float(layer.out_features)
    if isinstance(layer, nn.modules.conv._ConvNd):
        k = float(math.prod(layer.kernel_size))
        s = float(math.prod(layer.stride))
        cin = layer.in_channels / layer.groups
        cout = layer.out_channels / layer.groups
        if layer.transposed:
            return cin * k / s, cout * k
        return cin * k, cout * k / s
    raise TypeError(f"layer_fans: expected a Linear, Conv or ConvTranspose layer, got {layer!r}")


# ---------------------------------------------------------------------------------------------
# Records and tables
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == int(value) and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


class RecordTable(list):
    """A list of dataclass records that prints as a table."""

    _title = ""

    def table(self) -> str:
        """The records as an aligned text table."""
        if not self:
            return f"{self._title}: (empty)"
        names = [f.name for f in fields(self[0])]
        rows = [names] + [[_fmt(getattr(r, n)) for n in names] for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(names))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()


# ---------------------------------------------------------------------------------------------
# Model structure: what follows a layer
# ---------------------------------------------------------------------------------------------


def is_plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's own (its children run in order)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def module_parents(model: nn.Module) -> dict[str, tuple[str, str]]:
    """qualified name -> (parent's qualified name, key in the parent), first occurrence."""
    parents: dict[str, tuple[str, str]] = {}
    names = {name for name, _ in model.named_modules()}
    for name, module in model.named_modules():
        for key, _child in module.named_children():
            child = f"{name}.{key}" if name else key
            if child in names and child not in parents:
                parents[child] = (name, key)
    return parents


def _entering(module: nn.Module, name: str) -> tuple[str, Any] | None:
    """What a signal meets first when it enters ``module``; ``None`` if it passes through."""
    if _activation_type(module) is not None:
        return ("act", module)
    if isinstance(module, _TRANSPARENT):
        return None
    if is_plain_sequential(module):
        for key, child in module.named_children():
            found = _entering(child, f"{name}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(module, _LINEAR_INPUT):
        return ("layer", name)
    return ("unknown", f"followed by '{name}' ({type(module).__name__}), whose forward() is opaque")


def follows(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    parents: Mapping[str, tuple[str, str]],
    name: str,
) -> tuple[str, Any]:
    """What follows the module ``name`` in the forward pass, as far as the structure shows.

    Returns ``("act", module)``, ``("layer", name)`` (another layer, no activation in between),
    ``("output", None)`` (nothing but transparent modules up to the model's output) or
    ``("unknown", reason)``.
    """
    current = name
    while current:
        parent_name, key = parents[current]
        parent = modules[parent_name]
        if isinstance(parent, nn.MultiheadAttention):
            return ("layer", parent_name)  # out_proj: the attention's output is linear
        if not is_plain_sequential(parent):
            where = f"'{parent_name}'" if parent_name else "the model"
            return (
                "unknown",
                f"called in the forward() of {where} ({type(parent).__name__})",
            )
        seen = False
        for k, sibling in parent.named_children():
            if seen:
                found = _entering(sibling, f"{parent_name}.{k}" if parent_name else k)
                if found is not None:
                    return found
            elif k == key:
                seen = True
        current = parent_name
    return ("output", None)


# ---------------------------------------------------------------------------------------------
# Filling tensors
# ---------------------------------------------------------------------------------------------


def random_like(
    t: Tensor,
    kind: str,
    generator: torch.Generator | None,
    work_dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal (``kind="normal"``) or U(-1, 1) values shaped like ``t``, on ``t``'s device.

    Drawn on the generator's device (so a CPU generator can seed a CUDA model) in
    ``work_dtype`` (default: ``t``'s dtype).
    """
    device = generator.device if generator is not None else t.device
    out = torch.empty(t.shape, device=device, dtype=work_dtype or t.dtype)
    if kind == "normal":
        out.normal_(0.0, 1.0, generator=generator)
    else:
        out.uniform_(-1.0, 1.0, generator=generator)
    return out.to(t.device)


def orthogonal(rows: int, cols: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Haar-random ``rows x cols`` matrix with orthonormal rows (or columns, if rows > cols).

    QR of a Gaussian matrix with the signs of R's diagonal folded into Q (Mezzadri 2007),
    computed in float32 (float64 for float64 weights) and returned in ``like``'s dtype and device.
    """
    if like.is_meta:
        return torch.empty((rows, cols), device=like.device, dtype=like.dtype)
    work = torch.float64 if like.dtype == torch.float64 else torch.float32
    big, small = max(rows, cols), min(rows, cols)
    a = random_like(torch.empty((big, small), device=like.device), "normal", generator, work)
    if a.device.type not in ("cpu", "cuda"):
        a = a.cpu()
    q, r = torch.linalg.qr(a)
    d = torch.diagonal(r)
    q = q * torch.where(d < 0, -1.0, 1.0).to(q.dtype)
    if rows < cols:
        q = q.T
    return q.to(device=like.device, dtype=like.dtype)


def std_of(t: Tensor) -> float:
    if t.is_meta or t.numel() < 2:
        return float("nan")
    return float(t.detach().float().std())


def check_materialised(name: str, module: nn.Module) -> None:
    for pname, p in module.named_parameters(recurse=False):
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise ValueError(
                f"'{name}' ({type(module).__name__}) has an uninitialised lazy parameter "
                f"'{pname}': run one forward pass before initialising the model"
            )
    if nn.utils.parametrize.is_parametrized(module):
        raise ValueError(
            f"'{name}' ({type(module).__name__}) is parametrized (torch.nn.utils.parametrize); "
            "its weight is computed, so it cannot be initialised in place: initialise before "
            "registering the parametrization"
        )
