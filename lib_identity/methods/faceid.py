"""IP-Adapter FaceID: faces -> the ``ImagePrompt`` and the LoRA the UNet patch session installs.

The official math (tencent-ailab/IP-Adapter ``ip_adapter_faceid.py``, ``..._separate.py``):

* the tokens come from the *normed* ArcFace embedding (buffalo_l), whatever the caller passes
  is normed again here (norming a normed embedding changes nothing);
* uncond tokens are the projection of a *zero* embedding;
* FaceID-Plus (v1, v2) also reads CLIP ViT-H ``hidden_states[-2]`` of the face aligned at 224
  (``norm_crop(img, kps, 224)``); its uncond side is the encoder run on zero pixels *after*
  normalisation (``torch.zeros_like(pixel_values)``), with the zero embedding;
* Plus v2 adds the shortcut: ``tokens + s_scale · refined`` (the file decides v1/v2,
  ``formats``: the name), for cond and uncond alike;
* portrait: every picture's face gives 16 tokens, laid side by side (``[n, 16, C] -> [1, 16n, C]``);
* the file's LoRA acts on every attention projection with ``lora_weight`` (``unet.lora``), for
  the whole pass, as in the official pipelines: the unit's start/end window is the image
  tokens' only.

The crop given to CLIP is RGB, the picture's own colours (``faces.aligned_face``). The official
README feeds ``cv2.imread``'s BGR crop to ``CLIPImageProcessor``, which reads it as RGB; that
swap is an accident of the demo script, not something the model needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .. import formats
from ..errors import PatchError, UnitError
from ..unet import ImagePrompt
from ..unet.lora import AttentionLoRA, lora_of
from ..unet.references import combine_references, normalise_mode
from .ip_adapter import _project, adapters

FAMILY = "ip-adapter-faceid"
CLIP_CROP_SIZE = 224  # FaceID-Plus's aligned face for CLIP ViT-H (official norm_crop size)
CLIP_OUTPUT = "hidden_states[-2]"
CLIP_ENCODER = "clip-vit-h"
FACE_PACK = "buffalo_l"


@dataclass
class FaceIDContribution:
    """One FaceID unit, ready for ``PatchSession(unet, [c.prompt], loras=[c.lora])``.

    ``lora`` is ``None`` for files without one (portrait). ``faces`` are the faces used, one per
    picture, when they were found here (``from_pictures``), for infotext and previews.
    """

    prompt: ImagePrompt
    lora: Optional[AttentionLoRA] = None
    faces: List[Any] = field(default_factory=list)


def is_faceid(info: formats.ModelInfo) -> bool:
    return info.family == FAMILY


def is_plus(info: formats.ModelInfo) -> bool:
    """FaceID-Plus v1/v2: the projection also reads CLIP features of the aligned face."""
    return info.projection == "faceid-plus"


def is_portrait(info: formats.ModelInfo) -> bool:
    """Portrait files: several pictures, each face's tokens side by side."""
    return "portrait" in info.variant


def _check_family(info: formats.ModelInfo, name: str) -> None:
    if not is_faceid(info):
        raise PatchError(f"{name}: {info.variant} is not an IP-Adapter FaceID model")
    if info.projection not in ("faceid-mlp", "faceid-plus"):
        # portrait-unnorm (cubiq) reads the raw embedding through a Resampler: not an official file
        raise PatchError(f"{name}: {info.variant} is not supported (official FaceID, Plus, Plus v2 and portrait files are)")


def normed_embeddings(embeddings, width: int = 512, name: str = "unit") -> torch.Tensor:
    """``[n, width]`` float32 L2-normed embeddings from a tensor, an array or a list of them."""
    if isinstance(embeddings, (list, tuple)):
        if not embeddings:
            raise PatchError(f"{name}: no face embeddings")
        embeddings = torch.stack([torch.as_tensor(np.asarray(e) if not isinstance(e, torch.Tensor) else e).reshape(-1)
                                  for e in embeddings])
    x = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[-1] != width:
        raise PatchError(f"{name}: face embeddings must be [faces, {width}], got {list(x.shape)}")
    if not torch.isfinite(x).all() or (x.norm(dim=-1) == 0).any():
        raise PatchError(f"{name}: a face embedding is zero or not finite; the face analysis failed")
    return F.normalize(x, dim=-1)


