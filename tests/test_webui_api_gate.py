"""A bad Identity unit in txt2img/img2img gets HTTP 422 before the WebUI's handler runs; good
requests reach it byte for byte; --api-auth answers 401 first."""

import asyncio
import base64
import io
import json

import pytest
from PIL import Image

from checkpoints import write_manifest_layout
from fake_webui import install_fake_modules

fastapi = pytest.importorskip("fastapi")
from fastapi import Request, Response  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402


def _png() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 120, 40)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PICTURE = _png()


def make_client(monkeypatch, tmp_path, *, api_auth=None, sdxl=False, clip=True):
    """The identity routes plus a stand-in of the WebUI's txt2img/img2img routes that echo what they got."""
    from types import SimpleNamespace

    from lib_identity import discovery
    from lib_identity.webui import api

    folder = tmp_path / "identity"
    write_manifest_layout("ip-adapter_sd15", folder, "safetensors")
    write_manifest_layout("ip-adapter-faceid_sd15", folder, "safetensors")
    if clip:
        write_manifest_layout("clip_vision_vit-h", folder / "clip_vision", "safetensors")
    model = SimpleNamespace(is_sdxl=sdxl, is_sd1=not sdxl)
    install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(folder),
                         api_auth=api_auth, sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    app = fastapi.FastAPI()
    seen = []

    async def echo(request: Request):
        body = await request.body()
        seen.append(body)
        return Response(content=body, media_type="application/octet-stream")

    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/other"):
        app.add_api_route(path, echo, methods=["POST"], dependencies=api._dependencies())
    api.register(None, app)
    return TestClient(app), seen


def _request(*units, **extra) -> dict:
    return dict({"prompt": "a cat", "steps": 2, "alwayson_scripts": {"Identity": {"args": list(units)}}}, **extra)


def good_unit(**kw) -> dict:
    return dict({"model": "ip-adapter_sd15", "images": [PICTURE], "weight": 0.7}, **kw)


def test_a_good_unit_reaches_the_handler_byte_for_byte(monkeypatch, tmp_path):
    c, seen = make_client(monkeypatch, tmp_path)
    # odd spacing and key order, so only an untouched body compares equal
    body = ('{ "prompt" :"a cat",\n  "alwayson_scripts": {"identity": {"args": [' + json.dumps(good_unit())
            + ']}}, "steps":  2 }').encode()
    for path in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img"):
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.content == body and seen[-1] == body


@pytest.mark.parametrize("unit,field,words", [
    (good_unit(wieght=1), "wieght", "did you mean 'weight'"),
    (good_unit(weight=9), "weight", "-1"),
    (good_unit(model="ip-adapter_sd16"), "model", "did you mean 'ip-adapter_sd15'"),
    (good_unit(images=["not base64 at all!"]), "images", "base64"),
    (good_unit(images=[]), "images", "no reference images"),
    (good_unit(model="ip-adapter-faceid_sd15"), "model", "buffalo_l"),
])
def test_a_bad_unit_gets_422_naming_unit_and_field(monkeypatch, tmp_path, unit, field, words):
    c, seen = make_client(monkeypatch, tmp_path)
    r = c.post("/sdapi/v1/txt2img", json=_request(good_unit(), unit))
    assert r.status_code == 422, r.text
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "alwayson_scripts", "identity", "args", 1, field]
    assert detail["msg"].startswith(f"Identity unit 2, field '{field}'") and words in detail["msg"]
    assert seen == []  # the handler never ran


def test_the_checkpoints_base_and_the_encoder_are_checked(monkeypatch, tmp_path):
    c, _ = make_client(monkeypatch, tmp_path, sdxl=True)
    r = c.post("/sdapi/v1/img2img", json=_request(good_unit()))
    assert r.status_code == 422 and "the loaded checkpoint is SDXL" in r.json()["detail"][0]["msg"]
    # a request that switches the checkpoint is judged by the run, not by the one loaded now
    r = c.post("/sdapi/v1/img2img", json=_request(good_unit(), override_settings={"sd_model_checkpoint": "sd15"}))
    assert r.status_code == 200

    c, _ = make_client(monkeypatch, tmp_path / "2", clip=False)
    r = c.post("/sdapi/v1/txt2img", json=_request(good_unit()))
    assert r.status_code == 422 and "CLIP ViT-H/14" in r.json()["detail"][0]["msg"]


def test_a_leading_accordion_flag_shifts_the_location(monkeypatch, tmp_path):
    c, _ = make_client(monkeypatch, tmp_path)
    r = c.post("/sdapi/v1/txt2img", json=_request(True, good_unit(weight="x")))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][-2:] == [1, "weight"]
    r = c.post("/sdapi/v1/txt2img", json={"alwayson_scripts": {"identity": {"args": {"model": "x"}}}})
    assert r.status_code == 422 and "must be a list" in r.json()["detail"][0]["msg"]


def test_other_requests_pass_untouched(monkeypatch, tmp_path):
    c, seen = make_client(monkeypatch, tmp_path)
    bad = _request(good_unit(wieght=1))
    for path, body in [("/sdapi/v1/other", json.dumps(bad).encode()),  # not a gated path
                       ("/sdapi/v1/txt2img", b"{not json"),  # the WebUI's own business
                       ("/sdapi/v1/txt2img", json.dumps({"prompt": "x", "alwayson_scripts": {"ADetailer": {"args": [1]}}}).encode()),
                       ("/sdapi/v1/txt2img", b"{}")]:
        r = c.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.content == body


def test_auth_is_answered_before_the_units(monkeypatch, tmp_path):
    c, seen = make_client(monkeypatch, tmp_path, api_auth="alice:secret")
    bad = _request(good_unit(weight=9))
    assert c.post("/sdapi/v1/txt2img", json=bad).status_code == 401
    assert c.post("/sdapi/v1/txt2img", json=bad, auth=("alice", "wrong")).status_code == 401
    assert c.post("/sdapi/v1/txt2img", json=bad, auth=("alice", "secret")).status_code == 422
    r = c.post("/sdapi/v1/txt2img", json=_request(good_unit()), auth=("alice", "secret"))
    assert r.status_code == 200 and seen


def test_a_body_in_several_chunks_is_handed_on_whole():
    from lib_identity.webui.api_gate import UnitGate

    body = json.dumps(_request({"model": "m", "images": ["x"]})).encode()
    parts = [body[:10], body[10:50], body[50:]]
    got, checked = [], []

    async def inner(scope, receive, send):
        while True:
            m = await receive()
            got.append(m.get("body", b""))
            if not m.get("more_body"):
                break

    async def run():
        queue = [{"type": "http.request", "body": p, "more_body": i < 2} for i, p in enumerate(parts)]

        async def receive():
            return queue.pop(0)

        gate = UnitGate(inner, lambda args, overridden: checked.append(args))
        await gate({"type": "http", "method": "POST", "path": "/sdapi/v1/txt2img", "headers": []}, receive, None)

    asyncio.run(run())
    assert b"".join(got) == body and checked == [[{"model": "m", "images": ["x"]}]]
