"""A small pre-norm Transformer encoder for byte-token texts, its norm the variant's (issue 13 §2).

Inputs are (B, L) token ids padded with `TEXT_PAD` (app.core.dataset_format); the padding mask is derived from the
ids inside the forward, so the engine calls it like any network (one tensor in), stacked under torch.func.vmap.
Padding never reaches a real token: attention masks padded keys, the pooled mean counts real tokens only, the
per-token norms (`ln`, `rmsnorm`, `gn`) see one token at a time, and `bn` (MaskedBatchNorm) takes its batch
statistics, and its running statistics, over real tokens only. A real token's output is therefore the same
whatever padding follows it (tests/test_text.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from app.core import catalogue
from app.core.dataset_format import TEXT_PAD, TEXT_VOCAB
from models.norms import get_norm_layer

__all__ = ["MaskedBatchNorm", "TextTransformer", "TokenNorm", "build_transformer"]

EMBED_STD = 0.02


class TokenNorm(nn.Module):
    """A zoo norm (`ln`, `rmsnorm`, `gn`, `none`) over each token's channels: (B, T, D) normalized as (B·T, D)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.layer(x.reshape(-1, x.shape[-1])).view(x.shape)


class MaskedBatchNorm(nn.Module):
    """`bn` for token sequences: each channel normalized by the mean and (biased) variance over the batch's real
    tokens, `mask` True, never the padding; the running statistics (unbiased variance, momentum 0.1, as
    BatchNorm) take the same real-token statistics and are used at evaluation. Updated out of place + copy_,
    which torch.func.vmap batches (packed runs keep stacked statistics)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.num_batches_tracked: torch.Tensor
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def batch_stats(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance over the real tokens of x (B, T, D), and their count."""
        m = mask.unsqueeze(-1).to(x.dtype)
        n = m.sum()
        mean = (x * m).sum((0, 1)) / n.clamp(min=1)
        var = ((x - mean).square() * m).sum((0, 1)) / n.clamp(min=1)
        return mean, var, n

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.training:
            mean, var, n = self.batch_stats(x, mask)
            with torch.no_grad():
                dtype = self.running_mean.dtype
                unbiased = (var * n / (n - 1).clamp(min=1)).to(dtype)
                self.running_mean.copy_(torch.lerp(self.running_mean, mean.detach().to(dtype), self.momentum))
                self.running_var.copy_(torch.lerp(self.running_var, unbiased.detach(), self.momentum))
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, masked"


TokenNormLayer = Callable[[int], nn.Module]


class SelfAttention(nn.Module):
    """Multi-head self-attention whose keys exclude padding (written out: vmap batches every op of it)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
        # The dtype's lowest value, not -inf: a row with no real key (never uploaded) stays finite.
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.out(out)


class Block(nn.Module):
    """Pre-norm block: x + attention(norm1(x)), then x + MLP(norm2(x)) with a 4×width GELU MLP."""

    def __init__(self, width: int, heads: int, norm: TokenNormLayer) -> None:
        super().__init__()
        self.norm1 = norm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = norm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, mask), mask)
        return x + self.mlp(self.norm2(x, mask))


class TextTransformer(nn.Module):
    """Token + learned position embeddings, `layers` pre-norm blocks, a final norm, the mean over real tokens
    and a linear head."""

    def __init__(
        self, length: int, num_classes: int, width: int, layers: int, heads: int, norm: TokenNormLayer
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(TEXT_VOCAB, width)
        self.pos = nn.Parameter(torch.empty(length, width))
        nn.init.normal_(self.embed.weight, std=EMBED_STD)
        nn.init.normal_(self.pos, std=EMBED_STD)
        self.blocks = nn.ModuleList(Block(width, heads, norm) for _ in range(layers))
        self.norm = norm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = tokens != TEXT_PAD
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x, mask)
        m = mask.unsqueeze(-1).to(x.dtype)
        return self.head((x * m).sum(1) / m.sum(1).clamp(min=1))


def build_transformer(
    input_shape: tuple[int, ...],
    num_classes: int,
    norm: str,
    norm_params: catalogue.NormParams,
    *,
    width: int,
    layers: int,
    heads: int,
) -> TextTransformer:
    """The transformer for texts of `input_shape` = (L,) tokens; CatalogueError for a norm it does not take."""
    if len(input_shape) != 1:
        raise catalogue.CatalogueError(f"architecture 'transformer' needs (L,) token inputs; got shape {input_shape}")
    sites = catalogue.norm_sites("transformer", width=width, layers=layers, heads=heads)
    catalogue.check_variant(norm, norm_params, sites, arch="transformer")
    if norm == "bn":
        layer: TokenNormLayer = MaskedBatchNorm
    else:  # gn: the transformer's default groups (catalogue.TRANSFORMER_GN_GROUPS) unless set
        zoo = get_norm_layer(norm, **catalogue.transformer_norm_params(norm, norm_params, width))

        def layer(channels: int) -> nn.Module:
            return TokenNorm(zoo(channels))

    return TextTransformer(input_shape[0], num_classes, width, layers, heads, layer)
