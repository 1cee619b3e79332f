"""IP-Adapter from Python: an adapter file and reference pictures applied to a loaded UNet.

For another extension or a script (README, "Using the UNet patch from Python")::

    from lib_identity import api

    adapter = api.load_ip_adapter("models/ControlNet/ip-adapter_sd15.safetensors", device="cuda",
                                  dtype=torch.float16)
    prompt = api.image_prompt(adapter, [picture], encoder="models/clip_vision/clip_vision_vit-h.safetensors",
                              weight=0.8, end=0.8)
    with api.apply(unet, [prompt]) as session:      # unet: shared.sd_model.model.diffusion_model
        ...                                         # per denoiser step: session.begin_step(n_cond, progress)

This covers the IP-Adapters fed by CLIP vision. FaceID (plain, Plus, Plus v2, portrait) takes
face embeddings from any face analysis (insightface's ``normed_embedding`` or the raw one)::

    faceid = api.load_faceid("models/ControlNet/ip-adapter-faceid-plusv2_sd15.bin", device="cuda",
                             dtype=torch.float16)
    unit = api.faceid_prompt(faceid, [face.embedding], face_crops=[crop_224],   # crops: Plus only
                             clip_encoder="models/clip_vision/clip_vision_vit-h.safetensors",
                             s_scale=1.0, lora_weight=1.0, weight=0.8)
    with api.apply(unet, [unit]) as session:        # the image tokens and the file's LoRA
        ...

InstantID needs its own method. The pieces are ``formats`` (what the file is),
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
from .unet import DEFAULT_OWNER, AttentionLoRA, ImagePrompt, PatchSession


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


def load_faceid(path, device="cpu", dtype: torch.dtype = torch.float32) -> IPAdapterModel:
    """Read and check an IP-Adapter FaceID file (``.bin`` or ``.safetensors``), its LoRA included.

    Raises ``CheckpointError`` for a file that is not a complete adapter, ``PatchError`` for one
    that is not FaceID.
    """
    from .methods import faceid
    from .models import load_adapter

    path = str(path)
    info = formats.inspect(path)
    if not faceid.is_faceid(info):
        raise PatchError(f"{path}: {info.variant} is not an IP-Adapter FaceID model; load it with load_ip_adapter")
    image_proj, ip_layers = load_adapter(info, formats.load_tensors(path), device=device, dtype=dtype)
    return IPAdapterModel(info=info, image_proj=image_proj, ip_layers=ip_layers, path=path)


def faceid_prompt(adapter: IPAdapterModel, embeddings, *, face_crops=None, clip_encoder=None, s_scale: float = 1.0,
                  lora_weight: float = 1.0, combine: str = "concat", reference_weights: Optional[Sequence[float]] = None,
                  weight: float = 1.0, start: float = 0.0, end: float = 1.0, layer_weights=None,
                  composition_weight: float = 1.0, mask=None, encoder_device=None, encoder_dtype=None,
                  name: str = "unit"):
    """One FaceID unit (a ``methods.faceid.FaceIDContribution``: ``.prompt`` and ``.lora``) for ``api.apply``.

    ``embeddings``: one ArcFace embedding (512) per picture, raw or normed (normed here, as
    officially). Plus / Plus v2 also need ``face_crops`` (the faces aligned at 224 with
    insightface's ``norm_crop``, RGB) and the CLIP ViT-H ``clip_encoder``; ``s_scale`` is v2's
    shortcut scale. ``lora_weight`` scales the file's LoRA (0: off); it acts at every step,
    ``start``/``end`` apply to the image tokens. Portrait files lay every picture's face side by
    side; the others follow ``combine``. The other arguments are ``ImagePrompt``'s.
    """
    from .methods import faceid

    first = next(adapter.image_proj.parameters())
    device, dtype = encoder_device or first.device, encoder_dtype or first.dtype
    clip_hidden = uncond_clip = None
    if faceid.is_plus(adapter.info):
        if face_crops is None or clip_encoder is None:
            raise PatchError(f"{name}: {adapter.info.variant} needs face_crops (aligned at 224) and the CLIP ViT-H clip_encoder")
        encoder_id = faceid.CLIP_ENCODER if isinstance(clip_encoder, (str, bytes)) or hasattr(clip_encoder, "__fspath__") else None
        clip_hidden, uncond_clip = faceid.encode_face_crops(face_crops, clip_encoder, device=device, dtype=dtype,
                                                            encoder_id=encoder_id)
    return faceid.faceid_prompt(
        adapter.info, adapter.image_proj, adapter.ip_layers, embeddings, clip_hidden=clip_hidden,
        uncond_clip_hidden=uncond_clip, s_scale=s_scale, lora_weight=lora_weight, combine=combine,
        reference_weights=reference_weights, device=device, dtype=dtype, name=name, weight=weight, start=start,
        end=end, layer_weights=layer_weights, composition_weight=composition_weight, mask=mask,
    )


def apply(unet: torch.nn.Module, prompts: Sequence[Any], *, loras: Sequence[AttentionLoRA] = (),
          owner: str = DEFAULT_OWNER, track_calls: bool = True) -> PatchSession:
    """Install ``prompts`` on ``unet`` for one sampling pass; returns the installed ``PatchSession``.

    ``prompts``: ``ImagePrompt``s and FaceID units (``faceid_prompt``), whose LoRA joins ``loras``.
    Use it as a context manager (``with api.apply(unet, prompts) as session:``) or call
    ``session.remove()``; a session of the same ``owner`` still installed from an earlier run is
    removed first.
    """
    image_prompts, all_loras = [], list(loras)
    for item in prompts:
        if isinstance(item, ImagePrompt):
            image_prompts.append(item)
        else:  # a FaceID unit: its image prompt and its LoRA (None for portrait)
            image_prompts.append(item.prompt)
            if item.lora is not None:
                all_loras.append(item.lora)
    return PatchSession(unet, image_prompts, owner=owner, track_calls=track_calls, loras=all_loras).install()
