"""Activation-aware weight initialisation (:func:`init_model_`); LSUV lives in :mod:`gradstab.lsuv`
and is re-exported here.

:func:`init_model_` runs once before training (it reads values on the host freely). It
initialises every ``Linear``/``Conv``/``ConvTranspose`` layer of a model for the activation that
follows it (He/Kaiming or Glorot/Xavier, with the gain of that activation: see
:func:`nonlinearity_gain`), recurrent layers orthogonally per gate block, biases to zero,
normalisation layers to the identity, and optionally the last layer of every residual branch
to zero. It returns one record per initialised tensor (a list that prints as a table). The
guide: docs/init_and_norm.md.

Example:
    >>> import torch, gradstab
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    >>> summary = gradstab.init.init_model_(model, generator=torch.Generator().manual_seed(0))
    >>> summary[0].scheme
    'kaiming'
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

from gradstab._modules import (
    LAYER_TYPES,
    NORM_TYPES,
    Nonlinearity,
    RecordTable,
    activation_name,
    check_materialised,
    follows,
    layer_fans,
    module_parents,
    nonlinearity_gain,
    orthogonal,
    random_like,
    resolve_nonlinearity,
    scheme_and_gain,
    std_of,
)
from gradstab.lsuv import LSUVRecord, LSUVReport, lsuv_

__all__ = [
    "LAYER_TYPES",
    "NORM_TYPES",
    "InitSummary",
    "LSUVRecord",
    "LSUVReport",
    "LayerInit",
    "init_model_",
    "layer_fans",
    "lsuv_",
    "nonlinearity_gain",
]


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


class InitSummary(RecordTable):
    """The list of :class:`LayerInit` records :func:`init_model_` returns; prints as a table."""

    _title = "init_model_"


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
        resolve_nonlinearity(value, f"nonlinearity[{key!r}]")


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
                    p[b * rows : (b + 1) * rows].copy_(gain * orthogonal(rows, cols, p, generator))
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
                        std=std_of(p),
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
    default_act = resolve_nonlinearity(default, "default")

    overrides: Mapping[Union[str, type], Nonlinearity] = {}
    global_act: nn.Module | None = None
    auto = isinstance(nonlinearity, str) and nonlinearity == "auto"
    if isinstance(nonlinearity, Mapping):
        _validate_overrides(nonlinearity, model)
        overrides, auto = nonlinearity, True
    elif not auto:
        global_act = resolve_nonlinearity(nonlinearity)

    modules = dict(model.named_modules())
    parents = module_parents(model)
    residual = _residual_targets(model, zero_init_residual)
    for name, module in modules.items():
        if isinstance(module, (*LAYER_TYPES, nn.RNNBase, nn.RNNCellBase)):
            check_materialised(name, module)

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
                act, source = resolve_nonlinearity(spec), "given"
            else:
                kind, what = follows(model, modules, parents, name) if name else ("output", None)
                if kind == "act":
                    act, source = what, "inferred"
                elif kind in ("layer", "output"):
                    act, source = None, "inferred"
                else:
                    act, source = default_act, "default"
                    unknown.append(f"{name} ({what})")
        else:
            act, source = global_act, "given"
        record = _init_layer(
            name, module, act, source, mode=mode, distribution=distribution,
            zero_bias=zero_bias, generator=generator,
        )  # fmt: skip
        summary.append(record)
        by_name[name] = record
    _zero_residual_targets(residual, modules, by_name, summary)
    if unknown:
        _warn_unknown(unknown, default_act)
    return summary


def _init_layer(
    name: str,
    module: nn.Module,
    act: nn.Module | None,
    source: str,
    *,
    mode: str,
    distribution: str,
    zero_bias: bool,
    generator: torch.Generator | None,
) -> LayerInit:
    """Draw one layer's weight for the activation ``act`` that follows it (None: linear)."""
    scheme, gain = scheme_and_gain(act)
    fan_in, fan_out = layer_fans(module)
    if scheme == "kaiming":
        fan = fan_in if mode == "fan_in" else fan_out
        std = gain / math.sqrt(fan) if fan > 0 else 0.0
    else:
        std = gain * math.sqrt(2.0 / (fan_in + fan_out)) if fan_in + fan_out > 0 else 0.0
    w = module.weight
    with torch.no_grad():
        if distribution == "normal":
            w.copy_(random_like(w, "normal", generator) * std)
        else:
            w.copy_(random_like(w, "uniform", generator) * (math.sqrt(3.0) * std))
        if zero_bias and module.bias is not None:
            module.bias.zero_()
    return LayerInit(
        name=name,
        type=type(module).__name__,
        fan_in=fan_in,
        fan_out=fan_out,
        scheme=scheme,
        nonlinearity=activation_name(act),
        source=source,
        gain=gain,
        target_std=std,
        std=std_of(w),
    )


def _zero_residual_targets(
    residual: list[tuple[str, str]],
    modules: Mapping[str, nn.Module],
    by_name: dict[str, LayerInit],
    summary: InitSummary,
) -> None:
    """Zero the last layer (or norm scale) of each residual branch, and record it."""
    for _branch, target in residual:
        layer = modules[target]
        with torch.no_grad():
            layer.weight.zero_()
            if isinstance(layer, LAYER_TYPES) and layer.bias is not None:
                layer.bias.zero_()
        if target in by_name:
            rec = by_name[target]
            rec.scheme, rec.gain, rec.target_std, rec.std = "zero (residual)", 0.0, 0.0, 0.0
            continue
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


def _warn_unknown(unknown: list[str], default_act: nn.Module | None) -> None:
    more = f", ... ({len(unknown)} in all)" if len(unknown) > 20 else ""
    shown = ", ".join(unknown[:20]) + more
    warnings.warn(
        f"init_model_: cannot tell which activation follows {len(unknown)} layer(s), because "
        "they are not followed by an activation module in an nn.Sequential (activations "
        "applied in a custom forward(), such as F.relu, are invisible): "
        f"{shown}. They were initialised for the default "
        f"{activation_name(default_act)!r}; pass nonlinearity={{name or type: nonlinearity}} "
        "to set them.",
        UserWarning,
        stacklevel=3,
    )
