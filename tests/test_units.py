"""The Unit parser from every entry point: accordion values, API objects, pasted infotext, X/Y/Z cells,
and the run-time checks against real model-folder layouts."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import pickle
import re

import numpy as np
import pytest
from PIL import Image

from lib_identity import discovery, image_input
from lib_identity import units as U
from lib_identity.errors import IdentityError, UnitError
from lib_identity.units import (
    expand_infotext,
    infotext_key,
    units_from_infotext,
    units_to_infotext,
    write_infotext,
)

from checkpoints import write_manifest_layout

N = len(U.UI_FIELDS)


# ---------------------------------------------------------------------------- helpers


def picture(seed=0, size=(40, 32), mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(a[:, :, 0] if channels == 1 else a, mode)


def encoded(img, fmt="PNG", **save):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(img, fmt="PNG", mime="image/png", **save):
    return f"data:{mime};base64," + b64(encoded(img, fmt, **save))


def ui_block(**fields):
    """One unit's positional values, as the accordion sends them (defaults where not given)."""
    ui_defaults = {
        "enabled": False, "model": "None", "images": None, "image_weights": "", "weight": 1.0, "start": 0.0, "end": 1.0,
        "combine": "average", "preparation": "crop", "crop_position": "center", "layer_preset": "standard",
        "layer_weights": "", "mask": None, "uncond": "zero", "negative_image": None, "face": "largest", "s_scale": 1.0,
        "lora_weight": 1.0, "ip_weight": 0.8, "identitynet_weight": 0.8, "identitynet_start": 0.0,
        "identitynet_end": 1.0, "pose_image": None, "uncond_noise": 0.0, "via_controlnet": False,
        "trigger": "img", "pose_face": "auto", "profile": "None",
    }
    assert set(ui_defaults) == set(U.UI_FIELDS), "the test's UI layout must follow UI_FIELDS"
    ui_defaults.update(fields)
    return [ui_defaults[name] for name in U.UI_FIELDS]


def fails(fn, unit, field, *fragments):
    with pytest.raises(UnitError) as info:
        fn()
    err = info.value
    assert (err.unit, err.field) == (unit, field), str(err)
    text = str(err)
    where = "Identity" if unit is None else f"Identity unit {unit}"
    assert text.startswith(f"{where}, field '{field}': " if field else f"{where}: "), text
    for fragment in fragments:
        assert fragment in text, text
    return text


# ---------------------------------------------------------------------------- API objects


def test_api_unit_with_every_field_is_normalised():
    ref, ref2, neg = picture(1), picture(2), picture(3)
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (0, 0, 20, 32))
    unit = U.Unit.from_api(
        {
            "enabled": True, "model": " ip-adapter_sd15 [0123abcd] ", "images": [data_url(ref), b64(encoded(ref2))],
            "image_weights": [1, 0.5], "weight": "-0.5", "start": 0.1, "end": 0.9, "combine": "Weighted_Average",
            "preparation": "PAD", "crop_position": "top", "layer_preset": "Style_and_Composition",
            "mask": data_url(mask), "negative_image": data_url(neg),
        },
        1,
    )
    assert unit.model == "ip-adapter_sd15 [0123abcd]"
    assert unit.weight == -0.5 and (unit.start, unit.end) == (0.1, 0.9)
    assert (unit.combine, unit.preparation, unit.crop_position) == ("weighted average", "pad", "top")
    assert unit.layer_preset == "style and composition" and unit.layer_weights is None
    assert unit.image_weights == (1.0, 0.5)
    # a negative image without uncond means uncond 'image'
    assert unit.uncond == "image" and unit.negative_image.tobytes() == neg.tobytes()
    assert [img.tobytes() for img in unit.images] == [ref.tobytes(), ref2.tobytes()]
    assert unit.mask.mode == "L" and unit.mask.tobytes() == mask.tobytes()


def test_api_defaults_enabled_true_and_null_means_default():
    unit = U.Unit.from_api({"model": "m", "images": [data_url(picture())], "weight": None, "combine": None}, 1)
    assert unit.enabled is True and unit.weight == 1.0 and unit.combine == "average"
    assert unit.image_weights == (1.0,) and unit.layer_preset == "standard" and unit.uncond == "zero"
    assert U.Unit.from_api({"enabled": False}, 1).enabled is False


def test_api_accepts_png_jpeg_webp_and_hashes_by_pixels():
    ref = picture(4)
    png = U.Unit.from_api({"images": [data_url(ref)]}, 1)
    webp = U.Unit.from_api({"images": [data_url(ref, "WEBP", "image/webp", lossless=True)]}, 1)
    raw = U.Unit.from_api({"images": b64(encoded(ref)) + "\n"}, 1)  # one string, wrapped, is one image
    jpeg = U.Unit.from_api({"images": [data_url(ref, "JPEG", "image/jpeg", quality=95)]}, 1)
    assert png.image_hashes == webp.image_hashes == raw.image_hashes
    assert jpeg.images[0].size == ref.size and jpeg.image_hashes != png.image_hashes  # lossy: other pixels


