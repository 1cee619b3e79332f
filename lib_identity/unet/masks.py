"""Region masks: a unit's ``[H, W]`` mask at the token grid of every attention layer.

An attention layer sees its feature map flattened to ``h·w`` tokens. The grids come from the
latent: ldm/sgm downsample with a stride-2, padding-1 convolution, so every level is
``ceil(previous / 2)``; on the way up the WebUI interpolates the upsampled map to the size of
the skip connection (``sd_hijack_unet``), so the decoder uses the same sizes. Given the latent
size and a layer's token count, the grid is the level whose ``h·w`` matches, for any aspect
ratio and odd sizes.

The mask is stretched to each grid (the caller gives it the image's aspect ratio): ``area``
interpolation when the grid is smaller in both directions, so every token gets the mean
coverage of the pixels it stands for; bilinear (antialiased) otherwise.

A mask can also be a maker, ``mask(width, height) -> [height, width]``, drawn for the frame of
each pass (8 pixels per latent cell): InstantID's region around a face of the pose picture,
placed in the frame as its keypoints are.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import PatchError

LATENT_SCALE = 8  # pixels per latent cell (SD1.5, SDXL)


def level_sizes(height: int, width: int, levels: int = 8) -> List[Tuple[int, int]]:
    """Feature-map sizes of the UNet levels for a latent of ``height × width``."""
    sizes = [(int(height), int(width))]
    for _ in range(levels - 1):
        h, w = sizes[-1]
        if h == 1 and w == 1:
            break
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


def token_grid(n_tokens: int, latent_hw: Optional[Tuple[int, int]], aspect: float = 1.0) -> Tuple[int, int]:
    """``(h, w)`` of a layer with ``n_tokens`` tokens, for a latent of ``latent_hw``.

    Without a latent size (a caller that did not report one), the grid is the factorisation
    of ``n_tokens`` closest to the width/height ratio ``aspect``.
    """
    if latent_hw is not None:
        for h, w in level_sizes(*latent_hw):
            if h * w == n_tokens:
                return h, w
    best = None
    for h in range(1, int(math.isqrt(n_tokens)) + 1):
        if n_tokens % h:
            continue
        for hh, ww in ((h, n_tokens // h), (n_tokens // h, h)):
            score = abs(math.log((ww / hh) / aspect))
            if best is None or score < best[0]:
                best = (score, hh, ww)
    return best[1], best[2]


def resize_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``mask [H, W]`` (float, 0..1) resized to ``[h, w]`` as the module docstring says."""
    m = mask[None, None].float()
    H, W = mask.shape
    if (h, w) == (H, W):
        out = m
    elif h <= H and w <= W:
        out = F.interpolate(m, size=(h, w), mode="area")
    else:
        out = F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].clamp_(0.0, 1.0)


def check_mask(mask, unit_name: str) -> torch.Tensor:
    """A user-supplied mask as a float ``[H, W]`` tensor on the CPU, or ``PatchError``."""
    if not isinstance(mask, torch.Tensor):
        try:
            import numpy as np

            mask = torch.from_numpy(np.asarray(mask, dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - any non-array input is the user's to fix
            raise PatchError(f"{unit_name}: the region mask is not an array ({exc})") from None
    mask = mask.detach().to("cpu", torch.float32)
    while mask.dim() > 2 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.dim() != 2 or mask.shape[0] < 1 or mask.shape[1] < 1:
        raise PatchError(f"{unit_name}: the region mask must be one [height, width] image, got shape {list(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise PatchError(f"{unit_name}: the region mask has NaN or infinite values")
    lo, hi = float(mask.min()), float(mask.max())
    if lo < 0.0 or hi > 1.0:
        raise PatchError(
            f"{unit_name}: the region mask has values from {lo:g} to {hi:g}; expected 0..1 "
            "(divide an 8-bit mask by 255)"
        )
    return mask


class RegionMask:
    """One unit's mask, resized once per token grid, device and dtype.

    ``mask``: a checked ``[H, W]`` tensor (``check_mask``), or a maker ``(width, height) ->
    [height, width]`` drawn for each pass's frame (checked when drawn)."""

    def __init__(self, mask: Any, name: str = "unit"):
        self.maker = mask if callable(mask) and not isinstance(mask, torch.Tensor) else None
        self.mask = None if self.maker is not None else mask
        self.name = name
        self._frames: Dict[tuple, torch.Tensor] = {}
        self._cache: Dict[tuple, torch.Tensor] = {}

    def at_frame(self, width: int, height: int) -> torch.Tensor:
        """The ``[H, W]`` mask for a frame of ``width × height`` pixels (a fixed mask: itself)."""
        if self.maker is None:
            return self.mask
        key = (int(width), int(height))
        found = self._frames.get(key)
        if found is None:
            found = check_mask(self.maker(*key), self.name)
            self._frames[key] = found
        return found

    def for_tokens(self, n_tokens: int, latent_hw, device, dtype) -> torch.Tensor:
        """The mask over a layer's tokens, shaped ``[1, n_tokens, 1]`` to multiply its output."""
        key = (n_tokens, latent_hw, device, dtype)
        found = self._cache.get(key)
        if found is None:
            if self.maker is None:
                mask = self.mask
            else:  # drawn for the pass's frame; without a latent size, the grid's square frame
                h, w = latent_hw if latent_hw is not None else token_grid(n_tokens, None)
                mask = self.at_frame(w * LATENT_SCALE, h * LATENT_SCALE)
            h, w = token_grid(n_tokens, latent_hw, mask.shape[1] / mask.shape[0])
            found = resize_mask(mask, h, w).reshape(1, n_tokens, 1).to(device=device, dtype=dtype)
            self._cache[key] = found
        return found

    def for_map(self, h: int, w: int, device, dtype, frame: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """The mask over an ``h × w`` feature map, shaped ``[1, 1, h, w]`` (control residuals);
        ``frame``: the pass's (width, height) in pixels, for a maker."""
        key = ("map", h, w, frame, device, dtype)
        found = self._cache.get(key)
        if found is None:
            width, height = frame if frame is not None else (w * LATENT_SCALE, h * LATENT_SCALE)
            found = resize_mask(self.at_frame(width, height), h, w)[None, None].to(device=device, dtype=dtype)
            self._cache[key] = found
        return found


def region_mask(mask: Any, unit_name: str) -> Optional[RegionMask]:
    """A unit's mask (an array, or a maker ``(width, height) -> [height, width]``) as a ``RegionMask``."""
    if mask is None:
        return None
    if callable(mask) and not isinstance(mask, torch.Tensor):
        return RegionMask(mask, unit_name)
    return RegionMask(check_mask(mask, unit_name), unit_name)
