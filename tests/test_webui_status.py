"""The unit's status line: the next step first, folders named from the WebUI's folder, full paths on hover."""

import re
from types import SimpleNamespace

from checkpoints import write_manifest_layout
from fake_webui import install_fake_modules


def _visible(markdown: str) -> str:
    return re.sub(r"<[^>]+>", "", markdown)


def _titles(markdown: str) -> str:
    return " ".join(re.findall(r'title="([^"]*)"', markdown))


def setup(monkeypatch, tmp_path, sdxl=False, data_path=None):
    import sys

    from lib_identity import discovery

    install_fake_modules(monkeypatch, models_path=tmp_path / "models", sd_model=SimpleNamespace(is_sdxl=sdxl, is_sd1=not sdxl))
    monkeypatch.setattr(sys.modules["modules.paths"], "data_path", str(data_path or tmp_path), raising=False)
    discovery.list_models([], refresh=True)
    from lib_identity.webui import ui

    return ui


def test_no_model_yet_says_which_file_goes_where(monkeypatch, tmp_path):
    ui = setup(monkeypatch, tmp_path)
    line = ui.model_status("None")
    shown = _visible(line)
    assert shown.startswith("No model yet: put **ip-adapter_sd15.safetensors**") and "in models/ipadapter" in shown
    assert "models/ControlNet" in shown and str(tmp_path) not in shown  # named as the user knows them
    assert str(tmp_path / "models" / "ipadapter") in _titles(line)  # the full paths on hover
    ui = setup(monkeypatch, tmp_path, sdxl=True)
    assert "ip-adapter_sdxl_vit-h.safetensors" in ui.model_status("None")


def test_folders_are_named_from_models_parent_when_the_data_folder_is_elsewhere(monkeypatch, tmp_path):
    """--data-dir elsewhere and --models-dir in the WebUI's folder (a common shared-models setup)."""
    write_manifest_layout("ip-adapter_sd15", tmp_path / "models" / "ipadapter", "safetensors")
    ui = setup(monkeypatch, tmp_path, data_path=tmp_path / "data")
    for title in ("None", "ip-adapter_sd15"):
        shown = _visible(ui.model_status(title))
        assert str(tmp_path) not in shown and "models/" in shown, shown


def test_a_missing_encoder_is_the_first_thing_said(monkeypatch, tmp_path):
    write_manifest_layout("ip-adapter_sd15", tmp_path / "models" / "ipadapter", "safetensors")
    ui = setup(monkeypatch, tmp_path)
    assert _visible(ui.model_status("None")).startswith("Choose a model")
    line = ui.model_status("ip-adapter_sd15")
    shown = _visible(line)
    assert shown.startswith("⚠ put the CLIP ViT-H/14 image encoder") and "into models/clip_vision, then press 🔄" in shown
    assert str(tmp_path) not in shown and "**ip-adapter_sd15** (SD1.5, 4 tokens)" in shown
    assert "h94/IP-Adapter" in _titles(line)  # the whole message, where to get it, on hover
    write_manifest_layout("clip_vision_vit-h", tmp_path / "models" / "clip_vision", "safetensors")
    from lib_identity import discovery

    discovery.list_models([], refresh=True)
    line = ui.model_status("ip-adapter_sd15")
    assert line.startswith("**ip-adapter_sd15**") and "needs CLIP ViT-H/14: found" in line and "⚠" not in line


def test_the_wrong_base_comes_first_with_what_to_do(monkeypatch, tmp_path):
    write_manifest_layout("ip-adapter_sdxl_vit-h", tmp_path / "models" / "ipadapter", "safetensors")
    ui = setup(monkeypatch, tmp_path)
    assert _visible(ui.model_status("ip-adapter_sdxl_vit-h")).startswith(
        "⚠ made for SDXL, the loaded checkpoint is SD1.5: load an SDXL checkpoint or choose another model")
