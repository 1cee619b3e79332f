"""UNets for the tests: the WebUI's ldm classes, and the same weights in diffusers.

* SD1.5 layout: ``ldm.modules.diffusionmodules.openaimodel.UNetModel`` (PyPI
  ``stable-diffusion-sdkit``, the Stability-AI ``ldm`` the WebUI clones) with the parameters of
  the WebUI's ``v1-inference.yaml``, or the same block structure at tiny widths.
* SDXL layout: the ``ldm`` package has no ``sgm`` (and no PyPI package ships it), and ldm's
  ``SpatialTransformer`` cannot run more than one transformer block per context. So the SDXL
  block structure (transformer depth 0/2/10 per level, linear projections, no attention at
  level 0) is built from ldm's UNetModel with the attention blocks swapped for the small
  ``Sgm*`` subclasses below, which behave as ``sgm.modules.attention`` does where it differs from
  ldm: one context shared by every transformer block, and ``attn1``/``attn2`` called with sgm's
  extra keyword arguments (``additional_tokens``, ``n_times_crossframe_attn_in_self``).
* ``to_diffusers``: the same weights in diffusers' ``UNet2DConditionModel`` (the parity oracle),
  with the ldm → diffusers key conversion written here from the two module trees.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

import oracles

SD15 = "sd15"
SDXL = "sdxl"


def _ldm():
    from ldm.modules import attention
    from ldm.modules.diffusionmodules import openaimodel

    return attention, openaimodel


# --------------------------------------------------------------------------- sgm stand-ins


def _sgm_classes():
    attention, _ = _ldm()

    class SgmCrossAttention(attention.CrossAttention):
        """ldm's CrossAttention with sgm's forward signature and ``additional_tokens`` handling."""

        def forward(self, x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0):
            h = self.heads
            if additional_tokens is not None:
                n_extra = additional_tokens.shape[1]
                x = torch.cat([additional_tokens, x], dim=1)
            q = self.to_q(x)
            context = x if context is None else context
            k, v = self.to_k(context), self.to_v(context)
            b = q.shape[0]
            q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
            if additional_tokens is not None:
                out = out[:, n_extra:]
            return self.to_out(out)

    class SgmTransformerBlock(attention.BasicTransformerBlock):
        """Calls attn1/attn2 with sgm's keyword arguments."""

        def _forward(self, x, context=None, additional_tokens=None):
            x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None,
                           additional_tokens=additional_tokens, n_times_crossframe_attn_in_self=0) + x
            x = self.attn2(self.norm2(x), context=context, additional_tokens=additional_tokens) + x
            return self.ff(self.norm3(x)) + x

        def forward(self, x, context=None, additional_tokens=None):
            return self._forward(x, context, additional_tokens)

    class SgmSpatialTransformer(attention.SpatialTransformer):
        """sgm's rule: a single context is used by every transformer block."""

        def forward(self, x, context=None):
            if not isinstance(context, list):
                context = [context]
            b, c, hh, ww = x.shape
            x_in = x
            x = self.norm(x)
            if not self.use_linear:
                x = self.proj_in(x)
            x = x.flatten(2).transpose(1, 2).contiguous()
            if self.use_linear:
                x = self.proj_in(x)
            for i, block in enumerate(self.transformer_blocks):
                x = block(x, context=context[i if len(context) > 1 else 0])
            if self.use_linear:
                x = self.proj_out(x)
            x = x.transpose(1, 2).reshape(b, -1, hh, ww).contiguous()
            if not self.use_linear:
                x = self.proj_out(x)
            return x + x_in

    return SgmCrossAttention, SgmTransformerBlock, SgmSpatialTransformer


# --------------------------------------------------------------------------- builders


