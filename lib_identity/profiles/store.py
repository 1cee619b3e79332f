"""Profiles on disk: one ``.safetensors`` file per profile in the profile folder.

Only safetensors is ever read or written (tensors and a JSON document, nothing that runs code).
A name is checked before it becomes a path, so no name reaches outside the folder; a file is
checked for its size and its shape (a pickle renamed ``.safetensors``, a truncated copy) before
the safetensors library reads it.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections import OrderedDict
from typing import Dict, List, Tuple

from .profile import FORMAT, Profile, ProfileError, ProfileExistsError, ProfileNotFoundError

PROFILE_SUBFOLDER = "identity/profiles"  # under the WebUI's models folder
SUFFIX = ".safetensors"
MAX_NAME_LENGTH = 64
# 50 pictures with every encoder's hidden states (ViT-H, ViT-bigG, FaceID-Plus crops) in float32
# come to about 220 MB; a file far above that was not written by us.
MAX_PROFILE_BYTES = 512 * 2 ** 20
MAX_HEADER_BYTES = 16 * 2 ** 20
_NAME = re.compile(r"^[^\W][\w .()+-]*$", re.UNICODE)
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(1, 10)} | {f"lpt{i}" for i in range(1, 10)}
NAME_RULE = (f"1 to {MAX_NAME_LENGTH} letters, digits, spaces and _ - . ( ) +, starting with a letter or digit "
             "(no slashes, no '..')")


def check_name(name) -> str:
    """``name`` when it can name a profile file; ``ProfileError`` saying the rule when not."""
    if not isinstance(name, str):
        raise ProfileError(f"a profile name must be text ({NAME_RULE}), got {type(name).__name__}")
    shown = name if len(name) <= 80 else name[:77] + "…"
    bad = (not name or len(name) > MAX_NAME_LENGTH or not _NAME.match(name) or ".." in name
           or name != name.strip() or name.endswith(".") or name.lower().split(".")[0] in _WINDOWS_RESERVED)
    if bad:
        raise ProfileError(f"'{shown}' cannot name a profile: use {NAME_RULE}")
    return name


def profile_path(folder: str, name: str) -> str:
    """The file of profile ``name`` in ``folder`` (the name checked first)."""
    path = os.path.join(os.path.abspath(folder), check_name(name) + SUFFIX)
    if os.path.dirname(path) != os.path.abspath(folder):  # check_name keeps this from happening
        raise ProfileError(f"'{name}' cannot name a profile: use {NAME_RULE}")
    return path


def _check_file(path: str, name: str) -> Tuple[int, dict]:
    """``(size, header)`` of a profile file, after the checks that come before any reading."""
    try:
        size = os.path.getsize(path)
    except FileNotFoundError:
        raise ProfileNotFoundError(f"there is no profile '{name}' (no {os.path.basename(path)} in the profile folder); "
                                   "GET /identity/v1/profiles lists them") from None
    where = f"profile '{name}' ({path})"
    if size > MAX_PROFILE_BYTES:
        raise ProfileError(f"{where} is {size / 2 ** 20:.0f} MiB, more than a profile can be "
                           f"({MAX_PROFILE_BYTES // 2 ** 20} MiB); it was not made by this extension")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ProfileError(f"{where} is not a .safetensors file (only {size} bytes); build the profile again")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            kind = "a pickle (a renamed .bin/.pt file?)" if head[:1] == b"\x80" else \
                "a zip archive (a renamed .pt file?)" if head[:2] == b"PK" else "not a .safetensors file"
            raise ProfileError(f"{where} is {kind}; profiles are read as safetensors only, nothing else is opened")
        try:
            header = json.loads(fh.read(n))
            end = max((int(m["data_offsets"][1]) for k, m in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ProfileError(f"{where} is not a .safetensors file (its header is not readable); build the profile again") from None
    if size < 8 + n + end:
        raise ProfileError(f"{where} is truncated: {size} bytes on disk, its header describes {8 + n + end}; "
                           "build the profile again")
    return size, header


class _Cache:
    """Read profiles by file identity (path, size, mtime): a changed file is read again."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: "OrderedDict[tuple, Profile]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key):
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
            return hit

    def put(self, key, profile: Profile):
        with self._lock:
            self._items[key] = profile
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self):
        with self._lock:
            self._items.clear()


_cache = _Cache()


