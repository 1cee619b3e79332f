"""Plain torch modules for the identity checkpoints, built from what ``formats.detect`` read.

* ``build_image_proj(info)``: the ``image_proj`` module of an IP-Adapter / FaceID / InstantID file.
* ``build_ip_layers(info)``: its ``ip_adapter`` image key/value projections, by cross-attention ordinal.
* ``build_photomaker(info)``: PhotoMaker's ``id_encoder``.
* ``load_adapter`` / ``load_photomaker``: build on the ``meta`` device, then load the official
  tensors strictly (every key, every shape), cast to one dtype, on one device.
* ``load_identitynet(path, unet=...)``: InstantID's IdentityNet (an SDXL ControlNet) built from the
  host UNet's own classes, loaded strictly from a diffusers folder or one file in either naming.

Nothing here imports the WebUI; transformers is imported only when PhotoMaker is built.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats import ModelInfo
from .faceid import FaceIDProjModel, ProjPlusModel
from .identitynet import IdentityNet, load_identitynet
from .ip_layers import FaceIDLoRA, IPAttentionLayers, IPKeyValue, file_key, is_lora_key
from .loading import check_state_dict, load_state_dict_strict
from .photomaker import POSITION_IDS, PhotoMakerIDEncoder, PhotoMakerIDEncoderV2, build_from_params
from .projections import ImageProjModel, MLPProjModel
from .resampler import FacePerceiverResampler, PerceiverAttention, Resampler, perceiver_kwargs

__all__ = [
    "build_image_proj", "build_ip_layers", "build_photomaker", "load_adapter", "load_photomaker",
    "ImageProjModel", "MLPProjModel", "Resampler", "FacePerceiverResampler", "PerceiverAttention",
    "FaceIDProjModel", "ProjPlusModel", "IPAttentionLayers", "IPKeyValue", "FaceIDLoRA",
    "PhotoMakerIDEncoder", "PhotoMakerIDEncoderV2", "file_key", "check_state_dict", "load_state_dict_strict",
    "IdentityNet", "load_identitynet",
]

_RESAMPLER_KEYS = ("dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim", "ff_mult")


def _source(info: ModelInfo) -> str:
    return info.path or info.variant


def _param(info: ModelInfo, name: str):
    try:
        return info.params[name]
    except KeyError:
        raise CheckpointError(_source(info), f"{info.variant}: the detected layout lacks the hyper-parameter '{name}'") from None


def build_image_proj(info: ModelInfo) -> nn.Module:
    """The ``image_proj`` module for ``info.projection`` (random weights, current default device).

    linear → ``ImageProjModel``; mlp → ``MLPProjModel`` (full-face); resampler and
    instantid-resampler → ``Resampler``; faceid-mlp → ``FaceIDProjModel``; faceid-plus →
    ``ProjPlusModel`` (shortcut on for v2). Wrap in ``with torch.device("meta"):`` to build it
    without allocating weights.
    """
    kind = info.projection
    p = info.params
    if kind == "linear":
        return ImageProjModel(_param(info, "cross_attention_dim"), _param(info, "clip_embeddings_dim"), _param(info, "num_tokens"))
    if kind == "mlp":
        return MLPProjModel(_param(info, "cross_attention_dim"), _param(info, "clip_embeddings_dim"))
    if kind in ("resampler", "instantid-resampler"):
        return Resampler(**{k: _param(info, k) for k in _RESAMPLER_KEYS})
    if kind == "faceid-mlp":
        return FaceIDProjModel(
            cross_attention_dim=_param(info, "cross_attention_dim"),
            id_embeddings_dim=_param(info, "id_embeddings_dim"),
            hidden_dim=_param(info, "hidden_dim"),
            num_tokens=_param(info, "num_tokens"),
        )
    if kind == "faceid-plus":
        return ProjPlusModel(
            cross_attention_dim=_param(info, "cross_attention_dim"),
            id_embeddings_dim=_param(info, "id_embeddings_dim"),
            hidden_dim=_param(info, "hidden_dim"),
            num_tokens=_param(info, "num_tokens"),
            perceiver=perceiver_kwargs(_param(info, "perceiver")),
            shortcut=bool(p.get("shortcut", False)),
        )
    raise CheckpointError(_source(info), f"{info.variant}: no image projection of kind '{kind}' (not an IP-Adapter file)")


def build_ip_layers(info: ModelInfo) -> IPAttentionLayers:
    """The ``to_k_ip`` / ``to_v_ip`` projections of every cross-attention (random weights)."""
    return IPAttentionLayers(_param(info, "ip_hidden_sizes"), _param(info, "cross_attention_dim"))


def build_photomaker(info: ModelInfo) -> PhotoMakerIDEncoder:
    """PhotoMaker's ``id_encoder`` (V1 or V2 by ``info.projection``; random weights)."""
    if info.projection not in ("photomaker-v1", "photomaker-v2"):
        raise CheckpointError(_source(info), f"{info.variant} is not a PhotoMaker model")
    return build_from_params(info.projection, info.params)


