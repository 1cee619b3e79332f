"""The PhotoMaker method: files in the official layout -> the PromptIdentity (ID embeddings, fuse, key).

ID embeddings are compared with an independent computation (transformers' CLIP on
transformers' CLIPImageProcessor pixels, insightface's own FaceAnalysis for V2's faces, the
published formulas), for V1 and V2 and 1, 2 and 4 pictures; V2's faces come from real photos
(insightface's t1.jpg) through the real insightface code, with a small buffalo_l pack built here.
"""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

import face_models as fm
from lib_identity import formats
from lib_identity import units as U
from lib_identity.errors import CheckpointError, UnitError
from lib_identity.methods import photomaker
from photomaker_helpers import FUSE, fuse_reference, official_face_embeddings, reference_id_embeds, write_photomaker
from unet_helpers import CONTEXT
from unet_models import SDXL, build_ldm_unet


@pytest.fixture(scope="module")
def unet():
    return build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL], device="meta")


@pytest.fixture(scope="module")
def files(unet, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pm")
    return {"v1": write_photomaker(folder, unet, v2=False, seed=1, suffix=".bin"),
            "v2": write_photomaker(folder, unet, v2=True, seed=2, suffix=".safetensors", name="my face model")}


@pytest.fixture(scope="module")
def pack_root(tmp_path_factory):
    """A folder laid out as insightface's root: models/buffalo_l/{det_10g,w600k_r50}.onnx."""
    root = tmp_path_factory.mktemp("insightface")
    fm.write_pack(str(root / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    return root


@pytest.fixture(scope="module")
def photos():
    """Four real photos with the faces where the pack's detector finds them: t1.jpg as shipped,
    smaller, darker, and mirrored in colour order (grey levels), so every picture differs."""
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    return [t1, t1.resize((960, 664), Image.BICUBIC), ImageEnhance.Brightness(t1).enhance(0.7),
            ImageOps.grayscale(t1).convert("RGB")]


@pytest.fixture(autouse=True)
def _fresh():
    yield
    photomaker.release()


def resolved(path, pictures, pack=None, number=1, **fields):
    info = formats.inspect(str(path))
    entry = SimpleNamespace(name=os.path.basename(str(path)), title=os.path.basename(str(path)), path=str(path), info=info)
    unit = dataclasses.replace(U.Unit(), enabled=True, model=entry.title, images=tuple(pictures), **fields)
    encoders = {"insightface:buffalo_l": str(pack)} if pack else {}
    return U.ResolvedUnit(number, unit, entry, encoders)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_v1_id_embeds_equal_transformers_clip_and_both_projections(files, photos, count):
    pictures = photos[:count]
    c = photomaker.prepare(resolved(files["v1"], pictures), device="cpu", dtype=torch.float32)
    want = reference_id_embeds(files["v1"], pictures, v2=False)
    ids = c.identity.id_embeds
    assert ids.shape == (count, FUSE) and ids.dtype == torch.float32 and ids.device.type == "cpu"
    torch.testing.assert_close(ids, want, atol=2e-5, rtol=1e-5)
    assert c.pictures_used == tuple(range(count))
    assert c.identity.trigger == "img" and c.identity.unit_number == 1


@pytest.mark.parametrize("count", [1, 2, 4])
def test_v2_id_embeds_use_each_pictures_raw_face_embedding_and_the_whole_picture(files, photos, pack_root, count):
    pictures = photos[:count]
    r = resolved(files["v2"], pictures, pack_root / "models" / "buffalo_l")
    c = photomaker.prepare(r, device="cpu", dtype=torch.float32)
    used, faces = official_face_embeddings(pictures, pack_root)
    assert used == list(range(count))
    assert float(faces.norm(dim=-1).min()) > 2.0  # raw ArcFace output, not unit length
    want = reference_id_embeds(files["v2"], pictures, v2=True, face_embeds=faces)
    assert c.identity.id_embeds.shape == (2 * count, FUSE)  # two tokens per picture, picture by picture
    torch.testing.assert_close(c.identity.id_embeds, want, atol=2e-5, rtol=1e-5)


def test_the_fuse_is_the_files_fuse_module_on_the_class_rows_device_and_dtype(files, photos):
    c = photomaker.prepare(resolved(files["v1"], photos[:2]), device="cpu", dtype=torch.float32)
    rows = torch.randn(2, FUSE, generator=torch.Generator().manual_seed(3))
    fused = c.identity.fuse(rows, c.identity.id_embeds)
    torch.testing.assert_close(fused, fuse_reference(files["v1"], rows, c.identity.id_embeds), atol=1e-5, rtol=1e-5)
    half = c.identity.fuse(rows.to(torch.bfloat16), c.identity.id_embeds)
    assert half.dtype == torch.bfloat16 and not torch.equal(half.float(), rows.to(torch.bfloat16).float())
    with pytest.raises(Exception, match="class-word rows"):
        c.identity.fuse(rows[:1], c.identity.id_embeds)


def test_the_key_follows_the_pictures_the_model_and_the_unit_settings(files, photos, unet, tmp_path):
    first = photomaker.prepare(resolved(files["v1"], photos[:2]), device="cpu", dtype=torch.float32).identity
    again = photomaker.prepare(resolved(files["v1"], photos[:2]), device="cpu", dtype=torch.float32).identity
    other = photomaker.prepare(resolved(files["v1"], photos[1:3]), device="cpu", dtype=torch.float32).identity
    padded = photomaker.prepare(resolved(files["v1"], photos[:2], preparation="pad"), device="cpu",
                                dtype=torch.float32).identity
    assert first.key == again.key and first.key != other.key and first.key != padded.key
    another_file = write_photomaker(tmp_path, unet, v2=False, seed=9)
    assert photomaker.prepare(resolved(another_file, photos[:2]), device="cpu",
                              dtype=torch.float32).identity.key != first.key
    # the unit's trigger, start and number reach the identity as they are
    r = resolved(files["v1"], photos[:1], number=3, trigger="sks", start=0.35)
    ident = photomaker.prepare(r, device="cpu", dtype=torch.float32).identity
    assert (ident.unit_number, ident.trigger, ident.start) == (3, "sks", 0.35)


def test_pictures_without_a_face_are_skipped_and_named_none_at_all_is_an_error(files, photos, pack_root, capsys):
    flat = Image.new("RGB", (640, 480), (128, 128, 128))
    pack = pack_root / "models" / "buffalo_l"
    c = photomaker.prepare(resolved(files["v2"], [flat, photos[0]], pack), device="cpu", dtype=torch.float32)
    assert "ID picture 1 has no face" in capsys.readouterr().out
    alone = photomaker.prepare(resolved(files["v2"], [photos[0]], pack), device="cpu", dtype=torch.float32)
    assert c.pictures_used == (1,)
    torch.testing.assert_close(c.identity.id_embeds, alone.identity.id_embeds, atol=0, rtol=0)
    with pytest.raises(UnitError) as e:
        photomaker.prepare(resolved(files["v2"], [flat, flat], pack), device="cpu", dtype=torch.float32)
    assert e.value.field == "images" and "none of the 2 pictures" in str(e.value) and "face" in str(e.value)
    with pytest.raises(UnitError, match="the ID picture has none that insightface finds"):
        photomaker.prepare(resolved(files["v2"], [flat], pack), device="cpu", dtype=torch.float32)


def test_the_face_choice_of_the_unit_picks_the_face(files, photos, pack_root):
    pack = pack_root / "models" / "buffalo_l"
    largest = photomaker.prepare(resolved(files["v2"], photos[:1], pack), device="cpu", dtype=torch.float32)
    third = photomaker.prepare(resolved(files["v2"], photos[:1], pack, face=2), device="cpu", dtype=torch.float32)
    assert not torch.equal(largest.identity.id_embeds, third.identity.id_embeds)
    with pytest.raises(UnitError, match="face index 9 is out of range"):
        photomaker.prepare(resolved(files["v2"], photos[:1], pack, face=9), device="cpu", dtype=torch.float32)


# ------------------------------------------------------------------------------------ loading


def test_bin_and_safetensors_any_name_mixed_dtypes_load_once(files, capsys):
    for path in files.values():
        info = formats.inspect(path)
        model = photomaker.models.get(info, path)
        assert {t.dtype for t in model.encoder.state_dict().values() if t.is_floating_point()} == {torch.float32}
        assert len(model.lora.layers) == 140 and model.lora.rank == 4
        assert {t.dtype for pairs in model.lora.layers.values() for pair in pairs.values() for t in pair} == {torch.float32}
        out = capsys.readouterr().out
        assert f"loading {os.path.basename(path)}" in out and "ready in" in out
        assert photomaker.models.get(info, path) is model  # kept: nothing read again
        assert "loading" not in capsys.readouterr().out


def test_a_broken_file_is_refused_naming_the_file_and_the_key(unet, tmp_path):
    path = write_photomaker(tmp_path, unet, v2=False, seed=4)
    content = torch.load(path, weights_only=True)
    key = next(k for k in content["lora_weights"] if k.endswith("attn2.processor.to_v_lora.up.weight"))
    del content["lora_weights"][key]
    torch.save(content, path)
    with pytest.raises(CheckpointError) as e:
        photomaker.models.get(formats.inspect(path), path)
    assert path in str(e.value) and f"lora_weights.{key}" in str(e.value) and "missing" in str(e.value)

    content["lora_weights"][key.replace("to_v_lora", "to_x_lora")] = torch.zeros(2)
    torch.save(content, path)
    with pytest.raises(CheckpointError, match="to_x_lora.up.weight is not a LoRA key"):
        photomaker.models.get(formats.inspect(path), path)


def test_a_pickle_that_runs_code_is_never_unpickled(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "pwned"),))

    path = tmp_path / "photomaker-v1.bin"
    torch.save({"id_encoder": {"x": Evil()}, "lora_weights": {}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        formats.inspect(str(path))
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------ the unit's checks


def _validate(path, base="sdxl", pack=True, **fields):
    entry = SimpleNamespace(name="pm", title="pm [abcd1234]", path=str(path), info=formats.inspect(str(path)), error=None)
    unit = U.Unit.from_api({"model": "pm", "images": [_png_url()], **fields}, 1)
    return U.validate_for_run([unit], base=base, find_model=lambda name: entry,
                              find_encoder=lambda need: "/packs/buffalo_l" if pack else None)


def _png_url():
    import base64
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_an_sd15_checkpoint_a_mask_and_a_missing_buffalo_l_are_clear_errors(files):
    with pytest.raises(UnitError, match="PhotoMaker works with SDXL checkpoints only.*SD1.5"):
        _validate(files["v1"], base="sd15")
    with pytest.raises(UnitError) as e:
        _validate(files["v1"], mask=_png_url())
    assert e.value.field == "mask" and "cannot be bound to a region" in str(e.value)
    with pytest.raises(UnitError) as e:
        _validate(files["v2"], pack=False)
    assert "buffalo_l" in str(e.value) and "models/insightface/models/buffalo_l" in str(e.value)
    assert "buffalo_l.zip" in str(e.value)  # what to download, and where it goes
    _validate(files["v1"], pack=False)  # V1 reads no faces


def test_start_defaults_to_the_official_point_only_for_photomaker_and_only_when_not_given(files):
    assert _validate(files["v1"])[0].unit.start == 0.2
    assert _validate(files["v1"], start=0.0)[0].unit.start == 0.0
    assert _validate(files["v1"], start=0.5)[0].unit.start == 0.5
    unit = U.Unit.from_api({"model": "pm", "images": [_png_url()]}, 1)
    # an X/Y/Z cell that sets start counts as given
    (cell,) = U.apply_overrides([unit], {("start", 1): "0"})
    assert "start" not in cell._unset and "start" in unit._unset


def test_the_trigger_is_one_word(files):
    assert _validate(files["v1"], trigger=" sks ")[0].unit.trigger == "sks"
    for bad in ("a man", "", "AND", "BREAK", "(img)", "img,"):
        with pytest.raises(UnitError) as e:
            U.Unit.from_api({"model": "pm", "trigger": bad}, 2)
        assert e.value.field == "trigger" and "one word" in str(e.value)
