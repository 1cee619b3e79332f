"""The same checks on the real ``sgm`` UNet the WebUI runs for SDXL (needs a WebUI checkout).

Runs when ``SD_WEBUI_ROOT`` points at a WebUI checkout with ``repositories/generative-models``;
skipped otherwise. Only the UNet's own modules are imported from it (the ``sgm`` package
``__init__`` files pull in the whole training stack, so they are bypassed), and nothing of the
checkout is copied.
"""

import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from checkpoints import manifest
from lib_identity.unet import PatchSession, find_cross_attentions, remove_sessions
from unet_helpers import CONTEXT, random_prompt, write_adapter
from unet_models import SDXL, randomize_, to_diffusers

ROOT = os.environ.get("SD_WEBUI_ROOT", "")
SGM = os.path.join(ROOT, "repositories", "generative-models")
pytestmark = pytest.mark.skipif(not (ROOT and os.path.isdir(os.path.join(SGM, "sgm"))),
                                reason="SD_WEBUI_ROOT does not point at a WebUI checkout with generative-models")

# the WebUI's repositories/generative-models/configs/inference/sd_xl_base.yaml, network_config
SDXL_BASE = dict(adm_in_channels=2816, num_classes="sequential", use_checkpoint=True, in_channels=4, out_channels=4,
                 model_channels=320, attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4],
                 num_head_channels=64, use_spatial_transformer=True, use_linear_in_transformer=True,
                 transformer_depth=[1, 2, 10], context_dim=2048, spatial_transformer_attn_type="softmax-xformers",
                 legacy=False)


@pytest.fixture(scope="module")
def UNetModel():
    """sgm's UNetModel, imported without running the package __init__ files; sys.modules restored after."""
    before = {k for k in sys.modules if k == "sgm" or k.startswith("sgm.")}
    for name in ("sgm", "sgm.modules", "sgm.modules.diffusionmodules"):
        pkg = types.ModuleType(name)
        pkg.__path__ = [os.path.join(SGM, *name.split("."))]
        sys.modules[name] = pkg
    try:
        import sgm.modules.attention as attention
        from sgm.modules.diffusionmodules.openaimodel import UNetModel as cls

        attention.XFORMERS_IS_AVAILABLE = False  # as the WebUI's sd_models_xl sets it
        yield cls
    finally:
        for k in [k for k in sys.modules if (k == "sgm" or k.startswith("sgm.")) and k not in before]:
            del sys.modules[k]


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)


def test_full_size_sdxl_layers_match_the_official_table(UNetModel):
    with torch.device("meta"):
        unet = UNetModel(**SDXL_BASE)
    rows = [r for r in manifest("unet_attention_order_sdxl")["rows"] if r["ip_key"]]
    layers = find_cross_attentions(unet)
    assert [(l.name, l.diffusers_name, l.hidden_size, l.context_dim) for l in layers] == [
        (r["ldm"], r["diffusers"], r["hidden_size"], r["context_dim"]) for r in rows]


@pytest.fixture(scope="module")
def tiny(UNetModel):
    params = dict(SDXL_BASE, model_channels=32, num_head_channels=-1, num_heads=4, use_checkpoint=False,
                  num_classes=None, adm_in_channels=None)
    unet = randomize_(UNetModel(**params), seed=31).eval()
    return unet, to_diffusers(unet, SDXL, context_dim=CONTEXT[SDXL])


def test_parity_with_diffusers_on_the_real_sgm_unet(tiny, tmp_path):
    from test_unet_parity import run_both

    path = write_adapter(tmp_path, tiny[0], "resampler", seed=6)
    expected, got, bare = run_both({SDXL: tiny}, SDXL, [(path, "resampler", 1)], [0.7], batch=1, cfg=True,
                                   with_bare=True)
    assert (expected - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_additional_tokens_of_sgm_attention(tiny):
    unet = tiny[0]
    C = CONTEXT[SDXL]
    layer = find_cross_attentions(unet)[3]
    attn = layer.module
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, layer.hidden_size, generator=g)
    extra = torch.randn(2, 3, layer.hidden_size, generator=g)
    context = torch.randn(2, 7, C, generator=g)
    prompt = random_prompt(unet, C, weight=0.6)
    with torch.no_grad():
        bare = attn(x, context=context, additional_tokens=extra)
        with PatchSession(unet, [prompt]) as session:
            session.begin_step(1)
            patched = attn(x, context=context, additional_tokens=extra)
        wk, wv = prompt.ip_layers[layer.ordinal]
        tokens = torch.cat([prompt.cond_tokens, prompt.uncond_tokens])
        h, d = layer.heads, layer.head_dim
        split = lambda t: t.view(t.shape[0], -1, h, d).transpose(1, 2)  # noqa: E731
        img = F.scaled_dot_product_attention(split(attn.to_q(x)), split(tokens @ wk.T), split(tokens @ wv.T))
        img = img.transpose(1, 2).reshape(2, 12, h * d)
    torch.testing.assert_close(patched - bare, 0.6 * img @ attn.to_out[0].weight.T, atol=1e-5, rtol=0)
