"""InstantID's keypoint image: the five face keypoints drawn as IdentityNet was trained to see them.

``draw_keypoints`` follows the official ``draw_kps`` of InstantID's pipeline
(``pipeline_stable_diffusion_xl_instantid.py``): on a black canvas, the four limbs from the eyes
and the mouth corners to the nose tip (keypoints 0, 1, 3, 4 to 2) as filled ellipses, half-width
4 and half-length half the limb, each in the colour of its first end; the canvas times 0.6; then
a filled circle of radius 10 on each keypoint in its colour. Coordinates are truncated to
integers and the ellipse outline is OpenCV's ``ellipse2Poly`` at 1-degree steps, as there, so
the pixels are the official ones.

``keypoints_in_frame`` moves keypoints found on one picture into the frame of a generation, the
way the WebUI's "crop and resize" fits a picture to a frame.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np

# RGB, keypoints 0..4: left eye, right eye, nose tip, left and right mouth corner (insightface order)
KEYPOINT_COLOURS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4
LIMB_DIMMING = 0.6
POINT_RADIUS = 10


def _as_keypoints(kps) -> np.ndarray:
    points = np.asarray(kps, dtype=np.float64)
    if points.shape != (5, 2):
        raise ValueError(f"InstantID needs the 5 face keypoints (x, y) of insightface; got an array of shape {points.shape}")
    return points


def draw_keypoints(kps, width: int, height: int) -> np.ndarray:
    """The keypoint image (height x width x 3, uint8, RGB) for IdentityNet's hint, drawn as the official draw_kps."""
    import cv2

    points = _as_keypoints(kps)
    if width < 1 or height < 1:
        raise ValueError(f"the keypoint image needs a positive size; got {width}x{height}")
    canvas = np.zeros((int(height), int(width), 3), dtype=np.float64)
    for start, end in LIMBS:
        (x0, y0), (x1, y1) = points[start], points[end]
        length = math.hypot(x0 - x1, y0 - y1)
        angle = math.degrees(math.atan2(y0 - y1, x0 - x1))
        centre = (int((x0 + x1) / 2), int((y0 + y1) / 2))
        outline = cv2.ellipse2Poly(centre, (int(length / 2), LIMB_HALF_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, outline, KEYPOINT_COLOURS[start])
    image = (canvas * LIMB_DIMMING).astype(np.uint8)
    for (x, y), colour in zip(points, KEYPOINT_COLOURS):
        cv2.circle(image, (int(x), int(y)), POINT_RADIUS, colour, -1)
    return image


def keypoints_in_frame(kps, source_size: Sequence[int], target_size: Sequence[int]) -> np.ndarray:
    """Keypoints of a ``source_size`` (w, h) picture, moved to where "crop and resize" puts them in ``target_size``.

    The picture is scaled uniformly so that it covers the frame and centred; what sticks out is
    cropped. Sizes and offsets are whole pixels as the WebUI computes them, and coordinates are
    taken at pixel centres, so a point keeps its place on the resized picture. Points that end up
    outside the frame keep their coordinates (the drawing clips them).
    """
    return points_in_frame(_as_keypoints(kps), source_size, target_size)


def points_in_frame(points, source_size: Sequence[int], target_size: Sequence[int]) -> np.ndarray:
    """Any ``[n, 2]`` points (x, y) of a ``source_size`` picture, moved as ``keypoints_in_frame`` moves keypoints."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    (sw, sh), (tw, th) = _size(source_size), _size(target_size)
    resized_w, resized_h = _cover(sw, sh, tw, th)
    scale = np.array([resized_w / sw, resized_h / sh])
    offset = np.array([tw // 2 - resized_w // 2, th // 2 - resized_h // 2], dtype=np.float64)
    return (points + 0.5) * scale - 0.5 + offset


def _size(size: Sequence[int]) -> Tuple[int, int]:
    w, h = (int(v) for v in size)
    if w < 1 or h < 1:
        raise ValueError(f"a picture size must be positive (width, height); got {tuple(size)}")
    return w, h


def _cover(sw: int, sh: int, tw: int, th: int) -> Tuple[int, int]:
    # the WebUI's images.resize_image, mode "crop and resize": the side that fits exactly, the other floored
    if tw / th > sw / sh:
        return tw, sh * tw // sw
    return sw * th // sh, th
