"""The "Identity" accordion: one tab per unit, components laid out in ``units.UI_FIELDS`` order."""

from __future__ import annotations

from typing import List, Optional

from .. import units as U
from . import folders, settings

# Fields that pasted infotext restores (images, masks and negative images are pictures: the
# status line says which ones to add instead).
PASTE_FIELDS = (
    "enabled", "model", "image_weights", "weight", "start", "end", "combine", "preparation",
    "crop_position", "layer_preset", "layer_weights", "uncond",
)


def loaded_base() -> Optional[str]:
    """'sd15' / 'sdxl' for the loaded checkpoint, None when none is loaded or it is neither."""
    try:
        from modules import shared

        model = shared.sd_model
    except Exception:  # noqa: BLE001
        return None
    if model is None:
        return None
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd1", False):
        return "sd15"
    return None


def model_choices(refresh: bool = False) -> List[str]:
    """Usable adapter models for the loaded checkpoint's base, as "name [hash]"."""
    base = loaded_base()
    out = ["None"]
    for e in folders.list_models(refresh=refresh):
        info = e.info
        if info is None or info.family not in U.ADAPTER_FAMILIES:
            continue
        if base and info.base and info.base != base:
            continue
        out.append(e.title)
    return out


def model_status(model_title: str) -> str:
    """One line: what the chosen model is and whether what it needs is there."""
    if not model_title or model_title == "None":
        return "Choose a model. Models are found in " + ", ".join(folders.model_folders()[:4]) + " …"
    try:
        entry = folders.find_model(model_title)
    except Exception as e:  # noqa: BLE001 - the status line explains, never raises
        return f"⚠ {e}"
    if entry.info is None:
        return f"⚠ {entry.name}: {entry.error}"
    info = entry.info
    parts = [f"**{info.variant}** ({U.BASE_NAMES.get(info.base, info.base)}, {info.tokens} tokens)"]
    base = loaded_base()
    if base and info.base != base:
        parts.append(f"⚠ made for {U.BASE_NAMES.get(info.base)}, the loaded checkpoint is {U.BASE_NAMES.get(base)}")
    from .runtime import find_encoder_status

    for need in U.required_encoders(info):
        found, where = find_encoder_status(need)
        name = U._describe_need(need)
        parts.append(f"needs {name}: found" if found else f"needs {name}: **missing** — {where}")
    parts += [f"note: {h}" for h in info.hints]
    return " · ".join(parts)


def build(script, is_img2img: bool):
    """Build the accordion; returns the components in script-args order (accordion first)."""
    import gradio as gr
    from modules.ui_components import InputAccordion, ToolButton

    tab = "img2img" if is_img2img else "txt2img"
    count = settings.unit_count()
    components = []
    infotext_fields = []
    paste_names = []
    choices = model_choices()

    def eid(name):
        return f"identity_{tab}_{name}"

    with InputAccordion(False, label="Identity", elem_id=eid("enabled")) as accordion:
        components.append(accordion)
        infotext_fields.append((accordion, lambda d: any(U._norm_word(str(k)).startswith("identity ") for k in d)))
        with gr.Tabs():
            for number in range(1, count + 1):
                with gr.Tab(f"Unit {number}", elem_id=eid(f"unit{number}")):
                    c = _unit_block(gr, ToolButton, number, eid, choices)
                    components.extend(c[f] for f in U.UI_FIELDS)
                    for f in PASTE_FIELDS:
                        key = f"Identity {number} {f}"
                        infotext_fields.append((c[f], key))
                        paste_names.append(key)
                    infotext_fields.append((c["needs"], f"Identity {number} needs"))
    script.infotext_fields = infotext_fields
    script.paste_field_names = paste_names
    return components


