"""The accordion's face picker and which FaceID controls show, without gradio (stand-in ``modules``).

What a user would notice: choosing a FaceID model and adding insightface's group photo shows the
picture with its six faces numbered; an IP-Adapter model shows no picker; a missing face pack is
said in the picker's status line; s_scale shows only for FaceID-Plus v2 and the LoRA weight only
for files with a LoRA (Portrait has none); CLIP's "fit" control is not a FaceID control.
"""

from types import SimpleNamespace

import numpy as np
import pytest

from checkpoints import manifest_keys, write_layout
from fake_webui import install_fake_modules

FILES = {
    "ip-adapter-faceid_sd15.bin": "ip-adapter-faceid_sd15",
    "ip-adapter-faceid-plusv2_sd15.bin": "ip-adapter-faceid-plusv2_sd15",
    "ip-adapter-faceid-portrait_sd15.bin": "ip-adapter-faceid-portrait_sd15",
    "ip-adapter_sd15.safetensors": "ip-adapter_sd15",
}


@pytest.fixture
def env(monkeypatch, tmp_path):
    from lib_identity import discovery

    folder = tmp_path / "identity-models"
    for name, manifest in FILES.items():
        write_layout(manifest_keys(manifest), folder / name)
    install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(folder))
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # where the picker may open uploads
    discovery.list_models([str(folder)], refresh=True)
    return SimpleNamespace(folder=folder, uploads=tmp_path / "gradio")


def _shown(title):
    from lib_identity import units as U
    from lib_identity.webui import ui

    info = ui.model_info(title)
    shown = ui.visible_fields(U.METHOD_OF_FAMILY.get(info.family), {}, info)
    return {name for name, on in shown.items() if on}


def test_only_the_controls_the_chosen_file_uses_show(env):
    assert {"face", "lora_weight"} <= _shown("ip-adapter-faceid_sd15")
    assert "s_scale" not in _shown("ip-adapter-faceid_sd15")
    assert {"face", "lora_weight", "s_scale"} <= _shown("ip-adapter-faceid-plusv2_sd15")
    portrait = _shown("ip-adapter-faceid-portrait_sd15")
    assert "face" in portrait and "lora_weight" not in portrait and "s_scale" not in portrait
    for title in ("ip-adapter-faceid_sd15", "ip-adapter-faceid-portrait_sd15"):
        assert "preparation" not in _shown(title)  # "Fit to the encoder's square": CLIP's, not FaceID's
    assert not {"face", "lora_weight", "s_scale"} & _shown("ip-adapter_sd15")


def _upload(env, name):
    import shutil

    import face_models as fm

    env.uploads.mkdir(exist_ok=True)
    path = env.uploads / name
    shutil.copy(fm.insightface_image("t1.jpg"), path)
    return SimpleNamespace(name=str(path))  # what gradio's File hands the change event


def test_the_picker_numbers_the_faces_of_the_group_photo(env):
    pytest.importorskip("insightface")
    pytest.importorskip("onnxruntime")
    import face_models as fm
    from lib_identity.encoders import default_face_cache
    from lib_identity.webui import ui

    fm.write_pack(str(env.folder / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    default_face_cache().clear()
    files = [_upload(env, "t1.jpg")]
    gallery, status = ui.face_picker(files, "ip-adapter-faceid_sd15")
    assert status == ""
    assert len(gallery) == 1 and gallery[0][1] == "picture 1: 6 face(s)"
    drawn = np.asarray(gallery[0][0].convert("RGB")).astype(int)
    # the largest face (index 0, the centre one) is boxed in green at its place in the picture
    x0, y0, _x1, _y1 = (int(round(v)) for v in fm.T1_FACES[2].box())
    assert drawn.shape[:2] == (fm.T1_SIZE[1], fm.T1_SIZE[0])
    assert tuple(drawn[y0 + 20, x0]) == (0, 255, 0)
    assert ui.face_picker(files, "ip-adapter_sd15") == ([], "")  # IP-Adapter: no picker


def test_the_picker_says_which_pack_is_missing(env):
    from lib_identity.webui import ui

    gallery, status = ui.face_picker([_upload(env, "t1.jpg")], "ip-adapter-faceid_sd15")
    assert gallery == []
    assert "buffalo_l" in status and "det_10g.onnx" in status and status.startswith("⚠")
