"""Activation-aware weight initialisation and LSUV.

Two entry points, both run once before training (they read values on the host freely):

- :func:`init_model_` initialises every ``Linear``/``Conv``/``ConvTranspose`` layer of a model
  for the activation that follows it (He/Kaiming or Glorot/Xavier, with the gain of that
  activation), recurrent layers orthogonally per gate block, biases to zero, normalisation
  layers to the identity, and optionally the last layer of every residual branch to zero.
  It returns one record per initialised tensor (a list that prints as a table).
- :func:`lsuv_` is layer-sequential unit-variance initialisation (Mishkin & Matas, "All you
  need is a good init", ICLR 2016): orthonormal weights, then, layer by layer in forward
  order, the weights are rescaled until the layer's output on a batch has the target std.

Gains. For an activation ``f`` and ``z ~ N(0, 1)``, He et al. (2015) keep the second moment
of the signal through a layer with ``Var(W) = 1 / (fan_in * E[f(z)^2])``, i.e. a gain
``1 / sqrt(E[f(z)^2])``: exactly ``sqrt(2)`` for ReLU and ``sqrt(2 / (1 + a^2))`` for a leaky
ReLU of slope ``a`` (the values of :func:`torch.nn.init.calculate_gain`). gradstab uses the same
criterion for the activations PyTorch has no gain for (GELU, SiLU, ELU, Mish, ...), computing
``E[f(z)^2]`` by numerical integration in float64. Saturating and linear activations (tanh,
sigmoid, identity, ...) get Glorot/Xavier initialisation with PyTorch's gains (5/3 for tanh,
1 otherwise). See :func:`nonlinearity_gain` for the full table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
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

__all__ = [
    "InitSummary",
    "LSUVRecord",
    "LSUVReport",
    "LayerInit",
    "init_model_",
    "layer_fans",
    "lsuv_",
    "nonlinearity_gain",
]

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


def _gauss_moments(act: nn.Module) -> tuple[float, float]:
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


def _resolve(nonlinearity: Nonlinearity, arg: str = "nonlinearity") -> nn.Module | None:
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


def _scheme_and_gain(act: nn.Module | None) -> tuple[str, float]:
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
        gain = 1.0 / math.sqrt(_gauss_moments(act)[1])
    return "kaiming", gain


def _act_name(act: nn.Module | None) -> str:
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
        >>> from gradstab.init import nonlinearity_gain
        >>> nonlinearity_gain("relu")
        ('kaiming', 1.4142135623730951)
        >>> nonlinearity_gain("tanh")[1]
        1.6666666666666667
    """
    return _scheme_and_gain(_resolve(nonlinearity))


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
        >>> from gradstab.init import layer_fans
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


class _RecordTable(list):
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


@dataclass
class LayerInit:
    """How :func:`init_model_` initialised one weight tensor.

    Attributes:
        name: qualified name of the layer (of the parameter, for recurrent layers).
        type: the layer's class name.
        fan_in: see :func:`layer_fans`; for recurrent weights the block's input size.
        fan_out: see :func:`layer_fans`; for recurrent weights the block's output size.
        scheme: ``"kaiming"``, ``"xavier"``, ``"orthogonal"`` (per gate block for recurrent
            weights), or ``"zero (residual)"``.
        nonlinearity: the activation the gain is for.
        source: where the nonlinearity came from: ``"inferred"`` (the model's structure),
            ``"given"`` (the ``nonlinearity`` argument) or ``"default"`` (unknown; warned).
        gain: the gain used.
        target_std: the std the scheme asks for.
        std: the std of the weight tensor after initialisation.
    """

    name: str
    type: str
    fan_in: float
    fan_out: float
    scheme: str
    nonlinearity: str
    source: str
    gain: float
    target_std: float
    std: float


class InitSummary(_RecordTable):
    """The list of :class:`LayerInit` records :func:`init_model_` returns; prints as a table."""

    _title = "init_model_"


