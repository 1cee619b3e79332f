"""Several people in one image, below the WebUI: the ``pose_face`` field from every entry point,
which face of the pose picture a unit takes (``auto``, ``largest``, an index from the left), and
the region around it, moved into the frame as the keypoints are (insightface's t1.jpg with the
tests' small ONNX pack, the real insightface code)."""

import numpy as np
import pytest
import torch

from lib_identity import units as U
from lib_identity.errors import UnitError

# ---------------------------------------------------------------- the field


def test_pose_face_is_parsed_alike_from_the_api_the_ui_infotext_and_xyz():
    from PIL import Image

    pose = Image.new("RGB", (16, 16), (90, 90, 90))
    for given, want in (("auto", "auto"), ("Largest", "largest"), (2, 2), ("3", 3), (1.0, 1)):
        assert U.Unit.from_api({"pose_image": pose, "pose_face": given}, 1).pose_face == want
    assert U.Unit.from_api({}, 1).pose_face == "auto"
    ui = list(U.Unit.from_ui([], 1).values().values())  # the accordion's values in UI_FIELDS order
    at = U.UI_FIELDS.index("pose_face")
    assert U.Unit.from_ui(ui[:at] + ["1"] + ui[at + 1:], 1).pose_face == 1
    unit = U.Unit.from_api({"model": "m", "images": [], "pose_image": pose, "pose_face": 4}, 2)
    entry = U.units_to_infotext([unit])["Identity 1"]
    assert "pose face: 4" in entry
    (read,) = U.units_from_infotext({"Identity 1": entry}, strict=True)
    assert read["fields"]["pose_face"] == 4
    params = {"Identity 1": entry}
    U.expand_infotext(params)
    assert params[U.infotext_key(1, "pose_face")] == "4"  # the dropdown's text
    assert "pose face" not in U.units_to_infotext([U.Unit.from_api({"pose_image": pose}, 1)])["Identity 1"]
    assert "pose_face" in U.AXIS_FIELDS and U.axis_choices("pose_face")[:3] == ["auto", "largest", "0"]
    assert U.parse_axis_value("pose_face", "1", 1) == 1
    (cell,) = U.apply_overrides([unit], {("pose_face", 1): "largest"})
    assert cell.pose_face == "largest"


@pytest.mark.parametrize("bad", ["left", -1, 2.5, True, [0, 1], "100"])
def test_a_bad_pose_face_names_the_unit_the_field_and_what_it_takes(bad):
    from PIL import Image

    with pytest.raises(UnitError) as e:
        U.Unit.from_api({"pose_image": Image.new("RGB", (8, 8)), "pose_face": bad}, 3)
    assert e.value.unit == 3 and e.value.field == "pose_face"
    assert "'auto'" in str(e.value) and "from the left" in str(e.value)


def test_a_pose_face_without_a_pose_picture_is_refused_from_the_api_and_kept_from_the_ui():
    with pytest.raises(UnitError) as e:
        U.Unit.from_api({"pose_face": 1}, 2)
    assert e.value.field == "pose_face" and "no pose_image" in str(e.value) and "send a pose_image" in str(e.value)
    assert U.Unit.from_api({"pose_face": "auto"}, 2).pose_face == "auto"
    ui = list(U.Unit.from_ui([], 1).values().values())
    at = U.UI_FIELDS.index("pose_face")
    assert U.Unit.from_ui(ui[:at] + ["2"] + ui[at + 1:], 1).pose_face == 2  # a stale dropdown value is harmless
    with pytest.raises(UnitError):
        U.apply_overrides([U.Unit.from_api({"enabled": True}, 1)], {("pose_face", 1): "1"})


# ---------------------------------------------------------------- which face, and its region

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from lib_identity.methods.pose_faces import REGION_MARGIN, face_region, left_to_right, pick_pose_face  # noqa: E402


