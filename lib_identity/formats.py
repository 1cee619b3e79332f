"""Reading identity checkpoints safely and telling what they are from their keys and shapes.

Two steps, kept apart so that a model listing never reads tensor data:

* ``read_layout(path)``: every key's shape and dtype, grouped into sections
  (``image_proj`` / ``ip_adapter``, ``id_encoder`` / ``lora_weights``, ``controlnet``,
  ``clip_vision``), from a ``.safetensors`` header, a memory-mapped ``.bin`` read with
  ``weights_only=True``, or a diffusers folder.
* ``detect(layout)``: the family, base model, encoder, token count, projection kind and the
  hyper-parameters the modules in ``lib_identity.models`` are built from.

``load(path)`` does both and also returns the tensors, grouped the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from .errors import CheckpointError

Shape = Tuple[int, ...]

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

# Sections of the official containers; see ../shared/reference/formats.md §1.
IP_SECTIONS = ("image_proj", "ip_adapter")
PHOTOMAKER_SECTIONS = ("id_encoder", "lora_weights")
# cubiq's loader maps this legacy prefix to ip_adapter.
LEGACY_SECTION_ALIASES = {"adapter_modules": "ip_adapter"}

CROSS_ATTENTION_LAYERS = {"sd15": 16, "sdxl": 70}
CONTEXT_DIM = {768: "sd15", 2048: "sdxl"}

_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32", "F8_E4M3": "float8_e4m3fn"}

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


# --------------------------------------------------------------------------- reading


def _fail(path, reason):
    raise CheckpointError(path, reason)


def _check_file(path: str):
    if not os.path.exists(path):
        _fail(path, "no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        _fail(path, "the file is empty (0 bytes); download it again")


def _safetensors_header(path: str):
    """keys -> (shape, dtype) straight from the header, so nothing is read but the header."""
    from safetensors import safe_open

    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        _fail(path, f"not a readable .safetensors file ({_short(e)}); the download may be truncated or corrupt")
    size = os.path.getsize(path)
    _check_safetensors_length(path, size)
    return out


def _check_safetensors_length(path: str, size: int):
    # safe_open accepts a file cut short after its header; compare the data length the header
    # promises with what is on disk so truncated downloads are reported, not half-loaded.
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            _fail(path, "not a .safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(fh.read(n))
        except Exception:
            _fail(path, "the .safetensors header is not valid JSON; the file is corrupt")
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        end = max(end, meta["data_offsets"][1])
    if size < 8 + n + end:
        _fail(path, f"the file is truncated: {size} bytes on disk, its header describes {8 + n + end}; download it again")


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


def torch_load_weights_only(path: str, mmap: bool = True):
    """``torch.load`` that never runs code from the pickle: plain tensors and containers only."""
    import torch

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            # mmap needs the zip container; old-style pickles are read whole instead.
            if mmap and "mmap" in str(e).lower():
                return torch.load(path, map_location="cpu", weights_only=True)
            raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch 2.1 (the WebUI's) says "Unsupported class posix.mkdir", later ones "GLOBAL posix.mkdir"
        m = re.search(r"(?:GLOBAL|Unsupported class)\s+([\w.]+)", msg)
        what = f" ({m.group(1)})" if m else ""
        _fail(
            path,
            f"refused: the file's pickle asks to run code{what}, which a weights file never needs. "
            "It was not loaded. Use the official .safetensors or .bin file.",
        )
    except (zipfile.BadZipFile, EOFError) as e:
        _fail(path, f"the .bin file is truncated or corrupt ({_short(e)}); download it again")
    except RuntimeError as e:
        _fail(path, f"the .bin file is truncated, corrupt or not a torch file ({_short(e)}); download it again")
    except Exception as e:  # noqa: BLE001 - any other decoding failure is a bad file, said plainly
        _fail(path, f"not a readable torch file ({_short(e)})")


def _flatten(obj, path: str, prefix: str = "", out=None):
    import torch

    if out is None:
        out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                _fail(path, f"unexpected non-text key {k!r} in the checkpoint")
            _flatten(v, path, f"{prefix}.{k}" if prefix else k, out)
    else:
        _fail(path, f"'{prefix or 'top level'}' holds a {type(obj).__name__}, not tensors; this is not a weights file")
    return out


def _split_sections(flat: dict, path: str) -> Dict[str, dict]:
    """Group flat keys into the official sections; works for keys->shapes and keys->tensors."""
    sections: Dict[str, dict] = {}
    firsts = {k.split(".", 1)[0] for k in flat}

    def take(name, prefix):
        for k, v in flat.items():
            if k.startswith(prefix + "."):
                sections.setdefault(name, {})[k[len(prefix) + 1:]] = v

    if firsts & set(IP_SECTIONS) or firsts & set(LEGACY_SECTION_ALIASES):
        for name in IP_SECTIONS:
            take(name, name)
        for legacy, name in LEGACY_SECTION_ALIASES.items():
            take(name, legacy)
        return sections
    if firsts & set(PHOTOMAKER_SECTIONS):
        for name in PHOTOMAKER_SECTIONS:
            take(name, name)
        return sections
    if any(k.startswith("vision_model.") for k in flat):
        return {"clip_vision": dict(flat)}
    openclip = _openclip_visual_prefix(flat)
    if openclip is not None:
        return {"clip_vision": _openclip_visual_to_hf(flat, openclip, path)}
    if "controlnet_cond_embedding.conv_in.weight" in flat or "input_hint_block.0.weight" in flat:
        return {"controlnet": dict(flat)}
    # InstantID's own loader also takes the bare sub-dicts merged at the top level: the
    # ip_adapter keys start with their layer number, everything else is the projection.
    if any(re.match(r"^\d+\.to_[kv]_ip\.weight$", k) for k in flat):
        for k, v in flat.items():
            name = "ip_adapter" if k.split(".", 1)[0].isdigit() else "image_proj"
            sections.setdefault(name, {})[k] = v
        return sections
    return {"": dict(flat)}


# OpenCLIP names of the vision tower -> transformers' CLIPVisionModelWithProjection names.
# ComfyUI reads these files too (comfy/clip_vision.py); the mapping is one to one except the
# fused attention input (split into q, k, v, in that order) and the projection (transposed).
_OPENCLIP_VISUAL = {
    "class_embedding": "vision_model.embeddings.class_embedding",
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def _openclip_visual_prefix(flat: dict) -> Optional[str]:
    """``"visual."`` for a whole OpenCLIP model, ``""`` for a bare vision tower, else None."""
    for prefix in ("visual.", ""):
        if prefix + "class_embedding" in flat and prefix + "conv1.weight" in flat:
            return prefix
    return None


def _openclip_visual_to_hf(flat: dict, prefix: str, path: str) -> dict:
    """The OpenCLIP vision tower under transformers' names; the text tower is left out.

    Values may be shapes (tuples, for ``read_layout``) or tensors (for ``load_tensors``).
    """
    out = {}
    unknown = []
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue  # the text tower of a whole CLIP model: not needed for images
        name = key[len(prefix):]
        if name in _OPENCLIP_VISUAL:
            out[_OPENCLIP_VISUAL[name]] = value
            continue
        if name == "proj":
            # OpenCLIP multiplies x @ proj; a Linear stores the transpose.
            out["visual_projection.weight"] = tuple(reversed(value)) if isinstance(value, tuple) else value.t().contiguous()
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        if m:
            layer, part, kind = m.groups()
            base = f"vision_model.encoder.layers.{layer}."
            if part in _OPENCLIP_BLOCK:
                out[f"{base}{_OPENCLIP_BLOCK[part]}.{kind}"] = value
                continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", name)
        if m:
            layer, kind = m.groups()
            if isinstance(value, tuple):
                if value[0] % 3:
                    _fail(path, f"{key} has shape {list(value)}; expected its first dimension to hold q, k and v")
                parts = [(value[0] // 3,) + tuple(value[1:])] * 3
            else:
                if value.shape[0] % 3:
                    _fail(path, f"{key} has shape {list(value.shape)}; expected its first dimension to hold q, k and v")
                parts = value.chunk(3, dim=0)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                out[f"vision_model.encoder.layers.{layer}.self_attn.{proj}.{kind}"] = part
            continue
        unknown.append(key)
    if unknown:
        _fail(
            path,
            "an OpenCLIP vision tower with parts that transformers' CLIP vision model has no place for "
            f"(e.g. {', '.join(sorted(unknown)[:3])}); use the image_encoder/model.safetensors of h94/IP-Adapter instead",
        )
    return out


def _diffusers_weights(folder: str) -> str:
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
        "pytorch_model.bin",
    ):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    _fail(folder, "a folder with no diffusers/transformers weights file (diffusion_pytorch_model.safetensors or model.safetensors)")


def read_layout(path: str) -> Layout:
    """Keys and shapes of a checkpoint without reading its tensor data (mmap for ``.bin``)."""
    path = os.fspath(path)
    _check_file(path)
    config = None
    if os.path.isdir(path):
        weights = _diffusers_weights(path)
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            try:
                with open(cfg, encoding="utf-8") as fh:
                    config = json.load(fh)
            except Exception as e:  # noqa: BLE001
                _fail(cfg, f"config.json is not valid JSON ({_short(e)})")
        layout = read_layout(weights)
        layout.path, layout.container, layout.config = path, "diffusers-folder", config
        return layout
    lower = path.lower()
    if lower.endswith(".safetensors"):
        header = _safetensors_header(path)
        flat = {k: v[0] for k, v in header.items()}
        dtypes = tuple(sorted({_ST_DTYPES.get(v[1], v[1].lower()) for v in header.values()}))
        container = "safetensors"
    elif lower.endswith(CHECKPOINT_SUFFIXES):
        tensors = _flatten(torch_load_weights_only(path), path)
        flat = {k: tuple(t.shape) for k, t in tensors.items()}
        dtypes = tuple(sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()}))
        container = "bin"
    else:
        _fail(path, "unknown file type; expected .safetensors or .bin")
    if not flat:
        _fail(path, "the file holds no tensors")
    return Layout(path=path, container=container, sections=_split_sections(flat, path), dtypes=dtypes, config=config)


def load_tensors(path: str) -> Dict[str, dict]:
    """All tensors of a checkpoint on the CPU, grouped by section as ``read_layout`` groups them."""
    path = os.fspath(path)
    _check_file(path)
    if os.path.isdir(path):
        path = _diffusers_weights(path)
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        _safetensors_header(path)
        try:
            flat = load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001
            _fail(path, f"could not read the tensors ({_short(e)}); the file may be corrupt")
    else:
        flat = _flatten(torch_load_weights_only(path, mmap=False), path)
    return _split_sections(flat, path)


# --------------------------------------------------------------------------- detection


def _name_hints(path: Optional[str]) -> str:
    return (path or "").replace("\\", "/").lower()


def _layer_indices(section: Dict[str, Shape], suffix: str) -> List[int]:
    out = []
    for k in section:
        m = re.match(r"^(\d+)\.(.+)$", k)
        if m and m.group(2) == suffix:
            out.append(int(m.group(1)))
    return sorted(out)


def _ip_layers(layout: Layout, where: str) -> Tuple[str, int, List[int]]:
    """Base model, context width and layer indices of the ``ip_adapter`` section, checked for gaps."""
    ip = layout.section("ip_adapter")
    idx = _layer_indices(ip, "to_k_ip.weight")
    if not idx:
        _fail(layout.path, f"{where}: the ip_adapter section has no to_k_ip weights")
    first = ip[f"{idx[0]}.to_k_ip.weight"]
    if len(first) != 2:
        _fail(layout.path, f"{where}: {idx[0]}.to_k_ip.weight has shape {list(first)}, expected 2-D")
    context = first[1]
    base = CONTEXT_DIM.get(context)
    if base is None:
        _fail(layout.path, f"{where}: cross-attention width {context} is neither SD1.5 (768) nor SDXL (2048)")
    want = CROSS_ATTENTION_LAYERS[base]
    expected = [2 * m + 1 for m in range(want)]
    if idx != expected:
        missing = sorted(set(expected) - set(idx))[:5]
        extra = sorted(set(idx) - set(expected))[:5]
        _fail(
            layout.path,
            f"{where}: the ip_adapter section has {len(idx)} cross-attention layers, {base.upper()} has {want}"
            + (f"; missing e.g. {missing}" if missing else "")
            + (f"; unexpected {extra}" if extra else ""),
        )
    for i in idx:
        if f"{i}.to_v_ip.weight" not in ip:
            _fail(layout.path, f"{where}: {i}.to_v_ip.weight is missing")
    return base, context, idx


def _resampler_params(proj: Dict[str, Shape], prefix: str = "") -> dict:
    p = prefix
    latents = proj.get(p + "latents")
    depth = len({k[len(p):].split(".")[1] for k in proj if k.startswith(p + "layers.")})
    dim = proj[p + "proj_in.weight"][0]
    inner = proj[p + "layers.0.0.to_q.weight"][0]
    dim_head = 64
    params = {
        "dim": dim,
        "depth": depth,
        "dim_head": dim_head,
        "heads": inner // dim_head,
        "embedding_dim": proj[p + "proj_in.weight"][1],
        "output_dim": proj[p + "proj_out.weight"][0],
        "ff_mult": proj[p + "layers.0.1.1.weight"][0] // dim,
    }
    if latents is not None:
        params["num_queries"] = latents[1]
    return params


def detect(layout: Layout) -> ModelInfo:
    """Tell what a checkpoint is from its keys and shapes; raise ``CheckpointError`` if it is none of ours."""
    names = _name_hints(layout.path)
    s = layout.sections
    if "image_proj" in s or "ip_adapter" in s:
        info = _detect_ip_adapter(layout, names)
    elif "id_encoder" in s:
        info = _detect_photomaker(layout)
    elif "clip_vision" in s:
        info = _detect_clip_vision(layout)
    elif "controlnet" in s:
        info = _detect_controlnet(layout, names)
    else:
        sample = ", ".join(sorted(layout.section(""))[:3])
        _fail(
            layout.path,
            "not an identity checkpoint: no image_proj/ip_adapter, id_encoder/lora_weights, ControlNet "
            f"or CLIP-vision keys (first keys: {sample or 'none'})",
        )
    info.path = layout.path
    info.container = layout.container
    info.dtypes = layout.dtypes
    info.key_count = layout.key_count
    return info


def _detect_ip_adapter(layout: Layout, names: str) -> ModelInfo:
    proj = layout.section("image_proj")
    if not proj:
        _fail(layout.path, "the file has an ip_adapter section but no image_proj section; it is incomplete")
    base, C, idx = _ip_layers(layout, "IP-Adapter")
    ip = layout.section("ip_adapter")
    lora_rank = ip["0.to_q_lora.down.weight"][0] if "0.to_q_lora.down.weight" in ip else None
    if lora_rank is not None:
        want = 2 * CROSS_ATTENTION_LAYERS[base]
        have = len(_layer_indices(ip, "to_q_lora.down.weight"))
        if have != want:
            _fail(layout.path, f"FaceID LoRA: {have} attention layers carry LoRA, {base.upper()} has {want}")
    # ip_hidden_sizes: the UNet width of each cross-attention, in layer order (to_k_ip rows).
    params = {"cross_attention_dim": C, "ip_layers": len(idx), "ip_hidden_sizes": [ip[f"{i}.to_k_ip.weight"][0] for i in idx]}
    hints: List[str] = []
    sfx = "_" + base

    def need(key):
        if key not in proj:
            _fail(layout.path, f"image_proj.{key} is missing")
        return proj[key]

    if "perceiver_resampler.proj_in.weight" in proj:
        # FaceID-Plus: MLP on the ArcFace embedding, refined by CLIP hidden states of the face crop.
        proj0, proj2, norm = need("proj.0.weight"), need("proj.2.weight"), need("norm.weight")
        tokens = proj2[0] // norm[0]
        v2 = "v2" in names
        hints.append(
            "FaceID-Plus v1 and v2 are identical on disk; "
            + ("'v2' in the file name selects v2 (shortcut on)" if v2 else "no 'v2' in the file name, so v1 (no shortcut)")
        )
        params.update(
            id_embeddings_dim=proj0[1],
            hidden_dim=proj0[0],
            num_tokens=tokens,
            clip_embeddings_dim=need("perceiver_resampler.proj_in.weight")[1],
            perceiver=_resampler_params(proj, "perceiver_resampler."),
            shortcut=v2,
        )
        return ModelInfo(
            family="ip-adapter-faceid",
            variant=("ip-adapter-faceid-plusv2" if v2 else "ip-adapter-faceid-plus") + sfx,
            base=base,
            image_encoder="insightface+clip-vit-h" if params["clip_embeddings_dim"] == 1280 else "insightface+clip",
            encoder_output="face_embedding(normed)+hidden_states[-2] of the aligned face crop",
            tokens=tokens,
            projection="faceid-plus",
            lora=lora_rank is not None,
            lora_rank=lora_rank,
            face_model="buffalo_l",
            params=params,
            hints=hints,
        )
    if "latents" in proj:
        rp = _resampler_params(proj)
        params.update(rp)
        tokens = rp["num_queries"]
        if rp["embedding_dim"] == 512:
            # The ArcFace embedding through a Resampler: InstantID, or (cubiq) portrait-unnorm SDXL.
            if "portrait" in names:
                hints.append("InstantID and FaceID-portrait-unnorm share this layout; 'portrait' in the name selects portrait")
                return ModelInfo(
                    family="ip-adapter-faceid",
                    variant="ip-adapter-faceid-portrait-unnorm" + sfx,
                    base=base,
                    image_encoder="insightface",
                    encoder_output="face_embedding(raw)",
                    tokens=tokens,
                    projection="resampler",
                    face_model="buffalo_l",
                    params=params,
                    hints=hints,
                )
            if "portrait" not in names:
                hints.append("the layout InstantID shares with FaceID-portrait-unnorm; no 'portrait' in the name, so InstantID")
            return ModelInfo(
                family="instantid-adapter",
                variant="instantid-adapter" + sfx,
                base=base,
                image_encoder="insightface",
                encoder_output="face_embedding(raw)",
                tokens=tokens,
                projection="instantid-resampler",
                face_model="antelopev2",
                params=params,
                hints=hints,
            )
        enc = CLIP_VISION.get(rp["embedding_dim"], (None,))[0]
        if enc is None:
            _fail(layout.path, f"Resampler input width {rp['embedding_dim']} matches no known CLIP vision encoder")
        face = "face" in names
        hints.append(
            "plus and plus-face share one layout; "
            + ("'face' in the file name selects plus-face" if face else "no 'face' in the file name, so plus")
        )
        variant = ("ip-adapter-plus-face" if face else "ip-adapter-plus") + sfx + ("_vit-h" if base == "sdxl" and enc == "clip-vit-h" else "")
        return ModelInfo(
            family="ip-adapter",
            variant=variant,
            base=base,
            image_encoder=enc,
            encoder_output="hidden_states[-2]",
            tokens=tokens,
            projection="resampler",
            params=params,
            hints=hints,
        )
    if "proj.3.weight" in proj:
        proj0, proj2 = need("proj.0.weight"), need("proj.2.weight")
        params.update(clip_embeddings_dim=proj0[1])
        enc = CLIP_VISION.get(proj0[1], (None,))[0]
        if enc is None:
            _fail(layout.path, f"MLP input width {proj0[1]} matches no known CLIP vision encoder")
        return ModelInfo(
            family="ip-adapter",
            variant="ip-adapter-full-face" + sfx,
            base=base,
            image_encoder=enc,
            encoder_output="hidden_states[-2]",
            tokens=257,
            projection="mlp",
            params=params,
        )
    if "proj.0.weight" in proj and "norm.weight" in proj:
        proj0, proj2, norm = proj["proj.0.weight"], need("proj.2.weight"), proj["norm.weight"]
        tokens = proj2[0] // norm[0]
        params.update(id_embeddings_dim=proj0[1], hidden_dim=proj0[0], num_tokens=tokens)
        portrait = lora_rank is None
        if portrait:
            hints.append("portrait and portrait-v11 share one layout (no LoRA, 16 tokens per face)")
            variant = "ip-adapter-faceid-portrait" + ("-v11" if "v11" in names else "") + sfx
        else:
            variant = "ip-adapter-faceid" + sfx
        return ModelInfo(
            family="ip-adapter-faceid",
            variant=variant,
            base=base,
            image_encoder="insightface",
            encoder_output="face_embedding(normed)",
            tokens=tokens,
            projection="faceid-mlp",
            lora=lora_rank is not None,
            lora_rank=lora_rank,
            face_model="buffalo_l",
            params=params,
            hints=hints,
        )
    if "proj.weight" in proj and len(proj["proj.weight"]) == 2:
        w = proj["proj.weight"]
        norm = need("norm.weight")
        if norm[0] != C:
            _fail(layout.path, f"image_proj.norm.weight has width {norm[0]}, the ip_adapter layers expect {C}")
        tokens, E = w[0] // C, w[1]
        enc = CLIP_BY_PROJECTION.get(E)
        if enc is None:
            _fail(layout.path, f"linear projection input width {E} matches no known CLIP vision encoder")
        params.update(clip_embeddings_dim=E, num_tokens=tokens)
        if base == "sd15" and enc == "clip-vit-h":
            light = "light" in names
            hints.append(
                "standard and light share one layout; "
                + ("'light' in the file name selects light" if light else "no 'light' in the file name, so standard")
            )
            variant = "ip-adapter_sd15_light" + ("_v11" if "v11" in names else "") if light else "ip-adapter_sd15"
        elif base == "sd15":
            variant = "ip-adapter_sd15_vit-G"
        else:
            variant = "ip-adapter_sdxl" + ("_vit-h" if enc == "clip-vit-h" else "")
        return ModelInfo(
            family="ip-adapter",
            variant=variant,
            base=base,
            image_encoder=enc,
            encoder_output="image_embeds",
            tokens=tokens,
            projection="linear",
            params=params,
            hints=hints,
        )
    sample = ", ".join(sorted(proj)[:4])
    _fail(layout.path, f"unknown image_proj layout (keys: {sample}, …); not an official IP-Adapter projection")


def _detect_photomaker(layout: Layout) -> ModelInfo:
    enc = layout.section("id_encoder")
    lora = layout.section("lora_weights")
    for key in ("vision_model.post_layernorm.weight", "visual_projection_2.weight", "fuse_module.layer_norm.weight"):
        if key not in enc:
            _fail(layout.path, f"PhotoMaker: id_encoder.{key} is missing; the file is incomplete or not PhotoMaker")
    if not lora:
        _fail(layout.path, "PhotoMaker: the lora_weights section is missing")
    hidden = enc["vision_model.post_layernorm.weight"][0]
    downs = [k for k in lora if k.endswith("_lora.down.weight")]
    rank = lora[downs[0]][0] if downs else None
    v2 = any(k.startswith("qformer_perceiver.") for k in enc)
    params = {
        "vision_hidden": hidden,
        "projection_dim": enc["visual_projection.weight"][0],
        "projection_dim_2": enc["visual_projection_2.weight"][0],
        "lora_layers": len(downs) // 4,
        # the embedded CLIP vision tower; CLIP ViTs use heads of 64 (ViT-L/14: 16 heads)
        "vision_layers": len({k.split(".")[3] for k in enc if k.startswith("vision_model.encoder.layers.")}),
        "vision_intermediate": enc["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
        "vision_heads": hidden // 64,
        "patch_size": enc["vision_model.embeddings.patch_embedding.weight"][-1],
        "image_size": int(round((enc["vision_model.embeddings.position_embedding.weight"][0] - 1) ** 0.5))
        * enc["vision_model.embeddings.patch_embedding.weight"][-1],
        "fuse_dim": enc["fuse_module.layer_norm.weight"][0],
    }
    if v2:
        pr = {k[len("qformer_perceiver."):]: v for k, v in enc.items() if k.startswith("qformer_perceiver.")}
        perceiver = _resampler_params(pr, "perceiver_resampler.")
        # to_q is 2048 wide either way; the official module uses 16 heads of 128.
        perceiver.update(dim_head=128, heads=perceiver["heads"] * 64 // 128)
        params.update(id_embeddings_dim=pr["token_proj.0.weight"][1], hidden_dim=pr["token_proj.0.weight"][0], num_tokens=pr["token_proj.2.weight"][0] // pr["token_norm.weight"][0], perceiver=perceiver)
    return ModelInfo(
        family="photomaker",
        variant="photomaker-v2" if v2 else "photomaker-v1",
        base="sdxl",
        image_encoder="clip-vit-l(embedded)+insightface" if v2 else "clip-vit-l(embedded)",
        encoder_output="last_hidden_state+face_embedding(raw)" if v2 else "pooler_output->visual_projection(+_2)",
        tokens=params.get("num_tokens", 1),
        projection="photomaker-v2" if v2 else "photomaker-v1",
        lora=bool(downs),
        lora_rank=rank,
        face_model="buffalo_l" if v2 else None,
        params=params,
        hints=["tokens are per ID image; they replace the class word's token in the prompt"],
    )


def _detect_clip_vision(layout: Layout) -> ModelInfo:
    sd = layout.section("clip_vision")
    emb = sd.get("vision_model.embeddings.class_embedding")
    if emb is None:
        _fail(layout.path, "CLIP vision: vision_model.embeddings.class_embedding is missing")
    hidden = emb[0]
    enc = CLIP_VISION.get(hidden)
    if enc is None:
        _fail(layout.path, f"CLIP vision model with width {hidden} is not one the adapters use (ViT-H/14, ViT-bigG/14, ViT-L/14)")
    layers = len({k.split(".")[3] for k in sd if k.startswith("vision_model.encoder.layers.")})
    proj = sd.get("visual_projection.weight")
    hints = []
    if proj is None:
        hints.append("no visual_projection: image_embeds cannot be computed (only hidden-state adapters can use it)")
    return ModelInfo(
        family="clip-vision",
        variant=enc[0],
        base=None,
        image_encoder=enc[0],
        encoder_output=None,
        tokens=None,
        projection=None,
        params={
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "intermediate_size": sd["vision_model.encoder.layers.0.mlp.fc1.weight"][0],
            "projection_dim": proj[0] if proj else None,
            "patch_size": sd["vision_model.embeddings.patch_embedding.weight"][-1],
            "image_size": int(round((sd["vision_model.embeddings.position_embedding.weight"][0] - 1) ** 0.5))
            * sd["vision_model.embeddings.patch_embedding.weight"][-1],
        },
        hints=hints,
    )


def _detect_controlnet(layout: Layout, names: str) -> ModelInfo:
    sd = layout.section("controlnet")
    diffusers = "controlnet_cond_embedding.conv_in.weight" in sd
    if diffusers:
        ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
        add = "add_embedding.linear_1.weight" in sd
        cond_in = sd["controlnet_cond_embedding.conv_in.weight"][1]
    else:
        ctx_keys = [k for k in sd if k.endswith("attn2.to_k.weight")]
        add = "label_emb.0.0.weight" in sd
        cond_in = sd["input_hint_block.0.weight"][1]
    if not ctx_keys:
        _fail(layout.path, "a ControlNet without cross-attention; not IdentityNet")
    context = sd[ctx_keys[0]][1]
    if context != 2048 or not add:
        _fail(layout.path, f"a ControlNet for {CONTEXT_DIM.get(context, 'an unknown base').upper()}, not the SDXL IdentityNet of InstantID")
    named = "instant" in names or "identitynet" in names
    hints = [
        "IdentityNet is an SDXL ControlNet with the common SDXL architecture; "
        + ("the path names InstantID" if named else "nothing in the weights or the name says InstantID: use it only if it is the IdentityNet file")
    ]
    return ModelInfo(
        family="instantid-identitynet",
        variant="instantid-identitynet_sdxl",
        base="sdxl",
        image_encoder="insightface",
        encoder_output="face keypoints image + InstantID face tokens",
        tokens=None,
        projection="controlnet",
        face_model="antelopev2",
        params={"naming": "diffusers" if diffusers else "ldm", "conditioning_channels": cond_in, "config": layout.config},
        hints=hints,
    )


def inspect(path: str) -> ModelInfo:
    """Read a checkpoint's layout and say what it is."""
    return detect(read_layout(path))


def ip_layer_indices(ip_adapter: dict) -> List[int]:
    """Cross-attention layer numbers of an ``ip_adapter`` section in UNet order (sorted as integers)."""
    return _layer_indices(ip_adapter, "to_k_ip.weight")
