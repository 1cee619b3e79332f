"""CLIP vision encoders: preparation, loading every file layout users have, outputs, uncond, caching.

Oracles: transformers' own ``CLIPImageProcessor`` and ``CLIPVisionModelWithProjection`` /
``CLIPModel`` (and its ``save_pretrained`` writer), torch's ``nn.MultiheadAttention`` for the
OpenCLIP layout, and the official key manifests for the full-size layouts (built on ``meta``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lib_identity import discovery, formats
from lib_identity.encoders import (
    EncoderRegistry,
    EncodingCache,
    Preparation,
    cropped_fraction,
    encode_images,
    find_encoder,
    fit,
    image_digest,
    load_encoder,
    make_config,
    prepare_pixels,
    run_encoder,
)
from lib_identity.errors import CheckpointError, EncoderError, ModelNotFoundError, PreparationError
from tests.checkpoints import manifest_keys, write_layout, write_manifest_layout

transformers = pytest.importorskip("transformers")
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402

TINY = dict(
    hidden_size=32,
    intermediate_size=48,
    projection_dim=24,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)
TOKENS = (32 // 8) ** 2 + 1

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


def processor():
    """transformers' CLIP processor with its default settings (the PIL implementation, as in 4.30)."""
    try:
        from transformers import CLIPImageProcessorPil as P  # transformers >= 5 without torchvision picks it anyway
    except ImportError:
        from transformers import CLIPImageProcessor as P
    return P()


def noisy(w, h, seed=0, mode="RGB"):
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)


def banded(w, h, axis):
    """Grey picture whose first tenth is red and last tenth blue, along ``axis`` ("x" or "y")."""
    img = Image.new("RGB", (w, h), GREY)
    n = (w if axis == "x" else h) // 10
    if axis == "x":
        img.paste(RED, (0, 0, n, h))
        img.paste(BLUE, (w - n, 0, w, h))
    else:
        img.paste(RED, (0, 0, w, n))
        img.paste(BLUE, (0, h - n, w, h))
    return img


def has_color(img, rgb, tol=40):
    arr = np.asarray(img).astype(int)
    return bool((np.abs(arr - np.array(rgb)).max(axis=-1) <= tol).any())


# --------------------------------------------------------------------------- preparation


@pytest.mark.parametrize(
    "picture",
    [
        noisy(300, 170),  # wide
        noisy(170, 301, seed=1),  # tall, odd crop offset
        noisy(100, 60, seed=2),  # smaller than 224: upscaled
        noisy(224, 224, seed=3),
        noisy(225, 500, seed=4),
        noisy(200, 260, seed=6, mode="L"),
        noisy(260, 200, seed=7).convert("P"),
    ],
    ids=["wide", "tall", "small", "square", "very-tall", "grey", "palette"],
)
def test_default_preparation_is_exactly_the_official_processor(picture):
    want = torch.from_numpy(np.asarray(processor()(images=picture, return_tensors="np")["pixel_values"]))
    got = prepare_pixels(picture)
    assert got.shape == (1, 3, 224, 224) and got.dtype == torch.float32
    # same PIL resampling, same float64 scale then float32 normalisation: identical numbers
    assert torch.equal(got, want)


def test_transparency_is_laid_on_white():
    picture = noisy(320, 200, seed=5, mode="RGBA")
    # transformers >= 4.4x does this itself; 4.30 dropped the alpha, keeping arbitrary colours
    on_white = Image.alpha_composite(Image.new("RGBA", picture.size, (255, 255, 255, 255)), picture).convert("RGB")
    want = torch.from_numpy(np.asarray(processor()(images=on_white, return_tensors="np")["pixel_values"]))
    assert torch.equal(prepare_pixels(picture), want)
    invisible_red = Image.new("RGBA", (50, 30), (255, 0, 0, 0))
    assert (np.asarray(fit(invisible_red)) == 255).all()


