"""lib_identity.models: every official adapter layout builds and loads strictly; numbers match diffusers.

* Full-size layouts (all IP-Adapter, FaceID and InstantID manifests) are built and loaded on the
  ``meta`` device: keys and shapes exactly as published, output token shapes as documented.
* Numbers, at small sizes, come from diffusers' own image-projection modules, loaded from the same
  official-layout state dict through diffusers' own converter (an implementation independent of ours).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lib_identity import formats, models
from lib_identity.errors import CheckpointError
from lib_identity.formats import ModelInfo
from lib_identity.models.resampler import PerceiverAttention
from tests import oracles
from tests.checkpoints import LAYOUT_MANIFESTS, manifest, manifest_keys, nest, write_manifest_layout, write_random

ADAPTER_MANIFESTS = [n for n in LAYOUT_MANIFESTS if nest(manifest_keys(n)).keys() >= {"image_proj", "ip_adapter"}]


def meta_sections(name: str) -> dict:
    """The manifest's tensors as ``meta`` tensors, grouped the way ``formats.load_tensors`` groups them."""
    return nest({k: torch.empty(s, device="meta") for k, s in manifest_keys(name).items()})


def meta_inputs(info: ModelInfo):
    """Encoder outputs of one reference, with the width each projection reads."""
    p = info.params
    kind = info.projection
    if kind == "linear":
        return (torch.empty(1, p["clip_embeddings_dim"], device="meta"),)
    if kind == "mlp":
        return (torch.empty(1, 257, p["clip_embeddings_dim"], device="meta"),)
    if kind == "resampler":
        return (torch.empty(1, 257, p["embedding_dim"], device="meta"),)
    if kind == "instantid-resampler":
        return (torch.empty(1, 1, 512, device="meta"),)
    if kind == "faceid-mlp":
        return (torch.empty(1, 512, device="meta"),)
    if kind == "faceid-plus":
        return torch.empty(1, 512, device="meta"), torch.empty(1, 257, 1280, device="meta")
    raise AssertionError(kind)


def test_every_adapter_manifest_is_covered():
    assert len(ADAPTER_MANIFESTS) == 18


@pytest.mark.parametrize("name", ADAPTER_MANIFESTS)
def test_official_layout_loads_strictly_and_gives_documented_tokens(name, tmp_path):
    m = manifest(name)
    keys = manifest_keys(name)
    info = formats.inspect(write_manifest_layout(name, tmp_path, "safetensors"))
    image_proj, ip_layers = models.load_adapter(info, meta_sections(name), device="meta", dtype=torch.float16)

    # every manifest key became a parameter of the model, none left over
    n_proj = sum(1 for k in keys if k.startswith("image_proj."))
    assert len(image_proj.state_dict()) == n_proj
    assert all(t.dtype == torch.float16 for t in image_proj.state_dict().values())

    context = keys["ip_adapter.1.to_k_ip.weight"][1]
    tokens = image_proj(*meta_inputs(info))
    assert tuple(tokens.shape) == (1, m["num_tokens"], context)

    n_layers = {768: 16, 2048: 70}[context]
    assert len(ip_layers) == n_layers
    for ordinal in (0, 5, n_layers - 1):
        assert tuple(ip_layers[ordinal].to_k_ip.weight.shape) == keys[f"ip_adapter.{2 * ordinal + 1}.to_k_ip.weight"]
        assert tuple(ip_layers[ordinal].to_v_ip.weight.shape) == keys[f"ip_adapter.{2 * ordinal + 1}.to_v_ip.weight"]
    if info.lora:
        assert len(ip_layers.lora) == 2 * n_layers and ip_layers.lora.rank == 128
        down, up = ip_layers.lora.layers[2 * n_layers - 1]["to_k"]
        assert tuple(down.shape) == keys[f"ip_adapter.{2 * n_layers - 1}.to_k_lora.down.weight"]
        assert tuple(up.shape) == keys[f"ip_adapter.{2 * n_layers - 1}.to_k_lora.up.weight"]
    else:
        assert ip_layers.lora is None


def test_documented_token_counts():
    # what the model cards and pipelines say, independent of the manifests
    sizes = {
        "ip-adapter_sd15": (4, 768), "ip-adapter-plus_sd15": (16, 768), "ip-adapter-plus_sdxl_vit-h": (16, 2048),
        "ip-adapter-full-face_sd15": (257, 768), "ip-adapter-faceid_sdxl": (4, 2048),
        "ip-adapter-faceid-portrait_sd15": (16, 768), "ip-adapter-faceid-plusv2_sdxl": (4, 2048),
        "instantid_ip-adapter": (16, 2048), "ip-adapter_sdxl": (4, 2048),
    }
    for name, want in sizes.items():
        info = formats.detect(formats.Layout(path=name, container="safetensors",
                                             sections={s: dict(v) for s, v in nest(manifest_keys(name)).items()}))
        with torch.device("meta"):
            proj = models.build_image_proj(info)
        assert tuple(proj(*meta_inputs(info)).shape[1:]) == want, name


