"""PhotoMaker's ID encoders: official layouts load strictly; numbers match independent references.

diffusers has no PhotoMaker module, so the references are: transformers' own
``CLIPVisionModelWithProjection`` on the same weights for the CLIP tower, and, for the perceiver
and the fuse, small functional re-derivations written here from the published formulas
(TencentARC/PhotoMaker model.py / model_v2.py / resampler.py, read, not imported): they use only
the state-dict tensors and torch.nn.functional, none of lib_identity's modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_identity import formats, models
from lib_identity.errors import CheckpointError, IdentityError
from lib_identity.models.photomaker import PhotoMakerIDEncoder, PhotoMakerIDEncoderV2
from tests.checkpoints import manifest_keys, nest, write_manifest_layout

TINY_CLIP = {
    "hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
    "patch_size": 8, "image_size": 32, "projection_dim": 96, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "num_channels": 3,
}
FUSE = 256  # 96 + 160, as 768 + 1280 = 2048 in the real files
V2_PERCEIVER = {"dim": FUSE, "depth": 4, "dim_head": 128, "heads": 2, "embedding_dim": 128, "output_dim": FUSE, "ff_mult": 4}


def meta_sections(name):
    return nest({k: torch.empty(s, device="meta") for k, s in manifest_keys(name).items()})


@pytest.mark.parametrize("name,tokens", [("photomaker-v1", 1), ("photomaker-v2", 2)])
def test_official_layout_loads_strictly(name, tokens, tmp_path):
    info = formats.inspect(write_manifest_layout(name, tmp_path, "safetensors"))
    sections = meta_sections(name)
    encoder = models.load_photomaker(info, sections, device="meta", dtype=torch.float16)
    assert isinstance(encoder, PhotoMakerIDEncoderV2 if tokens == 2 else PhotoMakerIDEncoder)
    # the strict check counted every id_encoder key; here: nothing extra, all half
    assert set(encoder.state_dict()) - {"vision_model.embeddings.position_ids"} == set(sections["id_encoder"])
    assert {t.dtype for t in encoder.parameters()} == {torch.float16}
    pixels = torch.empty(3, 3, 224, 224, device="meta")
    args = (pixels, torch.empty(3, 512, device="meta")) if tokens == 2 else (pixels,)
    assert tuple(encoder.id_embeddings(*args).shape) == (3, tokens, 2048)
    assert encoder.vision_model.embeddings.position_ids.shape == (1, 257)

    # a saved position_ids buffer (older transformers wrote one) is accepted
    sections["id_encoder"]["vision_model.embeddings.position_ids"] = torch.arange(257).unsqueeze(0)
    models.load_photomaker(info, sections, device="meta")


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    info = formats.inspect(write_manifest_layout("photomaker-v1", tmp_path, "safetensors"))
    sections = meta_sections("photomaker-v1")
    sections["id_encoder"]["visual_projection_2.weight"] = torch.empty(1280, 768, device="meta")
    with pytest.raises(CheckpointError) as e:
        models.load_photomaker(info, sections, device="meta")
    msg = str(e.value)
    assert "id_encoder.visual_projection_2.weight" in msg and "[1280, 768]" in msg and "[1280, 1024]" in msg


# --------------------------------------------------------------------------- tiny files, real numbers


def tiny_file(tmp_path, v2: bool, seed=0):
    """A tiny PhotoMaker .bin: official key names, mixed bfloat16/float32 like the real files."""
    with torch.device("meta"):
        if v2:
            template = PhotoMakerIDEncoderV2(TINY_CLIP, 160, FUSE, id_embeddings_dim=16, hidden_dim=64, num_tokens=2,
                                             perceiver=V2_PERCEIVER)
        else:
            template = PhotoMakerIDEncoder(TINY_CLIP, 160, FUSE)
    gains = {f"{n}.weight" for n, m in template.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    g = torch.Generator().manual_seed(seed)
    enc = {}
    for k, t in template.state_dict().items():
        if k.endswith("position_ids"):
            continue
        x = torch.randn(tuple(t.shape), generator=g) * 0.1 + (1.0 if k in gains else 0.0)
        # the CLIP tower in bfloat16, the trained parts in float32 (the real split is not known)
        enc[k] = x.to(torch.bfloat16) if k.startswith("vision_model.") else x
    lora = {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": torch.zeros(4, 8),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": torch.zeros(8, 4)}
    path = tmp_path / ("tiny-v2.bin" if v2 else "tiny-v1.bin")
    torch.save({"id_encoder": enc, "lora_weights": lora}, path)
    return path


def load_tiny(tmp_path, v2):
    path = tiny_file(tmp_path, v2)
    info = formats.inspect(path)
    sections = formats.load_tensors(path)
    return info, sections, models.load_photomaker(info, sections)


def transformers_clip(sd):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
    own = {k: v.float() for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    missing, unexpected = clip.load_state_dict(own, strict=False)
    assert not unexpected and set(missing) <= {"vision_model.embeddings.position_ids"}
    return clip


def ref_mlp(sd, prefix, x, residual):
    y = F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.layernorm.weight"], sd[f"{prefix}.layernorm.bias"])
    y = F.linear(F.gelu(F.linear(y, sd[f"{prefix}.fc1.weight"], sd[f"{prefix}.fc1.bias"])), sd[f"{prefix}.fc2.weight"], sd[f"{prefix}.fc2.bias"])
    return y + x if residual else y


def ref_fuse(sd, class_embeds, id_embeds):
    """Published: layer_norm(mlp2(mlp1(cat(class, id)) + class)); mlp2 residual, mlp1 not."""
    x = ref_mlp(sd, "fuse_module.mlp1", torch.cat([class_embeds, id_embeds], dim=-1), False) + class_embeds
    x = ref_mlp(sd, "fuse_module.mlp2", x, True)
    d = x.shape[-1]
    return F.layer_norm(x, (d,), sd["fuse_module.layer_norm.weight"], sd["fuse_module.layer_norm.bias"])


def ref_perceiver(sd, p, latents, x, dim_head):
    """Published FacePerceiverResampler (q and k each scaled by dim_head^-1/4)."""
    def ln(t, name):
        return F.layer_norm(t, t.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    x = F.linear(x, sd[f"{p}.proj_in.weight"], sd[f"{p}.proj_in.bias"])
    for i in range(4):
        a = f"{p}.layers.{i}.0"
        xn, ln_ = ln(x, f"{a}.norm1"), ln(latents, f"{a}.norm2")
        b, n, _ = ln_.shape
        q = F.linear(ln_, sd[f"{a}.to_q.weight"])
        k, v = F.linear(torch.cat([xn, ln_], dim=1), sd[f"{a}.to_kv.weight"]).chunk(2, dim=-1)
        h = q.shape[-1] // dim_head
        q, k, v = (t.reshape(b, t.shape[1], h, dim_head).transpose(1, 2) for t in (q, k, v))
        s = 1 / math.sqrt(math.sqrt(dim_head))
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1)
        out = (w @ v).transpose(1, 2).reshape(b, n, -1)
        latents = F.linear(out, sd[f"{a}.to_out.weight"]) + latents
        f = f"{p}.layers.{i}.1"
        latents = F.linear(F.gelu(F.linear(ln(latents, f"{f}.0"), sd[f"{f}.1.weight"])), sd[f"{f}.3.weight"]) + latents
    latents = F.linear(latents, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return ln(latents, f"{p}.norm_out")


def pixels(n, seed=5):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tiny_files_are_detected_with_their_hyper_parameters(tmp_path):
    info, _, enc = load_tiny(tmp_path, v2=True)
    assert info.variant == "photomaker-v2"
    p = info.params
    assert (p["vision_layers"], p["vision_intermediate"], p["vision_heads"], p["patch_size"], p["image_size"]) == (2, 256, 2, 8, 32)
    assert (p["fuse_dim"], p["hidden_dim"], p["num_tokens"]) == (FUSE, 64, 2)
    assert p["perceiver"] == V2_PERCEIVER
    # mixed bfloat16 / float32 on disk, one dtype in memory
    assert {t.dtype for t in enc.state_dict().values() if t.is_floating_point()} == {torch.float32}


def test_v1_id_embedding_is_transformers_clip_image_embeds_and_second_projection(tmp_path):
    _, sections, enc = load_tiny(tmp_path, v2=False)
    sd = {k: v.float() for k, v in sections["id_encoder"].items()}
    clip = transformers_clip(sd)
    px = pixels(3)
    with torch.no_grad():
        ours = enc.id_embeddings(px)
        ref = clip(pixel_values=px)
        pooled = F.layer_norm(ref.last_hidden_state[:, 0], (128,), sd["vision_model.post_layernorm.weight"],
                              sd["vision_model.post_layernorm.bias"])
        want = torch.cat([ref.image_embeds, pooled @ sd["visual_projection_2.weight"].T], dim=-1)
    assert ours.shape == (3, 1, FUSE)
    torch.testing.assert_close(ours[:, 0], want, atol=1e-5, rtol=1e-5)


def test_v1_forward_replaces_exactly_the_class_rows_with_the_fuse(tmp_path):
    _, sections, enc = load_tiny(tmp_path, v2=False)
    sd = {k: v.float() for k, v in sections["id_encoder"].items()}
    g = torch.Generator().manual_seed(7)
    prompt = torch.randn(1, 12, FUSE, generator=g)
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, 4:6] = True  # "a man img" with 2 ID images: the class word twice
    px = pixels(2)
    before = prompt.clone()
    with torch.no_grad():
        out = enc(px.unsqueeze(0), prompt, mask)
        ids = enc.id_embeddings(px)[:, 0]
        want = prompt.clone()
        want[0, 4:6] = ref_fuse(sd, prompt[0, 4:6], ids)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[0, ~mask[0]], prompt[0, ~mask[0]])
    assert not torch.equal(out[0, 4], prompt[0, 4])
    assert torch.equal(prompt, before)  # the official fuse writes into its input; this one does not


def test_v2_id_tokens_match_the_published_formula(tmp_path):
    _, sections, enc = load_tiny(tmp_path, v2=True)
    sd = {k: v.float() for k, v in sections["id_encoder"].items()}
    clip = transformers_clip(sd)
    px = pixels(2)
    face = torch.randn(2, 16, generator=torch.Generator().manual_seed(9)) * 10  # raw ArcFace: not normalised
    with torch.no_grad():
        ours = enc.id_embeddings(px, face)
        hidden = clip(pixel_values=px).last_hidden_state  # before post_layernorm
        t = F.linear(F.gelu(F.linear(face, sd["qformer_perceiver.token_proj.0.weight"], sd["qformer_perceiver.token_proj.0.bias"])),
                     sd["qformer_perceiver.token_proj.2.weight"], sd["qformer_perceiver.token_proj.2.bias"])
        t = F.layer_norm(t.reshape(2, 2, FUSE), (FUSE,), sd["qformer_perceiver.token_norm.weight"], sd["qformer_perceiver.token_norm.bias"])
        want = t + ref_perceiver(sd, "qformer_perceiver.perceiver_resampler", t, hidden, dim_head=128)
    assert ours.shape == (2, 2, FUSE)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_v2_forward_pairs_class_rows_with_tokens_image_by_image(tmp_path):
    _, sections, enc = load_tiny(tmp_path, v2=True)
    sd = {k: v.float() for k, v in sections["id_encoder"].items()}
    g = torch.Generator().manual_seed(11)
    prompt = torch.randn(2, 10, FUSE, generator=g)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, 2:6] = True  # 2 images × 2 tokens
    mask[1, 5:9] = True
    px, face = pixels(2), torch.randn(2, 16, generator=g)
    with torch.no_grad():
        out = enc(px.unsqueeze(0).expand(2, -1, -1, -1, -1), prompt, mask, face.unsqueeze(0).expand(2, -1, -1))
        ids = enc.id_embeddings(px, face).reshape(4, FUSE)  # image 0 token 0, image 0 token 1, image 1 …
        want = prompt.clone()
        want[0, 2:6] = ref_fuse(sd, prompt[0, 2:6], ids)
        want[1, 5:9] = ref_fuse(sd, prompt[1, 5:9], ids)
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)

        # the lower-level fuse: shared tokens; a row without the class word is left alone
        mask[1] = False
        fused = enc.fuse(prompt, ids, mask)
        torch.testing.assert_close(fused[0], want[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(fused[1], prompt[1])

        mask[0, 6] = True  # 5 class rows for 4 ID tokens
        with pytest.raises(IdentityError, match="class-word positions"):
            enc.fuse(prompt, ids, mask)