def test_a_batch_keeps_the_order_of_the_pictures():
    a, b = noisy(300, 200, seed=10), noisy(200, 300, seed=11)
    batch = prepare_pixels([a, b])
    assert torch.equal(batch[0], prepare_pixels(a)[0]) and torch.equal(batch[1], prepare_pixels(b)[0])


def test_numpy_pictures_are_taken_like_pil_ones():
    a = noisy(300, 200, seed=12)
    assert torch.equal(prepare_pixels(np.asarray(a)), prepare_pixels(a))


def test_centre_crop_loses_the_ends_of_a_wide_picture_but_pad_keeps_them():
    picture = banded(300, 150, "x")
    cropped = fit(picture, Preparation())
    assert not has_color(cropped, RED) and not has_color(cropped, BLUE)

    padded = fit(picture, Preparation(mode="pad", pad_color=(0, 255, 0)))
    assert padded.size == (224, 224)
    assert has_color(padded, RED) and has_color(padded, BLUE)
    arr = np.asarray(padded)
    # 300x150 -> 224x112 centred: 56 rows of bars above and below, in the pad colour
    assert (arr[:55] == (0, 255, 0)).all() and (arr[-55:] == (0, 255, 0)).all()
    assert not (arr[60:164] == (0, 255, 0)).all(axis=-1).any()
    # the pixels the encoder gets are the fitted square, normalised
    px = prepare_pixels(picture, Preparation(mode="pad", pad_color="#00ff00"))
    assert torch.equal(px, prepare_pixels(padded))


def test_pad_keeps_a_tall_picture_whole():
    padded = fit(banded(150, 300, "y"), Preparation(mode="pad"))
    assert has_color(padded, RED) and has_color(padded, BLUE)
    arr = np.asarray(padded)
    assert (arr[:, :55] == 0).all() and (arr[:, -55:] == 0).all()  # black bars left and right by default


def test_squash_keeps_both_ends_and_fills_the_square():
    squashed = np.asarray(fit(banded(300, 150, "x"), Preparation(mode="squash")))
    assert squashed.shape == (224, 224, 3)
    # the red tenth becomes ~22 columns on the left, blue on the right, over the full height
    assert has_color(Image.fromarray(squashed[:, :15]), RED) and has_color(Image.fromarray(squashed[:, -15:]), BLUE)
    assert np.abs(squashed[:, 5].astype(int) - RED).max() < 10 and np.abs(squashed[:, -5].astype(int) - BLUE).max() < 10
    assert not has_color(Image.fromarray(squashed), (0, 0, 0), tol=10)  # no bars


@pytest.mark.parametrize(
    "axis,position,keeps,loses",
    [
        ("y", "top", RED, BLUE),
        ("y", "bottom", BLUE, RED),
        ("x", "left", RED, BLUE),
        ("x", "right", BLUE, RED),
    ],
)
def test_crop_position_selects_that_end(axis, position, keeps, loses):
    picture = banded(150, 400, "y") if axis == "y" else banded(400, 150, "x")
    square = fit(picture, Preparation(mode="crop", crop_position=position))
    assert has_color(square, keeps) and not has_color(square, loses)
    centre = fit(picture, Preparation(mode="crop", crop_position="center"))
    assert not has_color(centre, RED) and not has_color(centre, BLUE)


def test_a_position_across_the_short_side_changes_nothing():
    wide = banded(400, 150, "x")
    assert np.array_equal(np.asarray(fit(wide, Preparation(crop_position="top"))), np.asarray(fit(wide, Preparation())))


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (dict(mode="letterbox"), "letterbox"),
        (dict(crop_position="middle"), "middle"),
        (dict(mode="pad", pad_color="blue-ish"), "blue-ish"),
        (dict(mode="pad", pad_color=(0, 300, 0)), "0 to 255"),
    ],
)
def test_bad_preparation_settings_are_named(kwargs, names):
    with pytest.raises(PreparationError, match=names):
        Preparation(**kwargs)


