"""`python -m lib_identity profile build|list|delete`: the folders as `models`/`faces` find them,
profiles in <models>/identity/profiles, one clear line for every refusal."""

import json

import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
from PIL import Image, ImageOps  # noqa: E402

import face_models as fm  # noqa: E402
from checkpoints import write_manifest_layout  # noqa: E402
from lib_identity.__main__ import main  # noqa: E402


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    """A models folder with a FaceID file and the test buffalo_l pack, and four pictures: the group photo,
    a smaller copy, its mirror image (someone else's largest face) and a faceless one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    models = tmp_path / "models"
    write_manifest_layout("ip-adapter-faceid_sd15", models / "ipadapter", "safetensors")
    fm.write_pack(str(models / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    paths = []
    for name, image in (("a.jpg", t1), ("b.png", t1.resize((640, 443))), ("c.jpg", t1.resize((960, 664))),
                        ("d.jpg", ImageOps.mirror(t1)), ("e.png", Image.new("RGB", t1.size, (90, 90, 90)))):
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    return models, paths


def test_build_list_delete(setup, capsys):
    models, paths = setup
    assert main(["profile", "build", "alice", *paths, "--models", str(models)]) == 0
    out = capsys.readouterr().out
    assert "picture 4 left out" in out and "far from the others" in out and "picture 5 left out" in out
    saved = models / "identity" / "profiles" / "alice.safetensors"
    assert saved.is_file() and f"saved {saved}" in out
    assert main(["profile", "list", "--models", str(models), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["folder"] == str(models / "identity" / "profiles")
    assert [(p["name"], p["pictures"], p["packs"]) for p in listed["profiles"]] == [("alice", 3, ["buffalo_l"])]
    assert main(["profile", "list", "--models", str(models)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("alice  3 picture(s), 2 left out") and "buffalo_l" in line
    assert main(["profile", "delete", "alice", "--models", str(models)]) == 0
    assert "deleted" in capsys.readouterr().out and not saved.exists()
    assert main(["profile", "list", "--models", str(models)]) == 0
    assert "no profiles in" in capsys.readouterr().out


def test_build_json_and_overwrite(setup, capsys):
    models, paths = setup
    assert main(["profile", "build", "bob", paths[0], "--models", str(models), "--json", "--face", "0"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out)  # progress goes to stderr, so stdout is one JSON object
    assert answer["profile"]["name"] == "bob" and answer["profile"]["pictures"] == 1 and answer["path"].endswith("bob.safetensors")
    assert main(["profile", "build", "bob", paths[1], "--models", str(models)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'bob' exists" in err[0] and "--overwrite" in err[0]
    assert main(["profile", "build", "bob", paths[0], paths[1], "--models", str(models), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"]["pictures"] == 2


@pytest.mark.parametrize("argv, words", [
    (["profile", "build", "../x", "PIC"], ["cannot name a profile"]),
    (["profile", "build", "x", "MISSING"], ["missing.png"]),
    (["profile", "build", "x", "PIC", "--face", "left"], ["--face", "largest"]),
    (["profile", "delete", "nobody"], ["no profile 'nobody'"]),
    (["profile", "delete", "../../etc"], ["cannot name a profile"]),
])
def test_refusals_are_one_line(setup, capsys, argv, words):
    models, paths = setup
    argv = [paths[0] if a == "PIC" else str(models.parent / "missing.png") if a == "MISSING" else a for a in argv]
    assert main(argv + ["--models", str(models)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for word in words:
        assert word in err[0]
    assert not (models / "identity" / "profiles").exists()


def test_extra_dirs_are_searched_for_models_and_packs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    mine = tmp_path / "mine"
    write_manifest_layout("ip-adapter-faceid_sd15", mine, "safetensors")
    fm.write_pack(str(mine / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    models = tmp_path / "models"
    picture = fm.insightface_image("t1.jpg")
    assert main(["profile", "build", "carol", picture, "--models", str(models)]) == 2
    assert "nothing in the model folders can use a profile" in capsys.readouterr().err
    assert main(["profile", "build", "carol", picture, "--models", str(models), "--dir", str(mine)]) == 0
    assert (models / "identity" / "profiles" / "carol.safetensors").is_file()
