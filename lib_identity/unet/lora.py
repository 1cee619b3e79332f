"""A LoRA on the UNet's attention projections for one sampling pass, as forward hooks.

FaceID files carry a LoRA for the ``to_q``/``to_k``/``to_v``/``to_out`` projections of every
attention of the UNet, self-attention (``attn1``) and cross-attention (``attn2``) alike. The
official processors (tencent-ailab/IP-Adapter ``attention_processor_faceid.py``) compute

    out = W·x + lora_weight · up(down(x))

with no alpha and no 1/rank. Here that delta is added by a forward hook on each projection's
``Linear``, never merged into its weight:

* the WebUI's own LoRA support (which changes those weights, or wraps ``Linear.forward``) stays
  in force underneath, and the delta is added to whatever it produced;
* the UNet's weights stay bit-identical and no second copy of them is made;
* removal is by the hooks' own handles, like the image-prompt hooks of the same session.

Numbering (``formats.md`` §2): processor ``n = 2m`` is the ``attn1`` and ``n = 2m + 1`` the
``attn2`` of the transformer block whose cross-attention has ordinal ``m`` (diffusers'
``attn_processors`` order: down, up, mid). A LoRA may instead name its attentions by diffusers'
processor names (PhotoMaker's ``lora_weights``: ``down_blocks.1.attentions.0.transformer_blocks.0
.attn1.processor``); they are matched against the names the UNet's own layout gives (``layers``),
so no position in a list is assumed. The ``to_q`` hook is put *first* among that module's
forward hooks, so the image branch, which keeps ``to_q``'s output as its queries, sees the
adapted queries, as the official ``LoRAIPAttnProcessor`` does; the ``to_out`` hook sees the
input after the image branch was added (a forward pre-hook), again as officially.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..errors import PatchError
from .layers import CrossAttentionLayer

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


@dataclass
class AttentionLoRA:
    """One unit's LoRA on the attention projections.

    * ``layers``: ``{n: {"to_q" | "to_k" | "to_v" | "to_out": (down [rank, in], up [out, rank])}}``
      by attention-processor number ``n`` or diffusers processor name (see the module
      docstring), or an object with such a ``layers`` attribute (``lib_identity.models.FaceIDLoRA``,
      ``ProcessorLoRA``). A processor or projection left out is not changed.
    * ``weight``: ``lora_weight``, the multiplier of ``up(down(x))``; 0 leaves the UNet as it is.
    * ``name``: how errors refer to the unit.
    * ``complete``: the LoRA must cover every attention of the UNet (PhotoMaker's does); an
      attention it lacks means the file is incomplete or made for another UNet.

    The LoRA acts for the whole pass: the official FaceID pipelines have it on at every step.
    """

    layers: Any
    weight: float = 1.0
    name: str = "unit"
    complete: bool = False


@dataclass(eq=False)
class AttentionModule:
    """One attention of the UNet, its processor number in the official order and its diffusers processor name."""

    number: int
    name: str
    module: torch.nn.Module = field(repr=False)
    diffusers_name: str = ""

    def projection(self, proj: str) -> torch.nn.Module:
        """The ``Linear`` of ``to_q``/``to_k``/``to_v``/``to_out`` (``to_out`` is ``to_out[0]`` in ldm/sgm)."""
        module = getattr(self.module, proj, None)
        if isinstance(module, torch.nn.Sequential):
            module = module[0]
        return module


def attention_modules(unet: torch.nn.Module, layers: Sequence[CrossAttentionLayer]) -> List[AttentionModule]:
    """Every ``attn1``/``attn2`` beside the cross-attentions ``layers``, numbered 2m / 2m + 1."""
    found: List[AttentionModule] = []
    for layer in layers:
        self_name = layer.name[: -len("attn2")] + "attn1"
        try:
            self_attn = unet.get_submodule(self_name)
        except AttributeError:
            raise PatchError(f"{layer.name} has no self-attention beside it ({self_name}); "
                             "this UNet does not have the layout the LoRA was made for") from None
        processor = layer.diffusers_name
        self_processor = processor[: -len("attn2.processor")] + "attn1.processor" if processor.endswith("attn2.processor") else ""
        found.append(AttentionModule(2 * layer.ordinal, self_name, self_attn, self_processor))
        found.append(AttentionModule(2 * layer.ordinal + 1, layer.name, layer.module, processor))
    return found


class _Delta:
    """``lora_weight · up(down(x))`` for one ``Linear``, with its matrices cached per device and dtype."""

    __slots__ = ("down", "up", "weight", "_cache")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, weight: float):
        self.down, self.up, self.weight = down.detach(), up.detach(), float(weight)
        self._cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, device, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        key = (device, dtype)
        found = self._cache.get(key)
        if found is None:
            # the weight is folded into `up` once, so each call costs two small matmuls
            up = (self.up.to(device=device, dtype=torch.float32) * self.weight).to(dtype)
            found = (self.down.to(device=device, dtype=dtype), up)
            self._cache[key] = found
        return found

    def __call__(self, module, args, output):
        if not args or not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        down, up = self.matrices(x.device, x.dtype)
        delta = F.linear(F.linear(x, down), up)
        return output + delta.to(output.dtype)

    def release(self) -> None:
        self._cache.clear()


def _order(key) -> tuple:
    """Numbers first, in numeric order, then processor names (the order only makes errors repeatable)."""
    return (0, int(key), "") if _is_number(key) else (1, 0, str(key))


def _is_number(key) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _find_module(key, modules: Sequence[AttentionModule]) -> Optional[AttentionModule]:
    """The attention a LoRA key names: a processor number, or a diffusers processor name (".processor" optional)."""
    if _is_number(key):
        return next((m for m in modules if m.number == int(key)), None)
    name = str(key)
    name = name if name.endswith(".processor") else name + ".processor"
    return next((m for m in modules if m.diffusers_name == name), None)


class PreparedLoRA:
    """An ``AttentionLoRA`` checked against the UNet: one ``_Delta`` per ``Linear`` it changes."""

    def __init__(self, lora: AttentionLoRA, modules: Sequence[AttentionModule]):
        self.name = lora.name
        self.weight = float(lora.weight)
        layers = getattr(lora.layers, "layers", lora.layers)
        if not isinstance(layers, dict):
            raise PatchError(f"{self.name}: the LoRA must map processor numbers or names to projections, got {type(layers).__name__}")
        self.deltas: List[Tuple[str, torch.nn.Module, _Delta]] = []
        covered = set()
        for n in sorted(layers, key=_order):
            target = _find_module(n, modules)
            if target is None:
                raise PatchError(
                    f"{self.name}: the LoRA has attention layer {n}, the loaded UNet has {len(modules)} "
                    "(a LoRA for SD1.5 needs an SD1.5 checkpoint, one for SDXL an SDXL checkpoint)"
                )
            for proj, pair in layers[n].items():
                if proj not in PROJECTIONS:
                    raise PatchError(f"{self.name}: LoRA projection '{proj}' of layer {n} is none of {', '.join(PROJECTIONS)}")
                linear = target.projection(proj)
                if not isinstance(linear, torch.nn.Linear):
                    raise PatchError(f"{self.name}: {target.name}.{proj} is not a Linear layer; the LoRA cannot act on it")
                down, up = pair
                want_down = [down.shape[0], linear.in_features]
                want_up = [linear.out_features, down.shape[0]]
                if down.dim() != 2 or up.dim() != 2 or list(down.shape) != want_down or list(up.shape) != want_up:
                    raise PatchError(
                        f"{self.name}: LoRA {n}.{proj} has down {list(down.shape)} / up {list(up.shape)}, the UNet's "
                        f"{target.name}.{proj} needs down {want_down} / up {want_up}; the file is for another base model"
                    )
                self.deltas.append((f"{target.name}.{proj}", linear, _Delta(down, up, self.weight)))
            covered.add(target.number)
        left = [m for m in modules if m.number not in covered]
        if getattr(lora, "complete", False) and left:
            raise PatchError(
                f"{self.name}: the LoRA covers {len(covered)} of the loaded UNet's {len(modules)} attention layers "
                f"(none for {left[0].name}); the file is incomplete or made for another base model"
            )
        self.handles: List[Any] = []

    def install(self) -> None:
        """Hook every projection (``prepend``: before the image branch's ``to_q`` hook)."""
        if self.weight == 0.0:
            return
        for _, linear, delta in self.deltas:
            self.handles.append(linear.register_forward_hook(delta, prepend=True))

    def remove(self) -> None:
        """Remove the hooks (a no-op for one already gone) and drop the device copies."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for _, _, delta in self.deltas:
            delta.release()


def prepare_loras(unet: torch.nn.Module, layers: Sequence[CrossAttentionLayer],
                  loras: Sequence[AttentionLoRA]) -> List[PreparedLoRA]:
    """Check every LoRA against the UNet before anything is installed (``PatchError`` on a mismatch)."""
    if not loras:
        return []
    modules = attention_modules(unet, layers)
    return [PreparedLoRA(lora, modules) for lora in loras]


def lora_of(layers_or_model: Optional[Any], weight: float, name: str) -> Optional[AttentionLoRA]:
    """An ``AttentionLoRA`` from what ``models.load_adapter`` read (``ip_layers.lora``), or ``None``."""
    lora = getattr(layers_or_model, "lora", layers_or_model)
    if lora is None:
        return None
    return AttentionLoRA(layers=lora, weight=weight, name=name)
