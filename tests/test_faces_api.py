"""Faces from outside: where packs are looked for, the error when one is missing, the CLI and POST /identity/v1/faces."""

import base64
import io
import json
import os

import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
from PIL import Image  # noqa: E402

import face_models as fm  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from lib_identity.encoders import faces  # noqa: E402


@pytest.fixture(scope="module")
def t1_bytes():
    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return fh.read()


def _pack(folder):
    return fm.write_pack(str(folder), fm.T1_FACES, max(fm.T1_SIZE))


def test_packs_are_looked_for_in_the_issues_order(tmp_path):
    models, cn, mine, home = (tmp_path / n for n in ("models", "cn", "mine", "home"))
    folders = faces.search_folders(str(models), controlnet_extension_dir=str(cn), extra_dirs=[str(mine)], home=str(home))
    assert folders == [
        str(models / "insightface" / "models"), str(models / "insightface"),
        str(cn / "annotator" / "downloads" / "insightface" / "models"),
        str(mine), str(mine / "insightface" / "models"), str(home / ".insightface" / "models"),
    ]
    for where in (home / ".insightface" / "models", mine, cn / "annotator" / "downloads" / "insightface" / "models",
                  models / "insightface", models / "insightface" / "models"):
        (where / "buffalo_l").mkdir(parents=True)
        (where / "buffalo_l" / "det_10g.onnx").write_bytes(b"x")
        assert faces.find_pack("buffalo_l", folders) == str(where / "buffalo_l")  # the earlier folder wins
    # antelopev2's zip unpacks one level deeper
    (mine / "antelopev2" / "antelopev2").mkdir(parents=True)
    (mine / "antelopev2" / "antelopev2" / "glintr100.onnx").write_bytes(b"x")
    assert faces.find_pack("antelopev2", folders) == str(mine / "antelopev2" / "antelopev2")


def test_the_webui_folders_include_the_controlnet_extensions_downloads(monkeypatch, tmp_path):
    from lib_identity.webui import folders

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(tmp_path / "mine"))
    cn = tmp_path / "extensions" / "sd-webui-controlnet-main"  # a renamed checkout
    (cn / "annotator" / "downloads" / "insightface" / "models" / "antelopev2").mkdir(parents=True)
    (cn / "annotator" / "downloads" / "insightface" / "models" / "antelopev2" / "glintr100.onnx").write_bytes(b"x")
    found = folders.face_pack_folders()
    assert found[:3] == [str(tmp_path / "models" / "insightface" / "models"), str(tmp_path / "models" / "insightface"),
                         str(cn / "annotator" / "downloads" / "insightface" / "models")]
    assert found[3] == str(tmp_path / "mine") and found[-1] == str(tmp_path / "home" / ".insightface" / "models")
    assert folders.find_face_pack("antelopev2") == str(cn / "annotator" / "downloads" / "insightface" / "models" / "antelopev2")


def test_a_missing_pack_names_itself_its_files_and_the_folders(tmp_path):
    folders = faces.search_folders(str(tmp_path / "models"), extra_dirs=[str(tmp_path / "mine")], home=str(tmp_path))
    (tmp_path / "models" / "insightface" / "models" / "antelopev2").mkdir(parents=True)  # empty: not a pack
    for name, files in (("buffalo_l", ("det_10g.onnx", "w600k_r50.onnx")), ("antelopev2", ("scrfd_10g_bnkps.onnx", "glintr100.onnx"))):
        with pytest.raises(faces.FacePackNotFound) as e:
            faces.find_pack(name, folders)
        msg = str(e.value)
        assert f"'{name}'" in msg and "detection" in msg and "recognition" in msg
        for f in files:
            assert f in msg
        for folder in folders:
            assert os.path.join(folder, name) in msg
    with pytest.raises(faces.FacePackNotFound):
        faces.find_pack("../../etc", folders)  # a name, never a path


def test_a_pack_without_a_recognizer_says_so(tmp_path):
    folder = tmp_path / "buffalo_l"
    folder.mkdir()
    fm.write_detector(str(folder / "det_10g.onnx"), fm.T1_FACES, 1280)
    with pytest.raises(faces.FacePackNotFound) as e:
        faces.analyse_faces(Image.new("RGB", (64, 64)), str(folder), cache=faces.FaceCache())
    assert "no recognition model" in str(e.value) and "det_10g.onnx" in str(e.value)


