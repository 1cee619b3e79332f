"""One generation's likeness: which units are measured, with which face pack, and the values per image.

Which pack measures a unit:

* a unit whose model analyses faces (FaceID, InstantID, PhotoMaker V2) uses that pack, with the
  unit's own ``face`` choice on its pictures: the very face the unit used;
* any other unit (IP-Adapter, PhotoMaker V1) uses the default FaceID pack (buffalo_l, or what
  the setting names) when it is there, with the largest face of each picture; without it, or
  when none of its pictures shows a face (a style picture), the unit has no likeness.

Each output image is analysed once per pack, whatever the number of units sharing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional, Sequence

import numpy as np

from ..units.fields import FACE_METHODS, METHOD_OF_FAMILY
from ..profiles.profile import pack_name
from .measure import Measurement, measure, reference_embedding, unit_vector

FACE_PACK_PREFIX = "insightface:"


@dataclass
class Target:
    """A unit to measure: its number, the pack folder, its pictures, face choice and region (a PIL
    mask, or ``region(width, height)`` for a region the unit made itself)."""

    number: int
    pack: str
    images: Sequence
    face: object = "largest"
    mask: Optional[object] = None
    faces: Optional[np.ndarray] = None  # a profile's normed embeddings, in place of the pictures
    _reference: Optional[np.ndarray] = field(default=None, repr=False)
    _referenced: bool = field(default=False, repr=False)

    def reference(self) -> Optional[np.ndarray]:
        """The unit's reference face (``measure.reference_embedding``), computed once, on first use."""
        if not self._referenced:
            if self.faces is not None:
                self._reference = unit_vector(np.mean([unit_vector(f) for f in self.faces], axis=0))
            else:
                self._reference = reference_embedding(self.images, self.pack, self.face)
            self._referenced = True
        return self._reference


def unit_pack(resolved) -> Optional[str]:
    """The pack folder a resolved unit's own model analyses faces with, or None."""
    for need, found in (resolved.encoders or {}).items():
        if str(need).startswith(FACE_PACK_PREFIX) and found:
            return str(found)
    return None


def targets_for(resolved: Sequence, default_pack: Callable[[], Optional[str]]) -> List[Target]:
    """The units to measure (``units.ResolvedUnit``), in unit order; ``default_pack()``: the
    default FaceID pack's folder, or None when it is not there (asked only when a unit needs it)."""
    out = []
    fallback: List[Optional[str]] = []
    for r in resolved:
        pack = unit_pack(r)
        face = "largest"
        if pack is not None:
            if METHOD_OF_FAMILY.get(r.model.info.family) in FACE_METHODS:
                face = r.unit.face
        else:
            if not fallback:
                fallback.append(default_pack())
            pack = fallback[0]
        if pack and getattr(r, "profile", None) is not None:
            stored = r.profile.faces.get(pack_name(pack))
            if stored is not None:  # a profile built without this pack has no face to compare with
                out.append(Target(r.number, pack, (), face, r.unit.mask, faces=stored.normed.numpy()))
        elif pack:
            out.append(Target(r.number, pack, tuple(r.unit.images), face, r.unit.mask))
    return out


class LikenessRun:
    """The likeness of one generation's images, unit by unit.

    ``measure_image(image, key)`` measures an image for every target and keeps the values under
    ``key`` (the WebUI's (batch, position in batch)); ``value(number, key)`` reads one back.
    """

    def __init__(self, targets: Sequence[Target]):
        self.targets = list(targets)
        self.values: Dict[Hashable, Dict[int, Measurement]] = {}
        self.order: List[Hashable] = []

    def use_regions(self, regions: Dict[int, Callable]) -> None:
        """Unit number -> ``region(width, height)``: a unit without a mask of its own is measured on
        the face inside that region (InstantID's face of a group pose picture)."""
        for target in self.targets:
            if target.mask is None and target.number in regions:
                target.mask = regions[target.number]

    def measure_image(self, image, key: Hashable) -> Dict[int, Measurement]:
        from ..encoders import faces as face_analysis

        analysed: Dict[str, list] = {}
        out: Dict[int, Measurement] = {}
        for target in self.targets:
            reference = target.reference()
            if reference is None:
                continue
            if target.pack not in analysed:  # one analysis per pack per image, not per unit
                analysed[target.pack] = face_analysis.analyse_faces(image, target.pack, cache=face_analysis.FaceCache(0))
            out[target.number] = measure(image, reference, target.pack, mask=target.mask, faces=analysed[target.pack])
        if key not in self.values:
            self.order.append(key)
        self.values[key] = out
        return out

    def value(self, number: int, key: Hashable) -> Optional[Measurement]:
        return self.values.get(key, {}).get(number)

    def per_unit(self) -> Dict[int, List[Optional[float]]]:
        """Unit number -> the likeness of each measured image in order (None: no face)."""
        out: Dict[int, List[Optional[float]]] = {}
        for key in self.order:
            for number, m in self.values[key].items():
                out.setdefault(number, []).append(m.value)
        return out