def test_image_hash_is_pixels_and_size_only():
    from PIL import PngImagePlugin

    ref = picture(6)
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", "a photo, Steps: 20")
    tagged = U.Unit.from_api({"images": [b64(encoded(ref, pnginfo=meta))]}, 1)
    plain = U.Unit.from_api({"images": [b64(encoded(ref))]}, 1)
    assert tagged.image_hashes == plain.image_hashes
    expected = hashlib.sha256(b"RGB:40x32:" + ref.tobytes()).hexdigest()[:8]  # the documented recipe
    assert plain.image_hashes == (expected,)
    other = picture(6).crop((0, 0, 32, 40 - 8))  # other size
    assert image_input.image_hash(other) != expected and image_input.image_hash(picture(7)) != expected


def test_api_jpeg_exif_orientation_is_applied():
    img = picture(5, size=(40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    unit = U.Unit.from_api({"images": [data_url(img, "JPEG", "image/jpeg", exif=exif.tobytes())]}, 1)
    assert unit.images[0].size == (20, 40)


def test_api_refuses_unknown_fields_and_names_the_valid_ones():
    text = fails(lambda: U.Unit.from_api({"model": "m", "wieght": 1}, 3), 3, "wieght", "did you mean 'weight'", "valid fields are:")
    for name in U.API_FIELDS:
        assert name in text
    fails(lambda: U.Unit.from_api({"face_index": 0}, 1), 1, "face_index", "unknown field")
    fails(lambda: U.Unit.from_api(["m", 1.0], 2), 2, None, "expected a unit object")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("weight", "abc", "expected a number from -1 to 3, got 'abc'"),
        ("weight", 3.5, "from -1 to 3, got 3.5"),
        ("weight", -1.01, "from -1 to 3"),
        ("weight", True, "got True"),
        ("weight", [1], "got a list of 1"),
        ("weight", "nan", "from -1 to 3"),
        ("weight", float("inf"), "from -1 to 3"),
        ("start", -0.1, "from 0 to 1"),
        ("end", 1.5, "from 0 to 1"),
        ("enabled", "maybe", "expected true or false"),
        ("enabled", 2, "expected true or false"),
        ("model", 5, "a model name"),
        ("model", "bad\nname", "a model name"),
        ("combine", "sum", "one of 'concat', 'average', 'weighted average'"),
        ("preparation", "stretch", "one of 'crop', 'pad', 'squash'"),
        ("crop_position", "middle", "'center'"),
        ("layer_preset", "loud", "'style and composition'"),
        ("uncond", "blank", "one of 'zero', 'noise', 'image'"),
        ("layer_weights", "1, x, 0", "item 2 is 'x'"),
        ("layer_weights", [0.5] * 71, "at most 70 numbers"),
        ("layer_weights", "4", "from -1 to 3"),
        ("layer_weights", {"0": 1}, "a list of numbers"),
        ("image_weights", [-1], "from 0 to 10"),
    ],
)
def test_api_type_and_range_errors_name_unit_field_and_range(field, value, fragment):
    fails(lambda: U.Unit.from_api({field: value}, 2), 2, field, fragment)


def test_api_window_must_be_ordered():
    fails(lambda: U.Unit.from_api({"start": 0.6, "end": 0.4}, 1), 1, "end", "above start (0.6)", "got 0.4")
    fails(lambda: U.Unit.from_api({"start": 0.5, "end": 0.5}, 1), 1, "end")


def test_api_cross_field_rules():
    one = [data_url(picture())]
    unit = U.Unit.from_api({"layer_weights": "0, 1, 0.5"}, 1)
    assert unit.layer_preset == "custom" and unit.layer_weights == (0.0, 1.0, 0.5)
    unit = U.Unit.from_api({"layer_preset": "custom", "layer_weights": [1, 0]}, 1)
    assert unit.layer_weights == (1.0, 0.0)
    fails(lambda: U.Unit.from_api({"layer_preset": "custom"}, 1), 1, "layer_weights", "'custom'")
    fails(lambda: U.Unit.from_api({"layer_preset": "style transfer", "layer_weights": [1]}, 1), 1, "layer_weights", "leave out layer_preset 'style transfer'")
    fails(lambda: U.Unit.from_api({"uncond": "image"}, 1), 1, "negative_image", "needed")
    fails(lambda: U.Unit.from_api({"uncond": "noise", "negative_image": one[0]}, 1), 1, "negative_image", "uncond 'noise'")
    fails(lambda: U.Unit.from_api({"images": one, "combine": "weighted average", "image_weights": [1, 2]}, 4), 4, "image_weights", "one weight per reference image (1), got 2")
    fails(lambda: U.Unit.from_api({"images": one, "combine": "weighted average", "image_weights": [0]}, 1), 1, "image_weights", "all image weights are 0")
    # the weights are read only by 'weighted'; elsewhere a stale list does no harm
    assert U.Unit.from_api({"images": one, "image_weights": [1, 2]}, 1).image_weights == (1.0,)


def gif_bytes():
    return encoded(picture().convert("P"), "GIF")


class _Trap:
    fired = False

    def __reduce__(self):
        return (_fire, ())