def test_cli_lists_the_faces_and_writes_the_preview(tmp_path, capsys):
    from lib_identity.__main__ import main

    pack = _pack(tmp_path / "models" / "insightface" / "models" / "buffalo_l")
    preview = tmp_path / "preview.png"
    assert main(["faces", fm.insightface_image("t1.jpg"), "--models", str(tmp_path / "models"), "--json",
                 "--preview", str(preview)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["pack"] == pack and out["size"] == [1280, 886]
    assert [f["index"] for f in out["faces"]] == list(range(6))
    widths = [f["box"][2] - f["box"][0] for f in out["faces"]]
    assert widths == sorted(widths, reverse=True) and widths[0] == pytest.approx(150, abs=1)
    assert Image.open(preview).size == (1280, 886)
    assert main(["faces", fm.insightface_image("t1.jpg"), "--pack", pack]) == 0  # a pack folder given directly
    text = capsys.readouterr().out
    assert "0: box [" in text and "5: box [" in text and "score 0.900" in text


def test_cli_missing_pack_is_one_clear_line(tmp_path, capsys, monkeypatch):
    from lib_identity.__main__ import main

    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(["faces", fm.insightface_image("t1.jpg"), "--models", str(tmp_path / "models")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "buffalo_l" in err[0] and "w600k_r50.onnx" in err[0]


def _client(monkeypatch, tmp_path, api_auth=None):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from lib_identity.webui import api

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    install_fake_modules(monkeypatch, models_path=tmp_path / "models", api_auth=api_auth)
    app = FastAPI()
    api.register(None, app)
    return TestClient(app)


def test_the_faces_route_answers_boxes_keypoints_and_a_preview(monkeypatch, tmp_path, t1_bytes):
    pytest.importorskip("fastapi")
    pack = _pack(tmp_path / "models" / "insightface" / "models" / "buffalo_l")
    c = _client(monkeypatch, tmp_path)
    image = base64.b64encode(t1_bytes).decode()
    r = c.post("/identity/v1/faces", json={"image": image})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pack"] == "buffalo_l" and body["size"] == [1280, 886] and len(body["faces"]) == 6
    direct = faces.analyse_faces(Image.open(io.BytesIO(t1_bytes)), pack)
    for answered, face in zip(body["faces"], direct):
        assert answered["box"] == pytest.approx(list(face.box), abs=0.01)
        assert sum(answered["keypoints"], []) == pytest.approx(face.keypoints.reshape(-1).tolist(), abs=0.01)
        assert set(answered) == {"index", "box", "score", "keypoints"}
    assert body["preview"].startswith("data:image/png;base64,")
    preview = Image.open(io.BytesIO(base64.b64decode(body["preview"].split(",", 1)[1])))
    assert preview.size == (1280, 886)
    no_preview = c.post("/identity/v1/faces", json={"image": "data:image/jpeg;base64," + image, "preview": False}).json()
    assert "preview" not in no_preview and len(no_preview["faces"]) == 6


def test_the_faces_route_refuses_clearly(monkeypatch, tmp_path, t1_bytes):
    pytest.importorskip("fastapi")
    c = _client(monkeypatch, tmp_path)
    image = base64.b64encode(t1_bytes).decode()
    r = c.post("/identity/v1/faces", json={"image": image, "pack": "antelopev2"})
    assert r.status_code == 404 and "antelopev2" in r.json()["detail"] and "glintr100.onnx" in r.json()["detail"]
    r = c.post("/identity/v1/faces", json={"image": image, "pack": "../models"})
    assert r.status_code == 404
    r = c.post("/identity/v1/faces", json={"image": base64.b64encode(b"\x80\x04pickle").decode()})
    assert r.status_code == 422 and "pickle" in r.json()["detail"]
    assert c.post("/identity/v1/faces", json={"picture": image}).status_code == 422
    assert c.post("/identity/v1/faces", json={"image": image, "det_size": "big"}).status_code == 422


def test_the_faces_route_is_behind_the_api_auth(monkeypatch, tmp_path, t1_bytes):
    pytest.importorskip("fastapi")
    _pack(tmp_path / "models" / "insightface" / "models" / "buffalo_l")
    c = _client(monkeypatch, tmp_path, api_auth="alice:secret")
    body = {"image": base64.b64encode(t1_bytes).decode(), "preview": False}
    assert c.post("/identity/v1/faces", json=body).status_code == 401
    assert c.post("/identity/v1/faces", json=body, auth=("alice", "wrong")).status_code == 401
    assert c.post("/identity/v1/faces", json=body, auth=("alice", "secret")).status_code == 200


def test_a_missing_buffalo_l_says_what_to_download_and_where(tmp_path):
    from lib_identity.encoders.faces import FacePackNotFound, find_pack

    with pytest.raises(FacePackNotFound) as e:
        find_pack("buffalo_l", [str(tmp_path)])
    msg = str(e.value)
    assert "buffalo_l.zip" in msg and "models/insightface/models/buffalo_l" in msg and "det_10g.onnx" in msg