def test_preparation_values_are_normalised_and_hashable():
    p = Preparation(mode="PAD", crop_position="Centre", pad_color="#FF8000")
    assert (p.mode, p.crop_position, p.pad_color) == ("pad", "center", (255, 128, 0))
    assert p == Preparation(mode="pad", pad_color=(255, 128, 0)) and hash(p) == hash(Preparation(mode="pad", pad_color=(255, 128, 0)))


def test_preparation_text_round_trips_for_infotext():
    for p in (Preparation(), Preparation(crop_position="bottom"), Preparation(mode="pad", pad_color=(1, 2, 255)), Preparation(mode="squash")):
        assert Preparation.parse(p.describe()) == p
    assert Preparation.parse("pad") == Preparation(mode="pad")
    with pytest.raises(PreparationError, match="takes no setting"):
        Preparation.parse("squash hard")


def test_cropped_fraction_says_how_much_the_crop_loses():
    assert cropped_fraction(banded(400, 100, "x")) == pytest.approx(0.75)
    assert cropped_fraction(banded(100, 100, "x")) == 0
    assert cropped_fraction(banded(400, 100, "x"), Preparation(mode="pad")) == 0


def test_image_digest_follows_content_not_the_object():
    a = noisy(64, 48, seed=20)
    copy = Image.frombytes("RGB", a.size, a.tobytes())
    assert copy is not a and image_digest(copy) == image_digest(a)
    changed = a.copy()
    changed.putpixel((3, 3), (0, 0, 0) if a.getpixel((3, 3)) != (0, 0, 0) else (1, 1, 1))
    assert image_digest(changed) != image_digest(a)
    assert image_digest(a.resize((48, 64))) != image_digest(a)


# --------------------------------------------------------------------------- loading


def tiny_reference(seed=0, **over):
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**TINY, **over}))
    return model.eval()


def tiny_pixels(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def reference_outputs(model, px):
    with torch.no_grad():
        out = model(pixel_values=px, output_hidden_states=True)
    return out.image_embeds, out.hidden_states[-2]


def assert_same_encoder(loaded, reference, px):
    want_embeds, want_hidden = reference_outputs(reference, px)
    got_embeds = run_encoder(loaded, px, "image_embeds")
    got_hidden = run_encoder(loaded, px, "hidden_states[-2]")
    assert got_embeds.shape == (px.shape[0], TINY["projection_dim"])
    assert got_hidden.shape == (px.shape[0], TOKENS, TINY["hidden_size"])
    torch.testing.assert_close(got_embeds, want_embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(got_hidden, want_hidden, rtol=0, atol=1e-6)
    # the two outputs really are different things: the projection vs a layer's tokens
    assert not torch.allclose(got_hidden[:, 0, : TINY["projection_dim"]], got_embeds)


def hf_state_dict(model, with_position_ids=False):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if with_position_ids:  # what transformers < 4.31 saved
        sd["vision_model.embeddings.position_ids"] = torch.arange(TOKENS).expand((1, -1)).clone()
    return sd


def test_folder_with_config_json_as_transformers_writes_it(tmp_path):
    ref = tiny_reference()
    ref.save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    assert (tmp_path / "image_encoder" / "config.json").is_file()
    loaded = load_encoder(tmp_path / "image_encoder")
    assert isinstance(loaded, CLIPVisionModelWithProjection)
    assert_same_encoder(loaded, ref, tiny_pixels())


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "clip_h.pth"])
@pytest.mark.parametrize("position_ids", [False, True])
def test_bare_files_in_each_container(tmp_path, name, position_ids):
    from safetensors.torch import save_file

    ref = tiny_reference(seed=1)
    sd = hf_state_dict(ref, with_position_ids=position_ids)
    path = tmp_path / name
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))  # sd-webui-controlnet's clip_h.pth is this: a pickled HF state dict
    loaded = load_encoder(path, config=TINY)
    assert_same_encoder(loaded, ref, tiny_pixels(3, seed=1))


