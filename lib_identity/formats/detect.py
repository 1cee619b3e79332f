"""Telling what a checkpoint is: the family by its sections, then that family's detector."""

from __future__ import annotations

from .clip_vision import detect_clip_vision
from .containers import fail
from .controlnet import detect_controlnet
from .ip_adapter import detect_ip_adapter
from .model_info import Layout, ModelInfo
from .photomaker import detect_photomaker
from .sections import read_layout
from .shapes import name_hints, path_text


def detect(layout: Layout) -> ModelInfo:
    """Tell what a checkpoint is from its keys and shapes; raise ``CheckpointError`` if it is none of ours."""
    names = name_hints(layout.path)
    s = layout.sections
    if "image_proj" in s or "ip_adapter" in s:
        info = detect_ip_adapter(layout, names)
    elif "id_encoder" in s:
        info = detect_photomaker(layout)
    elif "clip_vision" in s:
        info = detect_clip_vision(layout)
    elif "controlnet" in s:
        # only the wording of a note: IdentityNet's official folder is ``…/InstantID/ControlNetModel``
        info = detect_controlnet(layout, path_text(layout.path))
    else:
        sample = ", ".join(sorted(layout.section(""))[:3])
        fail(
            layout.path,
            "not an identity checkpoint: no image_proj/ip_adapter, id_encoder/lora_weights, ControlNet "
            f"or CLIP-vision keys (first keys: {sample or 'none'})",
        )
    info.path = layout.path
    info.container = layout.container
    info.dtypes = layout.dtypes
    info.key_count = layout.key_count
    return info


def inspect(path: str) -> ModelInfo:
    """Read a checkpoint's layout and say what it is."""
    return detect(read_layout(path))
