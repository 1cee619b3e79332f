"""The ``Profile``: what a saved identity holds, and its layout in a ``.safetensors`` file.

A profile keeps the encodings of the pictures it was built from, never the pictures:

* per face pack (by the pack folder's name): the chosen face of each picture, its ArcFace
  embedding raw and normed, its five keypoints and the picture's size (InstantID draws the
  keypoints of the first picture when no pose picture is given);
* per CLIP vision encoder and output the adapters read (``image_embeds``, ``hidden_states[-2]``):
  the encodings of the whole pictures, fitted as the profile says (``preparation``);
* per CLIP encoder and pack, FaceID-Plus's features of the aligned face crop;
* per PhotoMaker file (by its short hash): the ID embeddings, before the fuse with the prompt.

Tensors are float32 so that a unit gives the same numbers from its profile as from the
pictures; the file's ``__metadata__`` holds one JSON document with the rest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..errors import IdentityError

FORMAT = "sd-webui-identity profile"
FORMAT_VERSION = 1


class ProfileError(IdentityError):
    """A profile that cannot be built, read or used; the message says which and what to do."""


class ProfileExistsError(ProfileError):
    """A profile of that name exists and overwriting it was not asked for."""


class ProfileNotFoundError(ProfileError):
    """No profile of that name in the profile folder."""


@dataclass
class FaceSet:
    """One pack's faces, one row per kept picture."""

    normed: torch.Tensor  # [n, 512]
    raw: torch.Tensor  # [n, 512]
    keypoints: torch.Tensor  # [n, 5, 2], picture pixels
    sizes: torch.Tensor  # [n, 2] picture width, height


@dataclass
class PhotoMakerEmbeds:
    """One PhotoMaker file's ID embeddings of the kept pictures (``methods.photomaker.id_embeddings``)."""

    file: str  # the model's name when the profile was built (for messages)
    variant: str
    id_embeds: torch.Tensor  # [k, fuse_dim]
    used: Tuple[int, ...]  # 0-based indices of the kept pictures that gave them