def load_profile(folder: str, name: str) -> Profile:
    """Profile ``name`` from ``folder`` (kept in memory while its file is unchanged)."""
    from safetensors.torch import load_file

    path = profile_path(folder, name)
    size, _ = _check_file(path, name)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    try:
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ProfileError(f"profile '{name}' ({path}) cannot be read ({str(e).splitlines()[0][:200]}); "
                           "build it again") from None
    profile = Profile.from_file(tensors, metadata, f"profile '{name}' ({path})", nbytes=size)
    if profile.name != name:
        profile.name = name  # a renamed file answers to its file name
    _cache.put(key, profile)
    return profile


def save_profile(profile: Profile, folder: str, overwrite: bool = False) -> str:
    """Write ``profile`` to ``folder`` (made when missing) as ``<name>.safetensors``; the written path.

    The file appears whole or not at all (written beside it, then renamed).
    """
    from safetensors.torch import save

    path = profile_path(folder, profile.name)
    if os.path.exists(path) and not overwrite:
        raise ProfileExistsError(f"a profile named '{profile.name}' exists; choose another name, or overwrite it "
                                 "(API: \"overwrite\": true; CLI: --overwrite), or delete it first")
    tensors, metadata = profile.to_file()
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    if nbytes > MAX_PROFILE_BYTES:
        raise ProfileError(f"profile '{profile.name}' would be {nbytes / 2 ** 20:.0f} MiB, more than "
                           f"{MAX_PROFILE_BYTES // 2 ** 20} MiB; build it from fewer pictures")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    try:
        # written by open(), so the file gets the usual mode (the library's save_file makes 0600 files)
        with open(tmp, "wb") as fh:
            fh.write(save(tensors, metadata=metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _cache.clear()
    profile.nbytes = os.path.getsize(path)
    return path


def delete_profile(folder: str, name: str) -> None:
    """Remove profile ``name`` from ``folder``."""
    path = profile_path(folder, name)
    if not os.path.isfile(path):
        raise ProfileNotFoundError(f"there is no profile '{name}' to delete; GET /identity/v1/profiles lists them")
    os.remove(path)
    _cache.clear()


def profile_names(folder: str) -> List[str]:
    """The names of the profile files in ``folder`` (sorted, case-insensitively)."""
    if not folder or not os.path.isdir(folder):
        return []
    out = []
    for entry in os.listdir(folder):
        if entry.endswith(SUFFIX) and not entry.startswith("."):
            stem = entry[: -len(SUFFIX)]
            try:
                out.append(check_name(stem))
            except ProfileError:
                continue  # not a name we would write; not offered
    return sorted(out, key=str.lower)


def list_profiles(folder: str) -> List[dict]:
    """A summary of every profile in ``folder`` (``Profile.summary``), from the file headers only;
    a file that is not a readable profile gives ``{"name", "error"}``."""
    out = []
    for name in profile_names(folder):
        try:
            out.append(_summary(profile_path(folder, name), name))
        except ProfileError as e:
            out.append({"name": name, "error": str(e)})
    return out


def _summary(path: str, name: str) -> dict:
    size, header = _check_file(path, name)
    metadata: Dict[str, str] = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ProfileError(f"{os.path.basename(path)} is not an identity profile")
    try:
        doc = json.loads(metadata["profile"])
    except (KeyError, ValueError):
        raise ProfileError(f"{os.path.basename(path)} is a damaged identity profile; build it again") from None
    packs, encoders, photomaker = set(), set(), []
    for key in header:
        parts = key.split("/")
        if parts[0] == "faces" and len(parts) >= 3:
            packs.add("/".join(parts[1:-1]))
        elif parts[0] == "clip" and len(parts) >= 3:
            encoders.add(f"{parts[1]} {'/'.join(parts[2:])}")
        elif parts[0] == "face_clip" and len(parts) >= 3:
            encoders.add(f"{parts[1]} face crop ({'/'.join(parts[2:])})")
    for h, about in (doc.get("photomaker") or {}).items():
        photomaker.append(f"{about.get('file')} [{h}]")
    prep = str(doc.get("preparation", "crop"))
    return {
        "name": name, "created": doc.get("created"), "pictures": len(doc.get("pictures", [])),
        "picture_hashes": list(doc.get("pictures", [])), "left_out": list(doc.get("left_out", [])),
        "face": doc.get("face", "largest"),
        "preparation": prep + (f" ({doc.get('crop_position', 'center')})" if prep == "crop" else ""),
        "packs": sorted(packs), "encoders": sorted(encoders), "photomaker": sorted(photomaker), "bytes": size,
    }


def forget_loaded() -> None:
    """Drop the profiles kept in memory (script unload)."""
    _cache.clear()
