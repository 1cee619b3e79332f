"""A FaceID unit through the WebUI glue (stand-in ``modules``, the real ldm UNet, the real insightface
code on insightface's group photo with a small ONNX pack in ``models/insightface/models/buffalo_l``).

What a user would notice: the unit changes the UNet's output and is recorded in infotext with the
face chosen; another face gives another output; the UNet's weights are bit-identical and its hooks
gone afterwards (the LoRA too); the second generation analyses no face again; a missing pack
stops the run with a message naming the pack, its files and the folders searched.
"""

import base64
import io
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from faceid_helpers import write_faceid  # noqa: E402
from handoff import Wrapper, denoise, new_p  # noqa: E402
from unet_helpers import CONTEXT, hook_counts, unet_inputs  # noqa: E402
from unet_models import SD15, build_ldm_unet, randomize_  # noqa: E402


@pytest.fixture(scope="module")
def group_photo_b64():
    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return base64.b64encode(fh.read()).decode()


@pytest.fixture
def webui(monkeypatch, tmp_path):
    from lib_identity import discovery
    from lib_identity.encoders import default_face_cache
    from lib_identity.webui import runtime

    unet = randomize_(build_ldm_unet(SD15, context_dim=CONTEXT[SD15]), seed=3).eval()
    folder = tmp_path / "identity-models"
    folder.mkdir()
    adapter = write_faceid(folder, unet, "faceid", seed=1)
    models = tmp_path / "models"
    pack = fm.write_pack(str(models / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    model = SimpleNamespace(is_sdxl=False, is_sd1=True, model=Wrapper(unet))
    callbacks = install_fake_modules(monkeypatch, models_path=models, identity_models_dir=str(folder), sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    default_face_cache().clear()
    yield SimpleNamespace(model=model, unet=unet, callbacks=callbacks, adapter=adapter.stem, runtime=runtime,
                          pack=pack, models=models)
    runtime.cleanup()


def generate(env, args, x, t, c):
    """One generation as the WebUI runs it; returns (UNet output during sampling, infotext params)."""
    seen = {}

    def sample(*a, **k):
        env.runtime.before_sampling(p)
        seen["out"] = denoise(env, x, t, c, n_cond=1)

    p = new_p(env.model, sample)
    env.runtime.process(p, args)
    p.sample()
    return seen["out"], p.extra_generation_params


def test_a_faceid_unit_acts_on_the_chosen_face_and_leaves_the_unet_as_it_was(webui, group_photo_b64):
    from lib_identity.encoders.faces import analysis_count

    x, t, c = unet_inputs(2, CONTEXT[SD15])
    weights = {k: v.clone() for k, v in webui.unet.state_dict().items()}
    hooks = hook_counts(webui.unet)
    with torch.no_grad():
        bare = webui.unet(x, t, context=c)

    unit = {"model": webui.adapter, "images": [group_photo_b64], "face": 2, "lora_weight": 0.8}
    out_face2, params = generate(webui, [unit], x, t, c)
    entry = params["Identity 1"]
    assert entry.startswith(f"model: {webui.adapter} [") and "face: 2" in entry and "lora weight: 0.8" in entry
    assert not torch.allclose(out_face2, bare, atol=1e-4)

    runs = analysis_count()
    again, _ = generate(webui, [unit], x, t, c)
    assert analysis_count() == runs  # the second generation analyses no face: the cache answers
    assert torch.equal(again, out_face2)

    out_largest, params = generate(webui, [dict(unit, face="largest")], x, t, c)
    assert "face:" not in params["Identity 1"]  # the default is not written
    assert not torch.allclose(out_largest, out_face2, atol=1e-5)

    # weights bit-identical (the LoRA was never merged), hooks gone, outputs as before
    assert all(torch.equal(v, weights[k]) for k, v in webui.unet.state_dict().items())
    assert hook_counts(webui.unet) == hooks and webui.callbacks == []
    with torch.no_grad():
        assert torch.equal(webui.unet(x, t, context=c), bare)


def test_the_lora_weight_changes_the_output(webui, group_photo_b64):
    x, t, c = unet_inputs(2, CONTEXT[SD15])
    unit = {"model": webui.adapter, "images": [group_photo_b64]}
    full, _ = generate(webui, [unit], x, t, c)
    without, _ = generate(webui, [dict(unit, lora_weight=0)], x, t, c)
    assert not torch.allclose(full, without, atol=1e-5)


def test_a_missing_face_pack_stops_the_run_and_says_where_it_was_looked_for(webui, group_photo_b64):
    import shutil

    shutil.rmtree(webui.pack)
    x, t, c = unet_inputs(2, CONTEXT[SD15])
    p = new_p(webui.model, None)
    webui.runtime.process(p, [{"model": webui.adapter, "images": [group_photo_b64]}])
    with pytest.raises(Exception) as raised:
        webui.model.model(x, t, c)
    message = str(raised.value)
    assert message.startswith("Identity unit 1, field 'model'")
    for words in ("buffalo_l", ".onnx", str(webui.models / "insightface" / "models")):
        assert words in message, (words, message)


def test_a_picture_without_a_face_stops_the_run(webui):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (200, 160), (128, 128, 128)).save(buf, "PNG")
    x, t, c = unet_inputs(2, CONTEXT[SD15])
    p = new_p(webui.model, None)
    webui.runtime.process(p, [{"model": webui.adapter, "images": [base64.b64encode(buf.getvalue()).decode()]}])
    webui.runtime.before_sampling(p)
    with pytest.raises(Exception, match=r"Identity unit 1, field 'face'.*no face"):
        webui.model.model(x, t, c)