@dataclass
class LSUVRecord:
    """What :func:`lsuv_` did to one layer.

    Attributes:
        name: qualified name of the layer.
        type: the layer's class name.
        iterations: how many times its weights were rescaled.
        std: the std of its output on the batch after the last rescaling.
        converged: whether ``std`` is within ``tol`` of the target.
    """

    name: str
    type: str
    iterations: int
    std: float
    converged: bool


class LSUVReport(_RecordTable):
    """The list of :class:`LSUVRecord` records :func:`lsuv_` returns, in forward order."""

    _title = "lsuv_"


# ---------------------------------------------------------------------------------------------
# Model structure: what follows a layer
# ---------------------------------------------------------------------------------------------


def _is_plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's own (its children run in order)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _parents(model: nn.Module) -> dict[str, tuple[str, str]]:
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
    if _is_plain_sequential(module):
        for key, child in module.named_children():
            found = _entering(child, f"{name}.{key}")
            if found is not None:
                return found
        return None
    if isinstance(module, _LINEAR_INPUT):
        return ("layer", name)
    return ("unknown", f"followed by '{name}' ({type(module).__name__}), whose forward() is opaque")


def _follows(
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
        if not _is_plain_sequential(parent):
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


def _random_like(
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


def _orthogonal(rows: int, cols: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """A Haar-random ``rows x cols`` matrix with orthonormal rows (or columns, if rows > cols).

    QR of a Gaussian matrix with the signs of R's diagonal folded into Q (Mezzadri 2007),
    computed in float32 (float64 for float64 weights) and returned in ``like``'s dtype and device.
    """
    if like.is_meta:
        return torch.empty((rows, cols), device=like.device, dtype=like.dtype)
    work = torch.float64 if like.dtype == torch.float64 else torch.float32
    big, small = max(rows, cols), min(rows, cols)
    a = _random_like(torch.empty((big, small), device=like.device), "normal", generator, work)
    if a.device.type not in ("cpu", "cuda"):
        a = a.cpu()
    q, r = torch.linalg.qr(a)
    d = torch.diagonal(r)
    q = q * torch.where(d < 0, -1.0, 1.0).to(q.dtype)
    if rows < cols:
        q = q.T
    return q.to(device=like.device, dtype=like.dtype)


def _std(t: Tensor) -> float:
    if t.is_meta or t.numel() < 2:
        return float("nan")
    return float(t.detach().float().std())


def _check_materialised(name: str, module: nn.Module) -> None:
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


# ---------------------------------------------------------------------------------------------
# init_model_
# ---------------------------------------------------------------------------------------------

NonlinearitySpec = Union[str, nn.Module, None, Mapping[Union[str, type], Nonlinearity]]
ResidualSpec = Union[bool, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _match_override(
    overrides: Mapping[Union[str, type], Nonlinearity], name: str, module: nn.Module
) -> tuple[bool, Nonlinearity]:
    """Longest matching name prefix (at a '.' boundary) wins, then the most specific type."""
    best: str | None = None
    for key in overrides:
        if (
            isinstance(key, str)
            and (key in (name, "") or name.startswith(key + "."))
            and (best is None or len(key) > len(best))
        ):
            best = key
    if best is not None:
        return True, overrides[best]
    for cls in type(module).__mro__:
        if cls in overrides:
            return True, overrides[cls]
    return False, None


def _validate_overrides(
    overrides: Mapping[Union[str, type], Nonlinearity], model: nn.Module
) -> None:
    names = {name for name, _ in model.named_modules()}
    for key, value in overrides.items():
        if isinstance(key, str):
            if key not in names:
                raise ValueError(f"nonlinearity: no module named {key!r} in the model")
        elif not (isinstance(key, type) and issubclass(key, nn.Module)):
            raise TypeError(
                f"nonlinearity: dict keys must be module names or nn.Module classes, got {key!r}"
            )
        _resolve(value, f"nonlinearity[{key!r}]")


def _zeroable(module: nn.Module) -> bool:
    if isinstance(module, LAYER_TYPES):
        return True
    return isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None


def _default_residual_targets(model: nn.Module) -> list[tuple[str, str]]:
    """(block name, name of the layer to zero) for torchvision/timm-style residual blocks."""
    out: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not hasattr(module, "downsample"):
            continue
        children = dict(module.named_children())
        prefix = f"{name}." if name else ""
        for norm_key, conv_key in (("bn3", "conv3"), ("bn2", "conv2")):
            norm = children.get(norm_key)
            if not isinstance(norm, NORM_TYPES):
                continue
            if getattr(norm, "weight", None) is not None:
                out.append((name, prefix + norm_key))
            elif isinstance(children.get(conv_key), LAYER_TYPES):
                out.append((name, prefix + conv_key))
            break
    return out


def _residual_targets(model: nn.Module, spec: ResidualSpec) -> list[tuple[str, str]]:
    if spec is False or spec is None:
        return []
    if spec is True:
        targets = _default_residual_targets(model)
        if not targets:
            warnings.warn(
                "init_model_: zero_init_residual=True found no torchvision-style residual block "
                "(a module with a 'downsample' attribute and a norm child 'bn3' or 'bn2'); "
                "nothing was zeroed. Pass the branch names or a predicate instead.",
                UserWarning,
                stacklevel=3,
            )
        return targets
    modules = dict(model.named_modules())
    if callable(spec):
        branches = [name for name, m in modules.items() if spec(name, m)]
    else:
        branches = [spec] if isinstance(spec, str) else list(spec)
        for b in branches:
            if not isinstance(b, str) or b not in modules:
                raise ValueError(f"zero_init_residual: no module named {b!r} in the model")
    out = []
    for b in branches:
        branch = modules[b]
        if _zeroable(branch):
            out.append((b, b))
            continue
        last = None
        for sub, m in branch.named_modules():
            if sub and _zeroable(m):
                last = f"{b}.{sub}" if b else sub
        if last is None:
            raise ValueError(
                f"zero_init_residual: residual branch {b!r} ({type(branch).__name__}) holds no "
                "Linear/Conv layer or affine normalisation layer to zero"
            )
        out.append((b, last))
    return out


def _init_recurrent(
    name: str,
    *,
    module: nn.Module,
    gain: float,
    lstm_forget_bias: float,
    zero_bias: bool,
    generator: torch.Generator | None,
) -> list[LayerInit]:
    if isinstance(module, nn.RNNBase):
        gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        is_lstm = module.mode == "LSTM"
    else:
        gates = 4 if isinstance(module, nn.LSTMCell) else 3 if isinstance(module, nn.GRUCell) else 1
        is_lstm = isinstance(module, nn.LSTMCell)
    records = []
    for pname, p in module.named_parameters(recurse=False):
        with torch.no_grad():
            if pname.startswith(("weight_ih", "weight_hh", "weight_hr")):
                blocks = 1 if pname.startswith("weight_hr") else gates
                rows, cols = p.shape[0] // blocks, p.shape[1]
                for b in range(blocks):
                    p[b * rows : (b + 1) * rows].copy_(gain * _orthogonal(rows, cols, p, generator))
                records.append(
                    LayerInit(
                        name=f"{name}.{pname}",
                        type=type(module).__name__,
                        fan_in=float(cols),
                        fan_out=float(rows),
                        scheme="orthogonal" if blocks == 1 else f"orthogonal ({blocks} blocks)",
                        nonlinearity="-",
                        source="-",
                        gain=gain,
                        target_std=gain / math.sqrt(max(rows, cols, 1)),
                        std=_std(p),
                    )
                )
            elif pname.startswith("bias") and zero_bias:
                p.zero_()
                if is_lstm and lstm_forget_bias and pname.startswith("bias_ih"):
                    hidden = p.shape[0] // 4
                    p[hidden : 2 * hidden].fill_(lstm_forget_bias)
    return records


def init_model_(
    model: nn.Module,
    nonlinearity: NonlinearitySpec = "auto",
    *,
    default: Nonlinearity = "relu",
    mode: str = "fan_in",
    distribution: str = "normal",
    zero_bias: bool = True,
    reset_norm: bool = True,
    zero_init_residual: ResidualSpec = False,
    recurrent_gain: float = 1.0,
    lstm_forget_bias: float = 0.0,
    generator: torch.Generator | None = None,
) -> InitSummary:
    """Initialise a model's layers for the activations that follow them, in place.

    What is initialised:

    - ``Linear``, ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` (and subclasses): weights from a
      zero-mean normal (or uniform) with the std of the scheme of the activation that follows
      the layer (see :func:`nonlinearity_gain`): Kaiming ``gain / sqrt(fan)`` or Xavier
      ``gain * sqrt(2 / (fan_in + fan_out))``, with the fans of :func:`layer_fans`. Biases are
      zeroed.
    - ``RNN``/``LSTM``/``GRU`` and their cells: each gate block of every input-hidden and
      hidden-hidden weight (and LSTM projection weight) is an independent random orthogonal
      matrix times ``recurrent_gain``; biases are zeroed. ``lstm_forget_bias`` is written to
      the forget-gate block of ``bias_ih`` only (``bias_hh``'s stays 0: PyTorch adds both, so the
      effective forget bias is exactly ``lstm_forget_bias``).
    - Normalisation layers (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm): weight 1,
      bias 0 (``reset_norm``).
    - Everything else (embeddings, attention in-projections, custom parameters) is left alone.

    How "the activation that follows" a layer is found (``nonlinearity="auto"``): only from the
    module structure, in ``nn.Sequential`` order. After the layer, normalisation, dropout,
    pooling, padding, flatten, upsampling and ``nn.Identity`` modules are skipped; nested
    ``nn.Sequential`` containers are entered (at the start) and left (at the end) as the data
    flows. The first module met then decides:

    - an activation module (``nn.ReLU``, ``nn.GELU``, ``nn.LeakyReLU(0.2)``, ...): its gain;
    - another Linear/Conv/recurrent/attention layer, or the end of the model (when the model is
      itself a Sequential or the layer): no activation, i.e. identity (Xavier, gain 1);
    - anything else: unknown. That is the case for every layer called from a custom
      ``forward()`` (torchvision-style blocks, transformer layers), whose functional
      activations (``F.relu(x)``, ``x.relu()``) cannot be seen without running or tracing the
      code. Those layers get ``default`` (ReLU unless given) and one ``UserWarning`` lists them.

    The gain is that of the activation *following* the layer, as with ``torch.nn.init``'s
    ``nonlinearity`` argument; He et al.'s derivation uses the activation *feeding* the layer,
    which is the same thing in a homogeneous stack (they differ only at the ends and where
    activations change).

    Args:
        model: the module to initialise (in place).
        nonlinearity: ``"auto"`` (infer, as above); a name or activation module applied to every
            layer (no inference, no warning); or a dict mapping module names or module classes
            to nonlinearities, overriding inference for the layers it matches (others are
            inferred). A name key matches that module and everything under it (``"encoder"``
            matches ``"encoder.0"``); the longest matching name wins, then the most specific
            class. Values are as in :func:`nonlinearity_gain`.
        default: the nonlinearity assumed where inference fails.
        mode: ``"fan_in"`` (keep forward variance, default) or ``"fan_out"`` (keep backward
            variance) for the Kaiming scheme.
        distribution: ``"normal"`` or ``"uniform"`` (same std: bound ``sqrt(3) * std``).
        zero_bias: zero the biases of the layers initialised.
        reset_norm: set normalisation layers to weight 1, bias 0.
        zero_init_residual: zero the last layer of each residual branch, so every residual
            block starts as the identity (Goyal et al. 2017). ``True``: torchvision/timm-style
            blocks, i.e. every module that has a ``downsample`` attribute (``None`` allowed) and
            a normalisation child ``bn3`` (bottleneck) or else ``bn2`` (basic block): that
            norm's weight is zeroed (its conv, ``conv3``/``conv2``, if the norm has no affine
            weight). A name or list of names: each names a residual branch; if it is itself a
            Linear/Conv/affine-norm layer it is zeroed, otherwise its last such layer in
            registration order (forward order for an ``nn.Sequential`` branch) is. A callable
            ``(name, module) -> bool`` selects branch modules the same way. Zeroed Linear/Conv
            layers have weight and bias 0; zeroed norms have weight 0.
        recurrent_gain: gain of the orthogonal recurrent weights.
        lstm_forget_bias: value for the LSTM forget-gate bias (1.0 is the usual choice).
        generator: random generator, for reproducible initialisation.

    Returns:
        An :class:`InitSummary`: one :class:`LayerInit` per initialised weight tensor (and per
        zeroed residual norm), in ``named_modules`` order; it prints as a table.

    Raises:
        ValueError: an unknown nonlinearity name, ``mode`` or ``distribution``; a dict key or
            residual branch name that names no module; a lazy layer that has not run yet; a
            parametrized layer.
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import gradstab
        >>> net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(),
        ...                     nn.Linear(64, 10))
        >>> summary = gradstab.init.init_model_(net)
        >>> [(r.name, r.scheme, round(r.gain, 3)) for r in summary]
        [('0', 'kaiming', 1.414), ('2', 'xavier', 1.667), ('4', 'xavier', 1.0)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_model_: model must be an nn.Module, got {type(model).__name__}")
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"init_model_: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    if distribution not in ("normal", "uniform"):
        raise ValueError(
            f"init_model_: distribution must be 'normal' or 'uniform', got {distribution!r}"
        )
    if not math.isfinite(recurrent_gain) or recurrent_gain < 0:
        raise ValueError(
            f"init_model_: recurrent_gain must be finite and >= 0, got {recurrent_gain}"
        )
    if not math.isfinite(lstm_forget_bias):
        raise ValueError(f"init_model_: lstm_forget_bias must be finite, got {lstm_forget_bias}")
    default_act = _resolve(default, "default")

    overrides: Mapping[Union[str, type], Nonlinearity] = {}
    global_act: nn.Module | None = None
    auto = isinstance(nonlinearity, str) and nonlinearity == "auto"
    if isinstance(nonlinearity, Mapping):
        _validate_overrides(nonlinearity, model)
        overrides, auto = nonlinearity, True
    elif not auto:
        global_act = _resolve(nonlinearity)

    modules = dict(model.named_modules())
    parents = _parents(model)
    residual = _residual_targets(model, zero_init_residual)
    for name, module in modules.items():
        if isinstance(module, (*LAYER_TYPES, nn.RNNBase, nn.RNNCellBase)):
            _check_materialised(name, module)

    summary = InitSummary()
    unknown: list[str] = []
    by_name: dict[str, LayerInit] = {}
    for name, module in modules.items():
        if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
            summary.extend(
                _init_recurrent(
                    name,
                    module=module,
                    gain=recurrent_gain,
                    lstm_forget_bias=lstm_forget_bias,
                    zero_bias=zero_bias,
                    generator=generator,
                )
            )
            continue
        if isinstance(module, NORM_TYPES):
            if reset_norm:
                with torch.no_grad():
                    if getattr(module, "weight", None) is not None:
                        module.weight.fill_(1.0)
                    if getattr(module, "bias", None) is not None:
                        module.bias.zero_()
            continue
        if not isinstance(module, LAYER_TYPES):
            continue
        if auto:
            matched, spec = _match_override(overrides, name, module)
            if matched:
                act, source = _resolve(spec), "given"
            else:
                kind, what = _follows(model, modules, parents, name) if name else ("output", None)
                if kind == "act":
                    act, source = what, "inferred"
                elif kind in ("layer", "output"):
                    act, source = None, "inferred"
                else:
                    act, source = default_act, "default"
                    unknown.append(f"{name} ({what})")
        else:
            act, source = global_act, "given"
        scheme, gain = _scheme_and_gain(act)
        fan_in, fan_out = layer_fans(module)
        if scheme == "kaiming":
            fan = fan_in if mode == "fan_in" else fan_out
            std = gain / math.sqrt(fan) if fan > 0 else 0.0
        else:
            std = gain * math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out > 0 else 0.0
        w = module.weight
        with torch.no_grad():
            if distribution == "normal":
                w.copy_(_random_like(w, "normal", generator) * std)
            else:
                w.copy_(_random_like(w, "uniform", generator) * (math.sqrt(3.0) * std))
            if zero_bias and module.bias is not None:
                module.bias.zero_()
        record = LayerInit(
            name=name,
            type=type(module).__name__,
            fan_in=fan_in,
            fan_out=fan_out,
            scheme=scheme,
            nonlinearity=_act_name(act),
            source=source,
            gain=gain,
            target_std=std,
            std=_std(w),
        )
        summary.append(record)
        by_name[name] = record

    for _branch, target in residual:
        layer = modules[target]
        with torch.no_grad():
            layer.weight.zero_()
            if isinstance(layer, LAYER_TYPES) and layer.bias is not None:
                layer.bias.zero_()
        if target in by_name:
            rec = by_name[target]
            rec.scheme, rec.gain, rec.target_std, rec.std = "zero (residual)", 0.0, 0.0, 0.0
        else:
            n = float(getattr(layer, "num_features", getattr(layer, "num_channels", math.nan)))
            summary.append(
                LayerInit(
                    name=target,
                    type=type(layer).__name__,
                    fan_in=n,
                    fan_out=n,
                    scheme="zero (residual)",
                    nonlinearity="-",
                    source="-",
                    gain=0.0,
                    target_std=0.0,
                    std=0.0,
                )
            )

    if unknown:
        shown = ", ".join(unknown[:20]) + (
            f", ... ({len(unknown)} in all)" if len(unknown) > 20 else ""
        )
        warnings.warn(
            f"init_model_: cannot tell which activation follows {len(unknown)} layer(s), because "
            "they are not followed by an activation module in an nn.Sequential (activations "
            "applied in a custom forward(), such as F.relu, are invisible): "
            f"{shown}. They were initialised for the default {_act_name(default_act)!r}; pass "
            "nonlinearity={name or type: nonlinearity} to set them.",
            UserWarning,
            stacklevel=2,
        )
    return summary


# ---------------------------------------------------------------------------------------------
# LSUV
# ---------------------------------------------------------------------------------------------

Batch = Union[Tensor, Sequence[Any], Mapping[str, Any]]


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    values = (
        obj.values() if isinstance(obj, Mapping) else obj if isinstance(obj, (list, tuple)) else ()
    )
    for v in values:
        t = _first_tensor(v)
        if t is not None:
            return t
    return None


def _call(model: nn.Module, batch: Batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (list, tuple)):
        model(*batch)
    else:
        model(batch)


class _Moments:
    """Running count, mean and sum of squared deviations of a layer's outputs (float64, on the
    outputs' device), merged across calls with Chan et al.'s formula."""

    def __init__(self) -> None:
        self.n = 0
        self.min_numel: int | None = None
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, out: Tensor) -> None:
        x = out.detach()
        n = x.numel()
        self.min_numel = n if self.min_numel is None else min(self.min_numel, n)
        if n == 0:
            return
        if x.dtype not in (torch.float32, torch.float64):
            x = x.float()
        mean = x.sum(dtype=torch.float64) / n
        m2 = (x - mean.to(x.dtype)).square().sum(dtype=torch.float64)
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta * delta * (self.n * n / total)
        self.mean = self.mean + delta * (n / total)
        self.n = total

    def std(self) -> float:
        if self.m2 is None or self.n < 2:
            return float("nan")
        return float(torch.sqrt(self.m2 / (self.n - 1)))  # the one host read per iteration


def lsuv_(
    model: nn.Module,
    batch: Batch,
    target_std: float = 1.0,
    tol: float = 0.05,
    max_iter: int = 10,
    *,
    modules: Iterable[str] | None = None,
    orthonormal: bool = True,
    zero_bias: bool = True,
    generator: torch.Generator | None = None,
) -> LSUVReport:
    """Layer-sequential unit-variance initialisation (Mishkin & Matas, ICLR 2016), in place.

    1. Every ``Linear``/``Conv``/``ConvTranspose`` layer gets a random orthonormal weight
       (rows or columns of the weight viewed as ``[size(0), -1]``) and, with ``zero_bias``, a
       zero bias.
    2. One forward pass of ``batch`` finds the order in which the layers first run.
    3. In that order, each layer's output std on ``batch`` is measured (forward hooks; the
       statistics are accumulated in float64 on the model's device, over every call of the
       layer in the pass) and its weight is divided by ``std / target_std``, until
       ``|std / target_std - 1| <= tol`` or ``max_iter`` rescalings. Earlier layers are fixed by
       then, so each layer sees its final input. With zero biases the output is linear in the
       weight and one rescaling converges; a bias (``zero_bias=False``) needs a few.

    The passes run under ``torch.no_grad()`` with the model in eval mode (dropout off,
    BatchNorm using and not updating its running statistics); each module's ``training``
    flag is restored afterwards. Cost: about ``2 * layers + 1`` forward passes, each reading
    one number on the host. Recurrent layers, embeddings and attention in-projections are
    not changed.

    Args:
        model: the module to initialise (in place).
        batch: the model's input: a tensor (``model(batch)``), a tuple/list of positional
            arguments (``model(*batch)``) or a dict of keyword arguments (``model(**batch)``).
            Tensors are moved to the device of the model's first parameter. The first tensor
            must hold at least 2 samples along dim 0.
        target_std: the output std to reach, > 0.
        tol: relative tolerance, ``0 < tol < 1``.
        max_iter: most rescalings per layer, >= 1.
        modules: names of the layers to process (default: every Linear/Conv/ConvTranspose);
            use it to leave out layers the batch does not reach.
        orthonormal: start from orthonormal weights (step 1); ``False`` keeps the current ones.
        zero_bias: zero the biases of the processed layers in step 1.
        generator: random generator for the orthonormal weights.

    Returns:
        An :class:`LSUVReport`: per layer in forward order, the number of rescalings, the
        achieved std and whether it is within ``tol``. A ``UserWarning`` names the layers that
        did not converge.

    Raises:
        ValueError: bad ``target_std``/``tol``/``max_iter``; a batch with fewer than 2
            samples; no layer to process; a name in ``modules`` that is not such a layer; a
            layer that never runs on ``batch`` (named); a layer whose output has fewer than 2
            elements, or whose output std is 0 or not finite (named). The weights and biases
            are then left as they were.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import gradstab
        >>> net = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> report = gradstab.init.lsuv_(net, torch.randn(256, 32))
        >>> all(abs(r.std - 1.0) <= 0.05 for r in report)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"lsuv_: model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(target_std, (int, float)) and math.isfinite(target_std) and target_std > 0):
        raise ValueError(f"lsuv_: target_std must be a finite number > 0, got {target_std!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"lsuv_: tol must be a number with 0 < tol < 1, got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"lsuv_: max_iter must be an int >= 1, got {max_iter!r}")
    first = _first_tensor(batch)
    if first is None:
        raise ValueError(f"lsuv_: batch holds no tensor (got {type(batch).__name__})")
    if first.dim() == 0 or first.shape[0] < 2:
        raise ValueError(
            f"lsuv_: the batch is too small: its first tensor has shape {tuple(first.shape)}; "
            "LSUV measures a std over the batch and needs at least 2 samples along dim 0 "
            "(use a few hundred for a stable estimate)"
        )

    named = dict(model.named_modules())
    if modules is None:
        layers = {n: m for n, m in named.items() if isinstance(m, LAYER_TYPES)}
    else:
        wanted = [modules] if isinstance(modules, str) else list(modules)
        layers = {}
        for n in wanted:
            if n not in named or not isinstance(named[n], LAYER_TYPES):
                raise ValueError(
                    f"lsuv_: modules: {n!r} is not a Linear/Conv/ConvTranspose layer of the model"
                )
            layers[n] = named[n]
    if not layers:
        raise ValueError("lsuv_: the model has no Linear/Conv/ConvTranspose layer to initialise")
    for n, m in layers.items():
        _check_materialised(n, m)

    device = next(model.parameters()).device
    batch = _to_device(batch, device)
    training = {m: m.training for m in model.modules()}
    backup = [
        (t, t.detach().clone())
        for m in layers.values()
        for t in (m.weight, m.bias)
        if t is not None
    ]
    handles: list[Any] = []
    try:
        model.eval()
        with torch.no_grad():
            # forward order (first call) and output sizes, before anything changes
            order: list[str] = []
            sizes: dict[str, int] = {}

            def order_hook(name: str) -> Callable[..., None]:
                def hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
                    if name not in sizes:
                        order.append(name)
                        sizes[name] = out.numel()
                    else:
                        sizes[name] = min(sizes[name], out.numel())

                return hook

            handles = [m.register_forward_hook(order_hook(n)) for n, m in layers.items()]
            _call(model, batch)
            for h in handles:
                h.remove()
            handles = []
            missing = [n for n in layers if n not in sizes]
            if missing:
                raise ValueError(
                    f"lsuv_: layer(s) {missing} never receive input when the model runs on the "
                    "batch, so their output variance cannot be measured; pass "
                    "modules=[...] without them"
                )
            small = [f"{n} ({sizes[n]} elements)" for n in order if sizes[n] < 2]
            if small:
                raise ValueError(
                    f"lsuv_: the batch is too small: the output of {small} has fewer than 2 "
                    "elements, so it has no std; use a larger batch"
                )

            if orthonormal:
                for m in layers.values():
                    w = m.weight
                    if w.numel():
                        w.copy_(_orthogonal(w.shape[0], w[0].numel(), w, generator).view_as(w))
            if zero_bias:
                for m in layers.values():
                    if m.bias is not None:
                        m.bias.zero_()

            report = LSUVReport()
            not_converged = []
            for name in order:
                layer = layers[name]
                iterations, std = 0, float("nan")
                converged = False
                while True:
                    moments = _Moments()
                    handle = layer.register_forward_hook(
                        lambda _m, _i, out, acc=moments: acc.add(out)
                    )
                    handles = [handle]
                    try:
                        _call(model, batch)
                    finally:
                        handle.remove()
                        handles = []
                    std = moments.std()
                    if not math.isfinite(std) or std == 0.0:
                        raise ValueError(
                            f"lsuv_: the output of layer '{name}' has std {std} on the batch "
                            "(its input is constant or not finite), so it cannot be rescaled "
                            "to a unit variance"
                        )
                    converged = abs(std / target_std - 1.0) <= tol
                    if converged or iterations == max_iter:
                        break
                    layer.weight.mul_(target_std / std)
                    iterations += 1
                if not converged:
                    not_converged.append(name)
                report.append(LSUVRecord(name, type(layer).__name__, iterations, std, converged))
    except BaseException:
        with torch.no_grad():  # an error leaves the weights as they were
            for t, saved in backup:
                t.copy_(saved)
        raise
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    if not_converged:
        warnings.warn(
            f"lsuv_: the output std of {not_converged} did not come within tol={tol} of "
            f"target_std={target_std} in max_iter={max_iter} rescalings (see the report)",
            UserWarning,
            stacklevel=2,
        )
    return report
