"""Building a profile from real photos (insightface's t1.jpg through the real insightface code with a
small ONNX pack): pictures without a face and faces far from the others are left out, and the
messages say which picture and why; the kept faces are the ones a unit would use; limits."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from lib_identity import profiles as P  # noqa: E402
from lib_identity.encoders import faces as F  # noqa: E402


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface")
    return fm.write_pack(str(root / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))


@pytest.fixture(scope="module")
def t1():
    return Image.open(fm.insightface_image("t1.jpg")).convert("RGB")


def quiet(_):
    pass


def test_the_kept_faces_are_the_ones_a_unit_picks_raw_and_normed_with_keypoints_and_sizes(pack, t1):
    pictures = [t1, ImageEnhance.Brightness(t1).enhance(0.8), t1.resize((960, 664), Image.BICUBIC)]
    result = P.build_profile("alice", pictures, P.Sources(packs={"buffalo_l": pack}), face=1, progress=quiet)
    faces = result.profile.faces["buffalo_l"]
    for i, picture in enumerate(pictures):
        want = F.pick_face(F.analyse_faces(picture, pack), 1)
        assert np.array_equal(faces.raw[i].numpy(), np.asarray(want.embedding, dtype=np.float32))
        assert np.allclose(faces.normed[i].numpy(), want.normed_embedding, atol=1e-7)
        assert np.array_equal(faces.keypoints[i].numpy(), np.asarray(want.keypoints, dtype=np.float32))
        assert faces.sizes[i].tolist() == list(picture.size)
    from lib_identity.image_input import image_hash

    assert result.profile.pictures == tuple(image_hash(p) for p in pictures)
    assert result.messages == ["profile 'alice': 3 of 3 picture(s); holds faces (buffalo_l)"]


def test_a_picture_of_someone_else_and_one_without_a_face_are_left_out_and_named(pack, t1):
    # the test pack's recogniser is a linear map of the face's pixels: the negative photo's face
    # is as far from the others as faces get (cosine near -1)
    stranger = ImageOps.invert(t1)
    flat = Image.new("RGB", t1.size, (128, 128, 128))
    pictures = [t1, ImageEnhance.Brightness(t1).enhance(0.85), stranger, flat, ImageEnhance.Contrast(t1).enhance(0.9)]
    result = P.build_profile("alice", pictures, P.Sources(packs={"buffalo_l": pack}), progress=quiet)
    left = {d["picture"]: d["why"] for d in result.profile.left_out}
    assert sorted(left) == [3, 4]
    assert "no face found in picture 4" in left[4]
    assert "far from the others" in left[3] and "another person?" in left[3]
    normed = np.stack([F.pick_face(F.analyse_faces(p, pack)).normed_embedding for p in (t1, pictures[1], stranger, pictures[4])])
    cosine = float(P.outliers.cosines_to_median(normed)[2])
    assert f"cosine {cosine:.2f}" in left[3] and cosine < P.OUTLIER_COSINE
    assert len(result.profile.pictures) == 3
    assert result.messages[0].startswith("picture 3 left out: ") and result.messages[1].startswith("picture 4 left out: ")
    assert result.messages[-1].startswith("profile 'alice': 3 of 5 picture(s)")


def test_outliers_need_a_majority(pack):
    from lib_identity.profiles.outliers import find_outliers

    rng = np.random.default_rng(0)
    person = rng.normal(size=512)
    same = [person + rng.normal(scale=0.6, size=512) for _ in range(4)]
    other = rng.normal(size=512)
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    far, note = find_outliers([unit(v) for v in same + [other]])
    assert [i for i, _ in far] == [4] and note == ""
    assert find_outliers([unit(same[0]), unit(other)]) == ([], "")  # two pictures: no majority to tell
    far, note = find_outliers([unit(rng.normal(size=512)) for _ in range(4)])
    assert far == [] and "do not agree on one person" in note


def test_limits_and_nothing_left(pack, t1):
    sources = P.Sources(packs={"buffalo_l": pack})
    with pytest.raises(P.ProfileError, match="at least one picture"):
        P.build_profile("alice", [], sources, progress=quiet)
    with pytest.raises(P.ProfileError, match="at most 50 pictures, got 51"):
        P.build_profile("alice", [t1] * 51, sources, progress=quiet)
    with pytest.raises(P.ProfileError, match="cannot name a profile"):
        P.build_profile("../alice", [t1], sources, progress=quiet)
    with pytest.raises(P.ProfileError, match="nothing in the model folders can use a profile"):
        P.build_profile("alice", [t1], P.Sources(), progress=quiet)
    flat = Image.new("RGB", (320, 240), (90, 90, 90))
    with pytest.raises(P.ProfileError, match=r"no picture is left .*picture 1 left out: buffalo_l: no face found"):
        P.build_profile("alice", [flat], sources, progress=quiet)


def test_gather_takes_what_the_installed_models_read_and_says_what_is_missing():
    from types import SimpleNamespace

    def entry(name, **info):
        base = dict(family=None, image_encoder=None, encoder_output=None, face_model=None, projection=None, variant="")
        return SimpleNamespace(name=name, short_hash="0123abcd", path=f"/m/{name}", info=SimpleNamespace(**dict(base, **info)))

    models = [
        entry("ip-adapter_sd15", family="ip-adapter", image_encoder="clip-vit-h", encoder_output="image_embeds"),
        entry("ip-adapter-plus_sdxl_vit-h", family="ip-adapter", image_encoder="clip-vit-h", encoder_output="hidden_states[-2]"),
        entry("ip-adapter_sdxl", family="ip-adapter", image_encoder="clip-vit-bigg", encoder_output="image_embeds"),
        entry("faceid-plusv2", family="ip-adapter-faceid", face_model="buffalo_l", projection="faceid-plus"),
        entry("instantid", family="instantid-adapter", face_model="antelopev2"),
        entry("photomaker-v2", family="photomaker", variant="photomaker-v2", face_model="buffalo_l"),
        SimpleNamespace(name="broken", info=None),
    ]
    found = {"clip-vit-h": "/enc/h", "insightface:buffalo_l": "/packs/my_pack"}
    sources, notes = P.gather(models, lambda need: found.get(need))
    assert sources.packs == {"my_pack": "/packs/my_pack"}
    assert sources.clip == {"clip-vit-h": ("/enc/h", {"image_embeds", "hidden_states[-2]"})}
    assert sources.face_clip == {("clip-vit-h", "my_pack"): "/enc/h"}
    assert [(h, e.name, p) for h, e, p in sources.photomaker] == [("0123abcd", "photomaker-v2", "/packs/my_pack")]
    assert notes == ["no 'antelopev2' face models: not for instantid",
                     "no clip-vit-bigg image encoder: not for the IP-Adapter models that read it"]
