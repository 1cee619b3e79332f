"""Grouping flat keys into the official sections, and the two readers built on it.

* ``read_layout(path)``: every key's shape and dtype, grouped into sections
  (``image_proj`` / ``ip_adapter``, ``id_encoder`` / ``lora_weights``, ``controlnet``,
  ``clip_vision``), without reading tensor data.
* ``load_tensors(path)``: the tensors, grouped the same way.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict

from .containers import (
    CHECKPOINT_SUFFIXES,
    SAFETENSORS_DTYPES,
    check_file,
    diffusers_weights,
    fail,
    flatten,
    safetensors_header,
    short_error,
    torch_load_weights_only,
)
from .model_info import Layout
from .openclip_names import openclip_visual_prefix, openclip_visual_to_hf

# Sections of the official containers; see ../shared/reference/formats.md §1.
IP_SECTIONS = ("image_proj", "ip_adapter")
PHOTOMAKER_SECTIONS = ("id_encoder", "lora_weights")
# cubiq's loader maps this legacy prefix to ip_adapter.
LEGACY_SECTION_ALIASES = {"adapter_modules": "ip_adapter"}


def split_sections(flat: dict, path: str) -> Dict[str, dict]:
    """Group flat keys into the official sections; works for keys->shapes and keys->tensors."""
    sections: Dict[str, dict] = {}
    firsts = {k.split(".", 1)[0] for k in flat}

    def take(name, prefix):
        for k, v in flat.items():
            if k.startswith(prefix + "."):
                sections.setdefault(name, {})[k[len(prefix) + 1:]] = v

    if firsts & set(IP_SECTIONS) or firsts & set(LEGACY_SECTION_ALIASES):
        for name in IP_SECTIONS:
            take(name, name)
        for legacy, name in LEGACY_SECTION_ALIASES.items():
            take(name, legacy)
        return sections
    if firsts & set(PHOTOMAKER_SECTIONS):
        for name in PHOTOMAKER_SECTIONS:
            take(name, name)
        return sections
    if any(k.startswith("vision_model.") for k in flat):
        return {"clip_vision": dict(flat)}
    openclip = openclip_visual_prefix(flat)
    if openclip is not None:
        return {"clip_vision": openclip_visual_to_hf(flat, openclip, path)}
    if "controlnet_cond_embedding.conv_in.weight" in flat or "input_hint_block.0.weight" in flat:
        return {"controlnet": dict(flat)}
    # InstantID's own loader also takes the bare sub-dicts merged at the top level: the
    # ip_adapter keys start with their layer number, everything else is the projection.
    if any(re.match(r"^\d+\.to_[kv]_ip\.weight$", k) for k in flat):
        for k, v in flat.items():
            name = "ip_adapter" if k.split(".", 1)[0].isdigit() else "image_proj"
            sections.setdefault(name, {})[k] = v
        return sections
    return {"": dict(flat)}


# OpenCLIP names of the vision tower -> transformers' CLIPVisionModelWithProjection names.

def read_layout(path: str) -> Layout:
    """Keys and shapes of a checkpoint without reading its tensor data (mmap for ``.bin``)."""
    path = os.fspath(path)
    check_file(path)
    config = None
    if os.path.isdir(path):
        weights = diffusers_weights(path)
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as fh:
                    config = json.load(fh)
            except Exception as e:  # noqa: BLE001
                fail(cfg, f"config.json is not valid JSON ({short_error(e)})")
        layout = read_layout(weights)
        layout.path, layout.container, layout.config = path, "diffusers-folder", config
        return layout
    lower = path.lower()
    if lower.endswith(".safetensors"):
        header = safetensors_header(path)
        flat = {k: v[0] for k, v in header.items()}
        dtypes = tuple(sorted({SAFETENSORS_DTYPES.get(v[1], v[1].lower()) for v in header.values()}))
        container = "safetensors"
    elif lower.endswith(CHECKPOINT_SUFFIXES):
        tensors = flatten(torch_load_weights_only(path), path)
        flat = {k: tuple(t.shape) for k, t in tensors.items()}
        dtypes = tuple(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}))
        container = "bin"
    else:
        fail(path, "unknown file type; expected .safetensors or .bin")
    if not flat:
        fail(path, "the file holds no tensors")
    return Layout(path=path, container=container, sections=split_sections(flat, path), dtypes=dtypes, config=config)


def load_tensors(path: str) -> Dict[str, dict]:
    """All tensors of a checkpoint on the CPU, grouped by section as ``read_layout`` groups them."""
    path = os.fspath(path)
    check_file(path)
    if os.path.isdir(path):
        path = diffusers_weights(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        safetensors_header(path)
        try:
            flat = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001
            fail(path, f"could not read the tensors ({short_error(e)}); the file may be corrupt")
    else:
        flat = flatten(torch_load_weights_only(path, mmap=False), path)
    return split_sections(flat, path)

