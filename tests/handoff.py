"""Hand-off checks: units go in where the WebUI puts them, and the test sees what the UNet saw.

A setting is only proven to work when a number inside the UNet depends on it as it should. This
module drives units the way the WebUI does (API dicts -> ``runtime.process`` -> ``p.sample`` ->
``runtime.before_sampling`` -> per denoiser step the ``on_cfg_denoiser`` callbacks, then the
UNet calls the CFG denoiser makes) and records, for every cross-attention, the output of the
text branch and what reached ``to_out`` after the identity's hooks. So a test can say "at
step k, on these rows, in these tokens, the identity added exactly this".

For a new method's settings (InstantID, PhotoMaker):

    env = make_env(monkeypatch, tmp_path)            # stand-in ``modules``, real ldm UNet, model folder
    steps = generate(env, [unit_dict], steps=4)      # one Seen per denoiser step
    steps[2].added("input_blocks.1.1.transformer_blocks.0.attn2")  # [rows, tokens, width]

and compare with ``reference(env, prompts, ...)``: the bare UNet under a ``PatchSession`` built
from what the setting should produce (tokens of the expected encoding, a mask, a window).
``attention_probe(unet)`` records the same around a bare ``PatchSession``; other UNet-side probes
(a ControlNet's residuals) can be added the same way.
"""

from __future__ import annotations

import base64
import contextlib
import io
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from fake_webui import install_fake_modules
from unet_helpers import CONTEXT, unet_inputs, write_adapter
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


def picture(seed, size=(40, 32)):
    """A random RGB picture, ``size`` = (height, width); tall by default, so crops differ."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8))


def b64(img) -> str:
    """A PIL image as the API sends it."""
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
    # the WebUI's signature (StableDiffusionProcessing.get_conds_with_caching), without its cache
    return function(None, required_prompts, steps, hires_steps)


def new_p(model, sample):
    return SimpleNamespace(sd_model=model, extra_generation_params={}, sample=sample,
                           get_conds_with_caching=_get_conds_with_caching)


def denoise(env, x, t, c, n_cond, step=0, total_steps=3):
    """What the WebUI's CFG denoiser does per step: the callback, then the UNet over all rows."""
    for fn in list(env.callbacks):
        fn(SimpleNamespace(text_cond=c[:n_cond], x=x, denoiser=SimpleNamespace(step=step, total_steps=total_steps)))
    with torch.no_grad():
        return env.model.model(x, t, c)


def make_env(monkeypatch, tmp_path, adapters=(("linear", 1),)):
    """A stand-in WebUI around a tiny SD1.5 ldm UNet, adapter files in its model folder and a tiny
    CLIP vision encoder (``env.encoder``: its folder) handed to every unit that needs ViT-H."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from lib_identity import discovery
    from lib_identity.encoders import clip_vision
    from lib_identity.webui import lookup, runtime

    unet = randomize_(build_ldm_unet(SD15, context_dim=CONTEXT[SD15]), seed=3).eval()
    folder = tmp_path / "identity-models"
    folder.mkdir()
    files = {kind: write_adapter(folder, unet, kind, seed=seed) for kind, seed in adapters}
    torch.manual_seed(0)
    encoder = tmp_path / "encoder"
    CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP)).save_pretrained(encoder, safe_serialization=True)
    real = clip_vision.shipped_config
    monkeypatch.setattr(clip_vision, "shipped_config", lambda eid: dict(real(eid), **TINY_CLIP) if eid == "clip-vit-h" else real(eid))
    # the tiny encoder is no ViT-H the model folders would recognise: hand it over directly
    monkeypatch.setattr(lookup, "find_encoder_for_run", lambda need: str(encoder))
    model = SimpleNamespace(is_sdxl=False, is_sd1=True, model=Wrapper(unet))
    callbacks = install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(folder),
                                     sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    return SimpleNamespace(model=model, unet=unet, callbacks=callbacks, runtime=runtime, encoder=encoder, files=files,
                           adapter=files[adapters[0][0]].stem, inputs=unet_inputs(2, CONTEXT[SD15]))


# ---------------------------------------------------------------------------- what the UNet saw


@dataclass
class Seen:
    """One denoiser step: the UNet's output over all rows, and per cross-attention (A1111 name)
    the text branch's output and what reached ``to_out`` (one tensor per UNet call, joined)."""

    out: Optional[torch.Tensor]
    text: Dict[str, torch.Tensor] = field(default_factory=dict)
    final: Dict[str, torch.Tensor] = field(default_factory=dict)

    def added(self, layer: str) -> torch.Tensor:
        """What the identity added to the attention output of ``layer``: ``[rows, tokens, width]``."""
        return self.final[layer] - self.text[layer]

    def acted(self) -> bool:
        """Whether the identity changed any attention output in this step."""
        return any(bool(self.added(name).abs().max() > 0) for name in self.text)


