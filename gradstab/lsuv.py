"""Layer-sequential unit-variance initialisation (:func:`lsuv_`; Mishkin & Matas, "All you need
is a good init", ICLR 2016): orthonormal weights, then, layer by layer in forward order, the
weights are rescaled until the layer's output on a batch has the target std. Runs once before
training (it reads values on the host freely). The guide: docs/init_and_norm.md.

Example:
    >>> import torch
    >>> from gradstab.lsuv import lsuv_
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> report = lsuv_(model, torch.randn(64, 8), generator=torch.Generator().manual_seed(0))
    >>> len(report) > 0
    True
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

from gradstab._modules import LAYER_TYPES, RecordTable, check_materialised, orthogonal

__all__ = ["LSUVRecord", "LSUVReport", "lsuv_"]


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


class LSUVReport(RecordTable):
    """The list of :class:`LSUVRecord` records :func:`lsuv_` returns, in forward order."""

    _title = "lsuv_"


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
    _check_args(model, target_std, tol, max_iter, batch)
    layers = _select_layers(model, modules)
    device = next(model.parameters()).device
    batch = _to_device(batch, device)
    training = {m: m.training for m in model.modules()}
    backup = [
        (t, t.detach().clone())
        for m in layers.values()
        for t in (m.weight, m.bias)
        if t is not None
    ]
    try:
        model.eval()
        with torch.no_grad():
            order = _forward_order(model, batch, layers)  # before anything changes
            if orthonormal:
                for m in layers.values():
                    w = m.weight
                    if w.numel():
                        w.copy_(orthogonal(w.shape[0], w[0].numel(), w, generator).view_as(w))
            if zero_bias:
                for m in layers.values():
                    if m.bias is not None:
                        m.bias.zero_()
            report = LSUVReport()
            for name in order:
                report.append(
                    _rescale(
                        model, batch, name, layers[name],
                        target_std=target_std, tol=tol, max_iter=max_iter,
                    )
                )  # fmt: skip
    except BaseException:
        with torch.no_grad():  # an error leaves the weights as they were
            for t, saved in backup:
                t.copy_(saved)
        raise
    finally:
        for m, flag in training.items():
            m.training = flag
    not_converged = [r.name for r in report if not r.converged]
    if not_converged:
        warnings.warn(
            f"lsuv_: the output std of {not_converged} did not come within tol={tol} of "
            f"target_std={target_std} in max_iter={max_iter} rescalings (see the report)",
            UserWarning,
            stacklevel=2,
        )
    return report


def _check_args(model: nn.Module, target_std: float, tol: float, max_iter: int, batch: Any) -> None:
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


def _select_layers(model: nn.Module, modules: Union[str, Sequence[str], None]) -> dict:
    """``{name: layer}`` of the layers to initialise (every Linear/Conv by default)."""
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
        check_materialised(n, m)
    return layers


def _forward_order(model: nn.Module, batch: Any, layers: dict) -> list[str]:
    """The layers in the order the forward pass reaches them, each checked to have an output
    of at least 2 elements on the batch."""
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
    try:
        _call(model, batch)
    finally:
        for h in handles:
            h.remove()
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
    return order


def _rescale(
    model: nn.Module,
    batch: Any,
    name: str,
    layer: nn.Module,
    *,
    target_std: float,
    tol: float,
    max_iter: int,
) -> LSUVRecord:
    """Rescale one layer's weight until its output std on the batch is ``target_std``."""
    iterations = 0
    while True:
        moments = _Moments()
        handle = layer.register_forward_hook(lambda _m, _i, out, acc=moments: acc.add(out))
        try:
            _call(model, batch)
        finally:
            handle.remove()
        std = moments.std()
        if not math.isfinite(std) or std == 0.0:
            raise ValueError(
                f"lsuv_: the output of layer '{name}' has std {std} on the batch "
                "(its input is constant or not finite), so it cannot be rescaled "
                "to a unit variance"
            )
        converged = abs(std / target_std - 1.0) <= tol
        if converged or iterations == max_iter:
            return LSUVRecord(name, type(layer).__name__, iterations, std, converged)
        layer.weight.mul_(target_std / std)
        iterations += 1
