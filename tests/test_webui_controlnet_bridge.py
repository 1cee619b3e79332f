"""InstantID through the ControlNet extension, against a stand-in of its ``external_code`` (fake_controlnet.py).

What a user of the extension would notice: our two face preprocessors are in its list (once,
also after a reload); the embedding one gives the chosen face's raw embedding in the shape its
InstantID adapter reads, the keypoint one the keypoints of that face in the generation's frame;
a unit with "Through the ControlNet extension" fills two free slots next to each other, embedding
first, leaves the user's units as they were and gives the slots back afterwards; its infotext is
the Identity entry only; and every way it cannot run says what to do.
"""

import importlib.util
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
import fake_controlnet  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402

FRAME = (768, 512)  # a generation size with another aspect than the picture's 1280x886
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255)]  # official draw_kps, per keypoint


def _keypoints_stand_in():
    """Until ``encoders/faces/keypoints.py`` (branch identitynet) is in main: the same two functions,
    the crop-and-resize move and the five coloured points, enough for these tests."""
    import cv2

    mod = types.ModuleType("lib_identity.encoders.faces.keypoints")

    def keypoints_in_frame(kps, source_size, target_size):
        (sw, sh), (tw, th) = source_size, target_size
        s = max(tw / sw, th / sh)
        return np.asarray(kps, np.float32) * s + np.array([(tw - sw * s) / 2, (th - sh * s) / 2], np.float32)

    def draw_keypoints(kps, width, height):
        out = np.zeros((height, width, 3), np.uint8)
        for (x, y), colour in zip(kps, COLOURS):
            cv2.circle(out, (int(x), int(y)), 10, colour, -1)
        return out

    mod.keypoints_in_frame, mod.draw_keypoints = keypoints_in_frame, draw_keypoints
    return mod


