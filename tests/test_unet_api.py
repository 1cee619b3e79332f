"""The public Python API used the way another extension or a script would: file + pictures -> UNet.

The expected noise predictions come from diffusers' IP-Adapter fed with the CLIP encodings of
the same pictures: several pictures as several images of one adapter (concatenated tokens), or
their averaged embedding (``average`` combines encodings before the projection).
"""

import copy

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from checkpoints import write_manifest_layout
from lib_identity import api
from lib_identity.encoders import encode_images
from lib_identity.errors import PatchError
from lib_identity.unet import live_sessions, remove_sessions
from unet_helpers import CONTEXT, diffusers_state_dict, write_adapter
from unet_models import SD15, build_ldm_unet, randomize_, to_diffusers


@pytest.fixture(scope="module")
def clip():
    """A tiny CLIP vision tower whose image_embeds have ViT-H's width (1024), as ip-adapter_sd15 expects."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=1024)
    return CLIPVisionModelWithProjection(config).eval()


@pytest.fixture(scope="module")
def unets():
    ldm = randomize_(build_ldm_unet(SD15, context_dim=CONTEXT[SD15]), seed=21)
    return ldm, to_diffusers(ldm, SD15, context_dim=CONTEXT[SD15])


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)


def pictures(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(40 + 8 * i, 48, 3), dtype=np.uint8) for i in range(n)]


def diffusers_prediction(dunet, path, embeds_per_row, x, t, context, weight):
    dunet = copy.deepcopy(dunet)
    dunet._load_ip_adapter_weights([diffusers_state_dict(path)], low_cpu_mem_usage=False)
    for proc in dunet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [weight]
    with torch.no_grad():
        return dunet(x, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": [embeds_per_row]}).sample


@pytest.mark.parametrize("combine", ["concat", "average"])
def test_an_outside_caller_gets_what_diffusers_gets(tmp_path, clip, unets, combine):
    ldm, dunet = unets
    path = write_adapter(tmp_path, ldm, "linear", seed=5)
    refs = pictures(2)
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.full((2,), 250.0)
    context = torch.randn(2, 7, CONTEXT[SD15], generator=g)

    adapter = api.load_ip_adapter(path)
    prompt = api.image_prompt(adapter, refs, encoder=clip, weight=0.9, combine=combine)
    with torch.no_grad():
        with api.apply(ldm, [prompt]) as session:
            session.begin_step(n_cond=1, progress=0.0)
            got = ldm(x, t, context=context)
        bare = ldm(x, t, context=context)
    assert not live_sessions()

    cond, uncond = encode_images(clip, refs, "image_embeds")
    if combine == "average":
        cond, uncond = cond.mean(0, keepdim=True), uncond.mean(0, keepdim=True)
    expected = diffusers_prediction(dunet, path, torch.stack([cond, uncond]), x, t, context, 0.9)
    assert (expected - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_face_adapters_are_sent_to_their_own_methods(tmp_path):
    path = write_manifest_layout("ip-adapter-faceid_sd15", tmp_path, "safetensors")
    with pytest.raises(PatchError, match="not an IP-Adapter fed by CLIP vision"):
        api.load_ip_adapter(path)
