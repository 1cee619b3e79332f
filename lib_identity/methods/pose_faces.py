"""Several people in one image: which face of InstantID's pose picture a unit takes, and its region.

* ``pose_face`` (a unit field) is ``"auto"``, ``"largest"`` or an index counted from the left
  (0 is the leftmost face, by the centre of its box).
* ``"auto"``: when several enabled InstantID units have the same pose picture (same content),
  the n-th of them in unit order takes the n-th face from the left. A unit that is alone with its
  pose picture takes the picture's largest face (as before the field existed).
* ``face_region``: when the pose picture shows several faces and the unit has no mask, the unit
  acts only around its face: the face's box grown by ``REGION_MARGIN`` of the box's width
  (height) on the left and right (top and bottom), moved into each pass's frame as the keypoints
  are (``keypoints.points_in_frame``: "crop and resize"). That region restricts both the face
  tokens in cross-attention and IdentityNet's residuals. An explicit mask wins over it.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from ..errors import PatchError, UnitError

# A quarter of the box on every side: the region is 1.5 times the face box in each direction.
# insightface's box spans brow to chin and ear to ear; the margin takes in the hairline, the ears
# and the chin's edge, and in a group photo whose faces stand about a face apart (insightface's
# t1.jpg) the regions of neighbours stay apart (half the box on each side made them overlap).
REGION_MARGIN = 0.25


def left_to_right(faces: Sequence) -> list:
    """The faces ordered by the centre of their boxes, left to right (top to bottom on a tie)."""
    return sorted(faces, key=lambda f: ((f.box[0] + f.box[2]) / 2, (f.box[1] + f.box[3]) / 2))


def pose_shares(resolved: Sequence, family: str) -> Dict[int, Tuple[int, int]]:
    """Unit number -> (its place among the enabled ``family`` units with the same pose picture, how many
    they are), for every such unit with a pose picture, in unit order."""
    from ..image_input import image_hash

    groups: Dict[str, list] = {}
    for r in resolved:
        unit = r.unit
        if not unit.enabled or unit.pose_image is None or r.model.info.family != family:
            continue
        groups.setdefault(image_hash(unit.pose_image), []).append(r.number)
    return {number: (place, len(numbers)) for numbers in groups.values() for place, number in enumerate(numbers)}


def pick_pose_face(faces: Sequence, choice="auto", share: Tuple[int, int] = (0, 1), *,
                   unit_number: Optional[int] = None):
    """The face of the pose picture a unit takes (see the module docstring); ``UnitError`` naming
    ``pose_image`` (no face) or ``pose_face`` (no such face)."""
    if not faces:
        raise UnitError(unit_number, "pose_image", "no face found in the pose picture. Use a pose picture where "
                        "the faces are clearly visible (not tiny, not cut off), or leave it out")
    n = len(faces)
    ordered = left_to_right(faces)
    largest = max(faces, key=lambda f: f.area)
    if choice in (None, "largest"):
        return largest
    if choice == "auto":
        place, count = share
        if count <= 1:
            return largest
        if place >= n:
            raise UnitError(unit_number, "pose_face", f"'auto' gives the {count} InstantID units that share this pose "
                            f"picture its faces from the left, one each, and the picture shows {n} face"
                            f"{'s' if n != 1 else ''}, so this unit (the {_nth(place + 1)} of them) has none; set "
                            f"pose_face to a face index (0..{n - 1}, from the left) or give fewer units this pose picture")
        return ordered[place]
    index = int(choice)
    if not 0 <= index < n:
        raise UnitError(unit_number, "pose_face", f"face {index} (counted from the left, from 0) is not in the pose "
                        f"picture, which shows {n} face{'s' if n != 1 else ''}; use 0..{n - 1}, 'largest' or 'auto'")
    return ordered[index]


def _nth(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


def face_region(box: Sequence[float], source_size: Tuple[int, int], *, margin: float = REGION_MARGIN,
                name: str = "unit"):
    """``region(width, height) -> [height, width]`` float32: 1 on the pixels (at their centres) inside the
    face's box, grown by ``margin`` of its size on each side and moved into that frame, 0 elsewhere."""
    from ..encoders.faces.keypoints import points_in_frame

    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    grown = np.array([[x0 - margin * w, y0 - margin * h], [x1 + margin * w, y1 + margin * h]])
    source = (int(source_size[0]), int(source_size[1]))

    def region(width: int, height: int) -> np.ndarray:
        (fx0, fy0), (fx1, fy1) = points_in_frame(grown, source, (width, height))
        xs, ys = np.arange(int(width)), np.arange(int(height))
        inside = ((ys >= fy0) & (ys <= fy1))[:, None] & ((xs >= fx0) & (xs <= fx1))[None, :]
        if not inside.any():
            raise PatchError(f"{name}: its face of the pose picture is outside the {width}x{height} frame (the pose "
                             "picture is cropped to the frame's shape, as 'crop and resize' does); choose another "
                             "pose_face, a frame of the pose picture's shape, or give the unit a mask")
        return inside.astype(np.float32)

    return region


__all__ = ("REGION_MARGIN", "face_region", "left_to_right", "pick_pose_face", "pose_shares")
