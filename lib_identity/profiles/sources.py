"""What a profile is built with: every encoding that the installed identity models read.

``gather`` reads the discovered models: an IP-Adapter needs its CLIP encoder's output, FaceID
and InstantID their face pack (FaceID-Plus also the CLIP features of the aligned face), and each
PhotoMaker file its own ID embeddings. A helper that is missing leaves its models out, with a
line that says so. ``build`` is the one entry the accordion, the API and the CLI call.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

from ..errors import IdentityError
from .build import BuildResult, Sources, build_profile
from .profile import FACE_CROP_ENCODER, pack_name

OUTLIER_PACK_ORDER = ("buffalo_l", "antelopev2")  # the pack that decides the outliers comes first


def _find(find_encoder: Callable, need: str):
    try:
        return find_encoder(need) or None
    except IdentityError:
        return None


def gather(models: Sequence, find_encoder: Callable) -> Tuple[Sources, List[str]]:
    """``(sources, notes)`` for the usable ``models`` (``discovery.ModelEntry``); ``find_encoder(need)``
    gives a helper's path ("clip-vit-h", "insightface:buffalo_l", …), or None / ``IdentityError``."""
    sources = Sources()
    notes: List[str] = []
    pack_needs, clip_needs, crop_needs = {}, {}, set()
    photomaker = []
    for entry in models:
        info = getattr(entry, "info", None)
        if info is None:
            continue
        if info.family == "ip-adapter" and info.image_encoder and info.encoder_output:
            clip_needs.setdefault(info.image_encoder, set()).add(info.encoder_output)
        elif info.family == "ip-adapter-faceid":
            pack_needs.setdefault(info.face_model or "buffalo_l", []).append(entry.name)
            if info.projection == "faceid-plus":
                crop_needs.add(info.face_model or "buffalo_l")
        elif info.family == "instantid-adapter":
            pack_needs.setdefault(info.face_model or "antelopev2", []).append(entry.name)
        elif info.family == "photomaker":
            photomaker.append(entry)
            if info.variant == "photomaker-v2":
                pack_needs.setdefault(info.face_model or "buffalo_l", []).append(entry.name)
    folders = {}
    for official in sorted(pack_needs, key=lambda p: (OUTLIER_PACK_ORDER + (p,)).index(p)):
        folder = _find(find_encoder, f"insightface:{official}")
        if folder:
            folders[official] = str(folder)
            sources.packs[pack_name(folder)] = str(folder)
        else:
            notes.append(f"no '{official}' face models: not for {', '.join(sorted(set(pack_needs[official])))}")
    for enc, outputs in sorted(clip_needs.items()):
        path = _find(find_encoder, enc)
        if path:
            sources.clip[enc] = (str(path), outputs)
        else:
            notes.append(f"no {enc} image encoder: not for the IP-Adapter models that read it")
    for official in sorted(crop_needs):
        if official not in folders:
            continue
        path = _find(find_encoder, FACE_CROP_ENCODER)
        if path:
            sources.face_clip[(FACE_CROP_ENCODER, pack_name(folders[official]))] = str(path)
        else:
            notes.append(f"no {FACE_CROP_ENCODER} image encoder: not for FaceID-Plus")
    for entry in photomaker:
        pack = folders.get(entry.info.face_model or "buffalo_l") if entry.info.variant == "photomaker-v2" else None
        if entry.info.variant == "photomaker-v2" and not pack:
            continue  # said above with the pack
        sources.photomaker.append((entry.short_hash or entry.name, entry, pack))
    return sources, notes


def build(name: str, images: Sequence, *, models: Sequence, find_encoder: Callable, face="largest",
          preparation: str = "crop", crop_position: str = "center", device=None,
          progress: Callable[[str], None] = print) -> BuildResult:
    """A profile from ``images`` with every encoding the installed ``models`` read (``gather``);
    its messages also say which models it cannot feed and why."""
    sources, notes = gather(models, find_encoder)
    result = build_profile(name, images, sources, face=face, preparation=preparation, crop_position=crop_position,
                           device=device, progress=progress)
    result.messages.extend(notes)
    return result
