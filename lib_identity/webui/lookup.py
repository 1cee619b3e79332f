"""What the WebUI has loaded and where a unit's models are: shared by the accordion, the run and
the X/Y/Z axes (so none of them imports another)."""

from __future__ import annotations

from typing import List, Optional, Tuple

from .. import units as U
from ..errors import IdentityError
from . import folders, settings


def loaded_base() -> Optional[str]:
    """'sd15' / 'sdxl' for the loaded checkpoint, None when none is loaded or it is neither."""
    model = _loaded_model()
    if model is None:
        return None
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd1", False):
        return "sd15"
    return None


def _loaded_model():
    """The loaded checkpoint, or None; never loads one (``shared.sd_model`` would, when none has
    been loaded yet, and the API gate asks from outside the queue lock)."""
    try:
        from modules import sd_models

        return sd_models.model_data.sd_model
    except Exception:  # noqa: BLE001 - an older WebUI, or the stand-in of the tests
        pass
    try:
        from modules import shared

        return shared.sd_model
    except Exception:  # noqa: BLE001
        return None


def resolve_units(units, base: Optional[str]) -> list:
    """``units.validate_for_run`` against the configured model folders: the one check of enabled
    units that a run (``runtime.process``) and the API gate (``api_gate``) both make."""
    return U.validate_for_run(
        units,
        base=base,
        find_model=folders.find_model,
        find_encoder=find_encoder_for_run,
        model_names=lambda: [e.name for e in folders.list_models() if e.usable],
        find_profile=find_profile,
    )


def find_profile(name: str):
    """The saved profile ``name`` from the profile folder (``profiles.load_profile``)."""
    from .. import profiles

    return profiles.load_profile(folders.profile_folder(), name)


def model_choices(refresh: bool = False) -> List[str]:
    """Usable adapter models for the loaded checkpoint's base, as "name [hash]"."""
    base = loaded_base()
    out = ["None"]
    for e in folders.list_models(refresh=refresh):
        info = e.info
        if info is None or info.family not in U.ADAPTER_FAMILIES:
            continue
        if base and info.base and info.base != base:
            continue
        out.append(e.title)
    return out


def find_encoder_for_run(need: str):
    """What ``units.validate_for_run`` calls: the helper's path, or an ``IdentityError`` saying where to put it."""
    from ..encoders import find_encoder

    if need.startswith("clip-"):
        return find_encoder(need, folders.model_folders())
    if need.startswith("insightface:"):
        return folders.find_face_pack(face_pack_name(need.split(":", 1)[1]))
    if need == "instantid-identitynet":
        return find_identitynet(folders.list_models())
    raise IdentityError(U.ENCODER_HELP.get(need, "not supported in this version"))


def find_identitynet(entries) -> str:
    """The IdentityNet among the discovered models (a diffusers folder or one .safetensors, any name).

    IdentityNet has the common SDXL ControlNet architecture, so its weights do not tell it from
    other SDXL ControlNets: a file whose path names InstantID or IdentityNet comes first; without
    one, the only SDXL ControlNet found is used; several unnamed ones are not guessed between.
    """
    found = [e for e in entries if e.info is not None and e.info.family == "instantid-identitynet"]
    if not found:
        raise IdentityError(U.ENCODER_HELP["instantid-identitynet"] + " (a folder with config.json and "
                            "diffusion_pytorch_model.safetensors, or one .safetensors file, also in models/instantid)")
    named = [e for e in found if any(w in e.path.lower().replace("_", "").replace("-", "")
                                     for w in ("instantid", "identitynet"))]
    if named:
        return named[0].path
    if len(found) == 1:
        return found[0].path
    listed = ", ".join(e.name for e in found[:6])
    raise IdentityError(f"several SDXL ControlNets were found ({listed}) and none is named as InstantID's IdentityNet; "
                        "put 'instantid' in the IdentityNet's file or folder name, or move it to models/instantid")


def face_pack_name(official: str) -> str:
    """The insightface pack to use where the official code uses ``official`` (a setting may say another)."""
    key = f"identity_face_pack_{official}"
    chosen = str(settings.option(key) if key in settings.DEFAULTS else official).strip()
    return chosen or official


def find_encoder_status(need: str) -> Tuple[bool, str]:
    """``(found, where-or-what-to-do)`` for a model's helper (CLIP encoder, face models, IdentityNet)."""
    try:
        return True, find_encoder_for_run(need)
    except IdentityError as e:
        return False, str(e)


def upload_opener():
    """Opens gradio's uploads by path, only below the WebUI's temp folders (``image_input.upload_opener``)."""
    import os
    import tempfile

    from .. import image_input

    roots = []
    try:
        from modules import shared

        if shared.opts.data.get("temp_dir"):
            roots.append(shared.opts.data["temp_dir"])
    except Exception:  # noqa: BLE001 - outside a WebUI only gradio's own temp folder counts
        pass
    roots.append(os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio"))
    return image_input.upload_opener(roots)


def profile_choices() -> List[str]:
    """"None" (use the unit's pictures) and the saved profiles' names, for the accordion and the X/Y/Z axis.

    A profile file that cannot be read is left out here; ``GET /identity/v1/profiles`` lists it with why.
    """
    from .. import profiles

    try:
        found = profiles.list_profiles(folders.profile_folder())
    except (IdentityError, OSError):
        found = []
    return ["None"] + sorted((p["name"] for p in found if "error" not in p), key=str.lower)
