"""The profile routes on a FastAPI app, as the WebUI's on_app_started registers them: list, build
(the real insightface code on the small ONNX test pack, insightface's own photo), 409, 404, 413,
bad names and traversal, the queue lock, --api-auth, delete."""

import base64
import io

import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

import face_models as fm  # noqa: E402
from checkpoints import write_manifest_layout  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402


def b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def pictures():
    """insightface's group photo, two edits of it (the same people), the mirror image (its largest
    face is someone else: cosine 0.06 under the test recognizer) and a flat picture (no face)."""
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    return {"t1": b64(t1), "bright": b64(ImageEnhance.Brightness(t1).enhance(1.15)), "half": b64(t1.resize((640, 443))),
            "mirror": b64(ImageOps.mirror(t1)), "flat": b64(Image.new("RGB", t1.size, (128, 128, 128)))}


def models_folder(tmp_path, faceid=True):
    """A WebUI models folder with a FaceID file (its layout; reads buffalo_l) and the test buffalo_l pack."""
    models = tmp_path / "models"
    if faceid:
        write_manifest_layout("ip-adapter-faceid_sd15", models / "ipadapter", "safetensors")
    fm.write_pack(str(models / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    return models


def make_client(monkeypatch, tmp_path, api_auth=None, faceid=True):
    from lib_identity.webui import api, folders

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    models = models_folder(tmp_path, faceid)
    install_fake_modules(monkeypatch, models_path=models, api_auth=api_auth)
    folders.list_models(refresh=True)
    app = fastapi.FastAPI()
    api.register(None, app)
    return TestClient(app)


@pytest.fixture()
def client(monkeypatch, tmp_path):
    return make_client(monkeypatch, tmp_path)


def profile_file(tmp_path, name):
    return tmp_path / "models" / "identity" / "profiles" / f"{name}.safetensors"


def test_build_list_and_delete(client, tmp_path, pictures):
    assert client.get("/identity/v1/profiles").json() == {"folder": "models/identity/profiles", "profiles": []}
    body = {"name": "alice", "images": [pictures[k] for k in ("t1", "bright", "half", "mirror", "flat")]}
    r = client.post("/identity/v1/profiles", json=body)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["profile"]["name"] == "alice" and answer["profile"]["pictures"] == 3
    assert answer["profile"]["packs"] == ["buffalo_l"]
    assert [d["picture"] for d in answer["profile"]["left_out"]] == [4, 5]
    messages = answer["messages"]
    assert any(m.startswith("picture 4 left out") and "far from the others" in m for m in messages), messages
    assert any(m.startswith("picture 5 left out") and "face" in m for m in messages), messages
    assert profile_file(tmp_path, "alice").is_file()
    listed = client.get("/identity/v1/profiles").json()["profiles"]
    assert [p["name"] for p in listed] == ["alice"] and listed[0]["pictures"] == 3
    assert set(listed[0]) >= {"name", "created", "pictures", "left_out", "packs", "encoders", "photomaker", "face",
                              "preparation", "bytes"}
    r = client.delete("/identity/v1/profiles/alice")
    assert r.status_code == 200 and r.json() == {"deleted": "alice"}
    assert not profile_file(tmp_path, "alice").exists()
    assert client.get("/identity/v1/profiles").json()["profiles"] == []


def test_a_taken_name_is_409_unless_overwrite(client, tmp_path, pictures):
    body = {"name": "bob", "images": [pictures["t1"]]}
    assert client.post("/identity/v1/profiles", json=body).status_code == 200
    before = profile_file(tmp_path, "bob").stat().st_mtime_ns
    r = client.post("/identity/v1/profiles", json=dict(body, images=[pictures["t1"], pictures["half"]]))
    assert r.status_code == 409 and "bob" in r.json()["detail"] and "overwrite" in r.json()["detail"]
    assert profile_file(tmp_path, "bob").stat().st_mtime_ns == before
    r = client.post("/identity/v1/profiles", json=dict(body, images=[pictures["t1"], pictures["half"]], overwrite=True))
    assert r.status_code == 200 and r.json()["profile"]["pictures"] == 2


def test_unknown_profiles_are_404_and_bad_names_422_without_touching_a_file(client, tmp_path):
    outside = tmp_path / "models" / "identity" / "x.safetensors"
    outside.parent.mkdir(parents=True)
    outside.write_bytes(b"not yours")
    (tmp_path / "models" / "identity" / "profiles").mkdir()
    r = client.delete("/identity/v1/profiles/nobody")
    assert r.status_code == 404 and "nobody" in r.json()["detail"]
    for name in ("..%2Fx", "%2E%2E%2Fx", "a%2Fb", "..", "x%5C..%5Cy", "%00x"):
        r = client.delete(f"/identity/v1/profiles/{name}")
        assert r.status_code in (404, 422), (name, r.status_code)
        if r.status_code == 422:
            assert "cannot name a profile" in r.json()["detail"]
    assert client.delete("/identity/v1/profiles/..%2Fx").status_code == 422  # the name rule, not a missing file
    assert outside.read_bytes() == b"not yours"


@pytest.mark.parametrize("body, status, words", [
    ({"name": "../evil", "images": ["x"]}, 422, ["name", "cannot name a profile"]),
    ({"name": "a/b", "images": ["x"]}, 422, ["name"]),
    ({"name": 7, "images": ["x"]}, 422, ["name"]),
    ({"name": "ok"}, 422, ["images"]),
    ({"name": "ok", "images": []}, 422, ["images", "1 to 50"]),
    ({"name": "ok", "images": ["x"] * 51}, 413, ["at most 50"]),
    ({"name": "ok", "images": ["x"], "pictures": []}, 422, ["unknown field", "pictures"]),
    ({"name": "ok", "images": ["x"], "face": "left"}, 422, ["face", "largest"]),
    ({"name": "ok", "images": ["x"], "preparation": "zoom"}, 422, ["preparation", "crop"]),
    ({"name": "ok", "images": ["x"], "overwrite": "yes"}, 422, ["overwrite"]),
])
def test_bad_bodies_say_which_field(client, tmp_path, body, status, words):
    r = client.post("/identity/v1/profiles", json=body)
    assert r.status_code == status, r.text
    for word in words:
        assert word in r.json()["detail"]
    assert not (tmp_path / "models" / "identity" / "profiles").exists()


def test_bad_pictures_say_which_picture(client, pictures):
    pickle = base64.b64encode(b"\x80\x04\x95pickle").decode()
    r = client.post("/identity/v1/profiles", json={"name": "carol", "images": [pictures["t1"], pickle]})
    assert r.status_code == 422 and "picture 2" in r.json()["detail"] and "pickle" in r.json()["detail"]
    r = client.post("/identity/v1/profiles", json={"name": "carol", "images": ["http://example.com/a.png"]})
    assert r.status_code == 422 and "picture 1" in r.json()["detail"] and "not fetched" in r.json()["detail"]
    r = client.post("/identity/v1/profiles", json={"name": "carol", "images": [pictures["flat"]]})
    assert r.status_code == 422 and "no picture is left" in r.json()["detail"]


def test_nothing_installed_that_can_use_a_profile_is_422(monkeypatch, tmp_path, pictures):
    c = make_client(monkeypatch, tmp_path, faceid=False)
    r = c.post("/identity/v1/profiles", json={"name": "dave", "images": [pictures["t1"]]})
    assert r.status_code == 422 and "nothing in the model folders can use a profile" in r.json()["detail"]


def test_an_unreadable_file_is_listed_with_why(client, tmp_path):
    folder = tmp_path / "models" / "identity" / "profiles"
    folder.mkdir(parents=True)
    (folder / "renamed.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    listed = client.get("/identity/v1/profiles").json()["profiles"]
    assert len(listed) == 1 and listed[0]["name"] == "renamed" and "pickle" in listed[0]["error"]


class RecordingLock:
    """The queue lock, recording whether it is held (the routes must do their work inside it)."""

    def __init__(self):
        self.held = False

    def __enter__(self):
        assert not self.held
        self.held = True

    def __exit__(self, *exc):
        self.held = False


def test_the_routes_work_under_the_queue_lock(client, monkeypatch, pictures):
    import sys

    from lib_identity import profiles

    lock = RecordingLock()
    monkeypatch.setattr(sys.modules["modules.call_queue"], "queue_lock", lock)
    seen = []
    for name in ("build", "save_profile", "list_profiles", "delete_profile"):
        def spy(*a, _real=getattr(profiles, name), _name=name, **k):
            seen.append((_name, lock.held))
            return _real(*a, **k)
        monkeypatch.setattr(profiles, name, spy)
    assert client.post("/identity/v1/profiles", json={"name": "erin", "images": [pictures["t1"]]}).status_code == 200
    assert client.get("/identity/v1/profiles").status_code == 200
    assert client.delete("/identity/v1/profiles/erin").status_code == 200
    assert seen == [("build", True), ("save_profile", True), ("list_profiles", True), ("delete_profile", True)]


def test_the_routes_are_behind_the_api_auth(monkeypatch, tmp_path, pictures):
    c = make_client(monkeypatch, tmp_path, api_auth="alice:secret")
    refused = [("get", "/identity/v1/profiles", {}), ("post", "/identity/v1/profiles",
               {"json": {"name": "frank", "images": [pictures["t1"]]}}), ("delete", "/identity/v1/profiles/frank", {})]

    def all_refused():
        for method, path, kwargs in refused:
            assert getattr(c, method)(path, **kwargs).status_code == 401
            assert getattr(c, method)(path, auth=("alice", "wrong"), **kwargs).status_code == 401

    all_refused()
    assert not profile_file(tmp_path, "frank").exists()  # the refused build built nothing
    assert c.post("/identity/v1/profiles", auth=("alice", "secret"), **refused[1][2]).status_code == 200
    all_refused()
    assert profile_file(tmp_path, "frank").exists()  # the refused delete deleted nothing
    assert [p["name"] for p in c.get("/identity/v1/profiles", auth=("alice", "secret")).json()["profiles"]] == ["frank"]
    assert c.delete("/identity/v1/profiles/frank", auth=("alice", "secret")).json() == {"deleted": "frank"}
    assert not profile_file(tmp_path, "frank").exists()
