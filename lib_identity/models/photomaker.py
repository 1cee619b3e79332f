"""PhotoMaker's ID encoders (V1 and V2): ID images → ID embeddings fused into the class word's rows.

Module names follow TencentARC/PhotoMaker ``photomaker/model.py`` (``PhotoMakerIDEncoder``) and
``model_v2.py`` (``PhotoMakerIDEncoder_CLIPInsightfaceExtendtoken``) so the ``id_encoder``
section loads as it is: a transformers CLIP ViT-L/14 vision tower (``vision_model.*``,
``visual_projection``), ``visual_projection_2``, ``fuse_module`` and, for V2, ``qformer_perceiver``.

* V1: per ID image, CLIP ``pooler_output`` → ``visual_projection`` (768) ‖ ``visual_projection_2``
  (1280) = one 2048-wide ID embedding.
* V2: per ID image, the ArcFace embedding → ``token_proj`` → 2 tokens, refined by the CLIP
  ``last_hidden_state`` (``x + perceiver(x, hidden)``); the visual projections are unused.
* Fuse (both): each class-word row of the prompt embeds (SDXL, 2048 wide) is replaced by
  ``layer_norm(mlp2(mlp1(class ‖ id) + class))``, the class rows paired with the ID embeddings
  in order (image by image, token by token).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import IdentityError
from .resampler import FacePerceiverResampler, perceiver_kwargs

# The official encoders hard-code this tower (model.py VISION_CONFIG_DICT); CLIPVisionConfig's
# own defaults supply image size 224 and quick_gelu, spelled out here so no version's defaults matter.
VIT_L14 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "num_channels": 3,
}

# Saved by some transformers versions, not by others (the official files do not have it).
POSITION_IDS = "vision_model.embeddings.position_ids"


def vision_config_from_params(params: dict) -> dict:
    """``CLIPVisionConfig`` arguments for the embedded tower, from ``ModelInfo.params`` (ViT-L/14 defaults)."""
    cfg = dict(VIT_L14)
    names = {
        "vision_hidden": "hidden_size",
        "vision_intermediate": "intermediate_size",
        "vision_heads": "num_attention_heads",
        "vision_layers": "num_hidden_layers",
        "patch_size": "patch_size",
        "image_size": "image_size",
        "projection_dim": "projection_dim",
    }
    for ours, theirs in names.items():
        if params.get(ours) is not None:
            cfg[theirs] = params[ours]
    return cfg


def build_vision_tower(config: dict) -> nn.Module:
    """transformers' CLIP vision transformer (``embeddings``, ``pre_layrnorm``, ``encoder``, ``post_layernorm``)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    # Its .vision_model is this tower in every transformers version (4.x: CLIPVisionTransformer,
    # 5.x: CLIPVisionModel) and carries the official key names; building through the pretrained
    # class lets each version set up its attention as it does for a downloaded model.
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).vision_model


class MLP(nn.Module):
    """LayerNorm → Linear → GELU → Linear, with an optional residual around it."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, use_residual: bool = True):
        super().__init__()
        self.layernorm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.act_fn = nn.GELU()
        self.use_residual = use_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(self.act_fn(self.fc1(self.layernorm(x))))
        return out + x if self.use_residual else out


class FuseModule(nn.Module):
    """Fuses a class-word embedding with an ID embedding (both ``embed_dim`` wide)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.mlp1 = MLP(embed_dim * 2, embed_dim, embed_dim, use_residual=False)
        self.mlp2 = MLP(embed_dim, embed_dim, embed_dim, use_residual=True)
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, class_embeds: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        fused = self.mlp1(torch.cat((class_embeds, id_embeds), dim=-1)) + class_embeds
        return self.layer_norm(self.mlp2(fused))


