"""Weight standardisation and normalisation layers.

- :class:`WSConv2d`, :class:`WSLinear`: weight standardisation (Qiao et al. 2019, "Micro-Batch
  Training with Batch-Channel Normalization and Weight Standardization"): the forward pass
  uses, per output unit ``i`` over its fan-in ``N``,
  ``W_hat[i] = (W[i] - mu_i) / sigma_i`` with ``mu_i`` the mean and ``sigma_i^2`` the (biased)
  variance of ``W[i]``, so every output unit's effective weights have mean 0 and variance 1.
- :class:`ScaledWSConv2d`, :class:`ScaledWSLinear`: Scaled Weight Standardization of the
  normaliser-free ResNets (Brock, De & Smith 2021, "Characterizing signal propagation to close
  the performance gap in unnormalized ResNets"; and NFNets, Brock et al. 2021):
  ``W_hat[i] = g_i * gamma * (W[i] - mu_i) / (sigma_i * sqrt(N))``, with a learnable gain
  ``g`` per output unit (initialised to 1) and a fixed ``gamma`` that undoes the variance an
  activation removes (:func:`nf_gamma`). Each output unit's effective weights then have a
  squared norm of ``(g_i * gamma)^2``, so a unit-variance input gives an output of variance
  ``(g_i * gamma)^2``, independent of the width.
- :func:`convert_weight_standardization_` switches a model's ``Conv2d``/``Linear`` layers to
  those, in place; :func:`add_normalization_` inserts BatchNorm/LayerNorm/GroupNorm layers
  after the Linear/Conv layers of ``nn.Sequential`` stacks.

The ``eps`` of both standardisations is added to ``N * sigma_i^2`` (the sum of squared
deviations over the fan-in), which is O(1) for the usual initialisations, so its effect does
not depend on the layer width: ``W_hat = sqrt(N) (W - mu) / sqrt(N sigma^2 + eps)`` (WS) and
``W_hat = g gamma (W - mu) / sqrt(N sigma^2 + eps)`` (scaled WS).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradstab._modules import (
    NORM_TYPES,
    RecordTable,
    follows,
    gauss_moments,
    is_plain_sequential,
    module_parents,
    resolve_nonlinearity,
)

__all__ = [
    "NormInsertion",
    "NormInsertions",
    "ScaledWSConv2d",
    "ScaledWSLinear",
    "WSConv2d",
    "WSLinear",
    "add_normalization_",
    "convert_weight_standardization_",
    "nf_gamma",
    "standardize_weight",
]

#: Default epsilon, added to ``N * sigma^2`` (see the module docstring).
EPS = 1e-4


def standardize_weight(
    weight: Tensor,
    *,
    eps: float = EPS,
    scaled: bool = False,
    gain: Tensor | None = None,
    gamma: float = 1.0,
) -> Tensor:
    """Standardise a weight per output unit (dim 0) over its fan-in (all other dims).

    ``scaled=False``: ``sqrt(N) * (W - mu) / sqrt(N * sigma^2 + eps)`` (mean 0, variance 1 per
    unit). ``scaled=True``: ``gain * gamma * (W - mu) / sqrt(N * sigma^2 + eps)`` (squared norm
    ``(gain * gamma)^2`` per unit), ``gain`` broadcasting against the weight (``[out, 1, ...]``).
    ``mu`` and ``sigma^2`` are the mean and biased variance over the fan-in ``N``. float16 and
    bfloat16 weights are standardised in float32; the result has the weight's dtype.
    Differentiable.

    Args:
        weight: ``[out, ...]`` weight with a fan-in of at least 2.
        eps: added to ``N * sigma^2``, >= 0.
        scaled: Scaled WS (NF-ResNets) instead of plain WS.
        gain: learnable per-unit gain for ``scaled=True`` (``None``: 1).
        gamma: fixed activation gain for ``scaled=True`` (see :func:`nf_gamma`).

    Returns:
        The standardised weight, same shape and dtype.

    Example:
        >>> import torch
        >>> from gradstab.norm import standardize_weight
        >>> w = standardize_weight(torch.randn(16, 3, 3, 3))
        >>> bool(w.flatten(1).mean(1).abs().max() < 1e-5)
        True
    """
    fan_in = weight[0].numel() if weight.shape[0] else math.prod(weight.shape[1:])
    w = weight if weight.dtype in (torch.float32, torch.float64) else weight.float()
    dims = tuple(range(1, w.dim()))
    var, mean = torch.var_mean(w, dim=dims, correction=0, keepdim=True)
    out = (w - mean) * torch.rsqrt(var * fan_in + eps)
    if scaled:
        if gamma != 1.0:
            out = out * gamma
        if gain is not None:
            out = out * gain.to(out.dtype)
    else:
        out = out * math.sqrt(fan_in)
    return out.to(weight.dtype)


def nf_gamma(nonlinearity: str | nn.Module | None) -> float:
    """The fixed gain ``gamma`` of Scaled WS for an activation: ``1 / std(f(z))``, ``z ~ N(0, 1)``.

    With it, a unit-variance pre-activation passed through the activation and a Scaled WS
    layer comes out with unit variance again (Brock et al. 2021); e.g. ReLU:
    ``sqrt(2 / (1 - 1/pi)) ~ 1.7129``. Computed by numerical integration in float64.

    Args:
        nonlinearity: a name (``"relu"``, ``"gelu"``, ...), an activation module, or ``None``
            (identity: 1).

    Returns:
        ``gamma``.

    Example:
        >>> from gradstab.norm import nf_gamma
        >>> round(nf_gamma("relu"), 4)
        1.7129
    """
    act = resolve_nonlinearity(nonlinearity)
    if act is None:
        return 1.0
    m1, m2 = gauss_moments(act)
    return 1.0 / math.sqrt(m2 - m1 * m1)


def _check_eps(eps: float, cls: str) -> float:
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{cls}: eps must be a finite number >= 0, got {eps!r}")
    return float(eps)


def _check_fan_in(weight: Tensor, cls: str) -> None:
    fan_in = math.prod(weight.shape[1:])
    if fan_in < 2:
        raise ValueError(
            f"{cls}: weight standardisation needs a fan-in of at least 2 (a single weight per "
            f"output unit standardises to 0), got weight shape {tuple(weight.shape)}"
        )


class _WSMixin:
    """Shared state of the weight-standardised layers (set by ``_setup_ws``)."""

    weight: Tensor
    eps: float
    gamma: float

    def _setup_ws(self, eps: float, scaled: bool, gamma: float) -> None:
        name = type(self).__name__
        self.eps = _check_eps(eps, name)
        _check_fan_in(self.weight, name)
        if scaled:
            if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
                raise ValueError(f"{name}: gamma must be a finite number > 0, got {gamma!r}")
            self.gamma = float(gamma)
            shape = (self.weight.shape[0],) + (1,) * (self.weight.dim() - 1)
            self.gain = nn.Parameter(
                torch.ones(shape, device=self.weight.device, dtype=self.weight.dtype)
            )

    def standardized_weight(self) -> Tensor:
        """The weight the forward pass uses."""
        gain = getattr(self, "gain", None)
        if gain is None:
            return standardize_weight(self.weight, eps=self.eps)
        return standardize_weight(
            self.weight, eps=self.eps, scaled=True, gain=gain, gamma=self.gamma
        )


class WSConv2d(_WSMixin, nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation in the forward pass.

    Takes ``nn.Conv2d``'s arguments plus ``eps``; the stored ``weight`` is the raw,
    unstandardised parameter (state-dict compatible with ``nn.Conv2d``). Meant to be followed by
    a normalisation layer (GroupNorm, BatchNorm): with unit-variance weights the output variance
    grows with the fan-in.

    Example:
        >>> import torch
        >>> from gradstab.norm import WSConv2d
        >>> conv = WSConv2d(3, 8, 3, padding=1)
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    def __init__(self, *args: Any, eps: float = EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_ws(eps, scaled=False, gamma=1.0)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class WSLinear(_WSMixin, nn.Linear):
    """``nn.Linear`` with weight standardisation in the forward pass.

    Takes ``nn.Linear``'s arguments plus ``eps``; see :class:`WSConv2d`.

    Example:
        >>> import torch
        >>> from gradstab.norm import WSLinear
        >>> WSLinear(16, 4)(torch.randn(2, 16)).shape
        torch.Size([2, 4])
    """

    def __init__(self, *args: Any, eps: float = EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_ws(eps, scaled=False, gamma=1.0)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}"


class ScaledWSConv2d(_WSMixin, nn.Conv2d):
    """``nn.Conv2d`` with Scaled Weight Standardization (NF-ResNets) in the forward pass.

    ``W_hat = gain * gamma * (W - mu) / sqrt(N * sigma^2 + eps)`` per output channel, with the
    learnable ``gain`` (shape ``[out, 1, 1, 1]``, initialised to 1) and the fixed ``gamma``
    (e.g. :func:`nf_gamma` of the activation before the layer). Takes ``nn.Conv2d``'s arguments
    plus ``gamma`` and ``eps``. Its state dict is ``nn.Conv2d``'s plus ``gain``.

    Example:
        >>> import torch
        >>> from gradstab.norm import ScaledWSConv2d, nf_gamma
        >>> conv = ScaledWSConv2d(3, 8, 3, padding=1, gamma=nf_gamma("relu"))
        >>> conv(torch.randn(2, 3, 16, 16)).shape
        torch.Size([2, 8, 16, 16])
    """

    gain: nn.Parameter

    def __init__(self, *args: Any, gamma: float = 1.0, eps: float = EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_ws(eps, scaled=True, gamma=gamma)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "gain" in self._parameters:
            with torch.no_grad():
                self.gain.fill_(1.0)

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.6g}, eps={self.eps}"


class ScaledWSLinear(_WSMixin, nn.Linear):
    """``nn.Linear`` with Scaled Weight Standardization (NF-ResNets) in the forward pass.

    See :class:`ScaledWSConv2d`; ``gain`` has shape ``[out_features, 1]``.

    Example:
        >>> import torch
        >>> from gradstab.norm import ScaledWSLinear
        >>> ScaledWSLinear(16, 4)(torch.randn(2, 16)).shape
        torch.Size([2, 4])
    """

    gain: nn.Parameter

    def __init__(self, *args: Any, gamma: float = 1.0, eps: float = EPS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._setup_ws(eps, scaled=True, gamma=gamma)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if "gain" in self._parameters:
            with torch.no_grad():
                self.gain.fill_(1.0)

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.6g}, eps={self.eps}"


def _exclusion(names: Iterable[str], exclude: Iterable[str], fn: str) -> Callable[[str], bool]:
    """A predicate: is a module name at or under one of ``exclude`` (validated)?"""
    known = set(names)
    excluded = [exclude] if isinstance(exclude, str) else list(exclude)
    for e in excluded:
        if not isinstance(e, str) or e not in known:
            raise ValueError(f"{fn}: exclude: no module named {e!r} in the model")

    def is_excluded(name: str) -> bool:
        return any(e in (name, "") or name.startswith(e + ".") for e in excluded)

    return is_excluded


_WS_CLASSES: dict[tuple[type[nn.Module], bool], type[nn.Module]] = {
    (nn.Conv2d, False): WSConv2d,
    (nn.Linear, False): WSLinear,
    (nn.Conv2d, True): ScaledWSConv2d,
    (nn.Linear, True): ScaledWSLinear,
}


def convert_weight_standardization_(
    model: nn.Module,
    scaled: bool = False,
    *,
    gamma: float = 1.0,
    eps: float = EPS,
    exclude: Iterable[str] = (),
) -> list[str]:
    """Turn the ``nn.Conv2d``/``nn.Linear`` layers of a model into (scaled) WS layers, in place.

    Each converted module keeps its identity: its class becomes :class:`WSConv2d`/
    :class:`WSLinear` (``scaled=False``) or :class:`ScaledWSConv2d`/:class:`ScaledWSLinear`
    (``scaled=True``), the way ``torch.nn.utils.parametrize`` swaps classes. So the weight and
    bias stay the same ``Parameter`` objects (same values, device and dtype; an optimizer that
    holds them keeps working), hooks and references to the module stay valid, and it works
    for layers used in a custom ``forward()`` too. Scaled layers get a new ``gain`` parameter
    (ones, on the weight's device and dtype): add it to an existing optimizer, or convert
    before building one; loading a pre-conversion state dict then needs ``strict=False``.

    Only modules whose class is exactly ``nn.Conv2d`` or ``nn.Linear`` are converted
    (subclasses may have their own forward: e.g. ``nn.MultiheadAttention``'s ``out_proj``,
    whose weight the attention reads directly). Layers with a fan-in below 2 are skipped with
    a warning (standardising a single weight gives 0). A layer whose weight its parent reads
    directly (``F.linear(x, self.fc.weight)``) is converted but the parent does not see it.

    Args:
        model: the module to convert (itself included, if it is such a layer).
        scaled: Scaled WS (NF-ResNets) instead of plain WS.
        gamma: fixed activation gain of the scaled layers (see :func:`nf_gamma`).
        eps: see :func:`standardize_weight`.
        exclude: names of modules to leave alone (with everything under them), e.g. the
            classifier.

    Returns:
        The qualified names of the converted modules (``""`` for the model itself).

    Raises:
        ValueError: a name in ``exclude`` that names no module; a bad ``gamma`` or ``eps``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import gradstab
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
        >>> gradstab.norm.convert_weight_standardization_(net, exclude=["4"])
        ['0']
        >>> type(net[0]).__name__
        'WSConv2d'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"convert_weight_standardization_: model must be an nn.Module, got "
            f"{type(model).__name__}"
        )
    fn = "convert_weight_standardization_"
    eps = _check_eps(eps, fn)
    if scaled and not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"{fn}: gamma must be a finite number > 0, got {gamma!r}")
    names = dict(model.named_modules())
    is_excluded = _exclusion(names, exclude, fn)

    converted, too_small = [], []
    for name, module in names.items():
        base = type(module)
        if base not in (nn.Conv2d, nn.Linear) or is_excluded(name):
            continue
        if math.prod(module.weight.shape[1:]) < 2:
            too_small.append(name)
            continue
        module.__class__ = _WS_CLASSES[(base, scaled)]
        module._setup_ws(eps, scaled=scaled, gamma=gamma)  # type: ignore[operator]
        converted.append(name)
    if too_small:
        warnings.warn(
            f"{fn}: left {too_small} unconverted: a fan-in of 1 standardises to 0",
            UserWarning,
            stacklevel=2,
        )
    return converted


