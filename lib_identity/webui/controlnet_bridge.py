"""InstantID through the ControlNet extension (sd-webui-controlnet 1.1.440+), for users who live there.

An InstantID unit with ``via_controlnet`` on is not run natively. Before the generation
(``Script.before_process``, before the extension's ``process`` reads its units) the bridge
writes the two units the extension pairs for InstantID into two free (disabled) ControlNet
slots next to each other, in the order it needs (it gives the IdentityNet unit the face tokens
of the IP-Adapter unit just before it among the enabled units):

1. ``identity_instant_id_face_embedding`` with the InstantID adapter file, ``ip_weight`` and the
   unit's start/end;
2. ``identity_instant_id_face_keypoints`` with the IdentityNet file, ``identitynet_weight`` and
   its window; its canvas is the generation's size, so the extension's hint is ours.

The user's own ControlNet units are left as they are, the number of slots never changes, and
the slots are given back after the generation (``restore``). The extension's infotext lines
for our two units are removed: the unit's own infotext entry restores both.

The extension tells InstantID files by name: both file names must contain ``instant_id``.
The extension is found in ``sys.modules`` (``internal_controlnet.external_code``), never
imported here, so the WebUI runs the same without it.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Dict, List, Optional, Sequence

from ..errors import IdentityError, UnitError
from . import controlnet_preprocessors as prep

EXTERNAL_CODE = ("internal_controlnet.external_code", "scripts.external_code")
NEEDED_IN_NAME = "instant_id"
ADAPTER_NAME = "ip-adapter_instant_id_sdxl"  # the names the extension's InstantID pull request recommends
IDENTITYNET_NAME = "control_instant_id_sdxl"
IDENTITYNET = "instantid-identitynet"  # the requirement id of units.required_encoders
INSTALL = "install sd-webui-controlnet 1.1.440 or later"
NAMES_HELP = (f"the ControlNet extension tells InstantID files by name: both must have '{NEEDED_IN_NAME}' in their "
              f"file names, e.g. {ADAPTER_NAME} (the Image Adapter) and {IDENTITYNET_NAME} (IdentityNet)")


def runs_through_controlnet(unit) -> bool:
    """Whether a unit asks for the ControlNet extension (``via_controlnet``; absent fields read False)."""
    return bool(getattr(unit, "via_controlnet", False))


def external_code():
    """The extension's ``external_code`` module when it is loaded, else None."""
    for name in EXTERNAL_CODE:
        module = sys.modules.get(name)
        if module is not None:
            return module
    return None


def controlnet_problem(ec) -> Optional[str]:
    """Why the extension cannot run InstantID units for us, in words; None when it can."""
    if ec is None:
        return f"the ControlNet extension (sd-webui-controlnet) is not installed or not enabled: {INSTALL}"
    needed = ("ControlNetUnit", "Preprocessor", "get_all_units_in_processing", "update_cn_script_in_processing")
    missing = [n for n in needed if not hasattr(ec, n)]
    if missing or ec.Preprocessor.get_preprocessor("instant_id_face_keypoints") is None:
        return f"the installed ControlNet extension is too old for InstantID units (it has no InstantID preprocessors): {INSTALL}"
    return None


def register_preprocessors() -> bool:
    """Put our face preprocessors into the extension's registry (when it is loaded). Safe to repeat."""
    ec = external_code()
    if ec is None or controlnet_problem(ec) is not None:
        return False
    return prep.register(ec)


# ---------------------------------------------------------------------------- model files


def _hash_of(path: str) -> str:
    from .. import discovery

    return discovery.short_hash(path)  # the WebUI's model hash, which the extension's titles carry


def controlnet_title(ec, path: str, *, number: int, what: str, name: str) -> str:
    """The extension's model title ("stem [hash]") for the file at ``path`` (or a copy of it).

    ``what``: "the Image Adapter" or "IdentityNet"; ``name``: the recommended stem. Errors say
    where the extension looks and which name to use.
    """
    suffix = ".safetensors" if os.path.isdir(path) else os.path.splitext(path)[1]
    titles = [t for t in ec.get_models() if t and t != "None"]
    digest = _hash_of(path)
    same = [t for t in titles if digest and t.endswith(f"[{digest}]")]
    if not same:
        raise UnitError(number, "via_controlnet", f"the ControlNet extension does not list {what} ({path}): it loads models only "
                        f"from its own folders (models/ControlNet or its extra path setting). Put the file there as "
                        f"{name}{suffix} and refresh its model list; {NAMES_HELP}")
    named = [t for t in same if NEEDED_IN_NAME in t.rsplit(" [", 1)[0]]
    if not named:
        raise UnitError(number, "via_controlnet", f"the ControlNet extension lists {what} as '{same[0]}', without "
                        f"'{NEEDED_IN_NAME}' in its name, so it would not run it as InstantID: rename the file to "
                        f"{name}{suffix}; {NAMES_HELP}")
    return named[0]


