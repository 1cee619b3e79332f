"""The cross-attention layers of a loaded ldm/sgm UNet, in the official IP-Adapter order.

The ``ip_adapter.<n>`` keys of every official file number the cross-attentions (``attn2``) in
diffusers' attention-processor order: down blocks, then up blocks, then the mid block. In the
WebUI's ``ldm``/``sgm`` names that is ``input_blocks`` → ``output_blocks`` → ``middle_block``
(../shared/reference/formats.md §2), *not* the order the UNet runs them in. Cross-attention
ordinal ``m`` reads the file keys ``2m+1``.

Only module names and ``attn2`` attributes are used, never the ``ldm``/``sgm`` classes, so this
works on both packages, on a UNet built on the ``meta`` device, and without importing either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..errors import PatchError

# Top-level containers of an ldm/sgm UNetModel, in official order.
_OFFICIAL_ORDER = ("input_blocks", "output_blocks", "middle_block")


@dataclass(eq=False)
class CrossAttentionLayer:
    """One ``attn2`` of the UNet and where it sits.

    ``name`` is relative to the UNet (A1111: ``shared.sd_model.model.diffusion_model``),
    ``block`` names its attention block (a SpatialTransformer, e.g. ``input_blocks.8.1``), and
    ``hidden_size`` is the width of its queries, which is what ``to_k_ip``/``to_v_ip`` produce.
    """

    ordinal: int
    name: str
    diffusers_name: str
    block: str
    transformer_index: int
    module: torch.nn.Module = field(repr=False)
    hidden_size: int
    context_dim: int
    heads: int

    @property
    def file_key(self) -> int:
        """The number ``n`` of this layer's ``ip_adapter.<n>.to_k_ip.weight`` in official files."""
        return 2 * self.ordinal + 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads


def _num_res_blocks(unet, levels_hint: int) -> List[int]:
    """Res blocks per level (ldm and sgm store a per-level list; SD1.5 and SDXL use 2)."""
    value = getattr(unet, "num_res_blocks", 2)
    if isinstance(value, int):
        return [value] * levels_hint
    return [int(v) for v in value]


def _input_positions(unet) -> Dict[int, tuple]:
    """input_blocks index → (level, position in level), following how ldm builds the encoder.

    Block 0 is ``conv_in``; each level then has ``num_res_blocks`` blocks and, except the last,
    one downsampling block. That is diffusers' ``down_blocks.<level>.{resnets,attentions}.<pos>``.
    """
    n_levels = len(getattr(unet, "channel_mult", ())) or 4
    per_level = _num_res_blocks(unet, n_levels)
    positions, k = {}, 1
    for level, count in enumerate(per_level):
        for pos in range(count):
            positions[k] = (level, pos)
            k += 1
        if level != len(per_level) - 1:
            k += 1  # the downsampling block
    return positions


def _output_positions(unet) -> Dict[int, tuple]:
    """output_blocks index → (up level, position): every up level has num_res_blocks + 1 blocks."""
    n_levels = len(getattr(unet, "channel_mult", ())) or 4
    per_level = list(reversed(_num_res_blocks(unet, n_levels)))
    positions, k = {}, 0
    for level, count in enumerate(per_level):
        for pos in range(count + 1):
            positions[k] = (level, pos)
            k += 1
    return positions


def _diffusers_block(container: str, index: Optional[int], inputs, outputs) -> str:
    if container == "middle_block":
        return "mid_block.attentions.0"
    table = inputs if container == "input_blocks" else outputs
    prefix = "down_blocks" if container == "input_blocks" else "up_blocks"
    if index not in table:
        return f"{container}.{index}"  # an unusual UNet: keep the ldm name rather than guess
    level, pos = table[index]
    return f"{prefix}.{level}.attentions.{pos}"


def find_cross_attentions(unet: torch.nn.Module) -> List[CrossAttentionLayer]:
    """Every ``attn2`` of an ldm/sgm UNetModel, in the order the adapter files number them.

    Raises ``PatchError`` if the module is not such a UNet (no ``input_blocks``/``output_blocks``
    /``middle_block``) or has no cross-attention.
    """
    missing = [c for c in _OFFICIAL_ORDER if not hasattr(unet, c)]
    if missing:
        raise PatchError(
            f"{type(unet).__name__} is not an ldm/sgm UNetModel (it has no {', '.join(missing)}); "
            "pass the WebUI's shared.sd_model.model.diffusion_model"
        )
    inputs, outputs = _input_positions(unet), _output_positions(unet)
    layers: List[CrossAttentionLayer] = []
    attention_blocks: List[str] = []
    for container in _OFFICIAL_ORDER:
        top = getattr(unet, container)
        blocks = [(None, top)] if container == "middle_block" else list(enumerate(top))
        for index, block in blocks:
            prefix = container if index is None else f"{container}.{index}"
            for sub, module in block.named_modules():
                if not sub.endswith("attn2") or not hasattr(module, "to_q"):
                    continue
                # sub = "<child>.transformer_blocks.<t>.attn2"; the attention block is "<child>"
                parts = sub.split(".")
                child = parts[0]
                block_name = f"{prefix}.{child}"
                if block_name not in attention_blocks:
                    attention_blocks.append(block_name)
                tail = ".".join(parts[1:])
                diffusers = f"{_diffusers_block(container, index, inputs, outputs)}.{tail}.processor"
                layers.append(
                    CrossAttentionLayer(
                        ordinal=len(layers),
                        name=f"{prefix}.{sub}",
                        diffusers_name=diffusers,
                        block=block_name,
                        transformer_index=int(parts[-2]) if parts[-2].isdigit() else 0,
                        module=module,
                        hidden_size=int(module.to_q.out_features),
                        context_dim=int(module.to_k.in_features),
                        heads=int(module.heads),
                    )
                )
    if not layers:
        raise PatchError(f"{type(unet).__name__} has no cross-attention (attn2) layers to patch")
    return layers


def attention_blocks(layers: Sequence[CrossAttentionLayer]) -> List[str]:
    """The attention blocks (SpatialTransformers) of ``layers``, in official order, each once."""
    seen: List[str] = []
    for layer in layers:
        if layer.block not in seen:
            seen.append(layer.block)
    return seen