# ---------------------------------------------------------------------------------------------
# add_normalization_
# ---------------------------------------------------------------------------------------------


@dataclass
class NormInsertion:
    """One normalisation layer inserted by :func:`add_normalization_`.

    Attributes:
        name: qualified name of the inserted module.
        after: qualified name of the layer it follows (after the call).
        type: class name of the inserted module.
        num_features: the channel/feature count it normalises.
        groups: number of groups (GroupNorm), else 0.
    """

    name: str
    after: str
    type: str
    num_features: int
    groups: int


class NormInsertions(RecordTable):
    """The list of :class:`NormInsertion` records; prints as a table."""

    _title = "add_normalization_"


_DEFAULT_AFTER: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

_BATCH_NORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}

GroupsSpec = Union[int, Callable[[int], int]]


def _features_and_dims(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, nn.Linear):
        return layer.out_features, 1
    if isinstance(layer, nn.modules.conv._ConvNd):
        return layer.out_channels, len(layer.kernel_size)
    raise TypeError(f"not a Linear/Conv layer: {layer!r}")


def _make_norm(
    layer: nn.Module,
    *,
    kind: str,
    groups: GroupsSpec,
    eps: float | None,
    affine: bool,
    name: str,
) -> tuple[nn.Module, int]:
    features, dims = _features_and_dims(layer)
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    extra = {} if eps is None else {"eps": eps}
    if kind == "batch":
        return _BATCH_NORMS[dims](features, affine=affine, **extra, **factory), 0
    if kind == "layer" and isinstance(layer, nn.Linear):
        return nn.LayerNorm(features, elementwise_affine=affine, **extra, **factory), 0
    if kind == "layer":  # a conv: LayerNorm over (C, *spatial) = GroupNorm with one group
        g = 1
    elif callable(groups):
        g = int(groups(features))
        if g < 1 or features % g:
            raise ValueError(
                f"add_normalization_: groups({features}) returned {g} for '{name}', which does "
                f"not divide its {features} channels"
            )
    else:
        g = math.gcd(features, groups)
    return nn.GroupNorm(g, features, affine=affine, **extra, **factory), g


