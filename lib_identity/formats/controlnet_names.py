"""ControlNet key names: diffusers' ``ControlNetModel`` naming <-> the ldm/cldm naming.

IdentityNet ships in diffusers naming; sd-webui-controlnet users may have it converted to the
ldm/cldm names (``input_blocks``, ``input_hint_block``, ``zero_convs``, ``middle_block_out``).
The module in ``lib_identity.models.identitynet`` uses the ldm names, because it is built from
the host UNet's ldm/sgm classes. The rules (see ``../shared/reference/formats.md``, IdentityNet):

* ``conv_in`` -> ``input_blocks.0.0``; ``time_embedding.linear_{1,2}`` -> ``time_embed.{0,2}``;
  ``add_embedding.linear_{1,2}`` -> ``label_emb.0.{0,2}``
* ``down_blocks.i.resnets.j`` -> ``input_blocks.(P*i+j+1).0`` (P = res blocks per level + 1),
  ``down_blocks.i.attentions.j`` -> ``input_blocks.(P*i+j+1).1``,
  ``down_blocks.i.downsamplers.0.conv`` -> ``input_blocks.(P*(i+1)).0.op``
* ``mid_block.resnets.j`` -> ``middle_block.(2j)``, ``mid_block.attentions.0`` -> ``middle_block.1``
* ``controlnet_cond_embedding.{conv_in, blocks.k, conv_out}`` -> ``input_hint_block.{0, 2k+2, 2n+2}``
  (n = number of blocks: the SiLUs between the convolutions take the odd indices)
* ``controlnet_down_blocks.k`` -> ``zero_convs.k.0``, ``controlnet_mid_block`` -> ``middle_block_out.0``
* inside a res block: norm1/conv1/time_emb_proj/norm2/conv2/conv_shortcut ->
  in_layers.0/in_layers.2/emb_layers.1/out_layers.0/out_layers.3/skip_connection;
  inside an attention block the names are the same on both sides.

A key that follows none of the rules is returned unchanged, so a strict load reports it as
not part of the model under the name the file gives it.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional

DIFFUSERS_MARKER = "controlnet_cond_embedding.conv_in.weight"
LDM_MARKER = "input_hint_block.0.weight"

_RESNET = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection"))
_FIXED = (("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
          ("time_embedding.linear_2.", "time_embed.2."), ("add_embedding.linear_1.", "label_emb.0.0."),
          ("add_embedding.linear_2.", "label_emb.0.2."), ("controlnet_mid_block.", "middle_block_out.0."),
          ("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))


def is_diffusers_naming(keys: Iterable[str]) -> bool:
    """True when the keys are diffusers' ``ControlNetModel`` names (its hint-embedding key is there)."""
    return DIFFUSERS_MARKER in set(keys)


def _swap(rest: str, pairs, forward: bool) -> Optional[str]:
    for a, b in pairs:
        old, new = (a, b) if forward else (b, a)
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    return None


def diffusers_to_ldm(key: str, *, per_level: int = 3, hint_blocks: int = 6) -> str:
    """One diffusers ControlNet key in ldm/cldm naming (unchanged when no rule applies).

    ``per_level`` is the number of input blocks per level (res blocks + the downsampler: 3 for
    SD/SDXL); ``hint_blocks`` the number of convolutions in ``controlnet_cond_embedding.blocks``.
    """
    for old, new in _FIXED:
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(.*)", key)
    if m:
        return f"input_hint_block.{2 * int(m.group(1)) + 2}.{m.group(2)}"
    if key.startswith("controlnet_cond_embedding.conv_out."):
        return f"input_hint_block.{2 * hint_blocks + 2}." + key[len("controlnet_cond_embedding.conv_out."):]
    m = re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key)
    if m:
        return f"zero_convs.{m.group(1)}.0.{m.group(2)}"
    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.*)", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        if kind == "downsamplers":
            return f"input_blocks.{per_level * (level + 1)}.0.op." + rest[len("conv."):] if rest.startswith("conv.") else key
        block = per_level * level + j + 1
        if kind == "attentions":
            return f"input_blocks.{block}.1.{rest}"
        renamed = _swap(rest, _RESNET, forward=True)
        return f"input_blocks.{block}.0.{renamed}" if renamed else key
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "attentions":
            return f"middle_block.1.{rest}" if j == 0 else key
        renamed = _swap(rest, _RESNET, forward=True)
        return f"middle_block.{2 * j}.{renamed}" if renamed else key
    return key


def ldm_to_diffusers(key: str, *, per_level: int = 3, hint_blocks: int = 6) -> str:
    """The inverse of ``diffusers_to_ldm``: one ldm/cldm ControlNet key in diffusers naming."""
    for old, new in _FIXED:
        if key.startswith(new):
            return old + key[len(new):]
    m = re.match(r"input_hint_block\.(\d+)\.(.*)", key)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        if index == 2 * hint_blocks + 2:
            return "controlnet_cond_embedding.conv_out." + rest
        if index >= 2 and index % 2 == 0:
            return f"controlnet_cond_embedding.blocks.{index // 2 - 1}.{rest}"
        return key
    m = re.match(r"zero_convs\.(\d+)\.0\.(.*)", key)
    if m:
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    m = re.match(r"input_blocks\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        block, part, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, j = (block - 1) // per_level, (block - 1) % per_level
        if part == 0 and rest.startswith("op."):
            return f"down_blocks.{block // per_level - 1}.downsamplers.0.conv." + rest[len("op."):]
        if part == 1:
            return f"down_blocks.{level}.attentions.{j}.{rest}"
        renamed = _swap(rest, _RESNET, forward=False)
        return f"down_blocks.{level}.resnets.{j}.{renamed}" if renamed and part == 0 else key
    m = re.match(r"middle_block\.(\d+)\.(.*)", key)
    if m:
        index, rest = int(m.group(1)), m.group(2)
        if index == 1:
            return "mid_block.attentions.0." + rest
        renamed = _swap(rest, _RESNET, forward=False)
        return f"mid_block.resnets.{index // 2}.{renamed}" if renamed and index % 2 == 0 else key
    return key


def hint_block_count(diffusers_keys: Iterable[str]) -> int:
    """How many convolutions ``controlnet_cond_embedding.blocks`` has in a diffusers file."""
    found = {int(m.group(1)) for k in diffusers_keys
             for m in [re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0
