"""Choosing one face, cropping it as the methods need, and drawing the faces for the user.

* ``pick_face(faces, choice, unit_number=, image_label=)``: ``"largest"``, an index in listing
  order (0 = largest), or a box ``[x0, y0, x1, y1]``: the face whose box has the highest
  intersection-over-union with it (IoU, so a loose box around a small face does not pick the big
  face next to it).
* ``aligned_face(image, face, size)``: insightface's own ``face_align.norm_crop`` on the five
  keypoints; 112 is ArcFace's crop, 224 FaceID-Plus's CLIP crop.
* ``draw_faces(image, faces)``: numbered boxes and keypoints, drawn with opencv.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Union

import numpy as np

from ...errors import UnitError
from ..preprocess import to_rgb
from .analysis import Face

FACE_CHOICES_HELP = "'largest', a face index (0 is the largest face) or, from the API, a box [x0, y0, x1, y1]"

# Colour order of FaceID-Plus's CLIP crop in the official IP-Adapter code: it calls
# norm_crop on the cv2.imread (BGR) picture and hands that array to CLIPImageProcessor, which
# reads the channels as R, G, B. The CLIP encoder therefore sees blue in the red slot. Pass
# channels=OFFICIAL_FACEID_PLUS_CHANNELS to aligned_face to reproduce it; "rgb" gives the true colours.
OFFICIAL_FACEID_PLUS_CHANNELS = "bgr"


def _iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _as_index(choice) -> Optional[int]:
    if isinstance(choice, bool):
        return None
    if isinstance(choice, (int, np.integer)):
        return int(choice)
    if isinstance(choice, float) and choice.is_integer():
        return int(choice)
    if isinstance(choice, str) and choice.strip().lstrip("-").isdigit():
        return int(choice.strip())
    return None


def _as_box(choice) -> Optional[List[float]]:
    if isinstance(choice, str) and "," in choice:  # as infotext writes it: "[x0, y0, x1, y1]"
        choice = [p for p in choice.strip().strip("[]()").split(",")]
    if isinstance(choice, (str, bytes)) or not isinstance(choice, (list, tuple, np.ndarray)) or len(choice) != 4:
        return None
    try:
        box = [float(v) for v in choice]
    except (TypeError, ValueError):
        return None
    return box


def pick_face(faces: Sequence[Face], choice: Union[str, int, Sequence[float], None] = "largest", *,
              unit_number: Optional[int] = None, image_label: str = "the reference picture") -> Face:
    """The face a unit uses; ``UnitError`` (field ``face``) when there is none, or the choice fits none."""
    where = image_label
    if not faces:
        raise UnitError(unit_number, "face", f"no face found in {where}. Use a picture where a face is clearly "
                                             "visible (not tiny, not cut off), or another reference")
    n = len(faces)
    listing = f"{where} has {n} face{'s' if n != 1 else ''} (0 is the largest)"
    if choice is None or (isinstance(choice, str) and choice.strip().lower() in ("", "largest")):
        return max(faces, key=lambda f: f.area)
    index = _as_index(choice)
    if index is not None:
        if not 0 <= index < n:
            raise UnitError(unit_number, "face", f"face index {index} is out of range: {listing}; "
                                                 f"use 0..{n - 1} or 'largest'")
        return faces[index]
    box = _as_box(choice)
    if box is not None:
        if not all(math.isfinite(v) for v in box) or box[2] <= box[0] or box[3] <= box[1]:
            raise UnitError(unit_number, "face", f"the box {box} is not [x0, y0, x1, y1] with x1 > x0 and y1 > y0")
        scores = [_iou(box, f.box) for f in faces]
        best = int(np.argmax(scores))
        if scores[best] <= 0.0:
            boxes = ", ".join(f"{i}: [{', '.join(f'{v:.0f}' for v in f.box)}]" for i, f in enumerate(faces))
            raise UnitError(unit_number, "face", f"the box [{', '.join(f'{v:g}' for v in box)}] overlaps none of the "
                                                 f"faces in {where} ({boxes})")
        return faces[best]
    raise UnitError(unit_number, "face", f"'{choice}' is not a face choice; expected {FACE_CHOICES_HELP}")


def aligned_face(image, face: Face, size: int = 112, *, channels: str = "rgb"):
    """The face aligned on insightface's ArcFace template with ``face_align.norm_crop``, ``size`` x ``size``, as PIL.

    ``size``: 112 (ArcFace) or 224 (FaceID-Plus's CLIP crop); insightface accepts multiples of 112 or 128.
    ``channels``: ``"rgb"`` for the picture's true colours; ``"bgr"`` for the official FaceID-Plus
    code's order (see ``OFFICIAL_FACEID_PLUS_CHANNELS``).
    """
    from insightface.utils import face_align
    from PIL import Image

    if channels not in ("rgb", "bgr"):
        raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    rgb = np.asarray(to_rgb(image))
    # warpAffine treats the channels alike: cropping RGB equals cropping BGR and converting back
    crop = face_align.norm_crop(rgb, landmark=np.asarray(face.keypoints, dtype=np.float32), image_size=int(size))
    if channels == "bgr":
        crop = crop[:, :, ::-1]
    return Image.fromarray(np.ascontiguousarray(crop))


def draw_faces(image, faces: Sequence[Face]):
    """The picture with each face's box, keypoints and index (its number in the listing) drawn on it."""
    import cv2
    from PIL import Image

    canvas = np.array(to_rgb(image))  # a copy: the caller's picture is left alone
    h, w = canvas.shape[:2]
    thick = max(1, round(max(h, w) / 400))
    scale = max(0.5, max(h, w) / 800)
    for i, face in enumerate(faces):
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        colour = (0, 255, 0) if i == 0 else (255, 200, 0)  # RGB: the largest face in green
        cv2.rectangle(canvas, (x0, y0), (x1, y1), colour, thick, cv2.LINE_AA)
        for x, y in face.keypoints:
            cv2.circle(canvas, (int(round(x)), int(round(y))), thick + 1, (255, 0, 0), -1, cv2.LINE_AA)
        label = str(i)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        ty = y0 - 4 if y0 - th - base - 4 >= 0 else min(h - 1, y1 + th + 4)
        cv2.rectangle(canvas, (x0, ty - th - base), (x0 + tw + 4, ty + base), colour, -1)
        cv2.putText(canvas, label, (x0 + 2, ty), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
    return Image.fromarray(canvas)
