"""Building a profile from pictures: the faces, the outliers left out, then every encoding.

The encodings come from the very functions a unit runs on pictures (``faces.analyse_faces`` and
``pick_face``, ``encoders.encode_images``, FaceID-Plus's ``encode_face_crops``, PhotoMaker's
``id_embeddings``), so a unit gives the same numbers from the profile as from the pictures.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import torch

from ..errors import UnitError
from .outliers import OUTLIER_COSINE, find_outliers
from .profile import FaceSet, PhotoMakerEmbeds, Profile, ProfileError
from .store import check_name

MAX_PICTURES = 50
FACE_CROP_SIZE = 224  # FaceID-Plus's aligned crop for CLIP (methods.faceid.CLIP_CROP_SIZE)


@dataclass
class Sources:
    """What a profile is built with (``sources.gather`` finds them in the model folders).

    ``packs``: pack name -> folder; the first one decides the outliers. ``clip``: encoder id ->
    (encoder path, the outputs the installed adapters read). ``face_clip``: (encoder id, pack) ->
    encoder path, for FaceID-Plus. ``photomaker``: (short hash, discovered model entry, the
    folder of its face pack or None; V2 needs one).
    """

    packs: Dict[str, str] = field(default_factory=dict)
    clip: Dict[str, Tuple[str, Set[str]]] = field(default_factory=dict)
    face_clip: Dict[Tuple[str, str], str] = field(default_factory=dict)
    photomaker: List[Tuple[str, object, Optional[str]]] = field(default_factory=list)

    def empty(self) -> bool:
        return not (self.packs or self.clip or self.face_clip or self.photomaker)


@dataclass
class BuildResult:
    """The built profile and the lines to show the user (left-out pictures, what it holds)."""

    profile: Profile
    messages: List[str]


def _left(i: int, image, why: str) -> dict:
    from ..image_input import image_hash

    return {"picture": i + 1, "hash": image_hash(image), "why": why}


def _faces(images: Sequence, sources: Sources, face, progress) -> Tuple[Dict[str, list], List[dict]]:
    """Per pack, the chosen face of each picture (None where it has none), and the pictures left out."""
    from ..encoders import faces as face_analysis

    chosen: Dict[str, list] = {}
    left: Dict[int, dict] = {}
    for pack, folder in sources.packs.items():
        progress(f"[identity] profile: finding faces with {pack} in {len(images)} picture(s) …")
        row = []
        for i, image in enumerate(images):
            found = face_analysis.analyse_faces(image, folder)
            try:
                row.append(face_analysis.pick_face(found, face, image_label=f"picture {i + 1}"))
            except UnitError as e:
                row.append(None)
                left.setdefault(i, _left(i, image, f"{pack}: {e.reason}"))
        chosen[pack] = row
    return chosen, [left[i] for i in sorted(left)]


def _outliers(images, chosen: Dict[str, list], kept: List[int], sources: Sources) -> Tuple[List[dict], str]:
    if not sources.packs:
        return [], ""
    pack = next(iter(sources.packs))
    normed = np.stack([np.asarray(chosen[pack][i].normed_embedding, dtype=np.float64) for i in kept])
    far, note = find_outliers(normed)
    return [_left(kept[j], images[kept[j]], f"its face is far from the others (cosine {c:.2f} to the median face of "
                                            f"the other pictures, below {OUTLIER_COSINE}; {pack}): another person?")
            for j, c in far], note


def build_profile(name: str, images: Sequence, sources: Sources, *, face="largest", preparation: str = "crop",
                  crop_position: str = "center", device=None,
                  progress: Callable[[str], None] = print) -> BuildResult:
    """A profile named ``name`` from ``images`` (PIL pictures) with ``sources``.

    A picture is left out when a pack finds no face in it (or none that ``face`` picks), or when
    its face is an outlier (``outliers``); the messages say which picture (1-based) and why.
    ``ProfileError`` when no picture is left, there are none or more than ``MAX_PICTURES``, or
    ``sources`` is empty.
    """
    from ..encoders import Preparation

    check_name(name)
    images = list(images)
    if not images:
        raise ProfileError("a profile needs at least one picture")
    if len(images) > MAX_PICTURES:
        raise ProfileError(f"a profile is built from at most {MAX_PICTURES} pictures, got {len(images)}; "
                           "choose the best ones")
    if sources.empty():
        raise ProfileError("nothing in the model folders can use a profile: install an IP-Adapter, FaceID, InstantID "
                           "or PhotoMaker model and what it needs (CLIP image encoder, insightface face models)")
    prep = Preparation(mode=preparation, crop_position=crop_position)
    chosen, left_out = _faces(images, sources, face, progress)
    kept = [i for i in range(len(images)) if all(row[i] is not None for row in chosen.values())]
    far, note = _outliers(images, chosen, kept, sources) if kept else ([], "")
    left_out = sorted(left_out + far, key=lambda d: d["picture"])
    kept = [i for i in kept if i + 1 not in {d["picture"] for d in far}]
    messages = [f"picture {d['picture']} left out: {d['why']}" for d in left_out]
    if note:
        messages.append(note)
    if not kept:
        raise ProfileError("no picture is left to build the profile from: " + "; ".join(messages))
    pictures = [images[i] for i in kept]
    faces = {}
    for pack, row in chosen.items():
        picked = [row[i] for i in kept]
        faces[pack] = FaceSet(
            normed=torch.tensor(np.stack([f.normed_embedding for f in picked]), dtype=torch.float32),
            raw=torch.tensor(np.stack([f.embedding for f in picked]), dtype=torch.float32),
            keypoints=torch.tensor(np.stack([np.asarray(f.keypoints, dtype=np.float32).reshape(5, 2) for f in picked])),
            sizes=torch.tensor([list(images[i].size) for i in kept], dtype=torch.int64))
    clip = _clip(pictures, sources, prep, device, progress)
    face_clip = _face_clip(pictures, kept, chosen, sources, device, progress)
    photomaker = _photomaker(pictures, sources, prep, face, device, progress)
    from ..image_input import image_hash

    profile = Profile(name=name, created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      pictures=tuple(image_hash(p) for p in pictures), left_out=tuple(left_out),
                      face=face, preparation=prep.mode, crop_position=prep.crop_position, faces=faces,
                      clip=clip, face_clip=face_clip, photomaker=photomaker)
    s = profile.summary()
    holds = ", ".join(filter(None, [f"faces ({', '.join(s['packs'])})" if s["packs"] else "",
                                    f"CLIP ({'; '.join(s['encoders'])})" if s["encoders"] else "",
                                    f"PhotoMaker ({', '.join(s['photomaker'])})" if s["photomaker"] else ""]))
    messages.append(f"profile '{name}': {len(pictures)} of {len(images)} picture(s); holds {holds}")
    return BuildResult(profile, messages)


def _clip(pictures, sources: Sources, prep, device, progress) -> Dict[Tuple[str, str], torch.Tensor]:
    from ..encoders import encode_images

    out = {}
    for enc, (path, outputs) in sources.clip.items():
        for output in sorted(outputs):
            progress(f"[identity] profile: encoding {len(pictures)} picture(s) with {enc} ({output}) …")
            cond, _ = encode_images(path, pictures, output, prep, device=device, dtype=torch.float32,
                                    uncond="zero", encoder_id=enc)
            out[(enc, output)] = cond.to("cpu", torch.float32)
    return out


def _face_clip(pictures, kept, chosen, sources: Sources, device, progress) -> Dict[Tuple[str, str], torch.Tensor]:
    from ..encoders import faces as face_analysis
    from ..methods.faceid import encode_face_crops

    out = {}
    for (enc, pack), path in sources.face_clip.items():
        if pack not in chosen:
            continue
        progress(f"[identity] profile: encoding {len(pictures)} aligned face crop(s) with {enc} …")
        crops = [face_analysis.aligned_face(p, chosen[pack][i], FACE_CROP_SIZE) for p, i in zip(pictures, kept)]
        cond, _ = encode_face_crops(crops, path, device=device, dtype=torch.float32, encoder_id=enc)
        out[(enc, pack)] = cond.to("cpu", torch.float32)
    return out


def _photomaker(pictures, sources: Sources, prep, face, device, progress) -> Dict[str, PhotoMakerEmbeds]:
    from ..methods import photomaker as pm

    out = {}
    for short, entry, pack in sources.photomaker:
        info = entry.info
        if info.variant == "photomaker-v2" and not pack:
            continue
        progress(f"[identity] profile: PhotoMaker ID embeddings with {entry.name} …")
        model = pm.models.get(info, entry.path, torch.float32)
        embeds, used = pm.id_embeddings(model, pictures, preparation=prep, pack_dir=pack if info.variant ==
                                        "photomaker-v2" else None, face=face, device=device,
                                        name=f"profile ({entry.name})")
        out[short] = PhotoMakerEmbeds(file=entry.name, variant=info.variant, id_embeds=embeds, used=tuple(used))
    return out


def pack_name(folder: Optional[str]) -> Optional[str]:
    """The name a pack folder is stored under in a profile (its folder's name)."""
    import os

    return os.path.basename(os.path.normpath(str(folder))) if folder else None
