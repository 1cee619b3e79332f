"""Several reference images in one unit: how their encodings become one set of image tokens.

* ``concat``: the tokens of every image side by side (``n·T`` tokens). This is what diffusers
  does with several images per adapter and cubiq's default; attention then spreads over all
  images.
* ``average``: the mean over images (``T`` tokens).
* ``weighted average``: the mean with one non-negative weight per image, normalised to sum 1.

``combine_references`` works on any ``[n, ...]`` tensor. ``lib_identity.api`` applies the
averages to the encoder output before the projection, as ComfyUI_IPAdapter_plus does
(``combine_embeds``); a caller that only has projected tokens can average those instead
(sd-webui-controlnet averages projected tokens). Uncond tokens go through the same combination
so cond and uncond rows attend over the same number of tokens.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..errors import PatchError

COMBINE_MODES = ("concat", "average", "weighted average")


def normalise_mode(mode: Optional[str], unit_name: str = "unit") -> str:
    name = " ".join((mode or "concat").strip().lower().replace("_", " ").split())
    if name not in COMBINE_MODES:
        raise PatchError(f"{unit_name}: unknown combine mode {mode!r}; choose one of {', '.join(COMBINE_MODES)}")
    return name


def combine_references(x: torch.Tensor, mode: str, weights: Optional[Sequence[float]] = None, *,
                       unit_name: str = "unit", tokens: bool = True) -> torch.Tensor:
    """Combine ``x [n, ...]`` (one entry per reference image) into one entry ``[1, ...]``.

    With ``tokens=True`` ``x`` is ``[n, T, C]`` and ``concat`` gives ``[1, n·T, C]``; with
    ``tokens=False`` (encoder embeddings, combined before a projection) ``concat`` is not
    allowed: concatenate the projected tokens instead.
    """
    mode = normalise_mode(mode, unit_name)
    n = x.shape[0]
    if mode == "concat":
        if not tokens:
            raise PatchError(f"{unit_name}: 'concat' combines projected tokens, not encoder embeddings")
        return x.reshape(1, n * x.shape[1], *x.shape[2:]) if n > 1 else x
    if mode == "average":
        return x.mean(dim=0, keepdim=True)
    if weights is None:
        raise PatchError(f"{unit_name}: 'weighted average' needs one weight per reference image")
    w = [float(v) for v in weights]
    if len(w) != n:
        raise PatchError(f"{unit_name}: {len(w)} reference weights for {n} reference images")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise PatchError(f"{unit_name}: reference weights must be >= 0 with a positive sum, got {w}")
    total = sum(w)
    scale = torch.tensor([v / total for v in w], dtype=x.dtype, device=x.device)
    return (x * scale.reshape(n, *([1] * (x.dim() - 1)))).sum(dim=0, keepdim=True)