# --------------------------------------------------------------------------- numbers vs diffusers


def small_info(projection: str, params: dict, **kw) -> ModelInfo:
    """What ``formats.detect`` says about a small file of this kind (detect needs the real widths)."""
    params = dict(params)
    params.setdefault("ip_hidden_sizes", [8, 12, 8])
    return ModelInfo(family="ip-adapter", variant=f"small-{projection}", base=None, image_encoder=None,
                     encoder_output=None, tokens=None, projection=projection, params=params, **kw)


def official_state_dict(info: ModelInfo, seed: int) -> dict:
    """Random weights under the official ``image_proj`` names, at a scale where the numbers say something."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        module = models.build_image_proj(info)
    gains = {f"{n}.weight" for n, mod in module.named_modules() if isinstance(mod, torch.nn.LayerNorm)}
    sd = {}
    for key, t in module.state_dict().items():
        x = torch.randn(tuple(t.shape), generator=g) * 0.2
        sd[key] = x + 1.0 if key in gains else x  # layer-norm gains around 1
    return sd


def write_adapter(tmp_path, info: ModelInfo, seed: int = 0, lora_rank=None) -> dict:
    """A small ``.safetensors`` in the official flat layout; returns what ``load_tensors`` reads back."""
    flat = {f"image_proj.{k}": v for k, v in official_state_dict(info, seed).items()}
    C = info.params["cross_attention_dim"]
    for m, h in enumerate(info.params["ip_hidden_sizes"]):
        flat[f"ip_adapter.{2 * m + 1}.to_k_ip.weight"] = (h, C)
        flat[f"ip_adapter.{2 * m + 1}.to_v_ip.weight"] = (h, C)
        if lora_rank:
            for n in (2 * m, 2 * m + 1):
                for proj in ("to_q", "to_k", "to_v", "to_out"):
                    width_in = C if n % 2 and proj in ("to_k", "to_v") else h
                    flat[f"ip_adapter.{n}.{proj}_lora.down.weight"] = (lora_rank, width_in)
                    flat[f"ip_adapter.{n}.{proj}_lora.up.weight"] = (h, lora_rank)
    path = tmp_path / "small.safetensors"
    write_random(flat, path, seed=seed)
    return formats.load_tensors(path)


def diffusers_projection(image_proj_sd: dict):
    oracles.diffusers()
    from diffusers.loaders.unet import UNet2DConditionLoadersMixin

    # The converter only touches ``self`` for low_cpu_mem_usage; it loads strictly into diffusers' modules.
    convert = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers
    return convert(None, dict(image_proj_sd), low_cpu_mem_usage=False).eval()


CASES = {
    "linear": ({"cross_attention_dim": 32, "clip_embeddings_dim": 24, "num_tokens": 4}, lambda g: (torch.randn(3, 24, generator=g),)),
    "mlp": ({"cross_attention_dim": 32, "clip_embeddings_dim": 48}, lambda g: (torch.randn(2, 9, 48, generator=g),)),
    "resampler": (
        {"cross_attention_dim": 32, "dim": 128, "depth": 4, "dim_head": 64, "heads": 2, "num_queries": 6,
         "embedding_dim": 48, "output_dim": 32, "ff_mult": 4},
        lambda g: (torch.randn(2, 9, 48, generator=g),),
    ),
    "instantid-resampler": (
        {"cross_attention_dim": 32, "dim": 128, "depth": 4, "dim_head": 64, "heads": 2, "num_queries": 16,
         "embedding_dim": 16, "output_dim": 32, "ff_mult": 4},
        lambda g: (torch.randn(2, 1, 16, generator=g) * 20,),  # raw ArcFace embeddings are large
    ),
    "faceid-mlp": (
        {"cross_attention_dim": 32, "id_embeddings_dim": 16, "hidden_dim": 32, "num_tokens": 4},
        lambda g: (F.normalize(torch.randn(3, 16, generator=g), dim=-1),),
    ),
    "faceid-mlp-portrait": (
        {"cross_attention_dim": 32, "id_embeddings_dim": 16, "hidden_dim": 32, "num_tokens": 16},
        lambda g: (F.normalize(torch.randn(5, 16, generator=g), dim=-1),),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_projection_numbers_match_diffusers(case, tmp_path):
    params, inputs = CASES[case]
    info = small_info(case.replace("-portrait", ""), params)
    sections = write_adapter(tmp_path, info)
    ours, _ = models.load_adapter(info, sections)
    ref = diffusers_projection(sections["image_proj"])
    x = inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(*x), ref(*x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shortcut,scale", [(False, 1.0), (True, 1.0), (True, 0.6)])
def test_faceid_plus_numbers_match_diffusers(shortcut, scale, tmp_path):
    perceiver = {"dim": 128, "depth": 4, "dim_head": 64, "heads": 2, "embedding_dim": 48, "output_dim": 128, "ff_mult": 4}
    info = small_info("faceid-plus", {"cross_attention_dim": 128, "id_embeddings_dim": 16, "hidden_dim": 32,
                                      "num_tokens": 4, "perceiver": perceiver, "shortcut": shortcut})
    sections = write_adapter(tmp_path, info, seed=3, lora_rank=4)
    ours, ip_layers = models.load_adapter(info, sections)
    ref = diffusers_projection(sections["image_proj"])
    g = torch.Generator().manual_seed(2)
    face = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    clip_hidden = torch.randn(2, 9, 48, generator=g)
    ref.clip_embeds, ref.shortcut, ref.shortcut_scale = clip_hidden.unsqueeze(1), shortcut, scale
    with torch.no_grad():
        torch.testing.assert_close(ours(face, clip_hidden, scale=scale), ref(face), atol=1e-5, rtol=1e-5)
        # the explicit argument overrides the variant's default
        ref.shortcut = not shortcut
        torch.testing.assert_close(ours(face, clip_hidden, shortcut=not shortcut, scale=scale), ref(face), atol=1e-5, rtol=1e-5)
    assert ip_layers.lora.rank == 4 and len(ip_layers.lora) == 6


def official_perceiver_attention(attn: PerceiverAttention, x, latents, softmax_dtype=torch.float32):
    """The published PerceiverAttention forward (q and k each scaled by dim_head^-1/4, float32 softmax)."""
    x = F.layer_norm(x, x.shape[-1:], attn.norm1.weight, attn.norm1.bias)
    latents = F.layer_norm(latents, latents.shape[-1:], attn.norm2.weight, attn.norm2.bias)
    b, n, _ = latents.shape
    q = latents @ attn.to_q.weight.T
    kv = torch.cat((x, latents), dim=-2) @ attn.to_kv.weight.T
    k, v = kv[..., : kv.shape[-1] // 2], kv[..., kv.shape[-1] // 2:]

    def heads(t):
        return t.reshape(b, t.shape[1], attn.heads, -1).permute(0, 2, 1, 3)

    s = 1 / math.sqrt(math.sqrt(attn.dim_head))
    w = (heads(q) * s) @ (heads(k) * s).transpose(-2, -1)
    w = torch.softmax(w.to(softmax_dtype), dim=-1).to(w.dtype)
    out = (w @ heads(v)).permute(0, 2, 1, 3).reshape(b, n, -1)
    return out @ attn.to_out.weight.T


@pytest.mark.parametrize("dim_head,heads", [(64, 3), (128, 2)])
def test_sdpa_attention_matches_the_official_scaled_formula(dim_head, heads):
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=96, dim_head=dim_head, heads=heads).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x, latents = torch.randn(2, 11, 96) * 3, torch.randn(2, 5, 96)
        torch.testing.assert_close(attn(x, latents), official_perceiver_attention(attn, x, latents), atol=1e-5, rtol=1e-5)
        # in float64 (softmax too) the two are the same function, to rounding
        attn = attn.double()
        x, latents = x.double(), latents.double()
        want = official_perceiver_attention(attn, x, latents, softmax_dtype=torch.float64)
        torch.testing.assert_close(attn(x, latents), want, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- ip_adapter layers and LoRA


def test_ip_layers_are_indexed_by_ordinal_not_by_string_order(tmp_path):
    # 6 layers: keys 1, 3, 5, 7, 9, 11 -- safetensors lists 11 before 3
    info = small_info("linear", {"cross_attention_dim": 32, "clip_embeddings_dim": 24, "num_tokens": 4,
                                 "ip_hidden_sizes": [8, 8, 16, 16, 8, 8]})
    flat = {f"image_proj.{k}": v for k, v in official_state_dict(info, 0).items()}
    for m, h in enumerate(info.params["ip_hidden_sizes"]):
        flat[f"ip_adapter.{2 * m + 1}.to_k_ip.weight"] = torch.full((h, 32), float(m))
        flat[f"ip_adapter.{2 * m + 1}.to_v_ip.weight"] = torch.full((h, 32), -float(m))
    write_random(flat, tmp_path / "order.safetensors")
    sections = formats.load_tensors(tmp_path / "order.safetensors")
    assert list(sections["ip_adapter"])[:4] == ["1.to_k_ip.weight", "1.to_v_ip.weight", "11.to_k_ip.weight", "11.to_v_ip.weight"]
    _, ip_layers = models.load_adapter(info, sections)
    tokens = torch.ones(1, 4, 32)
    for m in range(6):
        k, v = ip_layers.key_value(m, tokens)
        assert k.shape == (1, 4, info.params["ip_hidden_sizes"][m])
        assert torch.all(k == 32.0 * m) and torch.all(v == -32.0 * m)
    with pytest.raises(IndexError):
        ip_layers[6]


def test_faceid_lora_is_read_per_processor(tmp_path):
    info = small_info("faceid-mlp", {"cross_attention_dim": 32, "id_embeddings_dim": 16, "hidden_dim": 32,
                                     "num_tokens": 4, "ip_hidden_sizes": [8, 12]}, lora=True, lora_rank=4)
    sections = write_adapter(tmp_path, info, lora_rank=4)
    _, ip_layers = models.load_adapter(info, sections, dtype=torch.float64)
    lora = ip_layers.lora
    assert sorted(lora.layers) == [0, 1, 2, 3] and lora.rank == 4
    for n in range(4):
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            down, up = lora.layers[n][proj]
            assert down.dtype == torch.float64
            assert torch.equal(down, sections["ip_adapter"][f"{n}.{proj}_lora.down.weight"].double())
            assert torch.equal(up, sections["ip_adapter"][f"{n}.{proj}_lora.up.weight"].double())
    # attn2 (odd) k/v read the 32-wide context, attn1 (even) its own width
    assert lora.layers[3]["to_k"][0].shape == (4, 32) and lora.layers[2]["to_k"][0].shape == (4, 12)

    broken = dict(sections["ip_adapter"])
    del broken["2.to_v_lora.up.weight"]
    with pytest.raises(CheckpointError, match=r"ip_adapter\.2\.to_v_lora\.up\.weight is missing"):
        models.load_adapter(info, {"image_proj": sections["image_proj"], "ip_adapter": broken})
    broken = dict(sections["ip_adapter"])
    broken["1.to_k_lora.down.weight"] = torch.zeros(4, 12)
    with pytest.raises(CheckpointError, match=r"ip_adapter\.1\.to_k_lora.*expected down \[4, 32\]"):
        models.load_adapter(info, {"image_proj": sections["image_proj"], "ip_adapter": broken})
    no_lora = {k: v for k, v in sections["ip_adapter"].items() if "_lora." not in k}
    with pytest.raises(CheckpointError, match="LoRA"):
        models.load_adapter(info, {"image_proj": sections["image_proj"], "ip_adapter": no_lora})


# --------------------------------------------------------------------------- errors for people


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path):
    name = "ip-adapter_sd15"
    info = formats.inspect(write_manifest_layout(name, tmp_path, "safetensors"))
    sections = meta_sections(name)
    sections["image_proj"]["proj.weight"] = torch.empty(3072, 1280, device="meta")
    with pytest.raises(CheckpointError) as e:
        models.load_adapter(info, sections, device="meta")
    msg = str(e.value)
    assert "image_proj.proj.weight" in msg and "[3072, 1280]" in msg and "[3072, 1024]" in msg
    assert info.path in msg

    sections = meta_sections(name)
    sections["ip_adapter"]["31.to_v_ip.weight"] = torch.empty(640, 768, device="meta")
    with pytest.raises(CheckpointError, match=r"ip_adapter\.31\.to_v_ip\.weight has shape \[640, 768\], expected \[1280, 768\]"):
        models.load_adapter(info, sections, device="meta")

    sections = meta_sections(name)
    del sections["image_proj"]["norm.bias"]
    sections["image_proj"]["extra.weight"] = torch.empty(3, device="meta")
    with pytest.raises(CheckpointError) as e:
        models.load_adapter(info, sections, device="meta")
    assert "image_proj.norm.bias is missing" in str(e.value) and "image_proj.extra.weight is not part" in str(e.value)

    with pytest.raises(CheckpointError, match="image_proj section is missing"):
        models.load_adapter(info, {"ip_adapter": sections["ip_adapter"]}, device="meta")


def test_unknown_projection_is_refused():
    with pytest.raises(CheckpointError, match="no image projection"):
        models.build_image_proj(small_info("controlnet", {}))
