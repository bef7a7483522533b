"""The demo's task and networks: a generated classification task and the MLPs that vanish
(sigmoid, default init), are fixed (ReLU, activation-aware init, LayerNorm) or explode
(initialised too large). Used by the demo and by the examples.

Example:
    >>> import torch
    >>> from gradstab.tools.demo.models import sigmoid_mlp
    >>> sum(isinstance(m, torch.nn.Sigmoid) for m in sigmoid_mlp(depth=3))
    3
"""

import math

import torch
from torch import Tensor, nn

import gradstab

#: Input features and classes of the generated task.
IN_FEATURES = 32
CLASSES = 10


# =========================================================================== data and models


def make_data(
    n: int,
    seed: int,
    *,
    split: int = 0,
    in_features: int = IN_FEATURES,
    classes: int = CLASSES,
    clusters_per_class: int = 3,
    noise: float = 0.6,
) -> tuple[Tensor, Tensor]:
    """A generated classification task: Gaussian clusters, several per class.

    The cluster centres depend on ``seed`` only, so ``split=0`` (training) and ``split=1``
    (validation) draw different samples of the same task.  A linear model cannot separate
    the classes well (each class is a union of clusters); a small MLP reaches about 97-99%.

    Args:
        n: number of samples.
        seed: the task (cluster centres) and, with ``split``, the samples.
        split: which sample of the task (0: training, 1: validation, ...).
        in_features: input dimension.
        classes: number of classes.
        clusters_per_class: Gaussian clusters per class.
        noise: standard deviation of the samples around their centre (centres have std 1).

    Returns:
        ``(x, y)``: float32 ``[n, in_features]`` inputs and int64 ``[n]`` labels.

    Example:
        >>> x, y = make_data(8, seed=0)
        >>> tuple(x.shape), y.dtype
        ((8, 32), torch.int64)
    """
    if n < 1:
        raise ValueError(f"make_data: n must be >= 1, got {n}")
    centers_gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes * clusters_per_class, in_features, generator=centers_gen)
    gen = torch.Generator().manual_seed(seed * 7919 + 1 + split)
    idx = torch.randint(0, classes * clusters_per_class, (n,), generator=gen)
    x = centers[idx] + noise * torch.randn(n, in_features, generator=gen)
    return x, idx % classes


def mlp(
    depth: int,
    width: int,
    activation: type[nn.Module],
    *,
    in_features: int = IN_FEATURES,
    classes: int = CLASSES,
) -> nn.Sequential:
    """``depth`` hidden ``Linear(width)`` + activation layers and a linear output layer.

    Parameters are named ``"0.weight", "0.bias", "2.weight", ...`` (network order), with
    PyTorch's default initialisation.

    Example:
        >>> net = mlp(3, 16, nn.ReLU)
        >>> len(net), net[-1].out_features
        (7, 10)
    """
    if depth < 1 or width < 1:
        raise ValueError(f"mlp: depth and width must be >= 1, got {depth} and {width}")
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(in_features if i == 0 else width, width), activation()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def sigmoid_mlp(depth: int = 10, width: int = 64, **kwargs: int) -> nn.Sequential:
    """Run (a): a deep sigmoid MLP with PyTorch's default initialisation.

    The sigmoid's derivative is at most 1/4 and PyTorch's default ``Linear`` init
    (uniform, std ``1 / sqrt(3 fan_in)``) does not make up for it, so every layer shrinks the
    backpropagated gradient (by about 7x here): the first layers get almost nothing.

    Example:
        >>> isinstance(sigmoid_mlp(4, 8)[1], nn.Sigmoid)
        True
    """
    return mlp(depth, width, nn.Sigmoid, **kwargs)


def fixed_mlp(
    depth: int = 10,
    width: int = 64,
    *,
    norm: str = "layer",
    generator: torch.Generator | None = None,
    **kwargs: int,
) -> nn.Sequential:
    """Run (b): the MLP of (a) with the remedies gradstab provides.

    ReLU instead of sigmoid, a LayerNorm after every hidden ``Linear``
    (:func:`gradstab.norm.add_normalization_`; ``norm="batch"`` gives BatchNorm) and He
    initialisation for the activation that follows each layer
    (:func:`gradstab.init.init_model_`).

    Example:
        >>> net = fixed_mlp(3, 16)
        >>> [type(m).__name__ for m in net][:3]
        ['Linear', 'LayerNorm', 'ReLU']
    """
    model = mlp(depth, width, nn.ReLU, **kwargs)
    gradstab.norm.add_normalization_(model, kind=norm)
    gradstab.init.init_model_(model, generator=generator)
    return model


def exploding_mlp(
    depth: int = 10, width: int = 64, *, init_gain: float = 2.0, **kwargs: int
) -> nn.Sequential:
    """Runs (c) and (d): a deep ReLU MLP whose weights are drawn too large.

    Weights ``N(0, (init_gain / sqrt(fan_in))^2)``, biases 0.  He's init for ReLU is
    ``init_gain = sqrt(2)``; the default 2 doubles the variance, so each layer doubles the
    mean square of the activations going forward and of the gradients going backward: the
    logits start about ``2^(depth/2)`` times too large and so does the gradient.  Draws from
    the global RNG (seed it for reproducible weights).

    Example:
        >>> net = exploding_mlp(3, 256)
        >>> std = float(net[2].weight.detach().std())
        >>> abs(std * 256**0.5 - 2.0) < 0.1  # std about init_gain/16
        True
    """
    if not init_gain > 0:
        raise ValueError(f"exploding_mlp: init_gain must be > 0, got {init_gain}")
    model = mlp(depth, width, nn.ReLU, **kwargs)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=init_gain / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return model
