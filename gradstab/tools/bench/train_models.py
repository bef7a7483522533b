"""The pure-PyTorch pieces of ``bench --train --train-model transformer``.

:class:`TransformerSpec` (the sizes), :class:`TinyGPT` (a GPT-2-like decoder built from
``torch.nn`` only), :func:`token_data` (its generated next-token batches, on the device), and
:func:`fused_adamw_supported`; the Lightning modules and the timing are in
:mod:`gradstab.tools.bench.train`.

Example:
    >>> spec = TransformerSpec(layers=1, d_model=16, heads=2, seq=8, vocab=32, batch=4)
    >>> x, y = next(iter(token_data(spec, steps=2, seed=0)))
    >>> TinyGPT(spec)(x).shape
    torch.Size([4, 8, 32])
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TinyGPT", "TransformerSpec", "batched", "fused_adamw_supported", "token_data"]


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """The ``--train-model transformer`` decoder: GPT-2's layout at toy size.

    Token and position embeddings, ``layers`` pre-LayerNorm blocks (causal multi-head
    self-attention through ``F.scaled_dot_product_attention``, then a 4x MLP with tanh-GELU,
    each in a residual branch), a final LayerNorm and an LM head, tied to the token embedding
    when ``tied``; GPT-2's initialisation (normal, std 0.02; residual projections scaled by
    1/sqrt(2 * layers)).  Trained with next-token cross-entropy on ``batch`` sequences of
    ``seq`` tokens.  The defaults make 867,072 parameters in 52 tensors; one Lightning
    training step takes about 0.19 s of CPU time on one thread of a 2-core EPYC VM (fused
    AdamW, torch 2.13; 0.28 s of wall time on that VM while shared).

    Attributes:
        layers: decoder blocks (``--train-depth``).
        d_model: model width (``--train-width``), a multiple of ``heads``.
        heads: attention heads (``--train-heads``).
        seq: tokens per sequence (``--train-seq``).
        vocab: vocabulary size (``--train-vocab``).
        batch: sequences per batch (``--train-batch``).
        tied: whether the LM head shares the token embedding's weight.

    Example:
        >>> TransformerSpec(layers=1, d_model=16, heads=2).params()
        12528
    """

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    seq: int = 64
    vocab: int = 512
    batch: int = 16
    tied: bool = True

    def __post_init__(self) -> None:
        sizes = (self.layers, self.d_model, self.heads, self.seq, self.vocab, self.batch)
        if min(sizes) < 1 or self.d_model % self.heads:
            raise ValueError(
                "bench --train: the transformer needs positive sizes and d_model a multiple "
                f"of heads; got {self}"
            )

    def params(self) -> int:
        """The number of parameters (tied weights counted once)."""
        return sum(p.numel() for p in TinyGPT(self).parameters())


class _Block(nn.Module):
    """One pre-LayerNorm decoder block: causal self-attention, then the MLP."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU(approximate="tanh")
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(self.act(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """A GPT-2-like decoder built from ``torch.nn`` only (see :class:`TransformerSpec`).

    Args:
        spec: the sizes.

    Example:
        >>> m = TinyGPT(TransformerSpec(layers=1, d_model=16, heads=2, seq=8, vocab=32))
        >>> m(torch.zeros(3, 8, dtype=torch.long)).shape
        torch.Size([3, 8, 32])
    """

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.tok = nn.Embedding(spec.vocab, spec.d_model)
        self.pos = nn.Embedding(spec.seq, spec.d_model)
        self.blocks = nn.ModuleList(_Block(spec.d_model, spec.heads) for _ in range(spec.layers))
        self.ln_f = nn.LayerNorm(spec.d_model)
        self.head = nn.Linear(spec.d_model, spec.vocab, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 2:
                residual = name.endswith(("proj.weight", "out.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * spec.layers) if residual else 0.02)
        if spec.tied:
            self.head.weight = self.tok.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def fused_adamw_supported(device: torch.device | str) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` steps on ``device`` with this torch.

    Tried on a one-element parameter: torch checks the device at the first step, not in the
    constructor, and which devices have the fused kernel changes between torch versions (the
    CPU has had it since torch 2.4).

    Example:
        >>> fused_adamw_supported("cpu")  # doctest: +SKIP
        True
    """
    p = nn.Parameter(torch.zeros(1, device=device))
    p.grad = torch.ones_like(p)
    try:
        torch.optim.AdamW([p], lr=1e-3, fused=True).step()
    except (RuntimeError, TypeError, ValueError):
        return False
    return True


class _Batches(torch.utils.data.Dataset):
    """Ready-made batches (views of ``tensors``), for a ``DataLoader(batch_size=None)``: no
    per-sample indexing and collation, and on a GPU no copy from the host."""

    def __init__(self, tensors: Sequence[torch.Tensor], batch: int) -> None:
        self.tensors = tensors
        self.batch = batch

    def __len__(self) -> int:
        return self.tensors[0].shape[0] // self.batch

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i * self.batch : (i + 1) * self.batch] for t in self.tensors)


def batched(
    tensors: Sequence[torch.Tensor], batch: int, device: torch.device
) -> torch.utils.data.DataLoader:
    on_device = [t.to(device) for t in tensors]
    return torch.utils.data.DataLoader(_Batches(on_device, batch), batch_size=None)


def token_data(
    spec: TransformerSpec, steps: int, seed: int, device: torch.device | str = "cpu"
) -> torch.utils.data.DataLoader:
    """The transformer's batches: ``(tokens, next tokens)``, ``steps`` batches on ``device``.

    Each sequence is an arithmetic progression modulo the vocabulary (random start, stride 1
    to 7) with 10% of its tokens replaced at random: learnable, but not at once.

    Example:
        >>> spec = TransformerSpec(layers=1, d_model=16, heads=2, seq=8, vocab=32, batch=4)
        >>> x, y = next(iter(token_data(spec, 3, 0)))
        >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all())
        (torch.Size([4, 8]), True)
    """
    gen = torch.Generator().manual_seed(seed)
    n = steps * spec.batch
    start = torch.randint(spec.vocab, (n, 1), generator=gen)
    stride = torch.randint(1, 8, (n, 1), generator=gen)
    seq = (start + stride * torch.arange(spec.seq + 1)) % spec.vocab
    noise = torch.rand(n, spec.seq + 1, generator=gen) < 0.1
    seq = torch.where(noise, torch.randint(spec.vocab, seq.shape, generator=gen), seq)
    inputs, targets = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    return batched((inputs, targets), spec.batch, torch.device(device))
