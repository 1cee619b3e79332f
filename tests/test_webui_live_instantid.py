"""Live: the native InstantID unit in a real WebUI on an SDXL checkpoint, through /sdapi/v1/txt2img.

Opt-in: runs when SD_WEBUI_ROOT names a WebUI (tests/webui_live.py) and SD_WEBUI_SDXL_CHECKPOINT
names an SDXL checkpoint in its models folder (a random-weight one will do; about 8 GB of RAM with
``--precision half``, 15+ GB in full precision: IdentityNet adds 2.5 GB in fp16, 5 GB in fp32).
SD_WEBUI_CHECKPOINT (an SD1.5 checkpoint), when set, is used for the wrong-base check.

The files are written here, full size, random weights, as a user would put them:
* ``models/instantid/ip-adapter.bin``: InstantID's adapter in the official layout (fp32 pickle of
  ``image_proj`` and ``ip_adapter``, Resampler 512 -> 16 x 2048, 70 ``to_k_ip``/``to_v_ip`` pairs);
* ``models/ControlNet/ControlNetModel/``: IdentityNet in diffusers format (``config.json`` and
  ``diffusion_pytorch_model.safetensors``, fp16), built by our ``IdentityNet`` from the official
  config and saved under diffusers' names; its zero convolutions are not zero, so it acts;
* ``antelopev2``: a small ONNX pack with antelopev2's file names that finds t1.jpg's six faces.

The server gets its own models folder (the checkpoints linked in from the WebUI's), so nothing is
left in the WebUI's own folders; the big files are deleted when the module ends.
"""

import base64
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import webui_live as live

SDXL = os.environ.get("SD_WEBUI_SDXL_CHECKPOINT")
ADAPTER = "ip-adapter"  # the official file name, without its suffix
FACE = 2  # the largest face of t1.jpg


def _skip_reason():
    return live.skip_reason() or (None if SDXL else "SD_WEBUI_SDXL_CHECKPOINT is not set (an SDXL checkpoint title)")


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def write_adapter(path: Path):
    """InstantID's ``ip-adapter.bin``: the official keys and shapes, fp32 as published, random weights."""
    from checkpoints import manifest_keys, write_random
    from instantid_helpers import instantid_adapter_tensors

    write_random(instantid_adapter_tensors(manifest_keys("instantid_ip-adapter"), seed=31), path)


def write_identitynet(folder: Path):
    """IdentityNet in diffusers format, written tensor by tensor (2.5 GB fp16; never the module in fp32)."""
    import torch
    from safetensors.torch import save_file

    from checkpoints import manifest
    from lib_identity.formats.controlnet_names import hint_block_count, ldm_to_diffusers
    from lib_identity.models.identitynet import IdentityNet, host_classes
    from lib_identity.models.identitynet_config import config_from_diffusers
    from unet_models import SDXL as SDXL_LAYOUT, build_ldm_unet

    m = manifest("instantid_controlnet")
    host = build_ldm_unet(SDXL_LAYOUT, model_channels=64, context_dim=2048, head_channels=64, device="meta")
    with torch.device("meta"):
        net = IdentityNet(config_from_diffusers(m["diffusers_config"], "manifest"), host_classes(host))
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    n = hint_block_count({k: tuple(v) for k, v in m["keys"].items()})
    names = {k: ldm_to_diffusers(k, hint_blocks=n) for k in shapes}
    assert set(names.values()) == set(m["keys"]), "our IdentityNet's names differ from the official layout"
    g = torch.Generator().manual_seed(32)
    tensors = {}
    for key, shape in shapes.items():
        if len(shape) == 1:  # the only 1-D weights are the norms': near 1; biases small
            value = (1.0 if key.endswith("weight") else 0.0) + 0.02 * torch.randn(shape, generator=g)
        else:  # 1/sqrt(fan in) keeps every activation O(1); the zero convolutions get the same, so it acts
            value = torch.randn(shape, generator=g) / float(np.prod(shape[1:])) ** 0.5
        tensors[names[key]] = value.half()
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(m["diffusers_config"]))