def _fire():
    _Trap.fired = True
    return "fired"


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("not base64 !!", "not valid base64"),
        (b64(b"hello world, no picture"), "expected a PNG, JPEG or WebP image, got data that is no image"),
        (b64(gif_bytes()), "got a GIF image"),
        ("data:image/gif;base64," + b64(gif_bytes()), "data URL of type 'image/gif'"),
        ("data:image/png," + "abc", "must be base64-encoded"),
        ("https://example.com/face.png", "URLs are not fetched"),
        ("file:///etc/passwd", "URLs are not fetched"),
        ("", "is empty"),
        (b64(encoded(picture())[:60]), "truncated or corrupt"),
        (b64(pickle.dumps(_Trap())), "a Python pickle"),
        (b64(b"PK\x03\x04" + b"\0" * 40), "zip archive"),
        ({"image": b64(encoded(picture()))}, "expected a base64 string or a data:image"),
        (None, "image 1 of 1 is empty"),
        (12, "expected a base64 string"),
    ],
)
def test_api_bad_images_fail_with_unit_and_field(value, fragment):
    _Trap.fired = False
    fails(lambda: U.Unit.from_api({"model": "m", "images": [value]}, 2), 2, "images", "image 1 of 1", fragment)
    assert not _Trap.fired, "a pickle from the API was unpickled"


def test_exactly_the_documented_maximum_of_reference_images_is_accepted():
    refs = [data_url(picture(100 + i, size=(8, 8))) for i in range(U.MAX_IMAGES + 1)]
    assert U.MAX_IMAGES == 16  # README and the API schema promise 16
    weights = [0.5 + i / 8 for i in range(16)]
    unit = U.Unit.from_api({"model": "m", "images": refs[:16], "combine": "weighted average", "image_weights": weights}, 1)
    assert len(unit.images) == 16 and unit.image_weights == tuple(weights)
    assert len(set(unit.image_hashes)) == 16
    ui = U.Unit.from_ui(ui_block(enabled=True, model="m", images=[picture(100 + i, size=(8, 8)) for i in range(16)]), 1)
    assert len(ui.images) == 16
    fails(lambda: U.Unit.from_api({"model": "m", "images": refs}, 1), 1, "images", "at most 16", "got 17")
    fails(lambda: U.Unit.from_ui(ui_block(enabled=True, model="m", images=[picture(1)] * 17), 2), 2, "images", "got 17")
    fails(lambda: U.Unit.from_api({"model": "m", "images": refs[:16], "image_weights": [1] * 17}, 3), 3, "image_weights")


def test_api_image_limits(monkeypatch):
    fails(lambda: U.Unit.from_api({"images": [data_url(picture())] * (U.MAX_IMAGES + 1)}, 1), 1, "images", f"at most {U.MAX_IMAGES}")
    monkeypatch.setattr(image_input, "MAX_IMAGE_PIXELS", 30 * 30)
    fails(lambda: U.Unit.from_api({"images": [data_url(picture())]}, 1), 1, "images", "40x32 pixels", "limit")
    monkeypatch.setattr(image_input, "MAX_IMAGE_BYTES", 100)
    fails(lambda: U.Unit.from_api({"images": [data_url(picture())]}, 1), 1, "images", "limit")
    fails(lambda: U.Unit.from_api({"mask": data_url(picture())}, 1), 1, "mask", "limit")


def test_api_round_trip_through_to_api():
    unit = U.Unit.from_api(
        {"model": "x", "images": [data_url(picture(7))], "weight": 0.7, "layer_weights": [0, 1], "negative_image": data_url(picture(8)),
         "mask": data_url(picture(9, mode="L"))},
        1,
    )
    d = unit.to_api()
    json.dumps(d)  # plain JSON
    again = U.Unit.from_api(d, 1)
    assert again == unit  # PIL images compare by pixels
    assert again.image_hashes == unit.image_hashes


def test_custom_decoder_errors_become_unit_errors():
    def refuse(_text):
        raise RuntimeError("Invalid encoded image")

    fails(lambda: U.Unit.from_api({"images": ["abc"]}, 1, decode_image=refuse), 1, "images", "Invalid encoded image")


# ---------------------------------------------------------------------------- UI values


def test_ui_forms_of_one_picture_all_hash_the_same(tmp_path):
    ref = picture(11)
    upload = tmp_path / "upload.png"
    upload.write_bytes(encoded(ref))
    opener = image_input.upload_opener([str(tmp_path)])

    class TempFile:  # what gr.File / gr.UploadButton hand over
        name = str(upload)

    forms = [
        [ref],
        [np.asarray(ref)],
        [{"name": str(upload), "data": None, "is_file": True}],
        [[{"name": str(upload), "data": None, "is_file": True}, "caption"]],
        [TempFile()],
        [{"image": ref, "mask": None}],
        [data_url(ref)],
        ref,
    ]
    api = U.Unit.from_api({"images": [data_url(ref)]}, 1).image_hashes
    for images in forms:
        unit = U.Unit.from_ui(ui_block(enabled=True, model="m", images=images), 1, open_upload=opener)
        assert unit.image_hashes == api, images


def test_ui_images_are_copies_and_input_is_untouched():
    ref = picture(12, mode="RGBA")
    before = ref.tobytes()
    unit = U.Unit.from_ui(ui_block(images=[ref]), 1)
    assert unit.images[0] is not ref and unit.images[0].mode == "RGB"
    assert ref.mode == "RGBA" and ref.tobytes() == before