def test_fp16_file_loads_in_fp16(tmp_path):
    from safetensors.torch import save_file

    ref = tiny_reference(seed=2)
    save_file({k: v.half() for k, v in hf_state_dict(ref).items()}, str(tmp_path / "half.safetensors"))
    loaded = load_encoder(tmp_path / "half.safetensors", config=TINY)
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    ref.half().float()  # the reference with the same rounding of its weights
    assert_same_encoder(loaded.float(), ref, tiny_pixels())


def test_whole_clip_model_file_uses_its_vision_half(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=99, max_position_embeddings=12, projection_dim=24)
    whole = CLIPModel(CLIPConfig(text_config=text, vision_config=TINY, projection_dim=24)).eval()
    save_file(hf_state_dict(whole), str(tmp_path / "clip.safetensors"))
    assert any(k.startswith("text_model.") for k in whole.state_dict())
    loaded = load_encoder(tmp_path / "clip.safetensors", config=TINY)
    px = tiny_pixels()
    with torch.no_grad():
        feats = whole.get_image_features(pixel_values=px)
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    torch.testing.assert_close(run_encoder(loaded, px, "image_embeds"), feats, rtol=0, atol=1e-6)


# An OpenCLIP ViT as open_clip writes it (names and the fused attention of nn.MultiheadAttention),
# with its own forward pass: the oracle for the key conversion.
class _OpenClipBlock(nn.Module):
    def __init__(self, width, heads, mlp):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, mlp))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(mlp, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _OpenClipVisual(nn.Module):
    def __init__(self, width=32, layers=3, heads=4, mlp=48, patch=8, image=32, out=24):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.2)
        self.positional_embedding = nn.Parameter(torch.randn((image // patch) ** 2 + 1, width) * 0.2)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(_OpenClipBlock(width, heads, mlp) for _ in range(layers))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out) * 0.2)
        for p in self.parameters():  # LayerNorms start at 1/0: make every weight matter
            with torch.no_grad():
                p.add_(torch.randn_like(p) * 0.05)

    def forward(self, px):
        x = self.conv1(px).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + self.positional_embedding
        x = self.ln_pre(x)
        blocks = self.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        penultimate = x
        x = blocks[-1](x)
        return self.ln_post(x[:, 0]) @ self.proj, penultimate


@pytest.mark.parametrize("prefix", ["visual.", ""])
def test_openclip_named_files_are_converted(tmp_path, prefix):
    from safetensors.torch import save_file

    torch.manual_seed(4)
    tower = _OpenClipVisual().eval()
    sd = {prefix + k: v.detach().clone() for k, v in tower.state_dict().items()}
    if prefix:  # a whole OpenCLIP model also holds the text tower at the top level
        sd.update({"positional_embedding": torch.zeros(12, 16), "transformer.resblocks.0.ln_1.weight": torch.ones(16), "logit_scale": torch.ones(())})
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    loaded = load_encoder(tmp_path / "open_clip_model.safetensors", config=TINY)
    px = tiny_pixels(2, seed=4)
    with torch.no_grad():
        embeds, penultimate = tower(px)
    torch.testing.assert_close(run_encoder(loaded, px, "image_embeds"), embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(run_encoder(loaded, px, "hidden_states[-2]"), penultimate, rtol=0, atol=1e-5)


def test_openclip_tower_with_unknown_parts_is_refused(tmp_path):
    from safetensors.torch import save_file

    sd = {"visual." + k: v.detach().clone() for k, v in _OpenClipVisual().state_dict().items()}
    sd["visual.attn_pool.query"] = torch.zeros(4, 32)
    save_file(sd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="attn_pool"):
        load_encoder(tmp_path / "odd.safetensors", config=TINY)


class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["IDENTITY_TEST_MARKER"]),))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv("IDENTITY_TEST_MARKER", str(marker))
    sd = hf_state_dict(tiny_reference())
    sd["vision_model.post_layernorm.extra"] = _Payload()
    torch.save(sd, str(tmp_path / "clip_h.pth"))
    with pytest.raises(CheckpointError, match="refused"):
        load_encoder(tmp_path / "clip_h.pth", config=TINY)
    assert not marker.exists()


def test_missing_projection_still_gives_hidden_states_but_refuses_image_embeds(tmp_path):
    from safetensors.torch import save_file

    ref = tiny_reference(seed=5)
    sd = hf_state_dict(ref)
    del sd["visual_projection.weight"]
    save_file(sd, str(tmp_path / "no_proj.safetensors"))
    loaded = load_encoder(tmp_path / "no_proj.safetensors", config=TINY)
    px = tiny_pixels()
    torch.testing.assert_close(run_encoder(loaded, px, "hidden_states[-2]"), reference_outputs(ref, px)[1], rtol=0, atol=1e-6)
    with pytest.raises(EncoderError, match="visual_projection"):
        run_encoder(loaded, px, "image_embeds")


def test_incomplete_or_mismatched_files_are_explained(tmp_path):
    from safetensors.torch import save_file

    sd = hf_state_dict(tiny_reference())
    partial = {k: v for k, v in sd.items() if "layers.2." not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(CheckpointError, match=r"weights are missing \(e\.g\. vision_model\.encoder\.layers\.2\."):
        load_encoder(tmp_path / "partial.safetensors", config=TINY)
    with pytest.raises(CheckpointError, match="other shapes"):
        load_encoder(tmp_path / "partial.safetensors", config={**TINY, "num_hidden_layers": 2, "hidden_size": 40})
    save_file(sd, str(tmp_path / "tiny.safetensors"))
    with pytest.raises(CheckpointError, match="not the CLIP ViT-H/14"):
        load_encoder(tmp_path / "tiny.safetensors", encoder_id="clip-vit-h")
    with pytest.raises(CheckpointError, match="width 32 is not one the adapters use"):
        load_encoder(tmp_path / "tiny.safetensors")


def test_an_adapter_file_is_not_taken_for_an_encoder(tmp_path):
    write_manifest_layout("ip-adapter_sd15", tmp_path, "safetensors")
    with pytest.raises(CheckpointError, match="IP-Adapter model, not an image encoder"):
        load_encoder(tmp_path / "ip-adapter_sd15.safetensors")


# --------------------------------------------------------------------------- full-size layouts


def meta_state_dict(encoder_id):
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(make_config(encoder_id))
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "vision_model.embeddings.position_ids"}


@pytest.mark.parametrize("encoder_id,manifest", [("clip-vit-h", "clip_vision_vit-h"), ("clip-vit-bigg", "clip_vision_vit-bigG")])
def test_shipped_configs_build_exactly_the_official_layouts(encoder_id, manifest):
    assert meta_state_dict(encoder_id) == manifest_keys(manifest)


def test_shipped_vit_l_config_is_photomakers_vision_tower():
    pm = {k[len("id_encoder."):]: v for k, v in manifest_keys("photomaker-v1").items() if k.startswith("id_encoder.")}
    vision = {k: v for k, v in pm.items() if k.startswith("vision_model.") or k == "visual_projection.weight"}
    assert meta_state_dict("clip-vit-l") == vision


def test_shipped_configs_match_the_manifests_hyperparameters():
    from tests.checkpoints import manifest

    for encoder_id, name in [("clip-vit-h", "clip_vision_vit-h"), ("clip-vit-bigg", "clip_vision_vit-bigG")]:
        want = manifest(name)["image_encoder_config"]
        cfg = make_config(encoder_id)
        assert {k: getattr(cfg, k) for k in want} == want
    assert make_config("clip-vit-l").hidden_act == "quick_gelu"


def test_full_size_openclip_layout_is_recognised_as_vit_h(tmp_path):
    with torch.device("meta"):
        tower = _OpenClipVisual(width=1280, layers=32, heads=16, mlp=5120, patch=14, image=224, out=1024)
    shapes = {"visual." + k: tuple(v.shape) for k, v in tower.state_dict().items()}
    path = write_layout(shapes, tmp_path / "open_clip_pytorch_model.safetensors")
    layout = formats.read_layout(str(path))
    assert layout.section("clip_vision") == manifest_keys("clip_vision_vit-h")
    assert formats.detect(layout).variant == "clip-vit-h"


# --------------------------------------------------------------------------- finding


def test_find_encoder_picks_the_file_in_the_clip_vision_folder(tmp_path):
    folder = tmp_path / "models" / "clip_vision"
    path = write_manifest_layout("clip_vision_vit-h", folder, "safetensors")
    discovery.list_models([], refresh=True)
    assert find_encoder("clip-vit-h", [str(folder)]) == str(path)
    with pytest.raises(ModelNotFoundError) as err:
        find_encoder("clip-vit-bigg", [str(tmp_path / "models" / "ipadapter"), str(folder)])
    msg = str(err.value)
    assert "ViT-bigG/14" in msg and "sdxl_models/image_encoder" in msg and f"put it in {folder}" in msg


def test_find_encoder_takes_the_h94_image_encoder_folder(tmp_path):
    folder = tmp_path / "ipadapter"
    enc = folder / "image_encoder"
    write_layout(manifest_keys("clip_vision_vit-bigG"), enc / "model.safetensors", dtype=torch.float32)
    (enc / "config.json").write_text('{"hidden_size": 1664}')
    discovery.list_models([], refresh=True)
    assert find_encoder("clip-vit-bigg", [str(folder)]) == str(enc)


# --------------------------------------------------------------------------- encoding and caching


class Counting:
    """A tiny encoder that counts its forward passes, and the dtype its weights had during each."""

    def __init__(self, seed=0):
        self.model = tiny_reference(seed)
        self.calls = []
        self.model.register_forward_pre_hook(lambda m, args, kwargs: self.calls.append(next(m.parameters()).dtype), with_kwargs=True)


def pictures(n=2, seed=30):
    return [noisy(50 + 13 * i, 40 + 7 * i, seed=seed + i) for i in range(n)]


def fresh():
    return dict(cache=EncodingCache(), registry=EncoderRegistry(policy="keep"))


@pytest.mark.parametrize("output", ["image_embeds", "hidden_states[-2]"])
def test_encode_images_equals_the_model_on_the_prepared_pixels(output):
    enc = Counting()
    refs = pictures(3)
    prep = Preparation(mode="pad")
    cond, uncond = encode_images(enc.model, refs, output, prep, **fresh())
    embeds, hidden = reference_outputs(enc.model, prepare_pixels(refs, prep, size=32))
    want = embeds if output == "image_embeds" else hidden
    assert cond.shape == want.shape == ((3, 24) if output == "image_embeds" else (3, TOKENS, 32))
    torch.testing.assert_close(cond, want, rtol=0, atol=1e-6)
    assert uncond.shape == cond.shape


def test_zero_uncond_follows_the_official_code():
    enc = Counting()
    # linear path: a zero embedding, no encoder run for it
    cond, uncond = encode_images(enc.model, pictures(2), "image_embeds", **fresh())
    assert len(enc.calls) == 1 and torch.equal(uncond, torch.zeros_like(cond))
    # plus path: the encoder on all-zero pixels after normalisation
    cond, uncond = encode_images(enc.model, pictures(2), "hidden_states[-2]", **fresh())
    want = reference_outputs(enc.model, torch.zeros(1, 3, 32, 32))[1]
    torch.testing.assert_close(uncond, want.expand(2, -1, -1), rtol=0, atol=1e-6)


def test_noise_uncond_is_fixed_and_not_the_zero_one():
    enc = Counting()
    _, noise = encode_images(enc.model, pictures(2), "hidden_states[-2]", uncond="noise", **fresh())
    _, again = encode_images(enc.model, pictures(1, seed=99), "hidden_states[-2]", uncond="noise", **fresh())
    _, zero = encode_images(enc.model, pictures(1), "hidden_states[-2]", uncond="zero", **fresh())
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[0], again[0])
    assert not torch.allclose(noise[0], zero[0], atol=1e-3)
    _, noise_embeds = encode_images(enc.model, pictures(1), "image_embeds", uncond="noise", **fresh())
    assert noise_embeds.abs().sum() > 0