def build_ldm_unet(layout: str, *, model_channels: int = 32, context_dim: int = 64, heads: int = 4,
                   head_channels: int = -1, device=None, use_checkpoint: bool = False):
    """An ldm UNetModel with the SD1.5 or SDXL block structure (no label embedding).

    Full size: ``model_channels=320`` and, for SD1.5, ``heads=8``/``context_dim=768``; for SDXL
    ``head_channels=64``/``context_dim=2048``. Build it under ``torch.device("meta")`` to avoid
    allocating.
    """
    _, openaimodel = _ldm()
    if layout == SD15:
        channel_mult, attention_resolutions, depth = (1, 2, 4, 4), (4, 2, 1), {0: 1, 1: 1, 2: 1}
    elif layout == SDXL:
        channel_mult, attention_resolutions, depth = (1, 2, 4), (4, 2), {1: 2, 2: 10}
    else:
        raise ValueError(layout)
    kwargs = dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=model_channels,
        attention_resolutions=list(attention_resolutions), num_res_blocks=2, channel_mult=list(channel_mult),
        use_spatial_transformer=True, transformer_depth=1, context_dim=context_dim,
        use_checkpoint=use_checkpoint, legacy=False, use_linear_in_transformer=(layout == SDXL),
    )
    if head_channels > 0:
        kwargs["num_head_channels"] = head_channels
    else:
        kwargs["num_heads"] = heads
    ctx = torch.device(device) if device is not None else _nullcontext()
    with ctx:
        unet = openaimodel.UNetModel(**kwargs)
        if layout == SDXL:
            _deepen_sdxl(unet, model_channels, context_dim, heads, head_channels, use_checkpoint, depth)
    return unet.eval()


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _deepen_sdxl(unet, model_channels, context_dim, heads, head_channels, use_checkpoint, depth):
    """Give SDXL's levels 1 and 2 their 2 and 10 transformer blocks, with sgm's behaviour."""
    attn_cls, block_cls, st_cls = _sgm_classes()
    # input blocks 4,5 (level 1) and 7,8 (level 2); output blocks 0-2 (level 2) and 3-5 (level 1)
    where = {("input_blocks", 4): 1, ("input_blocks", 5): 1, ("input_blocks", 7): 2, ("input_blocks", 8): 2,
             ("output_blocks", 0): 2, ("output_blocks", 1): 2, ("output_blocks", 2): 2,
             ("output_blocks", 3): 1, ("output_blocks", 4): 1, ("output_blocks", 5): 1}
    targets = [(getattr(unet, c)[i], level) for (c, i), level in where.items()] + [(unet.middle_block, 2)]
    for seq, level in targets:
        ch = model_channels * (1, 2, 4)[level]
        n_heads, d_head = (ch // head_channels, head_channels) if head_channels > 0 else (heads, ch // heads)
        d = depth[level]
        st = st_cls(ch, n_heads, d_head, depth=d, context_dim=[context_dim] * d, use_linear=True,
                    use_checkpoint=use_checkpoint)
        for tb in st.transformer_blocks:
            tb.__class__ = block_cls
            tb.attn1.__class__ = attn_cls
            tb.attn2.__class__ = attn_cls
        seq[1] = st


def randomize_(module: torch.nn.Module, seed: int = 0, std_scale: float = 1.0) -> torch.nn.Module:
    """Random weights everywhere (ldm zero-initialises its output convs, which would hide attention).

    Matrices get std 1/sqrt(fan_in) so activations stay O(1) through the whole UNet; norm scales
    are near 1 and biases small.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=g) * (std_scale / math.sqrt(fan_in)))
    return module


# --------------------------------------------------------------------------- ldm -> diffusers

_RESNET = {
    "in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
}
_ATTENTION_PARTS = ("norm.", "proj_in.", "proj_out.", "transformer_blocks.")


def _resnet(rest: str) -> str:
    for old, new in _RESNET.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(rest)


def ldm_to_diffusers_key(key: str, per_level: int = 3) -> str:
    """One ldm UNet key in diffusers' naming (SD layouts: 2 res blocks per level)."""
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"middle_block\.(\d)\.(.*)", key)
    if m:
        j, rest = int(m.group(1)), m.group(2)
        if j == 1:
            return "mid_block.attentions.0." + rest
        return f"mid_block.resnets.{j // 2}." + _resnet(rest)
    m = re.match(r"input_blocks\.(\d+)\.(\d)\.(.*)", key)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, pos = (i - 1) // per_level, (i - 1) % per_level
        if rest.startswith("op."):
            return f"down_blocks.{level}.downsamplers.0.conv." + rest[3:]
        if j == 1:
            return f"down_blocks.{level}.attentions.{pos}." + rest
        return f"down_blocks.{level}.resnets.{pos}." + _resnet(rest)
    m = re.match(r"output_blocks\.(\d+)\.(\d)\.(.*)", key)
    if m:
        i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, pos = i // per_level, i % per_level
        if j == 0:
            return f"up_blocks.{level}.resnets.{pos}." + _resnet(rest)
        if rest.startswith(_ATTENTION_PARTS):
            return f"up_blocks.{level}.attentions.{pos}." + rest
        if rest.startswith("conv."):
            return f"up_blocks.{level}.upsamplers.0." + rest
    raise KeyError(key)


def diffusers_config(layout: str, *, model_channels: int = 32, context_dim: int = 64, heads: int = 4) -> dict:
    c = model_channels
    if layout == SD15:
        return dict(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(c, 2 * c, 4 * c, 4 * c),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=context_dim, attention_head_dim=heads, use_linear_projection=False,
        )
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(c, 2 * c, 4 * c),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        cross_attention_dim=context_dim, attention_head_dim=heads, use_linear_projection=True,
    )


def to_diffusers(unet, layout: str, *, model_channels: int = 32, context_dim: int = 64, heads: int = 4):
    """diffusers' UNet2DConditionModel holding exactly the ldm UNet's weights (strict load)."""
    UNet2DConditionModel = oracles.diffusers().UNet2DConditionModel

    model = UNet2DConditionModel(**diffusers_config(layout, model_channels=model_channels,
                                                    context_dim=context_dim, heads=heads))
    converted = {ldm_to_diffusers_key(k): v for k, v in unet.state_dict().items()}
    model.load_state_dict(converted, strict=True)
    return model.eval()


def ldm_and_diffusers_unets(seeds: dict, context_dims: dict) -> dict:
    """layout -> (random ldm UNet, the same weights as a diffusers UNet), for the parity tests."""
    out = {}
    for layout, seed in seeds.items():
        ldm = randomize_(build_ldm_unet(layout, context_dim=context_dims[layout]), seed=seed)
        out[layout] = (ldm, to_diffusers(ldm, layout, context_dim=context_dims[layout]))
    return out
