"""OpenCLIP vision towers under transformers' CLIP vision names, so one loader reads both."""

from __future__ import annotations

import re
from typing import Optional

from .containers import fail

# ComfyUI reads these files too (comfy/clip_vision.py); the mapping is one to one except the
# fused attention input (split into q, k, v, in that order) and the projection (transposed).
_OPENCLIP_VISUAL = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_visual_prefix(flat: dict) -> Optional[str]:
    """``"visual."`` for a whole OpenCLIP model, ``""`` for a bare vision tower, else None."""
    for prefix in ("visual.", ""):
        if prefix + "class_embedding" in flat and prefix + "conv1.weight" in flat:
            return prefix
    return None


def openclip_visual_to_hf(flat: dict, prefix: str, path: str) -> dict:
    """The OpenCLIP vision tower under transformers' names; the text tower is left out.

    Values may be shapes (tuples, for ``read_layout``) or tensors (for ``load_tensors``).
    """
    out = {}
    unknown = []
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue  # the text tower of a whole CLIP model: not needed for images
        name = key[len(prefix):]
        if name in _OPENCLIP_VISUAL:
            out[_OPENCLIP_VISUAL[name]] = value
            continue
        if name == "proj":
            # OpenCLIP multiplies x @ proj; a Linear stores the transpose.
            out["visual_projection.weight"] = tuple(reversed(value)) if isinstance(value, tuple) else value.t().contiguous()
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            layer, part, kind = m.groups()
            base = f"vision_model.encoder.layers.{layer}."
            if part in _OPENCLIP_BLOCK:
                out[f"{base}{_OPENCLIP_BLOCK[part]}.{kind}"] = value
                continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name)
        if m:
            layer, kind = m.groups()
            if isinstance(value, tuple):
                if value[0] % 3:
                    fail(path, f"{key} has shape {list(value)}; expected its first dimension to hold q, k and v")
                parts = [(value[0] // 3,) + tuple(value[1:])] * 3
            else:
                if value.shape[0] % 3:
                    fail(path, f"{key} has shape {list(value.shape)}; expected its first dimension to hold q, k and v")
                parts = value.chunk(3, dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out[f"vision_model.encoder.layers.{layer}.self_attn.{proj}.{kind}"] = part
            continue
        unknown.append(key)
    if unknown:
        fail(
            path,
            "an OpenCLIP vision tower with parts that transformers' CLIP vision model has no place for "
            f"(e.g. {', '.join(sorted(unknown)[:3])}); use the image_encoder/model.safetensors of h94/IP-Adapter instead",
        )
    return out
