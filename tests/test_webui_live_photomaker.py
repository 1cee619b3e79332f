"""Live: PhotoMaker V1 and V2 units in a real WebUI on an SDXL checkpoint, through /sdapi/v1/txt2img.

Opt-in: runs when SD_WEBUI_ROOT names a WebUI (tests/webui_live.py) and SD_WEBUI_SDXL_CHECKPOINT
names an SDXL checkpoint in its models folder (a random-weight one will do; with ``--precision
half`` the WebUI takes about 14 GB of RAM, and a loaded PhotoMaker file 1.7 GB (V1) or 2.6 GB (V2)
more: the extension keeps the ID encoder in float32 on a CPU).

The files are written here, full size, random weights, as a user would put them:
* ``models/photomaker/photomaker-v1.bin`` and ``models/photomaker/photomaker-v2.bin``: the official
  layouts (``torch.save`` of ``id_encoder`` and ``lora_weights``; the CLIP tower in bfloat16, the
  trained parts in float32, rank-64 LoRA over all 140 attentions of the SDXL UNet; 0.98 and 1.85 GB);
* ``buffalo_l``: the harness's small ONNX pack that finds t1.jpg's six faces (V2 needs it).

The weights are scaled so that every activation stays O(1): matrices 1/sqrt(fan in), norms near 1,
and the LoRA's ``up(down(x))`` about ``LORA_SCALE`` times x, so the fused rows and the LoRA change
the image without an inf or NaN in a float16 UNet. Five generations at 64x64, two steps (the start
0.2 of two steps is step 0: the identity acts from the first step): the plain prompt, V1, V1 without
its LoRA, V2, and the plain prompt again; the prompt without the trigger is refused before sampling.
"""

import base64
import io
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

import webui_live as live

SDXL = os.environ.get("SD_WEBUI_SDXL_CHECKPOINT")
PROMPT = "a photo of a man img"
V1, V2 = "photomaker-v1", "photomaker-v2"  # the official file names, without their suffix
LORA_SCALE = 0.05  # up(down(x)) ~ 0.05 |x| per projection; the UNet's own W x is ~0.58 |x|
TIMES = {}


def _skip_reason():
    return live.skip_reason() or (None if SDXL else "SD_WEBUI_SDXL_CHECKPOINT is not set (an SDXL checkpoint title)")


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def write_photomaker_file(path: Path, manifest_name: str, seed: int):
    """A PhotoMaker ``.bin`` in the official layout with random weights that keep activations O(1)."""
    import torch

    from checkpoints import manifest_keys, nest

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in manifest_keys(manifest_name).items():
        n = shape[-1]
        if key.startswith("lora_weights."):
            x = torch.randn(shape, generator=g)
            x = x / n ** 0.5 if key.endswith(".down.weight") else x * (LORA_SCALE / n ** 0.5)  # up: [out, rank]
            dtype = torch.bfloat16 if ".attn1." in key else torch.float32
        else:
            if len(shape) == 1:  # every 1-D weight is a LayerNorm's gain; biases and the class embedding small
                x = (1.0 if key.endswith(".weight") else 0.0) + 0.02 * torch.randn(shape, generator=g)
            else:
                x = torch.randn(shape, generator=g) / float(np.prod(shape[1:])) ** 0.5
            dtype = torch.bfloat16 if key.startswith("id_encoder.vision_model.") else torch.float32
        tensors[key] = x.to(dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(nest(tensors), str(path))


def _jpeg_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def pictures():
    """Two ID pictures of the same people: t1.jpg as shipped, and darker (the pack finds the faces in both)."""
    from PIL import Image, ImageEnhance

    import face_models as fm

    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        first = base64.b64encode(fh.read()).decode()
    darker = ImageEnhance.Brightness(Image.open(fm.insightface_image("t1.jpg")).convert("RGB")).enhance(0.7)
    return [first, _jpeg_b64(darker)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = live.WebUIServer.from_env()
    models = tmp_path_factory.mktemp("photomaker-models")
    try:
        (models / "Stable-diffusion").symlink_to(base.models_dir / "Stable-diffusion", target_is_directory=True)
        started = time.monotonic()
        write_photomaker_file(models / "photomaker" / f"{V1}.bin", V1, seed=41)
        write_photomaker_file(models / "photomaker" / f"{V2}.bin", V2, seed=42)
        TIMES["write files"] = time.monotonic() - started
        srv = live.WebUIServer(base.root, python=base.python, models_dir=models, extra_args=base.extra_args,
                               checkpoint=SDXL, hf_home=base.hf_home, live_models=False)
        started = time.monotonic()
        srv.start()
        TIMES["start (API answers)"] = time.monotonic() - started
        try:
            live.write_live_face_pack(srv.identity_models / live.LIVE_FACE_PACK)
            yield srv
        finally:
            print(f"\nPhotoMaker live timings (s): {json.dumps({k: round(v, 1) for k, v in TIMES.items()})}")
            print(f"WebUI peak RSS: {_peak_rss(srv)}")
            srv.stop()
    finally:
        shutil.rmtree(models, ignore_errors=True)


def _peak_rss(srv) -> str:
    try:
        for line in Path(f"/proc/{srv.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return line.split(":", 1)[1].strip()
    except (OSError, AttributeError):
        pass
    return "unknown"


def _generate(server, label, payload):
    started = time.monotonic()
    result = server.txt2img(payload)
    TIMES[label] = time.monotonic() - started
    return result


def _pixels(result) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result["images"][0]))).convert("RGB"), dtype=np.float32)


