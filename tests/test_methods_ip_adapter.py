"""A unit as a user sends it -> the image tokens the UNet gets, checked against the official formula."""

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from checkpoints import manifest_keys, write_random
from lib_identity import discovery, units
from lib_identity.methods import ip_adapter

TINY_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=1024)


def b64(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def picture(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lib_identity.encoders import clip_vision

    # a tiny encoder stands in for ViT-H/14 (same projection width, 1024, as the adapter needs)
    mp = pytest.MonkeyPatch()
    real = clip_vision.shipped_config
    mp.setattr(clip_vision, "shipped_config", lambda eid: dict(real(eid), **TINY_CLIP) if eid == "clip-vit-h" else real(eid))
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).eval()
    clip.save_pretrained(root / "clip_vision" / "image_encoder", safe_serialization=True)
    tensors = write_random(manifest_keys("ip-adapter_sd15"), root / "ipadapter" / "ip-adapter_sd15.safetensors",
                           dtype=torch.float32, std=0.05)
    folders = discovery.model_folders(str(root))
    discovery.list_models(folders, refresh=True)
    yield clip, tensors, folders, root / "clip_vision" / "image_encoder"
    mp.undo()


def resolve(setup, **fields):
    clip, tensors, folders, encoder = setup
    unit = units.Unit.from_api({"model": "ip-adapter_sd15", **fields}, 1)
    (resolved,) = units.validate_for_run(
        [unit], base="sd15", find_model=lambda n: discovery.find_model(n, folders),
        find_encoder=lambda need: str(encoder),
    )
    return resolved


def official_tokens(tensors, embeds):
    """ImageProjModel as the IP-Adapter code defines it: Linear -> [tokens, 768] -> LayerNorm."""
    x = F.linear(embeds, tensors["image_proj.proj.weight"], tensors["image_proj.proj.bias"]).reshape(-1, 4, 768)
    return F.layer_norm(x, (768,), tensors["image_proj.norm.weight"], tensors["image_proj.norm.bias"])


def clip_embeds(clip, images):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    px = proc(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        return clip(pixel_values=px).image_embeds


def test_tokens_are_the_official_projection_of_the_clip_embedding(setup):
    clip, tensors, _, _ = setup
    img = picture(1)
    resolved = resolve(setup, images=[b64(img)], weight=0.7, start=0.1, end=0.8, layer_preset="standard")
    prompt = ip_adapter.prepare(resolved, device="cpu", dtype=torch.float32)
    want = official_tokens(tensors, clip_embeds(clip, [img]))
    torch.testing.assert_close(prompt.cond_tokens, want, atol=1e-5, rtol=1e-5)
    # the official uncond: the projection of a zero embedding (not zero tokens)
    torch.testing.assert_close(prompt.uncond_tokens, official_tokens(tensors, torch.zeros(1, 1024)), atol=1e-5, rtol=1e-5)
    assert (prompt.weight, prompt.start, prompt.end) == (0.7, 0.1, 0.8)
    assert len(prompt.ip_layers) == 16


def test_average_combines_the_embeddings_before_the_projection(setup):
    clip, tensors, _, _ = setup
    a, b = picture(2), picture(3, (30, 60))
    prompt = ip_adapter.prepare(resolve(setup, images=[b64(a), b64(b)], combine="average"), device="cpu", dtype=torch.float32)
    want = official_tokens(tensors, clip_embeds(clip, [a, b]).mean(0, keepdim=True))
    torch.testing.assert_close(prompt.cond_tokens, want, atol=1e-5, rtol=1e-5)


def test_weighted_average_and_concat(setup):
    clip, tensors, _, _ = setup
    a, b = picture(4), picture(5)
    emb = clip_embeds(clip, [a, b])
    weighted = ip_adapter.prepare(resolve(setup, images=[b64(a), b64(b)], combine="weighted average", image_weights=[3, 1]),
                                  device="cpu", dtype=torch.float32)
    torch.testing.assert_close(weighted.cond_tokens, official_tokens(tensors, (0.75 * emb[0] + 0.25 * emb[1])[None]),
                               atol=1e-5, rtol=1e-5)
    concat = ip_adapter.prepare(resolve(setup, images=[b64(a), b64(b)], combine="concat"), device="cpu", dtype=torch.float32)
    assert concat.cond_tokens.shape == (2, 4, 768)  # the session lays them side by side: 8 tokens
    torch.testing.assert_close(concat.cond_tokens, official_tokens(tensors, emb), atol=1e-5, rtol=1e-5)


def test_the_second_generation_runs_no_encoder(setup):
    clip, tensors, _, encoder = setup
    from lib_identity.encoders import default_registry

    img = picture(6)
    ip_adapter.prepare(resolve(setup, images=[b64(img)]), device="cpu", dtype=torch.float32)
    calls = []
    handle = default_registry().model(str(encoder)).register_forward_hook(lambda *a: calls.append(1))
    try:
        again = Image.frombytes("RGB", img.size, img.tobytes())  # same pixels, another object
        ip_adapter.prepare(resolve(setup, images=[b64(again)]), device="cpu", dtype=torch.float32)
    finally:
        handle.remove()
    assert calls == []


def test_a_family_this_version_cannot_run_is_refused_by_name(setup, tmp_path):
    from lib_identity.errors import UnitError

    resolved = resolve(setup, images=[b64(picture(7))])
    info = resolved.model.info
    fake = type(resolved.model)(name="x", path=resolved.model.path, short_hash="", info=type(info)(**{**info.__dict__, "family": "some-future-method"}))
    from lib_identity.methods import prepare_units

    with pytest.raises(UnitError, match=r"Identity unit 1, field 'model': model 'x' is some-future-method, which this version cannot run; choose an IP-Adapter, IP-Adapter FaceID, InstantID or PhotoMaker model"):
        prepare_units([type(resolved)(1, resolved.unit, fake, resolved.encoders)], device="cpu", dtype=torch.float32)
    with pytest.raises(UnitError, match="IP-Adapter models only"):
        ip_adapter.prepare(type(resolved)(1, resolved.unit, fake, resolved.encoders), device="cpu", dtype=torch.float32)
