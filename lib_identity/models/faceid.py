"""The projections of IP-Adapter FaceID: the ArcFace embedding (and, for Plus, CLIP features) → tokens.

Attribute names follow tencent-ailab/IP-Adapter ``ip_adapter/ip_adapter_faceid.py``
(``MLPProjModel``, ``ProjPlusModel``) so the official ``image_proj`` state dicts load as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .resampler import FacePerceiverResampler


def _id_mlp(id_embeddings_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    # keys proj.0 / proj.2; proj.1 is the GELU
    return nn.Sequential(nn.Linear(id_embeddings_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class FaceIDProjModel(nn.Module):
    """FaceID and FaceID-portrait: ``forward(id_embeds [B, 512]) -> [B, num_tokens, cross_attention_dim]``.

    ``num_tokens`` is 4 for FaceID and 16 per face for portrait (the caller joins the faces:
    ``[n, 16, C] -> [1, 16·n, C]``).
    """

    def __init__(self, *, cross_attention_dim: int, id_embeddings_dim: int = 512, hidden_dim: int = 1024,
                 num_tokens: int = 4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.proj = _id_mlp(id_embeddings_dim, hidden_dim, cross_attention_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, id_embeds: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(id_embeds.to(self.norm.weight.dtype)).reshape(-1, self.num_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class ProjPlusModel(nn.Module):
    """FaceID-Plus (v1 and v2): ID tokens from ArcFace, refined by CLIP hidden states of the face crop.

    ``forward(id_embeds [B, 512], clip_hidden_states [B, 257, 1280], shortcut, scale) -> [B, T, C]``.
    v1 returns the refined tokens; v2 (``shortcut``) returns ``tokens + scale · refined``.
    ``shortcut=None`` uses the module's own setting, which ``build_image_proj`` takes from the
    variant (v1 and v2 files are identical; the file name decides).
    """

    def __init__(self, *, cross_attention_dim: int, id_embeddings_dim: int, hidden_dim: int, num_tokens: int,
                 perceiver: dict, shortcut: bool = False):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.num_tokens = num_tokens
        self.shortcut = shortcut
        self.proj = _id_mlp(id_embeddings_dim, hidden_dim, cross_attention_dim * num_tokens)
        self.norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(**perceiver)

    def forward(self, id_embeds: torch.Tensor, clip_hidden_states: torch.Tensor,
                shortcut: Optional[bool] = None, scale: float = 1.0) -> torch.Tensor:
        tokens = self.norm(self.proj(id_embeds.to(self.norm.weight.dtype)).reshape(-1, self.num_tokens, self.cross_attention_dim))
        refined = self.perceiver_resampler(tokens, clip_hidden_states)
        if self.shortcut if shortcut is None else shortcut:
            return tokens + scale * refined
        return refined