def _payload(unit=None, **overrides):
    payload = live.small_payload(**dict({"prompt": PROMPT, "steps": 2, "seed": 7}, **overrides))
    if unit is not None:
        payload["alwayson_scripts"] = {"identity": {"args": [unit]}}
    return payload


def _unit(model, pictures, **fields):
    return dict({"model": model, "images": list(pictures)}, **fields)


def _hashes(pictures):
    from lib_identity import units as U

    return U.Unit.from_api({"images": list(pictures)}, 1).image_hashes


def _model_hash(server, name):
    models = {m["name"]: m for m in server.get("/identity/v1/models")["models"]}
    assert name in models, sorted(models)
    return models[name]["hash"]


@pytest.fixture(scope="module")
def plain(server):
    """The WebUI's own image of the test prompt (trigger word and all) without a unit, before any unit ran."""
    return _pixels(_generate(server, "plain", _payload()))


RESULTS = {}


def test_the_sdxl_checkpoint_is_loaded_and_gives_a_finite_image(server, plain):
    loaded = server.get("/sdapi/v1/options")["sd_model_checkpoint"]
    assert Path(SDXL).stem in loaded, loaded
    assert plain.std() > 1.0, "a flat picture: NaN or inf in the latent"


def _check_entry(server, result, model, pictures, lora_weight="1.0"):
    info = json.loads(result["info"])
    assert info["prompt"] == PROMPT and info["all_prompts"] == [PROMPT], info["prompt"]
    assert info["infotexts"][0].splitlines()[0] == PROMPT, info["infotexts"][0]
    entry = info["extra_generation_params"]["Identity 1"]
    for part in (f"model: {model} [{_model_hash(server, model)}]", "start: 0.2", f"lora weight: {lora_weight}",
                 "trigger: img", "images: " + "+".join(_hashes(pictures))):
        assert part in entry, (part, entry)
    return entry


def test_a_v1_unit_with_two_pictures_changes_the_image_and_is_recorded(server, plain, pictures):
    full = _generate(server, "V1", _payload(_unit(V1, pictures)))
    fused_only = _generate(server, "V1 lora 0", _payload(_unit(V1, pictures, lora_weight=0)))
    a, b = _pixels(full), _pixels(fused_only)
    changed, rows, lora = np.abs(a - plain).mean(), np.abs(b - plain).mean(), np.abs(a - b).mean()
    print(f"\nV1 vs no unit: {changed:.3f}/255; V1 without its LoRA (fused rows only) vs no unit: {rows:.3f}/255; "
          f"LoRA on vs off: {lora:.3f}/255")
    assert a.std() > 1.0 and b.std() > 1.0, "a flat picture: NaN or inf in the latent"
    assert changed > 0.5, f"the PhotoMaker unit changed nothing\n{server.log_tail()}"
    assert rows > 0.05, f"the fused class rows changed nothing\n{server.log_tail()}"
    assert lora > 0.05, f"lora_weight 0 gave the same image: the LoRA did not act\n{server.log_tail()}"
    _check_entry(server, full, V1, pictures)
    _check_entry(server, fused_only, V1, pictures, lora_weight="0.0")
    RESULTS["v1"] = full


def test_png_info_of_the_image_gives_back_the_same_unit(server, pictures):
    from lib_identity import units as U

    result = RESULTS.get("v1")
    if result is None:
        pytest.skip("the V1 generation failed")
    answer = server.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + result["images"][0]})
    params = answer["parameters"]
    assert params["Prompt"] == PROMPT, params.get("Prompt")
    sent = json.loads(result["info"])["extra_generation_params"]["Identity 1"]
    assert params["Identity 1"] == sent
    (back,) = U.units_from_infotext(params)
    (want,) = U.units_from_infotext({"Identity 1": sent})
    assert back == want
    fields = back["fields"]
    assert fields["model"] == f"{V1} [{_model_hash(server, V1)}]" and fields["start"] == 0.2, fields
    assert fields["lora_weight"] == 1.0 and fields["trigger"] == "img", fields
    assert back["images_needed"] == list(_hashes(pictures)) and not back["errors"], back
    # the accordion's fields, as pasting fills them (on_infotext_pasted)
    assert params["Identity 1 trigger"] == "img" and params["Identity 1 start"] == 0.2, params


def test_a_v2_unit_with_two_pictures_changes_the_image_and_is_recorded(server, plain, pictures):
    result = _generate(server, "V2", _payload(_unit(V2, pictures)))
    a = _pixels(result)
    changed = np.abs(a - plain).mean()
    v1 = RESULTS.get("v1")
    other = np.abs(a - _pixels(v1)).mean() if v1 else float("nan")
    print(f"\nV2 vs no unit: {changed:.3f}/255; V2 vs V1: {other:.3f}/255")
    assert a.std() > 1.0, "a flat picture: NaN or inf in the latent"
    assert changed > 0.5, f"the PhotoMaker V2 unit changed nothing\n{server.log_tail()}"
    _check_entry(server, result, V2, pictures)


def test_a_prompt_without_the_trigger_is_answered_422_before_sampling(server, pictures):
    started = time.monotonic()
    with pytest.raises(live.WebUIError) as e:
        server.post("/sdapi/v1/txt2img", _payload(_unit(V1, pictures), prompt="a photo of a man"))
    TIMES["no trigger (422)"] = time.monotonic() - started
    message = str(e.value)
    assert "answered HTTP 422" in message, message
    assert "the prompt has no trigger word 'img'" in message, message


def test_the_same_request_without_the_unit_is_byte_identical_afterwards(server, plain):
    again = _pixels(_generate(server, "plain again", _payload()))
    assert np.array_equal(again, plain), \
        f"the same request without a unit now differs by {np.abs(again - plain).mean():.4f}/255"
