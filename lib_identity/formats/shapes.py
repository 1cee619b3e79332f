"""Hyper-parameters read off tensor shapes, shared by the detectors."""

from __future__ import annotations

import re
from typing import Dict, List, Optional

from .containers import CHECKPOINT_SUFFIXES
from .model_info import Shape


def name_hints(path: Optional[str]) -> str:
    """The checkpoint's own name, lower-cased: what the hints between identical layouts read.

    A file's name without its suffix, or a diffusers folder's own name. Never the folders above
    it: ``highlights/``, ``faceswap/``, ``portraits/`` or ``v2/`` say nothing about the file.
    """
    text = (path or "").replace("\\", "/").rstrip("/")
    name = text.rsplit("/", 1)[-1].lower()
    for suffix in CHECKPOINT_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def path_text(path: Optional[str]) -> str:
    """The whole path, lower-cased with forward slashes, for messages that decide nothing."""
    return (path or "").replace("\\", "/").lower()


def layer_indices(section: Dict[str, Shape], suffix: str) -> List[int]:
    """Numbers ``N`` of the keys ``N.<suffix>`` of a section, sorted as integers."""
    out = []
    for k in section:
        m = re.match(r"^(\d+)\.(.+)$", k)
        if m and m.group(2) == suffix:
            out.append(int(m.group(1)))
    return sorted(out)


def resampler_params(proj: Dict[str, Shape], prefix: str = "") -> dict:
    """The Resampler's constructor arguments (``lib_identity.models.resampler``) from its shapes."""
    p = prefix
    latents = proj.get(p + "latents")
    depth = len({k[len(p):].split(".")[1] for k in proj if k.startswith(p + "layers.")})
    dim = proj[p + "proj_in.weight"][0]
    inner = proj[p + "layers.0.0.to_q.weight"][0]
    dim_head = 64
    params = {
        "dim": dim,
        "depth": depth,
        "dim_head": dim_head,
        "heads": inner // dim_head,
        "embedding_dim": proj[p + "proj_in.weight"][1],
        "output_dim": proj[p + "proj_out.weight"][0],
        "ff_mult": proj[p + "layers.0.1.1.weight"][0] // dim,
    }
    if latents is not None:
        params["num_queries"] = latents[1]
    return params
