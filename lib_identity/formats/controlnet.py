"""InstantID's IdentityNet: an SDXL ControlNet, in diffusers or ldm naming."""

from __future__ import annotations

from .containers import fail
from .model_info import CONTEXT_DIM, Layout, ModelInfo



def detect_controlnet(layout: Layout, names: str) -> ModelInfo:
    sd = layout.section("controlnet")
    diffusers = "controlnet_cond_embedding.conv_in.weight" in sd
    if diffusers:
        ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
        add = "add_embedding.linear_1.weight" in sd
        cond_in = sd["controlnet_cond_embedding.conv_in.weight"][1]
    else:
        ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
        add = "label_emb.0.0.weight" in sd
        cond_in = sd["input_hint_block.0.weight"][1]
    if not ctx_keys:
        fail(layout.path, "a ControlNet without cross-attention; not IdentityNet")
    context = sd[ctx_keys[0]][1]
    if context != 2048 or not add:
        fail(layout.path, f"a ControlNet for {CONTEXT_DIM.get(context, 'an unknown base').upper()}, not the SDXL IdentityNet of InstantID")
    named = "instant" in names or "identitynet" in names
    hints = [
        "IdentityNet is an SDXL ControlNet with the common SDXL architecture; "
        + ("the path names InstantID" if named else "nothing in the weights or the name says InstantID: use it only if it is the IdentityNet file")
    ]
    return ModelInfo(
        family="instantid-identitynet",
        variant="instantid-identitynet_sdxl",
        base="sdxl",
        image_encoder="insightface",
        encoder_output="face keypoints image + InstantID face tokens",
        tokens=None,
        projection="controlnet",
        face_model="antelopev2",
        params={"naming": "diffusers" if diffusers else "ldm", "conditioning_channels": cond_in, "config": layout.config},
        hints=hints,
    )