@dataclass
class Profile:
    """A saved identity (see the module docstring). Build one with ``profiles.build``."""

    name: str
    created: str  # ISO 8601, UTC
    pictures: Tuple[str, ...]  # content hashes (``image_input.image_hash``) of the kept pictures, in order
    left_out: Tuple[dict, ...] = ()  # {"picture": 1-based, "hash", "why"}
    face: Any = "largest"
    preparation: str = "crop"
    crop_position: str = "center"
    faces: Dict[str, FaceSet] = field(default_factory=dict)
    clip: Dict[Tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (encoder id, output) -> [n, ...]
    face_clip: Dict[Tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (encoder id, pack) -> [n, S, E]
    photomaker: Dict[str, PhotoMakerEmbeds] = field(default_factory=dict)  # short hash -> embeds
    nbytes: int = 0  # the file's size, when read from one

    # -- what it holds, for the checks of a unit that uses it

    def fit_text(self) -> str:
        return self.preparation + (f" ({self.crop_position})" if self.preparation == "crop" else "")

    def summary(self) -> dict:
        """Name, time, pictures and what the profile can feed (the API's and the CLI's listing)."""
        return {
            "name": self.name,
            "created": self.created,
            "pictures": len(self.pictures),
            "picture_hashes": list(self.pictures),
            "left_out": [dict(d) for d in self.left_out],
            "face": self.face,
            "preparation": self.fit_text(),
            "packs": sorted(self.faces),
            "encoders": sorted({f"{enc} {out}" for enc, out in self.clip}
                               | {f"{enc} face crop ({pack})" for enc, pack in self.face_clip}),
            "photomaker": sorted(f"{p.file} [{h}]" for h, p in self.photomaker.items()),
            "bytes": self.nbytes,
        }

    # -- the file layout

    def to_file(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """``(tensors, metadata)`` for ``safetensors.torch.save_file``."""
        tensors: Dict[str, torch.Tensor] = {}

        def put(key: str, t: torch.Tensor, dtype=torch.float32):
            tensors[key] = t.detach().to("cpu", dtype).contiguous()

        for pack, fs in self.faces.items():
            put(f"faces/{pack}/normed", fs.normed)
            put(f"faces/{pack}/raw", fs.raw)
            put(f"faces/{pack}/keypoints", fs.keypoints)
            put(f"faces/{pack}/sizes", fs.sizes, torch.int64)
        for (enc, out), t in self.clip.items():
            put(f"clip/{enc}/{out}", t)
        for (enc, pack), t in self.face_clip.items():
            put(f"face_clip/{enc}/{pack}", t)
        for h, pm in self.photomaker.items():
            put(f"photomaker/{h}/id_embeds", pm.id_embeds)
            put(f"photomaker/{h}/used", torch.tensor(pm.used, dtype=torch.int64))
        doc = {
            "name": self.name, "created": self.created, "pictures": list(self.pictures),
            "left_out": list(self.left_out), "face": self.face, "preparation": self.preparation,
            "crop_position": self.crop_position,
            "photomaker": {h: {"file": p.file, "variant": p.variant} for h, p in self.photomaker.items()},
        }
        return tensors, {"format": FORMAT, "version": str(FORMAT_VERSION), "profile": json.dumps(doc)}

    @classmethod
    def from_file(cls, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]], source: str,
                  nbytes: int = 0) -> "Profile":
        """The profile in a file's ``tensors`` and ``metadata``; ``ProfileError`` naming ``source`` when it is not one."""
        metadata = metadata or {}
        if metadata.get("format") != FORMAT:
            raise ProfileError(f"{source} is not an identity profile (its metadata does not say '{FORMAT}'); "
                               "build profiles with 'Save as profile…', POST /identity/v1/profiles or "
                               "python -m lib_identity profile build")
        if metadata.get("version") != str(FORMAT_VERSION):
            raise ProfileError(f"{source} is a version {metadata.get('version')} profile; this version of the extension "
                               f"reads version {FORMAT_VERSION}: build it again")
        try:
            doc = json.loads(metadata["profile"])
            pictures = tuple(str(h) for h in doc["pictures"])
            n = len(pictures)
            faces: Dict[str, FaceSet] = {}
            clip: Dict[Tuple[str, str], torch.Tensor] = {}
            face_clip: Dict[Tuple[str, str], torch.Tensor] = {}
            pm_tensors: Dict[str, Dict[str, torch.Tensor]] = {}
            packs: Dict[str, Dict[str, torch.Tensor]] = {}
            for key, t in tensors.items():
                kind, rest = key.split("/", 1)
                if kind == "faces":
                    pack, part = rest.rsplit("/", 1)
                    packs.setdefault(pack, {})[part] = t
                elif kind == "clip":
                    enc, out = rest.split("/", 1)
                    clip[(enc, out)] = _rows(t, n, key, source)
                elif kind == "face_clip":
                    enc, pack = rest.split("/", 1)
                    face_clip[(enc, pack)] = _rows(t, n, key, source)
                elif kind == "photomaker":
                    h, part = rest.rsplit("/", 1)
                    pm_tensors.setdefault(h, {})[part] = t
                else:
                    raise ValueError(f"unexpected tensor '{key}'")
            for pack, parts in packs.items():
                faces[pack] = FaceSet(normed=_rows(parts["normed"], n, f"faces/{pack}/normed", source, (512,)),
                                      raw=_rows(parts["raw"], n, f"faces/{pack}/raw", source, (512,)),
                                      keypoints=_rows(parts["keypoints"], n, f"faces/{pack}/keypoints", source, (5, 2)),
                                      sizes=_rows(parts["sizes"], n, f"faces/{pack}/sizes", source, (2,)))
            photomaker = {}
            for h, about in doc.get("photomaker", {}).items():
                parts = pm_tensors[h]
                used = tuple(int(i) for i in parts["used"].tolist())
                if any(i < 0 or i >= n for i in used):
                    raise ValueError(f"photomaker/{h}/used names pictures outside 0..{n - 1}")
                photomaker[h] = PhotoMakerEmbeds(file=str(about["file"]), variant=str(about["variant"]),
                                                 id_embeds=parts["id_embeds"].to(torch.float32), used=used)
            return cls(name=str(doc["name"]), created=str(doc["created"]), pictures=pictures,
                       left_out=tuple(dict(d) for d in doc.get("left_out", [])), face=doc.get("face", "largest"),
                       preparation=str(doc.get("preparation", "crop")),
                       crop_position=str(doc.get("crop_position", "center")), faces=faces, clip=clip,
                       face_clip=face_clip, photomaker=photomaker, nbytes=nbytes)
        except ProfileError:
            raise
        except (KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise ProfileError(f"{source} is a damaged identity profile ({e}); build it again") from None


# the CLIP encoder FaceID-Plus reads face crops with (methods.faceid.CLIP_ENCODER): face_clip/<it>/<pack>
FACE_CROP_ENCODER = "clip-vit-h"


def pack_name(folder: Optional[str]) -> Optional[str]:
    """The name a pack folder is stored under in a profile (its folder's name)."""
    return os.path.basename(os.path.normpath(str(folder))) if folder else None


def _rows(t: torch.Tensor, n: int, key: str, source: str, tail: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
    if t.dim() < 1 or t.shape[0] != n or (tail is not None and tuple(t.shape[1:]) != tail) or \
            (t.is_floating_point() and not torch.isfinite(t).all()):
        want = f"[{n}, {', '.join(map(str, tail))}]" if tail is not None else f"{n} rows"
        raise ValueError(f"'{key}' is {list(t.shape)}, expected {want} of finite numbers")
    return t.to(torch.float32) if t.is_floating_point() else t


__all__: List[str] = ["FaceSet", "PhotoMakerEmbeds", "Profile", "ProfileError", "ProfileExistsError",
                      "ProfileNotFoundError", "FACE_CROP_ENCODER", "FORMAT", "FORMAT_VERSION", "pack_name"]