def _section(info: ModelInfo, sections: dict, name: str) -> Dict[str, torch.Tensor]:
    section = sections.get(name)
    if not section:
        raise CheckpointError(_source(info), f"the {name} section is missing; the file is incomplete")
    return section


def load_adapter(info: ModelInfo, sections: dict, device="cpu",
                 dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, IPAttentionLayers]:
    """The image projection and the IP attention layers of an adapter file, weights loaded strictly.

    ``sections`` is what ``formats.load_tensors(path)`` returned. Every key of ``image_proj`` and
    ``ip_adapter`` must be used and have the shape the detected variant implies; FaceID files'
    LoRA keys are read into ``ip_layers.lora`` (a ``FaceIDLoRA``, checked against the UNet
    widths). Raises ``CheckpointError`` naming the key and both shapes on any mismatch.
    Both modules are returned in eval mode on ``device`` in ``dtype``.
    """
    source = _source(info)
    proj_sd = _section(info, sections, "image_proj")
    ip_sd = _section(info, sections, "ip_adapter")
    with torch.device("meta"):
        image_proj = build_image_proj(info)
        ip_layers = build_ip_layers(info)
    load_state_dict_strict(image_proj, proj_sd, source=source, section="image_proj", device=device, dtype=dtype)
    kv = {k: v for k, v in ip_sd.items() if not is_lora_key(k)}
    lora = {k: v for k, v in ip_sd.items() if is_lora_key(k)}
    load_state_dict_strict(ip_layers, kv, source=source, section="ip_adapter", device=device, dtype=dtype)
    if lora:
        ip_layers.lora = FaceIDLoRA.from_section(
            lora, source=source, hidden_sizes=ip_layers.hidden_sizes, context_dim=ip_layers.context_dim,
            device=device, dtype=dtype,
        )
    elif info.lora:
        raise CheckpointError(source, f"{info.variant}: the FaceID LoRA keys (ip_adapter.N.to_q_lora.*) are missing")
    return _ready(image_proj, device, source), _ready(ip_layers, device, source)


def load_photomaker(info: ModelInfo, sections: dict, device="cpu",
                    dtype: torch.dtype = torch.float32) -> PhotoMakerIDEncoder:
    """PhotoMaker's ``id_encoder`` with the file's weights loaded strictly, cast to ``dtype`` on ``device``.

    The official files mix bfloat16 and float32; every tensor is cast. A saved
    ``vision_model.embeddings.position_ids`` buffer is accepted and ignored. The
    ``lora_weights`` section is not touched here (the UNet patch applies it).
    """
    source = _source(info)
    enc_sd = _section(info, sections, "id_encoder")
    with torch.device("meta"):
        encoder = build_photomaker(info)
    load_state_dict_strict(encoder, enc_sd, source=source, section="id_encoder", device=device, dtype=dtype,
                           optional=(POSITION_IDS,))
    _restore_position_ids(encoder, device)
    return _ready(encoder, device, source)


def _ready(module: nn.Module, device, source: str) -> nn.Module:
    """Inference mode, and nothing left on the meta device it was built on."""
    if torch.device(device).type != "meta":
        left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if left:
            # a tensor the module has and the file need not: this library's bug, not the file's
            raise CheckpointError(source, f"internal: {left[0]} was not loaded; please report this with your transformers version")
    return module.requires_grad_(False).eval()


def _restore_position_ids(encoder: PhotoMakerIDEncoder, device) -> None:
    # The buffer was built on the meta device and is not taken from the file: make it again.
    emb = encoder.vision_model.embeddings
    ids = getattr(emb, "position_ids", None)
    if isinstance(ids, torch.Tensor):
        fresh = torch.arange(emb.num_positions, device=device).expand((1, -1))
        persistent = "position_ids" not in emb._non_persistent_buffers_set
        emb.register_buffer("position_ids", fresh, persistent=persistent)
