"""The WebUI glue's run lifecycle without a WebUI: a stand-in ``modules`` package, the real ldm UNet.

What a user would notice: a good unit changes the UNet's output during sampling and is recorded
in infotext; the patch is gone after sampling, also when sampling raised; a bad unit stops the
run at the first UNet call with its message; X/Y/Z cells change only what they name.
(The same flows run in a real WebUI in test_webui_live_identity.py when SD_WEBUI_ROOT is set.)
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fake_webui import install_fake_modules
from unet_helpers import CONTEXT, hook_counts, unet_inputs, write_adapter
from unet_models import SD15, build_ldm_unet, randomize_

TINY_CLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 image_size=32, patch_size=8, projection_dim=1024)


class Wrapper(torch.nn.Module):
    """Stands for ``sd_model.model`` (ldm's DiffusionWrapper): calls the UNet with the context."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, context):
        return self.diffusion_model(x, t, context=context)


@pytest.fixture
def webui(monkeypatch, tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lib_identity import discovery
    from lib_identity.encoders import clip_vision
    from lib_identity.webui import lookup, runtime

    unet = randomize_(build_ldm_unet(SD15, context_dim=CONTEXT[SD15]), seed=3).eval()
    folder = tmp_path / "identity-models"
    folder.mkdir()
    adapter = write_adapter(folder, unet, "linear", seed=1)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(tmp_path / "encoder", safe_serialization=True)
    real = clip_vision.shipped_config
    monkeypatch.setattr(clip_vision, "shipped_config", lambda eid: dict(real(eid), **TINY_CLIP) if eid == "clip-vit-h" else real(eid))
    # the tiny encoder is no ViT-H the model folders would recognise: hand it over directly
    monkeypatch.setattr(lookup, "find_encoder_for_run", lambda need: str(tmp_path / "encoder"))

    model = SimpleNamespace(is_sdxl=False, is_sd1=True, model=Wrapper(unet))
    callbacks = install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(folder),
                                     sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    yield SimpleNamespace(model=model, unet=unet, callbacks=callbacks, adapter=adapter.stem, runtime=runtime)
    runtime.cleanup()


def picture(seed):
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (40, 32, 3), dtype=np.uint8))


def new_p(model, sample):
    return SimpleNamespace(sd_model=model, extra_generation_params={}, sample=sample)


def unit_args(model_name, **fields):
    return [dict({"model": model_name, "images": [_b64(picture(1))]}, **fields)]


def _b64(img):
    import base64
    import io

    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def denoise(env, x, t, c, n_cond):
    """What the WebUI's CFG denoiser does per step: the callback, then the UNet over all rows."""
    for fn in list(env.callbacks):
        fn(SimpleNamespace(text_cond=c[:n_cond], x=x, denoiser=SimpleNamespace(step=0, total_steps=3)))
    with torch.no_grad():
        return env.model.model(x, t, c)


def test_a_unit_acts_during_sampling_and_is_gone_afterwards(webui):
    x, t, c = unet_inputs(2, CONTEXT[SD15])
    with torch.no_grad():
        bare = webui.unet(x, t, context=c)
    before = hook_counts(webui.unet)
    seen = {}

    def sample(*args, **kwargs):
        webui.runtime.before_sampling(p)  # the WebUI calls process_before_every_sampling here
        seen["out"] = denoise(webui, x, t, c, n_cond=1)
        raise RuntimeError("the sampler failed")

    p = new_p(webui.model, sample)
    webui.runtime.process(p, unit_args(webui.adapter, weight=0.9))
    assert p.extra_generation_params["Identity 1"].startswith(f"model: {webui.adapter} [")
    with pytest.raises(RuntimeError, match="sampler failed"):
        p.sample()
    assert not torch.equal(seen["out"], bare)
    # the patch and the per-step callback went with the exception, before any next run
    assert hook_counts(webui.unet) == before and webui.callbacks == []
    with torch.no_grad():
        assert torch.equal(webui.unet(x, t, context=c), bare)


def test_a_bad_unit_stops_the_run_at_the_first_unet_call(webui):
    x, t, c = unet_inputs(2, CONTEXT[SD15])
    p = new_p(webui.model, None)
    webui.runtime.process(p, unit_args("no-such-model"))
    assert "Identity 1" not in p.extra_generation_params
    with pytest.raises(Exception, match=r"Identity unit 1, field 'model': unknown model 'no-such-model'"):
        webui.model.model(x, t, c)
    # the next run without units runs normally
    webui.runtime.process(new_p(webui.model, None), [False])
    with torch.no_grad():
        webui.model.model(x, t, c)


def test_a_failure_while_preparing_also_stops_the_run(webui, monkeypatch):
    from lib_identity.methods import ip_adapter

    x, t, c = unet_inputs(2, CONTEXT[SD15])
    p = new_p(webui.model, None)
    webui.runtime.process(p, unit_args(webui.adapter))
    monkeypatch.setattr(ip_adapter, "prepare", lambda *a, **k: (_ for _ in ()).throw(MemoryError("out of memory")))
    webui.runtime.before_sampling(p)
    with pytest.raises(Exception, match="preparing the units failed: MemoryError: out of memory"):
        webui.model.model(x, t, c)


def test_xyz_cells_change_only_what_they_name(webui):
    args = unit_args(webui.adapter, weight=0.5) + [{"enabled": False, "model": webui.adapter, "images": [_b64(picture(2))]}]
    shared_params = {}  # X/Y/Z's copy(p) shares this dict between cells
    cell1 = SimpleNamespace(sd_model=webui.model, extra_generation_params=shared_params, sample=None,
                            identity_overrides={("weight", 1): "0.25", ("enabled", 2): "true"})
    webui.runtime.process(cell1, args)
    assert "weight: 0.25" in shared_params["Identity 1"] and "Identity 2" in shared_params
    cell2 = SimpleNamespace(sd_model=webui.model, extra_generation_params=shared_params, sample=None)
    webui.runtime.process(cell2, args)
    assert "weight: 0.5" in shared_params["Identity 1"] and "Identity 2" not in shared_params
