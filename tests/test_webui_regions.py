"""Several people in one image, through the WebUI glue (stand-in ``modules``, real ldm UNets, the
real insightface code on insightface's t1.jpg with the tests' small ONNX packs).

What a user would notice: two units with masks each change only their own region (FaceID on
SD1.5, InstantID on SDXL, its IdentityNet residuals too); two InstantID units given one pose
picture of several faces draw two different keypoint images and act in two separate regions
where those faces are, and the likeness of each is measured on the face in its region; the README's
two-person payload runs as it is written.
"""

import base64
import json
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from faceid_helpers import write_faceid  # noqa: E402
from handoff import Wrapper, b64, generate  # noqa: E402
from instantid_helpers import standin_modules, write_instantid_adapter, write_standin_identitynet  # noqa: E402
from unet_helpers import CONTEXT, unet_inputs  # noqa: E402
from unet_models import SD15, SDXL, build_ldm_unet, randomize_  # noqa: E402

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


@pytest.fixture(scope="module")
def t1_b64():
    with open(fm.insightface_image("t1.jpg"), "rb") as fh:
        return base64.b64encode(fh.read()).decode()


def _env(monkeypatch, tmp_path, base):
    import lib_identity.models  # noqa: F401 - loaded before the stand-in IdentityNet takes its module's name
    from lib_identity import discovery
    from lib_identity.encoders import default_face_cache
    from lib_identity.methods.identitynet_cache import identitynets
    from lib_identity.webui import runtime

    unet = randomize_(build_ldm_unet(base, context_dim=CONTEXT[base]), seed=12).eval()
    folder, models = tmp_path / "identity-models", tmp_path / "models"
    folder.mkdir()
    if base == SDXL:
        standin_modules(monkeypatch)
        identitynets.clear()
        adapter = write_instantid_adapter(folder, unet, seed=1)
        (models / "ControlNet").mkdir(parents=True)
        write_standin_identitynet(models / "ControlNet" / "control_instant_id_sdxl.safetensors", unet, seed=2)
        pack = fm.write_antelopev2_pack(str(models / "insightface" / "models" / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    else:
        adapter = write_faceid(folder, unet, "faceid", seed=1)
        pack = fm.write_pack(str(models / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    model = SimpleNamespace(is_sdxl=base == SDXL, is_sd1=base == SD15, model=Wrapper(unet))
    callbacks = install_fake_modules(monkeypatch, models_path=models, identity_models_dir=str(folder), sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    default_face_cache().clear()
    return SimpleNamespace(model=model, unet=unet, callbacks=callbacks, runtime=runtime, adapter=adapter.stem, pack=pack,
                           inputs=unet_inputs(2, CONTEXT[base], hw=(8, 8)))


@pytest.fixture
def faceid(monkeypatch, tmp_path):
    env = _env(monkeypatch, tmp_path, SD15)
    yield env
    env.runtime.cleanup()


@pytest.fixture
def instantid(monkeypatch, tmp_path):
    from lib_identity.methods.identitynet_cache import identitynets

    env = _env(monkeypatch, tmp_path, SDXL)
    yield env
    env.runtime.cleanup()
    identitynets.clear()


@pytest.fixture
def residuals(monkeypatch):
    """Every UNet call's control residuals, as the hooks add them: a list of [skip maps…, middle]."""
    from lib_identity.unet.control import ControlHooks

    seen, real = [], ControlHooks._on_unet_call

    def spy(self, module, args, kwargs):
        out = real(self, module, args, kwargs)
        seen.append([r for _, r in sorted(self._skips.items())] + ([self._middle] if self._middle is not None else []))
        return out

    monkeypatch.setattr(ControlHooks, "_on_unet_call", spy)
    return seen


@pytest.fixture
def prepared(monkeypatch):
    """What ``prepare_units`` made for each generation (the units' prompts and controls)."""
    import lib_identity.methods as methods

    made, real = [], methods.prepare_units
    monkeypatch.setattr(methods, "prepare_units", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    return made


def strip_mask(left: bool) -> str:
    """A 64x64 mask, white in the left (or right) quarter: 2 of 8 columns of the finest grid."""
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 16, 64) if left else (48, 0, 64, 64))
    return b64(mask)


def columns(t: torch.Tensor, side: int, cols: slice) -> torch.Tensor:
    """``[rows, side*side, width]`` attention output -> the given columns of its square grid."""
    return t.reshape(t.shape[0], side, side, -1)[:, :, cols]


def check_two_regions(both, left_alone, right_alone) -> int:
    """At every attention grid of 4x4 tokens or more: nothing added between the two strips, something in
    each; a unit alone adds nothing outside its own strip. Returns how many layers were checked."""
    checked = 0
    for name in both.text:
        n = both.added(name).shape[1]
        side = int(n ** 0.5)
        if side < 4:
            continue  # coarser grids average the strips with what lies between them
        q = side // 4
        assert torch.count_nonzero(columns(both.added(name), side, slice(q, side - q))) == 0, name
        assert columns(both.added(name), side, slice(0, q)).abs().max() > 1e-4, name
        assert columns(both.added(name), side, slice(side - q, side)).abs().max() > 1e-4, name
        assert torch.count_nonzero(columns(left_alone.added(name), side, slice(q, side))) == 0, name
        assert torch.count_nonzero(columns(right_alone.added(name), side, slice(0, side - q))) == 0, name
        checked += 1
    # the first cross-attention sees the same input in all three runs: there the two units add exactly
    # what each adds alone
    first = next(iter(both.text))
    torch.testing.assert_close(both.added(first), left_alone.added(first) + right_alone.added(first), atol=1e-6, rtol=0)
    return checked


def test_two_faceid_units_with_masks_change_only_their_regions(faceid, t1_b64):
    # LoRA weight 0: FaceID's LoRA changes the UNet's weights everywhere (it has no region)
    left = {"model": faceid.adapter, "images": [t1_b64], "face": 2, "lora_weight": 0, "mask": strip_mask(True)}
    right = dict(left, face=4, mask=strip_mask(False))
    (both,) = generate(faceid, [left, right])
    (left_alone,) = generate(faceid, [left])
    (right_alone,) = generate(faceid, [right])
    assert check_two_regions(both, left_alone, right_alone) >= 2


def test_two_instantid_units_with_masks_change_only_their_regions_and_residuals(instantid, t1_b64, residuals):
    left = {"model": instantid.adapter, "images": [t1_b64], "face": 2, "mask": strip_mask(True)}
    right = dict(left, face=4, mask=strip_mask(False))
    (both,) = generate(instantid, [left, right])
    (left_alone,) = generate(instantid, [left])
    (right_alone,) = generate(instantid, [right])
    assert check_two_regions(both, left_alone, right_alone) >= 1
    checked = 0
    for maps, alone in zip(residuals[0], residuals[1]):  # both units' residuals, then the left unit's alone
        w = maps.shape[-1]
        if w < 4:
            continue
        q = w // 4
        assert torch.count_nonzero(maps[..., q:w - q]) == 0
        assert maps[..., :q].abs().max() > 0 and maps[..., w - q:].abs().max() > 0
        assert torch.count_nonzero(alone[..., q:]) == 0
        checked += 1
    assert checked >= 3


def test_two_instantid_units_with_one_group_pose_picture_take_two_faces_and_two_regions(
        instantid, t1_b64, residuals, prepared):
    from lib_identity.encoders.faces import analyse_faces, draw_keypoints, keypoints_in_frame
    from lib_identity.encoders.faces.keypoints import points_in_frame
    from lib_identity.methods.pose_faces import left_to_right
    from lib_identity.unet.masks import resize_mask

    inputs = unet_inputs(2, CONTEXT[SDXL], hw=(8, 12))  # a 96x64 frame: about the photo's shape
    a = {"model": instantid.adapter, "images": [t1_b64], "face": 2, "pose_image": t1_b64}
    b = dict(a, face=4)
    params = {}
    (seen,) = generate(instantid, [a, b], inputs=inputs, params=params)
    assert "pose image" in params["Identity 1"] and "pose face" not in params["Identity 1"]  # auto is not written

    parts = prepared[-1]
    first, second = parts.controls
    photo = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    faces = left_to_right(analyse_faces(photo, instantid.pack))
    for control, face in zip(parts.controls, faces[:2]):  # the first and second face from the left
        want = draw_keypoints(keypoints_in_frame(face.keypoints, photo.size, (96, 64)), 96, 64)
        assert np.array_equal(control.hint(96, 64), want)
    assert not np.array_equal(first.hint(96, 64), second.hint(96, 64))

    regions = [c.mask(96, 64) for c in parts.controls]
    assert parts.prompts[0].mask is first.mask and parts.prompts[1].mask is second.mask  # tokens and residuals alike
    assert all(r.sum() > 0 for r in regions) and (regions[0] * regions[1]).sum() == 0
    for region, face in zip(regions, faces[:2]):  # each centred on its face's box, moved into the frame
        ys, xs = np.nonzero(region)
        (cx, cy), = points_in_frame([[(face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2]], photo.size, (96, 64))
        assert abs((xs.min() + xs.max()) / 2 - cx) <= 1 and abs((ys.min() + ys.max()) / 2 - cy) <= 1

    # in the UNet: where neither region reaches, neither the tokens nor IdentityNet add anything
    union = torch.from_numpy(regions[0] + regions[1])
    checked = 0
    for name in seen.text:
        added = seen.added(name)
        if added.shape[1] != 8 * 12:
            continue
        outside = (resize_mask(union, 8, 12) == 0).reshape(-1)
        assert outside.any() and torch.count_nonzero(added[:, outside]) == 0, name
        assert added[:, ~outside].abs().max() > 1e-4, name
        checked += 1
    for maps in residuals[0]:
        outside = resize_mask(union, *maps.shape[-2:]) == 0
        if outside.any():
            assert torch.count_nonzero(maps[..., outside]) == 0
            checked += 1
    assert checked >= 2

    # the likeness measures each unit on the face in its region: on the group photo itself, unit 1 (reference
    # face 2, drawn on the first face from the left) gets that first face's cosine to its reference, not 1
    from lib_identity.likeness.measure import unit_vector
    from lib_identity.webui import likeness

    run = likeness.state.latest
    assert [t.mask for t in run.targets] == [first.mask, second.mask]
    measured = run.measure_image(photo, "group photo")
    largest_first = sorted(analyse_faces(photo, instantid.pack), key=lambda f: -(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]))
    for number, (face, reference) in enumerate(zip(faces[:2], (largest_first[2], largest_first[4])), start=1):
        want = float(np.dot(unit_vector(face.embedding), unit_vector(reference.embedding)))
        assert measured[number].value == pytest.approx(want, abs=1e-6), number
        whole = max(float(np.dot(unit_vector(f.embedding), unit_vector(reference.embedding))) for f in faces)
        assert whole == pytest.approx(1.0, abs=1e-5)  # over the whole photo the best match is the reference itself
    assert measured[1].value < 0.99  # unit 1's reference is not the face its region holds: the region decides


def test_the_readmes_two_person_payload_parses_validates_and_runs(instantid, t1_b64, prepared):
    text = open(README, encoding="utf-8").read()
    m = re.search(r"<!-- two-people example[^\n]*-->\n```json\n(.*?)```", text, re.S)
    assert m, "README.md has no two-people example"
    person_a, person_b = b64(fm.coarse_noise(Image.open(fm.insightface_image("t1.jpg")).convert("RGB"))), t1_b64
    payload = json.loads(m.group(1).replace("<base64 of person A>", person_a).replace("<base64 of person B>", person_b)
                         .replace("<base64 of the group photo>", t1_b64))
    units = payload["alwayson_scripts"]["identity"]["args"]
    assert len(units) == 2 and {u["model"] for u in units} == {"ip-adapter_instant_id_sdxl"}
    for u in units:
        u["model"] = instantid.adapter  # the test's adapter file in place of the published one
    assert payload["width"] > payload["height"]
    latent = (8, 12)  # landscape as the payload, at a test's size (the bare ldm UNet wants even sizes)
    params = {}
    generate(instantid, units, inputs=unet_inputs(2, CONTEXT[SDXL], hw=latent), params=params)
    assert set(params) >= {"Identity 1", "Identity 2"}
    parts = prepared[-1]
    w, h = latent[1] * 8, latent[0] * 8
    assert len(parts.controls) == 2 and all(c.mask is not None for c in parts.controls)
    assert parts.controls[0].hint(w, h).tobytes() != parts.controls[1].hint(w, h).tobytes()
    assert (parts.controls[0].mask(w, h) * parts.controls[1].mask(w, h)).sum() == 0
