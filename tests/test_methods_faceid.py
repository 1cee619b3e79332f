"""methods.faceid: from faces to the unit's image tokens and LoRA, as the official code makes them.

Face analysis is another module's job (``lib_identity.encoders.faces``); here it is a stand-in
with its interface (``analyse_faces``, ``pick_face``, ``aligned_face``) that records how it
was asked, so what FaceID does with the faces is what is tested.
"""

import sys
import types

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import lib_identity.encoders
from lib_identity import models
from lib_identity.errors import PatchError, UnitError
from lib_identity.formats import ModelInfo
from lib_identity.methods import faceid
from lib_identity.models.ip_layers import FaceIDLoRA

C = 64
PERCEIVER = {"dim": C, "depth": 4, "dim_head": 64, "heads": 1, "embedding_dim": 32, "output_dim": C, "ff_mult": 4}


def info_for(variant, projection="faceid-mlp", tokens=4, lora=True, shortcut=False):
    params = {"cross_attention_dim": C, "id_embeddings_dim": 512, "hidden_dim": 32, "num_tokens": tokens,
              "ip_hidden_sizes": [8, 16]}
    if projection == "faceid-plus":
        params.update(perceiver=PERCEIVER, shortcut=shortcut, clip_embeddings_dim=32)
    return ModelInfo(family="ip-adapter-faceid", variant=variant, base="sd15", image_encoder="insightface",
                     encoder_output="face_embedding(normed)", tokens=tokens, projection=projection, params=params,
                     lora=lora, lora_rank=2 if lora else None)


def adapter(info, seed=0):
    torch.manual_seed(seed)
    image_proj = models.build_image_proj(info).eval()
    ip_layers = models.build_ip_layers(info)
    if info.lora:
        ip_layers.lora = FaceIDLoRA({n: {p: (torch.randn(2, 8), torch.randn(8, 2)) for p in ("to_q", "to_k", "to_v", "to_out")}
                                     for n in range(4)}, rank=2)
    return image_proj, ip_layers


def embeddings(n, seed=1):
    return torch.randn(n, 512, generator=torch.Generator().manual_seed(seed)) * 25


FACEID = info_for("ip-adapter-faceid_sd15")
PORTRAIT = info_for("ip-adapter-faceid-portrait_sd15", tokens=16, lora=False)


def test_tokens_come_from_the_normed_embedding_and_uncond_from_a_zero_one():
    image_proj, ip_layers = adapter(FACEID)
    raw = embeddings(1)
    unit = faceid.faceid_prompt(FACEID, image_proj, ip_layers, raw, weight=0.6, start=0.1, end=0.9)
    with torch.no_grad():
        want = image_proj(F.normalize(raw, dim=-1))
        zero = image_proj(torch.zeros(1, 512))
    torch.testing.assert_close(unit.prompt.cond_tokens, want)
    torch.testing.assert_close(unit.prompt.uncond_tokens, zero)
    assert (unit.prompt.weight, unit.prompt.start, unit.prompt.end) == (0.6, 0.1, 0.9)
    # raw, normed, numpy or a list of arrays: the same tokens
    again = faceid.faceid_prompt(FACEID, image_proj, ip_layers, [F.normalize(raw, dim=-1)[0].numpy()])
    torch.testing.assert_close(again.prompt.cond_tokens, unit.prompt.cond_tokens)


def test_the_file_lora_comes_with_its_weight_and_portrait_has_none():
    image_proj, ip_layers = adapter(FACEID)
    unit = faceid.faceid_prompt(FACEID, image_proj, ip_layers, embeddings(1), lora_weight=0.4, name="unit 3")
    assert unit.lora.layers is ip_layers.lora and unit.lora.weight == 0.4 and unit.lora.name == "unit 3"
    p_proj, p_layers = adapter(PORTRAIT)
    assert faceid.faceid_prompt(PORTRAIT, p_proj, p_layers, embeddings(2)).lora is None


def test_portrait_lays_each_face_side_by_side_whatever_the_combine_mode():
    image_proj, ip_layers = adapter(PORTRAIT)
    faces = embeddings(3)
    unit = faceid.faceid_prompt(PORTRAIT, image_proj, ip_layers, faces, combine="average")
    cond = unit.prompt.cond_tokens
    assert tuple(cond.shape) == (1, 48, C) and tuple(unit.prompt.uncond_tokens.shape) == (1, 48, C)
    with torch.no_grad():
        for i in range(3):  # face i's 16 tokens, in picture order
            torch.testing.assert_close(cond[0, 16 * i:16 * (i + 1)], image_proj(F.normalize(faces[i:i + 1], dim=-1))[0])


