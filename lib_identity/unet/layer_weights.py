"""Per-layer weighting of a unit: named presets and free per-layer lists.

The presets are those of cubiq/ComfyUI_IPAdapter_plus (``weight_type``), which pick whole
attention blocks (SpatialTransformers). Its block numbers count the attention blocks in the
order the UNet *runs* them (input, middle, output: ComfyUI's ``transformer_index``); here they
are written as the WebUI's block names, so they do not depend on any order:

SDXL (11 attention blocks; InstantStyle's finding):
  * style = ``output_blocks.1`` (diffusers ``up_blocks.0.attentions.1``)
  * composition = ``input_blocks.8`` (``down_blocks.2.attentions.1``)

SD1.5 (16 attention blocks; cubiq's choice, InstantStyle gives none):
  * style = ``input_blocks.1, 2, 4, 5`` and ``output_blocks.5`` … ``output_blocks.11``
  * composition = ``input_blocks.7`` (at a quarter of the weight) and ``input_blocks.8``

Presets:
  * ``standard``: every layer at 1.
  * ``style transfer``: the style blocks only.
  * ``composition``: the composition blocks only.
  * ``strong style transfer``: every block except the composition blocks.
  * ``style and composition``: style blocks at 1, composition blocks at ``composition_weight``.
  * ``strong style and composition``: every block at 1, the composition blocks at
    ``composition_weight`` (SD1.5: both composition blocks at full ``composition_weight``,
    as cubiq does).

A free list gives one multiplier per cross-attention layer in official order (SD1.5: 16,
SDXL: 70), or one per attention block in official order (input → output → middle; SDXL: 11,
the length sd-webui-controlnet's ``advanced_weighting`` uses).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Union

from ..errors import PatchError
from .layers import CrossAttentionLayer, attention_blocks

PRESETS = (
    "standard",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
    "strong style and composition",
)

_SD15_BLOCKS = frozenset(
    [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)]
    + ["middle_block.1"]
    + [f"output_blocks.{i}.1" for i in range(3, 12)]
)
_SDXL_BLOCKS = frozenset(
    [f"input_blocks.{i}.1" for i in (4, 5, 7, 8)] + ["middle_block.1"] + [f"output_blocks.{i}.1" for i in range(6)]
)

# block -> multiplier of the composition weight
_COMPOSITION = {
    "sd15": {"input_blocks.7.1": 0.25, "input_blocks.8.1": 1.0},
    "sdxl": {"input_blocks.8.1": 1.0},
}
_STYLE = {
    "sd15": frozenset(
        [f"input_blocks.{i}.1" for i in (1, 2, 4, 5)] + [f"output_blocks.{i}.1" for i in range(5, 12)]
    ),
    "sdxl": frozenset(["output_blocks.1.1"]),
}

LayerWeights = Union[None, str, Sequence[float]]


def unet_layout(layers: Sequence[CrossAttentionLayer]) -> Optional[str]:
    """``"sd15"`` or ``"sdxl"`` when the attention blocks are exactly one of those layouts."""
    blocks = frozenset(attention_blocks(layers))
    if blocks == _SD15_BLOCKS:
        return "sd15"
    if blocks == _SDXL_BLOCKS:
        return "sdxl"
    return None


def _preset_block_weights(name: str, layout: str, composition_weight: float) -> Dict[str, float]:
    blocks = _SD15_BLOCKS if layout == "sd15" else _SDXL_BLOCKS
    style, composition = _STYLE[layout], _COMPOSITION[layout]
    if name == "standard":
        return {b: 1.0 for b in blocks}
    if name == "style transfer":
        return {b: 1.0 for b in style}
    if name == "composition":
        return dict(composition)
    if name == "strong style transfer":
        return {b: 1.0 for b in blocks if b not in composition}
    if name == "style and composition":
        out = {b: 1.0 for b in style}
        out.update({b: m * composition_weight for b, m in composition.items()})
        return out
    if name == "strong style and composition":
        out = {b: 1.0 for b in blocks}
        # cubiq: SD1.5 puts both composition blocks at the full composition weight here
        out.update({b: composition_weight for b in composition})
        return out
    raise AssertionError(name)


def resolve_layer_weights(spec: LayerWeights, layers: Sequence[CrossAttentionLayer], *,
                          composition_weight: float = 1.0, unit_name: str = "unit") -> List[float]:
    """One multiplier per cross-attention layer (official order) for a preset name or a list.

    Raises ``PatchError`` naming the unit for an unknown preset, a preset on a UNet that is
    neither SD1.5 nor SDXL, or a list of the wrong length.
    """
    n = len(layers)
    if spec is None:
        return [1.0] * n
    if isinstance(spec, str):
        name = " ".join(spec.strip().lower().replace("_", " ").split())
        if name not in PRESETS:
            raise PatchError(f"{unit_name}: unknown layer weighting {spec!r}; choose one of {', '.join(PRESETS)}")
        if name == "standard":
            return [1.0] * n
        layout = unet_layout(layers)
        if layout is None:
            raise PatchError(
                f"{unit_name}: the layer weighting {spec!r} is defined for SD1.5 and SDXL UNets; this UNet has "
                f"{len(attention_blocks(layers))} attention blocks. Give one weight per layer instead."
            )
        by_block = _preset_block_weights(name, layout, float(composition_weight))
        return [by_block.get(layer.block, 0.0) for layer in layers]
    try:
        values = [float(v) for v in spec]
    except (TypeError, ValueError):
        raise PatchError(f"{unit_name}: layer weights must be a preset name or a list of numbers, got {spec!r}") from None
    blocks = attention_blocks(layers)
    if len(values) == n:
        return values
    if len(values) == len(blocks):
        index = {b: i for i, b in enumerate(blocks)}
        return [values[index[layer.block]] for layer in layers]
    counts = f"{n} (one per cross-attention layer)"
    if len(blocks) != n:
        counts += f" or {len(blocks)} (one per attention block)"
    raise PatchError(f"{unit_name}: {len(values)} layer weights given; this UNet needs {counts}")
