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
from typing import Optional

import torch

from .. import formats
from ..encoders import OUTPUTS, Preparation, encode_images
from ..errors import PatchError, UnitError
from ..models import load_adapter
from ..unet import ImagePrompt
from ..unet.references import combine_references, normalise_mode

SUPPORTED_FAMILIES = ("ip-adapter",)


class AdapterCache:
    """Loaded adapters by file identity (path, size, mtime); a changed file is loaded again."""

    def __init__(self, size: int = 4):
        self.size = size
        self._items: "OrderedDict[tuple, tuple]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str) -> tuple:
        target = formats.diffusers_weights(path) if os.path.isdir(path) else path
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


def image_prompt(info: formats.ModelInfo, image_proj: torch.nn.Module, ip_layers, images, encoder, *,
                 device, dtype, preparation: Optional[Preparation] = None, uncond="zero",
                 combine: str = "concat", reference_weights=None, name: str = "unit",
                 encoder_id: Optional[str] = None, encoded=None, **prompt) -> ImagePrompt:
    """Encode ``images`` with ``encoder``, combine them, project them: one unit's ``ImagePrompt``.

    The one path from pictures to image tokens, for the WebUI (``prepare``) and for Python
    callers (``lib_identity.api.image_prompt``). ``average`` and ``weighted average`` combine
    the encoder outputs before the projection (ComfyUI_IPAdapter_plus's ``combine_embeds``);
    ``concat`` projects each picture and lays the tokens side by side. ``prompt`` holds the
    remaining ``ImagePrompt`` fields (weight, start, end, layer_weights, mask, …). ``encoded``:
    ``(cond, uncond)`` encodings made already (a profile's), in place of ``images``.
    """
    from ..encoders import DEFAULT_PREPARATION

    output = info.encoder_output
    if output not in OUTPUTS:
        raise PatchError(f"{name}: {info.variant} is not fed by CLIP vision ({info.encoder_output}); it needs its own method")
    mode = normalise_mode(combine, name)
    if encoded is None:
        encoded = encode_images(encoder, images, output, preparation or DEFAULT_PREPARATION, device=device,
                                dtype=dtype, uncond=uncond, encoder_id=encoder_id)
    cond, negative = encoded
    if mode != "concat" and cond.shape[0] > 1:
        cond = combine_references(cond, mode, reference_weights, unit_name=name, tokens=False)
        if negative.shape[0] > 1:
            negative = combine_references(negative, mode, reference_weights, unit_name=name, tokens=False)
    return ImagePrompt(
        cond_tokens=_project(image_proj, cond, device, dtype),
        uncond_tokens=_project(image_proj, negative, device, dtype),
        # the session projects the image keys/values once per pass, on the device each UNet
        # block runs on, so the layers can stay where they are kept
        ip_layers=ip_layers,
        combine="concat",  # averages were taken above; several remaining entries are concatenated
        name=name,
        **prompt,
    )


def prepare(resolved, *, device, dtype) -> ImagePrompt:
    """The ``ImagePrompt`` of one validated unit (``units.ResolvedUnit``) for a UNet on ``device``/``dtype``."""
    unit, entry, number = resolved.unit, resolved.model, resolved.number
    info = entry.info
    if info.family not in SUPPORTED_FAMILIES:
        raise UnitError(number, "model", f"model '{entry.name}' is {info.family}; this step prepares IP-Adapter models only "
                        "(methods.prepare_units sends each model to its method)")
    image_proj, ip_layers = adapters.get(info, entry.path)
    encoder = resolved.encoders.get(info.image_encoder)
    preparation = Preparation(mode=unit.preparation, crop_position=unit.crop_position)
    encoded = None
    if resolved.profile is not None:
        encoded = _profile_encodings(resolved, encoder, preparation, device, dtype)
    return image_prompt(
        info, image_proj, ip_layers, list(unit.images), encoder,
        device=device, dtype=dtype, encoder_id=info.image_encoder, preparation=preparation, encoded=encoded,
        uncond=_uncond_input(unit), combine=unit.combine,
        reference_weights=unit.image_weights, name=f"Identity unit {number}",
        weight=unit.weight, start=unit.start, end=unit.end, layer_weights=_layer_weights(unit),
        mask=_mask_tensor(unit.mask),
    )


def _profile_encodings(resolved, encoder, preparation, device, dtype):
    """``(cond, uncond)`` for a unit that uses a profile: its pictures' encodings, and the uncond
    side made as for pictures (zeros, the encoder on zero pixels or noise, or the negative image)."""
    from ..encoders import encode_uncond
    from ..profiles import use
    from ..profiles.profile import ProfileError

    unit, info = resolved.unit, resolved.model.info
    try:
        stored = use.clip(resolved.profile, info.image_encoder, info.encoder_output, unit.preparation,
                          unit.crop_position, f"'{resolved.model.name}'")
    except ProfileError as e:
        raise UnitError(resolved.number, "profile", str(e)) from None
    cond = stored.to(device=device, dtype=dtype)
    negative = encode_uncond(encoder, cond.shape[0], info.encoder_output, preparation, device=device, dtype=dtype,
                             uncond=_uncond_input(unit), like=cond, encoder_id=info.image_encoder)
    return cond, negative


def _project(image_proj: torch.nn.Module, x: torch.Tensor, device, dtype, *more: torch.Tensor, **options) -> torch.Tensor:
    """Run the projection on ``device`` and put it back where it was kept.

    ``more``: further tensor inputs (FaceID-Plus's CLIP features), ``options``: keyword
    arguments of the projection (its ``scale``). Half precision on the CPU lacks kernels in
    older torch (LayerNorm), so the CPU computes in fp32.
    """
    device = torch.device(device) if device is not None else next(image_proj.parameters()).device
    dtype = dtype or next(image_proj.parameters()).dtype
    compute = torch.float32 if device.type == "cpu" else dtype
    first = next(image_proj.parameters())
    home_device, home_dtype = first.device, first.dtype
    try:
        with torch.no_grad():
            image_proj.to(device=device, dtype=compute)
            out = image_proj(x.to(device=device, dtype=compute), *(t.to(device=device, dtype=compute) for t in more),
                             **options)
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
