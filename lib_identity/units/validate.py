"""Run-time checks of the enabled units against the model folders and the loaded checkpoint."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from ..errors import IdentityError, UnitError
from ..formats import CROSS_ATTENTION_LAYERS, describe_encoder
from .fields import FIELDS, METHOD_OF_FAMILY
from .unit import Unit

BASE_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# Model families a unit can run; encoders and IdentityNet are helpers found by the unit's model.
ADAPTER_FAMILIES = ("ip-adapter", "ip-adapter-faceid", "instantid-adapter", "photomaker")

# Where a missing helper model goes, said when ``find_encoder`` has nothing better to say.
ENCODER_HELP = {
    "clip-vit-h": "put the CLIP ViT-H/14 image encoder (model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K) "
    "into models/clip_vision",
    "clip-vit-bigg": "put the CLIP ViT-bigG/14 image encoder (model.safetensors of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k) "
    "into models/clip_vision",
    "clip-vit-l": "put the CLIP ViT-L/14 image encoder (model.safetensors of openai/clip-vit-large-patch14) into models/clip_vision",
    "insightface:buffalo_l": "unpack insightface's buffalo_l face models (buffalo_l.zip of insightface's GitHub releases) "
    "into models/insightface/models/buffalo_l",
    "insightface:antelopev2": "unpack insightface's antelopev2 face models into models/insightface/models/antelopev2",
    "instantid-identitynet": "put InstantID's IdentityNet (ControlNet/diffusion_pytorch_model.safetensors of InstantX/InstantID) "
    "into models/ControlNet, e.g. as control_instant_id_sdxl.safetensors",
}


@dataclass(frozen=True)
class ResolvedUnit:
    """An enabled unit with its model file and helper models found."""

    number: int
    unit: Unit  # with ``model`` set to the found model's "name [hash]"
    model: Any  # discovery.ModelEntry
    encoders: Dict[str, Any]  # requirement id ("clip-vit-h", "insightface:antelopev2", …) -> what find_encoder returned
    profile: Any = None  # the profiles.Profile the unit uses instead of pictures


def required_encoders(info) -> List[str]:
    """What a model needs besides itself: CLIP vision encoders, insightface packs, IdentityNet."""
    needs = []
    for part in (info.image_encoder or "").split("+"):
        if not part or "(embedded)" in part:
            continue
        needs.append(f"insightface:{info.face_model or 'buffalo_l'}" if part == "insightface" else part)
    if info.family == "instantid-adapter":
        needs.append("instantid-identitynet")
    return needs


def describe_need(need: str) -> str:
    """What a requirement id ("clip-vit-h", "insightface:buffalo_l", …) is, in words."""
    if need.startswith("insightface:"):
        return f"the insightface '{need.split(':', 1)[1]}' face models"
    if need == "instantid-identitynet":
        return "InstantID's IdentityNet"
    return describe_encoder(need)


def validate_for_run(
    units: Sequence[Unit],
    *,
    base: Optional[str],
    find_model: Callable[[str], Any],
    find_encoder: Callable[[str], Any],
    model_names: Any = (),
    layer_counts: Optional[Mapping[str, Iterable[int]]] = None,
    find_profile: Optional[Callable[[str], Any]] = None,
) -> List[ResolvedUnit]:
    """Check the enabled units against the model folders and the loaded checkpoint.

    ``base``: "sd15" or "sdxl" for the loaded checkpoint (None skips the check).
    ``find_model(name)``: a ``discovery.ModelEntry`` (``.name``, ``.title``, ``.info``,
    ``.error``), or None / an ``IdentityError`` when there is none.
    ``find_encoder(need)``: anything truthy when the helper named by ``required_encoders`` is
    there; None, or an ``IdentityError`` whose message says where to put it, when not.
    ``model_names``: names (or a callable giving them) offered when a name is unknown.
    ``layer_counts``: base -> accepted lengths of ``layer_weights`` (default: one weight per
    cross-attention layer, 16 for SD1.5 and 70 for SDXL).
    ``find_profile(name)``: the ``profiles.Profile`` a unit names, or a ``ProfileError`` (None:
    profiles cannot be used here).
    """
    counts = {k: tuple(v) for k, v in (layer_counts or {b: (n,) for b, n in CROSS_ATTENTION_LAYERS.items()}).items()}
    resolved = []
    for number, unit in enumerate(units, 1):
        if not unit.enabled:
            continue
        if unit._deferred_error is not None:
            raise unit._deferred_error
        if not unit.model:
            raise UnitError(number, "model", "no model selected; choose one (GET /identity/v1/models lists them)")
        entry = _find(unit.model, number, find_model, model_names)
        if getattr(entry, "info", None) is None:
            raise UnitError(number, "model", f"model '{entry.name}' cannot be used: {entry.error or 'it is not an identity model'}")
        info = entry.info
        if info.family not in ADAPTER_FAMILIES:
            what = "a CLIP vision encoder" if info.family == "clip-vision" else "InstantID's IdentityNet" if info.family == "instantid-identitynet" else info.family
            raise UnitError(
                number, "model",
                f"model '{entry.name}' is {what}, which the unit's model finds by itself; choose an IP-Adapter, FaceID, InstantID or PhotoMaker model",
            )
        if base and info.family == "instantid-adapter" and base != "sdxl":
            raise UnitError(
                number, "model",
                f"InstantID runs on SDXL checkpoints only and the loaded checkpoint is {BASE_NAMES.get(base, base)}; "
                "load an SDXL checkpoint to use it",
            )
        if info.family == "photomaker" and base and base != "sdxl":
            raise UnitError(
                number, "model",
                f"PhotoMaker works with SDXL checkpoints only, and the loaded checkpoint is {BASE_NAMES.get(base, base)}; "
                f"load an SDXL checkpoint to use '{entry.name}'",
            )
        if base and info.base and info.base != base:
            raise UnitError(
                number, "model",
                f"model '{entry.name}' is {BASE_NAMES.get(info.base, info.base)}, the loaded checkpoint is {BASE_NAMES.get(base, base)}; "
                f"choose a model made for {BASE_NAMES.get(base, base)}",
            )
        encoders = {}
        for need in required_encoders(info):
            try:
                found = find_encoder(need)
            except IdentityError as e:
                raise UnitError(number, "model", f"model '{entry.name}' needs {describe_need(need)}: {e}") from None
            if not found:
                help_text = ENCODER_HELP.get(need, "put it into the model folders")
                raise UnitError(number, "model", f"model '{entry.name}' needs {describe_need(need)}, which was not found: {help_text}")
            encoders[need] = found
        profile = None
        if unit.profile:
            profile = _profile(unit, entry, encoders, number, find_profile)
        elif not unit.images:
            raise UnitError(number, "images", "the unit is on but has no reference images; add at least one, "
                            "or choose a saved profile")
        if unit.mask is not None and info.family == "photomaker":
            raise UnitError(number, "mask", "PhotoMaker cannot be bound to a region: it changes the prompt's text "
                            "conditioning (the class word), which acts on the whole picture; remove the mask "
                            "(IP-Adapter, FaceID and InstantID units take one)")
        if unit.mask is not None and unit.mask.getextrema()[1] == 0:
            raise UnitError(number, "mask", "the region mask is all black, so the unit would change nothing; paint the region white or remove the mask")
        if unit.layer_weights is not None and info.family != "photomaker":
            allowed = counts.get(info.base, ())
            if allowed and len(unit.layer_weights) not in allowed:
                want = " or ".join(str(a) for a in allowed)
                raise UnitError(
                    number, "layer_weights",
                    f"expected {want} weights for an {BASE_NAMES.get(info.base, info.base)} model (one per cross-attention layer), got {len(unit.layer_weights)}",
                )
        changes = with_method_defaults(unit, METHOD_OF_FAMILY.get(info.family))
        if profile is not None:
            from ..profiles import use

            changes["image_weights"] = use.image_weights(profile, unit.image_weights, unit.combine)
        resolved.append(ResolvedUnit(number, dataclasses.replace(unit, model=entry.title, **changes), entry, encoders,
                                     profile))
    return resolved


def _profile(unit: Unit, entry, encoders: dict, number: int, find_profile):
    """The profile the unit names, checked against what its model needs."""
    from ..profiles import ProfileError, use

    if find_profile is None:
        raise UnitError(number, "profile", "profiles cannot be used here; send the reference images instead")
    if unit.via_controlnet:
        raise UnitError(number, "profile", "a unit run through the ControlNet extension needs its pictures (the "
                        "extension analyses them itself); send the images, or turn off via_controlnet")
    try:
        profile = find_profile(unit.profile)
        use.check(profile, entry, encoders, unit)
    except ProfileError as e:
        raise UnitError(number, "profile", str(e)) from None
    return profile


def with_method_defaults(unit: Unit, method: Optional[str]) -> dict:
    """The fields the unit left to their defaults (``Unit._unset``) whose default differs for
    ``method`` (PhotoMaker's start), with that method's default; start stays below end."""
    changes = {}
    for spec in FIELDS:
        if spec.name in unit._unset and spec.method_defaults:
            value = spec.default_for(method)
            if value != getattr(unit, spec.name):
                changes[spec.name] = value
    if changes.get("start", unit.start) >= unit.end:
        changes.pop("start", None)
    return changes


def _find(name: str, number: int, find_model, model_names):
    try:
        entry = find_model(name)
    except IdentityError:
        entry = None
    if entry is not None:
        return entry
    names = list(model_names() if callable(model_names) else model_names)
    bare = name.split(" [", 1)[0]
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(bare.lower(), list(by_lower), n=3, cutoff=0.5)]
    msg = f"unknown model '{name}'"
    if close:
        msg += "; did you mean " + ", ".join(f"'{c}'" for c in close) + "?"
    elif names:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        msg += f"; the model folders hold: {shown}"
    else:
        msg += "; no identity models were found in the model folders"
    raise UnitError(number, "model", msg + " (GET /identity/v1/models lists the names; after adding a file, press refresh)")
