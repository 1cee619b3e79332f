"""Control residuals (ControlNet, InstantID's IdentityNet) inside the loaded UNet, by module hooks.

The ControlNet principle: a control module reads the UNet's own input (``x``, timesteps,
``y``) with its own cross-attention context and a hint image, and returns one residual per
skip connection (``input_blocks`` order) and one for the middle block. The UNet adds them:

* the middle residual to ``middle_block``'s output (a forward hook);
* skip residual ``i`` to the skip half of the input of the output block that pops it: ldm/sgm
  call ``output_blocks[j](cat([h, hs.pop()]))``, so with ``n`` input blocks ``output_blocks[j]``
  receives skip ``n - 1 - j`` in its last channels (a forward pre-hook).

A forward pre-hook on the UNet captures each call's ``x``, timesteps, ``context`` and ``y`` and
runs the controls once per call. ``UNetModel.forward`` is never replaced, so the ControlNet
extension (which replaces it on the instance) can run its own units in the same generation:
its body still calls ``middle_block`` and ``output_blocks[j]`` as modules. Every add is out of
place; removal by the hooks' handles leaves the UNet exactly as it was.

Per control and call: cond rows get ``cond_context``, uncond rows ``uncond_context`` (the rows
come from the session's ``CondRows``); the hint is made at the call's pixel size (8× the latent)
and remade when the size changes (hires fix); outside the step window or at weight 0 the control
does not run; the region mask is resized to each residual's map.

The control module moves to the device of the UNet's input when it is elsewhere (``--lowvram``
/ ``--medvram`` keep it on the CPU between passes) and back when the session ends.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from ..errors import PatchError
from .masks import LATENT_SCALE, region_mask

log = logging.getLogger(__name__)

# hint: a ready [1 or B, 3, H, W] tensor in 0..1, or a maker (width, height) -> such a tensor / an HxWx3 uint8 array
Hint = Union[torch.Tensor, Callable[[int, int], Any]]


@dataclass
class Control:
    """One control for a ``PatchSession(unet, prompts, controls=[...])``.

    * ``module``: ``forward(x, hint, timesteps, context, y) -> [skip_0 … skip_{n-1}, middle]``
      (InstantID's ``IdentityNet``: 9 skips and the middle for SDXL).
    * ``hint``: a ``[1 or B, 3, H, W]`` tensor in 0..1 (resized bilinearly when a pass has another
      size) or ``hint(width, height)`` returning one, or an ``H×W×3`` uint8 RGB array, drawn for
      that pixel size (InstantID redraws its keypoints).
    * ``cond_context`` / ``uncond_context``: ``[T, C]`` or ``[1, T, C]``, the control's
      cross-attention context on cond rows and on uncond rows.
    * ``weight``: scales every residual (the official ``controlnet_conditioning_scale``).
    * ``start`` / ``end``: the step window as the official pipelines' ``control_guidance_start``
      / ``_end``: step ``i`` of ``n`` runs when ``i/n >= start`` and ``(i+1)/n <= end``.
    * ``mask``: ``[H, W]`` in 0..1 restricting the residuals to a region, or a maker
      ``mask(width, height) -> [height, width]`` drawn for each pass's frame, or ``None``.
    """

    module: torch.nn.Module
    hint: Hint
    cond_context: torch.Tensor
    uncond_context: Optional[torch.Tensor] = None
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mask: Any = None
    name: str = "unit"


def _context(t: torch.Tensor, what: str, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise PatchError(f"{name}: the control's {what} must be a torch tensor, got {type(t).__name__}")
    t = t.detach()
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[0] != 1:
        raise PatchError(f"{name}: the control's {what} must be [tokens, channels], got {list(t.shape)}")
    return t


class PreparedControl:
    """A ``Control`` checked, with its hints and contexts cached per size, device and dtype."""

    def __init__(self, control: Control):
        name = control.name
        self.name = name
        self.module = control.module
        if not callable(getattr(control.module, "forward", None)):
            raise PatchError(f"{name}: the control module has no forward")
        self.weight = float(control.weight)
        self.start, self.end = float(control.start), float(control.end)
        if not (0.0 <= self.start <= 1.0 and 0.0 <= self.end <= 1.0 and self.start <= self.end):
            raise PatchError(f"{name}: control start {self.start:g} and end {self.end:g} must satisfy 0 <= start <= end <= 1")
        cond = _context(control.cond_context, "cond context", name)
        uncond = cond.new_zeros(cond.shape) if control.uncond_context is None else \
            _context(control.uncond_context, "uncond context", name)
        if uncond.shape != cond.shape:
            raise PatchError(f"{name}: uncond context {list(uncond.shape)} does not match cond context {list(cond.shape)}")
        self.contexts = torch.cat([cond, uncond])  # row 0 cond, row 1 uncond
        self.hint = control.hint
        self.mask = region_mask(control.mask, name)
        self._hints: Dict[tuple, torch.Tensor] = {}
        self._rows: Dict[tuple, torch.Tensor] = {}
        self.home: Optional[torch.device] = None  # where the module was before a pass moved it

    def active(self, progress: Optional[float], total_steps: Optional[int]) -> bool:
        """The official window: step ``i`` of ``n`` runs when ``i/n >= start`` and ``(i+1)/n <= end``."""
        if self.weight == 0.0:
            return False
        if progress is None:
            return True
        eps = 1e-6
        if progress < self.start - eps:
            return False
        if total_steps:
            return progress + 1.0 / total_steps <= self.end + eps
        return progress < self.end or (self.end >= 1.0 and progress <= 1.0)

    def hint_for(self, width: int, height: int, batch: int, device, dtype) -> torch.Tensor:
        """The hint at ``width × height`` pixels, ``[batch, 3, height, width]``."""
        key = (width, height, device, dtype)
        found = self._hints.get(key)
        if found is None:
            found = self._make_hint(width, height).to(device=device, dtype=dtype)
            self._hints[key] = found
        if found.shape[0] == batch:
            return found
        if found.shape[0] == 1:
            return found.expand(batch, -1, -1, -1)
        raise PatchError(f"{self.name}: the hint has {found.shape[0]} images for a UNet call of {batch} rows")

    def _make_hint(self, width: int, height: int) -> torch.Tensor:
        hint = self.hint(width, height) if callable(self.hint) and not isinstance(self.hint, torch.Tensor) else self.hint
        if not isinstance(hint, torch.Tensor):
            import numpy as np

            arr = np.asarray(hint)
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise PatchError(f"{self.name}: the hint must be an H×W×3 RGB image, got shape {list(arr.shape)}")
            hint = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None].float() / 255.0
        hint = hint.detach().float()
        if hint.dim() == 3:
            hint = hint[None]
        if hint.dim() != 4 or hint.shape[1] != 3:
            raise PatchError(f"{self.name}: the hint must be [images, 3, height, width], got {list(hint.shape)}")
        if tuple(hint.shape[-2:]) != (height, width):
            hint = torch.nn.functional.interpolate(hint, size=(height, width), mode="bilinear", align_corners=False)
        return hint.cpu()

    def row_contexts(self, n_rows: int, n_cond: int, device, dtype) -> torch.Tensor:
        """``[n_rows, T, C]``: the cond context on the first ``n_cond`` rows, the uncond one after."""
        key = (n_rows, n_cond, device, dtype)
        found = self._rows.get(key)
        if found is None:
            ctx = self.contexts.to(device=device, dtype=dtype)
            index = torch.tensor([0] * n_cond + [1] * (n_rows - n_cond), device=ctx.device)
            found = ctx.index_select(0, index)
            self._rows[key] = found
        return found

    def latent_input(self, x: torch.Tensor) -> torch.Tensor:
        """The noisy latent the control reads: an inpainting UNet's ``x`` also carries the mask and the
        masked picture (9 channels); a control made for 4 (``in_channels``) reads the first 4."""
        channels = getattr(self.module, "in_channels", None)
        if channels is None:  # a ControlNet's first convolution reads the latent
            first = getattr(self.module, "input_blocks", None)
            conv = next((m for m in first.modules() if isinstance(m, torch.nn.Conv2d)), None) if first is not None else None
            channels = conv.in_channels if conv is not None else None
        if isinstance(channels, int) and 0 < channels < x.shape[1]:
            return x[:, :channels]
        return x

    def bring_to(self, device) -> None:
        """Move the module to the device the UNet computes on (``--lowvram``/``--medvram``)."""
        first = next(self.module.parameters(), None)
        if first is None or first.device == device:
            return
        if self.home is None:
            self.home = first.device
        self.module.to(device)

    def release(self) -> None:
        """Back where it was kept before the pass; drop every cached tensor."""
        if self.home is not None:
            self.module.to(self.home)
            self.home = None
        self._hints.clear()
        self._rows.clear()


def _timesteps_context_y(args, kwargs):
    names = ("x", "timesteps", "context", "y")
    got = dict(zip(names, args))
    for n in names:
        if n in kwargs:
            got[n] = kwargs[n]
    return got.get("x"), got.get("timesteps"), got.get("context"), got.get("y")


class ControlHooks:
    """The hooks of every control on one UNet for one session (see the module docstring)."""

    def __init__(self, session, unet: torch.nn.Module, controls: Sequence[Control]):
        self.session = session
        self.unet = unet
        for attr in ("input_blocks", "middle_block", "output_blocks"):
            if not hasattr(unet, attr):
                raise PatchError(f"the loaded UNet has no {attr}; control residuals need an ldm/sgm UNetModel")
        self.controls: List[PreparedControl] = [PreparedControl(c) for c in controls]
        self.n_skips = len(unet.input_blocks)
        self.handles = []
        self._skips: Dict[int, torch.Tensor] = {}
        self._middle: Optional[torch.Tensor] = None
        self.warned = set()

    def install(self) -> None:
        unet = self.unet
        self.handles.append(unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True))
        self.handles.append(unet.register_forward_hook(self._on_unet_done))
        self.handles.append(unet.middle_block.register_forward_hook(self._add_middle))
        for j, block in enumerate(unet.output_blocks):
            self.handles.append(block.register_forward_pre_hook(self._skip_adder(self.n_skips - 1 - j)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._clear()
        for c in self.controls:
            c.release()

    def _clear(self) -> None:
        self._skips = {}
        self._middle = None

    # ------------------------------------------------------------------ per call

    def _on_unet_call(self, module, args, kwargs):
        self._clear()
        x, timesteps, _, y = _timesteps_context_y(args, kwargs)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            return None
        session = self.session
        active = [c for c in self.controls if c.active(session.progress, session.total_steps)]
        if not active:
            return None
        batch = int(x.shape[0])
        n_cond = session.rows.cond_count(batch)
        height, width = int(x.shape[-2]) * LATENT_SCALE, int(x.shape[-1]) * LATENT_SCALE
        if timesteps is not None and isinstance(timesteps, torch.Tensor) and timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        skips: List[Optional[torch.Tensor]] = [None] * self.n_skips
        middle = None
        with torch.no_grad():
            for c in active:
                c.bring_to(x.device)
                hint = c.hint_for(width, height, batch, x.device, x.dtype)
                context = c.row_contexts(batch, n_cond, x.device, x.dtype)
                out = list(c.module(c.latent_input(x), hint, timesteps, context, y))
                if len(out) != self.n_skips + 1:
                    raise PatchError(f"{c.name}: the control gave {len(out)} residuals, the UNet takes "
                                     f"{self.n_skips + 1} ({self.n_skips} skips and the middle); it is for another base model")
                for i, r in enumerate(out):
                    r = r * c.weight
                    if c.mask is not None:
                        r = r * c.mask.for_map(r.shape[-2], r.shape[-1], r.device, r.dtype, (width, height))
                    if i < self.n_skips:
                        skips[i] = r if skips[i] is None else skips[i] + r
                    else:
                        middle = r if middle is None else middle + r
        self._skips = {i: r for i, r in enumerate(skips) if r is not None}
        self._middle = middle
        return None

    def _on_unet_done(self, module, args, output):
        self._clear()
        return None

    def _add_middle(self, module, args, output):
        r = self._middle
        if r is None or not isinstance(output, torch.Tensor):
            return None
        if output.shape != r.shape:
            return self._skip("middle_block", output, r)
        return output + r.to(output.dtype)

    def _skip_adder(self, index: int):
        def add_skip(module, args):
            r = self._skips.get(index)
            if r is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            h = args[0]
            c = r.shape[1]
            if h.dim() != 4 or h.shape[0] != r.shape[0] or h.shape[-2:] != r.shape[-2:] or h.shape[1] <= c:
                return self._skip(f"output_blocks[{self.n_skips - 1 - index}]", h, r)
            # cat([h, skip]): the skip is the last c channels
            joined = torch.cat([h[:, :-c], h[:, -c:] + r.to(h.dtype)], dim=1)
            return (joined,) + tuple(args[1:])
        return add_skip

    def _skip(self, where: str, got: torch.Tensor, residual: torch.Tensor):
        """A map this control does not fit: leave it alone, say so once per place."""
        if where not in self.warned:
            self.warned.add(where)
            log.warning("identity: %s: map %s does not fit the control residual %s; residual skipped there",
                        where, tuple(got.shape), tuple(residual.shape))
        return None