def test_ui_refuses_files_outside_the_upload_folders(tmp_path):
    inside, outside = tmp_path / "uploads", tmp_path / "private"
    inside.mkdir(), outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(encoded(picture()))
    opener = image_input.upload_opener([str(inside)])
    for path in (str(secret), str(inside / ".." / "private" / "secret.png")):
        fails(
            lambda: U.Unit.from_ui(ui_block(images=[{"name": path, "is_file": True}]), 2, open_upload=opener),
            2, "images", "not an upload",
        )
    (inside / "notes.txt").write_text("hello")
    fails(lambda: U.Unit.from_ui(ui_block(images=[{"name": str(inside / "notes.txt")}]), 1, open_upload=opener), 1, "images", "no image")


def test_ui_default_upload_folder_is_gradios(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "gradio").mkdir()
    ok, elsewhere = tmp_path / "gradio" / "a.png", tmp_path / "b.png"
    for path in (ok, elsewhere):
        path.write_bytes(encoded(picture(17)))
    unit = U.Unit.from_ui(ui_block(images=[{"name": str(ok), "is_file": True}]), 1)
    assert unit.image_hashes == (image_input.image_hash(picture(17)),)
    fails(lambda: U.Unit.from_ui(ui_block(images=[{"name": str(elsewhere), "is_file": True}]), 1), 1, "images", "not an upload")


def test_ui_mask_from_the_image_editor_and_from_alpha():
    painted = Image.new("RGB", (40, 32), (0, 0, 0))
    painted.paste((255, 255, 255), (10, 0, 30, 32))
    unit = U.Unit.from_ui(ui_block(mask={"image": picture(), "mask": np.asarray(painted)}), 1)
    assert unit.mask.mode == "L" and unit.mask.getpixel((15, 5)) == 255 and unit.mask.getpixel((2, 5)) == 0
    # nothing painted: the uploaded picture is the mask
    unit = U.Unit.from_ui(ui_block(mask={"image": painted, "mask": Image.new("RGB", (40, 32))}), 1)
    assert unit.mask.tobytes() == painted.convert("L").tobytes()
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 8))  # opaque where drawn, dark colour
    unit = U.Unit.from_ui(ui_block(mask=rgba), 1)
    assert unit.mask.getpixel((1, 1)) == 255 and unit.mask.getpixel((6, 1)) == 0


def test_ui_keeps_stale_values_out():
    unit = U.Unit.from_ui(ui_block(layer_preset="style transfer", layer_weights="1, 0, 1", negative_image=picture(), uncond="noise"), 1)
    assert unit.layer_weights is None and unit.negative_image is None and unit.uncond == "noise"
    unit = U.Unit.from_ui(ui_block(layer_preset="custom", layer_weights="1, 0, 1"), 1)
    assert unit.layer_weights == (1.0, 0.0, 1.0)
    assert U.Unit.from_ui(ui_block(model="None"), 1).model == ""
    assert U.Unit.from_ui([], 1) == U.Unit()  # nothing sent: all defaults
    fails(lambda: U.Unit.from_ui(ui_block() + [1], 3), 3, None, f"expected {N} values")
    fails(lambda: U.Unit.from_ui(ui_block(weight="heavy"), 2), 2, "weight", "from -1 to 3")
    fails(lambda: U.Unit.from_ui(ui_block(layer_preset="custom"), 2), 2, "layer_weights", "'custom'")


# ---------------------------------------------------------------------------- script args


def test_script_args_ui_layout():
    ref = picture(13)
    args = [True] + ui_block(enabled=True, model="a", images=[ref], weight=0.5) + ui_block(model="b") + ui_block(enabled=True, model="c", images=[ref])
    units = U.parse_script_args(tuple(args), unit_count=3)
    assert [(u.enabled, u.model) for u in units] == [(True, "a"), (False, "b"), (True, "c")]
    assert units[0].weight == 0.5
    # accordion closed: nothing is on
    units = U.parse_script_args([False] + args[1:], unit_count=3)
    assert not any(u.enabled for u in units)
    # short args (older layout) take defaults
    assert U.parse_script_args([True] + ui_block(enabled=True)[:3], unit_count=2)[1] == U.Unit()
    assert U.parse_script_args((), unit_count=3) == []


def test_script_args_bad_value_in_a_unit_that_is_off_waits_for_xyz():
    args = [True] + ui_block(enabled=True, model="a", images=[picture()]) + ui_block(enabled=False, image_weights="x")
    units = U.parse_script_args(args, unit_count=2)
    assert units[1].enabled is False
    assert U.apply_overrides(units, {("weight", 1): 0.5})[0].weight == 0.5  # unit 2 untouched, no error
    fails(lambda: U.apply_overrides(units, {("enabled", 2): "true"}), 2, "image_weights", "item 1 is 'x'")
    fails(lambda: U.parse_script_args([True] + args[1:1 + N] + ui_block(enabled=True, image_weights="x"), unit_count=2), 2, "image_weights")
    # the accordion being closed also defers
    assert len(U.parse_script_args([False] + ui_block(enabled=True, weight="abc"), unit_count=1)) == 1


