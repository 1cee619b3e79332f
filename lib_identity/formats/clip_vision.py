"""CLIP vision encoders (transformers or OpenCLIP naming)."""

from __future__ import annotations

from .containers import fail
from .model_info import CLIP_VISION, Layout, ModelInfo



def detect_clip_vision(layout: Layout) -> ModelInfo:
    sd = layout.section("clip_vision")
    emb = sd.get("vision_model.embeddings.class_embedding")
    if emb is None:
        fail(layout.path, "CLIP vision: vision_model.embeddings.class_embedding is missing")
    hidden = emb[0]
    enc = CLIP_VISION.get(hidden)
    if enc is None:
        fail(layout.path, f"CLIP vision model with width {hidden} is not one the adapters use (ViT-H/14, ViT-bigG/14, ViT-L/14)")
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    proj = sd.get("visual_projection.weight")
    hints = []
    if proj is None:
        hints.append("no visual_projection: image_embeds cannot be computed (only hidden-state adapters can use it)")
    return ModelInfo(
        family="clip-vision",
        variant=enc[0],
        base=None,
        image_encoder=enc[0],
        encoder_output=None,
        tokens=None,
        projection=None,
        params={
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "intermediate_size": sd["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
            "projection_dim": proj[0] if proj else None,
            "patch_size": sd["vision_model.embeddings.patch_embedding.weight"][-1],
            "image_size": int(round((sd["vision_model.embeddings.position_embedding.weight"][0] - 1) ** 0.5))
            * sd["vision_model.embeddings.patch_embedding.weight"][-1],
        },
        hints=hints,
    )