@pytest.fixture
def env(monkeypatch, tmp_path):
    from PIL import Image

    from lib_identity.encoders import default_face_cache
    from lib_identity.webui import controlnet_bridge

    if importlib.util.find_spec("lib_identity.encoders.faces.keypoints") is None:
        monkeypatch.setitem(sys.modules, "lib_identity.encoders.faces.keypoints", _keypoints_stand_in())
    models = tmp_path / "models"
    pack = fm.write_pack(str(models / "insightface" / "models" / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    install_fake_modules(monkeypatch, models_path=models)
    default_face_cache().clear()
    files = {}
    rng = np.random.default_rng(0)
    for key, name in (("adapter", "ip-adapter_instant_id_sdxl.bin"), ("identitynet", "control_instant_id_sdxl.safetensors"),
                      ("plain_adapter", "ip-adapter.bin"), ("plain_identitynet", "diffusion_pytorch_model.safetensors")):
        folder = tmp_path / "ControlNet" / key  # distinct content: the extension's titles carry the hash
        folder.mkdir(parents=True)
        files[key] = folder / name
        files[key].write_bytes(rng.integers(0, 256, 0x110000, dtype=np.uint8).tobytes())
    yield SimpleNamespace(pack=pack, files=files, picture=Image.open(fm.insightface_image("t1.jpg")).convert("RGB"),
                          bridge=controlnet_bridge)
    controlnet_bridge.restore()


def instantid_unit(env, number=1, **fields):
    values = dict(enabled=True, via_controlnet=True, images=[env.picture], face="largest", start=0.0, end=1.0,
                  ip_weight=0.8, identitynet_weight=0.7, identitynet_start=0.1, identitynet_end=0.9,
                  uncond_noise=0.0, mask=None, layer_preset="standard", pose_image=None)
    values.update(fields)
    return SimpleNamespace(number=number, unit=SimpleNamespace(**values), model=SimpleNamespace(path=str(env.files["adapter"])),
                           encoders={"insightface:antelopev2": env.pack, "instantid-identitynet": str(env.files["identitynet"])})


def new_p(ec, slots, later_args=("identity-arg",)):
    """A generation whose runner has ControlNet's slots and a later script's args after them."""
    cn = fake_controlnet.Script("ControlNet", 1, 1 + len(slots))
    later = fake_controlnet.Script("Identity", cn.args_to, cn.args_to + len(later_args))
    scripts = SimpleNamespace(alwayson_scripts=[fake_controlnet.Script("Before", 0, 1), cn, later])
    return SimpleNamespace(scripts=scripts, script_args=("before-arg", *slots, *later_args), width=FRAME[0] + 5,
                           height=FRAME[1], extra_generation_params={})


def run_like_the_extension(ec, unit):
    """What its get_control does with a unit: the preprocessor on the unit's image and sliders."""
    pre = ec.Preprocessor.get_preprocessor(unit.module)
    return pre.cached_call(unit.image, resolution=unit.processor_res, slider_1=unit.threshold_a,
                           slider_2=unit.threshold_b, low_vram=False, model=unit.model)


def test_our_preprocessors_join_the_extensions_registry_once_also_after_a_reload(env, monkeypatch):
    ec = fake_controlnet.install(monkeypatch)
    assert env.bridge.register_preprocessors()
    first = ec.Preprocessor.get_preprocessor("identity_instant_id_face_embedding")
    assert env.bridge.register_preprocessors()  # Reload UI runs the script again: no "already registered"
    names = list(ec.Preprocessor.all_processors_by_name)
    assert names.count("identity_instant_id_face_embedding") == names.count("identity_instant_id_face_keypoints") == 1
    again = ec.Preprocessor.get_preprocessor("identity_instant_id_face_embedding")
    assert again is not first and "Instant-ID" in again.tags and again.returns_image is False


def test_a_preprocessor_of_someone_else_with_our_name_is_left_alone(env, monkeypatch):
    ec = fake_controlnet.install(monkeypatch)
    theirs = fake_controlnet._Builtin("identity_instant_id_face_keypoints")
    ec.Preprocessor.add_supported_preprocessor(theirs)
    assert not env.bridge.register_preprocessors()
    assert ec.Preprocessor.get_preprocessor("identity_instant_id_face_keypoints") is theirs


def test_the_preprocessors_give_the_chosen_faces_embedding_and_keypoints_in_the_frame(env, monkeypatch):
    from lib_identity.encoders import analyse_faces

    ec = fake_controlnet.install(monkeypatch)
    env.bridge.register_preprocessors()
    faces = analyse_faces(env.picture, env.pack)
    image = np.asarray(env.picture)
    for index in (0, 3):
        unit = ec.ControlNetUnit(enabled=True, module="identity_instant_id_face_embedding", image=image, threshold_a=index)
        result = run_like_the_extension(ec, unit)
        emb = result.value
        assert tuple(emb.shape) == (512,) and str(emb.dtype) == "torch.float32"
        assert emb.reshape(1, -1, 512).shape == (1, 1, 512)  # how the extension's InstantID adapter reads it
        np.testing.assert_array_equal(emb.numpy(), faces[index].embedding)  # raw, not normed
        assert result.display_images[0].shape == image.shape  # the picture with the chosen face boxed

    unit = ec.ControlNetUnit(enabled=True, module="identity_instant_id_face_keypoints", image=image, threshold_a=2,
                             processor_res=FRAME[0], threshold_b=FRAME[1])
    drawn = run_like_the_extension(ec, unit).value
    assert drawn.shape == (FRAME[1], FRAME[0], 3) and drawn.dtype == np.uint8
    w, h = fm.T1_SIZE
    s = max(FRAME[0] / w, FRAME[1] / h)  # crop and resize: cover the frame, centred
    for (x, y), colour in zip(faces[2].keypoints, COLOURS):
        fx, fy = x * s + (FRAME[0] - w * s) / 2, y * s + (FRAME[1] - h * s) / 2
        assert tuple(drawn[int(round(fy)), int(round(fx))]) == colour

    own = ec.ControlNetUnit(enabled=True, module="identity_instant_id_face_keypoints", image=image)
    assert run_like_the_extension(ec, own).value.shape == (h, w, 3)  # no canvas given: the picture's size

    with pytest.raises(Exception, match="face index 9 is out of range"):
        run_like_the_extension(ec, ec.ControlNetUnit(enabled=True, module="identity_instant_id_face_embedding",
                                                     image=image, threshold_a=9))


def test_a_unit_fills_two_adjacent_free_slots_in_order_and_the_slots_come_back(env, monkeypatch):
    from lib_identity.encoders import analyse_faces

    ec = fake_controlnet.install(monkeypatch, model_files=[env.files["adapter"], env.files["identitynet"]])
    mine = ec.ControlNetUnit(enabled=True, module="canny", weight=1.3)
    slots = (mine, ec.ControlNetUnit(), {"enabled": True, "module": "canny"}, ec.ControlNetUnit(), ec.ControlNetUnit())
    p = new_p(ec, slots)
    original = p.script_args
    resolved = instantid_unit(env, face=[500, 250, 560, 400])  # a box around the centre face

    assert env.bridge.apply(p, [resolved]) == 2
    units = ec.get_all_units_in_processing(p)
    assert len(units) == 5 and units[0] is mine and mine.weight == 1.3
    assert units[1].enabled is False and units[2].enabled and units[2].module == "canny"
    emb, kps = units[3], units[4]
    assert (emb.module, kps.module) == ("identity_instant_id_face_embedding", "identity_instant_id_face_keypoints")
    assert emb.model.startswith("ip-adapter_instant_id_sdxl [") and kps.model.startswith("control_instant_id_sdxl [")
    assert (emb.weight, emb.guidance_start, emb.guidance_end) == (0.8, 0.0, 1.0)
    assert (kps.weight, kps.guidance_start, kps.guidance_end) == (0.7, 0.1, 0.9)
    assert not emb.save_detected_map and not emb.pixel_perfect
    scripts = p.scripts.alwayson_scripts
    assert [(s.args_from, s.args_to) for s in scripts] == [(0, 1), (1, 6), (6, 7)]  # nothing moved
    assert p.script_args[6] == "identity-arg"

    faces = analyse_faces(env.picture, env.pack)
    centre = int(np.argmax([f.area for f in faces]))
    np.testing.assert_array_equal(run_like_the_extension(ec, emb).value.numpy(), faces[centre].embedding)
    assert run_like_the_extension(ec, kps).value.shape == (FRAME[1], FRAME[0], 3)  # width aligned to 8, as the extension does

    p.extra_generation_params.update({"ControlNet 0": mine.serialize(), "ControlNet 1": units[2].serialize(),
                                      "ControlNet 2": emb.serialize(), "ControlNet 3": kps.serialize()})
    env.bridge.forget_infotext(p)
    assert sorted(p.extra_generation_params) == ["ControlNet 0", "ControlNet 1"]

    env.bridge.restore(p)
    assert p.script_args is original


def test_without_identitynet_weight_only_the_embedding_unit_is_written(env, monkeypatch):
    ec = fake_controlnet.install(monkeypatch, model_files=[env.files["adapter"]])
    p = new_p(ec, (ec.ControlNetUnit(enabled=True, module="canny"), ec.ControlNetUnit()))
    assert env.bridge.apply(p, [instantid_unit(env, identitynet_weight=0.0)]) == 1
    assert ec.get_all_units_in_processing(p)[1].module == "identity_instant_id_face_embedding"


@pytest.mark.parametrize("case, message", [
    ("absent", "ControlNet extension \\(sd-webui-controlnet\\) is not installed or not enabled: install sd-webui-controlnet 1.1.440"),
    ("old", "too old for InstantID units"),
    ("names", "'ip-adapter \\[.*without 'instant_id' in its name.*rename the file to ip-adapter_instant_id_sdxl.bin"),
    ("unlisted", "does not list IdentityNet .*models/ControlNet.*as control_instant_id_sdxl.safetensors"),
    ("slots", "needs 2 free units next to each other for InstantID; 3 units, 2 free.*ControlNet unit number"),
    ("pictures", "field 'images'.*takes one picture"),
    ("weight", "field 'ip_weight'.*from 0 to 2"),
    ("group pose", "field 'pose_image'.*shows 6 faces.*region.*run the unit natively"),
])
def test_every_way_it_cannot_run_says_what_to_do(env, monkeypatch, case, message):
    files = [env.files["adapter"]] if case == "unlisted" else [env.files["adapter"], env.files["identitynet"]]
    if case == "names":
        files = [env.files["plain_adapter"], env.files["identitynet"]]
    ec = fake_controlnet.install(monkeypatch, model_files=files, with_instant_id=case != "old")
    if case == "absent":
        monkeypatch.delitem(sys.modules, "internal_controlnet.external_code")
    slots = (ec.ControlNetUnit(), ec.ControlNetUnit(enabled=True, module="canny"), ec.ControlNetUnit())
    p = new_p(ec, slots if case == "slots" else slots + (ec.ControlNetUnit(),))
    original = p.script_args
    resolved = instantid_unit(env, number=2)
    if case == "names":
        resolved.model.path = str(env.files["plain_adapter"])
    if case == "pictures":
        resolved.unit.images = [env.picture, env.picture]
    if case == "weight":
        resolved.unit.ip_weight = 2.5
    if case == "group pose":  # several faces bind the unit to one face's region, which the extension cannot take
        resolved.unit.pose_image, resolved.unit.pose_face = env.picture, "auto"
    with pytest.raises(Exception, match=message) as failure:
        env.bridge.apply(p, [resolved])
    if case not in ("absent", "old"):
        assert "Identity unit 2" in str(failure.value)
    assert p.script_args is original  # nothing written


def test_the_status_line_says_the_extension_needs_instant_id_in_both_names(env, monkeypatch):
    fake_controlnet.install(monkeypatch)
    good = env.bridge.names_status(str(env.files["adapter"]), str(env.files["identitynet"]))
    assert "⚠" not in good
    bad = env.bridge.names_status(str(env.files["plain_adapter"]), str(env.files["plain_identitynet"]))
    assert "'instant_id'" in bad and "ip-adapter.bin → ip-adapter_instant_id_sdxl" in bad
    assert "diffusion_pytorch_model.safetensors → control_instant_id_sdxl" in bad


def test_a_problem_found_before_processing_stops_the_run_at_the_first_unet_call(env, monkeypatch):
    """The WebUI carries on without a script whose hook raised: the message must reach the user."""
    import torch

    from lib_identity.webui import runtime

    model = SimpleNamespace(model=torch.nn.Linear(2, 2))
    install_fake_modules(monkeypatch, models_path=env.pack, sd_model=model)
    monkeypatch.setattr(runtime, "units_for", lambda p, args: [instantid_unit(env).unit])
    monkeypatch.setattr(runtime.lookup, "resolve_units", lambda units, base: [instantid_unit(env)])
    p = SimpleNamespace(sd_model=model, extra_generation_params={}, sample=None)
    runtime.before_process(p, [])  # no ControlNet extension loaded
    runtime.process(p, [])
    try:
        with pytest.raises(Exception, match="not installed or not enabled"):
            model.model(torch.zeros(1, 2))
    finally:
        runtime.cleanup()
