"""The extension's section in Settings; read back with ``option()`` which is safe before registration."""

from __future__ import annotations

SECTION = ("identity", "Identity")

DEFAULTS = {
    "identity_unit_count": 3,
    "identity_extra_model_dirs": "",
    "identity_encoder_offload": "move to CPU after use",
    "identity_cache_size": 64,
    "identity_identitynet_cache": 1,
    # the insightface pack each official choice stands for (buffalo_l: FaceID, PhotoMaker V2; antelopev2: InstantID)
    "identity_face_pack_buffalo_l": "buffalo_l",
    "identity_face_pack_antelopev2": "antelopev2",
    # after each image: ArcFace cosine of its face to each unit's reference face (webui/likeness.py)
    "identity_likeness": True,
}

OFFLOAD_CHOICES = ["keep on device", "move to CPU after use", "unload after use"]


def option(key: str):
    """A setting's value; the default when the settings are not loaded or the key is unknown."""
    try:
        from modules import shared

        return shared.opts.data.get(key, DEFAULTS[key])
    except Exception:  # noqa: BLE001 - outside a WebUI (tests, CLI) the defaults apply
        return DEFAULTS[key]


def unit_count() -> int:
    try:
        return max(1, min(8, int(option("identity_unit_count"))))
    except (TypeError, ValueError):
        return DEFAULTS["identity_unit_count"]


def register():
    """``on_ui_settings`` callback."""
    import gradio as gr
    from modules import shared

    def add(key, label, component=None, component_args=None, info=None, restart=False):
        opt = shared.OptionInfo(DEFAULTS[key], label, component, component_args, section=SECTION)
        if info:
            opt = opt.info(info)
        if restart:
            opt = opt.needs_reload_ui()
        shared.opts.add_option(key, opt)

    add(
        "identity_unit_count",
        "Number of identity units in the accordion",
        gr.Slider,
        {"minimum": 1, "maximum": 8, "step": 1},
        restart=True,
    )
    add(
        "identity_extra_model_dirs",
        "Extra model folders (one per line), searched before models/ipadapter, models/ControlNet, models/photomaker …",
        gr.Textbox,
        {"lines": 2},
        info="--identity-models-dir is searched first",
    )
    add(
        "identity_encoder_offload",
        "Image encoders after use",
        gr.Radio,
        {"choices": OFFLOAD_CHOICES},
        info="keep on the GPU (fastest, uses VRAM) / move to CPU RAM / unload completely",
    )
    add(
        "identity_cache_size",
        "Cached reference encodings and face analyses (0 disables the caches)",
        gr.Slider,
        {"minimum": 0, "maximum": 1024, "step": 1},
    )
    add(
        "identity_identitynet_cache",
        "IdentityNets kept loaded between generations (2.5 GB each in fp16; 0 loads it for every generation)",
        gr.Slider,
        {"minimum": 0, "maximum": 4, "step": 1},
    )
    add(
        "identity_face_pack_buffalo_l",
        "Face models (insightface pack) for FaceID and PhotoMaker V2",
        gr.Textbox,
        info="the official choice is buffalo_l; a pack is a folder of .onnx files under models/insightface/models",
    )
    add(
        "identity_face_pack_antelopev2",
        "Face models (insightface pack) for InstantID",
        gr.Textbox,
        info="the official choice is antelopev2",
    )
    add(
        "identity_likeness",
        "Measure likeness: after each image, the ArcFace cosine of its face to each unit's reference face "
        "(infotext \"Identity 1 likeness\", a table after an X/Y/Z plot)",
        gr.Checkbox,
        info="one face analysis per image; needs the unit's face models (IP-Adapter units: buffalo_l)",
    )
