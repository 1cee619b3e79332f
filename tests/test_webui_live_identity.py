"""Live WebUI: IP-Adapter units through the real API, infotext, bad units and a clean UNet afterwards.

Runs only when SD_WEBUI_ROOT is set (tests/webui_live.py). The WebUI must start on an SD1.5
checkpoint (SD_WEBUI_CHECKPOINT); the adapter and encoder files are random weights in the
official layouts, written by the fixture.
"""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from webui_live import WebUIError, small_payload, webui, with_units  # noqa: F401  (webui: the session fixture)
from webui_live import pixel_digest as pixels


def reference(seed, size=(64, 96)):
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def identity_params(result):
    """The units' own ``Identity N`` entries. ``Identity N likeness`` is left out: it is there whenever a
    face pack is (the harness writes buffalo_l, whose test detector finds faces in any textured picture),
    and tests/test_webui_live_faceid.py checks it."""
    info = json.loads(result["info"])
    return {k: v for k, v in info["extra_generation_params"].items()
            if k.startswith("Identity") and not k.endswith(" likeness")}


@pytest.fixture(scope="module")
def plain(webui):
    return pixels(webui.txt2img(small_payload()))


def test_routes_list_the_models_with_their_variants(webui):
    assert webui.get("/identity/v1/version")["api"] == 1
    models = {m["name"]: m for m in webui.get("/identity/v1/models")["models"]}
    assert models["ip-adapter_sd15"]["info"]["variant"] == "ip-adapter_sd15"
    assert models["ip-adapter-plus_sd15"]["info"]["tokens"] == 16
    assert models["clip_vision/CLIP-ViT-H-14"]["info"]["family"] == "clip-vision"
    info = webui.post("/identity/v1/inspect", {"model": "ip-adapter_sdxl"})
    assert info["info"]["base"] == "sdxl"
    with pytest.raises(WebUIError, match="404"):
        webui.post("/identity/v1/inspect", {"model": "../Stable-diffusion/anything"})


def test_one_unit_changes_the_image_and_is_recorded(webui, plain):
    result = webui.txt2img(with_units({"model": "ip-adapter_sd15", "images": [reference(1)], "weight": 0.8}))
    assert pixels(result) != plain
    params = identity_params(result)
    assert list(params) == ["Identity 1"]
    entry = params["Identity 1"]
    models = {m["name"]: m for m in webui.get("/identity/v1/models")["models"]}
    assert f"model: ip-adapter_sd15 [{models['ip-adapter_sd15']['hash']}]" in entry
    assert "weight: 0.8" in entry and "images: " in entry


def test_two_units_change_the_image_differently(webui, plain):
    one = pixels(webui.txt2img(with_units({"model": "ip-adapter_sd15", "images": [reference(1)]})))
    result = webui.txt2img(with_units(
        {"model": "ip-adapter_sd15", "images": [reference(1)]},
        {"model": "ip-adapter-plus_sd15", "images": [reference(2), reference(3)], "weight": 0.6, "combine": "concat"},
    ))
    assert pixels(result) not in (plain, one)
    params = identity_params(result)
    assert set(params) == {"Identity 1", "Identity 2"}
    assert "combine: concat" in params["Identity 2"]


def test_infotext_restores_the_unit_settings(webui):
    result = webui.txt2img(with_units({"model": "ip-adapter_sd15", "images": [reference(4)], "weight": 0.65,
                                       "start": 0.2, "layer_preset": "style transfer"}))
    info = json.loads(result["info"])["infotexts"][0]
    parsed = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + result["images"][0]})
    params = parsed["parameters"]
    assert params["Identity 1 weight"] == 0.65 and params["Identity 1 start"] == 0.2
    assert params["Identity 1 layer_preset"] == "style transfer"
    assert "needs reference image" in params["Identity 1 needs"]
    assert "Identity 1" in info


