"""Live: InstantID through sd-webui-controlnet in a real WebUI (opt-in, like every live test).

Runs when SD_WEBUI_ROOT names a WebUI (see webui_live.py) and SD_WEBUI_EXTRA_EXTENSIONS holds a
checkout of sd-webui-controlnet (1.1.440+). The server is this module's own: it also gets
``--controlnet-dir`` with the files written here.

* Our two preprocessors are in the extension's list, and its InstantID pair made of them gives an
  image on the SD1.5 test checkpoint (InstantID-shaped files for SD1.5, named ``instant_id``:
  the extension's InstantID path is the same for any base): the units change the image, and
  another face gives another image.
* Parity (SDXL): the same InstantID unit natively and through the extension, same files, picture
  and seed: mean difference below 1/255. Needs SD_WEBUI_SDXL_CHECKPOINT (a checkpoint title; about
  14 GB of RAM) and the native InstantID path (``lib_identity.methods.instantid``); skipped otherwise.
"""

import base64
import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest

import webui_live as live

FACE = 2  # a face of insightface's t1.jpg other than the largest


def _controlnet_checkout():
    for path in os.environ.get("SD_WEBUI_EXTRA_EXTENSIONS", "").split(os.pathsep):
        if path and "controlnet" in Path(path).name.lower():
            return Path(path)
    return None


def _skip_reason():
    reason = live.skip_reason()
    if reason:
        return reason
    if _controlnet_checkout() is None:
        return "SD_WEBUI_EXTRA_EXTENSIONS names no sd-webui-controlnet checkout"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _picture_b64() -> str:
    import face_models as fm

    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return base64.b64encode(fh.read()).decode()