def test_several_pictures_of_plain_faceid_follow_the_combine_mode():
    image_proj, ip_layers = adapter(FACEID)
    faces = embeddings(2)
    concat = faceid.faceid_prompt(FACEID, image_proj, ip_layers, faces, combine="concat")
    average = faceid.faceid_prompt(FACEID, image_proj, ip_layers, faces, combine="average")
    assert tuple(concat.prompt.cond_tokens.shape) == (1, 8, C)
    with torch.no_grad():
        torch.testing.assert_close(average.prompt.cond_tokens, image_proj(F.normalize(faces, dim=-1).mean(0, keepdim=True)))


@pytest.mark.parametrize("bad,match", [(torch.randn(1, 128), r"\[faces, 512\], got \[1, 128\]"),
                                       (torch.zeros(1, 512), "zero or not finite")])
def test_unusable_embeddings_are_refused(bad, match):
    image_proj, ip_layers = adapter(FACEID)
    with pytest.raises(PatchError, match="unit 2: .*" + match):
        faceid.faceid_prompt(FACEID, image_proj, ip_layers, bad, name="unit 2")


@pytest.mark.parametrize("shortcut", [False, True])
def test_plus_refines_with_clip_features_and_v2_scales_the_refinement(shortcut):
    info = info_for("ip-adapter-faceid-plus" + ("v2" if shortcut else "") + "_sd15", "faceid-plus", shortcut=shortcut)
    image_proj, ip_layers = adapter(info)
    raw, g = embeddings(1), torch.Generator().manual_seed(3)
    clip, clip_zero = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    units = [faceid.faceid_prompt(info, image_proj, ip_layers, raw, clip_hidden=clip, uncond_clip_hidden=clip_zero,
                                  s_scale=s) for s in (1.0, 0.3)]
    with torch.no_grad():
        want = image_proj(F.normalize(raw, dim=-1), clip, scale=1.0)
        want_uncond = image_proj(torch.zeros(1, 512), clip_zero, scale=1.0)
    torch.testing.assert_close(units[0].prompt.cond_tokens, want)
    torch.testing.assert_close(units[0].prompt.uncond_tokens, want_uncond)
    moved = (units[0].prompt.cond_tokens - units[1].prompt.cond_tokens).abs().max()
    assert (moved > 1e-3) if shortcut else (moved == 0)
    with pytest.raises(PatchError, match="CLIP ViT-H features of the aligned face crop"):
        faceid.faceid_prompt(info, image_proj, ip_layers, raw)


# --------------------------------------------------------------------------- from pictures


class FakeFaces(types.ModuleType):
    """``lib_identity.encoders.faces`` as far as FaceID uses it; remembers every call."""

    def __init__(self, per_picture):
        super().__init__("lib_identity.encoders.faces")
        self.per_picture = per_picture  # picture size -> its faces
        self.calls = []

    def analyse_faces(self, image, pack_dir, det_size=640):
        self.calls.append(("analyse", image.size, pack_dir, det_size))
        return self.per_picture[image.size]

    def pick_face(self, faces, choice, unit_number=None, image_label=None):
        self.calls.append(("pick", choice, unit_number, image_label))
        return faces[0 if choice == "largest" else int(choice)]

    def aligned_face(self, image, face, size):
        self.calls.append(("align", image.size, tuple(face.keypoints[0]), size))
        return Image.new("RGB", (size, size), tuple(int(v) for v in face.keypoints[0][:1]) * 3)


def fake_face(seed, x):
    return types.SimpleNamespace(box=(x, 0, x + 10, 10), score=0.9, keypoints=[[x, 5]] * 5, embedding=embeddings(1, seed)[0].numpy())


@pytest.fixture
def fake_faces(monkeypatch):
    fake = FakeFaces({(60, 40): [fake_face(10, 1), fake_face(11, 40)], (50, 50): [fake_face(12, 2), fake_face(13, 30)]})
    monkeypatch.setitem(sys.modules, "lib_identity.encoders.faces", fake)
    monkeypatch.setattr(lib_identity.encoders, "faces", fake, raising=False)
    return fake


def test_one_chosen_face_per_picture_gives_the_tokens(fake_faces):
    image_proj, ip_layers = adapter(PORTRAIT)
    pictures = [Image.new("RGB", (60, 40)), Image.new("RGB", (50, 50))]
    unit = faceid.from_pictures(PORTRAIT, image_proj, ip_layers, pictures, pack_dir="/packs/buffalo_l", face=1,
                                unit_number=2, name="Identity unit 2")
    assert ("pick", 1, 2, "reference image 1") in fake_faces.calls and ("pick", 1, 2, "reference image 2") in fake_faces.calls
    assert [c for c in fake_faces.calls if c[0] == "analyse"][0] == ("analyse", (60, 40), "/packs/buffalo_l", 640)
    chosen = [fake_faces.per_picture[(60, 40)][1], fake_faces.per_picture[(50, 50)][1]]  # face 1, not the largest
    assert unit.faces == chosen
    with torch.no_grad():
        want = image_proj(F.normalize(torch.stack([torch.as_tensor(f.embedding) for f in chosen]), dim=-1))
    torch.testing.assert_close(unit.prompt.cond_tokens, want.reshape(1, 32, C))


