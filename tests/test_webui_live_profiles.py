"""Live WebUI: identity profiles through the real API, as a user would use them.

Runs only when SD_WEBUI_ROOT is set (tests/webui_live.py), on the shared server with the live model
files (IP-Adapter, FaceID-Plus v2, the ViT-H encoder and the test buffalo_l pack that finds the six
faces of insightface's t1.jpg). A profile is built with POST /identity/v1/profiles, listed, used by
name in txt2img (the same pixels as the pictures it was built from, at the same seed), recorded in
infotext, refused with a message when unknown, and deleted.
"""

import base64
import io
import json

import pytest
from PIL import Image, ImageEnhance

from webui_installer import installer_runs  # noqa: F401  (session fixture: install.py in the WebUI's venv)
from webui_live import WebUIError, small_payload, webui, with_units  # noqa: F401
from webui_live import pixel_digest as pixels

NAME = "live alice"
MODELS = ("ip-adapter_sd15", "ip-adapter-faceid-plusv2_sd15")


def b64(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def live(webui, installer_runs):
    assert installer_runs.first.returncode == 0, installer_runs.first.stderr[-4000:]
    return webui


@pytest.fixture(scope="module")
def pictures():
    import face_models as fm

    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    return [b64(t1), b64(ImageEnhance.Brightness(t1).enhance(0.8)), b64(t1.resize((960, 664), Image.BICUBIC))]


@pytest.fixture(scope="module")
def built(live, pictures):
    answer = live.post("/identity/v1/profiles", {"name": NAME, "images": pictures, "face": 2, "overwrite": True})
    print("\nbuilt:", json.dumps(answer["messages"]))
    yield answer
    try:
        live.delete(f"/identity/v1/profiles/{NAME}")
    except WebUIError:
        pass


def test_a_profile_is_built_listed_and_holds_what_the_installed_models_read(live, built):
    profile = built["profile"]
    assert profile["name"] == NAME and profile["pictures"] == 3 and profile["left_out"] == []
    assert profile["packs"] == ["buffalo_l"]
    assert "clip-vit-h image_embeds" in profile["encoders"] and "clip-vit-h face crop (buffalo_l)" in profile["encoders"]
    listed = {p["name"]: p for p in live.get("/identity/v1/profiles")["profiles"]}
    assert listed[NAME]["pictures"] == 3 and listed[NAME]["bytes"] > 0


@pytest.mark.parametrize("model", MODELS)
def test_a_unit_with_the_profile_gives_the_image_of_its_pictures(live, built, pictures, model):
    unit = {"model": model, "face": 2} if "faceid" in model else {"model": model}
    from_pictures = live.txt2img(with_units(dict(unit, images=pictures)))
    from_profile = live.txt2img(with_units({"model": model, "profile": NAME}))
    plain = live.txt2img(small_payload())
    print(f"\n{model}: profile == pictures: {pixels(from_profile) == pixels(from_pictures)}; "
          f"differs from no unit: {pixels(from_profile) != pixels(plain)}")
    assert pixels(from_profile) == pixels(from_pictures)
    assert pixels(from_profile) != pixels(plain)
    entry = json.loads(from_profile["info"])["extra_generation_params"]["Identity 1"]
    assert f"profile: {NAME}" in entry and "images:" not in entry, entry


def test_an_unknown_profile_is_answered_422_naming_the_unit_and_field(live):
    with pytest.raises(WebUIError) as e:
        live.post("/sdapi/v1/txt2img", with_units({"model": MODELS[0], "profile": "nobody"}))
    message = str(e.value)
    assert "answered HTTP 422" in message and "Identity unit 1, field 'profile'" in message, message
    assert "no profile 'nobody'" in message, message


def test_a_profile_is_deleted_and_then_gone(live, pictures):
    live.post("/identity/v1/profiles", {"name": "live temp", "images": pictures[:1], "overwrite": True})
    assert live.delete("/identity/v1/profiles/live temp") == {"deleted": "live temp"}
    assert "live temp" not in {p["name"] for p in live.get("/identity/v1/profiles")["profiles"]}
    with pytest.raises(WebUIError) as e:
        live.delete("/identity/v1/profiles/live temp")
    assert "404" in str(e.value)