def write_sd15_instantid(folder: Path):
    """InstantID-shaped files for SD1.5, random weights, named as the extension needs.

    The adapter: InstantID's Resampler (512 -> 16 tokens) projecting to 768, with SD1.5's 16
    ``to_k_ip``/``to_v_ip`` pairs. IdentityNet: a diffusers ``ControlNetModel`` of SD1.5's shape with
    every weight random (its zero convolutions too, so it acts).
    """
    import torch
    from diffusers import ControlNetModel

    from checkpoints import manifest_keys, write_random

    keys = {k: tuple(768 if d == 2048 else d for d in s) for k, s in manifest_keys("instantid_ip-adapter").items()
            if k.startswith("image_proj.")}
    keys.update({k: s for k, s in manifest_keys("ip-adapter_sd15").items() if k.startswith("ip_adapter.")})
    write_random(keys, folder / "ip-adapter_instant_id_sd15.safetensors", dtype=torch.float16, seed=11)

    torch.manual_seed(12)
    net = ControlNetModel(cross_attention_dim=768)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.02)
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()},
              str(folder / "control_instant_id_sd15.safetensors"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import face_models as fm

    cn_models = tmp_path_factory.mktemp("controlnet-models")
    write_sd15_instantid(cn_models)
    base = live.WebUIServer.from_env()
    srv = live.WebUIServer(base.root, python=base.python, models_dir=base.models_dir,
                           extra_args=base.extra_args + ["--controlnet-dir", str(cn_models)],
                           checkpoint=base.checkpoint, hf_home=base.hf_home, extra_extensions=base.extra_extensions,
                           request_timeout=base.request_timeout)
    srv.start()
    # InstantID's face pack, as the test pack for t1.jpg: looked up at run time, in --identity-models-dir
    fm.write_pack(str(srv.identity_models / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    srv.cn_models = cn_models
    yield srv
    srv.stop()


def _pixels(result) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB"), dtype=np.float32)


def _instantid_units(picture: str, face: int, size):
    common = dict(enabled=True, image=picture, weight=1.0, resize_mode="Crop and Resize", save_detected_map=False)
    return [
        dict(common, module="identity_instant_id_face_embedding", model="ip-adapter_instant_id_sd15", threshold_a=face),
        dict(common, module="identity_instant_id_face_keypoints", model="control_instant_id_sd15", threshold_a=face,
             processor_res=size[0], threshold_b=size[1]),
    ]


def test_our_preprocessors_are_in_the_extensions_list(server):
    modules = server.get("/controlnet/module_list")["module_list"]
    assert "identity_instant_id_face_embedding" in modules and "identity_instant_id_face_keypoints" in modules


def test_the_extensions_instantid_pair_runs_on_our_preprocessors(server):
    size = (128, 128)
    picture = _picture_b64()
    payload = live.small_payload(width=size[0], height=size[1], steps=3, seed=7)
    plain = _pixels(server.txt2img(payload))
    with_units = server.txt2img(dict(payload, alwayson_scripts={"controlnet": {"args": _instantid_units(picture, FACE, size)}}))
    other_face = server.txt2img(dict(payload, alwayson_scripts={"controlnet": {"args": _instantid_units(picture, 0, size)}}))
    log = server.log_tail(20000)
    assert "ControlModelType.InstantID" in log, log  # the extension took the pair as InstantID
    ours, theirs = _pixels(with_units), _pixels(other_face)
    changed, other = np.abs(ours - plain).mean(), np.abs(ours - theirs).mean()
    print(f"InstantID pair vs no units: {changed:.3f}/255; face {FACE} vs face 0: {other:.3f}/255")
    assert changed > 0.5, f"the InstantID units changed nothing\n{log[-8000:]}"
    assert other > 0, f"another face gave the same image\n{log[-8000:]}"
    assert "ControlNet 0" in with_units["info"]  # the extension recorded its units


# ---------------------------------------------------------------------------- parity (SDXL, native path)

def _parity_skip():
    if not os.environ.get("SD_WEBUI_SDXL_CHECKPOINT"):
        return "SD_WEBUI_SDXL_CHECKPOINT is not set (a random-weight SDXL checkpoint, about 14 GB of RAM)"
    if importlib.util.find_spec("lib_identity.methods.instantid") is None:
        return "the native InstantID path (lib_identity.methods.instantid) is not in this checkout"
    return None


@pytest.mark.skipif(_parity_skip() is not None, reason=str(_parity_skip()))
def test_through_the_extension_the_unit_gives_the_native_image(server):
    import torch

    from checkpoints import manifest_keys, write_random

    for name, manifest_name, seed in (("ip-adapter_instant_id_sdxl.safetensors", "instantid_ip-adapter", 21),
                                      ("control_instant_id_sdxl.safetensors", "instantid_controlnet", 22)):
        path = server.cn_models / name
        if not path.exists():  # full size, official layouts, random weights
            write_random(manifest_keys(manifest_name), path, dtype=torch.float16, std=0.02, seed=seed)
    server.post("/sdapi/v1/refresh-checkpoints", {})
    server.post("/sdapi/v1/options", {"sd_model_checkpoint": os.environ["SD_WEBUI_SDXL_CHECKPOINT"]})
    server.get("/controlnet/model_list?update=true")
    server.get("/identity/v1/models?refresh=true")
    size = (128, 128)  # an SDXL step on the CPU takes minutes at 256 px; parity does not need more
    payload = live.small_payload(width=size[0], height=size[1], steps=3, seed=11)
    unit = {"enabled": True, "model": "ip-adapter_instant_id_sdxl", "images": [_picture_b64()], "face": FACE,
            "ip_weight": 0.8, "identitynet_weight": 0.8}
    plain = _pixels(server.txt2img(payload))
    native = server.txt2img(dict(payload, alwayson_scripts={"identity": {"args": [unit]}}))
    bridged = server.txt2img(dict(payload, alwayson_scripts={"identity": {"args": [dict(unit, via_controlnet=True)]}}))
    a, b = _pixels(native), _pixels(bridged)
    assert np.abs(a - plain).mean() > 0.5, "the native unit changed nothing"
    diff = np.abs(a - b).mean()
    print(f"native vs through the ControlNet extension: mean difference {diff:.4f} / 255")
    assert diff < 1.0, f"mean difference {diff:.3f}/255 between the native and the ControlNet-extension image"
    assert "ControlNet 0" not in bridged["info"] and "via controlnet" in bridged["info"]