def test_script_args_api_objects():
    url = data_url(picture(14))
    defaults = [False] + ui_block() * 2  # what the WebUI leaves in the positions the request did not fill
    units = U.parse_script_args([{"model": "a", "images": [url]}, {"model": "b", "enabled": False}] + defaults[2:], unit_count=2)
    assert [(u.enabled, u.model) for u in units] == [(True, "a"), (False, "b")]
    units = U.parse_script_args([True, {"model": "a", "images": [url]}] + defaults[2:], unit_count=2)
    assert [u.model for u in units] == ["a"]
    units = U.parse_script_args([False, {"model": "a"}], unit_count=2)
    assert units[0].enabled is False
    units = U.parse_script_args([{"model": "a"}, None, {"model": "c"}], unit_count=2)
    assert [(u.enabled, u.model) for u in units] == [(True, "a"), (False, ""), (True, "c")]
    fails(lambda: U.parse_script_args([{"model": "a"}, 5, {"model": "c"}], unit_count=2), 2, None, "expected a unit object, got 5")
    fails(lambda: U.parse_script_args([{"model": "a"}, {"modle": "c"}], unit_count=2), 2, "modle", "did you mean 'model'")
    fails(lambda: U.parse_script_args([{"model": "a", "images": ["%%%"]}], unit_count=2), 1, "images", "not valid base64")
    fails(lambda: U.parse_script_args(["maybe", {"model": "a"}], unit_count=1), None, "enabled", "accordion")
    # positional values from an API client: base64 strings in the image slot
    units = U.parse_script_args([True] + ui_block(enabled=True, images=[url]), unit_count=1)
    assert units[0].image_hashes == U.Unit.from_api({"images": [url]}, 1).image_hashes


def test_script_args_are_never_mutated():
    ref = picture(15)
    shared_gallery = [{"image": ref, "mask": None}]
    api_unit = {"model": "a", "images": [data_url(ref)], "layer_weights": [1, 0], "image_weights": None}
    ui_args = [True] + ui_block(enabled=True, images=shared_gallery, layer_weights="1, 0", layer_preset="custom")
    for args in (ui_args, [api_unit, None, dict(api_unit)]):
        snapshot = copy.deepcopy(args)
        pixels = ref.tobytes()
        U.parse_script_args(args, unit_count=1)
        U.parse_script_args(tuple(args), unit_count=1)
        assert args == snapshot
        assert ref.tobytes() == pixels and ref.mode == "RGB"


# ---------------------------------------------------------------------------- X/Y/Z


def three_units():
    url = data_url(picture(16))
    return [U.Unit.from_api({"model": m, "images": [url], "start": 0.2, "end": 0.8}, i + 1) for i, m in enumerate("abc")]


def test_overrides_touch_only_the_addressed_unit():
    units = three_units()
    out = U.apply_overrides(units, {("weight", 2): "0.25", ("model", 3): "z [01234567]", ("combine", 1): "concat"})
    assert [u.weight for u in out] == [1.0, 0.25, 1.0]
    assert [u.model for u in out] == ["a", "b", "z [01234567]"] and out[0].combine == "concat"
    assert out[0].images[0] is units[0].images[0] and units[1].weight == 1.0  # inputs unchanged
    assert [u.weight for u in U.apply_overrides(units, {"weight": 0.5})] == [0.5] * 3  # every unit


def test_override_errors():
    units = three_units()
    text = fails(lambda: U.apply_overrides(units, {("weight", 2): "abc"}), 2, "weight")
    assert text == "Identity unit 2, field 'weight': expected a number from -1 to 3, got 'abc'"
    fails(lambda: U.apply_overrides(units, {("start", 1): 0.9}), 1, "start", "below end (0.8)")
    fails(lambda: U.apply_overrides(units, {("end", 1): 0.1}), 1, "end", "above start (0.2)")
    fails(lambda: U.apply_overrides(units, {("weight", 4): 1}), 4, "weight", "there is no unit 4; there are 3")
    fails(lambda: U.apply_overrides(units, {("images", 1): []}), 1, "images", "cannot be set per X/Y/Z cell")
    fails(lambda: U.apply_overrides(units, {("layer_preset", 1): "loud"}), 1, "layer_preset", "'strong style transfer'")
    fails(lambda: U.apply_overrides(units, {("layer_preset", 1): "custom"}), 1, "layer_weights", "'custom'")


def test_override_layers_and_enabled():
    units = three_units()
    custom = U.apply_overrides(units, {("layer_weights", 1): "0, 1"})[0]
    assert (custom.layer_preset, custom.layer_weights) == ("custom", (0.0, 1.0))
    back = U.apply_overrides([custom], {("layer_preset", 1): "strong style transfer"})[0]
    assert (back.layer_preset, back.layer_weights) == ("strong style transfer", None)
    assert U.apply_overrides(units, {("enabled", 3): "false"})[2].enabled is False


