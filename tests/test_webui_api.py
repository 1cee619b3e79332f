"""The identity HTTP routes on a FastAPI app, as the WebUI's on_app_started registers them."""

import pytest

from checkpoints import write_manifest_layout
from fake_webui import install_fake_modules

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def client(monkeypatch, tmp_path, api_auth=None):
    from lib_identity import discovery
    from lib_identity.webui import api

    folder = tmp_path / "identity"
    write_manifest_layout("ip-adapter_sd15", folder, "safetensors")
    install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(folder), api_auth=api_auth)
    discovery.list_models([str(folder)], refresh=True)
    app = fastapi.FastAPI()
    api.register(None, app)
    return TestClient(app)


def test_routes_answer(monkeypatch, tmp_path):
    c = client(monkeypatch, tmp_path)
    assert c.get("/identity/v1/version").json()["api"] == 1
    models = c.get("/identity/v1/models", params={"refresh": "true"}).json()["models"]
    assert [m["name"] for m in models] == ["ip-adapter_sd15"] and models[0]["info"]["tokens"] == 4
    assert c.post("/identity/v1/inspect", json={"model": "ip-adapter_sd15"}).json()["info"]["variant"] == "ip-adapter_sd15"
    assert c.post("/identity/v1/inspect", json={"model": "../models/x"}).status_code == 404
    assert c.post("/identity/v1/inspect", json={"name": "ip-adapter_sd15"}).status_code == 422


def test_routes_are_behind_the_api_auth(monkeypatch, tmp_path):
    c = client(monkeypatch, tmp_path, api_auth="alice:secret,bob:pw:with:colons")
    for method, path, body in [("get", "/identity/v1/version", None), ("get", "/identity/v1/models", None),
                               ("post", "/identity/v1/inspect", {"model": "ip-adapter_sd15"})]:
        call = getattr(c, method)
        kwargs = {"json": body} if body else {}
        assert call(path, **kwargs).status_code == 401
        assert call(path, auth=("alice", "wrong"), **kwargs).status_code == 401
        assert call(path, auth=("alice", "secret"), **kwargs).status_code == 200
    assert c.get("/identity/v1/version", auth=("bob", "pw:with:colons")).status_code == 200
