"""Finding identity model files in the folders users already keep them in.

Models are addressed by *name* (the file name without its suffix, as the ControlNet extension
names them), resolved only against what a scan of the configured folders found, so a name from
the UI or the API can never reach a file outside those folders.
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from . import formats
from .errors import CheckpointError, ModelNotFoundError

# Subfolders of the WebUI's models folder searched, in this order.
MODEL_SUBFOLDERS = ("ipadapter", "ControlNet", "photomaker", "instantid", "clip_vision", "insightface")


def model_folders(models_root: Optional[str] = None, extra: Iterable[str] = ()) -> List[str]:
    """The folders searched: ``--identity-models-dir`` (``extra``) first, then ``<models>/<sub>``."""
    folders: List[str] = []
    for d in extra:
        if d:
            folders.append(os.path.abspath(os.path.expanduser(d)))
    if models_root:
        for sub in MODEL_SUBFOLDERS:
            folders.append(os.path.abspath(os.path.join(models_root, sub)))
    seen, out = set(), []
    for f in folders:
        key = os.path.normcase(f)
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def short_hash(path: str) -> str:
    """The WebUI's old 8-hex model hash: sha256 of 64 KiB at offset 1 MiB (the weights file of a folder)."""
    if os.path.isdir(path):
        try:
            path = formats.diffusers_weights(path)
        except CheckpointError:
            return ""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(0x100000)
        h.update(fh.read(0x10000))
    return h.hexdigest()[:8]


@dataclass
class ModelEntry:
    """One discovered model: its name, where it is, and what it is (or why it cannot be used)."""

    name: str
    path: str
    short_hash: str
    info: Optional[formats.ModelInfo] = None
    error: Optional[str] = None

    @property
    def usable(self) -> bool:
        return self.info is not None

    @property
    def title(self) -> str:
        """``name [hash]`` as the WebUI shows models."""
        return f"{self.name} [{self.short_hash}]" if self.short_hash else self.name

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "hash": self.short_hash,
            "usable": self.usable,
            "error": self.error,
            "info": self.info.to_json() if self.info else None,
        }


def _candidates(folder: str) -> Iterable[str]:
    """Checkpoint files and diffusers folders below ``folder`` (insightface packs are skipped)."""
    if not os.path.isdir(folder):
        return
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        # a diffusers folder (config.json + weights) is one model, not a directory to descend into
        if "config.json" in files and any(f.startswith(("diffusion_pytorch_model.", "model.safetensors")) for f in files):
            if os.path.abspath(root) != os.path.abspath(folder):
                yield root
                dirs[:] = []
                continue
        # ONNX face-analysis packs live here too; they are not checkpoints
        for f in sorted(files):
            if f.lower().endswith(formats.CHECKPOINT_SUFFIXES) and not f.startswith("."):
                if f.startswith(("diffusion_pytorch_model.", "model.safetensors")) and "config.json" in files:
                    continue
                yield os.path.join(root, f)


def _name_for(path: str, folder: str) -> str:
    rel = os.path.relpath(path, folder).replace(os.sep, "/")
    for suffix in formats.CHECKPOINT_SUFFIXES:
        if rel.lower().endswith(suffix):
            return rel[: -len(suffix)]
    return rel


class _Cache:
    """Detection results by (path, size, mtime), so a refresh re-reads only changed files."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_file: Dict[Tuple[str, int, float], ModelEntry] = {}
        # the last listing, and the folders it is of: a listing of other folders is not reused
        self.entries: List[ModelEntry] = []
        self.folders: Tuple[str, ...] = ()


_cache = _Cache()


def _stat_key(path: str) -> Tuple[str, int, float]:
    target = formats.diffusers_weights(path) if os.path.isdir(path) else path
    st = os.stat(target)
    return (os.path.abspath(path), st.st_size, st.st_mtime)


def _describe(path: str, name: str) -> ModelEntry:
    try:
        key = _stat_key(path)
    except (OSError, CheckpointError) as e:
        return ModelEntry(name=name, path=path, short_hash="", error=str(getattr(e, "reason", e)))
    hit = _cache.by_file.get(key)
    if hit is not None:
        return ModelEntry(name=name, path=path, short_hash=hit.short_hash, info=hit.info, error=hit.error)
    try:
        digest = short_hash(path)
    except OSError as e:
        digest, entry = "", ModelEntry(name=name, path=path, short_hash="", error=f"cannot read the file: {e}")
    else:
        try:
            entry = ModelEntry(name=name, path=path, short_hash=digest, info=formats.inspect(path))
        except CheckpointError as e:
            entry = ModelEntry(name=name, path=path, short_hash=digest, error=e.reason)
        except Exception as e:  # noqa: BLE001 - one bad file must not break the listing
            entry = ModelEntry(name=name, path=path, short_hash=digest, error=f"{type(e).__name__}: {e}")
    _cache.by_file[key] = entry
    return entry


def list_models(folders: Iterable[str], refresh: bool = False) -> List[ModelEntry]:
    """Every checkpoint in ``folders`` with its detected variant, or the reason it is unusable.

    Names are unique: when two folders hold the same name, the first folder wins (the
    ``--identity-models-dir`` flag comes first) and the other is listed with its folder prefix.
    """
    folders = tuple(folders)
    with _cache.lock:
        if _cache.entries and not refresh and _cache.folders == folders:
            return list(_cache.entries)
        entries: List[ModelEntry] = []
        names = set()
        for folder in folders:
            for path in _candidates(folder):
                name = _name_for(path, folder)
                if name.lower() in names:
                    name = f"{os.path.basename(folder)}/{name}"
                names.add(name.lower())
                entries.append(_describe(path, name))
        _cache.entries, _cache.folders = entries, folders
        return list(entries)


def find_model(name: str, folders: Iterable[str], families: Optional[Iterable[str]] = None) -> ModelEntry:
    """The discovered model called ``name`` (also ``name [hash]`` or just the hash).

    Only names that a scan of ``folders`` produced can match: a path, ``..`` or an absolute
    name never reaches the file system.
    """
    wanted = (name or "").strip()
    if not wanted or wanted.lower() == "none":
        raise ModelNotFoundError("no model selected")
    bare, _, tail = wanted.partition(" [")
    digest = tail.rstrip("]").strip().lower() if tail else ""
    for refresh in (False, True):
        entries = list_models(folders, refresh=refresh)
        for e in entries:
            if e.name.lower() == bare.lower() or e.title.lower() == wanted.lower() or (digest and e.short_hash == digest):
                if families and e.info and e.info.family not in set(families):
                    continue
                return e
        if not digest and len(bare) == 8 and all(c in "0123456789abcdef" for c in bare.lower()):
            for e in entries:
                if e.short_hash == bare.lower():
                    return e
    raise ModelNotFoundError(
        f"model '{name}' was not found in the model folders ({', '.join(folders) or 'none configured'}); "
        "put the file there and press refresh, or use a name that GET /identity/v1/models lists"
    )