def test_axis_helpers():
    assert set(U.AXIS_FIELDS) == {"enabled", "model", "weight", "start", "end", "layer_preset", "combine", "face", "s_scale", "lora_weight",
                                "ip_weight", "identitynet_weight", "pose_face", "profile"}
    assert U.axis_choices("combine") == list(U.COMBINE_MODES)
    assert U.axis_choices("layer_preset") == list(U.LAYER_PRESETS)
    assert U.axis_choices("model", ["a", "b"]) == ["a", "b"] and U.axis_choices("weight") is None
    assert U.parse_axis_value("layer_preset", "Strong Style Transfer", 2) == "strong style transfer"
    fails(lambda: U.parse_axis_value("weight", "x", 2), 2, "weight", "from -1 to 3")


# ---------------------------------------------------------------------------- infotext


def webui_quote(text):
    """What the WebUI's infotext_utils.quote does (v1.10.1): JSON-quote values holding , : or a newline."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


WEBUI_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # its re_param


def webui_infotext(params: dict) -> str:
    """processing.create_infotext's parameter line, after a prompt and a negative prompt."""
    line = ", ".join(k if k == v else f"{k}: {webui_quote(v)}" for k, v in params.items() if v is not None)
    return f"a photo of a man, portrait\nNegative prompt: blurry, lowres\n{line}"


def webui_parse(text: str) -> dict:
    """parse_generation_parameters' reading of the last line (the part units_from_infotext sees)."""
    *_, last = text.strip().split("\n")
    res = {}
    for k, v in WEBUI_PARAM.findall(last):
        if v[:1] == '"' and v[-1:] == '"':
            try:
                v = json.loads(v)
            except ValueError:
                pass
        res[k] = v
    return res


def rich_units():
    refs = [picture(20), picture(21)]
    mask = Image.new("L", (40, 32), 0)
    mask.paste(255, (0, 0, 10, 10))
    return [
        U.Unit.from_api({"model": "ip-adapter_sd15", "images": [data_url(r) for r in refs], "weight": 0.8, "layer_preset": "style transfer"}, 1),
        U.Unit.from_api({"enabled": False, "model": "off"}, 2),
        U.Unit.from_api(
            {"model": 'odd, name: "v2"', "images": [data_url(refs[0])], "image_weights": [0.5], "combine": "weighted average", "weight": -0.25,
             "start": 0.15, "end": 0.65, "preparation": "crop", "crop_position": "left", "layer_weights": [0, 0.5, 1, 2.75],
             "negative_image": data_url(picture(22)), "mask": data_url(mask)},
            3,
        ),
        U.Unit.from_api({"model": "photomaker-v2", "images": [data_url(refs[1])], "preparation": "squash", "uncond": "noise", "combine": "concat"}, 4),
    ]


RESTORED_FIELDS = ("model", "weight", "start", "end", "combine", "preparation", "crop_position", "layer_preset", "layer_weights", "uncond")


def test_infotext_lists_enabled_units_only():
    units = rich_units()
    info = units_to_infotext(units, model_titles={1: "ip-adapter_sd15 [0123abcd]"})
    assert list(info) == ["Identity 1", "Identity 3", "Identity 4"]
    assert info["Identity 1"] == (
        "model: ip-adapter_sd15 [0123abcd], weight: 0.8, start: 0.0, end: 1.0, combine: average, preparation: crop, "
        f"layers: style transfer, images: {'+'.join(units[0].image_hashes)}"
    )


def test_infotext_round_trip_through_webui_quoting():
    units = rich_units()
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "CFG scale": 7, "Seed": 1, "Size": "512x512"}
    params.update(units_to_infotext(units))
    params["Version"] = "v1.10.1"
    parsed = webui_parse(webui_infotext(params))
    # the neighbours are read intact, so our values did not break the line
    assert (parsed["Steps"], parsed["Sampler"], parsed["Version"]) == ("20", "DPM++ 2M", "v1.10.1")
    restored = {e["number"]: e for e in units_from_infotext(parsed)}
    assert sorted(restored) == [1, 3, 4]
    for number, entry in restored.items():
        unit = units[number - 1]
        assert entry["fields"]["enabled"] is True
        for name in RESTORED_FIELDS:
            if name in entry["fields"]:
                assert entry["fields"][name] == getattr(unit, name), (number, name)
        # what is not recorded is the default, so the restored unit equals the original
        rebuilt = dict(U.API_DEFAULTS, **entry["fields"])
        assert all(rebuilt[name] == getattr(unit, name) for name in RESTORED_FIELDS), number
        assert entry["images_needed"] == list(unit.image_hashes)
        assert entry["errors"] == [] and entry["ignored"] == []
    assert restored[3]["fields"]["image_weights"] == (0.5,)
    assert restored[3]["mask_needed"] == image_input.image_hash(units[2].mask)
    assert restored[3]["negative_image_needed"] == image_input.image_hash(units[2].negative_image)
    assert restored[3]["fields"]["uncond"] == "image"
    msg = restored[1]["message"]
    assert msg.startswith("Identity unit 1 needs reference images ") and all(h in msg for h in units[0].image_hashes)


