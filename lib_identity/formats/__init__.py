"""Reading identity checkpoints safely and telling what they are from their keys and shapes.

Two steps, kept apart so that a model listing never reads tensor data:

* ``read_layout(path)``: every key's shape and dtype, grouped into sections, from a
  ``.safetensors`` header, a memory-mapped ``.bin`` read with ``weights_only=True``, or a
  diffusers folder (``containers``, ``sections``).
* ``detect(layout)``: the family, base model, encoder, token count, projection kind and the
  hyper-parameters the modules in ``lib_identity.models`` are built from; one module per family
  (``ip_adapter`` for IP-Adapter, FaceID and InstantID's adapter, ``photomaker``, ``controlnet``
  for IdentityNet, ``clip_vision``).

``inspect(path)`` does both; ``load_tensors(path)`` returns the tensors, grouped the same way.
"""

from .containers import CHECKPOINT_SUFFIXES, diffusers_weights, torch_load_weights_only
from .detect import detect, inspect
from .ip_adapter import ip_layer_indices
from .model_info import (
    CLIP_BY_PROJECTION,
    CLIP_VISION,
    CONTEXT_DIM,
    CROSS_ATTENTION_LAYERS,
    Layout,
    ModelInfo,
    Shape,
    describe_encoder,
)
from .sections import IP_SECTIONS, PHOTOMAKER_SECTIONS, load_tensors, read_layout

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "CLIP_BY_PROJECTION",
    "CLIP_VISION",
    "CONTEXT_DIM",
    "CROSS_ATTENTION_LAYERS",
    "IP_SECTIONS",
    "PHOTOMAKER_SECTIONS",
    "Layout",
    "ModelInfo",
    "Shape",
    "describe_encoder",
    "detect",
    "diffusers_weights",
    "inspect",
    "ip_layer_indices",
    "load_tensors",
    "read_layout",
    "torch_load_weights_only",
]
