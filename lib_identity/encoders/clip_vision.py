"""CLIP vision encoders (ViT-H/14, ViT-bigG/14, ViT-L/14) as transformers' ``CLIPVisionModelWithProjection``.

The architecture comes from the configs shipped beside this file (``configs/<id>.json``, the
values of the official ``config.json`` files), so nothing is fetched from a hub. The weights
come from whatever file the user has: the ``image_encoder`` folder or ``model.safetensors`` of
h94/IP-Adapter, the ``clip_h.pth`` / ``clip_g.pth`` that sd-webui-controlnet keeps in
``models/clip_vision``, ComfyUI's ``CLIP-ViT-*.safetensors`` (transformers names, or OpenCLIP
names, which ``lib_identity.formats`` renames), or a whole CLIP model (its text tower is
ignored). Pickled files are read only through ``formats``, which refuses pickles that run code.

Which output an adapter needs (see ``../shared/reference/formats.md`` §8):
``image_embeds`` (linear adapters) is the projected, post-layernormed CLS token, ``[N, E]``;
``hidden_states[-2]`` (plus, full-face, FaceID-plus) is the second-to-last layer's output
without the final layernorm, ``[N, 257, H]``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Union

from .. import discovery, formats
from ..errors import CheckpointError, EncoderError, ModelNotFoundError

ENCODER_IDS = ("clip-vit-h", "clip-vit-bigg", "clip-vit-l")
OUTPUTS = ("image_embeds", "hidden_states[-2]")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# The fields of CLIPVisionConfig that shape the network; anything else in a config.json
# (torch_dtype, transformers_version, ...) is left out so old and new transformers agree.
_ARCH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "projection_dim",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
    "attention_dropout",
    "dropout",
    "initializer_range",
    "initializer_factor",
)

# Where each encoder comes from, for "not found" messages.
DOWNLOADS = {
    "clip-vit-h": (
        "models/image_encoder/model.safetensors of h94/IP-Adapter "
        "(https://huggingface.co/h94/IP-Adapter/tree/main/models/image_encoder), saved e.g. as "
        "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors; sd-webui-controlnet's clip_h.pth works too"
    ),
    "clip-vit-bigg": (
        "sdxl_models/image_encoder/model.safetensors of h94/IP-Adapter "
        "(https://huggingface.co/h94/IP-Adapter/tree/main/sdxl_models/image_encoder), saved e.g. as "
        "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors; sd-webui-controlnet's clip_g.pth works too"
    ),
    "clip-vit-l": (
        "model.safetensors of openai/clip-vit-large-patch14 "
        "(https://huggingface.co/openai/clip-vit-large-patch14), saved e.g. as clip-vit-large-patch14.safetensors"
    ),
}

# Keys of a whole CLIP model (text tower) that an image encoder does not use.
_TEXT_TOWER_PREFIXES = ("text_model.",)
_TEXT_TOWER_KEYS = ("text_projection.weight", "logit_scale")
_POSITION_IDS = "vision_model.embeddings.position_ids"


@dataclass(frozen=True)
class EncoderInfo:
    """What was loaded: which encoder, from where, and whether it can give ``image_embeds``."""

    encoder_id: Optional[str]  # None for an encoder built from an explicit config (tests, custom)
    path: Optional[str]
    has_projection: bool

    @property
    def name(self) -> str:
        return formats.describe_encoder(self.encoder_id) if self.encoder_id else "CLIP vision encoder"


def normalize_encoder_id(encoder_id: str) -> str:
    """``"clip-vit-h"``, ``"clip-vit-bigg"`` or ``"clip-vit-l"`` (case and ``_`` forgiven)."""
    eid = str(encoder_id or "").strip().lower().replace("_", "-")
    if eid not in ENCODER_IDS:
        raise EncoderError(f"unknown image encoder '{encoder_id}'; expected one of {', '.join(ENCODER_IDS)}")
    return eid


def shipped_config(encoder_id: str) -> dict:
    """The architecture of an encoder as shipped in ``configs/`` (the official config.json values)."""
    eid = normalize_encoder_id(encoder_id)
    with open(os.path.join(CONFIG_DIR, eid + ".json"), encoding="utf-8") as fh:
        return json.load(fh)


def make_config(config: Union[str, dict, object]):
    """A ``CLIPVisionConfig`` from an encoder id, a config dict (a whole CLIP config's
    ``vision_config`` is taken), or a ``CLIPVisionConfig`` (returned as is)."""
    from transformers import CLIPVisionConfig

    if isinstance(config, CLIPVisionConfig):
        return config
    if isinstance(config, str):
        config = shipped_config(config)
    if not isinstance(config, dict):
        raise EncoderError(f"an encoder config must be an encoder id, a dict or a CLIPVisionConfig, got {type(config).__name__}")
    if isinstance(config.get("vision_config"), dict):
        config = config["vision_config"]
    return CLIPVisionConfig(**{k: config[k] for k in _ARCH_KEYS if k in config})


# --------------------------------------------------------------------------- finding


def find_encoder(encoder_id: str, folders: Iterable[str]) -> str:
    """The path of a usable file or folder holding ``encoder_id`` in the model folders.

    Preference among several: one with its projection (``image_embeds`` needs it), then
    safetensors over pickles, then the order of ``folders``.
    """
    eid = normalize_encoder_id(encoder_id)
    folders = [os.path.abspath(f) for f in folders]

    def inside(path: str) -> bool:
        # the discovery listing is shared; take only what lies in the folders asked about
        p = os.path.abspath(path)
        for f in folders:
            try:
                if os.path.commonpath([p, f]) == f:
                    return True
            except ValueError:  # another drive (Windows)
                continue
        return False

    for refresh in (False, True):
        found = [
            e
            for e in discovery.list_models(folders, refresh=refresh)
            if e.usable and e.info.family == "clip-vision" and e.info.variant == eid and inside(e.path)
        ]
        if found:
            found.sort(key=lambda e: (e.info.params.get("projection_dim") is None, e.info.container == "bin"))
            return found[0].path
    where = next((f for f in folders if os.path.basename(f.rstrip("/\\")).lower() == "clip_vision"), folders[0] if folders else None)
    raise ModelNotFoundError(
        f"the {formats.describe_encoder(eid)} image encoder was not found in the model folders "
        f"({', '.join(folders) or 'none configured'}). Download {DOWNLOADS[eid]}, put it in "
        f"{where or 'the models/clip_vision folder'}, and press refresh."
    )


# --------------------------------------------------------------------------- loading


def _vision_state_dict(path: str) -> Dict[str, object]:
    sections = formats.load_tensors(path)
    sd = sections.get("clip_vision")
    if sd is None:
        if "id_encoder" in sections:
            raise CheckpointError(path, "this is a PhotoMaker model, not an image encoder; choose a CLIP vision file")
        if sections.keys() & {"image_proj", "ip_adapter"}:
            raise CheckpointError(path, "this is an IP-Adapter model, not an image encoder; choose a CLIP vision file")
        first = ", ".join(sorted(k for s in sections.values() for k in s)[:3])
        raise CheckpointError(path, f"not a CLIP vision encoder: no vision_model.* or OpenCLIP visual.* keys (first keys: {first or 'none'})")
    out = {}
    for key, value in sd.items():
        if key.startswith(_TEXT_TOWER_PREFIXES) or key in _TEXT_TOWER_KEYS or key == _POSITION_IDS:
            # position_ids is a buffer older transformers saved; it is rebuilt, never read
            continue
        out[key] = value
    return out


def _folder_config(path: str) -> Optional[dict]:
    if not os.path.isdir(path):
        return None
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return None
    try:
        with open(cfg, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise CheckpointError(cfg, f"config.json is not readable JSON ({e})") from None


def _choose_config(path: str, sd: dict, encoder_id: Optional[str], config):
    """(config, encoder id) for the weights: explicit config, else the folder's config.json,
    else the shipped config of the encoder the weights' width names."""
    emb = sd.get("vision_model.embeddings.class_embedding")
    width = int(emb.shape[0]) if emb is not None else None
    detected = formats.CLIP_VISION.get(width, (None,))[0]
    eid = normalize_encoder_id(encoder_id) if encoder_id else None
    if eid and width is not None and width != shipped_config(eid)["hidden_size"]:
        what = f"a {formats.describe_encoder(detected)}" if detected else "a CLIP vision model"
        raise CheckpointError(
            path,
            f"this file is {what} of width {width}, not the {formats.describe_encoder(eid)} "
            "that was asked for; choose the matching image encoder",
        )
    eid = eid or detected
    if config is not None:
        return make_config(config), eid
    folder_cfg = _folder_config(path)
    if folder_cfg is not None:
        return make_config(folder_cfg), eid
    if eid is None:
        raise CheckpointError(
            path,
            f"a CLIP vision model of width {width} is not one the adapters use (ViT-H/14 1280, ViT-bigG/14 1664, "
            "ViT-L/14 1024); put it in a folder with its config.json if it is meant to be used anyway",
        )
    return make_config(eid), eid


