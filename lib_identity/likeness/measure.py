"""How much a generated image's face looks like a unit's reference face: one number per image and unit.

The number is the cosine similarity of two ArcFace embeddings made by the same face pack (the
unit's own: buffalo_l for FaceID and PhotoMaker V2, antelopev2 for InstantID), through the one
shared face analysis (``encoders.faces.analyse_faces``):

* the reference: the face the unit takes from each of its pictures (its ``face`` choice), the
  embeddings L2-normed and averaged, then normed again, so every picture counts the same
  whatever the size of its raw embedding (InstantID and PhotoMaker V2 feed the raw one to their
  models; the cosine does not depend on the length);
* the output: every face the same pack finds in the image; the best match counts. A unit with
  a region mask counts only the faces inside its region (at least half of the face's box is
  white in the mask, stretched to the image as the UNet stretches it); the best of those counts.

An image with no face (or none in the region) has no number: it is shown as "no face", never 0,
which would read as "a stranger".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

NO_FACE = "no face"
REGION_COVERAGE = 0.5  # a face is in a unit's region when at least this share of its box is inside the mask


@dataclass(frozen=True)
class Measurement:
    """One image against one reference: ``value`` (cosine, -1..1) of the face that counted, or None
    when no face counted; ``face`` that face; ``faces`` how many faces the pack found in the image."""

    value: Optional[float]
    face: Optional[object] = None
    faces: int = 0

    @property
    def text(self) -> str:
        return format_likeness(self.value)


def format_likeness(value: Optional[float]) -> str:
    """``0.63`` with two decimals, or ``no face``."""
    return NO_FACE if value is None else f"{float(value):.2f}"


def unit_vector(embedding) -> np.ndarray:
    """``embedding`` divided by its L2 norm, as float64."""
    v = np.asarray(embedding, dtype=np.float64).reshape(-1)
    norm = np.linalg.norm(v)
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("a face embedding is zero or not finite")
    return v / norm


def reference_embedding(images: Sequence, pack, face="largest", *, det_size: int = 640,
                        cache=None) -> Optional[np.ndarray]:
    """The unit's reference face as one unit-length embedding, or None when no picture shows a face.

    ``face``: the unit's choice ("largest", an index or a box; ``faces.pick_face``). A picture
    where the choice fits no face is left out (a FaceID unit would have stopped the run on it
    already; an IP-Adapter unit's style picture simply has no face to compare with). Analyses
    come from the shared cache, so a unit whose method analysed its pictures runs no new one.
    """
    from ..encoders import faces as face_analysis
    from ..errors import UnitError

    chosen = []
    for image in images:
        found = face_analysis.analyse_faces(image, pack, det_size=det_size, cache=cache)
        try:
            picked = face_analysis.pick_face(found, face)
        except UnitError:
            continue
        chosen.append(unit_vector(picked.embedding))
    if not chosen:
        return None
    return unit_vector(np.mean(chosen, axis=0))


def region_array(mask, width: int, height: int) -> np.ndarray:
    """A unit's mask (PIL, white = the region) stretched to ``width`` x ``height``, as floats 0..1."""
    from PIL import Image

    gray = mask.convert("L")
    if gray.size != (width, height):
        gray = gray.resize((width, height), Image.BILINEAR)
    return np.asarray(gray, dtype=np.float32) / 255.0


def region_coverage(box, region: np.ndarray) -> float:
    """The share of ``box`` ([x0, y0, x1, y1] in pixels) that lies inside ``region`` (mean of the mask
    over the box; the part of the box outside the picture counts as outside the region)."""
    h, w = region.shape
    x0, y0, x1, y1 = (float(v) for v in box)
    area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    if area <= 0:
        return 0.0
    ix0, iy0 = int(np.clip(np.floor(x0), 0, w)), int(np.clip(np.floor(y0), 0, h))
    ix1, iy1 = int(np.clip(np.ceil(x1), 0, w)), int(np.clip(np.ceil(y1), 0, h))
    if ix1 <= ix0 or iy1 <= iy0:
        return 0.0
    return float(region[iy0:iy1, ix0:ix1].sum()) / area


def best_match(faces: Sequence, reference: np.ndarray, *, region: Optional[np.ndarray] = None) -> Measurement:
    """The face of ``faces`` most like ``reference`` (only those inside ``region`` when given)."""
    candidates = list(faces)
    if region is not None:
        candidates = [f for f in candidates if region_coverage(f.box, region) >= REGION_COVERAGE]
    best, best_value = None, None
    for f in candidates:
        value = float(np.dot(unit_vector(f.embedding), reference))
        if best_value is None or value > best_value:
            best, best_value = f, value
    return Measurement(best_value, best, len(faces))


def measure(image, reference: np.ndarray, pack, *, mask=None, det_size: int = 640, faces=None) -> Measurement:
    """The likeness of ``image`` (PIL) to ``reference`` (``reference_embedding``) with ``pack``'s models.

    ``mask``: the unit's region mask (PIL), a function ``(width, height) -> [height, width]`` array
    (a region the unit made itself), or None. ``faces``: the analysis of ``image`` with this pack
    when the caller has it already (several units, one pack: one analysis per image).
    """
    from ..encoders import faces as face_analysis

    if faces is None:
        faces = face_analysis.analyse_faces(image, pack, det_size=det_size, cache=face_analysis.FaceCache(0))
    if mask is None:
        region = None
    elif callable(mask):  # a region the unit made itself, drawn at the image's size
        region = np.asarray(mask(image.width, image.height), dtype=np.float32)
    else:
        region = region_array(mask, image.width, image.height)
    return best_match(faces, reference, region=region)