def test_negative_picture_uncond_is_encoded_like_a_reference():
    enc = Counting()
    negative = noisy(80, 60, seed=77)
    cond, uncond = encode_images(enc.model, pictures(2), "image_embeds", uncond=negative, **fresh())
    neg_as_ref, _ = encode_images(enc.model, [negative], "image_embeds", **fresh())
    # one negative serves every reference (batch sizes differ, hence the float tolerance)
    torch.testing.assert_close(uncond, neg_as_ref.expand(2, -1), rtol=0, atol=1e-6)
    with pytest.raises(EncoderError, match="2 negative pictures for 3 references"):
        encode_images(enc.model, pictures(3), "image_embeds", uncond=[negative, negative], **fresh())
    with pytest.raises(EncoderError, match="unknown uncond 'blank'"):
        encode_images(enc.model, pictures(1), "image_embeds", uncond="blank", **fresh())
    with pytest.raises(EncoderError, match="unknown encoder output 'pooled'"):
        encode_images(enc.model, pictures(1), "pooled", **fresh())


def test_second_generation_with_the_same_pictures_runs_no_encoder():
    enc = Counting()
    kw = fresh()
    refs = pictures(2)
    first = encode_images(enc.model, refs, "hidden_states[-2]", **kw)
    assert len(enc.calls) == 1
    copies = [Image.frombytes("RGB", r.size, r.tobytes()) for r in refs]  # new objects, same content
    second = encode_images(enc.model, copies, "hidden_states[-2]", **kw)
    assert len(enc.calls) == 1
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # one cached, one new picture: only the new one is encoded
    encode_images(enc.model, [copies[0], noisy(90, 90, seed=5)], "hidden_states[-2]", **kw)
    assert len(enc.calls) == 2
    # another preparation or another output is another encoding
    encode_images(enc.model, copies, "hidden_states[-2]", Preparation(mode="squash"), **kw)
    assert len(enc.calls) == 3
    encode_images(enc.model, copies, "image_embeds", **kw)
    assert len(enc.calls) == 4
    # another crop position, another pad colour: encoded anew, and each result is of its own pixels
    results = {}
    for prep in [Preparation(crop_position="top"), Preparation(mode="pad"), Preparation(mode="pad", pad_color="#ffffff")]:
        before = len(enc.calls)
        results[prep], _ = encode_images(enc.model, copies, "image_embeds", prep, **kw)
        assert len(enc.calls) == before + 1, prep
        want = reference_outputs(enc.model, prepare_pixels(copies, prep, size=32))[0]
        torch.testing.assert_close(results[prep], want, rtol=0, atol=1e-6)
    before = len(enc.calls)
    again, _ = encode_images(enc.model, copies, "image_embeds", Preparation(mode="pad"), **kw)
    assert len(enc.calls) == before and torch.equal(again, results[Preparation(mode="pad")])
    assert not torch.allclose(results[Preparation(mode="pad")], results[Preparation(mode="pad", pad_color="#ffffff")], atol=1e-4)
    # another encoder with the same pictures is, too
    other = Counting(seed=9)
    encode_images(other.model, copies, "hidden_states[-2]", **kw)
    assert len(other.calls) == 1