def _unit_block(gr, ToolButton, number, eid, choices):
    c = {}
    with gr.Row():
        c["enabled"] = gr.Checkbox(label=f"Enable unit {number}", value=False, elem_id=eid(f"unit{number}_enabled"))
        c["model"] = gr.Dropdown(label="Model", choices=choices, value="None", allow_custom_value=True,
                                 elem_id=eid(f"unit{number}_model"))
        refresh = ToolButton(value="\U0001f504", elem_id=eid(f"unit{number}_refresh"), tooltip="Look for new model files")
    c["status"] = gr.Markdown(model_status("None"), elem_id=eid(f"unit{number}_status"))
    with gr.Row():
        c["images"] = gr.File(label="Reference images", file_count="multiple", file_types=["image"],
                              elem_id=eid(f"unit{number}_images"))
        preview = gr.Gallery(label="References", show_label=False, columns=4, height=160,
                             elem_id=eid(f"unit{number}_preview"))
    # filled by pasted infotext: which reference pictures the restored unit needs again
    c["needs"] = gr.Markdown("", elem_id=eid(f"unit{number}_needs"))
    with gr.Row():
        c["weight"] = gr.Slider(label="Weight", minimum=U.WEIGHT_RANGE[0], maximum=U.WEIGHT_RANGE[1], step=0.05,
                                value=1.0, elem_id=eid(f"unit{number}_weight"))
        c["start"] = gr.Slider(label="Start (fraction of steps)", minimum=0, maximum=1, step=0.01, value=0.0,
                               elem_id=eid(f"unit{number}_start"))
        c["end"] = gr.Slider(label="End (fraction of steps)", minimum=0, maximum=1, step=0.01, value=1.0,
                             elem_id=eid(f"unit{number}_end"))
    with gr.Row():
        c["combine"] = gr.Radio(label="Several images", choices=list(U.COMBINE_MODES), value="average",
                                elem_id=eid(f"unit{number}_combine"))
        c["image_weights"] = gr.Textbox(label="Image weights (one per image)", placeholder="1, 0.5", visible=False,
                                        elem_id=eid(f"unit{number}_image_weights"))
    with gr.Row():
        c["preparation"] = gr.Radio(label="Fit to the encoder's square", choices=list(U.PREPARATIONS), value="crop",
                                    elem_id=eid(f"unit{number}_preparation"))
        c["crop_position"] = gr.Dropdown(label="Keep", choices=list(U.CROP_POSITIONS), value="center",
                                         elem_id=eid(f"unit{number}_crop_position"))
    with gr.Row():
        c["layer_preset"] = gr.Dropdown(label="Layers", choices=list(U.LAYER_PRESET_CHOICES), value="standard",
                                        elem_id=eid(f"unit{number}_layer_preset"))
        c["layer_weights"] = gr.Textbox(label="Weight per cross-attention layer (16 SD1.5 / 70 SDXL)", visible=False,
                                        placeholder="0, 0, 1, …", elem_id=eid(f"unit{number}_layer_weights"))
    with gr.Accordion("Region and negative", open=False):
        with gr.Row():
            c["mask"] = gr.Image(label="Region mask (white = where the unit acts)", type="pil", image_mode="RGBA",
                                 elem_id=eid(f"unit{number}_mask"))
            c["uncond"] = gr.Radio(label="Negative side", choices=list(U.UNCOND_MODES), value="zero",
                                   elem_id=eid(f"unit{number}_uncond"))
            c["negative_image"] = gr.Image(label="Negative image", type="pil", visible=False,
                                           elem_id=eid(f"unit{number}_negative_image"))

    def on_refresh(current):
        new = model_choices(refresh=True)
        return gr.update(choices=new, value=current if current in new else current), model_status(current)

    refresh.click(on_refresh, inputs=[c["model"]], outputs=[c["model"], c["status"]], show_progress=False)
    c["model"].change(model_status, inputs=[c["model"]], outputs=[c["status"]], show_progress=False)
    c["images"].change(lambda files: (_preview(files), ""), inputs=[c["images"]], outputs=[preview, c["needs"]],
                       show_progress=False)
    c["combine"].change(lambda m: gr.update(visible=m == U.WEIGHTED), inputs=[c["combine"]], outputs=[c["image_weights"]])
    c["preparation"].change(lambda m: gr.update(visible=m == "crop"), inputs=[c["preparation"]], outputs=[c["crop_position"]])
    c["layer_preset"].change(lambda m: gr.update(visible=m == U.CUSTOM_LAYERS), inputs=[c["layer_preset"]],
                             outputs=[c["layer_weights"]])
    c["uncond"].change(lambda m: gr.update(visible=m == "image"), inputs=[c["uncond"]], outputs=[c["negative_image"]])
    return c


def _preview(files):
    out = []
    for f in files or []:
        name = getattr(f, "name", None) or (f.get("name") if isinstance(f, dict) else None)
        if name:
            out.append(name)
    return out