def _picture_b64() -> str:
    import face_models as fm

    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return base64.b64encode(fh.read()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import face_models as fm

    base = live.WebUIServer.from_env()
    models = tmp_path_factory.mktemp("instantid-models")
    try:
        # the WebUI's checkpoints, linked; everything else of this models folder is ours
        (models / "Stable-diffusion").symlink_to(base.models_dir / "Stable-diffusion", target_is_directory=True)
        write_adapter(models / "instantid" / f"{ADAPTER}.bin")
        write_identitynet(models / "ControlNet" / "ControlNetModel")
        srv = live.WebUIServer(base.root, python=base.python, models_dir=models, extra_args=base.extra_args,
                               checkpoint=SDXL, hf_home=base.hf_home, live_models=False)
        srv.start()
        try:
            fm.write_antelopev2_pack(str(srv.identity_models / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
            yield srv
        finally:
            srv.stop()
    finally:
        shutil.rmtree(models, ignore_errors=True)


def _pixels(result) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB"), dtype=np.float32)


def _payload(unit=None, **overrides):
    payload = live.small_payload(steps=2, seed=5, **overrides)
    if unit is not None:
        payload["alwayson_scripts"] = {"identity": {"args": [unit]}}
    return payload


def _unit(**fields):
    return dict({"model": ADAPTER, "images": [_picture_b64()], "face": FACE, "ip_weight": 0.8,
                 "identitynet_weight": 0.8}, **fields)


@pytest.fixture(scope="module")
def plain(server):
    """The WebUI's own image of the test request (no unit), before any unit ran."""
    result = server.txt2img(_payload())
    return _pixels(result)


def test_the_sdxl_checkpoint_is_loaded_and_gives_a_finite_image(server, plain):
    loaded = server.get("/sdapi/v1/options")["sd_model_checkpoint"]
    assert Path(SDXL).stem in loaded, loaded
    assert plain.std() > 1.0, "a flat picture: NaN or inf in the latent"


def test_the_unit_and_identitynet_change_the_image_and_the_unit_is_recorded(server, plain):
    full = server.txt2img(_payload(_unit()))
    adapter_only = server.txt2img(_payload(_unit(identitynet_weight=0)))
    a, b = _pixels(full), _pixels(adapter_only)
    changed, identitynet = np.abs(a - plain).mean(), np.abs(a - b).mean()
    adapter = np.abs(b - plain).mean()
    print(f"InstantID vs no unit: {changed:.3f}/255; IdentityNet on vs off: {identitynet:.3f}/255; "
          f"adapter alone vs no unit: {adapter:.3f}/255")
    assert a.std() > 1.0 and b.std() > 1.0, "a flat picture: NaN or inf in the latent"
    assert changed > 0.5, f"the InstantID unit changed nothing\n{server.log_tail()}"
    assert identitynet > 0.5, f"identitynet_weight 0 gave the same image: IdentityNet did not act\n{server.log_tail()}"
    assert adapter > 0, "the Image Adapter alone changed nothing"
    info = json.loads(full["info"])
    entry = info["extra_generation_params"]["Identity 1"]
    models = {m["name"]: m for m in server.get("/identity/v1/models")["models"]}
    assert entry.startswith(f"model: {ADAPTER} [{models[ADAPTER]['hash']}]"), entry
    assert f"face: {FACE}" in entry, entry
    assert "identitynet weight: 0" in json.loads(adapter_only["info"])["extra_generation_params"]["Identity 1"]


def test_a_unit_without_its_face_pack_is_answered_422(server):
    pack = server.identity_models / "antelopev2"
    hidden = pack.with_name("antelopev2.hidden")
    pack.rename(hidden)
    try:
        with pytest.raises(live.WebUIError) as e:
            server.post("/sdapi/v1/txt2img", _payload(_unit()))
    finally:
        hidden.rename(pack)
    message = str(e.value)
    assert "answered HTTP 422" in message, message
    assert "insightface model pack 'antelopev2' not found" in message, message


def test_the_unet_is_unchanged_afterwards(server, plain):
    server.txt2img(_payload(_unit()))
    again = _pixels(server.txt2img(_payload()))
    assert hashlib.sha256(again.tobytes()).hexdigest() == hashlib.sha256(plain.tobytes()).hexdigest(), \
        f"the same request without a unit now differs by {np.abs(again - plain).mean():.4f}/255"


def test_on_an_sd15_checkpoint_the_unit_is_answered_422(server):
    """Last: it loads the SD1.5 checkpoint in place of SDXL."""
    sd15 = os.environ.get("SD_WEBUI_CHECKPOINT")
    if not sd15:
        pytest.skip("SD_WEBUI_CHECKPOINT (an SD1.5 checkpoint) is not set")
    server.post("/sdapi/v1/options", {"sd_model_checkpoint": sd15})
    with pytest.raises(live.WebUIError) as e:
        server.post("/sdapi/v1/txt2img", _payload(_unit()))
    message = str(e.value)
    assert "answered HTTP 422" in message, message
    assert "SDXL" in message, message
