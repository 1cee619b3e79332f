"""IP-Adapter: a validated unit -> the ``ImagePrompt`` the UNet patch session installs.

Per unit: the adapter file is loaded once (kept while its file is unchanged), the references
are encoded by the CLIP vision encoder the variant needs (cached by picture content), several
references are combined the way the unit asks, and the projection turns the encodings into
cond and uncond image tokens on the UNet's device and dtype.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from .. import formats
from ..encoders import Preparation, encode_images
from ..errors import UnitError
from ..models import load_adapter
from ..unet import ImagePrompt
from ..unet.references import combine_references

SUPPORTED_FAMILIES = ("ip-adapter",)

_OUTPUTS = {"image_embeds": "image_embeds", "hidden_states[-2]": "hidden_states[-2]"}


class AdapterCache:
    """Loaded adapters by file identity (path, size, mtime); a changed file is loaded again."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str) -> tuple:
        target = formats._diffusers_weights(path) if os.path.isdir(path) else path
        st = os.stat(target)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns)

    def get(self, info: formats.ModelInfo, path: str):
        """``(image_proj, ip_layers)`` on the CPU in the file's precision (fp32 for mixed files)."""
        key = self._key(path)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        print(f"[identity] loading {os.path.basename(path)} ({info.variant})")
        sections = formats.load_tensors(path)
        dtype = torch.float16 if info.dtypes == ("float16",) else torch.float32
        loaded = load_adapter(info, sections, device="cpu", dtype=dtype)
        with self._lock:
            self._items[key] = loaded
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return loaded

    def clear(self):
        with self._lock:
            self._items.clear()


adapters = AdapterCache()


def _mask_tensor(mask) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    import numpy as np

    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)


def _uncond_input(unit):
    if unit.uncond == "image":
        return unit.negative_image
    return unit.uncond  # "zero" | "noise"


def prepare(resolved, *, device, dtype, encoder_path: Optional[str] = None) -> ImagePrompt:
    """The ``ImagePrompt`` of one validated unit (``units.ResolvedUnit``) for a UNet on ``device``/``dtype``."""
    unit, entry, number = resolved.unit, resolved.model, resolved.number
    info = entry.info
    if info.family not in SUPPORTED_FAMILIES:
        raise UnitError(number, "model", f"model '{entry.name}' is {info.family}, which this version cannot run yet; "
                        "choose an IP-Adapter model (FaceID, InstantID and PhotoMaker are coming)")
    output = _OUTPUTS.get(info.encoder_output)
    if output is None:
        raise UnitError(number, "model", f"model '{entry.name}': unknown encoder output {info.encoder_output!r}")
    encoder = encoder_path or resolved.encoders.get(info.image_encoder)
    image_proj, ip_layers = adapters.get(info, entry.path)
    prep = Preparation(mode=unit.preparation, crop_position=unit.crop_position)
    cond, uncond = encode_images(encoder, list(unit.images), output, prep, device=device, dtype=dtype,
                                 uncond=_uncond_input(unit), encoder_id=info.image_encoder)
    mode = unit.combine
    if mode != "concat" and cond.shape[0] > 1:
        # averaged before the projection, as ComfyUI_IPAdapter_plus combines embeddings
        weights = unit.image_weights if mode == "weighted average" else None
        cond = combine_references(cond, mode, weights, unit_name=f"unit {number}", tokens=False)
        if uncond.shape[0] > 1:
            uncond = combine_references(uncond, mode, weights, unit_name=f"unit {number}", tokens=False)
    cond_tokens = _project(image_proj, cond, device, dtype)
    uncond_tokens = _project(image_proj, uncond, device, dtype)
    return ImagePrompt(
        cond_tokens=cond_tokens,
        uncond_tokens=uncond_tokens,
        # the cached CPU layers; the session projects the image keys/values once per pass on
        # the device each UNet block runs on
        ip_layers=ip_layers,
        weight=unit.weight,
        start=unit.start,
        end=unit.end,
        layer_weights=_layer_weights(unit),
        mask=_mask_tensor(unit.mask),
        combine="concat",  # averages were taken above; several remaining entries are concatenated
        name=f"Identity unit {number}",
    )


def _project(image_proj: torch.nn.Module, x: torch.Tensor, device, dtype) -> torch.Tensor:
    """Run the cached projection on ``device`` and put it back where it was kept.

    Half precision on the CPU lacks kernels in older torch (LayerNorm), so the CPU computes in fp32.
    """
    device = torch.device(device)
    compute = torch.float32 if device.type == "cpu" else dtype
    first = next(image_proj.parameters())
    home_device, home_dtype = first.device, first.dtype
    try:
        with torch.no_grad():
            image_proj.to(device=device, dtype=compute)
            out = image_proj(x.to(device=device, dtype=compute))
    finally:
        image_proj.to(device=home_device, dtype=home_dtype)
    return out.to(dtype)


def _layer_weights(unit):
    from ..units import CUSTOM_LAYERS

    if unit.layer_preset == CUSTOM_LAYERS:
        return list(unit.layer_weights)
    return unit.layer_preset


def release():
    """Forget loaded adapters (model switch, script unload)."""
    adapters.clear()


def unet_device_dtype(unet: torch.nn.Module) -> Tuple[torch.device, torch.dtype]:
    """Where the UNet computes: the device and dtype of its first floating-point parameter."""
    for p in unet.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32
