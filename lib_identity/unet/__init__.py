"""IP-Adapter inside the WebUI's own (ldm/sgm) UNet.

Public API (see README, "Using the UNet patch from Python"):

* ``ImagePrompt``: one unit's prepared input (image tokens, adapter layers, weight, window,
  layer weights, mask, reference combination).
* ``PatchSession(unet, prompts)``: installs them for one sampling pass; ``begin_step`` per
  denoiser step; removes them on ``remove()`` / leaving the ``with`` block.
* ``AttentionLoRA``: a unit's LoRA on the attention projections (FaceID), for
  ``PatchSession(unet, prompts, loras=[...])``; added by hooks, never merged into the weights.
* ``Control``: a unit's control residuals (InstantID's IdentityNet), for
  ``PatchSession(unet, prompts, controls=[...])``; added by module hooks on the UNet, its
  middle block and output blocks, never by replacing ``forward``.
* ``remove_sessions(owner)``: removes sessions left installed by a run that raised.
* ``find_cross_attentions(unet)``: the cross-attention layers in official adapter order.
* ``PRESETS``, ``COMBINE_MODES``: the accepted layer-weight presets and combine modes.

Nothing here imports ``ldm``, ``sgm`` or the WebUI.
"""

from .control import Control
from .image_prompt import ImagePrompt
from .layer_weights import PRESETS, resolve_layer_weights
from .layers import CrossAttentionLayer, attention_blocks, find_cross_attentions
from .lora import AttentionLoRA, attention_modules
from .references import COMBINE_MODES, combine_references
from .rows import CondRows
from .session import DEFAULT_OWNER, PatchSession, live_sessions, remove_sessions

__all__ = [
    "AttentionLoRA",
    "COMBINE_MODES",
    "Control",
    "CondRows",
    "CrossAttentionLayer",
    "DEFAULT_OWNER",
    "ImagePrompt",
    "PRESETS",
    "PatchSession",
    "attention_blocks",
    "attention_modules",
    "combine_references",
    "find_cross_attentions",
    "live_sessions",
    "remove_sessions",
    "resolve_layer_weights",
]