def faceid_tokens(info: formats.ModelInfo, image_proj: torch.nn.Module, embeddings: torch.Tensor, *,
                  clip_hidden: Optional[torch.Tensor] = None, uncond_clip_hidden: Optional[torch.Tensor] = None,
                  s_scale: float = 1.0, device=None, dtype=None, name: str = "unit"):
    """``(cond, uncond)`` tokens ``[n, T, C]`` for ``n`` faces (embeddings already normed).

    Plus: ``clip_hidden [n, S, E]`` of the aligned crops and ``uncond_clip_hidden`` (``[1 or n, S, E]``,
    the encoder on zero pixels) are required; ``s_scale`` matters only for v2 (shortcut).
    """
    zero = torch.zeros_like(embeddings)
    if not is_plus(info):
        return (_project(image_proj, embeddings, device, dtype),
                _project(image_proj, zero, device, dtype))
    if clip_hidden is None or uncond_clip_hidden is None:
        raise PatchError(f"{name}: {info.variant} needs the CLIP ViT-H features of the aligned face crop")
    if clip_hidden.dim() != 3 or clip_hidden.shape[0] != embeddings.shape[0]:
        raise PatchError(f"{name}: CLIP features {list(clip_hidden.shape)} for {embeddings.shape[0]} faces")
    uncond_clip = uncond_clip_hidden
    if uncond_clip.dim() == 2:
        uncond_clip = uncond_clip[None]
    if uncond_clip.shape[0] != clip_hidden.shape[0]:
        # one row per picture, all the encoder on zero pixels: after an average there is one face left
        uncond_clip = uncond_clip[:1]
    uncond_clip = uncond_clip.expand(clip_hidden.shape[0], -1, -1)
    scale = float(s_scale)
    return (_project(image_proj, embeddings, device, dtype, clip_hidden, scale=scale),
            _project(image_proj, zero, device, dtype, uncond_clip, scale=scale))


def faceid_prompt(info: formats.ModelInfo, image_proj: torch.nn.Module, ip_layers, embeddings, *,
                  clip_hidden: Optional[torch.Tensor] = None, uncond_clip_hidden: Optional[torch.Tensor] = None,
                  s_scale: float = 1.0, lora_weight: float = 1.0, combine: str = "concat",
                  reference_weights: Optional[Sequence[float]] = None, device=None, dtype=None,
                  name: str = "unit", **prompt) -> FaceIDContribution:
    """A FaceID unit from face embeddings (one per picture; raw or normed, normed here).

    ``combine`` (several pictures, not portrait): ``concat`` projects each face and lays the tokens
    side by side; ``average`` / ``weighted average`` combine the normed embeddings (and the CLIP
    features) before the projection. Portrait always lays its faces side by side: that is what
    the model was trained on. ``prompt``: the remaining ``ImagePrompt`` fields (weight, start,
    end, layer_weights, mask, …). Tokens are made on ``device``/``dtype`` (the UNet's).
    """
    _check_family(info, name)
    emb = normed_embeddings(embeddings, int(info.params.get("id_embeddings_dim", 512)), name)
    mode = "concat" if is_portrait(info) else normalise_mode(combine, name)
    if mode != "concat" and emb.shape[0] > 1:
        emb = combine_references(emb, mode, reference_weights, unit_name=name, tokens=False)
        if clip_hidden is not None and clip_hidden.shape[0] > 1:
            clip_hidden = combine_references(clip_hidden, mode, reference_weights, unit_name=name, tokens=False)
    cond, uncond = faceid_tokens(info, image_proj, emb, clip_hidden=clip_hidden, uncond_clip_hidden=uncond_clip_hidden,
                                 s_scale=s_scale, device=device, dtype=dtype, name=name)
    if cond.shape[0] > 1:  # one face per picture, side by side: [n, T, C] -> [1, n·T, C]
        cond = combine_references(cond, "concat", unit_name=name)
        uncond = combine_references(uncond, "concat", unit_name=name)
    lora = lora_of(ip_layers, float(lora_weight), name) if info.lora else None
    if info.lora and lora is None:
        raise PatchError(f"{name}: {info.variant} carries a LoRA, but the loaded layers have none; load it with models.load_adapter")
    return FaceIDContribution(
        prompt=ImagePrompt(cond_tokens=cond, uncond_tokens=uncond, ip_layers=ip_layers, combine="concat",
                           name=name, **prompt),
        lora=lora,
    )


def encode_face_crops(crops, clip_encoder, *, device=None, dtype=None, encoder_id: Optional[str] = CLIP_ENCODER):
    """CLIP ``hidden_states[-2]`` of the aligned crops ``[n, S, E]`` and of zero pixels ``[n, S, E]`` (cached)."""
    from ..encoders import DEFAULT_PREPARATION, encode_images

    # a 224 square crop is left as it is by the default preparation (shortest side to 224, centre)
    return encode_images(clip_encoder, list(crops), CLIP_OUTPUT, DEFAULT_PREPARATION, device=device, dtype=dtype,
                         uncond="zero", encoder_id=encoder_id)


def pick_faces(images, pack_dir, face="largest", *, unit_number: Optional[int] = None, det_size: int = 640) -> list:
    """One face per picture (``faces.analyse_faces`` + ``faces.pick_face``); errors name the unit and picture."""
    from ..encoders import faces as face_analysis

    chosen = []
    for i, image in enumerate(images):
        found = face_analysis.analyse_faces(image, pack_dir, det_size=det_size)
        chosen.append(face_analysis.pick_face(found, face, unit_number=unit_number,
                                              image_label=f"reference image {i + 1}"))
    return chosen


