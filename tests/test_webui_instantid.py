"""An InstantID unit through the WebUI glue (stand-in ``modules``, the tiny ldm SDXL UNet, the real
insightface code on insightface's group photo with a small ONNX pack named as antelopev2, the
InstantID adapter file, and a stand-in IdentityNet file in models/ControlNet).

What a user would notice: the unit changes the UNet's output and is recorded; IdentityNet is
loaded once for several generations and passes; a hires pass of another size runs; the UNet is
bit-identical and hook-free afterwards; a unit sent to the ControlNet extension is left alone
by the native path; an SD1.5 checkpoint, a missing pack or a missing IdentityNet stop the run
with a message saying what to do.
"""

import base64
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from instantid_helpers import standin_modules, write_instantid_adapter, write_standin_identitynet  # noqa: E402
from handoff import Wrapper, new_p  # noqa: E402
from unet_helpers import CONTEXT, hook_counts, unet_inputs  # noqa: E402
from unet_models import SDXL, build_ldm_unet, randomize_  # noqa: E402


@pytest.fixture(scope="module")
def group_photo_b64():
    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return base64.b64encode(fh.read()).decode()


@pytest.fixture(scope="module")
def sdxl_unet():
    return randomize_(build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL]), seed=12).eval()


@pytest.fixture
def webui(monkeypatch, tmp_path, sdxl_unet):
    from lib_identity.encoders import default_face_cache
    from lib_identity.methods.identitynet_cache import identitynets
    from lib_identity.webui import folders, runtime

    loads = []
    standin_modules(monkeypatch, loads)
    identitynets.clear()
    folder = tmp_path / "identity-models"
    folder.mkdir()
    adapter = write_instantid_adapter(folder, sdxl_unet, seed=1)
    models = tmp_path / "models"
    (models / "ControlNet").mkdir(parents=True)
    net = write_standin_identitynet(models / "ControlNet" / "control_instant_id_sdxl.safetensors", sdxl_unet, seed=2)
    pack = fm.write_antelopev2_pack(str(models / "insightface" / "models" / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    model = SimpleNamespace(is_sdxl=True, is_sd1=False, model=Wrapper(sdxl_unet))
    callbacks = install_fake_modules(monkeypatch, models_path=models, identity_models_dir=str(folder), sd_model=model)
    folders.list_models(refresh=True)
    default_face_cache().clear()
    yield SimpleNamespace(model=model, unet=sdxl_unet, callbacks=callbacks, adapter=adapter.stem, runtime=runtime,
                          pack=pack, models=models, identitynet=net, loads=loads)
    runtime.cleanup()
    identitynets.clear()


def denoise(env, x, t, c, n_cond, step=0, total=4):
    for fn in list(env.callbacks):
        fn(SimpleNamespace(text_cond=c[:n_cond], x=x, denoiser=SimpleNamespace(step=step, total_steps=total)))
    with torch.no_grad():
        return env.model.model(x, t, c)


def generate(env, args, passes):
    """One generation: ``passes`` is a list of (x, t, c) UNet inputs, one per sampling pass (hires: 2)."""
    outs = []

    def sample(*a, **k):
        for x, t, c in passes:
            env.runtime.before_sampling(p)
            outs.append(denoise(env, x, t, c, n_cond=x.shape[0] // 2))

    p = new_p(env.model, sample)
    env.runtime.process(p, args)
    p.sample()
    return outs, p.extra_generation_params


def test_an_instantid_unit_acts_is_recorded_and_leaves_the_unet_as_it_was(webui, group_photo_b64):
    first = unet_inputs(2, CONTEXT[SDXL], hw=(8, 8))
    hires = unet_inputs(2, CONTEXT[SDXL], seed=1, hw=(12, 16))
    weights = {k: v.clone() for k, v in webui.unet.state_dict().items()}
    hooks = hook_counts(webui.unet)
    with torch.no_grad():
        bare = [webui.unet(x, t, context=c) for x, t, c in (first, hires)]

    unit = {"model": webui.adapter, "images": [group_photo_b64], "face": 2, "ip_weight": 0.7, "identitynet_weight": 0.9}
    outs, params = generate(webui, [unit], [first, hires])
    entry = params["Identity 1"]
    assert entry.startswith(f"model: {webui.adapter} [") and "ip weight: 0.7" in entry and "identitynet weight: 0.9" in entry
    # InstantID has no plain weight and always averages its faces: neither is written as if it counted
    assert ", weight:" not in entry and "combine:" not in entry and "preparation:" not in entry
    assert all(not torch.allclose(o, b, atol=1e-4) for o, b in zip(outs, bare))

    adapter_only, _ = generate(webui, [dict(unit, identitynet_weight=0)], [first])
    assert not torch.allclose(adapter_only[0], outs[0], atol=1e-5)  # IdentityNet adds its own part
    again, _ = generate(webui, [unit], [first])
    assert torch.equal(again[0], outs[0])
    assert len(webui.loads) == 1  # loaded once, in the UNet's dtype, for every pass and generation
    assert webui.loads[0][0] == str(webui.identitynet) and webui.loads[0][2] == torch.float32

    assert all(torch.equal(v, weights[k]) for k, v in webui.unet.state_dict().items())
    assert hook_counts(webui.unet) == hooks and webui.callbacks == []
    with torch.no_grad():
        assert torch.equal(webui.unet(*first[:2], context=first[2]), bare[0])


def test_a_unit_for_the_controlnet_extension_is_left_to_it(webui, group_photo_b64):
    x, t, c = unet_inputs(2, CONTEXT[SDXL])
    with torch.no_grad():
        bare = webui.unet(x, t, context=c)
    outs, params = generate(webui, [{"model": webui.adapter, "images": [group_photo_b64], "via_controlnet": True}],
                            [(x, t, c)])
    assert "via controlnet: True" in params["Identity 1"]
    assert torch.equal(outs[0], bare) and webui.loads == []


def _stopped(env, unit, x=None):
    x, t, c = unet_inputs(2, CONTEXT[SDXL]) if x is None else x
    p = new_p(env.model, None)
    env.runtime.process(p, [unit])
    env.runtime.before_sampling(p)
    with pytest.raises(Exception) as raised:
        env.model.model(x, t, c)
    return str(raised.value)


def test_an_sd15_checkpoint_gets_a_clear_message(webui, group_photo_b64):
    webui.model.is_sdxl, webui.model.is_sd1 = False, True
    message = _stopped(webui, {"model": webui.adapter, "images": [group_photo_b64]})
    assert message.startswith("Identity unit 1, field 'model': InstantID runs on SDXL checkpoints only"), message


def test_missing_identitynet_or_antelopev2_say_where_to_put_them(webui, group_photo_b64):
    import os
    import shutil

    from lib_identity.webui import folders

    os.remove(webui.identitynet)
    folders.list_models(refresh=True)
    message = _stopped(webui, {"model": webui.adapter, "images": [group_photo_b64]})
    assert "needs InstantID's IdentityNet" in message and "models/ControlNet" in message, message

    write_standin_identitynet(webui.identitynet, webui.unet, seed=2)
    folders.list_models(refresh=True)
    shutil.rmtree(webui.pack)
    message = _stopped(webui, {"model": webui.adapter, "images": [group_photo_b64]})
    for words in ("antelopev2", "scrfd_10g_bnkps.onnx", "glintr100.onnx", str(webui.models / "insightface" / "models")):
        assert words in message, (words, message)