class QFormerPerceiver(nn.Module):
    """V2: ArcFace embedding → ``num_tokens`` tokens, refined by the CLIP hidden states (with residual)."""

    def __init__(self, *, id_embeddings_dim: int, hidden_dim: int, cross_attention_dim: int, num_tokens: int,
                 perceiver: dict):
        super().__init__()
        self.num_tokens = num_tokens
        self.cross_attention_dim = cross_attention_dim
        self.token_proj = nn.Sequential(
            nn.Linear(id_embeddings_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, cross_attention_dim * num_tokens)
        )
        self.token_norm = nn.LayerNorm(cross_attention_dim)
        self.perceiver_resampler = FacePerceiverResampler(**perceiver)

    def forward(self, face_embeds: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        tokens = self.token_norm(self.token_proj(face_embeds).reshape(-1, self.num_tokens, self.cross_attention_dim))
        return tokens + self.perceiver_resampler(tokens, last_hidden_state)


class PhotoMakerIDEncoder(nn.Module):
    """PhotoMaker V1's ID encoder (see the module docstring); one ID embedding per ID image."""

    tokens_per_image = 1

    def __init__(self, vision_config: dict, projection_dim_2: int = 1280, fuse_dim: int = 2048):
        super().__init__()
        hidden = vision_config["hidden_size"]
        self.vision_model = build_vision_tower(vision_config)
        self.visual_projection = nn.Linear(hidden, vision_config["projection_dim"], bias=False)
        self.visual_projection_2 = nn.Linear(hidden, projection_dim_2, bias=False)
        self.fuse_module = FuseModule(fuse_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual_projection.weight.dtype

    def _tower(self, pixel_values: torch.Tensor):
        return self.vision_model(pixel_values.to(self.dtype))

    def id_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ID embeddings of N preprocessed ID images ``[N, 3, 224, 224]`` → ``[N, 1, fuse_dim]``."""
        pooled = self._tower(pixel_values).pooler_output
        emb = torch.cat((self.visual_projection(pooled), self.visual_projection_2(pooled)), dim=-1)
        return emb.unsqueeze(1)

    def fuse(self, prompt_embeds: torch.Tensor, id_tokens: torch.Tensor, class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """Prompt embeds ``[B, T, D]`` with the class-word rows replaced by fused ID embeddings.

        ``id_tokens``: ``[M, D]`` for the same tokens in every row (e.g. ``id_embeddings(...)``
        flattened: M = ID images × tokens per image) or ``[B, M, D]`` per row (B may be 1);
        ``class_tokens_mask``: bool ``[B, T]``. Each prompt row must mark exactly M positions (or
        none: that row is left as it is); the i-th marked position gets the i-th ID token. A new
        tensor is returned, the input is not changed.
        """
        mask = class_tokens_mask.to(device=prompt_embeds.device, dtype=torch.bool)
        if mask.dim() == 1:
            mask = mask.unsqueeze(0)
        b, d = prompt_embeds.shape[0], prompt_embeds.shape[-1]
        if mask.shape != prompt_embeds.shape[:2]:
            raise IdentityError(
                f"PhotoMaker: the class-token mask has shape {list(mask.shape)}, the prompt embeds "
                f"{list(prompt_embeds.shape[:2])}; they must match"
            )
        if id_tokens.dim() == 2:
            id_tokens = id_tokens.unsqueeze(0)
        if id_tokens.dim() != 3 or id_tokens.shape[0] not in (1, b) or id_tokens.shape[-1] != d:
            raise IdentityError(
                f"PhotoMaker: ID tokens of shape {list(id_tokens.shape)} do not fit prompt embeds "
                f"{list(prompt_embeds.shape)}; expected [M, {d}] or [{b}, M, {d}]"
            )
        per_row = id_tokens.expand(b, -1, -1)
        m = per_row.shape[1]
        counts = mask.sum(dim=1)
        rows = counts > 0
        if bool((counts[rows] != m).any()):
            raise IdentityError(
                f"PhotoMaker: the prompt marks {counts.tolist()} class-word positions per row, but there are {m} "
                "ID embeddings; the class word must be repeated once per ID embedding (ID images × tokens per image)"
            )
        out = prompt_embeds.clone()
        if not bool(rows.any()):
            return out
        class_embeds = prompt_embeds[mask]  # row by row, in position order
        ids = per_row[rows].reshape(-1, d).to(device=prompt_embeds.device, dtype=self.dtype)
        fused = self.fuse_module(class_embeds.to(self.dtype), ids)
        out[mask] = fused.to(out.dtype)
        return out

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor,
                class_tokens_mask: torch.Tensor) -> torch.Tensor:
        """Official call: ID images ``[B, N, 3, H, W]``, prompt embeds ``[B, T, D]``, mask ``[B, T]``."""
        b, n = id_pixel_values.shape[:2]
        ids = self.id_embeddings(id_pixel_values.flatten(0, 1))
        return self.fuse(prompt_embeds, ids.reshape(b, -1, ids.shape[-1]), class_tokens_mask)


class PhotoMakerIDEncoderV2(PhotoMakerIDEncoder):
    """PhotoMaker V2's ID encoder: V1 plus ``qformer_perceiver``; ``num_tokens`` (2) ID tokens per image."""

    def __init__(self, vision_config: dict, projection_dim_2: int = 1280, fuse_dim: int = 2048, *,
                 id_embeddings_dim: int = 512, hidden_dim: int = 2048, num_tokens: int = 2,
                 perceiver: Optional[dict] = None):
        super().__init__(vision_config, projection_dim_2, fuse_dim)
        self.tokens_per_image = num_tokens
        self.qformer_perceiver = QFormerPerceiver(
            id_embeddings_dim=id_embeddings_dim,
            hidden_dim=hidden_dim,
            cross_attention_dim=fuse_dim,
            num_tokens=num_tokens,
            perceiver=perceiver,
        )

    def id_embeddings(self, pixel_values: torch.Tensor, face_embeds: torch.Tensor = None) -> torch.Tensor:
        """ID tokens of N ID images ``[N, 3, 224, 224]`` with their raw ArcFace embeddings ``[N, 512]`` → ``[N, k, D]``."""
        if face_embeds is None:
            raise IdentityError("PhotoMaker V2 needs the face embedding (insightface) of every ID image")
        hidden = self._tower(pixel_values).last_hidden_state
        return self.qformer_perceiver(face_embeds.reshape(hidden.shape[0], -1).to(self.dtype), hidden)

    def forward(self, id_pixel_values: torch.Tensor, prompt_embeds: torch.Tensor, class_tokens_mask: torch.Tensor,
                id_embeds: torch.Tensor = None) -> torch.Tensor:
        """Official call, plus the ArcFace embeddings ``id_embeds [B, N, 512]``."""
        b, n = id_pixel_values.shape[:2]
        face = None if id_embeds is None else id_embeds.reshape(b * n, -1)
        ids = self.id_embeddings(id_pixel_values.flatten(0, 1), face)
        return self.fuse(prompt_embeds, ids.reshape(b, -1, ids.shape[-1]), class_tokens_mask)


def build_from_params(variant: str, params: dict) -> PhotoMakerIDEncoder:
    """The V1 or V2 ID encoder with the hyper-parameters ``formats.detect`` read from the file."""
    vision = vision_config_from_params(params)
    proj2 = params.get("projection_dim_2", 1280)
    fuse_dim = params.get("fuse_dim", vision["projection_dim"] + proj2)
    if variant == "photomaker-v2":
        return PhotoMakerIDEncoderV2(
            vision,
            proj2,
            fuse_dim,
            id_embeddings_dim=params["id_embeddings_dim"],
            hidden_dim=params.get("hidden_dim", 4 * params["id_embeddings_dim"]),
            num_tokens=params["num_tokens"],
            perceiver=perceiver_kwargs(params["perceiver"]),
        )
    return PhotoMakerIDEncoder(vision, proj2, fuse_dim)