def names_status(adapter_path: str, identitynet_path: Optional[str]) -> str:
    """One line for the accordion's status: whether the extension can run these files as InstantID."""
    ec = external_code()
    if ec is None:
        return ""
    files = [(adapter_path, ADAPTER_NAME)] + ([(identitynet_path, IDENTITYNET_NAME)] if identitynet_path else [])
    wrong = [f"{os.path.basename(p.rstrip(os.sep))} → {n}" for p, n in files
             if NEEDED_IN_NAME not in os.path.basename(p.rstrip(os.sep))]
    if not wrong:
        return f"through the ControlNet extension: the file names have '{NEEDED_IN_NAME}', as it needs"
    return f"⚠ through the ControlNet extension: {NAMES_HELP}; rename " + ", ".join(wrong)


# ---------------------------------------------------------------------------- one unit -> two ControlNet units


def _refuse_what_differs(unit, number: int) -> None:
    """What the extension's InstantID cannot do as the native path does: refused, not silently changed."""
    from ..units.fields import DEFAULTS

    if len(unit.images) > 1:
        raise UnitError(number, "images", f"through the ControlNet extension a unit takes one picture (the extension "
                        f"averages face tokens, not face embeddings); this unit has {len(unit.images)}. Keep one, or "
                        "turn off 'Through the ControlNet extension'")
    if float(getattr(unit, "uncond_noise", 0.0) or 0.0) != 0.0:
        raise UnitError(number, "uncond_noise", "the ControlNet extension uses the zero embedding on the negative side; "
                        "set the negative noise to 0 or run the unit natively")
    if unit.mask is not None:
        raise UnitError(number, "mask", "a region mask is not passed to the ControlNet extension; remove it or run the unit natively")
    if unit.layer_preset != DEFAULTS["layer_preset"]:
        raise UnitError(number, "layer_preset", "per-layer weights are not passed to the ControlNet extension; use the "
                        f"'{DEFAULTS['layer_preset']}' preset or run the unit natively")
    for field in ("ip_weight", "identitynet_weight"):
        value = float(getattr(unit, field))
        if not 0.0 <= value <= 2.0:
            raise UnitError(number, field, f"the ControlNet extension takes weights from 0 to 2, got {value:g}")


def _face_index(picture, choice, pack: str, number: int, label: str) -> int:
    """The chosen face as an index of the shared analysis (0 is the largest): what our preprocessors read."""
    from ..encoders import faces as face_analysis

    found = face_analysis.analyse_faces(picture, pack)
    face = face_analysis.pick_face(found, choice, unit_number=number, image_label=label)
    return next(i for i, f in enumerate(found) if f is face)


def _one_pose_face(picture, choice, pack: str, number: int) -> None:
    """A pose picture of several faces binds the unit to its face's region (``methods.pose_faces``),
    which the extension cannot take: refused, as a mask is."""
    from ..encoders import faces as face_analysis
    from ..methods.pose_faces import pick_pose_face

    found = face_analysis.analyse_faces(picture, pack)
    if len(found) > 1:
        raise UnitError(number, "pose_image", f"the pose picture shows {len(found)} faces, so the unit is bound to its "
                        "face's region, which is not passed to the ControlNet extension; run the unit natively (turn "
                        "off 'Through the ControlNet extension') or use a pose picture with one face")
    pick_pose_face(found, choice, unit_number=number)  # no face, or an index past the one face: said here


