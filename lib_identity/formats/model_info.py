"""What a checkpoint is: its ``Layout`` (keys, shapes, dtypes by section) and ``ModelInfo``.

Also the facts the detectors read widths against: cross-attention layer counts, context widths
per base model, and the CLIP vision encoders the adapters were trained on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

Shape = Tuple[int, ...]

CROSS_ATTENTION_LAYERS = {"sd15": 16, "sdxl": 70}
CONTEXT_DIM = {768: "sd15", 2048: "sdxl"}

CLIP_VISION = {
    # hidden size -> (encoder id, human name)
    1280: ("clip-vit-h", "CLIP ViT-H/14"),
    1664: ("clip-vit-bigg", "CLIP ViT-bigG/14"),
    1024: ("clip-vit-l", "CLIP ViT-L/14"),
}
# projection_dim of the encoder an ImageProjModel was trained on -> encoder id
CLIP_BY_PROJECTION = {1024: "clip-vit-h", 1280: "clip-vit-bigg", 768: "clip-vit-l"}


@dataclass
class Layout:
    """Keys, shapes and dtypes of one checkpoint, grouped by section; no tensor data."""

    path: str
    container: str  # "safetensors" | "bin" | "diffusers-folder"
    sections: Dict[str, Dict[str, Shape]]
    dtypes: Tuple[str, ...] = ()
    config: Optional[dict] = None  # diffusers config.json, when the file came with one

    def section(self, name: str) -> Dict[str, Shape]:
        return self.sections.get(name, {})

    @property
    def key_count(self) -> int:
        return sum(len(s) for s in self.sections.values())


@dataclass
class ModelInfo:
    """What a checkpoint is, read from its keys and shapes.

    ``params`` holds the hyper-parameters the matching module in ``lib_identity.models`` is
    built from; ``hints`` says where a name was used to choose between layouts that are
    identical on disk.
    """

    family: str  # ip-adapter | ip-adapter-faceid | instantid-adapter | instantid-identitynet | photomaker | clip-vision
    variant: str
    base: Optional[str]  # sd15 | sdxl | None (encoders)
    image_encoder: Optional[str]  # clip-vit-h | clip-vit-bigg | clip-vit-l | insightface | insightface+clip-vit-h | None
    encoder_output: Optional[str]
    tokens: Optional[int]
    projection: Optional[str]
    lora: bool = False
    lora_rank: Optional[int] = None
    face_model: Optional[str] = None  # buffalo_l | antelopev2
    params: dict = field(default_factory=dict)
    hints: List[str] = field(default_factory=list)
    path: Optional[str] = None
    container: Optional[str] = None
    dtypes: Tuple[str, ...] = ()
    key_count: int = 0

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtypes"] = list(self.dtypes)
        return d

    def summary(self) -> str:
        """One line for listings and status lines."""
        bits = [self.variant]
        if self.base:
            bits.append(self.base.upper().replace("SD15", "SD1.5"))
        if self.image_encoder:
            bits.append("needs " + describe_encoder(self.image_encoder))
        if self.tokens:
            bits.append(f"{self.tokens} tokens")
        if self.lora:
            bits.append(f"LoRA rank {self.lora_rank}")
        return ", ".join(bits)


def describe_encoder(encoder: str) -> str:
    names = {v[0]: v[1] for v in CLIP_VISION.values()}
    return " + ".join(names.get(part, part) for part in encoder.split("+"))