def test_infotext_keeps_every_number_exactly_through_png_info():
    """The numbers a user typed come back unchanged from PNG Info: written into the PNG's
    ``parameters`` text as the WebUI writes it, read back from the file as PNG Info reads it."""
    from PIL.PngImagePlugin import PngInfo

    layers = [0.125, 1 / 3, 2.875, 0.0, 1e-07] + [1.0] * 11
    unit = U.Unit.from_api(
        {"model": "m", "images": [data_url(picture(i)) for i in range(3)], "weight": 0.875, "start": 0.333,
         "end": 2 / 3, "combine": "weighted average", "image_weights": [0.125, 1.75, 0.333], "layer_weights": layers}, 1)
    params = {"Steps": 20, "Seed": 1}
    write_infotext(params, [unit])
    meta = PngInfo()
    meta.add_text("parameters", webui_infotext(params))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG", pnginfo=meta)
    text = Image.open(io.BytesIO(buf.getvalue())).info["parameters"]
    fields = units_from_infotext(webui_parse(text))[0]["fields"]
    assert fields["weight"] == 0.875 and fields["start"] == 0.333 and fields["end"] == 2 / 3
    assert fields["image_weights"] == (0.125, 1.75, 0.333)
    assert fields["layer_preset"] == "custom" and tuple(fields["layer_weights"]) == tuple(layers)


def test_infotext_from_still_quoted_values_and_key_order():
    units = rich_units()[:1]
    value = units_to_infotext(units)["Identity 1"]
    entry = units_from_infotext({"Identity 1": webui_quote(value)})[0]
    assert entry["fields"]["weight"] == 0.8 and entry["fields"]["layer_preset"] == "style transfer"


@pytest.mark.parametrize(
    "value, field, fragment",
    [
        ("model: a, weight: abc", "weight", "from -1 to 3, got 'abc'"),
        ("model: a, weight: 9", "weight", "from -1 to 3"),
        ("model: a, start: 0.7, end: 0.2", "end", "above start (0.7)"),
        ("model: a, combine: sum", "combine", "'average'"),
        ("model: a, layers: loud", "layer_weights", "item 1 is 'loud'"),
        ('model: a, layers: "1, 2, 9"', "layer_weights", "item 3 is '9'"),
        ("model: a, images: 1a2b3c4d+nothex!", "images", "8-hex image hashes"),
        ("model: a, mask: 12", "mask", "8-hex"),
        ("model: a, preparation: melt", "preparation", "'squash'"),
        ("just words", None, "expected 'key: value' pairs"),
    ],
)
def test_pasted_infotext_bad_values(value, field, fragment):
    fails(lambda: units_from_infotext({"Identity 2": value}), 2, field, fragment)


def test_pasted_infotext_lenient_mode_keeps_the_good_fields():
    entry = units_from_infotext({"Identity 2": "model: a, weight: abc, end: 0.5, face index: 1"}, strict=False)[0]
    assert entry["fields"] == {"enabled": True, "model": "a", "end": 0.5}
    assert entry["errors"] == ["Identity unit 2, field 'weight': expected a number from -1 to 3, got 'abc'"]
    assert entry["ignored"] == ["face index"]


def test_write_infotext_leaves_no_stale_keys_across_cells():
    units = rich_units()
    shared = {"Steps": 20}  # p.extra_generation_params, shared by the X/Y/Z cells
    write_infotext(shared, units)
    assert {"Identity 1", "Identity 3", "Identity 4"} <= set(shared)
    cell2 = U.apply_overrides(units, {("enabled", 3): False, ("enabled", 1): False})
    write_infotext(shared, cell2)
    assert set(shared) == {"Steps", "Identity 4"}
    write_infotext(shared, [replace_enabled(u, False) for u in units])
    assert shared == {"Steps": 20}


def replace_enabled(unit, on):
    return U.apply_overrides([unit], {("enabled", 1): on})[0]


def test_expand_infotext_for_pasting():
    units = rich_units()
    params = webui_parse(webui_infotext(dict({"Steps": 20, "Sampler": "Euler", "Seed": 3}, **units_to_infotext(units))))
    params["Identity 4"] = params["Identity 4"].replace("uncond: noise", "uncond: loud")
    expand_infotext(params, unit_count=5)
    assert params[infotext_key(3, "layer_weights")] == "0.0, 0.5, 1.0, 2.75"
    assert params[infotext_key(3, "layer_preset")] == "custom" and params[infotext_key(3, "weight")] == -0.25
    assert params[infotext_key(1, "enabled")] is True and "needs reference images" in params[infotext_key(1, "needs")]
    assert params[infotext_key(2, "enabled")] is False and params[infotext_key(5, "enabled")] is False
    assert "'uncond'" in params[infotext_key(4, "errors")] and infotext_key(4, "uncond") not in params
    untouched = {"Steps": "20"}
    expand_infotext(untouched, unit_count=3)
    assert untouched == {"Steps": "20"}  # no Identity entries: the accordion is left alone


# ---------------------------------------------------------------------------- run-time checks


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    for name in ("ip-adapter_sd15", "ip-adapter_sdxl", "ip-adapter-faceid-plusv2_sd15", "instantid_ip-adapter", "clip_vision_vit-h"):
        write_manifest_layout(name, folder, "safetensors")
    entries = discovery.list_models([str(folder)], refresh=True)
    assert all(e.usable for e in entries), [e.error for e in entries]
    yield folder, entries
    discovery.list_models([], refresh=True)  # leave no listing of this folder in discovery's cache


