"""PhotoMaker V1 and V2: ID pictures -> the ``PromptIdentity`` the prompt hook fuses, and the file's LoRA.

The official pipeline (TencentARC/PhotoMaker ``pipeline.py`` / ``model.py`` / ``model_v2.py``):

* every ID picture goes whole through ``CLIPImageProcessor()`` (shortest side to 224, bicubic,
  centre crop, OpenAI mean/std): ``encoders.prepare_pixels`` with the default preparation is the
  same numbers (the unit's ``preparation`` may choose pad or squash instead);
* V1: one ID embedding per picture (CLIP pooled output through both visual projections);
  V2: two per picture, from the picture's *raw* ArcFace embedding (insightface ``buffalo_l``)
  refined by the CLIP hidden states. A V2 picture without a face is skipped, as the official
  demo skips it (the console names it); none with a face is an error. Of several faces the
  unit's ``face`` choice picks one (default the largest; the official demo takes insightface's
  first detection, the same face for a one-person photo);
* the ID embeddings are stacked picture by picture, token by token, and each is fused with one
  copy of the class word's row: ``PromptIdentity.fuse`` is the file's ``fuse_module``;
* the file's ``lora_weights`` act on every attention of the SDXL UNet as ``W·x + w·up(down(x))``
  (no alpha), for the whole pass, through ``unet.lora`` (forward hooks, never merged).

The prompt side (trigger word, class-word rows, the start step) belongs to the conditioning hook.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import formats
from ..conditioning import PromptIdentity
from ..errors import PatchError, UnitError
from ..models import load_photomaker
from ..models.processor_lora import ProcessorLoRA
from ..unet.lora import AttentionLoRA

FAMILY = "photomaker"
FACE_PACK = "buffalo_l"
SDXL_ATTENTION_LAYERS = 140  # every attn1 and attn2 of the SDXL UNet: what the official LoRA covers


@dataclass
class PhotoMakerModel:
    """A loaded PhotoMaker file: its ID encoder (CPU, ``dtype``), its LoRA, and an identity ``key``."""

    info: formats.ModelInfo
    path: str
    encoder: torch.nn.Module
    lora: ProcessorLoRA
    key: str
    dtype: torch.dtype


@dataclass
class PhotoMakerContribution:
    """One PhotoMaker unit for one generation: the prompt side and the UNet side."""

    identity: PromptIdentity
    lora: Optional[AttentionLoRA]
    pictures_used: Tuple[int, ...]  # 0-based indices of the ID pictures that gave ID embeddings


def _file_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


def _size_text(path: str) -> str:
    return f"{os.path.getsize(path) / 2 ** 30:.2f} GB" if os.path.isfile(path) else "a folder"


def load_model(info: formats.ModelInfo, path: str, *, dtype: torch.dtype = torch.float32) -> PhotoMakerModel:
    """Read a PhotoMaker ``.bin`` (``weights_only``) or ``.safetensors`` file, any name, strictly.

    Every tensor is cast to ``dtype`` (the official files mix bfloat16 and float32). The console
    says what is happening: the files are 0.9 and 1.8 GB.
    """
    if info.family != FAMILY:
        raise PatchError(f"{path}: {info.variant} is not a PhotoMaker model")
    name = os.path.basename(path)
    started = time.monotonic()
    print(f"[identity] loading {name} ({info.variant}, {_size_text(path)}): reading the file …")
    sections = formats.load_tensors(path)
    print(f"[identity] {name}: building the ID encoder ({len(sections.get('id_encoder', {}))} tensors) …")
    encoder = load_photomaker(info, sections, device="cpu", dtype=dtype)
    lora_section = sections.get("lora_weights") or {}
    print(f"[identity] {name}: reading the LoRA ({len(lora_section)} tensors) …")
    lora = ProcessorLoRA.from_section(lora_section, source=path, dtype=dtype,
                                      expected_processors=SDXL_ATTENTION_LAYERS if info.base == "sdxl" and
                                      info.params.get("lora_layers") == SDXL_ATTENTION_LAYERS else None)
    del sections
    print(f"[identity] {name}: ready in {time.monotonic() - started:.1f} s")
    return PhotoMakerModel(info=info, path=path, encoder=encoder, lora=lora, key=_file_key(path), dtype=dtype)


class ModelCache:
    """The one loaded PhotoMaker file (they are large): loaded again when the file or the dtype changes."""

    def __init__(self):
        self._model: Optional[PhotoMakerModel] = None
        self._lock = threading.Lock()

    def get(self, info: formats.ModelInfo, path: str, dtype: torch.dtype = torch.float32) -> PhotoMakerModel:
        with self._lock:
            current = self._model
            if current is not None and current.key == _file_key(path) and current.dtype == dtype:
                return current
            self._model = None  # free the old one before the new one is read
            self._model = load_model(info, path, dtype=dtype)
            return self._model

    def clear(self) -> None:
        with self._lock:
            self._model = None
            _embeds.clear()


models = ModelCache()
_embeds: "OrderedDict[tuple, Tuple[torch.Tensor, Tuple[int, ...]]]" = OrderedDict()
_EMBEDS_KEPT = 8


def storage_dtype(device, dtype) -> torch.dtype:
    """The dtype the encoder is kept and run in: float32 for the CPU (no half kernels there), else the UNet's."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    return torch.float32 if device.type == "cpu" or dtype is None else dtype


