"""The two CLIP-feature projections of IP-Adapter that are not a Resampler.

Attribute names follow tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter.py`` so the official
``image_proj`` state dicts load as they are.
"""

from __future__ import annotations

import torch
from torch import nn


class ImageProjModel(nn.Module):
    """Linear projection of the pooled CLIP ``image_embeds`` into ``num_tokens`` context tokens.

    Used by ip-adapter_sd15 (and light, vit-G) and ip-adapter_sdxl (and vit-h).
    ``forward(image_embeds [B, E]) -> [B, num_tokens, cross_attention_dim]``.
    """

    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int, num_tokens: int = 4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = nn.Linear(clip_embeddings_dim, num_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(image_embeds.to(self.proj.weight.dtype)).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class MLPProjModel(nn.Module):
    """The full-face projection: an MLP applied to every CLIP hidden-state token.

    ``forward(hidden_states [B, 257, E]) -> [B, 257, cross_attention_dim]``.
    """

    def __init__(self, cross_attention_dim: int, clip_embeddings_dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(clip_embeddings_dim, clip_embeddings_dim),
            nn.GELU(),
            nn.Linear(clip_embeddings_dim, cross_attention_dim),
            nn.LayerNorm(cross_attention_dim),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden_states.to(self.proj[0].weight.dtype))
