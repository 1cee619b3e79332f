"""One unit's image prompt, prepared for the UNet: tokens, adapter layers and knobs.

``ImagePrompt`` is what a caller hands to a ``PatchSession``. ``PreparedPrompt`` is the same,
checked against the UNet's cross-attention layers, with the references combined, the
per-layer weights resolved and the image keys/values cached: they are projected once per
sampling pass (per device and dtype, so ``--lowvram`` moving blocks between devices costs one
projection per device), never once per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import PatchError
from .layer_weights import LayerWeights, resolve_layer_weights
from .layers import CrossAttentionLayer
from .masks import region_mask
from .references import combine_references, normalise_mode


@dataclass
class ImagePrompt:
    """The prepared input of one unit.

    * ``cond_tokens``: ``[n, T, C]`` image tokens of the ``n`` reference images (``[T, C]`` for
      one image), ``C`` = the UNet's context width.
    * ``uncond_tokens``: the tokens for uncond rows, ``[n, T, C]`` or ``[1, T, C]`` / ``[T, C]``
      (used for every image). The official uncond is the *projection* of the uncond encoding
      (a zero embedding, or the encoder run on a zero image), which is not zero: pass it
      (``lib_identity.api.image_prompt`` does). ``None`` means zero tokens.
    * ``ip_layers``: the adapter's image key/value projections, by cross-attention ordinal:
      ``lib_identity.models``' ``IPAttentionLayers`` (``ip_layers[m].to_k_ip``), an object with
      ``to_k_ip``/``to_v_ip`` ModuleLists, or a list of ``(to_k_ip.weight, to_v_ip.weight)``.
    * ``weight``: strength; negative values push away from the reference, as in ComfyUI.
    * ``start``/``end``: the part of the sampling steps the unit is active in, as fractions:
      active while ``start <= progress < end`` (``end == 1`` includes the last step).
    * ``layer_weights``: a preset name (``layer_weights.PRESETS``) or one multiplier per layer.
    * ``composition_weight``: the composition blocks' weight in the "style and composition" presets.
    * ``mask``: ``[H, W]`` floats in 0..1 restricting the unit to part of the image, or a maker
      ``mask(width, height) -> [height, width]`` drawn for each pass's frame, or ``None``.
    * ``combine`` / ``reference_weights``: how several reference images combine
      (``references.COMBINE_MODES``).
    * ``name``: how errors refer to the unit ("unit 2").
    """

    cond_tokens: torch.Tensor
    ip_layers: Any
    uncond_tokens: Optional[torch.Tensor] = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    layer_weights: LayerWeights = None
    composition_weight: float = 1.0
    mask: Any = None
    combine: str = "concat"
    reference_weights: Optional[Sequence[float]] = None
    name: str = "unit"


def _as_3d(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PatchError(f"{name}: {what} must be a torch tensor, got {type(t).__name__}")
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise PatchError(f"{name}: {what} must be [images, tokens, channels], got shape {list(t.shape)}")
    return t


def _kv_weights(ip_layers, ordinal: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(to_k_ip.weight, to_v_ip.weight)`` of one layer from any of the accepted containers."""
    if hasattr(ip_layers, "to_k_ip") and hasattr(ip_layers, "to_v_ip"):
        return ip_layers.to_k_ip[ordinal].weight, ip_layers.to_v_ip[ordinal].weight
    entry = ip_layers[ordinal]
    if hasattr(entry, "to_k_ip"):
        return entry.to_k_ip.weight, entry.to_v_ip.weight
    k, v = entry
    return (k.weight if hasattr(k, "weight") else k), (v.weight if hasattr(v, "weight") else v)


def _layer_count(ip_layers) -> Optional[int]:
    if hasattr(ip_layers, "to_k_ip"):
        return len(ip_layers.to_k_ip)
    try:
        return len(ip_layers)
    except TypeError:
        return None