def face_embeddings(images: Sequence, pack_dir, face="largest", *, unit_number: Optional[int] = None,
                    name: str = "PhotoMaker") -> Tuple[List[int], torch.Tensor]:
    """The raw ArcFace embedding (``[k, 512]``) of one face per picture, and which pictures had one.

    A picture without a face is skipped with a console line; if none has one, ``UnitError``.
    """
    from ..encoders import faces as face_analysis

    used, embeddings = [], []
    for i, image in enumerate(images):
        found = face_analysis.analyse_faces(image, pack_dir)
        if not found:
            print(f"[identity] {name}: ID picture {i + 1} has no face that insightface finds; it is skipped")
            continue
        chosen = face_analysis.pick_face(found, face, unit_number=unit_number, image_label=f"ID picture {i + 1}")
        used.append(i)
        embeddings.append(torch.from_numpy(np.array(chosen.embedding, dtype=np.float32)))
    if not embeddings:
        which = f"none of the {len(images)} pictures has" if len(images) > 1 else "the ID picture has none"
        raise UnitError(unit_number, "images", f"PhotoMaker V2 needs a face in each ID picture, and {which} that "
                        "insightface finds; use photos where the face is clearly visible (not tiny, not cut off)")
    return used, torch.stack(embeddings)


def id_embeddings(model: PhotoMakerModel, images: Sequence, *, preparation=None, pack_dir=None, face="largest",
                  device=None, unit_number: Optional[int] = None, name: str = "PhotoMaker"
                  ) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """The stacked ID embeddings ``[n, fuse_dim]`` (float32, CPU, picture by picture, token by token)
    of ``images`` and the indices of the pictures used (V2 skips pictures without a face)."""
    from ..encoders import DEFAULT_PREPARATION, prepare_pixels
    from ..encoders.preprocess import image_digest

    images = list(images)
    if not images:
        raise UnitError(unit_number, "images", "a PhotoMaker unit needs at least one ID picture")
    prep = preparation or DEFAULT_PREPARATION
    v2 = model.info.variant == "photomaker-v2"
    key = (model.key, model.dtype, str(device), tuple(image_digest(i) for i in images), repr(prep),
           str(face) if v2 else None, os.path.abspath(os.fspath(pack_dir)) if v2 and pack_dir else None)
    hit = _embeds.get(key)
    if hit is not None:
        _embeds.move_to_end(key)
        return hit
    used = list(range(len(images)))
    faces = None
    if v2:
        if pack_dir is None:
            raise UnitError(unit_number, "model", f"{model.info.variant} needs the insightface '{FACE_PACK}' face models")
        used, faces = face_embeddings(images, pack_dir, face, unit_number=unit_number, name=name)
    size = int(model.info.params.get("image_size", 224))
    pixels = prepare_pixels([images[i] for i in used], prep, size)
    out = _run_encoder(model, pixels, faces, device)
    result = (out.reshape(-1, out.shape[-1]).to("cpu", torch.float32).contiguous(), tuple(used))
    _embeds[key] = result
    while len(_embeds) > _EMBEDS_KEPT:
        _embeds.popitem(last=False)
    return result


def _run_encoder(model: PhotoMakerModel, pixels: torch.Tensor, faces: Optional[torch.Tensor], device) -> torch.Tensor:
    """The encoder on ``device`` for this call, then back on the CPU where it is kept."""
    encoder = model.encoder
    device = torch.device(device) if device is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            encoder.to(device)
            args = (pixels.to(device),) if faces is None else (pixels.to(device), faces.to(device))
            return encoder.id_embeddings(*args)
    finally:
        encoder.to("cpu")