@contextlib.contextmanager
def attention_probe(unet):
    """Record every cross-attention while inside: yields a ``Seen`` (without ``out``) whose
    ``text``/``final`` fill per layer. Hooks on ``attn2.to_out[0]``: one runs before the
    identity's own pre-hook (the text branch), one after the module (its input then carries the
    image branch). Usable with a bare ``PatchSession`` too."""
    from lib_identity.unet import find_cross_attentions

    text, final, handles = {}, {}, []
    for layer in find_cross_attentions(unet):
        def before(module, args, name=layer.name):
            text.setdefault(name, []).append(args[0].detach().clone())

        def after(module, args, output, name=layer.name):
            final.setdefault(name, []).append(args[0].detach().clone())

        out = layer.module.to_out[0]
        handles.append(out.register_forward_pre_hook(before, prepend=True))
        handles.append(out.register_forward_hook(after))
    seen = Seen(out=None)
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
        # one tensor per UNet call, joined along the rows
        seen.text.update({k: torch.cat(v) for k, v in text.items()})
        seen.final.update({k: torch.cat(v) for k, v in final.items()})


def _text_cond(c, n_cond, sdxl_style):
    # SDXL's denoiser reports text_cond as a dict; SD1.5's as the tensor
    return {"crossattn": c[:n_cond], "vector": torch.zeros(n_cond, 8)} if sdxl_style else c[:n_cond]


def generate(env, units: Sequence[dict], *, steps: int = 1, n_cond: int = 1, calls: Optional[Sequence[int]] = None,
             inputs=None, sdxl_style: bool = False, params: Optional[dict] = None) -> List[Seen]:
    """One generation through the WebUI glue; returns what the UNet saw at every denoiser step.

    ``n_cond``: the cond rows the denoiser reports (``text_cond`` rows); ``calls``: how the
    denoiser splits the stacked rows into UNet calls (``batch_cond_uncond`` off, long prompts,
    uncond skipped), default one call over all rows. ``params`` receives the infotext.
    """
    x, t, c = inputs if inputs is not None else env.inputs
    split = list(calls) if calls is not None else [x.shape[0]]
    seen: List[Seen] = []

    def sample(*a, **k):
        env.runtime.before_sampling(p)  # the WebUI's process_before_every_sampling
        for step in range(steps):
            with attention_probe(env.unet) as probe:
                for fn in list(env.callbacks):
                    fn(SimpleNamespace(text_cond=_text_cond(c, n_cond, sdxl_style), x=x,
                                       denoiser=SimpleNamespace(step=step, total_steps=steps)))
                outs, start = [], 0
                with torch.no_grad():
                    for rows in split:
                        outs.append(env.model.model(x[start:start + rows], t[start:start + rows], c[start:start + rows]))
                        start += rows
            probe.out = torch.cat(outs)
            seen.append(probe)

    p = new_p(env.model, sample)
    env.runtime.process(p, list(units))
    p.sample()
    if params is not None:
        params.update(p.extra_generation_params)
    return seen


# ---------------------------------------------------------------------------- references


def encode(env, pixels: torch.Tensor) -> torch.Tensor:
    """``image_embeds`` of the tiny encoder, loaded by transformers itself, on prepared pixels."""
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(env.encoder).eval()
    with torch.no_grad():
        return model(pixel_values=pixels).image_embeds


def adapter_modules(env, kind="linear"):
    """``(image_proj, ip_layers)`` of an adapter file, read again from disk."""
    from lib_identity import formats
    from lib_identity.models import load_adapter

    path = env.files[kind]
    return load_adapter(formats.inspect(path), formats.load_tensors(path), device="cpu", dtype=torch.float32)


def prompt_from_encodings(env, cond: torch.Tensor, uncond: torch.Tensor, kind="linear", **fields):
    """The ``ImagePrompt`` a unit should produce: the adapter's projection of these encodings."""
    from lib_identity.unet import ImagePrompt

    image_proj, ip_layers = adapter_modules(env, kind)
    with torch.no_grad():
        return ImagePrompt(cond_tokens=image_proj(cond), uncond_tokens=image_proj(uncond), ip_layers=ip_layers, **fields)


def reference(env, prompts, *, n_cond: Optional[int] = 1, progress: Optional[float] = None, inputs=None):
    """The bare UNet with ``prompts`` installed directly (no WebUI glue), over all rows in one call."""
    from lib_identity.unet import PatchSession

    x, t, c = inputs if inputs is not None else env.inputs
    with torch.no_grad(), PatchSession(env.unet, list(prompts), owner="handoff-reference") as session:
        session.begin_step(n_cond, progress)
        return env.unet(x, t, context=c)