class PreparedPrompt:
    """An ``ImagePrompt`` checked against the UNet; see the module docstring."""

    def __init__(self, prompt: ImagePrompt, layers: Sequence[CrossAttentionLayer]):
        name = prompt.name
        self.name = name
        self.weight = float(prompt.weight)
        self.start, self.end = float(prompt.start), float(prompt.end)
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0 and self.start <= self.end):
            raise PatchError(f"{name}: start {self.start:g} and end {self.end:g} must satisfy 0 <= start <= end <= 1")

        n_layers = _layer_count(prompt.ip_layers)
        if n_layers is not None and n_layers != len(layers):
            raise PatchError(
                f"{name}: the adapter has {n_layers} cross-attention layers, the loaded UNet has {len(layers)} "
                "(an SD1.5 adapter needs an SD1.5 checkpoint, an SDXL adapter an SDXL checkpoint)"
            )
        self._weights: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for layer in layers:
            wk, wv = _kv_weights(prompt.ip_layers, layer.ordinal)
            want = [layer.hidden_size, layer.context_dim]
            for label, w in (("to_k_ip", wk), ("to_v_ip", wv)):
                if list(w.shape) != want:
                    raise PatchError(
                        f"{name}: ip_adapter.{layer.file_key}.{label}.weight is {list(w.shape)}, the UNet layer "
                        f"{layer.name} needs {want}; the adapter is for another base model"
                    )
            self._weights.append((wk, wv))

        cond = _as_3d(prompt.cond_tokens, "cond_tokens", name)
        context = layers[0].context_dim
        if cond.shape[-1] != context:
            raise PatchError(f"{name}: image tokens have {cond.shape[-1]} channels, the UNet's context has {context}")
        if prompt.uncond_tokens is None:
            uncond = torch.zeros_like(cond)
        else:
            uncond = _as_3d(prompt.uncond_tokens, "uncond_tokens", name)
            if uncond.shape[1:] != cond.shape[1:]:
                raise PatchError(f"{name}: uncond tokens {list(uncond.shape)} do not match cond tokens {list(cond.shape)}")
            if uncond.shape[0] == 1 and cond.shape[0] > 1:
                uncond = uncond.expand(cond.shape[0], -1, -1)
            elif uncond.shape[0] != cond.shape[0]:
                raise PatchError(f"{name}: {uncond.shape[0]} uncond entries for {cond.shape[0]} reference images")
        mode = normalise_mode(prompt.combine, name)
        cond = combine_references(cond, mode, prompt.reference_weights, unit_name=name)
        uncond = combine_references(uncond, mode, prompt.reference_weights, unit_name=name)
        # [2, T, C]: row 0 for cond rows, row 1 for uncond rows
        self.tokens = torch.cat([cond, uncond]).detach()

        self.layer_multipliers = resolve_layer_weights(
            prompt.layer_weights, layers, composition_weight=prompt.composition_weight, unit_name=name
        )
        self.mask = region_mask(prompt.mask, name)
        self._heads = {layer.ordinal: layer.heads for layer in layers}
        self._kv: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._rows: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[1]

    def layer_weight(self, ordinal: int) -> float:
        return self.weight * self.layer_multipliers[ordinal]

    def active(self, progress: Optional[float]) -> bool:
        """Whether the step window includes ``progress`` (``None``: no step information, always)."""
        if progress is None:
            return True
        if progress < self.start:
            return False
        return progress < self.end or (self.end >= 1.0 and progress <= 1.0)

    def key_value(self, ordinal: int, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """Image keys and values of one layer, ``[2, heads, T, head_dim]`` (cond, uncond), cached."""
        key = (ordinal, device, dtype)
        found = self._kv.get(key)
        if found is None:
            wk, wv = self._weights[ordinal]
            heads = self._heads[ordinal]
            with torch.no_grad():
                # fp32 on the weights' own device (they may stay on the CPU under --lowvram), then
                # the UNet's device and dtype: at least as exact as computing in fp16.
                tokens = self.tokens.to(device=wk.device, dtype=torch.float32)
                pair = []
                for w in (wk, wv):
                    t = F.linear(tokens, w.to(torch.float32)).to(device=device, dtype=dtype)
                    pair.append(t.view(2, t.shape[1], heads, t.shape[2] // heads).transpose(1, 2).contiguous())
            found = (pair[0], pair[1])
            self._kv[key] = found
        return found

    def rows_key_value(self, ordinal: int, n_rows: int, n_cond: int, device, dtype):
        """Keys and values for a call of ``n_rows`` rows whose first ``n_cond`` are cond rows."""
        key = (ordinal, n_rows, n_cond, device, dtype)
        found = self._rows.get(key)
        if found is None:
            k, v = self.key_value(ordinal, device, dtype)
            index = torch.tensor([0] * n_cond + [1] * (n_rows - n_cond), device=k.device)
            found = (k.index_select(0, index), v.index_select(0, index))
            self._rows[key] = found
        return found

    def release(self) -> None:
        """Drop every cached tensor (the session ends)."""
        self._kv.clear()
        self._rows.clear()