def _check_against(model, sd: dict, path: str, name: str) -> bool:
    """Compare file keys/shapes with the model's; returns whether the projection is present."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != _POSITION_IDS}
    missing = [k for k in expected if k not in sd]
    has_projection = "visual_projection.weight" not in missing
    missing = [k for k in missing if k != "visual_projection.weight"]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {list(sd[k].shape)} (expected {list(expected[k])})" for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights are missing (e.g. {', '.join(missing[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} have other shapes (e.g. {'; '.join(wrong[:2])})")
    if unexpected:
        problems.append(f"{len(unexpected)} are not part of it (e.g. {', '.join(unexpected[:3])})")
    if problems:
        raise CheckpointError(path, f"does not match the {name}: " + "; ".join(problems) + ". The file is incomplete or a different model.")
    return has_projection


def build_encoder(sd: dict, config, *, path: Optional[str] = None, encoder_id: Optional[str] = None):
    """A ``CLIPVisionModelWithProjection`` (eval, no grad, on the CPU) holding the tensors of ``sd``.

    The module is created on the meta device and takes the tensors themselves
    (``load_state_dict(assign=True)``), so a 7 GB encoder is never allocated twice.
    A missing ``visual_projection.weight`` is allowed (hidden states still work) and recorded.
    """
    import torch
    from transformers import CLIPVisionModelWithProjection

    cfg = make_config(config)
    info_name = formats.describe_encoder(encoder_id) if encoder_id else "CLIP vision encoder"
    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(cfg)
    has_projection = _check_against(model, sd, path or "<state dict>", info_name)
    floats = {v.dtype for v in sd.values() if v.is_floating_point()}
    # one dtype for the whole module; a mixed file is read as float32
    dtype = floats.pop() if len(floats) == 1 else torch.float32
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if not has_projection:
        # image_embeds is refused for this encoder; the zeros only keep forward() runnable
        sd["visual_projection.weight"] = torch.zeros(cfg.projection_dim, cfg.hidden_size, dtype=dtype)
    model.load_state_dict(sd, strict=False, assign=True)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                if name != "position_ids":
                    raise EncoderError(f"{info_name}: buffer {name} could not be initialised")
                # persistent in transformers 4.30, not in later versions: rebuilt either way
                module._buffers[name] = torch.arange(buf.shape[-1]).expand((1, -1))
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise EncoderError(f"{info_name}: weights {', '.join(leftover[:3])} were not loaded")
    model.eval()
    model.requires_grad_(False)
    model._identity_encoder = EncoderInfo(encoder_id=encoder_id, path=path, has_projection=has_projection)
    return model


def load_encoder(path, encoder_id: Optional[str] = None, config=None):
    """Load a CLIP vision encoder from a file or folder into a ``CLIPVisionModelWithProjection`` on the CPU.

    ``encoder_id`` (optional) is checked against the weights; ``config`` (an id, dict or
    ``CLIPVisionConfig``) overrides the architecture, which otherwise comes from the folder's
    ``config.json`` or the shipped config of the encoder the weights are.
    """
    path = os.fspath(path)
    sd = _vision_state_dict(path)
    cfg, eid = _choose_config(path, sd, encoder_id, config)
    return build_encoder(sd, cfg, path=path, encoder_id=eid)


def encoder_info(model) -> EncoderInfo:
    """The ``EncoderInfo`` of a loaded encoder (a plain transformers model gets one on first sight)."""
    info = getattr(model, "_identity_encoder", None)
    if info is None:
        proj = getattr(model, "visual_projection", None)
        info = EncoderInfo(encoder_id=None, path=None, has_projection=proj is not None)
        model._identity_encoder = info
    return info


# --------------------------------------------------------------------------- running


def check_output(output: str) -> str:
    """The output name, validated: ``image_embeds`` or ``hidden_states[-2]``."""
    if output not in OUTPUTS:
        raise EncoderError(f"unknown encoder output '{output}'; expected one of {', '.join(OUTPUTS)}")
    return output


def run_encoder(model, pixel_values, output: str):
    """One forward pass over normalised pixels ``[N, 3, S, S]``; returns the asked-for output.

    The pixels are moved to the model's device and dtype.
    """
    import torch

    check_output(output)
    if output == "image_embeds" and not encoder_info(model).has_projection:
        raise EncoderError(
            f"{encoder_info(model).name} from {encoder_info(model).path or 'memory'} has no visual_projection, so it cannot "
            "give image_embeds (the linear IP-Adapters need them); use the full image_encoder file"
        )
    param = next(model.parameters())
    with torch.no_grad():
        px = pixel_values.to(device=param.device, dtype=param.dtype)
        if output == "image_embeds":
            return model(pixel_values=px).image_embeds
        # output_hidden_states is the spelling transformers 4.30 understands too
        return model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
