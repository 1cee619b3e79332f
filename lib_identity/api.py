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


def image_prompt(adapter: IPAdapterModel, images, encoder, *, weight: float = 1.0, start: float = 0.0,
                 end: float = 1.0, layer_weights=None, composition_weight: float = 1.0, mask=None,
                 combine: str = "concat", reference_weights: Optional[Sequence[float]] = None,
                 uncond="zero", preparation=None, encoder_device=None, encoder_dtype=None,
                 name: str = "unit") -> ImagePrompt:
    """One unit's ``ImagePrompt`` from reference ``images`` (PIL images or HxWx3 uint8 arrays).

    ``encoder``: the CLIP vision encoder the adapter was trained with (a file or folder, or a
    loaded ``CLIPVisionModelWithProjection``); encodings are cached by picture content.
    ``uncond``: ``"zero"`` (official), ``"noise"`` or a negative picture. ``preparation``: a
    ``lib_identity.encoders.Preparation`` (crop, pad or squash). The image tokens are made on the
    adapter's device and dtype. The other arguments are ``ImagePrompt``'s.
    """
    from .methods.ip_adapter import image_prompt as make_prompt

    first = next(adapter.image_proj.parameters())
    encoder_id = adapter.info.image_encoder if isinstance(encoder, (str, bytes)) or hasattr(encoder, "__fspath__") else None
    return make_prompt(
        adapter.info, adapter.image_proj, adapter.ip_layers, images, encoder,
        device=encoder_device or first.device, dtype=encoder_dtype or first.dtype, preparation=preparation,
        uncond=uncond, combine=combine, reference_weights=reference_weights, name=name, encoder_id=encoder_id,
        weight=weight, start=start, end=end, layer_weights=layer_weights, composition_weight=composition_weight,
        mask=mask,
    )


def apply(unet: torch.nn.Module, prompts: Sequence[ImagePrompt], *, owner: str = DEFAULT_OWNER,
          track_calls: bool = True) -> PatchSession:
    """Install ``prompts`` on ``unet`` for one sampling pass; returns the installed ``PatchSession``.

    Use it as a context manager (``with api.apply(unet, prompts) as session:``) or call
    ``session.remove()``; a session of the same ``owner`` still installed from an earlier run is
    removed first.
    """
    return PatchSession(unet, prompts, owner=owner, track_calls=track_calls).install()
