"""A unit that uses a profile: what its model needs from it, and whether the profile holds it.

Each getter returns what the method would have computed from the pictures, or raises
``ProfileError`` saying what the profile lacks and what to do (``check`` asks them all up
front, so a unit that cannot run stops before the generation starts).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .profile import FACE_CROP_ENCODER, FaceSet, PhotoMakerEmbeds, Profile, ProfileError, pack_name

_REBUILD = "build the profile again now that it is installed (the build encodes for every model it finds)"


def _holds(profile: Profile) -> str:
    s = profile.summary()
    parts = [f"faces by {', '.join(s['packs'])}" if s["packs"] else "no faces",
             f"CLIP {', '.join(s['encoders'])}" if s["encoders"] else "no CLIP encodings"]
    if s["photomaker"]:
        parts.append(f"PhotoMaker {', '.join(s['photomaker'])}")
    return "; ".join(parts)


def faces(profile: Profile, pack_folder, who: str) -> FaceSet:
    """The faces the profile found with the pack in ``pack_folder`` (the one ``who`` runs with)."""
    name = pack_name(pack_folder)
    found = profile.faces.get(name)
    if found is None:
        raise ProfileError(f"profile '{profile.name}' has no faces found by the '{name}' face models, which {who} "
                           f"uses (it holds {_holds(profile)}); {_REBUILD}")
    return found


def clip(profile: Profile, encoder_id: str, output: str, preparation: str, crop_position: str, who: str) -> torch.Tensor:
    """The pictures' CLIP encodings ``[n, ...]`` by ``encoder_id`` (``output``), fitted as the unit asks."""
    found = profile.clip.get((encoder_id, output))
    if found is None:
        raise ProfileError(f"profile '{profile.name}' has no {encoder_id} encodings ({output}), which {who} reads "
                           f"(it holds {_holds(profile)}); {_REBUILD}")
    check_fit(profile, preparation, crop_position)
    return found


def check_fit(profile: Profile, preparation: str, crop_position: str) -> None:
    """The unit must fit pictures as the profile's encodings were fitted."""
    same = preparation == profile.preparation and (preparation != "crop" or crop_position == profile.crop_position)
    if not same:
        asked = preparation + (f" ({crop_position})" if preparation == "crop" else "")
        raise ProfileError(f"profile '{profile.name}' holds its pictures fitted to the encoder by {profile.fit_text()}, "
                           f"and the unit asks for {asked}; set the unit's fit to {profile.fit_text()}, or build the "
                           "profile again with that fit")


def face_crops(profile: Profile, pack_folder, who: str) -> torch.Tensor:
    """FaceID-Plus: CLIP ViT-H features of the aligned face crops ``[n, S, E]``."""
    name = pack_name(pack_folder)
    found = profile.face_clip.get((FACE_CROP_ENCODER, name))
    if found is None:
        raise ProfileError(f"profile '{profile.name}' has no {FACE_CROP_ENCODER} features of the face crops "
                           f"found by '{name}', which {who} reads (it holds {_holds(profile)}); {_REBUILD}")
    return found


def photomaker(profile: Profile, short_hash: str, model_name: str, who: str) -> PhotoMakerEmbeds:
    """The ID embeddings of the PhotoMaker file with ``short_hash``."""
    found = profile.photomaker.get(short_hash)
    if found is None:
        raise ProfileError(f"profile '{profile.name}' was built without the PhotoMaker file '{model_name} [{short_hash}]' "
                           f"that {who} uses (it holds {_holds(profile)}); {_REBUILD}")
    return found


def image_weights(profile: Profile, weights, combine: str) -> Optional[Tuple[float, ...]]:
    """The unit's weights for the profile's pictures (one each when it gave none)."""
    n = len(profile.pictures)
    if not weights:
        return (1.0,) * n
    if len(weights) != n:
        if combine == "weighted average":
            raise ProfileError(f"profile '{profile.name}' holds {n} picture(s) and the unit gives {len(weights)} "
                               "image weight(s); give one per picture of the profile")
        return (1.0,) * n
    return tuple(weights)


def check_face(profile: Profile, face) -> None:
    """The face is chosen when the profile is built; a unit that names another one would get the built one."""
    if str(face) not in ("largest", str(profile.face)):
        raise ProfileError(f"profile '{profile.name}' holds face {profile.face} of each picture (chosen when it was "
                           f"built), and the unit asks for face {face}; set the unit's face to largest or "
                           f"{profile.face}, or build the profile again with face {face}")


def check(profile: Profile, entry, encoders: dict, unit) -> None:
    """Raise ``ProfileError`` when ``profile`` lacks what ``entry``'s model needs for ``unit``.

    ``encoders``: the unit's helpers as ``validate_for_run`` found them (requirement id -> path).
    """
    info = entry.info
    who = f"'{entry.name}'"

    def pack():
        return next((v for k, v in encoders.items() if k.startswith("insightface:")), None)

    if info.family == "ip-adapter":
        clip(profile, info.image_encoder, info.encoder_output, unit.preparation, unit.crop_position, who)
    elif info.family in ("ip-adapter-faceid", "instantid-adapter"):
        faces(profile, pack(), who)
        check_face(profile, unit.face)
        if info.projection == "faceid-plus":
            face_crops(profile, pack(), who)
    elif info.family == "photomaker":
        if info.variant == "photomaker-v2":
            faces(profile, pack(), who)
            check_face(profile, unit.face)
        photomaker(profile, entry.short_hash or entry.name, entry.name, who)
        check_fit(profile, unit.preparation, unit.crop_position)
    image_weights(profile, unit.image_weights, unit.combine)
