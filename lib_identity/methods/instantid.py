"""InstantID: faces -> the Image Adapter's ``ImagePrompt`` and IdentityNet's ``Control``.

The official recipe (InstantID ``pipeline_stable_diffusion_xl_instantid.py``, ``infer.py``):

* the face comes from insightface's ``antelopev2`` pack; its *raw* ArcFace embedding (not
  normed) goes through the Resampler of ``ip-adapter.bin``: 16 face tokens;
* the uncond side is the projection of a *zero* embedding; ``uncond_noise`` > 0 puts
  ``noise · U(0, 1)`` there instead, seeded by the embedding (ComfyUI_InstantID's option);
* several pictures: their raw embeddings are averaged (ComfyUI_InstantID's default);
* the face tokens enter every cross-attention as an image prompt (``ip_weight``, the unit's
  start/end) and are IdentityNet's cross-attention context on cond rows, the uncond tokens on
  uncond rows;
* IdentityNet's hint is the five keypoints drawn as ``draw_kps`` draws them, on the picture
  moved into the generation's frame; it is redrawn at every pass size (hires fix). A
  ``pose_image`` gives the keypoints instead: the face its ``pose_face`` picks, and with several
  faces in it (and no mask) that face's region (``pose_faces``: several people in one image);
* IdentityNet's residuals are scaled by ``identitynet_weight`` in its own step window
  (``identitynet_start``/``_end``, the official ``control_guidance_start``/``_end``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import formats
from ..errors import PatchError, UnitError
from ..unet import ImagePrompt
from ..unet.control import Control
from .identitynet_cache import identitynets
from .ip_adapter import _project, adapters

FAMILY = "instantid-adapter"
FACE_PACK = "antelopev2"
IDENTITYNET = "instantid-identitynet"
EMBEDDING_DIM = 512
SDXL_CONTEXT = 2048
NOISE_SEED_MODULUS = 1000000007  # ComfyUI_InstantID seeds the uncond noise with sum(embedding) mod this


@dataclass
class InstantIDContribution:
    """One InstantID unit: ``PatchSession(unet, [c.prompt], controls=[c.control])``.

    ``control`` is ``None`` when the unit runs without IdentityNet (weight 0). ``faces`` are the
    faces used (one per picture), ``pose_face`` the pose picture's when one was given, ``region``
    the unit's region around it (``pose_faces.face_region``) when one was made.
    """

    prompt: ImagePrompt
    control: Optional[Control] = None
    faces: List[Any] = field(default_factory=list)
    pose_face: Any = None
    region: Any = None


def raw_embedding(embeddings, name: str = "unit") -> torch.Tensor:
    """``[1, 512]``: the mean of the pictures' raw ArcFace embeddings (not normed: InstantID reads them raw)."""
    if isinstance(embeddings, (list, tuple)):
        if not embeddings:
            raise PatchError(f"{name}: no face embeddings")
        embeddings = torch.stack([torch.from_numpy(np.array(e, dtype=np.float32)).reshape(-1)
                                  if not isinstance(e, torch.Tensor) else e.reshape(-1) for e in embeddings])
    x = torch.as_tensor(embeddings).detach().to("cpu", torch.float32)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2 or x.shape[-1] != EMBEDDING_DIM:
        raise PatchError(f"{name}: face embeddings must be [faces, {EMBEDDING_DIM}], got {list(x.shape)}")
    if not torch.isfinite(x).all() or (x.norm(dim=-1) == 0).any():
        raise PatchError(f"{name}: a face embedding is zero or not finite; the face analysis failed")
    return x.mean(dim=0, keepdim=True)


def uncond_embedding(embedding: torch.Tensor, noise: float = 0.0) -> torch.Tensor:
    """The uncond embedding: zeros, or ``noise · U(0, 1)`` seeded by the embedding (ComfyUI_InstantID)."""
    if noise <= 0:
        return torch.zeros_like(embedding)
    seed = int(torch.sum(embedding).item()) % NOISE_SEED_MODULUS
    g = torch.Generator().manual_seed(seed)
    return float(noise) * torch.rand(embedding.shape, generator=g, dtype=embedding.dtype)