def add_normalization_(
    model: nn.Module,
    kind: str = "batch",
    after: tuple[type[nn.Module], ...] = _DEFAULT_AFTER,
    groups: GroupsSpec = 32,
    *,
    eps: float | None = None,
    affine: bool = True,
    skip_output: bool = True,
    exclude: Iterable[str] = (),
) -> NormInsertions:
    """Insert a normalisation layer right after each Linear/Conv layer of ``nn.Sequential`` stacks.

    For every layer of a type in ``after`` that is a child of an ``nn.Sequential`` (nested ones
    included; a Sequential subclass with its own ``forward`` does not count), a new module is
    inserted right behind it (before its activation: Linear/Conv, norm, activation), created on
    the layer's weight's device and dtype:

    =========  =========================  ===========================================
    kind       after Linear(F)            after ConvNd / ConvTransposeNd(C)
    =========  =========================  ===========================================
    "batch"    BatchNorm1d(F)             BatchNorm1d/2d/3d(C) by the conv's dimension
    "layer"    LayerNorm(F) (last dim)    GroupNorm(1, C) (LayerNorm over C and space)
    "group"    GroupNorm(g, F)            GroupNorm(g, C)
    =========  =========================  ===========================================

    ``g`` is ``gcd(C, groups)`` for an int ``groups`` (32 groups, or fewer where ``C`` is not a
    multiple of 32; the record says which), or ``groups(C)`` for a callable. BatchNorm1d and
    GroupNorm after a Linear expect ``[N, F]`` (or ``[N, F, L]``) inputs, LayerNorm normalises
    the last dim of any shape.

    Skipped: layers already followed directly by a normalisation layer (so a second call adds
    nothing), layers under a name in ``exclude``, and, with ``skip_output``, the model's output
    layer (one followed by nothing but dropout/identity-like modules up to the end of the model,
    when the model is a Sequential: normalising logits or regression outputs is rarely wanted).

    What it cannot rewrite: layers called from a custom ``forward()`` (module attributes such as
    a ResNet block's ``self.conv1``, ``nn.ModuleList``/``nn.ModuleDict`` items, a Sequential
    subclass that overrides ``forward``), because inserting a module there would not put it on
    the data path; those layers are listed in a ``UserWarning``. Such models need the
    normalisation written into their code, or :func:`convert_weight_standardization_` (which
    works anywhere) with a norm the code already has.

    Naming: in a Sequential with the default keys ``"0", "1", ...`` the keys are renumbered,
    as ``nn.Sequential.insert`` does, so the state-dict keys of later layers shift; in a
    Sequential built from an ``OrderedDict`` the existing keys stay and the new module is
    named ``"<layer key>_norm"``. The new parameters are not in any existing optimizer: call
    this before building one.

    Args:
        model: the module to modify (in place).
        kind: ``"batch"``, ``"layer"`` or ``"group"``.
        after: layer types to follow with a norm; each must be a Linear, ConvNd or
            ConvTransposeNd class (or subclass).
        groups: GroupNorm groups for ``kind="group"``: an int >= 1, or a callable
            ``channels -> groups`` that must divide the channels.
        eps: the norms' eps (default: each norm's own default).
        affine: learnable affine parameters in the norms.
        skip_output: do not normalise the model's output layer.
        exclude: names of modules to leave alone (with everything under them).

    Returns:
        A :class:`NormInsertions` list (one :class:`NormInsertion` per new module, in the
        model's ``named_modules`` order, with the names valid after the call), which prints
        as a table.

    Raises:
        ValueError: a bad ``kind``, ``groups`` or ``eps``; a name in ``exclude`` that names no
            module; a callable ``groups`` that does not divide a layer's channels.
        TypeError: ``after`` holds a type that is not a Linear/Conv class.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import gradstab
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        >>> added = gradstab.norm.add_normalization_(net, kind="layer")
        >>> [(r.name, r.type) for r in added]
        [('1', 'LayerNorm')]
        >>> net(torch.randn(4, 8)).shape
        torch.Size([4, 2])
    """
    fn = "add_normalization_"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if kind not in ("batch", "layer", "group"):
        raise ValueError(f"{fn}: kind must be 'batch', 'layer' or 'group', got {kind!r}")
    after_types = (after,) if isinstance(after, type) else tuple(after)
    for t in after_types:
        if not (isinstance(t, type) and issubclass(t, (nn.Linear, nn.modules.conv._ConvNd))):
            raise TypeError(f"{fn}: after must hold Linear/Conv/ConvTranspose classes, got {t!r}")
    if not callable(groups) and (
        isinstance(groups, bool) or not isinstance(groups, int) or groups < 1
    ):
        raise ValueError(f"{fn}: groups must be an int >= 1 or a callable, got {groups!r}")
    if eps is not None and not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps must be a finite number > 0 or None, got {eps!r}")
    named = dict(model.named_modules())
    is_excluded = _exclusion(named, exclude, fn)

    def qualified(parent: str, key: str) -> str:
        return f"{parent}.{key}" if parent else key

    parents = module_parents(model)
    # decide everything on the unmodified model first
    plan: dict[str, list[tuple[str, nn.Module]]] = {}  # sequential name -> [(key, layer)]
    unreachable: list[str] = []
    for name, module in named.items():
        if not isinstance(module, after_types) or is_excluded(name):
            continue
        if not name or not is_plain_sequential(named[parents[name][0]]):
            unreachable.append(name)
            continue
        parent_name, key = parents[name]
        seq = named[parent_name]
        keys = list(seq._modules)
        nxt = keys.index(key) + 1
        if nxt < len(keys) and isinstance(seq._modules[keys[nxt]], NORM_TYPES):
            continue
        if skip_output and follows(model, named, parents, name)[0] == "output":
            continue
        plan.setdefault(parent_name, []).append((key, module))

    inserted: dict[int, tuple[nn.Module, str, int]] = {}  # id(norm) -> (its Sequential, key
    # of the layer before it, groups)
    for parent_name, items in plan.items():
        seq = named[parent_name]
        old = list(seq._modules.items())
        numbered = [k for k, _ in old] == [str(i) for i in range(len(old))]
        targets = {k for k, _ in items}
        new: list[tuple[str, nn.Module]] = []
        pending: list[tuple[int, nn.Module, int]] = []  # (index of the norm in new, norm, groups)
        for k, m in old:
            new.append((k, m))
            if k in targets:
                norm, g = _make_norm(
                    m,
                    kind=kind,
                    groups=groups,
                    eps=eps,
                    affine=affine,
                    name=qualified(parent_name, k),
                )
                key = f"{k}_norm"
                n = 1
                while key in seq._modules or any(key == kk for kk, _ in new):
                    key, n = f"{k}_norm{n}", n + 1
                new.append((key, norm))
                pending.append((len(new) - 1, norm, g))
        if numbered:
            new = [(str(i), m) for i, (_, m) in enumerate(new)]
        seq._modules.clear()
        seq._modules.update(new)
        for index, norm, g in pending:
            inserted[id(norm)] = (seq, new[index - 1][0], g)

    # names are final only now (an outer Sequential may have been renumbered after an inner one)
    final = {id(m): name for name, m in model.named_modules()}
    records = NormInsertions()
    for name, norm in model.named_modules():
        if id(norm) not in inserted:
            continue
        seq, layer_key, g = inserted[id(norm)]
        if isinstance(norm, nn.LayerNorm):
            features = norm.normalized_shape[0]
        elif isinstance(norm, nn.GroupNorm):
            features = norm.num_channels
        else:
            features = norm.num_features
        records.append(
            NormInsertion(
                name=name,
                after=qualified(final[id(seq)], layer_key),
                type=type(norm).__name__,
                num_features=int(features),
                groups=g,
            )
        )
    if unreachable:
        shown = ", ".join(unreachable[:20]) + (
            f", ... ({len(unreachable)} in all)" if len(unreachable) > 20 else ""
        )
        warnings.warn(
            f"{fn}: {len(unreachable)} layer(s) are not children of an nn.Sequential (they are "
            f"called from a custom forward()), so no normalisation was inserted after them: "
            f"{shown}",
            UserWarning,
            stacklevel=2,
        )
    return records
