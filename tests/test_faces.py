"""Face analysis through the real insightface code, on the photos insightface ships, with small ONNX packs built here."""

import os

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
import cv2  # noqa: E402
from PIL import Image  # noqa: E402

import face_models as fm  # noqa: E402
from lib_identity.encoders import faces  # noqa: E402
from lib_identity.errors import UnitError  # noqa: E402


@pytest.fixture(scope="module")
def t1():
    return Image.open(fm.insightface_image("t1.jpg")).convert("RGB")


@pytest.fixture(scope="module")
def t1_pack(tmp_path_factory):
    return fm.write_pack(str(tmp_path_factory.mktemp("packs") / "t1pack"), fm.T1_FACES, max(fm.T1_SIZE))


@pytest.fixture(scope="module")
def t1_faces(t1, t1_pack):
    return faces.analyse_faces(t1, t1_pack, cache=faces.FaceCache())


def _by_size():
    return sorted(fm.T1_FACES, key=lambda f: -f.size)


def test_the_group_photo_lists_every_face_largest_first(t1, t1_faces):
    assert t1.size == fm.T1_SIZE
    assert len(t1_faces) == 6
    areas = [f.area for f in t1_faces]
    assert areas == sorted(areas, reverse=True)
    for face, target in zip(t1_faces, _by_size()):
        np.testing.assert_allclose(face.box, target.box(), atol=1.0)
        np.testing.assert_allclose(face.keypoints, target.keypoints(), atol=1.0)
        assert face.keypoints.shape == (5, 2) and face.keypoints.dtype == np.float32
        assert face.score == pytest.approx(target.score, abs=1e-6)


def test_largest_an_index_or_a_box_picks_the_face(t1_faces):
    biggest = _by_size()[0]
    assert faces.pick_face(t1_faces, "largest", unit_number=1, image_label="t1.jpg").box[0] == pytest.approx(biggest.box()[0], abs=1)
    third = faces.pick_face(t1_faces, 2, unit_number=1, image_label="t1.jpg")
    assert third is t1_faces[2]
    assert faces.pick_face(t1_faces, "2", unit_number=1, image_label="t1.jpg") is third
    # a loose box drawn around the laughing man (centre 800, 388) picks him, not a neighbour
    laughing = faces.pick_face(t1_faces, [720, 300, 900, 480], unit_number=1, image_label="t1.jpg")
    assert (laughing.box[0] + laughing.box[2]) / 2 == pytest.approx(800, abs=1)
    assert faces.pick_face(t1_faces, "[720, 300, 900, 480]", unit_number=1, image_label="t1.jpg") is laughing  # infotext text
    # a box overlapping two faces takes the one it overlaps most (IoU)
    mostly_left = faces.pick_face(t1_faces, [40, 260, 300, 400], unit_number=1, image_label="t1.jpg")
    assert (mostly_left.box[0] + mostly_left.box[2]) / 2 == pytest.approx(115, abs=1)


@pytest.mark.parametrize("choice, words", [
    (6, ["unit 2", "face", "index 6", "t1.jpg has 6 faces", "0..5"]),
    (-1, ["index -1", "6 faces"]),
    ([0, 600, 50, 700], ["overlaps none", "t1.jpg"]),
    ([10, 10, 5, 20], ["x1 > x0"]),
    ("biggest", ["'biggest' is not a face choice", "largest"]),
])
def test_a_choice_that_fits_no_face_says_why(t1_faces, choice, words):
    with pytest.raises(UnitError) as e:
        faces.pick_face(t1_faces, choice, unit_number=2, image_label="t1.jpg")
    for w in words:
        assert w in str(e.value)


def test_the_aligned_crop_is_taken_where_the_keypoints_say(t1, t1_faces):
    rgb = np.asarray(t1)
    crops = {}
    for face, target in list(zip(t1_faces, _by_size()))[:3]:
        for size in (112, 224):
            crop = np.asarray(faces.aligned_face(t1, face, size))
            # independent reference: the inverse of the similarity the test placed the face with
            ref = cv2.warpAffine(rgb, target.picture_to_crop(size), (size, size), borderValue=0)
            assert crop.shape == (size, size, 3)
            assert np.abs(crop.astype(float) - ref).mean() < 0.05  # rounding of the keypoints only
            crops[(id(face), size)] = crop
    a, b = t1_faces[0], t1_faces[1]
    assert np.abs(crops[(id(a), 112)].astype(float) - crops[(id(b), 112)]).mean() > 20  # another face, another crop
    # the official FaceID-Plus colour order is the same crop with red and blue swapped
    bgr = np.asarray(faces.aligned_face(t1, a, 224, channels=faces.OFFICIAL_FACEID_PLUS_CHANNELS))
    np.testing.assert_array_equal(bgr, crops[(id(a), 224)][:, :, ::-1])


