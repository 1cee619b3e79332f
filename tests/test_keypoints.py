"""InstantID's keypoint image and the keypoints' move into the generation's frame.

The drawing is checked against the official draw_kps as a list of facts (InstantID's
pipeline_stable_diffusion_xl_instantid.py): keypoint centres in their colours, limbs at 0.6 of
the colour of their first end and 4 pixels either side of their axis, circles of radius 10,
black elsewhere. The frame mapping is checked against a picture actually resized the way the
WebUI's "crop and resize" does it (PIL), by where a small blob lands.
"""

import math

import numpy as np
import pytest
from PIL import Image

from lib_identity.encoders.faces.keypoints import draw_keypoints, keypoints_in_frame

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]
# eyes, nose tip, mouth corners on a 200 x 160 picture
KPS = np.array([[60.7, 50.2], [140.3, 52.9], [100.5, 90.8], [70.1, 125.6], [130.9, 127.4]])


def pixel(image, x, y):
    return tuple(int(v) for v in image[int(round(y)), int(round(x))])


@pytest.fixture(scope="module")
def drawn():
    return draw_keypoints(KPS, 200, 160)


def test_size_and_type(drawn):
    assert drawn.shape == (160, 200, 3) and drawn.dtype == np.uint8
    assert draw_keypoints(KPS, 64, 48).shape == (48, 64, 3)


def test_keypoints_are_circles_of_radius_10_in_their_colours(drawn):
    for (x, y), colour in zip(KPS, COLOURS):
        assert pixel(drawn, int(x), int(y)) == colour
    x, y = int(KPS[0][0]), int(KPS[0][1])
    assert pixel(drawn, x - 9, y) == COLOURS[0]  # inside the circle, off the limb (which runs down-right)
    assert pixel(drawn, x, y - 12) == (0, 0, 0)  # above the eye, outside the circle
    assert pixel(drawn, x - 12, y) == (0, 0, 0)


@pytest.mark.parametrize("start", [0, 1, 3, 4])
def test_limbs_run_to_the_nose_at_0_6_of_the_first_ends_colour(drawn, start):
    (x0, y0), (x1, y1) = KPS[start], KPS[2]
    mx, my = (x0 + x1) / 2, (y0 + y1) / 2
    length = math.hypot(x1 - x0, y1 - y0)
    nx, ny = -(y1 - y0) / length, (x1 - x0) / length  # unit normal to the limb
    dimmed = tuple(int(c * 0.6) for c in COLOURS[start])
    assert pixel(drawn, mx, my) == dimmed
    assert pixel(drawn, mx + 2 * nx, my + 2 * ny) == dimmed  # within the half-width of 4
    assert pixel(drawn, mx - 2 * nx, my - 2 * ny) == dimmed
    assert pixel(drawn, mx + 7 * nx, my + 7 * ny) == (0, 0, 0)  # beyond it
    assert pixel(drawn, mx - 7 * nx, my - 7 * ny) == (0, 0, 0)


def test_everything_else_is_black(drawn):
    for x, y in [(3, 3), (196, 3), (3, 156), (196, 156), (100, 20), (100, 150)]:
        assert pixel(drawn, x, y) == (0, 0, 0)
    assert set(map(tuple, drawn.reshape(-1, 3))) <= {(0, 0, 0)} | set(COLOURS) | {
        tuple(int(c * 0.6) for c in col) for col in COLOURS}


def test_five_points_are_needed():
    with pytest.raises(ValueError, match="5 face keypoints"):
        draw_keypoints(KPS[:4], 64, 64)


def _crop_and_resize(image, width, height):
    """The WebUI's images.resize_image mode 1, restated: cover the frame, centre, crop."""
    ratio, src_ratio = width / height, image.width / image.height
    src_w = width if ratio > src_ratio else image.width * height // image.height
    src_h = height if ratio <= src_ratio else image.height * width // image.width
    out = Image.new("F", (width, height))
    out.paste(image.resize((src_w, src_h), Image.LANCZOS), box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    return np.asarray(out, dtype=np.float64)


def _centroid(a):
    ys, xs = np.mgrid[0:a.shape[0], 0:a.shape[1]]
    return np.array([(a * xs).sum(), (a * ys).sum()]) / a.sum()


@pytest.mark.parametrize("target", [(256, 384), (384, 128), (150, 100)])
def test_keypoints_land_where_crop_and_resize_puts_the_picture(target):
    source = (300, 200)  # a landscape picture; the targets crop its sides, its top and bottom, or neither
    kps = np.array([[120.3, 80.6], [170.8, 84.1], [150.2, 105.7], [128.9, 127.4], [165.5, 126.0]])
    moved = keypoints_in_frame(kps, source, target)
    ys, xs = np.mgrid[0:source[1], 0:source[0]]
    for (x, y), (mx, my) in zip(kps, moved):
        blob = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 3.0 ** 2)).astype(np.float32)
        landed = _centroid(_crop_and_resize(Image.fromarray(blob, mode="F"), *target))
        np.testing.assert_allclose(landed, [mx, my], atol=0.15)
