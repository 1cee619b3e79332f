"""The methods: a validated unit -> what the UNet patch session installs.

``prepare_units`` sends each unit to its method by the model's family (IP-Adapter, FaceID) and
gathers the image prompts and LoRAs for one ``PatchSession``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Sequence

from ..errors import UnitError


@dataclass
class Contributions:
    """Everything the enabled units put into the UNet for one sampling pass."""

    prompts: List = field(default_factory=list)  # unet.ImagePrompt, one per unit
    loras: List = field(default_factory=list)  # unet.lora.AttentionLoRA, from FaceID files
    prompt_identities: List = field(default_factory=list)  # conditioning.PromptIdentity, one per PhotoMaker unit


def prepare_units(resolved: Sequence, *, device, dtype) -> Contributions:
    """The contributions of validated units (``units.ResolvedUnit``) for a UNet on ``device``/``dtype``."""
    from . import faceid, ip_adapter

    out = Contributions()
    for r in resolved:
        family = r.model.info.family
        if family == "ip-adapter":
            out.prompts.append(ip_adapter.prepare(r, device=device, dtype=dtype))
        elif family == faceid.FAMILY:
            c = faceid.prepare(r, device=device, dtype=dtype)
            out.prompts.append(c.prompt)
            if c.lora is not None:
                out.loras.append(c.lora)
        else:
            raise UnitError(r.number, "model", f"model '{r.model.name}' is {family}, which this version cannot run yet; "
                            "choose an IP-Adapter or IP-Adapter FaceID model (InstantID and PhotoMaker are coming)")
    return out


def release() -> None:
    """Forget loaded adapters (script unload)."""
    from . import ip_adapter

    ip_adapter.release()