def test_the_embedding_is_arcface_of_that_face(t1, t1_faces):
    rgb = np.asarray(t1)
    embeddings = []
    for face, target in zip(t1_faces, _by_size()):
        assert face.embedding.shape == (512,) and face.embedding.dtype == np.float32
        ref_crop = cv2.warpAffine(rgb, target.picture_to_crop(112), (112, 112), borderValue=0)
        np.testing.assert_allclose(face.embedding, fm.reference_embedding(ref_crop), atol=2e-3)
        assert np.linalg.norm(face.normed_embedding) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(face.normed_embedding, face.embedding / np.linalg.norm(face.embedding), rtol=1e-6)
        embeddings.append(face.normed_embedding)
    cos = np.array(embeddings) @ np.array(embeddings).T
    assert (cos[~np.eye(6, dtype=bool)] < 0.95).all()  # every face has its own embedding


def test_the_second_analysis_of_a_picture_runs_no_onnx_session(monkeypatch, t1, t1_pack):
    import onnxruntime

    runs = []
    real_run = onnxruntime.InferenceSession.run

    def counting_run(self, *args, **kwargs):
        runs.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", counting_run)
    cache = faces.FaceCache(max_entries=1)
    first = faces.analyse_faces(t1, t1_pack, cache=cache)
    assert len(runs) == 7  # one detection, six embeddings
    count = faces.analysis_count()
    again = faces.analyse_faces(t1.copy(), t1_pack, cache=cache)  # the same pixels in another object
    assert len(runs) == 7 and faces.analysis_count() == count
    assert [f.box for f in again] == [f.box for f in first]
    faces.analyse_faces(t1, t1_pack, cache=cache, det_size=320)  # another detection size: analysed
    assert len(runs) == 14
    faces.analyse_faces(t1, t1_pack, cache=cache)  # the bound of 1 dropped the 640 analysis
    assert len(runs) == 21
    cache.resize(0)
    faces.analyse_faces(t1, t1_pack, cache=cache)
    assert len(runs) == 28 and len(cache) == 0
    with pytest.raises(ValueError):
        again[0].embedding[0] = 1.0  # cached results cannot be changed by a caller


def test_the_pack_sessions_are_made_once(t1, t1_pack):
    faces.analyse_faces(t1, t1_pack, cache=faces.FaceCache())
    models = faces.pack_models(t1_pack)
    faces.analyse_faces(t1.transpose(Image.FLIP_LEFT_RIGHT), t1_pack, cache=faces.FaceCache())
    assert faces.pack_models(t1_pack) is models
    assert models.providers == ["CPUExecutionProvider"]


def test_a_face_that_fills_the_picture_is_found_at_a_smaller_size(tmp_path):
    tom = Image.open(fm.insightface_image("Tom_Hanks_54745.png")).convert("RGB")
    pack = fm.write_pack(str(tmp_path / "tom"), [fm.TOM_HANKS_FACE], 112, max_face_px=400)
    models = faces.pack_models(pack)
    bgr = np.ascontiguousarray(np.asarray(tom)[:, :, ::-1])
    assert len(models.detector.detect(bgr, input_size=(640, 640))[0]) == 0  # at 640 it is too big for the detector
    found = faces.analyse_faces(tom, pack, cache=faces.FaceCache())
    assert len(found) == 1
    np.testing.assert_allclose(found[0].box, [0, 0, 112, 112], atol=1.0)
    # the picture is an aligned ArcFace crop already: aligning it again gives it back
    crop = np.asarray(faces.aligned_face(tom, found[0], 112)).astype(float)
    assert np.abs(crop - np.asarray(tom)).mean() < 0.05


def test_a_picture_without_a_face_is_a_clear_error(t1_pack):
    flat = Image.new("RGB", (320, 240), (128, 128, 128))
    found = faces.analyse_faces(flat, t1_pack, cache=faces.FaceCache())
    assert found == []
    with pytest.raises(UnitError) as e:
        faces.pick_face(found, "largest", unit_number=3, image_label="reference image 2")
    assert "Identity unit 3" in str(e.value) and "no face found in reference image 2" in str(e.value)


def test_the_preview_numbers_each_face(t1, t1_faces):
    before = np.asarray(t1).copy()
    preview = np.asarray(faces.draw_faces(t1, t1_faces))
    np.testing.assert_array_equal(np.asarray(t1), before)  # the reference itself is not drawn on
    assert preview.shape == before.shape
    for i, face in enumerate(t1_faces):
        x0, y0, x1, y1 = (int(round(v)) for v in face.box)
        edge = preview[int((y0 + y1) / 2), x1]  # the box's right edge, half-way down
        assert tuple(edge) == ((0, 255, 0) if i == 0 else (255, 200, 0))
    far = preview[860:880, 600:700]  # the table, far from every face
    np.testing.assert_array_equal(far, before[860:880, 600:700])


def test_providers_follow_onnxruntime_and_torch(monkeypatch):
    import onnxruntime
    import torch

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert faces.choose_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # onnxruntime-gpu without a CUDA torch
    assert faces.choose_providers() == ["CPUExecutionProvider"]


def test_the_console_says_once_where_faces_are_analysed(monkeypatch, capsys, tmp_path):
    from lib_identity.encoders.faces import analysis

    monkeypatch.setattr(analysis, "_provider_said", False)
    for name in ("a", "b"):
        faces.pack_models(fm.write_pack(str(tmp_path / name), [fm.TOM_HANKS_FACE], 112))
    out = capsys.readouterr().out
    assert out.count("[identity] face analysis (insightface 2.1) runs on the CPU (onnxruntime)") == 1
