"""The "Identity" accordion: one tab per unit, its components made from the field table.

Each field of ``units.FIELDS`` becomes one component (its ``widget``, ``label``, ``row`` and
``section``), in the table's order, which is also the order of the script's args. Two things
ride along that are not fields: the model's status line (after the model's row) and the
references' preview with the "needs" line that pasted infotext fills (after the pictures' row),
and the "Save as profile…" row under it (``ui_profiles``).
"""

from __future__ import annotations

from itertools import groupby

from .. import units as U
from . import folders, lookup, settings, ui_profiles

# what the face dropdown offers; a box [x0, y0, x1, y1] can be typed (or pasted from infotext) too
FACE_CHOICES = ("largest",) + tuple(str(i) for i in range(8))


# the file to start with, by the loaded checkpoint's base: the most useful next step when there is none
FIRST_MODEL = {"sd15": "ip-adapter_sd15.safetensors", "sdxl": "ip-adapter_sdxl_vit-h.safetensors"}


def _attr(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _searched() -> str:
    """The searched folders as users name them, the full paths in a tooltip."""
    import html

    full = folders.model_folders()
    short = ", ".join(folders.shown(f) for f in full)
    return f'<span title="{_attr(chr(10).join(full))}">searched: {html.escape(short)}</span>'


def model_status(model_title: str) -> str:
    """One line: the next step first, then what the chosen model is and whether what it needs is there.

    Folders are named from the WebUI's folder (``models/ipadapter``); the full paths are in the
    tooltip and ``GET /identity/v1/models``.
    """
    if not model_title or model_title == "None":
        base = lookup.loaded_base()
        if not any(e.usable for e in folders.list_models()):
            first = FIRST_MODEL.get(base, FIRST_MODEL["sd15"])
            return f"No model yet: put **{first}** (or any other identity model) in models/ipadapter, then press 🔄 · " + _searched()
        return "Choose a model (🔄 after adding files) · " + _searched()
    try:
        entry = folders.find_model(model_title)
    except Exception as e:  # noqa: BLE001 - the status line explains, never raises
        return folders.shorten(f"⚠ {e}")
    if entry.info is None:
        return folders.shorten(f"⚠ {entry.name}: {entry.error}")
    info = entry.info
    summary = f"**{info.variant}** ({U.BASE_NAMES.get(info.base, info.base)}" + (f", {info.tokens} tokens)" if info.tokens else ")")
    first, parts = [], [summary]
    base = lookup.loaded_base()
    if base and info.base != base:
        first.append(f"⚠ made for {U.BASE_NAMES.get(info.base)}, the loaded checkpoint is {U.BASE_NAMES.get(base)}: "
                     f"load an {U.BASE_NAMES.get(info.base)} checkpoint or choose another model")
    for need in U.required_encoders(info):
        found, where = lookup.find_encoder_status(need)
        name = U.describe_need(need)
        if found:
            parts.append(f"needs {name}: found")
        else:
            # the short next step in the line, the whole message (what was searched, where to get it) on hover
            step = U.ENCODER_HELP.get(need, f"needs {name}")
            first.append(f'⚠ <span title="{_attr(folders.shorten(where))}">{step}, then press 🔄</span>')
    parts += [f"note: {h}" for h in info.hints]
    if info.family == "instantid-adapter":
        parts.append(_controlnet_names(entry.path))
    return folders.shorten(" · ".join(p for p in first + parts if p))


def _controlnet_names(adapter_path: str) -> str:
    """Whether the ControlNet extension (when installed) would take these files as InstantID."""
    from . import controlnet_bridge

    found, identitynet = lookup.find_encoder_status(controlnet_bridge.IDENTITYNET)
    return controlnet_bridge.names_status(adapter_path, identitynet if found else None)


def build(script, is_img2img: bool):
    """Build the accordion; returns the components in script-args order (accordion first)."""
    import gradio as gr
    from modules.ui_components import InputAccordion, ToolButton

    tab = "img2img" if is_img2img else "txt2img"
    count = settings.unit_count()
    components = []
    infotext_fields = []
    paste_names = []
    choices = lookup.model_choices()

    def eid(name):
        return f"identity_{tab}_{name}"

    profile_units = []
    with InputAccordion(False, label="Identity", elem_id=eid("enabled")) as accordion:
        components.append(accordion)
        infotext_fields.append((accordion, lambda d: any(U.norm_word(str(k)).startswith("identity ") for k in d)))
        with gr.Tabs():
            for number in range(1, count + 1):
                with gr.Tab(f"Unit {number}", elem_id=eid(f"unit{number}")):
                    c = _unit_block(gr, ToolButton, number, lambda name, n=number: eid(f"unit{n}_{name}"), choices)
                    profile_units.append(c["profiles"])
                    components.extend(c[f] for f in U.UI_FIELDS)
                    for f in U.RESTORED_FIELDS:
                        key = U.infotext_key(number, f)
                        infotext_fields.append((c[f], key))
                        paste_names.append(key)
                    infotext_fields.append((c["needs"], U.infotext_key(number, "needs")))
    ui_profiles.wire(gr, profile_units)
    script.infotext_fields = infotext_fields
    script.paste_field_names = paste_names
    return components


def _component(gr, spec: U.FieldSpec, number: int, elem_id: str, choices):
    """The gradio component of one field, as its ``widget`` says."""
    label = spec.label.format(number=number)
    visible = spec.visible_if is None or U.SPECS[spec.visible_if[0]].default == spec.visible_if[1]
    kw = {"label": label, "elem_id": elem_id, "visible": visible}
    w = spec.widget
    if w == "checkbox":
        return gr.Checkbox(value=spec.default, **kw)
    if w == "model":
        return gr.Dropdown(choices=choices, value="None", allow_custom_value=True, **kw)
    if w == "files":
        return gr.File(file_count="multiple", file_types=["image"], **kw)
    if w == "slider":
        lo, hi = spec.parse.lo, spec.parse.hi
        return gr.Slider(minimum=lo, maximum=hi, step=spec.step or 0.01, value=spec.default, **kw)
    if w == "radio":
        return gr.Radio(choices=list(spec.parse.options), value=spec.default, **kw)
    if w == "dropdown":
        return gr.Dropdown(choices=list(spec.parse.options), value=spec.default, **kw)
    if w == "textbox":
        return gr.Textbox(placeholder=spec.parse.expected.split("(e.g. ")[-1].rstrip(")").strip('"'), **kw)
    if w == "mask":
        return gr.Image(type="pil", image_mode="RGBA", **kw)
    if w == "image":
        return gr.Image(type="pil", **kw)
    if w == "face":
        return gr.Dropdown(choices=list(FACE_CHOICES), value=spec.default, allow_custom_value=True, **kw)
    if w == "profile":
        return ui_profiles.dropdown(gr, **kw)
    raise ValueError(f"field {spec.name}: unknown widget {w!r}")


def _unit_block(gr, ToolButton, number, eid, choices):
    """One unit's tab: the table's rows in order; returns field name -> component (plus 'status', 'needs',
    and under 'profiles' what ``ui_profiles.wire`` needs)."""
    c = {}
    extras = {}
    for section, specs in groupby(U.FIELDS, key=lambda s: s.section):
        specs = list(specs)
        if section is None:
            _rows(gr, ToolButton, specs, number, eid, choices, c, extras)
        else:
            with gr.Accordion(section, open=False):
                _rows(gr, ToolButton, specs, number, eid, choices, c, extras)
    _wire(gr, c, extras)
    by_widget = {s.widget: s.name for s in U.FIELDS}
    c["profiles"] = dict(extras["save"], dropdown=c[by_widget["profile"]], refresh=extras["profile_refresh"],
                         images=c[by_widget["files"]], face=c["face"], preparation=c["preparation"],
                         crop_position=c["crop_position"])
    return c


def _rows(gr, ToolButton, specs, number, eid, choices, c, extras):
    for _row, in_row in groupby(specs, key=lambda s: s.row):
        in_row = list(in_row)
        with gr.Row():
            for spec in in_row:
                c[spec.name] = _component(gr, spec, number, eid(spec.name), choices)
                if spec.widget == "model":
                    extras["refresh"] = ToolButton(value="\U0001f504", elem_id=eid("refresh"), tooltip="Look for new model files")
                elif spec.widget == "profile":
                    extras["profile_refresh"] = ui_profiles.refresh_button(ToolButton, eid("profile_refresh"))
                elif spec.widget == "files":
                    extras["preview"] = gr.Gallery(label="References", show_label=False, columns=4, height=160,
                                                   elem_id=eid("preview"))
        widgets = {s.widget for s in in_row}
        if "face" in widgets:
            # the whole tab's width, one picture at a time at full size: the boxes and their numbers
            # must be readable (as thumbnails in half a row they were not)
            extras["faces"] = gr.Gallery(label="Faces found (numbered as the Face choice counts them)",
                                         columns=1, height=420, object_fit="contain", preview=True,
                                         elem_id=eid("faces"), visible=False)
        if "model" in widgets:
            c["status"] = gr.Markdown(model_status("None"), elem_id=eid("status"))
        if "files" in widgets:
            # filled by pasted infotext: which reference pictures the restored unit needs again
            c["needs"] = gr.Markdown("", elem_id=eid("needs"))
            extras["save"] = ui_profiles.save_row(gr, eid)
        if "face" in widgets:
            extras["faces_status"] = gr.Markdown("", elem_id=eid("faces_status"), visible=False)


def model_info(model_title):
    """The chosen model's ``ModelInfo``, None when none is chosen or it is unknown."""
    if not model_title or model_title == "None":
        return None
    try:
        return folders.find_model(model_title).info
    except Exception:  # noqa: BLE001 - an unknown model shows every control; the run explains
        return None


def method_of(model_title) -> "str | None":
    """The method ('ip-adapter', 'faceid', …) of the chosen model, None when none or unknown."""
    info = model_info(model_title)
    return U.METHOD_OF_FAMILY.get(info.family) if info is not None else None


# fields of a method that only some of its files use: shown only when the chosen file does
_USED_BY = {
    "s_scale": lambda info: bool(info.params.get("shortcut")),  # only FaceID-Plus v2 has the shortcut
    "lora_weight": lambda info: bool(getattr(info, "lora", False)),  # Portrait has no LoRA
    "face": lambda info: info.family != "photomaker" or bool(info.face_model),  # PhotoMaker V1 reads no faces
}


def start_for_model(model_title, start):
    """The start slider's value after the user picks a model: PhotoMaker's own default (0.2) when
    the slider is at the general default, and back when leaving PhotoMaker; anything the user set
    stays. (Bound to the dropdown's ``input`` event only, so pasted infotext is never changed.)"""
    spec = U.SPECS["start"]
    method = method_of(model_title)
    own = spec.default_for(method)
    others = {spec.default} | {value for _, value in spec.method_defaults}
    return own if start in others else start


def visible_fields(method, values: dict, info=None) -> dict:
    """Field -> shown, for the fields that depend on the model's method (and, given ``info``, its
    variant) or on another field's value."""
    out = {}
    for spec in U.FIELDS:
        shown = method is None or method in spec.methods
        if shown and info is not None and spec.name in _USED_BY:
            shown = _USED_BY[spec.name](info)
        if spec.visible_if is not None:
            other, wanted = spec.visible_if
            shown = shown and values.get(other, U.SPECS[other].default) == wanted
        if spec.methods != U.METHODS or spec.visible_if is not None:
            out[spec.name] = shown
    return out


def _wire(gr, c, extras):
    """Events: refresh and status for the model, previews for the pictures and their faces, and
    which controls show (the model's method and ``visible_if``)."""
    model = next(s.name for s in U.FIELDS if s.widget == "model")
    pictures = next(s.name for s in U.FIELDS if s.widget == "files")
    face = next(s.name for s in U.FIELDS if s.widget == "face")

    def on_refresh(current):
        new = lookup.model_choices(refresh=True)
        return gr.update(choices=new, value=current), model_status(current)

    extras["refresh"].click(on_refresh, inputs=[c[model]], outputs=[c[model], c["status"]], show_progress=False)
    c[model].change(model_status, inputs=[c[model]], outputs=[c["status"]], show_progress=False)
    c[pictures].change(lambda files: (_preview(files), ""), inputs=[c[pictures]], outputs=[extras["preview"], c["needs"]],
                       show_progress=False)

    dependent = [name for name in visible_fields(None, {})]
    sources = [model] + sorted({s.visible_if[0] for s in U.FIELDS if s.visible_if})

    def on_change(*values):
        info = model_info(values[0])
        method = U.METHOD_OF_FAMILY.get(info.family) if info is not None else None
        shown = visible_fields(method, dict(zip(sources, values)), info)
        return [gr.update(visible=shown[name]) for name in dependent]

    start = next(s.name for s in U.FIELDS if s.method_defaults)
    c[model].input(lambda title, value: start_for_model(title, value), inputs=[c[model], c[start]], outputs=[c[start]],
                   show_progress=False)

    for source in sources:
        c[source].change(on_change, inputs=[c[s] for s in sources], outputs=[c[n] for n in dependent], show_progress=False)

    def on_faces(files, model_title):
        gallery, status = face_picker(files, model_title)
        shown = method_of(model_title) in U.SPECS[face].methods and bool(files)
        return gr.update(value=gallery, visible=shown and bool(gallery)), gr.update(value=status, visible=shown and bool(status))

    for trigger in (pictures, model):
        c[trigger].change(on_faces, inputs=[c[pictures], c[model]], outputs=[extras["faces"], extras["faces_status"]],
                          show_progress=False)


def face_picker(files, model_title):
    """The face picker: each reference picture with its faces boxed and numbered, and a status line
    (the face pack that is missing, a picture without a face)."""
    info = model_info(model_title)
    if info is None or U.METHOD_OF_FAMILY.get(info.family) not in U.SPECS["face"].methods or not files:
        return [], ""
    need = next((n for n in U.required_encoders(info) if n.startswith("insightface:")), None)
    if need is None:  # PhotoMaker V1: whole pictures only
        return [], ""
    found, pack = lookup.find_encoder_status(need)
    if not found:
        return [], folders.shorten(f"⚠ {pack}")
    from ..encoders import faces as face_analysis

    open_upload = lookup.upload_opener()

    gallery, notes = [], []
    for i, f in enumerate(files, 1):
        name = getattr(f, "name", None) or (f.get("name") if isinstance(f, dict) else None)
        try:
            image = open_upload(name)
            found_faces = face_analysis.analyse_faces(image, pack)
        except Exception as e:  # noqa: BLE001 - the picker explains, the run refuses
            notes.append(f"picture {i}: {e}")
            continue
        if not found_faces:
            notes.append(f"picture {i}: no face found")
        gallery.append((face_analysis.draw_faces(image, found_faces), f"picture {i}: {len(found_faces)} face(s)"))
    return gallery, " · ".join(notes)


def _preview(files):
    out = []
    for f in files or []:
        name = getattr(f, "name", None) or (f.get("name") if isinstance(f, dict) else None)
        if name:
            out.append(name)
    return out
