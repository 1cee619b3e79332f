"""The WebUI glue's run lifecycle without a WebUI: a stand-in ``modules`` package, the real ldm UNet.

What a user would notice: a good unit changes the UNet's output during sampling and is recorded
in infotext; the patch is gone after sampling, also when sampling raised; a bad unit stops the
run at the first UNet call with its message; X/Y/Z cells change only what they name.
(The same flows run in a real WebUI in test_webui_live_identity.py when SD_WEBUI_ROOT is set.)
"""

from types import SimpleNamespace

import pytest
import torch

from handoff import b64, denoise, make_env, new_p, picture
from unet_helpers import CONTEXT, hook_counts, unet_inputs
from unet_models import SD15


@pytest.fixture
def webui(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    yield env
    env.runtime.cleanup()


def unit_args(model_name, **fields):
    return [dict({"model": model_name, "images": [b64(picture(1))]}, **fields)]


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
    args = unit_args(webui.adapter, weight=0.5) + [{"enabled": False, "model": webui.adapter, "images": [b64(picture(2))]}]
    shared_params = {}  # X/Y/Z's copy(p) shares this dict between cells
    cell1 = SimpleNamespace(sd_model=webui.model, extra_generation_params=shared_params, sample=None,
                            identity_overrides={("weight", 1): "0.25", ("enabled", 2): "true"})
    webui.runtime.process(cell1, args)
    assert "weight: 0.25" in shared_params["Identity 1"] and "Identity 2" in shared_params
    cell2 = SimpleNamespace(sd_model=webui.model, extra_generation_params=shared_params, sample=None)
    webui.runtime.process(cell2, args)
    assert "weight: 0.5" in shared_params["Identity 1"] and "Identity 2" not in shared_params
