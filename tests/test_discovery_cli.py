"""Model folders, listing, name resolution and the `python -m lib_identity` command line."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from checkpoints import manifest, manifest_keys, write_layout, write_manifest_layout
from lib_identity import discovery
from lib_identity.errors import ModelNotFoundError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def models_root(tmp_path):
    root = tmp_path / "models"
    write_manifest_layout("ip-adapter_sd15", root / "ipadapter", "safetensors")
    write_manifest_layout("ip-adapter-plus_sdxl_vit-h", root / "ControlNet", "bin")
    folder = root / "ControlNet" / "InstantID" / "ControlNetModel"
    write_layout(manifest_keys("instantid_controlnet"), folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(manifest("instantid_controlnet")["diffusers_config"]))
    (root / "ipadapter" / "half-download.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (root / "insightface" / "models" / "buffalo_l").mkdir(parents=True)
    (root / "insightface" / "models" / "buffalo_l" / "det_10g.onnx").write_bytes(b"onnx")
    return root


def test_folders_put_the_flag_folder_first(tmp_path):
    folders = discovery.model_folders(str(tmp_path / "models"), extra=[str(tmp_path / "mine")])
    assert folders[0] == str(tmp_path / "mine")
    assert str(tmp_path / "models" / "ControlNet") in folders
    assert str(tmp_path / "models" / "ipadapter") in folders


def test_listing_names_hashes_and_reasons(models_root):
    entries = discovery.list_models(discovery.model_folders(str(models_root)), refresh=True)
    by_name = {e.name: e for e in entries}
    assert set(by_name) == {
        "ip-adapter_sd15",
        "ip-adapter-plus_sdxl_vit-h",
        "InstantID/ControlNetModel",
        "half-download",
    }
    assert by_name["ip-adapter_sd15"].info.variant == "ip-adapter_sd15"
    assert by_name["InstantID/ControlNetModel"].info.family == "instantid-identitynet"
    bad = by_name["half-download"]
    assert not bad.usable and "safetensors" in bad.error
    # the WebUI's old model hash: sha256 of 64 KiB at 1 MiB
    path = models_root / "ipadapter" / "ip-adapter_sd15.safetensors"
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        want = hashlib.sha256(fh.read(0x10000)).hexdigest()[:8]
    assert by_name["ip-adapter_sd15"].short_hash == want
    assert by_name["ip-adapter_sd15"].title == f"ip-adapter_sd15 [{want}]"


def test_find_by_name_title_or_hash(models_root):
    folders = discovery.model_folders(str(models_root))
    e = discovery.find_model("ip-adapter_sd15", folders)
    assert discovery.find_model(e.title, folders).path == e.path
    assert discovery.find_model(e.short_hash, folders).path == e.path
    assert discovery.find_model("IP-ADAPTER_SD15", folders).path == e.path


@pytest.mark.parametrize(
    "name",
    ["../outside", "/etc/passwd", "ipadapter/../../outside", "..\\outside", "", "None"],
)
def test_names_never_reach_outside_the_folders(models_root, name):
    outside = models_root.parent / "outside.safetensors"
    write_manifest_layout("ip-adapter_sd15", models_root.parent, "safetensors").rename(outside)
    with pytest.raises(ModelNotFoundError):
        discovery.find_model(name, discovery.model_folders(str(models_root)))


def test_new_file_found_after_refresh(models_root):
    folders = discovery.model_folders(str(models_root))
    discovery.list_models(folders, refresh=True)
    write_manifest_layout("ip-adapter_sdxl", models_root / "ipadapter", "safetensors")
    assert discovery.find_model("ip-adapter_sdxl", folders).info.base == "sdxl"


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "lib_identity", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_cli_inspect_json(tmp_path):
    path = write_manifest_layout("ip-adapter-faceid-plusv2_sdxl", tmp_path, "bin")
    r = _cli("inspect", str(path), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    for key in ("family", "base", "image_encoder", "tokens", "projection", "variant", "lora"):
        assert key in info
    assert (info["family"], info["variant"], info["lora"], info["tokens"]) == (
        "ip-adapter-faceid",
        "ip-adapter-faceid-plusv2_sdxl",
        True,
        4,
    )


def test_cli_inspect_text(tmp_path):
    path = write_manifest_layout("photomaker-v2", tmp_path, "bin")
    r = _cli("inspect", str(path))
    assert r.returncode == 0
    assert "photomaker-v2" in r.stdout and "LoRA:          rank 64" in r.stdout


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 100])
def test_cli_bad_file_is_one_clear_line(tmp_path, content):
    path = tmp_path / "ip-adapter_sd15.safetensors"
    path.write_bytes(content)
    r = _cli("inspect", str(path))
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert "Traceback" not in r.stderr


def test_cli_missing_file(tmp_path):
    r = _cli("inspect", str(tmp_path / "nope.bin"))
    assert r.returncode != 0 and "no such file" in r.stderr and "Traceback" not in r.stderr


def test_cli_models_listing(models_root):
    r = _cli("models", "--dir", str(models_root / "ipadapter"), "--json")
    assert r.returncode == 0, r.stderr
    listed = {e["name"]: e for e in json.loads(r.stdout)}
    assert listed["ip-adapter_sd15"]["usable"] and not listed["half-download"]["usable"]


def test_a_listing_of_other_folders_is_not_reused(models_root, tmp_path):
    other = tmp_path / "other"
    write_manifest_layout("ip-adapter_sdxl", other, "safetensors")
    first = discovery.list_models(discovery.model_folders(str(models_root)), refresh=True)
    second = discovery.list_models([str(other)])  # no refresh asked: still the other folder's files
    assert "ip-adapter_sdxl" not in {e.name for e in first}
    assert [e.name for e in second] == ["ip-adapter_sdxl"]
