"""Identity in the text conditioning (PhotoMaker): what a unit puts into the prompt's rows."""
from __future__ import annotations
from dataclasses import dataclass
from typing import Callable
import torch

@dataclass(frozen=True)
class PromptIdentity:
    """One PhotoMaker unit's part in the text conditioning of one generation."""
    unit_number: int
    trigger: str  # the trigger word, e.g. "img"; the class word is the token just before it
    id_embeds: torch.Tensor  # [n, 2048] float32 CPU, n = pictures x tokens per picture (V1 1, V2 2), official order
    fuse: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (class_rows [n,2048], id_embeds [n,2048]) -> fused [n,2048], same device/dtype as class_rows
    start: float  # fraction of the steps before which the trigger-free prompt is used (official start_merge_step)
    key: str  # changes whenever the model or the ID pictures change (cond-cache freshness)
