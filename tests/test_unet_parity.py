"""Parity with an independent implementation: diffusers' own IP-Adapter on the same weights.

Both worlds get the same things:

* a tiny UNet with the SD1.5 or SDXL *block structure* (16 / 70 cross-attentions), built from
  the WebUI's ldm classes and converted into diffusers' ``UNet2DConditionModel``;
* the same adapter file in the official key layout (``image_proj.*``,
  ``ip_adapter.<2m+1>.to_{k,v}_ip.weight``) with the official context (768 / 2048) and encoder
  widths (1024 / 1280), so ``lib_identity.formats`` recognises it as the real variant, but the
  tiny UNet's layer widths (32…128 instead of 320…1280) and a narrow Resampler (256 instead of
  768 / 1280 wide): the full widths would cost gigabytes of random weights for the same code
  path;
* the same encoder outputs (random), with cond rows first and uncond rows last.

diffusers loads the file with ``UNet2DConditionModel._load_ip_adapter_weights`` and runs its
``IPAdapterAttnProcessor2_0``; the extension reads it with ``lib_identity.formats`` and patches
the ldm UNet with a ``PatchSession``, the way an outside caller would. Noise predictions must
agree within 1e-4 (fp32).

``test_attention_parity`` feeds the session the tokens diffusers' own projection computed (the
UNet path alone); ``test_full_chain_parity`` goes file → ``formats.inspect`` →
``models.load_adapter`` → our projection → session.
"""

import copy

import pytest
import torch

from lib_identity import formats
from lib_identity.unet import ImagePrompt, PatchSession, remove_sessions
from unet_helpers import CONTEXT, diffusers_state_dict, encoder_width, write_adapter
from unet_models import SD15, SDXL, ldm_and_diffusers_unets

S = 10  # encoder tokens (hidden states) per image for the MLP and Resampler projections (257 for CLIP)
ATOL = 1e-4


@pytest.fixture(scope="module")
def unets():
    return ldm_and_diffusers_unets({SD15: 11, SDXL: 12}, CONTEXT)


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)


def ip_pairs(path):
    """The adapter's (to_k_ip, to_v_ip) weights by cross-attention ordinal, read with lib_identity.formats."""
    section = formats.load_tensors(str(path))["ip_adapter"]
    numbers = formats.ip_layer_indices(section)
    return [(section[f"{n}.to_k_ip.weight"], section[f"{n}.to_v_ip.weight"]) for n in numbers]


def encoder_outputs(kind, images, seed, E):
    """Random stand-ins for the CLIP outputs: image_embeds [n, E] or hidden states [n, S, E]."""
    g = torch.Generator().manual_seed(seed)
    shape = (images, E) if kind == "linear" else (images, S, E)
    cond = torch.randn(shape, generator=g)
    uncond = torch.zeros(shape) if kind == "linear" else torch.randn(shape, generator=g)
    return cond, uncond


def run_both(unets, layout, adapters, weights, *, batch, cfg, seed=0, ours=None, with_bare=False):
    """Noise predictions of diffusers and of the patched ldm UNet (and of the bare one, if asked).

    ``adapters``: [(path, kind, images)]; ``ours(index, path)`` gives our (projection, ip_layers)
    for an adapter (default: diffusers' own projection layer, and the weights read with formats).
    """
    ldm, base = unets[layout]
    dunet = copy.deepcopy(base)
    dunet._load_ip_adapter_weights([diffusers_state_dict(p) for p, _, _ in adapters], low_cpu_mem_usage=False)
    for proc in dunet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = list(weights)
    if ours is None:
        def ours(index, path):
            return dunet.encoder_hid_proj.image_projection_layers[index], ip_pairs(path)

    g = torch.Generator().manual_seed(seed)
    rows = 2 * batch if cfg else batch
    x = torch.randn(rows, 4, 8, 8, generator=g)
    t = torch.full((rows,), 400.0)
    context = torch.randn(rows, 7, CONTEXT[layout], generator=g)
    image_embeds, prompts = [], []
    for index, ((path, kind, images), weight) in enumerate(zip(adapters, weights)):
        cond, uncond = encoder_outputs(kind, images, seed=100 + index, E=encoder_width(layout, kind))
        per_row = [cond] * batch + ([uncond] * batch if cfg else [])
        image_embeds.append(torch.stack(per_row))  # [rows, images, ...]
        project, ip_layers = ours(index, path)
        with torch.no_grad():
            cond_tokens, uncond_tokens = project(cond), project(uncond)
        prompts.append(ImagePrompt(cond_tokens=cond_tokens, uncond_tokens=uncond_tokens, ip_layers=ip_layers,
                                   weight=weight, combine="concat", name=f"unit {index + 1}"))
    with torch.no_grad():
        expected = dunet(x, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": image_embeds}).sample
        with PatchSession(ldm, prompts) as session:
            session.begin_step(n_cond=batch, progress=0.3)
            got = ldm(x, t, context=context)
        bare = ldm(x, t, context=context) if with_bare else None
    return expected, got, bare


CASES = [(layout, kind) for layout in (SD15, SDXL) for kind in ("linear", "mlp", "resampler")]


@pytest.mark.parametrize("layout,kind", CASES)
def test_attention_parity(unets, tmp_path, layout, kind):
    path = write_adapter(tmp_path, unets[layout][0], kind, seed=1)
    for cfg, weight in ((True, 0.75), (False, 1.0)):
        expected, got, _ = run_both(unets, layout, [(path, kind, 1)], [weight], batch=2 if cfg else 1, cfg=cfg)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", [SD15, SDXL])
def test_several_adapters_and_reference_images_at_once(unets, tmp_path, layout):
    ldm = unets[layout][0]
    adapters = [(write_adapter(tmp_path, ldm, "linear", seed=2, suffix=".bin"), "linear", 2),
                (write_adapter(tmp_path, ldm, "resampler", seed=3), "resampler", 1)]
    expected, got, bare = run_both(unets, layout, adapters, [0.8, -0.4], batch=1, cfg=True, with_bare=True)
    assert (expected - bare).abs().max() > 1e-2  # the adapters do change the prediction
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def load_ours(index, path):
    """The file through lib_identity: formats.inspect → models.load_adapter (projection, ip layers)."""
    from lib_identity.models import load_adapter

    return load_adapter(formats.inspect(str(path)), formats.load_tensors(str(path)))


@pytest.mark.parametrize("layout,kind", CASES)
def test_full_chain_parity(unets, tmp_path, layout, kind):
    path = write_adapter(tmp_path, unets[layout][0], kind, seed=4)
    expected, got, _ = run_both(unets, layout, [(path, kind, 2)], [1.25], batch=1, cfg=True, ours=load_ours)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
