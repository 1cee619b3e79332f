"""The patch session: image prompts inside the loaded UNet for one sampling pass.

For every cross-attention (``attn2``) that some unit weights above zero, the session adds

    out = attention(q, K_text, V_text) + Σ_units  w · mask · attention(q, K_img, V_img)

before ``to_out``, with two hooks and nothing else:

* a forward hook on ``attn2.to_q`` keeps the queries the text branch just computed, so they
  are not computed twice;
* a forward pre-hook on ``attn2.to_out[0]`` receives the text branch's output and adds the
  image branch (torch SDPA with the cached image keys/values).

The text branch is whatever ``attn2.forward`` is installed: the WebUI's class-level attention
optimisation, sd-webui-controlnet's per-instance replacement, sgm's forward with
``additional_tokens``. It is called by its usual caller with all its arguments; the session
never replaces a ``forward``. Hooks are removed by their own handles, so removal touches only
what the session added, whatever others re-assigned in the meantime, and afterwards the UNet
computes exactly what it did before.

A unit may also bring a LoRA on the attention projections (FaceID files carry one):
``PatchSession(unet, prompts, loras=[AttentionLoRA(...)])``. Its forward hooks (``lora.py``) are
installed and removed with the others, by their handles, in the same ``install``/``remove``.

Control residuals (InstantID's IdentityNet, ``control.py``) come the same way:
``PatchSession(unet, prompts, controls=[Control(...)])`` adds hooks on the UNet, its
``middle_block`` and its ``output_blocks``, installed and removed with the others.

A forward pre-hook on the UNet itself records each call's batch (for ``CondRows``) and latent
size (for masks). Callers that run the UNet through something else can pass
``track_calls=False`` and call ``begin_call(x)`` themselves.

Per denoiser step the caller reports ``begin_step(n_cond, progress)`` (the WebUI glue:
``on_cfg_denoiser`` with ``params.text_cond.shape[0]`` and ``denoiser.step / total_steps``, and
``total_steps`` for the controls' official step window).

Sessions register themselves by owner. ``install()`` first removes every session of the same
owner still installed (one left over by a run that raised or was interrupted);
``remove_sessions()`` does that on demand (script unload, model reload).
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .control import Control, ControlHooks
from .image_prompt import ImagePrompt, PreparedPrompt
from .layers import CrossAttentionLayer, find_cross_attentions
from .lora import AttentionLoRA, PreparedLoRA, prepare_loras
from .rows import CondRows

log = logging.getLogger(__name__)

DEFAULT_OWNER = "lib_identity"

# owner -> sessions still installed
_LIVE: Dict[str, List["PatchSession"]] = {}


def live_sessions(owner: Optional[str] = None) -> List["PatchSession"]:
    """Installed sessions, of one owner or of all."""
    if owner is not None:
        return list(_LIVE.get(owner, ()))
    return [s for sessions in _LIVE.values() for s in sessions]


def remove_sessions(owner: Optional[str] = DEFAULT_OWNER) -> int:
    """Remove every installed session of ``owner`` (``None``: of every owner); returns how many."""
    sessions = live_sessions(owner)
    for session in sessions:
        session.remove()
    return len(sessions)


class _LayerPatch:
    """The two hooks of one ``attn2`` and the units that act on it."""

    __slots__ = ("session", "layer", "entries", "q", "handles", "warned")

    def __init__(self, session: "PatchSession", layer: CrossAttentionLayer, entries):
        self.session = session
        self.layer = layer
        self.entries = entries  # [(PreparedPrompt, weight)], weight != 0
        self.q = None
        self.handles = []
        self.warned = False

    def install(self) -> None:
        attn = self.layer.module
        out_linear = attn.to_out[0] if isinstance(attn.to_out, torch.nn.Sequential) else attn.to_out
        self.handles.append(attn.to_q.register_forward_hook(self._keep_queries))
        self.handles.append(out_linear.register_forward_pre_hook(self._add_image_branch))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()  # a no-op if someone already cleared the hook dict
        self.handles.clear()
        self.q = None

    def _keep_queries(self, module, args, output):
        self.q = output

    def _add_image_branch(self, module, args):
        q, self.q = self.q, None
        session = self.session
        progress = session.progress
        active = [(p, w) for p, w in self.entries if p.active(progress)]
        if not active or q is None or not args:
            return None
        hidden = args[0]
        if hidden.dim() != 3 or q.dim() != 3:
            return self._skip(q, hidden)
        batch, n_tokens, inner = hidden.shape
        if q.shape[0] != batch or q.shape[-1] != inner or q.shape[1] < n_tokens:
            return self._skip(q, hidden)
        if q.shape[1] != n_tokens:
            q = q[:, -n_tokens:]  # sgm's additional_tokens lead the queries and are cut from the output
        heads = self.layer.heads
        qh = q.reshape(batch, n_tokens, heads, inner // heads).transpose(1, 2)
        n_cond = session.rows.cond_count(batch)
        ordinal = self.layer.ordinal
        result = None
        for prompt, weight in active:
            k, v = prompt.rows_key_value(ordinal, batch, n_cond, q.device, q.dtype)
            image = F.scaled_dot_product_attention(qh, k, v)
            image = image.transpose(1, 2).reshape(batch, n_tokens, inner)
            if image.dtype != hidden.dtype:
                image = image.to(hidden.dtype)
            if prompt.mask is not None:
                image = image * prompt.mask.for_tokens(n_tokens, session.latent_hw, image.device, image.dtype)
            if result is None:
                result = torch.add(hidden, image, alpha=weight)
            else:
                result.add_(image, alpha=weight)
        return (result,) + tuple(args[1:])

    def _skip(self, q, hidden):
        """An attention forward this patch does not understand: leave that layer alone, say so once."""
        if not self.warned:
            self.warned = True
            log.warning("identity: %s: attention shapes q %s / out %s not understood; image prompt skipped there",
                        self.layer.name, tuple(q.shape), tuple(hidden.shape))
        return None


class PatchSession:
    """Image prompts applied to one UNet until ``remove()``; see the module docstring.

    ``unet`` is the ldm/sgm UNetModel (A1111: ``shared.sd_model.model.diffusion_model``),
    ``prompts`` the units' ``ImagePrompt``s, ``loras`` their ``AttentionLoRA``s (FaceID),
    ``controls`` their ``Control``s (InstantID's IdentityNet). Use it
    as a context manager, or call ``install()`` and ``remove()``. Everything a unit got wrong
    raises ``PatchError`` from ``install()``, before the UNet is touched.
    """

    def __init__(self, unet: torch.nn.Module, prompts: Sequence[ImagePrompt], *,
                 owner: str = DEFAULT_OWNER, track_calls: bool = True, loras: Sequence[AttentionLoRA] = (),
                 controls: Sequence[Control] = ()):
        self.unet = unet
        self.prompts = list(prompts)
        self.loras = [lora for lora in loras if lora is not None]
        self.controls = [c for c in controls if c is not None]
        self.owner = owner
        self.track_calls = track_calls
        self.rows = CondRows()
        self.progress: Optional[float] = None
        self.total_steps: Optional[int] = None
        self.latent_hw = None
        self.layers: List[CrossAttentionLayer] = []
        self.prepared: List[PreparedPrompt] = []
        self._patches: List[_LayerPatch] = []
        self._loras: List[PreparedLoRA] = []
        self._unet_handle = None
        self._control_hooks: Optional[ControlHooks] = None
        self._installed = False

    # ----------------------------------------------------------------- lifecycle

    @property
    def installed(self) -> bool:
        return self._installed

    def install(self) -> "PatchSession":
        """Remove leftovers of this owner, check the prompts, install the hooks. Idempotent."""
        if self._installed:
            return self
        remove_sessions(self.owner)
        layers = find_cross_attentions(self.unet)
        prepared = [PreparedPrompt(p, layers) for p in self.prompts]
        loras = prepare_loras(self.unet, layers, self.loras)
        control_hooks = ControlHooks(self, self.unet, self.controls) if self.controls else None
        self.layers, self.prepared = layers, prepared
        try:
            for lora in loras:
                self._loras.append(lora)
                lora.install()
            for layer in layers:
                entries = [(p, p.layer_weight(layer.ordinal)) for p in prepared]
                entries = [(p, w) for p, w in entries if w != 0.0]
                if entries:
                    patch = _LayerPatch(self, layer, entries)
                    patch.install()
                    self._patches.append(patch)
            if self.track_calls:
                self._unet_handle = self.unet.register_forward_pre_hook(self._on_unet_call, with_kwargs=True)
            if control_hooks is not None:  # after the call tracking: the controls read its cond rows
                self._control_hooks = control_hooks
                control_hooks.install()
        except Exception:
            self._remove_hooks()
            raise
        self._installed = True
        _LIVE.setdefault(self.owner, []).append(self)
        return self

    def remove(self) -> None:
        """Remove everything this session installed; safe to call more than once."""
        self._remove_hooks()
        sessions = _LIVE.get(self.owner)
        if sessions and self in sessions:
            sessions.remove(self)
            if not sessions:
                del _LIVE[self.owner]
        for p in self.prepared:
            p.release()
        self._installed = False

    def _remove_hooks(self) -> None:
        for patch in self._patches:
            patch.remove()
        self._patches.clear()
        for lora in self._loras:
            lora.remove()
        self._loras.clear()
        if self._unet_handle is not None:
            self._unet_handle.remove()
            self._unet_handle = None
        if self._control_hooks is not None:
            self._control_hooks.remove()
            self._control_hooks = None

    def __enter__(self) -> "PatchSession":
        return self.install()

    def __exit__(self, *exc) -> bool:
        self.remove()
        return False

    # ----------------------------------------------------------------- per step / per call

    def begin_step(self, n_cond: Optional[int] = None, progress: Optional[float] = None,
                   n_rows: Optional[int] = None, total_steps: Optional[int] = None) -> None:
        """A denoiser step: ``n_cond`` leading cond rows (of ``n_rows``), at ``progress`` in 0..1
        (step ``i`` of ``total_steps``: ``i / total_steps``).

        ``None`` for ``n_cond``: every row is a cond row; for ``progress``: every unit is active.
        ``total_steps`` lets controls apply the official window (``(i+1)/n <= end``).
        """
        self.rows.begin_step(n_cond, n_rows)
        self.progress = progress
        self.total_steps = total_steps

    def begin_call(self, x: torch.Tensor) -> int:
        """A UNet call on ``x [B, C, H, W]``: done by the session's own pre-hook unless
        ``track_calls=False``. Returns the call's leading cond rows."""
        self.latent_hw = (int(x.shape[-2]), int(x.shape[-1]))
        return self.rows.begin_call(int(x.shape[0]))

    def _on_unet_call(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            self.begin_call(x)
        return None

    @property
    def patched_layers(self) -> List[CrossAttentionLayer]:
        """The layers that carry hooks (some unit weights them above zero)."""
        return [p.layer for p in self._patches]