def test_the_cache_is_bounded_and_forgets_the_oldest():
    enc = Counting()
    kw = dict(cache=EncodingCache(max_entries=2), registry=EncoderRegistry(policy="keep"))
    a, b, c = pictures(3)
    for p in (a, b, c):
        encode_images(enc.model, [p], "image_embeds", **kw)
    assert len(kw["cache"]) == 2 and len(enc.calls) == 3
    encode_images(enc.model, [c], "image_embeds", **kw)
    assert len(enc.calls) == 3  # still there
    encode_images(enc.model, [a], "image_embeds", **kw)
    assert len(enc.calls) == 4  # evicted, encoded again

    small = EncodingCache(max_bytes=3 * 24 * 4)  # room for three embeddings of 24 floats
    for i in range(5):
        small.put(("k", i), torch.ones(24))
    assert len(small) == 3 and small.nbytes <= small.max_bytes and ("k", 0) not in small


def test_results_come_in_the_asked_dtype_and_half_on_cpu_is_computed_in_float32():
    enc = Counting()
    cond, uncond = encode_images(enc.model, pictures(1), "hidden_states[-2]", device="cpu", dtype=torch.float16, **fresh())
    assert cond.dtype == uncond.dtype == torch.float16
    assert enc.calls == [torch.float32]
    cond, _ = encode_images(enc.model, pictures(1), "image_embeds", device="cpu", dtype=torch.bfloat16, **fresh())
    assert cond.dtype == torch.bfloat16 and enc.calls[-1] == torch.bfloat16


