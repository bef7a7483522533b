"""Parameter sets built from published model shapes (GPT-2 small, ResNet-50, Llama 3.2 1B) and
a set of 1,000 small tensors: the gradient lists every benchmark mode times.

Example:
    >>> from gradstab.tools.bench.sets import PARAM_SETS
    >>> len(PARAM_SETS["gpt2"]())
    148
"""

import math
from collections.abc import Callable

import torch

from gradstab.tools.bench.config import BenchError

Shapes = list[tuple[str, tuple[int, ...]]]


def gpt2_small_shapes() -> Shapes:
    """Parameter shapes of GPT-2 small (Hugging Face ``GPT2Model`` layout).

    ``Conv1D`` weights are stored ``(in, out)``; ``lm_head`` is tied to ``wte`` and so
    not counted.  How the totals check out (d = 768)::

        wte 50257 x 768 = 38,597,376      wpe 1024 x 768 = 786,432
        per block, 12 tensors:
          weights  c_attn 768x2304 + attn.c_proj 768x768 + c_fc 768x3072
                   + mlp.c_proj 3072x768 = 12 d^2              = 7,077,888
          vectors  ln_1 2d + c_attn.b 3d + attn.c_proj.b d + ln_2 2d
                   + c_fc.b 4d + mlp.c_proj.b d = 13 d          =     9,984
                                                        block  = 7,087,872
        12 blocks = 85,054,464;  ln_f 2d = 1,536
        total = 38,597,376 + 786,432 + 85,054,464 + 1,536 = 124,439,808
        tensors = 2 + 12 x 12 + 2 = 148

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order.

    Example:
        >>> shapes = gpt2_small_shapes()
        >>> len(shapes), shapes[0]
        (148, ('wte.weight', (50257, 768)))
    """
    vocab, n_ctx, d, n_layer = 50257, 1024, 768, 12
    shapes: Shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}."
        shapes += [
            (h + "ln_1.weight", (d,)),
            (h + "ln_1.bias", (d,)),
            (h + "attn.c_attn.weight", (d, 3 * d)),
            (h + "attn.c_attn.bias", (3 * d,)),
            (h + "attn.c_proj.weight", (d, d)),
            (h + "attn.c_proj.bias", (d,)),
            (h + "ln_2.weight", (d,)),
            (h + "ln_2.bias", (d,)),
            (h + "mlp.c_fc.weight", (d, 4 * d)),
            (h + "mlp.c_fc.bias", (4 * d,)),
            (h + "mlp.c_proj.weight", (4 * d, d)),
            (h + "mlp.c_proj.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    _check_totals("gpt2", shapes, tensors=148, params=124_439_808)
    return shapes


def resnet50_shapes() -> Shapes:
    """Parameter shapes of ResNet-50 (torchvision ``resnet50`` layout).

    Convolutions have no bias; each BatchNorm contributes weight and bias (running
    statistics are buffers, not parameters).  Bottleneck stages have 3, 4, 6, 3 blocks
    of widths 64, 128, 256, 512 (expansion 4); the first block of each stage has a
    1x1 ``downsample`` convolution + BatchNorm.  How the totals check out::

        stem   conv1 64x3x7x7 + bn1                       =      9,536   (3 tensors)
        layer1 3 blocks  (downsample 64 -> 256)           =    215,808  (30 tensors)
        layer2 4 blocks  (downsample 256 -> 512)          =  1,219,584  (39 tensors)
        layer3 6 blocks  (downsample 512 -> 1024)         =  7,098,368  (57 tensors)
        layer4 3 blocks  (downsample 1024 -> 2048)        = 14,964,736  (30 tensors)
        fc     1000x2048 + 1000                           =  2,049,000   (2 tensors)
        total                                             = 25,557,032 (161 tensors)

    (9 tensors per block, 3 per downsample: 16 x 9 + 4 x 3 + 3 + 2 = 161.)

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order.

    Example:
        >>> shapes = resnet50_shapes()
        >>> len(shapes), shapes[-2]
        (161, ('fc.weight', (1000, 2048)))
    """
    expansion = 4
    shapes: Shapes = []

    def bn(name: str, c: int) -> None:
        shapes.extend([(name + ".weight", (c,)), (name + ".bias", (c,))])

    shapes.append(("conv1.weight", (64, 3, 7, 7)))
    bn("bn1", 64)
    in_ch = 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        out_ch = width * expansion
        for b in range(blocks):
            pre = f"layer{stage}.{b}."
            shapes.append((pre + "conv1.weight", (width, in_ch, 1, 1)))
            bn(pre + "bn1", width)
            shapes.append((pre + "conv2.weight", (width, width, 3, 3)))
            bn(pre + "bn2", width)
            shapes.append((pre + "conv3.weight", (out_ch, width, 1, 1)))
            bn(pre + "bn3", out_ch)
            if b == 0:
                shapes.append((pre + "downsample.0.weight", (out_ch, in_ch, 1, 1)))
                bn(pre + "downsample.1", out_ch)
            in_ch = out_ch
    shapes += [("fc.weight", (1000, in_ch)), ("fc.bias", (1000,))]
    _check_totals("resnet50", shapes, tensors=161, params=25_557_032)
    return shapes


def many_small_shapes(count: int = 1000, low: int = 256, high: int = 4096, seed: int = 0) -> Shapes:
    """``count`` 1-D tensors of sizes uniform in ``[low, high]`` (a fixed seed).

    Stands for the biases, norms and adapters of a large model: launch- and
    dispatch-bound rather than bandwidth-bound.  With the defaults the mean size is
    about 2,176 elements, so about 8.7 MB in fp32 (checked to lie in 8-9.5 MB).

    Args:
        count: number of tensors.
        low: smallest size (elements).
        high: largest size (elements), inclusive.
        seed: seed of the generator drawing the sizes.

    Returns:
        ``(name, shape)`` pairs.

    Example:
        >>> shapes = many_small_shapes()
        >>> len(shapes), 256 <= min(s[0] for _, s in shapes)
        (1000, True)
    """
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(low, high + 1, (count,), generator=gen).tolist()
    shapes: Shapes = [(f"small.{i}", (n,)) for i, n in enumerate(sizes)]
    if (count, low, high) == (1000, 256, 4096):
        fp32_bytes = 4 * sum(sizes)
        if not 8.0e6 <= fp32_bytes <= 9.5e6:
            raise BenchError(f"many-small: {fp32_bytes / 1e6:.2f} MB in fp32, expected 8-9.5 MB")
    return shapes


def _check_totals(name: str, shapes: Shapes, tensors: int, params: int) -> None:
    n = sum(math.prod(s) for _, s in shapes)
    if len(shapes) != tensors or n != params:
        raise BenchError(
            f"{name}: {len(shapes)} tensors / {n:,} params, expected {tensors} / {params:,}"
        )


#: Set name -> shape builder.
PARAM_SETS: dict[str, Callable[[], Shapes]] = {
    "gpt2": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "many-small": many_small_shapes,
}


def llama32_1b_shapes() -> Shapes:
    """Parameter shapes of Llama 3.2 1B (Hugging Face ``LlamaForCausalLM`` layout).

    Published configuration: vocabulary 128,256, hidden size 2,048, MLP size 8,192, 16
    layers, 32 query heads and 8 key/value heads of dimension 64 (so k/v projections are
    512 x 2,048), RMSNorm weights without biases, no linear biases, ``lm_head`` tied to the
    embedding (not counted). ``nn.Linear`` weights are stored ``(out, in)``. The totals::

        embed_tokens 128256 x 2048                     = 262,668,288
        per layer, 9 tensors:
          q_proj, o_proj   2 x 2048 x 2048             =   8,388,608
          k_proj, v_proj   2 x 512 x 2048              =   2,097,152
          gate, up, down   3 x 8192 x 2048             =  50,331,648
          2 RMSNorm weights 2 x 2048                   =       4,096
                                              layer    =  60,821,504
        16 layers = 973,144,064;  final norm 2048
        total = 262,668,288 + 973,144,064 + 2,048 = 1,235,814,400  (the published 1.24 B)
        tensors = 1 + 16 x 9 + 1 = 146

    Returns:
        ``(name, shape)`` pairs in ``named_parameters()`` order.

    Example:
        >>> shapes = llama32_1b_shapes()
        >>> len(shapes), shapes[0]
        (146, ('model.embed_tokens.weight', (128256, 2048)))
    """
    vocab, d, ffn, n_layer, kv = 128256, 2048, 8192, 16, 8 * 64
    shapes: Shapes = [("model.embed_tokens.weight", (vocab, d))]
    for i in range(n_layer):
        pre = f"model.layers.{i}."
        shapes += [
            (pre + "self_attn.q_proj.weight", (d, d)),
            (pre + "self_attn.k_proj.weight", (kv, d)),
            (pre + "self_attn.v_proj.weight", (kv, d)),
            (pre + "self_attn.o_proj.weight", (d, d)),
            (pre + "mlp.gate_proj.weight", (ffn, d)),
            (pre + "mlp.up_proj.weight", (ffn, d)),
            (pre + "mlp.down_proj.weight", (d, ffn)),
            (pre + "input_layernorm.weight", (d,)),
            (pre + "post_attention_layernorm.weight", (d,)),
        ]
    shapes.append(("model.norm.weight", (d,)))
    _check_totals("llama1b", shapes, tensors=146, params=1_235_814_400)
    return shapes


#: Sets that ``--set all`` (and the default) include only on CUDA; on the CPU they run only
#: when named.
GPU_SETS: dict[str, Callable[[], Shapes]] = {"llama1b": llama32_1b_shapes}
GPU_REPEATS = {"llama1b": 30}
GPU_QUICK_REPEATS = {"llama1b": 5}
