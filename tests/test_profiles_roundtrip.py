"""A profile gives the same image as its pictures: the UNet's output through the WebUI glue
(stand-in ``modules``, the real ldm UNet, the real insightface code on insightface's group photo with
a small buffalo_l pack, a tiny CLIP vision encoder) is bit-identical for a unit sent with pictures
and the same unit sent with the profile built from them, at the same seed.

Also what a user would notice when it cannot be: an unknown profile, a profile built before the
model's encoder was installed, another fit, pictures and a profile at once, each stop the run
with a message naming the unit, the field and what to do.
"""

import base64
import io
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageEnhance

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from faceid_helpers import write_faceid  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from handoff import Wrapper, generate  # noqa: E402
from unet_helpers import CONTEXT, unet_inputs, write_adapter  # noqa: E402
from unet_models import SD15, build_ldm_unet, randomize_  # noqa: E402

# ViT-H's widths where FaceID-Plus and the linear adapter read them (1280 hidden, 1024 projection), tiny otherwise
TINY_VIT_H = dict(hidden_size=1280, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  image_size=32, patch_size=8, projection_dim=1024)


def b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def photos():
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    return [t1, ImageEnhance.Brightness(t1).enhance(0.8), t1.resize((960, 664), Image.BICUBIC)]


@pytest.fixture
def env(monkeypatch, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lib_identity import discovery
    from lib_identity.encoders import clip_vision, default_face_cache
    from lib_identity.webui import folders, lookup, runtime

    unet = randomize_(build_ldm_unet(SD15, context_dim=CONTEXT[SD15]), seed=3).eval()
    folder = tmp_path / "identity-models"
    folder.mkdir()
    linear = write_adapter(folder, unet, "linear", seed=1)
    plus = write_faceid(folder, unet, "plusv2", seed=2)
    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_VIT_H)).save_pretrained(encoder, safe_serialization=True)
    real = clip_vision.shipped_config
    monkeypatch.setattr(clip_vision, "shipped_config",
                        lambda eid: dict(real(eid), **TINY_VIT_H) if eid == "clip-vit-h" else real(eid))
    models = tmp_path / "models"
    pack = fm.write_pack(str(models / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    helpers = {"clip-vit-h": str(encoder), "insightface:buffalo_l": pack}

    def find(need):  # the tiny encoder is no ViT-H the folders would recognise: hand it over by need
        return helpers.get(need)

    monkeypatch.setattr(lookup, "find_encoder_for_run", find)
    model = SimpleNamespace(is_sdxl=False, is_sd1=True, model=Wrapper(unet))
    callbacks = install_fake_modules(monkeypatch, models_path=models, identity_models_dir=str(folder), sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    default_face_cache().clear()
    yield SimpleNamespace(model=model, unet=unet, callbacks=callbacks, runtime=runtime, inputs=unet_inputs(2, CONTEXT[SD15]),
                          linear=linear.stem, plus=plus.stem, helpers=helpers, folder=folders.profile_folder(),
                          find=find, list_models=folders.list_models)
    runtime.cleanup()


def build(env, name, pictures, **kw):
    from lib_identity import profiles

    result = profiles.build(name, pictures, models=env.list_models(), find_encoder=env.find, progress=lambda s: None, **kw)
    profiles.save_profile(result.profile, env.folder, overwrite=True)
    return result


def output(env, unit, params=None):
    return generate(env, [unit], params=params)[0].out


def test_each_method_gives_the_same_unet_output_from_the_profile_as_from_its_pictures(env, photos):
    result = build(env, "alice", photos)
    assert result.profile.pictures and len(result.profile.pictures) == 3 and not result.profile.left_out
    assert set(result.profile.summary()["packs"]) == {"buffalo_l"}
    pictures = [b64(p) for p in photos]
    with torch.no_grad():
        x, t, c = env.inputs
        bare = env.unet(x, t, context=c)
    for unit in ({"model": env.linear, "combine": "average"}, {"model": env.linear, "combine": "concat", "weight": 0.7},
                 {"model": env.plus, "s_scale": 0.6}, {"model": env.plus, "combine": "concat"},
                 {"model": env.linear, "uncond": "noise"}):
        from_pictures = output(env, dict(unit, images=pictures))
        params = {}
        from_profile = output(env, dict(unit, profile="alice"), params)
        assert not torch.allclose(from_pictures, bare, atol=1e-4), unit  # the unit acts
        assert torch.equal(from_profile, from_pictures), unit
        entry = params["Identity 1"]
        assert "profile: alice" in entry and "images:" not in entry


def test_the_face_chosen_when_building_is_the_face_the_profile_holds(env, photos):
    build(env, "face2", photos[:2], face=2)
    pictures = [b64(p) for p in photos[:2]]
    unit = {"model": env.plus}
    assert torch.equal(output(env, dict(unit, profile="face2")), output(env, dict(unit, images=pictures, face=2)))
    assert not torch.equal(output(env, dict(unit, profile="face2")), output(env, dict(unit, images=pictures)))
    # another face than the one built would silently be the built one: it is refused, saying what to do
    _stops(env, dict(unit, profile="face2", face=1), "field 'profile'", "holds face 2 of each picture",
           "asks for face 1", "build the profile again with face 1")


def test_weighted_average_takes_one_weight_per_picture_of_the_profile(env, photos):
    build(env, "alice", photos)
    pictures = [b64(p) for p in photos]
    unit = {"model": env.linear, "combine": "weighted average", "image_weights": [1, 0.5, 2]}
    assert torch.equal(output(env, dict(unit, profile="alice")), output(env, dict(unit, images=pictures)))
    with pytest.raises(Exception, match=r"Identity unit 1, field 'profile': profile 'alice' holds 3 picture\(s\) and "
                                        r"the unit gives 2 image weight"):
        output(env, dict(unit, profile="alice", image_weights=[1, 2]))


def _stops(env, unit, *words):
    with pytest.raises(Exception) as raised:
        output(env, unit)
    message = str(raised.value)
    for w in words:
        assert w in message, (w, message)


def test_what_a_profile_cannot_give_stops_the_run_with_what_to_do(env, photos):
    _stops(env, {"model": env.linear, "profile": "bob"}, "Identity unit 1, field 'profile'", "no profile 'bob'",
           "GET /identity/v1/profiles")
    # built while the CLIP encoder was missing: it holds faces only
    saved = env.helpers.pop("clip-vit-h")
    result = build(env, "faces only", photos)
    env.helpers["clip-vit-h"] = saved
    assert any("no clip-vit-h image encoder" in m for m in result.messages)
    _stops(env, {"model": env.linear, "profile": "faces only"}, "field 'profile'", "no clip-vit-h encodings",
           "build the profile again")
    _stops(env, {"model": env.plus, "profile": "faces only"}, "no clip-vit-h features of the face crops")
    build(env, "alice", photos)
    _stops(env, {"model": env.linear, "profile": "alice", "preparation": "pad"}, "fitted to the encoder by crop (center)",
           "the unit asks for pad")
    _stops(env, {"model": env.linear, "profile": "alice", "images": [b64(photos[0])]}, "field 'profile'",
           "use one of them")
    _stops(env, {"model": env.linear, "profile": "../alice"}, "field 'profile'", "cannot name a profile")


def test_likeness_of_a_profile_unit_compares_with_the_profiles_faces(env, photos):
    from lib_identity import units as U
    from lib_identity.likeness import runs
    from lib_identity.likeness.measure import reference_embedding
    from lib_identity.webui import lookup

    build(env, "alice", photos)
    by_profile = lookup.resolve_units([U.Unit.from_api({"model": env.plus, "profile": "alice"}, 1)], "sd15")
    by_pictures = lookup.resolve_units([U.Unit.from_api({"model": env.plus, "images": [b64(p) for p in photos]}, 1)],
                                       "sd15")
    a = runs.targets_for(by_profile, lambda: None)[0].reference()
    b = runs.targets_for(by_pictures, lambda: None)[0].reference()
    assert a is not None and abs(float(a @ b) - 1.0) < 1e-6
    assert abs(float(a @ reference_embedding(photos, env.helpers["insightface:buffalo_l"])) - 1.0) < 1e-6
