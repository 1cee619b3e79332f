"""The accordion, built by gradio 3.41 itself (the WebUI's version) into Blocks, without a server:
its components and their order follow the field table, which is also the script's args order."""

import sys
import types

import pytest

from fake_webui import install_fake_modules

gr = pytest.importorskip("gradio", reason="gradio is installed only in the WebUI-pins lane (bash tests/run.sh --webui-pins)")
if not gr.__version__.startswith("3."):
    pytest.skip(f"the accordion is built for the WebUI's gradio 3.41, this is {gr.__version__}", allow_module_level=True)

from lib_identity import units as U  # noqa: E402

WIDGET_CLASSES = {
    "checkbox": gr.Checkbox,
    "model": gr.Dropdown,
    "files": gr.File,
    "slider": gr.Slider,
    "radio": gr.Radio,
    "dropdown": gr.Dropdown,
    "textbox": gr.Textbox,
    "image": gr.Image,
    "mask": gr.Image,
    "face": gr.Dropdown,
    "profile": gr.Dropdown,
}


def _ui_components_module():
    """``modules.ui_components`` as far as the accordion uses it (the WebUI's classes are gradio subclasses too)."""

    class ToolButton(gr.Button):
        def __init__(self, *args, tooltip=None, **kwargs):
            super().__init__(*args, **kwargs)

    class InputAccordion(gr.Checkbox):
        def __init__(self, value, **kwargs):
            super().__init__(value=value, label=kwargs.get("label"), elem_id=kwargs.get("elem_id"), visible=False)
            self.accordion = gr.Accordion(kwargs.get("label"), open=value)

        def __enter__(self):
            self.accordion.__enter__()
            return self

        def __exit__(self, *exc):
            return self.accordion.__exit__(*exc)

    mod = types.ModuleType("modules.ui_components")
    mod.ToolButton, mod.InputAccordion = ToolButton, InputAccordion
    return mod


@pytest.fixture()
def built(monkeypatch, tmp_path):
    from lib_identity.webui import ui

    install_fake_modules(monkeypatch, models_path=tmp_path / "models")
    monkeypatch.setitem(sys.modules, "modules.ui_components", _ui_components_module())
    sys.modules["modules"].ui_components = sys.modules["modules.ui_components"]
    sys.modules["modules.shared"].opts.data["identity_unit_count"] = 2
    script = types.SimpleNamespace()
    with gr.Blocks() as demo:
        components = ui.build(script, is_img2img=False)
    return demo, components, script


def test_components_follow_the_field_table(built):
    demo, components, _ = built
    width = len(U.UI_FIELDS)
    assert len(components) == 1 + 2 * width  # the accordion's own on/off, then each unit's fields
    assert isinstance(components[0], gr.Checkbox) and components[0].elem_id == "identity_txt2img_enabled"
    for number in (1, 2):
        block = components[1 + (number - 1) * width: 1 + number * width]
        for spec, comp in zip(U.FIELDS, block):
            assert isinstance(comp, WIDGET_CLASSES[spec.widget]), spec.name
            assert comp.elem_id == f"identity_txt2img_unit{number}_{spec.name}"
            assert comp.label == spec.label.format(number=number)
            if spec.widget in ("slider", "radio", "dropdown", "checkbox", "face"):
                assert comp.value == spec.default, spec.name
            if spec.widget in ("radio", "dropdown"):
                assert [c[0] if isinstance(c, (tuple, list)) else c for c in comp.choices] == list(spec.parse.options)
            if spec.widget == "slider":
                assert (comp.minimum, comp.maximum) == (spec.parse.lo, spec.parse.hi)
            # a dependent control starts hidden unless its condition holds for the defaults
            if spec.visible_if:
                assert comp.visible == (U.SPECS[spec.visible_if[0]].default == spec.visible_if[1])
    # every component is part of the Blocks (so the WebUI can send its value to the script)
    ids = {id(b) for b in demo.blocks.values()}
    assert all(id(c) in ids for c in components)


def test_default_values_parse_as_a_disabled_default_unit(built):
    _, components, _ = built
    values = [c.value for c in components]
    units = U.parse_script_args(values, unit_count=2)
    assert units == [U.Unit(), U.Unit()]


def test_pasted_infotext_reaches_the_restored_fields(built):
    _, components, script = built
    keys = [k for _, k in script.infotext_fields if isinstance(k, str)]
    for number in (1, 2):
        expected = [U.infotext_key(number, f) for f in U.RESTORED_FIELDS] + [U.infotext_key(number, "needs")]
        assert [k for k in keys if k.startswith(f"Identity {number} ")] == expected
    width = len(U.UI_FIELDS)
    by_key = {k: c for c, k in script.infotext_fields if isinstance(k, str)}
    for i, name in enumerate(U.UI_FIELDS):
        if name in U.RESTORED_FIELDS:
            assert by_key[U.infotext_key(2, name)] is components[1 + width + i]


def test_dependent_controls_are_wired(built):
    demo, components, _ = built
    width = len(U.UI_FIELDS)
    block = dict(zip(U.UI_FIELDS, components[1:1 + width]))
    targets = set()
    for dep in demo.dependencies:
        if dep.get("trigger") != "change":
            continue
        for t in dep["targets"] if isinstance(dep["targets"], list) else [dep["targets"]]:
            source = demo.blocks.get(t[0] if isinstance(t, (list, tuple)) else t)
            for out in dep["outputs"]:
                targets.add((id(source), id(demo.blocks[out])))
    for spec in U.FIELDS:
        if spec.visible_if:
            assert (id(block[spec.visible_if[0]]), id(block[spec.name])) in targets, spec.name


def test_the_face_picker_follows_the_model_and_the_pictures(built):
    demo, components, _ = built
    width = len(U.UI_FIELDS)
    block = dict(zip(U.UI_FIELDS, components[1:1 + width]))
    picker = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "identity_txt2img_unit1_faces")
    assert isinstance(picker, gr.Gallery) and not picker.visible  # shown once a face model has a picture
    assert all(c is not picker for c in components)  # a view, not a script arg
    sources = set()
    for dep in demo.dependencies:
        if dep.get("trigger") == "change" and any(demo.blocks[o] is picker for o in dep["outputs"]):
            sources |= {id(demo.blocks[t[0] if isinstance(t, (list, tuple)) else t])
                        for t in (dep["targets"] if isinstance(dep["targets"], list) else [dep["targets"]])}
    model = next(s.name for s in U.FIELDS if s.widget == "model")
    pictures = next(s.name for s in U.FIELDS if s.widget == "files")
    assert sources == {id(block[model]), id(block[pictures])}


def test_the_pose_face_control_is_a_dropdown_of_auto_largest_and_indexes(built):
    _, components, _ = built
    width = len(U.UI_FIELDS)
    pose = dict(zip(U.UI_FIELDS, components[1:1 + width]))["pose_face"]
    assert isinstance(pose, gr.Dropdown) and pose.value == "auto"
    choices = [c[0] if isinstance(c, (list, tuple)) else c for c in pose.choices]
    assert choices[:3] == ["auto", "largest", "0"]
