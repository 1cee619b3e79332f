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

from checkpoints import write_random
from lib_identity import formats
from lib_identity.unet import ImagePrompt, PatchSession, find_cross_attentions, remove_sessions
from unet_models import SD15, SDXL, build_ldm_unet, randomize_, to_diffusers

CONTEXT = {SD15: 768, SDXL: 2048}
S = 10  # encoder tokens (hidden states) per image for the MLP and Resampler projections (257 for CLIP)
D, Q = 256, 16  # Resampler width (four 64-wide heads) and queries
ATOL = 1e-4


@pytest.fixture(scope="module")
def unets():
    out = {}
    for layout, seed in ((SD15, 11), (SDXL, 12)):
        ldm = randomize_(build_ldm_unet(layout, context_dim=CONTEXT[layout]), seed=seed)
        out[layout] = (ldm, to_diffusers(ldm, layout, context_dim=CONTEXT[layout]))
    return out


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)


def encoder_width(layout, kind):
    """ViT-H's projection (1024) for the SD1.5 linear adapter, else 1280 (ViT-bigG projection, ViT-H hidden)."""
    return 1024 if (layout, kind) == (SD15, "linear") else 1280


def image_proj_keys(kind, C, E):
    """Official ``image_proj`` keys and shapes at test widths (formats.md §3)."""
    if kind == "linear":
        return {"proj.weight": (4 * C, E), "proj.bias": (4 * C,), "norm.weight": (C,), "norm.bias": (C,)}
    if kind == "mlp":
        return {"proj.0.weight": (E, E), "proj.0.bias": (E,), "proj.2.weight": (C, E), "proj.2.bias": (C,),
                "proj.3.weight": (C,), "proj.3.bias": (C,)}
    keys = {"latents": (1, Q, D), "proj_in.weight": (D, E), "proj_in.bias": (D,), "proj_out.weight": (C, D),
            "proj_out.bias": (C,), "norm_out.weight": (C,), "norm_out.bias": (C,)}
    for layer in range(4):
        p = f"layers.{layer}."
        keys.update({p + "0.norm1.weight": (D,), p + "0.norm1.bias": (D,), p + "0.norm2.weight": (D,),
                     p + "0.norm2.bias": (D,), p + "0.to_q.weight": (D, D), p + "0.to_kv.weight": (2 * D, D),
                     p + "0.to_out.weight": (D, D), p + "1.0.weight": (D,), p + "1.0.bias": (D,),
                     p + "1.1.weight": (4 * D, D), p + "1.3.weight": (D, 4 * D)})
    return keys


def write_adapter(folder, unet, kind, seed, suffix=".safetensors"):
    """A random-weight adapter file in the official layout, for this UNet's cross-attentions."""
    layers = find_cross_attentions(unet)
    C = layers[0].context_dim
    E = encoder_width(SD15 if C == 768 else SDXL, kind)
    shapes = {f"image_proj.{k}": v for k, v in image_proj_keys(kind, C, E).items()}
    for layer in layers:
        for name in ("to_k_ip", "to_v_ip"):
            shapes[f"ip_adapter.{layer.file_key}.{name}.weight"] = (layer.hidden_size, C)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():  # O(1) activations: norms near 1, matrices 1/sqrt(fan_in)
        if len(shape) == 1:
            base = 1.0 if key.endswith("weight") else 0.0
            tensors[key] = base + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[key] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    path = folder / f"{kind}-{seed}{suffix}"
    write_random(tensors, path)
    return path


def diffusers_state_dict(path):
    """What diffusers' own loader reads: the nested .bin dict, or the .safetensors prefixes split."""
    from safetensors.torch import load_file

    if str(path).endswith(".bin"):
        return torch.load(str(path), map_location="cpu", weights_only=True)
    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in load_file(str(path)).items():
        section, rest = key.split(".", 1)
        out[section][rest] = value
    return out


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


def run_both(unets, layout, adapters, weights, *, batch, cfg, seed=0, ours=None):
    """Noise predictions of diffusers and of the patched ldm UNet.

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
        bare = ldm(x, t, context=context)
    return expected, got, bare


CASES = [(layout, kind) for layout in (SD15, SDXL) for kind in ("linear", "mlp", "resampler")]


@pytest.mark.parametrize("layout,kind", CASES)
def test_attention_parity(unets, tmp_path, layout, kind):
    path = write_adapter(tmp_path, unets[layout][0], kind, seed=1)
    for cfg, weight in ((True, 0.75), (False, 1.0)):
        expected, got, bare = run_both(unets, layout, [(path, kind, 1)], [weight], batch=2, cfg=cfg)
        assert (expected - bare).abs().max() > 1e-2  # the adapter does change the prediction
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("layout", [SD15, SDXL])
def test_several_adapters_and_reference_images_at_once(unets, tmp_path, layout):
    ldm = unets[layout][0]
    adapters = [(write_adapter(tmp_path, ldm, "linear", seed=2, suffix=".bin"), "linear", 2),
                (write_adapter(tmp_path, ldm, "resampler", seed=3), "resampler", 1)]
    expected, got, bare = run_both(unets, layout, adapters, [0.8, -0.4], batch=1, cfg=True)
    assert (expected - bare).abs().max() > 1e-2
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