@pytest.mark.parametrize(
    "unit, message",
    [
        ({"model": "no-such-adapter", "images": ["IMG"]}, "Identity unit 1, field 'model': unknown model"),
        ({"model": "ip-adapter_sdxl", "images": ["IMG"]}, "is SDXL, the loaded checkpoint is SD1.5"),
        ({"model": "ip-adapter_sd15_vit-G", "images": ["IMG"]}, "needs CLIP ViT-bigG/14"),
        ({"model": "ip-adapter_sd15", "images": ["bm90IGFuIGltYWdl"]}, "field 'images'"),
        ({"model": "ip-adapter_sd15", "images": ["IMG"], "weight": 7}, "field 'weight': expected a number from -1 to 3"),
        ({"model": "ip-adapter_sd15", "images": ["IMG"], "wieght": 1}, "field 'wieght': unknown field; did you mean 'weight'"),
        ({"model": "ip-adapter_sd15", "images": []}, "field 'images'"),
    ],
)
def test_a_bad_unit_fails_the_request_with_its_message(webui, unit, message):
    unit = {k: ([reference(5) if i == "IMG" else i for i in v] if k == "images" else v) for k, v in unit.items()}
    with pytest.raises(WebUIError) as e:
        webui.post("/sdapi/v1/txt2img", with_units(unit))
    # answered by the gate, before the WebUI's handler: a client error with the unit and field
    assert "answered HTTP 422" in str(e.value) and message in str(e.value)
    detail = json.loads(str(e.value).split("answered HTTP 422: ", 1)[1])["detail"][0]
    assert detail["loc"][:5] == ["body", "alwayson_scripts", "identity", "args", 0]


def test_the_unet_is_clean_afterwards(webui, plain):
    webui.txt2img(with_units({"model": "ip-adapter_sd15", "images": [reference(6)]}))
    with pytest.raises(WebUIError):
        webui.post("/sdapi/v1/txt2img", with_units({"model": "ip-adapter_sd15", "images": [reference(6)], "weight": 9}))
    assert pixels(webui.txt2img(small_payload())) == plain


def _mask():
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(
    "route, extra",
    [
        ("/sdapi/v1/txt2img", {"batch_size": 2, "n_iter": 2}),
        ("/sdapi/v1/txt2img", {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
                               "denoising_strength": 0.6}),
        ("/sdapi/v1/txt2img", {"prompt": "a person AND a smile, " + "very detailed, " * 40}),
        ("/sdapi/v1/img2img", {"init_images": ["INIT"], "denoising_strength": 0.7}),
        ("/sdapi/v1/img2img", {"init_images": ["INIT"], "mask": "MASK", "denoising_strength": 0.8, "inpainting_fill": 1}),
    ],
    ids=["batch-size-and-count", "hires-fix", "AND-and-long-prompt", "img2img", "inpainting"],
)
def test_every_generation_mode_gets_the_identity(webui, route, extra):
    extra = {k: ([reference(7, (64, 64)) for _ in v] if k == "init_images" else _mask() if v == "MASK" else v) for k, v in extra.items()}
    payload = dict(small_payload(), **extra)
    plain = webui.post(route, payload)
    with_unit = webui.post(route, dict(payload, alwayson_scripts={"identity": {"args": [
        {"model": "ip-adapter_sd15", "images": [reference(1)], "weight": 0.9}]}}))
    again = webui.post(route, payload)
    assert len(with_unit["images"]) == len(plain["images"])
    assert all(pixels({"images": [a]}) != pixels({"images": [b]}) for a, b in zip(with_unit["images"], plain["images"]))
    assert all("Identity 1" in t for t in json.loads(with_unit["info"])["infotexts"])
    assert [pixels({"images": [a]}) for a in again["images"]] == [pixels({"images": [a]}) for a in plain["images"]]


def test_routes_are_behind_the_webui_api_auth(webui):
    """A second WebUI with --api-auth: the identity routes ask for the same credentials, and a
    bad unit sent without them gets the WebUI's 401, not our 422."""
    import urllib.error
    import urllib.request

    from webui_live import WebUIServer

    server = WebUIServer.from_env()
    server.auth = ("alice", "secret")
    # the routes need no checkpoint: not loading one keeps a second model out of memory and off the CPU
    server.extra_args.append("--skip-load-model-at-start")
    try:
        server.start()
        assert server.get("/identity/v1/version")["api"] == 1  # with the credentials
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.base_url + "/identity/v1/version", timeout=30)
        assert e.value.code == 401
        bad = with_units({"model": "ip-adapter_sd15", "images": [reference(1)], "weight": 9})
        request = urllib.request.Request(server.base_url + "/sdapi/v1/txt2img", data=json.dumps(bad).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=30)
        assert e.value.code == 401
        with pytest.raises(WebUIError, match="answered HTTP 422.*field 'weight'"):
            server.post("/sdapi/v1/txt2img", bad)
    finally:
        server.stop()