def finders(model_folder, encoders=("clip-vit-h",)):
    folder, entries = model_folder

    def find_model(name):
        return discovery.find_model(name, [str(folder)])

    def find_encoder(need):
        return next((e for e in entries if e.info.family == "clip-vision" and e.info.variant == need), None) if need in encoders else None

    return dict(find_model=find_model, find_encoder=find_encoder, model_names=lambda: [e.name for e in entries])


def run_unit(**fields):
    fields.setdefault("images", [data_url(picture(30))])
    return U.Unit.from_api(fields, 1)


def test_validate_resolves_models_and_encoders(model_folder):
    units = [run_unit(model="ip-adapter_sd15"), U.Unit.from_api({"enabled": False, "model": "nowhere"}, 2)]
    resolved = U.validate_for_run(units, base="sd15", **finders(model_folder))
    assert len(resolved) == 1
    r = resolved[0]
    assert r.number == 1 and r.model.info.variant == "ip-adapter_sd15"
    assert r.unit.model == r.model.title and re.fullmatch(r"ip-adapter_sd15 \[[0-9a-f]{8}\]", r.unit.model)
    assert r.encoders["clip-vit-h"].info.variant == "clip-vit-h"
    assert units_to_infotext([r.unit])["Identity 1"].startswith(f"model: {r.model.title}, ")


def test_validate_errors(model_folder):
    f = finders(model_folder)
    check = lambda unit, base="sd15", **kw: U.validate_for_run([unit], base=base, **dict(f, **kw))  # noqa: E731
    fails(lambda: check(run_unit(model="ip-adaptr_sd15")), 1, "model", "unknown model 'ip-adaptr_sd15'", "did you mean 'ip-adapter_sd15'")
    fails(lambda: check(run_unit(model="zzz")), 1, "model", "the model folders hold:", "ip-adapter_sdxl")
    fails(lambda: check(run_unit(model="ip-adapter_sdxl")), 1, "model", "is SDXL, the loaded checkpoint is SD1.5")
    fails(lambda: check(run_unit(model="ip-adapter_sd15"), base="sdxl"), 1, "model", "is SD1.5, the loaded checkpoint is SDXL")
    fails(lambda: check(run_unit(model="clip_vision_vit-h"), base=None), 1, "model", "is a CLIP vision encoder")
    fails(lambda: check(run_unit(model="ip-adapter_sd15"), find_encoder=lambda need: None), 1, "model",
          "needs CLIP ViT-H/14, which was not found", "models/clip_vision")

    def explains(need):
        raise IdentityError(f"no {need} in /models/clip_vision")

    fails(lambda: check(run_unit(model="ip-adapter_sd15"), find_encoder=explains), 1, "model", "no clip-vit-h in /models/clip_vision")
    fails(lambda: check(run_unit(model="ip-adapter-faceid-plusv2_sd15")), 1, "model", "needs the insightface 'buffalo_l' face models")
    fails(lambda: check(run_unit(model="")), 1, "model", "no model selected")
    fails(lambda: check(run_unit(model="ip-adapter_sd15", images=[])), 1, "images", "no reference images")
    black = data_url(Image.new("L", (8, 8), 0))
    fails(lambda: check(run_unit(model="ip-adapter_sd15", mask=black)), 1, "mask", "all black")
    fails(lambda: check(run_unit(model="ip-adapter_sd15", layer_weights=[1, 0, 1])), 1, "layer_weights", "expected 16 weights", "got 3")
    assert check(run_unit(model="ip-adapter_sd15", layer_weights=[1] * 16))[0].unit.layer_weights == (1.0,) * 16
    assert check(run_unit(model="ip-adapter_sd15", layer_weights=[1, 0, 1]), layer_counts={"sd15": (3,)})


def test_required_encoders_follow_the_detected_variant(model_folder):
    _, entries = model_folder
    needs = {e.name.split("/")[-1]: U.required_encoders(e.info) for e in entries}
    assert needs["ip-adapter_sd15"] == ["clip-vit-h"] and needs["ip-adapter_sdxl"] == ["clip-vit-bigg"]
    assert needs["ip-adapter-faceid-plusv2_sd15"] == ["insightface:buffalo_l", "clip-vit-h"]
    assert needs["ip-adapter_instant_id_sdxl"] == ["insightface:antelopev2", "instantid-identitynet"]


def test_field_docs_cover_every_field():
    rows = U.field_docs()
    assert [r["name"] for r in rows] == list(U.API_FIELDS) == list(U.UI_FIELDS)
    assert all(r["accepts"] and r["help"] for r in rows)
    assert {r["name"]: r["default"] for r in rows}["enabled"] is True


def test_transparent_references_are_laid_on_white_as_the_encoder_would():
    rgba = Image.new("RGBA", (8, 6), (10, 200, 30, 0))  # fully transparent green
    rgba.putpixel((2, 2), (10, 200, 30, 255))
    unit = U.Unit.from_api({"images": [b64(encoded(rgba))]}, 1)
    img = unit.images[0]
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (255, 255, 255) and img.getpixel((2, 2)) == (10, 200, 30)