def frame_of(p):
    """The generation's (width, height) as the extension aligns it (multiples of 8)."""
    return (int(p.width) // 8 * 8, int(p.height) // 8 * 8)


def controlnet_units(ec, resolved, frame, *, pack: Optional[str] = None) -> List:
    """The extension's units for one validated InstantID unit: embedding, then keypoints (left out
    when ``identitynet_weight`` is 0, as the native path then runs no IdentityNet)."""
    import numpy as np

    from ..encoders.preprocess import to_rgb

    unit, number = resolved.unit, resolved.number
    _refuse_what_differs(unit, number)
    pack = pack or resolved.encoders.get(f"insightface:{prep.FACE_PACK}") or prep._face_pack()
    picture = to_rgb(unit.images[0])
    common = dict(enabled=True, resize_mode="Crop and Resize", control_mode="Balanced", pixel_perfect=False,
                  low_vram=False, save_detected_map=False)
    adapter = controlnet_title(ec, resolved.model.path, number=number, what="the Image Adapter", name=ADAPTER_NAME)
    out = [ec.ControlNetUnit(
        module=prep.EMBEDDING, model=adapter, image=np.asarray(picture), weight=float(unit.ip_weight),
        guidance_start=float(unit.start), guidance_end=float(unit.end),
        threshold_a=_face_index(picture, unit.face, pack, number, "reference image 1"), **common)]
    if float(unit.identitynet_weight) == 0.0:
        return out
    identitynet = resolved.encoders.get(IDENTITYNET)
    if not identitynet:
        raise UnitError(number, "model", "InstantID's IdentityNet was not found; put it into models/ControlNet as "
                        f"{IDENTITYNET_NAME}.safetensors")
    pose = getattr(unit, "pose_image", None)
    if pose is not None:  # one face: the native path takes it, with no region
        pose_picture = to_rgb(pose)
        _one_pose_face(pose_picture, getattr(unit, "pose_face", "auto"), pack, number)
        pose_face = _face_index(pose_picture, "largest", pack, number, "the pose picture")
    else:
        pose_picture, pose_face = picture, out[0].threshold_a
    out.append(ec.ControlNetUnit(
        module=prep.KEYPOINTS, model=controlnet_title(ec, identitynet, number=number, what="IdentityNet", name=IDENTITYNET_NAME),
        image=np.asarray(pose_picture), weight=float(unit.identitynet_weight),
        guidance_start=float(unit.identitynet_start), guidance_end=float(unit.identitynet_end),
        threshold_a=pose_face, processor_res=frame[0], threshold_b=frame[1], **common))
    return out


def free_slots(units: Sequence, count: int) -> Optional[int]:
    """The first index of ``count`` disabled slots in a row (so no enabled unit comes between them)."""
    run = 0
    for i, u in enumerate(units):
        run = 0 if getattr(u, "enabled", False) else run + 1
        if run == count:
            return i - count + 1
    return None


# ---------------------------------------------------------------------------- one generation


class _Applied:
    """What ``apply`` changed, so ``restore`` can give it back (module level: a reload finds it)."""

    def __init__(self):
        self.lock = threading.RLock()
        self.p = None
        self.script_args = None
        self.serialized: List[str] = []


applied = _Applied()


def apply(p, resolved: Sequence) -> int:
    """Write the ControlNet units of every ``via_controlnet`` unit into free slots of ``p``.

    Returns how many slots were written; raises ``UnitError`` with what to do when the extension
    is missing or too old, the files are misnamed or unlisted, or there are not enough free slots.
    """
    via = [r for r in resolved if runs_through_controlnet(r.unit)]
    if not via:
        return 0
    ec = external_code()
    problem = controlnet_problem(ec)
    if problem:
        raise UnitError(via[0].number, "via_controlnet", f"{problem}; or turn off 'Through the ControlNet extension' "
                        "to run InstantID natively")
    if not prep.register(ec):
        raise UnitError(via[0].number, "via_controlnet", "our face preprocessors could not be added to the ControlNet "
                        "extension (another preprocessor has their names)")
    frame = frame_of(p)
    slots = list(ec.get_all_units_in_processing(p))
    if not slots:
        raise UnitError(via[0].number, "via_controlnet", "the ControlNet extension has no units in this generation "
                        "(it is not among this run's scripts)")
    written = 0
    for r in via:
        ours = controlnet_units(ec, r, frame)
        at = free_slots(slots, len(ours))
        if at is None:
            free = sum(1 for u in slots if not getattr(u, "enabled", False))
            raise UnitError(r.number, "via_controlnet", f"the ControlNet extension needs {len(ours)} free units next to "
                            f"each other for InstantID; {len(slots)} units, {free} free. Raise Settings → ControlNet → "
                            "'Multi-ControlNet: ControlNet unit number' or free two adjacent units")
        slots[at:at + len(ours)] = ours
        written += len(ours)
    with applied.lock:
        if applied.p is not p:
            restore()  # another generation's (one that never reached postprocess)
            applied.p, applied.script_args = p, p.script_args
        ec.update_cn_script_in_processing(p, slots)
        applied.serialized += [u.serialize() for u in slots if u.module in prep.NAMES and hasattr(u, "serialize")]
    return written


def forget_infotext(p) -> None:
    """Drop the extension's "ControlNet N" infotext lines of our units (the Identity entry records them)."""
    params = getattr(p, "extra_generation_params", None)
    if not applied.serialized or params is None:
        return
    for key in [k for k, v in params.items() if str(k).startswith("ControlNet ") and v in applied.serialized]:
        del params[key]


def restore(p=None) -> None:
    """Give the slots back: ``p``'s script args as they were before ``apply`` (any ``p`` when None)."""
    with applied.lock:
        if applied.p is not None and (p is None or p is applied.p):
            applied.p.script_args = applied.script_args
            applied.p, applied.script_args, applied.serialized = None, None, []