def from_pictures(info: formats.ModelInfo, image_proj: torch.nn.Module, ip_layers, images, *, pack_dir,
                  face="largest", clip_encoder=None, clip_encoder_id: Optional[str] = CLIP_ENCODER,
                  s_scale: float = 1.0, lora_weight: float = 1.0, device=None, dtype=None,
                  unit_number: Optional[int] = None, name: str = "unit", **prompt) -> FaceIDContribution:
    """A FaceID unit from reference pictures: one face each (``face``: "largest", an index or a box),
    its normed embedding, and for Plus the CLIP features of its aligned 224 crop."""
    from ..encoders import faces as face_analysis

    images = list(images)
    if not images:
        raise PatchError(f"{name}: a FaceID unit needs at least one reference picture with a face")
    faces = pick_faces(images, pack_dir, face, unit_number=unit_number)
    clip_hidden = uncond_clip = None
    if is_plus(info):
        if clip_encoder is None:
            raise PatchError(f"{name}: {info.variant} needs the CLIP ViT-H image encoder as well as the face models")
        crops = [face_analysis.aligned_face(img, f, CLIP_CROP_SIZE) for img, f in zip(images, faces)]
        clip_hidden, uncond_clip = encode_face_crops(crops, clip_encoder, device=device, dtype=dtype,
                                                     encoder_id=clip_encoder_id)
    contribution = faceid_prompt(
        info, image_proj, ip_layers, [torch.tensor(np.asarray(f.embedding, dtype=np.float32)) for f in faces],
        clip_hidden=clip_hidden, uncond_clip_hidden=uncond_clip, s_scale=s_scale, lora_weight=lora_weight,
        device=device, dtype=dtype, name=name, **prompt,
    )
    contribution.faces = faces
    return contribution


def prepare(resolved, *, device, dtype, pack_dir=None) -> FaceIDContribution:
    """One validated FaceID unit (``units.ResolvedUnit``) for a UNet on ``device``/``dtype``.

    Every knob comes from the unit (weight, window, layers, mask, combine, face, s_scale,
    lora_weight). The face pack is ``resolved.encoders["insightface:buffalo_l"]`` unless
    ``pack_dir`` is given.
    """
    from .ip_adapter import _layer_weights, _mask_tensor

    unit, entry, number = resolved.unit, resolved.model, resolved.number
    info = entry.info
    name = f"Identity unit {number}"
    if not is_faceid(info):
        raise UnitError(number, "model", f"model '{entry.name}' is {info.family}, not an IP-Adapter FaceID model")
    pack = pack_dir or resolved.encoders.get(f"insightface:{info.face_model or FACE_PACK}")
    if not pack:
        raise UnitError(number, "model", f"{info.variant} needs the insightface '{info.face_model or FACE_PACK}' face models")
    image_proj, ip_layers = adapters.get(info, entry.path)
    clip_encoder = resolved.encoders.get(CLIP_ENCODER) if is_plus(info) else None
    knobs = dict(s_scale=unit.s_scale, lora_weight=unit.lora_weight, device=device, dtype=dtype, name=name,
                 combine=unit.combine, reference_weights=unit.image_weights,
                 weight=unit.weight, start=unit.start, end=unit.end, layer_weights=_layer_weights(unit),
                 mask=_mask_tensor(unit.mask))
    if resolved.profile is not None:
        return from_profile(info, image_proj, ip_layers, resolved.profile, pack_dir=pack, clip_encoder=clip_encoder,
                            unit_number=number, **knobs)
    return from_pictures(info, image_proj, ip_layers, list(unit.images), pack_dir=pack, face=unit.face,
                         clip_encoder=clip_encoder, unit_number=number, **knobs)


def from_profile(info: formats.ModelInfo, image_proj: torch.nn.Module, ip_layers, profile, *, pack_dir,
                 clip_encoder=None, clip_encoder_id: Optional[str] = CLIP_ENCODER, device=None, dtype=None,
                 unit_number: Optional[int] = None, name: str = "unit", **knobs) -> FaceIDContribution:
    """A FaceID unit from a saved profile: the faces its pack found when it was built (and for Plus
    the CLIP features of their aligned crops); the same numbers ``from_pictures`` computes."""
    from ..encoders import DEFAULT_PREPARATION, encode_uncond
    from ..profiles import use
    from ..profiles.profile import ProfileError

    who = f"{info.variant} ({name})"
    try:
        found = use.faces(profile, pack_dir, who)
        crops = use.face_crops(profile, pack_dir, who) if is_plus(info) else None
    except ProfileError as e:
        raise UnitError(unit_number, "profile", str(e)) from None
    clip_hidden = uncond_clip = None
    if crops is not None:
        if clip_encoder is None:
            raise PatchError(f"{name}: {info.variant} needs the CLIP ViT-H image encoder as well as the face models")
        clip_hidden = crops.to(device=device, dtype=dtype)
        uncond_clip = encode_uncond(clip_encoder, crops.shape[0], CLIP_OUTPUT, DEFAULT_PREPARATION, device=device,
                                    dtype=dtype, uncond="zero", encoder_id=clip_encoder_id)
    # the raw embeddings, normed here as for pictures: the same numbers to the last bit
    return faceid_prompt(info, image_proj, ip_layers, found.raw, clip_hidden=clip_hidden, uncond_clip_hidden=uncond_clip,
                         device=device, dtype=dtype, name=name, **knobs)