def instantid_tokens(image_proj: torch.nn.Module, embedding: torch.Tensor, *, uncond_noise: float = 0.0,
                     device=None, dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(cond, uncond)`` face tokens ``[1, 16, 2048]`` from one (averaged) raw embedding."""
    uncond = uncond_embedding(embedding, uncond_noise)
    return (_project(image_proj, embedding, device, dtype), _project(image_proj, uncond, device, dtype))


def keypoint_hint(keypoints, source_size: Tuple[int, int]):
    """``hint(width, height)``: the keypoints of a ``source_size`` picture moved into that frame and
    drawn as the official ``draw_kps`` draws them (``H×W×3`` uint8 RGB)."""
    from ..encoders.faces.keypoints import draw_keypoints, keypoints_in_frame

    kps = np.asarray(keypoints, dtype=np.float32).reshape(5, 2)
    source = (int(source_size[0]), int(source_size[1]))

    def draw(width: int, height: int):
        return draw_keypoints(keypoints_in_frame(kps, source, (width, height)), width, height)

    return draw


def instantid_parts(image_proj: torch.nn.Module, ip_layers, embeddings, *, identitynet=None, keypoints=None,
                    source_size=None, ip_weight: float = 0.8, identitynet_weight: float = 0.8,
                    identitynet_start: float = 0.0, identitynet_end: float = 1.0, uncond_noise: float = 0.0,
                    mask=None, device=None, dtype=None, name: str = "unit", **prompt) -> InstantIDContribution:
    """An InstantID unit from raw face embeddings (one per picture; averaged) and the keypoints of
    the face that sets the pose (found on a picture of ``source_size`` (w, h)).

    ``identitynet``: the loaded IdentityNet (``None``, or ``identitynet_weight`` 0: the Image
    Adapter alone). ``prompt``: the remaining ``ImagePrompt`` fields (start, end, layer_weights).
    """
    embedding = raw_embedding(embeddings, name)
    cond, uncond = instantid_tokens(image_proj, embedding, uncond_noise=uncond_noise, device=device, dtype=dtype)
    if cond.shape[-1] != SDXL_CONTEXT:
        raise PatchError(f"{name}: the InstantID adapter gives {cond.shape[-1]}-wide tokens; InstantID is for SDXL ({SDXL_CONTEXT})")
    image_prompt = ImagePrompt(cond_tokens=cond, uncond_tokens=uncond, ip_layers=ip_layers, weight=ip_weight,
                               mask=mask, combine="concat", name=name, **prompt)
    control = None
    if identitynet is not None and identitynet_weight != 0:
        if keypoints is None or source_size is None:
            raise PatchError(f"{name}: IdentityNet needs the face keypoints and the size of the picture they are on")
        control = Control(module=identitynet, hint=keypoint_hint(keypoints, source_size), cond_context=cond,
                          uncond_context=uncond, weight=identitynet_weight, start=identitynet_start,
                          end=identitynet_end, mask=mask, name=name)
    return InstantIDContribution(prompt=image_prompt, control=control)


def from_pictures(image_proj: torch.nn.Module, ip_layers, images, *, pack_dir, face="largest", pose_image=None,
                  pose_choice="auto", pose_share: Tuple[int, int] = (0, 1), unit_number: Optional[int] = None,
                  name: str = "unit", **parts) -> InstantIDContribution:
    """An InstantID unit from ID pictures: one face each (``face``: "largest", an index or a box),
    averaged raw embeddings; the keypoints of the first picture's face, or of the pose picture's
    face that ``pose_choice`` picks (the unit's ``pose_face``; ``pose_share``: the unit's place
    among the units sharing the pose picture and their count, for "auto"). With several faces in
    the pose picture and no ``mask``, that face's region is the unit's mask."""
    from .faceid import pick_faces

    images = list(images)
    if not images:
        raise PatchError(f"{name}: an InstantID unit needs at least one picture with a face")
    faces = pick_faces(images, pack_dir, face, unit_number=unit_number)
    keypoints, source, pose_face, region = _pose(faces[0].keypoints, images[0].size, pack_dir, pose_image, pose_choice,
                                                 pose_share, unit_number, name, parts)
    contribution = instantid_parts(image_proj, ip_layers, [f.embedding for f in faces], keypoints=keypoints,
                                   source_size=source, name=name, **parts)
    contribution.faces, contribution.pose_face, contribution.region = faces, pose_face, region
    return contribution


def from_profile(image_proj: torch.nn.Module, ip_layers, profile, *, pack_dir, pose_image=None, pose_choice="auto",
                 pose_share: Tuple[int, int] = (0, 1), unit_number: Optional[int] = None, name: str = "unit",
                 **parts) -> InstantIDContribution:
    """An InstantID unit from a saved profile: the raw embeddings its pack found when it was built,
    and the keypoints of its first picture's face (or of the pose picture's face, as ``from_pictures``)."""
    from ..profiles import ProfileError, use

    try:
        found = use.faces(profile, pack_dir, name)
    except ProfileError as e:
        raise UnitError(unit_number, "profile", str(e)) from None
    first_size = tuple(int(v) for v in found.sizes[0].tolist())
    keypoints, source, pose_face, region = _pose(found.keypoints[0].numpy(), first_size, pack_dir, pose_image,
                                                 pose_choice, pose_share, unit_number, name, parts)
    contribution = instantid_parts(image_proj, ip_layers, found.raw, keypoints=keypoints, source_size=source,
                                   name=name, **parts)
    contribution.pose_face, contribution.region = pose_face, region
    return contribution


def _pose(keypoints, source, pack_dir, pose_image, pose_choice, pose_share, unit_number, name, parts):
    """``(keypoints, source size, pose face, region)``: the reference face's, or the pose picture's face
    that ``pose_choice`` picks; with several faces there and no mask, its region becomes ``parts["mask"]``."""
    from ..encoders import faces as face_analysis
    from .pose_faces import face_region, pick_pose_face

    if pose_image is None:
        return keypoints, source, None, None
    found = face_analysis.analyse_faces(pose_image, pack_dir)
    pose_face = pick_pose_face(found, pose_choice, pose_share, unit_number=unit_number)
    region = None
    if len(found) > 1 and parts.get("mask") is None:
        region = parts["mask"] = face_region(pose_face.box, pose_image.size, name=name)
    return pose_face.keypoints, pose_image.size, pose_face, region


def check_unet(unet: torch.nn.Module, number: Optional[int]) -> None:
    """InstantID is SDXL only: say so for an SD1.5 (or any other) UNet."""
    from ..unet import find_cross_attentions

    layers = find_cross_attentions(unet)
    if not layers or layers[0].context_dim != SDXL_CONTEXT:
        width = layers[0].context_dim if layers else "no"
        raise UnitError(number, "model", f"InstantID runs on SDXL checkpoints only; the loaded checkpoint's UNet has "
                        f"{width}-wide cross-attention (SD1.5: 768). Load an SDXL checkpoint")


def unet_home(unet: torch.nn.Module, device) -> torch.device:
    """Where IdentityNet is kept: with the UNet (its weights' device: the CPU under --lowvram/--medvram
    between passes, else the GPU)."""
    first = next(unet.parameters(), None)
    return first.device if first is not None else torch.device(device)


def prepare(resolved, *, device, dtype, unet=None, pose_share: Tuple[int, int] = (0, 1)) -> InstantIDContribution:
    """One validated InstantID unit (``units.ResolvedUnit``) for ``unet`` on ``device``/``dtype``;
    ``pose_share``: its place among the units sharing its pose picture, and their count
    (``pose_faces.pose_shares``)."""
    from .ip_adapter import _layer_weights, _mask_tensor

    unit, entry, number = resolved.unit, resolved.model, resolved.number
    info: formats.ModelInfo = entry.info
    name = f"Identity unit {number}"
    if info.family != FAMILY:
        raise UnitError(number, "model", f"model '{entry.name}' is {info.family}, not an InstantID adapter")
    if unet is None:
        raise PatchError(f"{name}: InstantID needs the loaded UNet (IdentityNet is built from its classes)")
    check_unet(unet, number)
    pack = resolved.encoders.get(f"insightface:{info.face_model or FACE_PACK}")
    if not pack:
        raise UnitError(number, "model", f"{info.variant} needs the insightface '{FACE_PACK}' face models")
    identitynet = None
    if unit.identitynet_weight != 0:
        path = resolved.encoders.get(IDENTITYNET)
        if not path:
            raise UnitError(number, "model", f"{info.variant} needs InstantID's IdentityNet")
        identitynet = identitynets.get(path, unet=unet, device=unet_home(unet, device), dtype=dtype)
    image_proj, ip_layers = adapters.get(info, entry.path)
    knobs = dict(pose_image=unit.pose_image, pose_choice=unit.pose_face, pose_share=pose_share, unit_number=number,
                 name=name, identitynet=identitynet, ip_weight=unit.ip_weight,
                 identitynet_weight=unit.identitynet_weight, identitynet_start=unit.identitynet_start,
                 identitynet_end=unit.identitynet_end, uncond_noise=unit.uncond_noise, mask=_mask_tensor(unit.mask),
                 device=device, dtype=dtype, start=unit.start, end=unit.end, layer_weights=_layer_weights(unit))
    if resolved.profile is not None:
        return from_profile(image_proj, ip_layers, resolved.profile, pack_dir=pack, **knobs)
    return from_pictures(image_proj, ip_layers, list(unit.images), pack_dir=pack, face=unit.face, **knobs)


def release() -> None:
    """Forget loaded IdentityNets (script unload, model switch)."""
    identitynets.clear()


__all__: Sequence[str] = ("FAMILY", "InstantIDContribution", "from_pictures", "from_profile", "instantid_parts", "instantid_tokens",
                          "keypoint_hint", "prepare", "raw_embedding", "release", "uncond_embedding")
