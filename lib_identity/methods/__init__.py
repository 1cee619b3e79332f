"""The methods: a validated unit -> what the UNet patch session installs.

``prepare_units`` sends each unit to its method by the model's family (IP-Adapter, FaceID,
InstantID, PhotoMaker) and gathers the image prompts, LoRAs and control residuals for one
``PatchSession``, and PhotoMaker's identities for the prompt hook.

A unit with ``via_controlnet`` on is not run here: ``native_units`` leaves it out, and the
ControlNet extension runs it (``webui/controlnet_bridge.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

from ..errors import UnitError


@dataclass
class Contributions:
    """Everything the enabled units put into the UNet for one sampling pass."""

    prompts: List = field(default_factory=list)  # unet.ImagePrompt, one per unit
    loras: List = field(default_factory=list)  # unet.lora.AttentionLoRA, from FaceID and PhotoMaker files
    controls: List = field(default_factory=list)  # unet.control.Control, InstantID's IdentityNet
    prompt_identities: List = field(default_factory=list)  # conditioning.PromptIdentity, one per PhotoMaker unit
    # unit number -> region(width, height) a unit made itself (InstantID's face of a group pose picture),
    # for the likeness to measure the face there
    regions: Dict[int, Callable] = field(default_factory=dict)


def runs_through_controlnet(unit) -> bool:
    """Whether the ControlNet extension runs this unit instead of the native path (InstantID's
    ``via_controlnet``): the one place that decides it."""
    return bool(getattr(unit, "via_controlnet", False))


def native_units(resolved: Sequence) -> List:
    """The units the native path runs: every one but those the ControlNet extension takes over."""
    return [r for r in resolved if not runs_through_controlnet(r.unit)]


def prepare_units(resolved: Sequence, *, device, dtype, unet=None) -> Contributions:
    """The contributions of validated units (``units.ResolvedUnit``) for a UNet on ``device``/``dtype``.

    ``unet``: the loaded UNet; InstantID builds IdentityNet from its classes. Units that run
    through the ControlNet extension are left out (``native_units``).
    """
    from . import faceid, instantid, ip_adapter, photomaker
    from .pose_faces import pose_shares

    out = Contributions()
    shares = pose_shares(resolved, instantid.FAMILY)  # every InstantID unit counts, natively run or not
    for r in native_units(resolved):
        family = r.model.info.family
        if family == "ip-adapter":
            out.prompts.append(ip_adapter.prepare(r, device=device, dtype=dtype))
        elif family == faceid.FAMILY:
            c = faceid.prepare(r, device=device, dtype=dtype)
            out.prompts.append(c.prompt)
            if c.lora is not None:
                out.loras.append(c.lora)
        elif family == instantid.FAMILY:
            c = instantid.prepare(r, device=device, dtype=dtype, unet=unet, pose_share=shares.get(r.number, (0, 1)))
            out.prompts.append(c.prompt)
            if c.control is not None:
                out.controls.append(c.control)
            if c.region is not None:
                out.regions[r.number] = c.region
        elif family == photomaker.FAMILY:
            pm = photomaker.prepare(r, device=device, dtype=dtype)
            out.prompt_identities.append(pm.identity)
            if pm.lora is not None:
                out.loras.append(pm.lora)
        else:
            raise UnitError(r.number, "model", f"model '{r.model.name}' is {family}, which this version cannot run; "
                            "choose an IP-Adapter, IP-Adapter FaceID, InstantID or PhotoMaker model")
    return out


def release() -> None:
    """Forget loaded adapters, IdentityNets and PhotoMaker models (script unload)."""
    from . import instantid, ip_adapter, photomaker

    ip_adapter.release()
    instantid.release()
    photomaker.release()
