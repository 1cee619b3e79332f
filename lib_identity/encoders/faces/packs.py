"""Where insightface model packs (buffalo_l, antelopev2, ...) are looked for, and the error when one is missing.

A pack is a folder of ``.onnx`` files named after the pack. insightface 2.x downloads a pack it
is given by *name* and cannot find, so the extension only ever hands it a folder it found itself.

Search order (issue 8), for pack ``<pack>``:

1. ``<models>/insightface/models/<pack>`` (where insightface's own layout puts it);
2. ``<models>/insightface/<pack>``;
3. the ControlNet extension's ``annotator/downloads/insightface/models/<pack>``;
4. each ``--identity-models-dir`` / extra folder: ``<dir>/<pack>``, ``<dir>/insightface/models/<pack>``;
5. ``~/.insightface/models/<pack>`` (insightface's default root).

The WebUI layer supplies the folders (``webui/folders.py``); nothing here imports the WebUI.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from ...errors import ModelNotFoundError

# The official choices: FaceID and PhotoMaker V2 use buffalo_l, InstantID uses antelopev2.
DEFAULT_PACK = "buffalo_l"
# The files each official pack's detection and recognition come from (named in messages only;
# a pack's models are told apart by their inputs and outputs, as insightface's router does).
KNOWN_PACK_FILES = {
    "buffalo_l": ("det_10g.onnx", "w600k_r50.onnx"),
    "buffalo_s": ("det_500m.onnx", "w600k_mbf.onnx"),
    "antelopev2": ("scrfd_10g_bnkps.onnx", "glintr100.onnx"),
}

# Where a pack is published: insightface's own releases (its model_zoo downloads buffalo_l.zip from there).
PACK_DOWNLOADS = {
    "buffalo_l": "buffalo_l.zip in its GitHub releases (github.com/deepinsight/insightface/releases)",
}


class FacePackNotFound(ModelNotFoundError):
    """No folder holds the insightface pack: the message names the pack, its files and the folders searched."""

    def __init__(self, name: str, searched: Sequence[str], detail: str = ""):
        self.pack = name
        self.searched = list(searched)
        known = KNOWN_PACK_FILES.get(name)
        files = (f"{known[0]} (detection) and {known[1]} (recognition)" if known
                 else "a detection .onnx and a recognition .onnx")
        where = "; ".join(self.searched) if self.searched else "(no folders configured)"
        msg = (
            f"insightface model pack '{name}' not found{': ' + detail if detail else ''}. It is a folder named '{name}' "
            f"holding {files}. Searched: {where}. Put the pack's folder in models/insightface/models/ "
            f"(it is never downloaded by this extension)."
        )
        if name in PACK_DOWNLOADS:
            msg += f" insightface publishes it as {PACK_DOWNLOADS[name]}: unpack it there, so that models/insightface/models/{name} holds the .onnx files."
        super().__init__(msg)


@dataclass(frozen=True)
class FacePack:
    """A found pack: its name and folder, and the ``.onnx`` files in it (sorted)."""

    name: str
    folder: str
    files: Tuple[str, ...]


def search_folders(models_dir: Optional[str] = None, *, controlnet_extension_dir: Optional[str] = None,
                   extra_dirs: Iterable[str] = (), home: Optional[str] = None) -> List[str]:
    """The folders, in search order, in which a pack's folder ``<pack>`` is looked for.

    ``models_dir``: the WebUI's models folder; ``controlnet_extension_dir``: the sd-webui-controlnet
    extension's folder; ``extra_dirs``: ``--identity-models-dir`` and the extra-folders setting;
    ``home``: the user's home (``~`` by default).
    """
    out: List[str] = []
    if models_dir:
        out += [os.path.join(models_dir, "insightface", "models"), os.path.join(models_dir, "insightface")]
    if controlnet_extension_dir:
        out.append(os.path.join(controlnet_extension_dir, "annotator", "downloads", "insightface", "models"))
    for d in extra_dirs:
        if d:
            out += [d, os.path.join(d, "insightface", "models")]
    out.append(os.path.join(os.path.expanduser(home or "~"), ".insightface", "models"))
    seen, unique = set(), []
    for f in out:
        key = os.path.normcase(os.path.abspath(f))
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return unique


def _onnx_files(folder: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "*.onnx")))


def _pack_in(folder: str, name: str) -> Optional[str]:
    candidate = os.path.join(folder, name)
    if not os.path.isdir(candidate):
        return None
    if _onnx_files(candidate):
        return candidate
    # antelopev2's published zip unpacks to antelopev2/antelopev2/*.onnx
    nested = os.path.join(candidate, name)
    if os.path.isdir(nested) and _onnx_files(nested):
        return nested
    return None


def check_pack_name(name: str) -> str:
    """A pack name is a plain folder name (no path separators, not '.' or '..')."""
    n = str(name or "").strip()
    if not n or n in (".", "..") or any(sep in n for sep in ("/", "\\", os.sep)):
        raise FacePackNotFound(n or "(empty)", [], "a pack is named by its folder name, like buffalo_l or antelopev2")
    return n


def find_pack(name: str, folders: Sequence[str]) -> str:
    """The folder of pack ``name``: the first ``<folder>/<name>`` holding ``.onnx`` files, in ``folders``' order.

    Raises ``FacePackNotFound`` naming the pack, the files it needs and every folder searched.
    """
    name = check_pack_name(name)
    for folder in folders:
        found = _pack_in(folder, name)
        if found:
            return os.path.abspath(found)
    raise FacePackNotFound(name, [os.path.join(f, name) for f in folders])


def open_pack(name_or_folder: str, folders: Sequence[str] = ()) -> FacePack:
    """A ``FacePack`` from a pack name (searched in ``folders``) or from a pack folder given directly (CLI ``--pack DIR``)."""
    text = os.fspath(name_or_folder)
    if os.path.isdir(text) or os.sep in text or "/" in text:
        folder = os.path.abspath(os.path.expanduser(text))
        files = _onnx_files(folder) if os.path.isdir(folder) else []
        if not files:
            raise FacePackNotFound(os.path.basename(folder.rstrip(os.sep)) or folder, [folder], "the folder holds no .onnx file")
        return FacePack(os.path.basename(folder.rstrip(os.sep)), folder, tuple(files))
    folder = find_pack(text, folders)
    return FacePack(check_pack_name(text), folder, tuple(_onnx_files(folder)))
