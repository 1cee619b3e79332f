"""Tiny PhotoMaker files in the official layout, for a given UNet, and the references the method is checked against.

A file holds ``id_encoder`` (the official key names at tiny widths, the CLIP tower in bfloat16 and
the trained parts in float32, as the real pickles mix them) and ``lora_weights`` in diffusers'
old attention-processor naming over every attention of the UNet it is written for
(``unet.<processor>.<proj>_lora.{down,up}.weight``; the tiny SDXL UNet has the real 140, so 1120 keys).
``.bin`` files are nested dicts like the official pickles; ``.safetensors`` files flat keys.

The references do not use lib_identity's modules: transformers' CLIP on transformers'
``CLIPImageProcessor`` pixels, insightface's own ``FaceAnalysis`` (what the official V2 code
runs), and the fuse/perceiver formulas written out in ``test_photomaker_model``.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from lib_identity.models.photomaker import PhotoMakerIDEncoder, PhotoMakerIDEncoderV2
from lib_identity.unet import attention_modules, find_cross_attentions
from test_photomaker_model import FUSE, TINY_CLIP, V2_PERCEIVER, ref_fuse, ref_perceiver, transformers_clip

__all__ = ["FUSE", "ref_fuse", "write_photomaker", "reference_id_embeds", "official_face_embeddings", "lora_keys"]

RANK = 4


def _encoder_template(v2: bool):
    with torch.device("meta"):
        if v2:
            return PhotoMakerIDEncoderV2(TINY_CLIP, 160, FUSE, id_embeddings_dim=512, hidden_dim=64, num_tokens=2,
                                         perceiver=V2_PERCEIVER)
        return PhotoMakerIDEncoder(TINY_CLIP, 160, FUSE)


def lora_keys(unet, rank: int = RANK) -> dict:
    """key -> shape of the official ``lora_weights`` for ``unet`` (processor names from its layout)."""
    shapes = {}
    for m in attention_modules(unet, find_cross_attentions(unet)):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            linear = m.projection(proj)
            base = f"unet.{m.diffusers_name}.{proj}_lora"
            shapes[f"{base}.down.weight"] = (rank, linear.in_features)
            shapes[f"{base}.up.weight"] = (linear.out_features, rank)
    return shapes


def write_photomaker(folder, unet, *, v2: bool, seed: int = 0, suffix: str = ".bin", name: str = None,
                     lora_scale: float = 1.0):
    """A tiny PhotoMaker file for ``unet``; returns its path."""
    template = _encoder_template(v2)
    gains = {f"{n}.weight" for n, m in template.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    g = torch.Generator().manual_seed(seed)
    enc = {}
    for k, t in template.state_dict().items():
        if k.endswith("position_ids"):
            continue
        x = torch.randn(tuple(t.shape), generator=g) * 0.1 + (1.0 if k in gains else 0.0)
        enc[k] = x.to(torch.bfloat16) if k.startswith("vision_model.") else x
    lora = {}
    for k, shape in lora_keys(unet).items():
        x = torch.randn(shape, generator=g) / shape[-1] ** 0.5
        lora[k] = (x * lora_scale if ".up." in k else x).to(torch.bfloat16 if "attn1" in k else torch.float32)
    name = name or f"photomaker-{'v2' if v2 else 'v1'}-{seed}"
    path = os.path.join(str(folder), name + suffix)
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        flat = {f"id_encoder.{k}": v.contiguous() for k, v in enc.items()}
        flat.update({f"lora_weights.{k}": v.contiguous() for k, v in lora.items()})
        save_file(flat, path)
    else:
        torch.save({"id_encoder": enc, "lora_weights": lora}, path)
    return path


def _state_dict(path) -> dict:
    """The file's id_encoder tensors in float32, read with the plain libraries."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        flat = load_file(str(path))
        return {k[len("id_encoder."):]: v.float() for k, v in flat.items() if k.startswith("id_encoder.")}
    return {k: v.float() for k, v in torch.load(str(path), weights_only=True)["id_encoder"].items()}


def official_face_embeddings(pictures, pack_root):
    """Raw ArcFace embeddings as the official V2 code gets them: insightface's FaceAnalysis
    (buffalo_l, detection + recognition) on the BGR picture; of several faces the largest (the
    unit's default choice); pictures without a face are left out. Returns (indices, [k, 512])."""
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="buffalo_l", root=str(pack_root), providers=["CPUExecutionProvider"],
                       allowed_modules=["detection", "recognition"])
    app.prepare(ctx_id=-1, det_size=(640, 640))
    used, out = [], []
    for i, picture in enumerate(pictures):
        faces = app.get(np.array(picture.convert("RGB"))[:, :, ::-1])
        if faces:
            used.append(i)
            big = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
            out.append(torch.from_numpy(np.asarray(big.embedding, dtype=np.float32)))
    return used, (torch.stack(out) if out else None)


def reference_id_embeds(path, pictures, *, v2: bool, face_embeds=None) -> torch.Tensor:
    """``[n, FUSE]``: transformers' CLIP on ``CLIPImageProcessor`` pixels of the whole pictures,
    then V1's two projections or V2's token projection + perceiver, picture by picture, token by token."""
    import torch.nn.functional as F
    from transformers import CLIPImageProcessor

    sd = _state_dict(path)
    clip = transformers_clip(sd)
    size = TINY_CLIP["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    px = processor(images=[p.convert("RGB") for p in pictures], return_tensors="pt").pixel_values
    with torch.no_grad():
        out = clip(pixel_values=px)
        if not v2:
            hidden = TINY_CLIP["hidden_size"]
            pooled = F.layer_norm(out.last_hidden_state[:, 0], (hidden,), sd["vision_model.post_layernorm.weight"],
                                  sd["vision_model.post_layernorm.bias"])
            return torch.cat([out.image_embeds, pooled @ sd["visual_projection_2.weight"].T], dim=-1)
        p = "qformer_perceiver"
        t = F.linear(F.gelu(F.linear(face_embeds, sd[f"{p}.token_proj.0.weight"], sd[f"{p}.token_proj.0.bias"])),
                     sd[f"{p}.token_proj.2.weight"], sd[f"{p}.token_proj.2.bias"])
        t = F.layer_norm(t.reshape(len(pictures), 2, FUSE), (FUSE,), sd[f"{p}.token_norm.weight"], sd[f"{p}.token_norm.bias"])
        tokens = t + ref_perceiver(sd, f"{p}.perceiver_resampler", t, out.last_hidden_state, dim_head=128)
        return tokens.reshape(-1, FUSE)


def fuse_reference(path, class_rows, id_embeds):
    return ref_fuse(_state_dict(path), class_rows, id_embeds)
