"""The accordion's profile controls: "Save as profile…" builds from the unit's uploaded pictures and
face choice (the function the route uses) and answers in one message line, never a traceback; the
profile dropdown lists the saved profiles, 🔄 and saving refresh it; the accordion built by gradio
3.41 itself (WebUI-pins lane) wires it all."""

import sys
import types

import pytest

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")
from PIL import Image, ImageOps  # noqa: E402

import face_models as fm  # noqa: E402
from checkpoints import write_manifest_layout  # noqa: E402
from fake_webui import install_fake_modules  # noqa: E402
from lib_identity import units as U  # noqa: E402


@pytest.fixture()
def webui(monkeypatch, tmp_path):
    """A stand-in WebUI with a FaceID file and the test buffalo_l pack; gradio's uploads in ``uploads``."""
    from lib_identity.webui import folders

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    uploads = tmp_path / "gradio"
    uploads.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    models = tmp_path / "models"
    write_manifest_layout("ip-adapter-faceid_sd15", models / "ipadapter", "safetensors")
    fm.write_pack(str(models / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    install_fake_modules(monkeypatch, models_path=models)
    folders.list_models(refresh=True)
    return types.SimpleNamespace(models=models, uploads=uploads, profiles=models / "identity" / "profiles")


def upload(folder, name, image):
    """A file as gradio 3.41's File component hands it over (an object with ``.name``)."""
    image.save(folder / name)
    return types.SimpleNamespace(name=str(folder / name))


@pytest.fixture()
def files(webui):
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    return [upload(webui.uploads, "a.jpg", t1), upload(webui.uploads, "b.png", t1.resize((640, 443))),
            upload(webui.uploads, "c.jpg", t1.resize((960, 664))), upload(webui.uploads, "d.jpg", ImageOps.mirror(t1))]


def test_saving_builds_from_the_units_pictures_and_says_what_was_left_out(webui, files):
    from lib_identity.webui import lookup, ui_profiles

    assert lookup.profile_choices() == ["None"]
    message = ui_profiles.save_from_unit("alice", files, "largest", "crop", "center", False)
    lines = message.splitlines()
    assert lines[0] == ("- saved profile 'alice' from 3 picture(s) to models/identity/profiles/alice.safetensors; "
                        "choose it under Profile to use it")
    assert any(line.startswith("- picture 4 left out") and "far from the others" in line for line in lines)
    assert (webui.profiles / "alice.safetensors").is_file()
    assert lookup.profile_choices() == ["None", "alice"]


def test_the_face_choice_is_the_units(webui, files):
    from lib_identity import profiles
    from lib_identity.webui import folders, ui_profiles

    assert ui_profiles.save_from_unit("second", files[:1], "1", "crop", "center", False).startswith("- saved")
    assert profiles.load_profile(folders.profile_folder(), "second").face == 1  # the dropdown's "1", parsed
    message = ui_profiles.save_from_unit("seventh", files[:1], "7", "crop", "center", False)
    assert message.startswith("⚠ no picture is left") and "picture 1 left out" in message  # t1.jpg has 6 faces


@pytest.mark.parametrize("name, chosen, words", [
    ("bob", "none", ["Add the pictures"]),
    ("../bob", "all", ["cannot name a profile"]),
    ("", "all", ["cannot name a profile"]),
    ("bob", "outside", ["picture 1", "not an upload"]),
])
def test_refusals_are_one_message_line(webui, files, tmp_path, name, chosen, words):
    from lib_identity.webui import ui_profiles

    picked = {"none": [], "all": files, "outside": [upload(tmp_path, "elsewhere.png", Image.new("RGB", (64, 64)))]}[chosen]
    message = ui_profiles.save_from_unit(name, picked, "largest", "crop", "center", False)
    assert message.startswith("⚠ ") and len(message.splitlines()) == 1 and "Traceback" not in message
    for word in words:
        assert word in message
    assert not webui.profiles.exists()


def test_a_taken_name_needs_overwrite(webui, files):
    from lib_identity.webui import ui_profiles

    assert ui_profiles.save_from_unit("carol", files[:1], "largest", "crop", "center", False).startswith("- saved")
    message = ui_profiles.save_from_unit("carol", files[:2], "largest", "crop", "center", False)
    assert message.startswith("⚠ ") and "exists already" in message and "Overwrite" in message
    assert ui_profiles.save_from_unit("carol", files[:2], "largest", "crop", "center", True).startswith(
        "- saved profile 'carol' from 2 picture(s)")


def test_an_unexpected_failure_is_a_line_and_the_console_has_the_details(webui, files, monkeypatch, capsys):
    from lib_identity.webui import profile_build, ui_profiles

    def broken(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(profile_build, "build_and_save", broken)
    message = ui_profiles.save_from_unit("dave", files[:1], "largest", "crop", "center", False)
    assert message == "⚠ building the profile failed: RuntimeError: out of memory"
    assert "Traceback" in capsys.readouterr().err


# --------------------------------------------------------------- the accordion, built by gradio 3.41


@pytest.fixture()
def built(webui, monkeypatch):
    gr = pytest.importorskip("gradio", reason="gradio is installed only in the WebUI-pins lane")
    if not gr.__version__.startswith("3."):
        pytest.skip(f"the accordion is built for the WebUI's gradio 3.41, this is {gr.__version__}")
    from test_webui_accordion import _ui_components_module

    from lib_identity.webui import ui

    webui.profiles.mkdir(parents=True)
    (webui.profiles / "zed.safetensors").write_bytes(b"\x80\x04 a pickle, not a profile")  # not offered
    monkeypatch.setitem(sys.modules, "modules.ui_components", _ui_components_module())
    sys.modules["modules"].ui_components = sys.modules["modules.ui_components"]
    sys.modules["modules.shared"].opts.data["identity_unit_count"] = 2
    script = types.SimpleNamespace()
    with gr.Blocks() as demo:
        components = ui.build(script, is_img2img=False)
    width = len(U.UI_FIELDS)
    units = [dict(zip(U.UI_FIELDS, components[1 + i * width: 1 + (i + 1) * width])) for i in range(2)]
    by_id = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    return types.SimpleNamespace(gr=gr, demo=demo, components=components, units=units, by_id=by_id)


def _ids(targets):
    return [t[0] if isinstance(t, (list, tuple)) else t for t in (targets if isinstance(targets, list) else [targets])]


def _dependency(demo, block, trigger):
    """(the event's dependency, its function) for ``block``'s ``trigger`` event."""
    for i, dep in enumerate(demo.dependencies):
        if dep.get("trigger") == trigger and any(demo.blocks[t] is block for t in _ids(dep["targets"])):
            return dep, demo.fns[i].fn
    raise AssertionError(f"no {trigger} event on {block}")


def test_the_profile_field_is_a_dropdown_of_saved_profiles_with_a_refresh_button(built):
    for number, unit in enumerate(built.units, 1):
        dropdown = unit["profile"]
        assert isinstance(dropdown, built.gr.Dropdown) and dropdown.value == "None"
        assert [c[0] if isinstance(c, (list, tuple)) else c for c in dropdown.choices] == ["None"]
        refresh = built.by_id[f"identity_txt2img_unit{number}_profile_refresh"]
        save = built.by_id[f"identity_txt2img_unit{number}_profile_save"]
        assert isinstance(save, built.gr.Button) and save.value == "Save as profile…"
        for name in ("profile_refresh", "profile_save", "profile_name", "profile_overwrite", "profile_message"):
            block = built.by_id[f"identity_txt2img_unit{number}_{name}"]
            assert all(block is not c for c in built.components)  # views, not script args
        assert refresh is not save


def test_saving_from_the_accordion_refreshes_every_units_dropdown(built, files):
    demo, (one, two) = built.demo, built.units
    save = built.by_id["identity_txt2img_unit1_profile_save"]
    dep, fn = _dependency(demo, save, "click")
    inputs = [demo.blocks[i] for i in dep["inputs"]]
    outputs = [demo.blocks[o] for o in dep["outputs"]]
    assert inputs[:6] == [built.by_id["identity_txt2img_unit1_profile_name"], one["images"], one["face"],
                          one["preparation"], one["crop_position"], built.by_id["identity_txt2img_unit1_profile_overwrite"]]
    assert outputs == [built.by_id["identity_txt2img_unit1_profile_message"], one["profile"], two["profile"]]
    message, first, second = fn("erin", files[:1], "largest", "crop", "center", False, "None", "bob")
    assert message.startswith("- saved profile 'erin'")
    assert first["choices"] == second["choices"] == ["None", "erin"]
    assert (first["value"], second["value"]) == ("None", "bob")  # each dropdown keeps its choice


def test_refresh_finds_profiles_saved_elsewhere(built, files):
    from lib_identity.webui import ui_profiles

    refresh = built.by_id["identity_txt2img_unit2_profile_refresh"]
    dep, fn = _dependency(built.demo, refresh, "click")
    assert [built.demo.blocks[o] for o in dep["outputs"]] == [built.units[1]["profile"]]
    ui_profiles.save_from_unit("frank", files[:1], "largest", "crop", "center", False)  # e.g. by the API
    update = fn("None")
    assert update["choices"] == ["None", "frank"] and update["value"] == "None"


def test_a_chosen_profile_reaches_the_unit(built):
    values = [c.value for c in built.components]
    width = len(U.UI_FIELDS)
    values[0] = True
    values[1 + U.UI_FIELDS.index("enabled")] = True
    values[1 + U.UI_FIELDS.index("profile")] = "alice"
    unit = U.parse_script_args(values, unit_count=2)[0]
    assert unit.enabled and unit.profile == "alice" and unit.images == ()
    values[1 + width + U.UI_FIELDS.index("profile")] = "None"
    assert U.parse_script_args(values, unit_count=2)[1].profile == ""
