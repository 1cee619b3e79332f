"""Writing checkpoints in the official layouts, for tests.

Two kinds of file:

* ``write_random``: real random tensors (any size; used at small sizes where numbers matter),
  saved the way the official files are saved: ``torch.save`` of nested section dicts for
  ``.bin``, ``safetensors.torch.save_file`` of flat ``section.key`` names for ``.safetensors``.
* ``write_layout``: the official keys and full shapes without paying for gigabytes: a
  ``.safetensors`` file whose data region is a sparse hole (zeros), or a ``.bin`` whose tensors
  share one element of storage. Both are read by the real loaders exactly as a download is.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

MANIFESTS = Path(__file__).parent / "data" / "manifests"

# manifests that describe a file layout (the attention-order tables describe the UNet)
LAYOUT_MANIFESTS = sorted(
    p.stem for p in MANIFESTS.glob("*.json") if json.loads(p.read_text()).get("keys")
)

_ST_DTYPE = {torch.float16: ("F16", 2), torch.float32: ("F32", 4), torch.bfloat16: ("BF16", 2)}


def manifest(name: str) -> dict:
    return json.loads((MANIFESTS / f"{name}.json").read_text())


def manifest_keys(name: str) -> dict:
    """Flat ``section.key`` -> shape, as the manifest lists them (safetensors naming)."""
    return {k: tuple(v) for k, v in manifest(name)["keys"].items()}


def nest(flat: dict) -> dict:
    """``{"a.b": t}`` -> ``{"a": {"b": t}}`` on the first dot, the ``.bin`` container of the official files."""
    out: dict = {}
    for k, v in flat.items():
        section, rest = k.split(".", 1)
        out.setdefault(section, {})[rest] = v
    return out


def has_sections(name: str) -> bool:
    first = next(iter(manifest(name)["keys"]))
    return first.split(".", 1)[0] in ("image_proj", "ip_adapter", "id_encoder", "lora_weights")


def write_random(flat: dict, path, *, seed: int = 0, dtype=torch.float32, std: float = 0.02, nested=None):
    """Random tensors with the given shapes, saved in the container the suffix names."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k, shape in flat.items():
        if isinstance(shape, torch.Tensor):
            tensors[k] = shape.to(dtype).contiguous()
        else:
            tensors[k] = (torch.randn(tuple(shape), generator=g) * std).to(dtype)
    _save(tensors, Path(path), nested)
    return tensors


def _save(tensors: dict, path: Path, nested):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(tensors, str(path))
    else:
        first = next(iter(tensors)).split(".", 1)[0]
        if nested is None:
            nested = first in ("image_proj", "ip_adapter", "id_encoder", "lora_weights")
        torch.save(nest(tensors) if nested else tensors, str(path))


def write_layout(flat: dict, path, *, dtype=torch.float16, nested=None):
    """The full official layout without allocating it (see the module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        code, size = _ST_DTYPE[dtype]
        header, offset = {}, 0
        for k in sorted(flat):
            n = 1
            for d in flat[k]:
                n *= d
            header[k] = {"dtype": code, "shape": list(flat[k]), "data_offsets": [offset, offset + n * size]}
            offset += n * size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            fh.truncate(8 + len(raw) + offset)
    else:
        one = torch.zeros(1, dtype=dtype)
        tensors = {k: one.expand(tuple(s)) if len(s) else one.reshape(()) for k, s in flat.items()}
        _save(tensors, path, nested)
    return path


def write_manifest_layout(name: str, folder, container: str) -> Path:
    """A full-size file of one manifest in ``.bin`` or ``.safetensors`` form, named as upstream names it."""
    m = manifest(name)
    flat = manifest_keys(name)
    upstream = _upstream_name(m, container)
    path = Path(folder) / upstream
    dtype = torch.float32 if "float32" in str(m.get("dtype")) else torch.float16
    write_layout(flat, path, dtype=dtype)
    return path


def _upstream_name(m: dict, container: str) -> str:
    """The official file name (keeps the name-based hints honest), with the asked-for suffix."""
    variant = m["variant"]
    special = {
        "instantid_ip-adapter": "ip-adapter_instant_id_sdxl",
        "instantid_controlnet": "control_instant_id_sdxl",
        "clip_vision_vit-h": "clip_vision_vit-h",
        "clip_vision_vit-bigG": "clip_vision_vit-bigG",
    }
    stem = special.get(variant, variant)
    return stem + (".safetensors" if container == "safetensors" else ".bin")
