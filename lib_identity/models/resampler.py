"""The perceiver Resampler of IP-Adapter Plus, InstantID, FaceID-Plus and PhotoMaker V2.

Attribute names and the forward math follow tencent-ailab/IP-Adapter ``ip_adapter/resampler.py``
(identical in InstantID and PhotoMaker). The official attention scales q and k by
``dim_head ** -0.25`` each and takes the softmax in float32; that is softmax(q·kᵀ/√dim_head)·v,
which ``scaled_dot_product_attention`` computes with its default scale (fused, float32
accumulation), so it is used here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    """LayerNorm → Linear (×mult) → GELU → Linear, bias-free Linears; keys ``0``, ``1``, ``3``."""
    inner = int(dim * mult)
    return nn.Sequential(
        nn.LayerNorm(dim),
        nn.Linear(dim, inner, bias=False),
        nn.GELU(),
        nn.Linear(inner, dim, bias=False),
    )


class PerceiverAttention(nn.Module):
    """Latents attend to the (normalised) input features and to themselves."""

    def __init__(self, *, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.dim_head = dim_head
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x)
        latents = self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        # keys and values come from the features and the latents together
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        out = F.scaled_dot_product_attention(self._split_heads(q), self._split_heads(k), self._split_heads(v))
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


def _layers(dim: int, depth: int, dim_head: int, heads: int, ff_mult: int) -> nn.ModuleList:
    # layers.i.0 is the attention, layers.i.1 the feed-forward, as in the official files
    return nn.ModuleList(
        nn.ModuleList([PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads), feed_forward(dim, ff_mult)])
        for _ in range(depth)
    )


def _run_layers(layers: nn.ModuleList, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    for attn, ff in layers:
        latents = attn(x, latents) + latents
        latents = ff(latents) + latents
    return latents


class Resampler(nn.Module):
    """Learned query latents that read the input features: ``[B, N, E] -> [B, num_queries, output_dim]``.

    IP-Adapter plus / plus-face take CLIP ``hidden_states[-2]`` (E = 1280); InstantID takes the
    ArcFace embedding as one token (E = 512); a 2-D ``[B, E]`` input is taken as that one token.
    """

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, num_queries: int,
                 embedding_dim: int, output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = _layers(dim, depth, dim_head, heads, ff_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        x = x.to(self.latents.dtype)  # encoders hand over float32; the adapter may be half
        latents = self.latents.expand(x.shape[0], -1, -1)
        latents = _run_layers(self.layers, self.proj_in(x), latents)
        return self.norm_out(self.proj_out(latents))


class FacePerceiverResampler(nn.Module):
    """The Resampler without its own latents: the caller's tokens are refined by the features.

    ``forward(latents [B, T, dim], x [B, N, embedding_dim]) -> [B, T, output_dim]``
    (FaceID-Plus: ID tokens refined by CLIP hidden states; PhotoMaker V2 likewise).
    """

    def __init__(self, *, dim: int, depth: int, dim_head: int, heads: int, embedding_dim: int,
                 output_dim: int, ff_mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = _layers(dim, depth, dim_head, heads, ff_mult)

    def forward(self, latents: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        dtype = self.proj_in.weight.dtype
        latents = _run_layers(self.layers, self.proj_in(x.to(dtype)), latents.to(dtype))
        return self.norm_out(self.proj_out(latents))


def perceiver_kwargs(params: dict) -> dict:
    """The constructor arguments of ``FacePerceiverResampler`` from a ``ModelInfo.params['perceiver']``."""
    keys = ("dim", "depth", "dim_head", "heads", "embedding_dim", "output_dim", "ff_mult")
    return {k: params[k] for k in keys}