class Fuse:
    """``PromptIdentity.fuse``: the file's ``fuse_module`` (a float32 copy per device), so the rows
    it returns have the class rows' device and dtype. It does not hold the large encoder."""

    def __init__(self, fuse_module: torch.nn.Module):
        self._cpu = copy.deepcopy(fuse_module).to("cpu", torch.float32).requires_grad_(False).eval()
        self._copies: Dict[str, torch.nn.Module] = {"cpu": self._cpu}

    def __call__(self, class_rows: torch.Tensor, id_embeds: torch.Tensor) -> torch.Tensor:
        if class_rows.shape != id_embeds.shape:
            raise PatchError(f"PhotoMaker: {class_rows.shape[0]} class-word rows for {id_embeds.shape[0]} ID embeddings; "
                             "the class word must be repeated once per ID embedding")
        device = class_rows.device
        module = self._copies.get(str(device))
        if module is None:
            module = self._copies[str(device)] = copy.deepcopy(self._cpu).to(device)
        with torch.no_grad():
            fused = module(class_rows.to(torch.float32), id_embeds.to(device=device, dtype=torch.float32))
        return fused.to(class_rows.dtype)


_fusers: Dict[str, Fuse] = {}


def fuse_of(model: PhotoMakerModel) -> Fuse:
    """One ``Fuse`` per loaded file (kept while the file is)."""
    fuser = _fusers.get(model.key)
    if fuser is None:
        _fusers.clear()
        fuser = _fusers[model.key] = Fuse(model.encoder.fuse_module)
    return fuser


def identity_key(model: PhotoMakerModel, id_embeds: torch.Tensor) -> str:
    """Changes with the file and with every number of the ID embeddings (pictures, face, fit)."""
    digest = hashlib.sha1(model.key.encode())
    digest.update(id_embeds.numpy().tobytes())
    return f"{model.info.variant}:{digest.hexdigest()[:16]}"


def lora_of(model: PhotoMakerModel, weight: float, name: str) -> Optional[AttentionLoRA]:
    """The file's LoRA for the patch session (None at weight 0: nothing to add)."""
    if float(weight) == 0.0:
        return None
    return AttentionLoRA(layers=model.lora.layers, weight=float(weight), name=name, complete=True)


def prepare(resolved, *, device, dtype, pack_dir=None) -> PhotoMakerContribution:
    """One validated PhotoMaker unit (``units.ResolvedUnit``) for a UNet on ``device``/``dtype``."""
    from ..encoders import Preparation

    unit, entry, number = resolved.unit, resolved.model, resolved.number
    info = entry.info
    name = f"Identity unit {number}"
    if info.family != FAMILY:
        raise UnitError(number, "model", f"model '{entry.name}' is {info.family}, not a PhotoMaker model")
    pack = None
    if info.variant == "photomaker-v2":
        pack = pack_dir or resolved.encoders.get(f"insightface:{info.face_model or FACE_PACK}")
        if not pack:
            raise UnitError(number, "model", f"{info.variant} needs the insightface '{FACE_PACK}' face models")
    model = models.get(info, entry.path, storage_dtype(device, dtype))
    if resolved.profile is not None:
        embeds, used = _from_profile(resolved, name)
    else:
        embeds, used = id_embeddings(model, list(unit.images), pack_dir=pack, face=unit.face, device=device,
                                     preparation=Preparation(mode=unit.preparation, crop_position=unit.crop_position),
                                     unit_number=number, name=name)
    identity = PromptIdentity(unit_number=number, trigger=unit.trigger, id_embeds=embeds, fuse=fuse_of(model),
                              start=float(unit.start), key=identity_key(model, embeds))
    return PhotoMakerContribution(identity=identity, lora=lora_of(model, unit.lora_weight, name), pictures_used=used)


def _from_profile(resolved, name: str) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """The ID embeddings a saved profile holds for this unit's PhotoMaker file."""
    from ..profiles import ProfileError, use

    entry = resolved.model
    try:
        use.check_fit(resolved.profile, resolved.unit.preparation, resolved.unit.crop_position)
        stored = use.photomaker(resolved.profile, entry.short_hash or entry.name, entry.name, name)
    except ProfileError as e:
        raise UnitError(resolved.number, "profile", str(e)) from None
    return stored.id_embeds.to(torch.float32), stored.used


def release() -> None:
    """Forget the loaded file and the cached ID embeddings (script unload)."""
    models.clear()
    _fusers.clear()
