"""Live WebUI: FaceID units through the real API on insightface's group photo, a missing face pack,
the faces route, and a clean UNet afterwards.

Runs only when SD_WEBUI_ROOT is set (tests/webui_live.py). The WebUI's venv gets insightface and
onnxruntime from this checkout's install.py first (``installer_runs``). The FaceID files are random
weights in the official full-size layouts and the face pack ``buffalo_l`` is a small ONNX pack that
finds t1.jpg's six faces (tests/face_models.py), both written by the harness into the
--identity-models-dir folder.
"""

import base64
import json
import re

import numpy as np
import pytest
from PIL import Image

from webui_installer import installer_runs  # noqa: F401  (session fixture: install.py in the WebUI's venv)
from webui_live import LIVE_FACE_PACK, WebUIError, decode_images, small_payload, webui, with_units  # noqa: F401
from webui_live import pixel_digest as pixels

FACEID = "ip-adapter-faceid_sd15"
PLUSV2 = "ip-adapter-faceid-plusv2_sd15"


@pytest.fixture(scope="module")
def live(webui, installer_runs):
    """The running WebUI once install.py has put the face packages into its venv."""
    assert installer_runs.first.returncode == 0, installer_runs.first.stderr[-4000:]
    return webui


@pytest.fixture(scope="module")
def group_photo():
    import face_models as fm

    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return base64.b64encode(fh.read()).decode()


@pytest.fixture(scope="module")
def plain(live):
    return pixels(live.txt2img(small_payload()))


def test_the_faces_route_finds_the_six_faces_of_the_group_photo(live, group_photo):
    import face_models as fm

    answer = live.post("/identity/v1/faces", {"image": group_photo})
    assert answer["pack"] == LIVE_FACE_PACK and answer["size"] == list(fm.T1_SIZE)
    assert [f["index"] for f in answer["faces"]] == list(range(6))
    # largest first: the centre face of t1.jpg (150 px) is index 0
    x0, y0, x1, y1 = answer["faces"][0]["box"]
    assert abs((x0 + x1) / 2 - 528) < 8 and abs((y0 + y1) / 2 - 328) < 8, answer["faces"][0]
    assert answer["preview"].startswith("data:image/png;base64,")


def test_a_faceid_unit_on_a_chosen_face_changes_the_image_and_is_recorded(live, plain, group_photo):
    result = live.txt2img(with_units({"model": FACEID, "images": [group_photo], "face": 2}))
    assert pixels(result) != plain
    image = np.asarray(decode_images(result)[0].convert("RGB"), dtype=np.float32)
    assert image.std() > 1.0  # a NaN/inf latent decodes to a flat picture; the random LoRA must keep it finite
    info = json.loads(result["info"])
    entry = info["extra_generation_params"]["Identity 1"]
    models = {m["name"]: m for m in live.get("/identity/v1/models")["models"]}
    assert f"model: {FACEID} [{models[FACEID]['hash']}]" in entry, entry
    assert "face: 2" in entry, entry
    # the face chosen matters: another face gives another image
    other = live.txt2img(with_units({"model": FACEID, "images": [group_photo], "face": 4}))
    assert pixels(other) not in (pixels(result), plain)


def test_a_faceid_plus_v2_unit_without_its_face_pack_fails_with_the_message(live, group_photo):
    pack = live.identity_models / LIVE_FACE_PACK
    hidden = pack.with_name(LIVE_FACE_PACK + ".hidden")
    pack.rename(hidden)
    try:
        with pytest.raises(WebUIError) as e:
            live.post("/sdapi/v1/txt2img", with_units({"model": PLUSV2, "images": [group_photo], "s_scale": 0.5}))
    finally:
        hidden.rename(pack)
    message = str(e.value)
    assert "answered HTTP 422" in message
    assert f"Identity unit 1, field 'model': model '{PLUSV2}' needs" in message, message
    for words in (f"insightface model pack '{LIVE_FACE_PACK}' not found", "det_10g.onnx", str(pack)):
        assert words in message, (words, message)


