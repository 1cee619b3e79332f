"""A LoRA in diffusers' old attention-processor naming (PhotoMaker's ``lora_weights``), read, not applied.

The keys are ``unet.<processor>.<proj>_lora.{down,up}.weight``, where ``<processor>`` is a
name of diffusers' ``unet.attn_processors`` (``down_blocks.1.attentions.0.transformer_blocks.0
.attn1.processor``) and ``<proj>`` one of ``to_q``, ``to_k``, ``to_v``, ``to_out`` (``to_out.0``
in the UNet). The result maps each processor name to ``{proj: (down [r, in], up [out, r])}``, the
form ``unet.lora.AttentionLoRA`` takes; the UNet side finds the attention by that name. No alpha
and no 1/rank: the files carry none and PhotoMaker applies the LoRA at scale 1.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

from ..errors import CheckpointError
from .ip_layers import LORA_PROJECTIONS

_KEY = re.compile(r"^unet\.(?P<proc>.+\.processor)\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]\.processor$")

Pairs = Dict[str, Tuple[torch.Tensor, torch.Tensor]]


class ProcessorLoRA:
    """``layers[processor name][proj] = (down, up)``; ``rank`` is the common rank of every pair."""

    def __init__(self, layers: Dict[str, Pairs], rank: int):
        self.layers = layers
        self.rank = rank

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def from_section(cls, section: Dict[str, torch.Tensor], *, source: str, section_name: str = "lora_weights",
                     expected_processors: Optional[int] = None, device="cpu",
                     dtype: Optional[torch.dtype] = torch.float32) -> "ProcessorLoRA":
        """Read every key of the section strictly: an unknown key, a processor without all four
        projections (each with down and up), differing ranks or matrices that do not chain raise
        ``CheckpointError`` naming the key. ``expected_processors``: how many attention processors
        the file must cover (140 for an SDXL UNet). Every tensor is cast to ``dtype`` on ``device``."""
        found: Dict[str, Dict[str, Dict[str, torch.Tensor]]] = {}
        for key, t in section.items():
            m = _KEY.match(key)
            if m is None or not _PROCESSOR.match(m.group("proc")):
                raise CheckpointError(source, f"{section_name}.{key} is not a LoRA key in diffusers' attention-processor "
                                              "naming (unet.<block>.attn1|attn2.processor.to_q_lora.down.weight …)")
            found.setdefault(m.group("proc"), {}).setdefault(m.group("proj"), {})[m.group("part")] = t
        if not found:
            raise CheckpointError(source, f"the {section_name} section holds no LoRA weights")
        if expected_processors is not None and len(found) != expected_processors:
            raise CheckpointError(source, f"the LoRA covers {len(found)} attention layers, {expected_processors} expected "
                                          "(every attn1 and attn2 of the UNet); the file is incomplete")
        rank = None
        layers: Dict[str, Pairs] = {}
        for proc in sorted(found):
            layers[proc] = {}
            for proj in LORA_PROJECTIONS:
                pair = found[proc].get(proj, {})
                name = f"{section_name}.unet.{proc}.{proj}_lora"
                for part in ("down", "up"):
                    if part not in pair:
                        raise CheckpointError(source, f"{name}.{part}.weight is missing")
                down, up = pair["down"], pair["up"]
                if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                    raise CheckpointError(source, f"{name}: down {list(down.shape)} and up {list(up.shape)} do not chain "
                                                  "(expected down [rank, in] and up [out, rank])")
                if rank is None:
                    rank = int(down.shape[0])
                elif down.shape[0] != rank:
                    raise CheckpointError(source, f"{name}.down.weight has rank {down.shape[0]}, the others {rank}")
                layers[proc][proj] = tuple(t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)
                                           for t in (down, up))
        return cls(layers, rank)
