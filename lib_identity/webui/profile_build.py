"""Building and saving an identity profile inside the WebUI: the one function that
``POST /identity/v1/profiles`` and the accordion's "Save as profile…" button share."""

from __future__ import annotations

import os
from typing import Sequence

from . import folders, lookup


def profile_exists(name: str) -> bool:
    """Whether a profile of this name is saved in the profile folder."""
    from .. import profiles

    return os.path.isfile(profiles.profile_path(folders.profile_folder(), name))


def build_and_save(name: str, images: Sequence, *, face="largest", preparation: str = "crop",
                   crop_position: str = "center", overwrite: bool = False, progress=print):
    """Build the profile ``name`` from PIL ``images`` with the installed models and save it.

    Returns ``(result, path)``: the core's ``BuildResult`` (``.profile``, ``.messages``) and the
    file written. Raises ``ProfileError`` for a
    bad name or nothing usable, ``ProfileExistsError`` when the name is taken and ``overwrite`` is
    false (checked before the pictures are encoded, and again when saving), and other
    ``IdentityError``s for missing encoders or face packs. Holds the WebUI's queue lock while
    encoders run, as a generation does, so the two never share the GPU at once.
    """
    from modules import devices
    from modules.call_queue import queue_lock

    from .. import profiles

    name = profiles.check_name(name)
    if not overwrite and profile_exists(name):
        raise profiles.ProfileExistsError(
            f"a profile named '{name}' exists already: choose another name, overwrite it (the accordion's "
            "Overwrite box, \"overwrite\": true in the API), or delete it first")
    folder = folders.profile_folder()
    with queue_lock:
        result = profiles.build(name, list(images), models=folders.list_models(), find_encoder=lookup.find_encoder_for_run,
                                face=face, preparation=preparation, crop_position=crop_position,
                                device=getattr(devices, "device", None), progress=progress)
        path = profiles.save_profile(result.profile, folder, overwrite=overwrite)
    return result, path


def saved_line(summary: dict, path: str) -> str:
    """One line for people: what was saved and where (``models/identity/profiles/NAME.safetensors``)."""
    where = folders.shown(path)
    pictures = summary.get("pictures")
    return f"saved profile '{summary['name']}'" + (f" from {pictures} picture(s)" if pictures is not None else "") + f" to {where}"
