"""The model folders as the WebUI configures them: flag, setting, its models folder, the ControlNet extension's."""

from __future__ import annotations

import os
from typing import List, Optional

from .. import discovery


def _split(value) -> List[str]:
    if not value:
        return []
    return [part.strip() for part in str(value).replace(";", "\n").splitlines() if part.strip()]


def model_folders() -> List[str]:
    """Every folder searched for identity models, most specific first."""
    from modules import paths, shared

    extra: List[str] = []
    flag = getattr(shared.cmd_opts, "identity_models_dir", None)
    if flag:
        extra.append(flag)
    extra += _split(shared.opts.data.get("identity_extra_model_dirs", ""))
    # where ControlNet-extension users already keep IP-Adapter and InstantID files
    cn_flag = getattr(shared.cmd_opts, "controlnet_dir", None)
    if cn_flag:
        extra.append(cn_flag)
    extra += _split(shared.opts.data.get("control_net_models_path", ""))
    return discovery.model_folders(paths.models_path, extra)


def profile_folder() -> str:
    """Where identity profiles are saved and read: ``models/identity/profiles``."""
    from modules import paths

    from ..profiles import PROFILE_SUBFOLDER

    return os.path.join(paths.models_path, *PROFILE_SUBFOLDER.split("/"))


def webui_root() -> str:
    """The WebUI's own folder as users name paths from it (the data folder under ``--data-dir``)."""
    from modules import paths

    return getattr(paths, "data_path", None) or os.path.dirname(paths.models_path)


def _roots() -> List[str]:
    """Folders paths are shown from: the one above ``models`` first (``--models-dir`` may sit apart
    from ``--data-dir``), then the data folder and the WebUI's own."""
    from modules import paths

    found = []
    for p in (os.path.dirname(paths.models_path), webui_root(), getattr(paths, "script_path", None)):
        if p and os.path.abspath(p) not in found:
            found.append(os.path.abspath(p))
    return found


def shown(path: str) -> str:
    """A folder as the user knows it: ``models/ipadapter`` inside the WebUI's folder, else the full path."""
    full = os.path.abspath(path)
    for root in _roots():
        if full.startswith(root + os.sep):
            return os.path.relpath(full, root).replace(os.sep, "/")
    return path


def shorten(text: str) -> str:
    """``text`` with every path inside the WebUI's folders written relative to them (for status lines)."""
    for root in _roots():
        text = text.replace(root + os.sep, "")
    return text


def list_models(refresh: bool = False):
    return discovery.list_models(model_folders(), refresh=refresh)


def find_model(name: str, families=None):
    return discovery.find_model(name, model_folders(), families=families)


def _controlnet_extension_dir() -> Optional[str]:
    """The sd-webui-controlnet extension's folder, where its insightface packs are downloaded."""
    from modules import paths

    root = getattr(paths, "extensions_dir", None) or os.path.join(
        getattr(paths, "script_path", None) or os.path.dirname(paths.models_path), "extensions")
    preferred = os.path.join(root, "sd-webui-controlnet")
    if os.path.isdir(preferred):
        return preferred
    try:
        names = sorted(os.listdir(root))
    except OSError:
        return None
    for name in names:  # a renamed checkout (sd-webui-controlnet-main, ...)
        if "controlnet" in name.lower() and os.path.isdir(os.path.join(root, name, "annotator")):
            return os.path.join(root, name)
    return None


def face_pack_folders() -> List[str]:
    """Where insightface packs are looked for, in order: models/insightface/models, models/insightface, the
    ControlNet extension's downloads, --identity-models-dir and the extra-folders setting, ~/.insightface/models."""
    from modules import paths, shared

    from ..encoders.faces import search_folders

    extra: List[str] = []
    flag = getattr(shared.cmd_opts, "identity_models_dir", None)
    if flag:
        extra.append(flag)
    extra += _split(shared.opts.data.get("identity_extra_model_dirs", ""))
    return search_folders(paths.models_path, controlnet_extension_dir=_controlnet_extension_dir(), extra_dirs=extra)


def find_face_pack(name: str) -> str:
    """The folder of insightface pack ``name``; ``FacePackNotFound`` names the pack, its files and the folders searched."""
    from ..encoders.faces import find_pack

    return find_pack(name, face_pack_folders())
