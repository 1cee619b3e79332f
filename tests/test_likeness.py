"""Likeness, measured: the real insightface code with small ONNX packs on insightface's group photo,
against a direct computation (the test recognizer in numpy on crops warped where the faces were placed).

What a user would notice: the number is the ArcFace cosine of the best-matching face to the face the
unit chose (several pictures: their averaged face); with a mask, the face in the region counts; a
picture with no face says "no face", never 0; the X/Y/Z table shows each cell's number.
"""

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
from PIL import Image, ImageDraw, ImageOps  # noqa: E402

import face_models as fm  # noqa: E402
from lib_identity import likeness as L  # noqa: E402

BY_SIZE = sorted(fm.T1_FACES, key=lambda f: -f.size)  # the listing order of analyse_faces (0 = largest)


@pytest.fixture(scope="module")
def t1():
    return Image.open(fm.insightface_image("t1.jpg")).convert("RGB")


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return fm.write_pack(str(tmp_path_factory.mktemp("packs") / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))


@pytest.fixture(scope="module")
def output(t1):
    return fm.coarse_noise(t1)


direct_embedding = fm.placed_embedding


def direct_likeness(output, reference, targets=fm.T1_FACES):
    """The best cosine over ``targets`` and the target it belongs to."""
    values = [float(direct_embedding(output, t) @ reference) for t in targets]
    best = int(np.argmax(values))
    return values[best], targets[best]


def test_the_number_is_the_cosine_of_the_best_matching_face_to_the_chosen_face(t1, pack, output):
    reference = L.reference_embedding([t1], pack, 2)
    chosen = BY_SIZE[2]
    np.testing.assert_allclose(reference, direct_embedding(t1, chosen), atol=2e-3)

    m = L.measure(output, reference, pack)
    expected, target = direct_likeness(output, direct_embedding(t1, chosen))
    assert target is chosen  # the same person, under noise, is the best match
    assert m.value == pytest.approx(expected, abs=2e-3) and m.faces == 6
    assert 0.5 < m.value < 0.98 and m.text == f"{m.value:.2f}"
    np.testing.assert_allclose(m.face.box, chosen.box(), atol=1.0)

    # another choice of reference face gives that face's number
    other = L.measure(output, L.reference_embedding([t1], pack, "largest"), pack)
    assert other.value == pytest.approx(direct_likeness(output, direct_embedding(t1, BY_SIZE[0]))[0], abs=2e-3)
    np.testing.assert_allclose(other.face.box, BY_SIZE[0].box(), atol=1.0)


def test_several_pictures_give_their_averaged_normed_face(t1, pack, output):
    mirrored = ImageOps.mirror(t1)  # the detector finds the faces at the same places, other people's pixels
    reference = L.reference_embedding([t1, mirrored], pack, 2)
    a, b = direct_embedding(t1, BY_SIZE[2]), direct_embedding(mirrored, BY_SIZE[2])
    expected = (a + b) / np.linalg.norm(a + b)
    np.testing.assert_allclose(reference, expected, atol=2e-3)
    assert L.measure(output, reference, pack).value == pytest.approx(direct_likeness(output, expected)[0], abs=2e-3)


def test_a_picture_without_a_face_says_no_face_never_zero(t1, pack):
    reference = L.reference_embedding([t1], pack)
    flat = Image.new("RGB", (640, 443), (128, 128, 128))  # the test detector finds nothing without texture
    m = L.measure(flat, reference, pack)
    assert m.value is None and m.faces == 0 and m.text == "no face" == L.NO_FACE
    # a reference without a face: no likeness at all (an IP-Adapter unit's style picture)
    assert L.reference_embedding([flat], pack) is None


def test_with_a_mask_the_face_in_the_region_counts(t1, pack, output):
    reference = L.reference_embedding([t1], pack, 2)
    standing = fm.T1_FACES[4]  # top right, not the best match overall
    mask = Image.new("L", (320, 222), 0)  # another size than the image: stretched, as the UNet stretches it
    x0, y0, x1, y1 = standing.box()
    ImageDraw.Draw(mask).rectangle([x0 / 4 - 4, y0 / 4 - 4, x1 / 4 + 4, y1 / 4 + 4], fill=255)
    m = L.measure(output, reference, pack, mask=mask)
    np.testing.assert_allclose(m.face.box, standing.box(), atol=1.0)
    assert m.value == pytest.approx(float(direct_embedding(output, standing) @ direct_embedding(t1, BY_SIZE[2])), abs=2e-3)
    assert m.value < L.measure(output, reference, pack).value

    # a region that covers less than half of any face: no face in the region
    edge = Image.new("L", output.size, 0)
    ImageDraw.Draw(edge).rectangle([x0, y0, (x0 + x1) / 2 - 8, y1], fill=255)
    assert L.measure(output, reference, pack, mask=edge).text == "no face"


def test_region_coverage_is_the_share_of_the_box_inside_the_mask():
    region = np.zeros((100, 200), np.float32)
    region[:, :100] = 1.0
    assert L.region_coverage((50, 10, 150, 60), region) == pytest.approx(0.5)
    assert L.region_coverage((150, 10, 250, 60), region) == 0.0  # half outside the picture counts as outside
    assert L.region_coverage((-50, 0, 50, 100), region) == pytest.approx(0.5)


def _resolved(number, family, encoders, face="largest", images=("img",), mask=None):
    return SimpleNamespace(number=number, encoders=encoders, model=SimpleNamespace(info=SimpleNamespace(family=family)),
                           unit=SimpleNamespace(face=face, images=images, mask=mask))


def test_each_unit_is_measured_with_its_own_pack_and_face_or_the_default_pack():
    asked = []

    def default():
        asked.append(1)
        return "/packs/buffalo_l"

    faceid = _resolved(1, "ip-adapter-faceid", {"insightface:buffalo_l": "/packs/mine"}, face=2)
    instantid = _resolved(2, "instantid-adapter", {"insightface:antelopev2": "/packs/antelopev2", "instantid-identitynet": "x"}, face=1)
    ip_adapter = _resolved(3, "ip-adapter", {"clip-vit-h": "/enc"}, face=3)  # a stale face choice, not its method's
    photomaker_v1 = _resolved(4, "photomaker", {"clip-vit-l": "/enc"})
    targets = L.targets_for([faceid, instantid, ip_adapter, photomaker_v1], default)
    assert [(t.number, t.pack, t.face) for t in targets] == [
        (1, "/packs/mine", 2), (2, "/packs/antelopev2", 1), (3, "/packs/buffalo_l", "largest"), (4, "/packs/buffalo_l", "largest")]
    assert asked == [1]  # the default pack is looked up once
    # without the default pack, units that have no pack of their own are not measured
    assert [t.number for t in L.targets_for([faceid, ip_adapter], lambda: None)] == [1]


def test_the_xyz_table_lays_the_cells_out_like_the_grid():
    grid = L.LikenessGrid(["weight: 0.5", "weight: 1"], ["CFG Scale: 5", "CFG Scale: 7"], [""])
    grid.record(0, 0, 0, {1: [0.412]})
    grid.record(1, 0, 0, {1: [0.6, None, 0.7]})
    grid.record(0, 1, 0, {1: [None]})
    lines = grid.lines()
    assert lines[1] == "unit 1:"
    cells = [[c.strip() for c in line.split("|")] for line in lines[2:]]
    assert cells == [["", "weight: 0.5", "weight: 1"],
                     ["CFG Scale: 5", "0.41", "0.65 (2/3)"],
                     ["CFG Scale: 7", "no face", "-"]]
    assert grid.cell_value(1, 0, 0, 1) == pytest.approx(0.65)
