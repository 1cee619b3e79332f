"""IP-Adapter from Python: an adapter file and reference pictures applied to a loaded UNet.

For another extension or a script (README, "Using the UNet patch from Python")::

    from lib_identity import api

    adapter = api.load_ip_adapter("models/ControlNet/ip-adapter_sd15.safetensors", device="cuda",
                                  dtype=torch.float16)
    prompt = api.image_prompt(adapter, [picture], encoder="models/clip_vision/clip_vision_vit-h.safetensors",
                              weight=0.8, end=0.8)
    with api.apply(unet, [prompt]) as session:      # unet: shared.sd_model.model.diffusion_model
        ...                                         # per denoiser step: session.begin_step(n_cond, progress)

This covers the IP-Adapters fed by CLIP vision (every official variant but FaceID and
InstantID, which need face encodings). The pieces are ``formats`` (what the file is),
``models`` (its projection and key/value layers), ``encoders`` (the pictures) and ``unet`` (the
patch); each can be used on its own.

Several reference pictures: ``concat`` projects each picture and puts the tokens side by side
(as diffusers and ComfyUI_IPAdapter_plus do); ``average`` and ``weighted average`` combine the
encoder outputs *before* the projection, as ComfyUI_IPAdapter_plus's ``combine_embeds`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from . import formats
from .errors import PatchError
from .formats import ModelInfo
from .unet import DEFAULT_OWNER, ImagePrompt, PatchSession
from .unet.references import combine_references, normalise_mode


@dataclass
class IPAdapterModel:
    """A loaded adapter: what the file is, its image projection and its key/value layers."""

    info: ModelInfo
    image_proj: torch.nn.Module
    ip_layers: Any
    path: str


def load_ip_adapter(path, device="cpu", dtype: torch.dtype = torch.float32) -> IPAdapterModel:
    """Read and check an IP-Adapter file (``.safetensors`` or ``.bin``) onto ``device`` in ``dtype``.

    Raises ``CheckpointError`` for a file that is not a complete adapter, ``PatchError`` for
    an adapter that is not fed by CLIP vision (FaceID, InstantID).
    """
    from .models import load_adapter

    path = str(path)
    info = formats.inspect(path)
    if info.family != "ip-adapter":
        raise PatchError(
            f"{path}: {info.variant} is not an IP-Adapter fed by CLIP vision (it needs {info.image_encoder}); "
            "load FaceID and InstantID through their own methods"
        )
    image_proj, ip_layers = load_adapter(info, formats.load_tensors(path), device=device, dtype=dtype)
    return IPAdapterModel(info=info, image_proj=image_proj, ip_layers=ip_layers, path=path)


def _projection_target(module: torch.nn.Module):
    p = next(module.parameters())
    return p.device, p.dtype


def image_prompt(adapter: IPAdapterModel, images, encoder, *, weight: float = 1.0, start: float = 0.0,
                 end: float = 1.0, layer_weights=None, composition_weight: float = 1.0, mask=None,
                 combine: str = "concat", reference_weights: Optional[Sequence[float]] = None,
                 uncond="zero", preparation=None, encoder_device=None, encoder_dtype=None,
                 name: str = "unit") -> ImagePrompt:
    """One unit's ``ImagePrompt`` from reference ``images`` (PIL images or HxWx3 uint8 arrays).

    ``encoder``: the CLIP vision encoder the adapter was trained with (a file or folder, or a
    loaded ``CLIPVisionModelWithProjection``); encodings are cached by picture content.
    ``uncond``: ``"zero"`` (official), ``"noise"`` or a negative picture. ``preparation``: a
    ``lib_identity.encoders.Preparation`` (crop, pad or squash). The other arguments are
    ``ImagePrompt``'s.
    """
    from .encoders import DEFAULT_PREPARATION, encode_images

    mode = normalise_mode(combine, name)
    encoder_id = adapter.info.image_encoder if isinstance(encoder, (str, bytes)) or hasattr(encoder, "__fspath__") else None
    cond, negative = encode_images(
        encoder, images, output=adapter.info.encoder_output, prep=preparation or DEFAULT_PREPARATION,
        device=encoder_device, dtype=encoder_dtype, uncond=uncond, encoder_id=encoder_id,
    )
    if mode != "concat" and cond.shape[0] > 1:
        # average the encodings, then project once (ComfyUI_IPAdapter_plus's combine_embeds)
        cond = combine_references(cond, mode, reference_weights, unit_name=name, tokens=False)
        negative = combine_references(negative, mode, reference_weights, unit_name=name, tokens=False)
    device, dtype = _projection_target(adapter.image_proj)
    with torch.no_grad():
        cond_tokens = adapter.image_proj(cond.to(device=device, dtype=dtype))
        uncond_tokens = adapter.image_proj(negative.to(device=device, dtype=dtype))
    return ImagePrompt(
        cond_tokens=cond_tokens, uncond_tokens=uncond_tokens, ip_layers=adapter.ip_layers, weight=weight,
        start=start, end=end, layer_weights=layer_weights, composition_weight=composition_weight, mask=mask,
        combine="concat", name=name,
    )


def apply(unet: torch.nn.Module, prompts: Sequence[ImagePrompt], *, owner: str = DEFAULT_OWNER,
          track_calls: bool = True) -> PatchSession:
    """Install ``prompts`` on ``unet`` for one sampling pass; returns the installed ``PatchSession``.

    Use it as a context manager (``with api.apply(unet, prompts) as session:``) or call
    ``session.remove()``; a session of the same ``owner`` still installed from an earlier run is
    removed first.
    """
    return PatchSession(unet, prompts, owner=owner, track_calls=track_calls).install()