def _save_tiny_folder(path, seed=0):
    tiny_reference(seed).save_pretrained(path, safe_serialization=True)
    return str(path)


def test_a_path_is_loaded_once_and_the_policy_applies_after_use(tmp_path):
    folder = _save_tiny_folder(tmp_path / "image_encoder")
    loads = []

    def loader(path, encoder_id):
        loads.append(path)
        return load_encoder(path, encoder_id)

    registry = EncoderRegistry(policy="cpu", loader=loader)
    cache = EncodingCache()
    encode_images(folder, pictures(1), "image_embeds", dtype=torch.bfloat16, cache=cache, registry=registry)
    encode_images(folder, pictures(1, seed=50), "image_embeds", dtype=torch.bfloat16, cache=cache, registry=registry)
    assert len(loads) == 1 and registry.loaded() == [folder]
    model = registry.model(folder)
    assert next(model.parameters()).device.type == "cpu"

    registry.policy = "unload after use"  # the settings label works too
    encode_images(folder, pictures(1, seed=60), "image_embeds", cache=cache, registry=registry)
    assert registry.loaded() == []
    encode_images(folder, pictures(1, seed=61), "image_embeds", cache=cache, registry=registry)
    assert len(loads) == 3

    # nothing new to encode: not even loaded
    registry.release()
    encode_images(folder, pictures(1, seed=61), "image_embeds", cache=cache, registry=registry)
    assert len(loads) == 3

    with pytest.raises(EncoderError, match="unknown encoder offload policy 'sometimes'"):
        registry.policy = "sometimes"


def test_a_changed_file_is_a_new_encoder(tmp_path):
    folder = _save_tiny_folder(tmp_path / "enc", seed=0)
    kw = dict(cache=EncodingCache(), registry=EncoderRegistry(policy="keep"))
    first, _ = encode_images(folder, pictures(1), "image_embeds", **kw)
    _save_tiny_folder(tmp_path / "enc", seed=1)
    os.utime(tmp_path / "enc" / "model.safetensors", ns=(1, 1))  # a different mtime even on coarse clocks
    second, _ = encode_images(folder, pictures(1), "image_embeds", **kw)
    assert not torch.allclose(first, second)
    assert len(kw["registry"].loaded()) == 1


def test_cache_resize_and_off():
    import torch

    from lib_identity.encoders import EncodingCache

    cache = EncodingCache(max_entries=4)
    for i in range(4):
        cache.put(i, torch.zeros(2))
    cache.resize(2)
    assert len(cache) == 2 and 3 in cache and 0 not in cache  # the oldest went first
    cache.resize(0)
    cache.put("new", torch.zeros(2))
    assert len(cache) == 0 and cache.get("new") is None