@pytest.fixture(scope="module")
def t1(tmp_path_factory):
    from PIL import Image

    from lib_identity.encoders.faces import analyse_faces

    root = tmp_path_factory.mktemp("pose")
    pack = fm.write_antelopev2_pack(str(root / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    one = fm.write_antelopev2_pack(str(root / "one" / "antelopev2"), fm.T1_FACES[2:3], max(fm.T1_SIZE))
    picture = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    return dict(picture=picture, pack=pack, one=one, faces=analyse_faces(picture, pack))


def test_faces_are_counted_from_the_left_and_auto_deals_them_out_in_unit_order(t1):
    faces = t1["faces"]
    assert len(faces) == 6
    ordered = left_to_right(faces)
    centres = [(f.box[0] + f.box[2]) / 2 for f in ordered]
    assert centres == sorted(centres) and abs(centres[0] - fm.T1_FACES[0].cx) < 8
    largest = max(faces, key=lambda f: f.area)
    assert pick_pose_face(faces, "auto") is largest  # one unit alone: the largest, as before
    assert pick_pose_face(faces, "largest", (1, 2)) is largest
    assert [pick_pose_face(faces, "auto", (i, 3)) for i in range(3)] == ordered[:3]
    assert pick_pose_face(faces, 4) is ordered[4]
    with pytest.raises(UnitError) as e:
        pick_pose_face(faces, 6, unit_number=2)
    assert e.value.field == "pose_face" and "0..5" in str(e.value)
    with pytest.raises(UnitError) as e:
        pick_pose_face(faces[:2], "auto", (2, 3), unit_number=3)
    assert e.value.field == "pose_face" and "3rd" in str(e.value) and "2 faces" in str(e.value)
    with pytest.raises(UnitError) as e:
        pick_pose_face([], "auto", unit_number=1)
    assert e.value.field == "pose_image"


def test_the_region_is_the_grown_box_moved_into_the_frame_as_the_keypoints_are(t1):
    from lib_identity.encoders.faces import keypoints_in_frame

    face = left_to_right(t1["faces"])[1]
    x0, y0, x1, y1 = face.box
    for w, h in ((640, 443), (96, 64), (64, 64)):
        region = face_region(face.box, t1["picture"].size)(w, h)
        assert region.shape == (h, w) and set(np.unique(region)) <= {0.0, 1.0}
        ys, xs = np.nonzero(region)
        # the keypoints, moved into the frame, lie inside; the extent is the box grown by the margin, scaled
        kps = keypoints_in_frame(face.keypoints, t1["picture"].size, (w, h))
        assert all(region[int(round(y)), int(round(x))] == 1 for x, y in kps if 0 <= x < w and 0 <= y < h)
        scale = max(w / 1280, h / 886)
        assert abs((xs.max() - xs.min() + 1) - (x1 - x0) * (1 + 2 * REGION_MARGIN) * scale) <= 2
        assert abs((ys.max() - ys.min() + 1) - (y1 - y0) * (1 + 2 * REGION_MARGIN) * scale) <= 2
    from lib_identity.errors import PatchError

    with pytest.raises(PatchError, match="outside the 32x64 frame"):
        face_region(left_to_right(t1["faces"])[0].box, t1["picture"].size)(32, 64)  # cropped off a tall frame


def test_with_several_faces_the_unit_gets_its_region_unless_it_has_a_mask(t1, tmp_path):
    from instantid_helpers import StandInIdentityNet, write_instantid_adapter
    from lib_identity import formats
    from lib_identity.methods import instantid
    from lib_identity.models import load_adapter
    from unet_helpers import CONTEXT
    from unet_models import SDXL, build_ldm_unet, randomize_

    unet = randomize_(build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL]), seed=4)
    path = write_instantid_adapter(tmp_path, unet, seed=3)
    image_proj, ip_layers = load_adapter(formats.inspect(str(path)), formats.load_tensors(str(path)))
    net = StandInIdentityNet(unet, seed=1)

    def unit(pack=t1["pack"], **kw):
        return instantid.from_pictures(image_proj, ip_layers, [t1["picture"]], pack_dir=pack, identitynet=net,
                                       pose_image=t1["picture"], **kw)

    second = unit(pose_choice="auto", pose_share=(1, 2))
    assert second.pose_face is left_to_right(t1["faces"])[1]
    assert second.prompt.mask is second.region and second.control.mask is second.region
    want = face_region(second.pose_face.box, t1["picture"].size)(96, 64)
    assert np.array_equal(second.region(96, 64), want)
    mask = torch.zeros(64, 96)
    mask[:, :48] = 1
    masked = unit(pose_choice="auto", pose_share=(1, 2), mask=mask)
    assert masked.region is None and masked.prompt.mask is mask and masked.control.mask is mask  # the mask wins
    alone = unit(pack=t1["one"])  # a pose picture with one face: no region, as before
    assert alone.region is None and alone.prompt.mask is None and alone.control.mask is None
