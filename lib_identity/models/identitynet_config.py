"""IdentityNet's hyper-parameters: from a diffusers ``config.json``, or read off the tensor shapes.

InstantID's IdentityNet is SDXL's encoder half: widths 320/640/1280, 2 res blocks per level,
transformer depth 0/2/10 per level (10 in the middle), 64-channel heads, linear projections,
a 2816-wide added condition and a hint block 3 -> 16/32/96/256 -> 320. Nothing of that is
hard-coded here: a file without ``config.json`` gets every number from its shapes (heads then
are 64 channels wide, as in SDXL and as the official config's ``attention_head_dim`` 5/10/20
says), so smaller test models and other SDXL ControlNets load the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ..errors import CheckpointError

HEAD_CHANNELS = 64  # SDXL's attention head width (num_head_channels in sd_xl_base.yaml)

Shapes = Dict[str, Tuple[int, ...]]


@dataclass(frozen=True)
class IdentityNetConfig:
    """What the module is built from (ldm/sgm terms). ``transformer_depth[level]`` 0: no attention."""

    in_channels: int
    model_channels: int
    channel_mult: Tuple[int, ...]
    num_res_blocks: int
    transformer_depth: Tuple[int, ...]
    middle_depth: int
    heads: Tuple[int, ...]
    context_dim: int
    adm_in_channels: int
    hint_channels: int
    hint_block_channels: Tuple[int, ...]
    use_linear: bool = True
    bgr_hint: bool = False  # diffusers' controlnet_conditioning_channel_order "bgr": the hint is flipped

    @property
    def widths(self) -> Tuple[int, ...]:
        return tuple(self.model_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


def _per_level(value, n: int, name: str, source: str) -> Tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    if isinstance(value, (list, tuple)) and len(value) == n and all(isinstance(v, int) for v in value):
        return tuple(value)
    raise CheckpointError(source, f"config.json: '{name}' is {value!r}; expected a number or a list of {n} numbers")


# diffusers options this module does not implement, with the value that the module assumes.
_ASSUMED = {
    "addition_embed_type": "text_time", "class_embed_type": None, "resnet_time_scale_shift": "default",
    "flip_sin_to_cos": True, "freq_shift": 0, "encoder_hid_dim_type": None, "global_pool_conditions": False,
    "only_cross_attention": False, "act_fn": "silu", "num_class_embeds": None,
}


def config_from_diffusers(config: dict, source: str) -> IdentityNetConfig:
    """The hyper-parameters from a diffusers ``ControlNetModel`` ``config.json`` (SDXL-style ones)."""
    cls = config.get("_class_name", "ControlNetModel")
    if cls != "ControlNetModel":
        raise CheckpointError(source, f"config.json describes a {cls}, not a ControlNetModel (IdentityNet)")
    for name, assumed in _ASSUMED.items():
        value = config.get(name, assumed)
        if value != assumed:
            raise CheckpointError(source, f"config.json: {name} = {value!r} is not supported (IdentityNet and SDXL "
                                          f"ControlNets use {assumed!r}); this is not an SDXL ControlNet")
    widths = list(config.get("block_out_channels", (320, 640, 1280)))
    types = list(config.get("down_block_types", ()))
    if len(types) != len(widths):
        raise CheckpointError(source, "config.json: down_block_types and block_out_channels differ in length")
    n = len(widths)
    base = widths[0]
    if any(w % base for w in widths):
        raise CheckpointError(source, f"config.json: block_out_channels {widths} are not multiples of the first")
    layers = _per_level(config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", source)
    heads_value = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
    heads = _per_level(heads_value, n, "attention_head_dim", source)
    depth = tuple(layers[i] if "CrossAttn" in t else 0 for i, t in enumerate(types))
    return IdentityNetConfig(
        in_channels=int(config.get("in_channels", 4)),
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=int(config.get("layers_per_block", 2)),
        transformer_depth=depth,
        middle_depth=layers[-1],
        heads=heads,
        context_dim=int(config["cross_attention_dim"]),
        adm_in_channels=int(config["projection_class_embeddings_input_dim"]),
        hint_channels=int(config.get("conditioning_channels", 3)),
        hint_block_channels=tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
        use_linear=bool(config.get("use_linear_projection", False)),
        bgr_hint=config.get("controlnet_conditioning_channel_order", "rgb") == "bgr",
    )


def _need(shapes: Shapes, key: str, source: str) -> Tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(source, f"{key} is missing; the file is not a complete SDXL ControlNet")
    return shapes[key]


def _depth(shapes: Shapes, prefix: str) -> int:
    found = {int(m.group(1)) for k in shapes for m in [re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k)] if m}
    return max(found) + 1 if found else 0


def _heads(width: int, depth: int, source: str) -> int:
    if depth and width % HEAD_CHANNELS:
        raise CheckpointError(source, f"attention width {width} is not a multiple of {HEAD_CHANNELS}-channel heads; "
                                      "put the model's diffusers config.json next to it (a folder) to say its heads")
    return width // HEAD_CHANNELS


def config_from_shapes(shapes: Shapes, source: str) -> IdentityNetConfig:
    """The hyper-parameters read off ldm-named shapes (heads: 64 channels wide, as SDXL's)."""
    first = _need(shapes, "input_blocks.0.0.weight", source)
    base = first[0]
    blocks = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"input_blocks\.(\d+)\.", k)] if m})
    levels = [[]]  # per level: (width, depth) of each res block
    for i in blocks[1:]:
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
            continue
        width = _need(shapes, f"input_blocks.{i}.0.out_layers.3.weight", source)[0]
        levels[-1].append((width, _depth(shapes, f"input_blocks.{i}.1.")))
    counts = {len(level) for level in levels}
    if len(counts) != 1 or not all(levels):
        raise CheckpointError(source, f"input blocks per level are {[len(v) for v in levels]}; expected the same number on each level")
    for level in levels:
        if len(set(level)) != 1:
            raise CheckpointError(source, f"a level mixes widths or transformer depths {level}; not an SD-style ControlNet")
    widths = [level[0][0] for level in levels]
    depth = tuple(level[0][1] for level in levels)
    middle_depth = _depth(shapes, "middle_block.1.")
    to_k = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    if not to_k:
        raise CheckpointError(source, "no cross-attention (attn2.to_k) found; not an IdentityNet / SDXL ControlNet")
    hint = sorted({int(m.group(1)) for k in shapes for m in [re.match(r"input_hint_block\.(\d+)\.weight$", k)] if m})
    # the hint block alternates a same-width and a stride-2 convolution after its first one
    hint_channels = (_need(shapes, "input_hint_block.0.weight", source)[0],) + tuple(
        shapes[f"input_hint_block.{i}.weight"][0] for i in hint[1:-1] if (i // 2 - 1) % 2 == 1)
    proj_in = _need(shapes, to_k[0].split("transformer_blocks.")[0] + "proj_in.weight", source)
    return IdentityNetConfig(
        in_channels=first[1],
        model_channels=base,
        channel_mult=tuple(w // base for w in widths),
        num_res_blocks=counts.pop(),
        transformer_depth=depth,
        middle_depth=middle_depth,
        # the middle block has the last level's width (and so its heads)
        heads=tuple(_heads(w, max(d, middle_depth if i == len(widths) - 1 else 0), source)
                    for i, (w, d) in enumerate(zip(widths, depth))),
        context_dim=shapes[to_k[0]][1],
        adm_in_channels=_need(shapes, "label_emb.0.0.weight", source)[1],
        hint_channels=_need(shapes, "input_hint_block.0.weight", source)[1],
        hint_block_channels=hint_channels,
        use_linear=len(proj_in) == 2,
    )


def describe(config: Optional[IdentityNetConfig]) -> str:
    """One line for logs and errors: widths, depths, context."""
    if config is None:
        return "unknown"
    return (f"widths {list(config.widths)}, transformer depth {list(config.transformer_depth)} "
            f"(middle {config.middle_depth}), context {config.context_dim}, added condition {config.adm_in_channels}")