def test_plus_encodes_the_aligned_224_crop_of_the_chosen_face(fake_faces, monkeypatch):
    info = info_for("ip-adapter-faceid-plusv2_sd15", "faceid-plus", shortcut=True)
    image_proj, ip_layers = adapter(info)
    seen = {}

    def encode(crops, encoder, **kw):
        seen["crops"], seen["encoder"] = [c.size for c in crops], encoder
        return torch.ones(len(crops), 5, 32), torch.zeros(len(crops), 5, 32)

    monkeypatch.setattr(faceid, "encode_face_crops", encode)
    unit = faceid.from_pictures(info, image_proj, ip_layers, [Image.new("RGB", (60, 40))], pack_dir="p", face="largest",
                                clip_encoder="clip_h.safetensors", s_scale=0.5)
    assert seen == {"crops": [(224, 224)], "encoder": "clip_h.safetensors"}
    assert ("align", (60, 40), (1, 5), 224) in fake_faces.calls
    with torch.no_grad():
        want = image_proj(F.normalize(torch.as_tensor(fake_faces.per_picture[(60, 40)][0].embedding)[None], dim=-1),
                          torch.ones(1, 5, 32), scale=0.5)
    torch.testing.assert_close(unit.prompt.cond_tokens, want)
    with pytest.raises(PatchError, match="needs the CLIP ViT-H image encoder"):
        faceid.from_pictures(info, image_proj, ip_layers, [Image.new("RGB", (60, 40))], pack_dir="p")


def write_small_file(info, path):
    """A file with exactly the tensors ``info`` describes (official names), LoRA included."""
    from safetensors.torch import save_file

    torch.manual_seed(4)
    flat = {f"image_proj.{k}": v.contiguous() for k, v in models.build_image_proj(info).state_dict().items()}
    flat.update({f"ip_adapter.{k}": v.contiguous() for k, v in models.build_ip_layers(info).state_dict().items()})
    for m, h in enumerate(info.params["ip_hidden_sizes"]):
        for n in (2 * m, 2 * m + 1):
            for p in ("to_q", "to_k", "to_v", "to_out"):
                width_in = C if n % 2 and p in ("to_k", "to_v") else h
                flat[f"ip_adapter.{n}.{p}_lora.down.weight"] = torch.randn(2, width_in)
                flat[f"ip_adapter.{n}.{p}_lora.up.weight"] = torch.randn(h, 2)
    save_file(flat, str(path))
    return str(path)


def test_prepare_takes_the_units_knobs_and_the_faceid_ones(fake_faces, tmp_path):
    from lib_identity.discovery import ModelEntry
    from lib_identity.methods.ip_adapter import adapters
    from lib_identity.units import ResolvedUnit, Unit

    path = write_small_file(FACEID, tmp_path / "ip-adapter-faceid_sd15.safetensors")
    entry = ModelEntry(name="ip-adapter-faceid_sd15", path=path, short_hash="abcd1234", info=FACEID)
    unit = Unit(enabled=True, model=entry.name, images=(Image.new("RGB", (60, 40)),), image_weights=(1.0,),
                weight=0.7, start=0.2, end=0.6, face=1, lora_weight=0.25)
    resolved = ResolvedUnit(3, unit, entry, {"insightface:buffalo_l": "/packs/buffalo_l"})
    try:
        got = faceid.prepare(resolved, device="cpu", dtype=torch.float32)
    finally:
        adapters.clear()
    assert (got.prompt.weight, got.prompt.start, got.prompt.end, got.prompt.name) == (0.7, 0.2, 0.6, "Identity unit 3")
    assert got.lora.weight == 0.25 and sorted(got.lora.layers.layers) == [0, 1, 2, 3]
    assert ("pick", 1, 3, "reference image 1") in fake_faces.calls
    assert ("analyse", (60, 40), "/packs/buffalo_l", 640) in fake_faces.calls
    missing = ResolvedUnit(3, unit, entry, {})
    with pytest.raises(UnitError, match="Identity unit 3.*insightface 'buffalo_l' face models"):
        faceid.prepare(missing, device="cpu", dtype=torch.float32)