def test_the_unet_is_clean_after_faceid(live, plain, group_photo):
    live.txt2img(with_units({"model": FACEID, "images": [group_photo], "lora_weight": 0.7}))
    with pytest.raises(WebUIError):  # a unit that fails (bad field) after one that ran
        live.post("/sdapi/v1/txt2img", with_units({"model": FACEID, "images": [group_photo], "lora_weight": 99}))
    assert pixels(live.txt2img(small_payload())) == plain


def test_the_face_pack_setting_chooses_the_pack_also_without_the_ui(live, group_photo):
    # the harness runs --nowebui, where the WebUI registers no settings of extensions by itself
    payload = with_units({"model": FACEID, "images": [group_photo]},
                         override_settings={"identity_face_pack_buffalo_l": "no-such-pack"})
    with pytest.raises(WebUIError) as e:
        live.post("/sdapi/v1/txt2img", payload)
    assert "insightface model pack 'no-such-pack' not found" in str(e.value), str(e.value)
    # the API gate answers before the WebUI applies override_settings, so nothing is left set:
    # the next request without the override finds the pack again
    assert live.get("/sdapi/v1/options").get("identity_face_pack_buffalo_l", LIVE_FACE_PACK) == LIVE_FACE_PACK
    live.txt2img(with_units({"model": FACEID, "images": [group_photo]}))



def test_each_image_of_the_api_answer_carries_its_likeness(live, group_photo):
    """The API's ``info`` has each image's ``Identity 1 likeness``, the number this checkout computes
    on the returned pixels with the same pack; the setting turns it off."""
    import face_models as fm

    from lib_identity import likeness

    result = live.txt2img(with_units({"model": FACEID, "images": [group_photo], "face": 2}, batch_size=2))
    info = json.loads(result["info"])
    images = decode_images(result)
    pack = str(live.identity_models / LIVE_FACE_PACK)
    reference = likeness.reference_embedding([Image.open(fm.insightface_image("t1.jpg")).convert("RGB")], pack, 2)
    values = []
    for image, text in zip(images, info["infotexts"]):
        expected = likeness.measure(image.convert("RGB"), reference, pack)
        written = re.search(r"Identity 1 likeness: (no face|-?\d\.\d\d)(,|$)", text)
        assert written, text
        if expected.value is None:
            assert written.group(1) == "no face"
        else:  # two decimals; another onnxruntime may differ in the last bits
            assert abs(float(written.group(1)) - expected.value) <= 0.006, (expected, text)
        values.append(written.group(1))
    assert len(values) == 2
    assert info["extra_generation_params"]["Identity 1 likeness"] == values[0]

    off = live.txt2img(with_units({"model": FACEID, "images": [group_photo], "face": 2},
                                  override_settings={"identity_likeness": False}))
    assert "likeness" not in json.loads(off["info"])["infotexts"][0]


def test_an_xyz_plot_through_the_api_carries_the_likeness_table(live, group_photo):
    """The real X/Y/Z script (CFG Scale 4 and 6): the grid's infotext ends with the table, whose cells
    are the numbers of the cells' own infotexts."""
    payload = with_units({"model": FACEID, "images": [group_photo], "face": 2}, script_name="x/y/z plot",
                         # X: CFG Scale (index 6 of txt2img's axes in WebUI 1.10), no Y, no Z, legend on
                         script_args=[6, "4,6", [], 0, "", [], 0, "", [], True, False, False, False, False, False,
                                      False, 0, False])
    info = json.loads(live.txt2img(payload)["info"])
    grid, cells = info["infotexts"][0], info["infotexts"][1:]
    assert len(cells) == 2, info["infotexts"]
    written = [re.search(r"Identity 1 likeness: (no face|-?\d\.\d\d)", c).group(1) for c in cells]
    head, sep, quoted = grid.partition(", Identity likeness table: ")
    assert sep, grid
    table = json.loads(quoted).splitlines()
    assert table[1] == "unit 1:"
    rows = [[c.strip() for c in line.split("|")] for line in table[2:]]
    assert rows == [["CFG Scale: 4.0", "CFG Scale: 6.0"], written], table
