"""PhotoMaker V1 and V2: the ``id_encoder`` / ``lora_weights`` container."""

from __future__ import annotations

from .containers import fail
from .model_info import Layout, ModelInfo
from .shapes import resampler_params



def detect_photomaker(layout: Layout) -> ModelInfo:
    enc = layout.section("id_encoder")
    lora = layout.section("lora_weights")
    for key in ("vision_model.post_layernorm.weight", "visual_projection_2.weight", "fuse_module.layer_norm.weight"):
        if key not in enc:
            fail(layout.path, f"PhotoMaker: id_encoder.{key} is missing; the file is incomplete or not PhotoMaker")
    if not lora:
        fail(layout.path, "PhotoMaker: the lora_weights section is missing")
    hidden = enc["vision_model.post_layernorm.weight"][0]
    downs = [k for k in lora if k.endswith("_lora.down.weight")]
    rank = lora[downs[0]][0] if downs else None
    v2 = any(k.startswith("qformer_perceiver.") for k in enc)
    params = {
        "vision_hidden": hidden,
        "projection_dim": enc["visual_projection.weight"][0],
        "projection_dim_2": enc["visual_projection_2.weight"][0],
        "lora_layers": len(downs) // 4,
        # the embedded CLIP vision tower; CLIP ViTs use heads of 64 (ViT-L/14: 16 heads)
        "vision_layers": len({k.split(".")[3] for k in enc if k.startswith("vision_model.encoder.layers.")}),
        "vision_intermediate": enc["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        "vision_heads": hidden // 64,
        "patch_size": enc["vision_model.embeddings.patch_embedding.weight"][-1],
        "image_size": int(round((enc["vision_model.embeddings.position_embedding.weight"][0] - 1) ** 0.5))
        * enc["vision_model.embeddings.patch_embedding.weight"][-1],
        "fuse_dim": enc["fuse_module.layer_norm.weight"][0],
    }
    if v2:
        pr = {k[len("qformer_perceiver."):]: v for k, v in enc.items() if k.startswith("qformer_perceiver.")}
        perceiver = resampler_params(pr, "perceiver_resampler.")
        # to_q is 2048 wide either way; the official module uses 16 heads of 128.
        perceiver.update(dim_head=128, heads=perceiver["heads"] * 64 // 128)
        params.update(id_embeddings_dim=pr["token_proj.0.weight"][1], hidden_dim=pr["token_proj.0.weight"][0], num_tokens=pr["token_proj.2.weight"][0] // pr["token_norm.weight"][0], perceiver=perceiver)
    return ModelInfo(
        family="photomaker",
        variant="photomaker-v2" if v2 else "photomaker-v1",
        base="sdxl",
        image_encoder="clip-vit-l(embedded)+insightface" if v2 else "clip-vit-l(embedded)",
        encoder_output="last_hidden_state+face_embedding(raw)" if v2 else "pooler_output->visual_projection(+_2)",
        tokens=params.get("num_tokens", 1),
        projection="photomaker-v2" if v2 else "photomaker-v1",
        lora=bool(downs),
        lora_rank=rank,
        face_model="buffalo_l" if v2 else None,
        params=params,
        hints=["tokens are per ID image; they replace the class word's token in the prompt"],
    )
