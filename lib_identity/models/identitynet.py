"""InstantID's IdentityNet, built from the host UNet's own classes, and its loader.

IdentityNet is an SDXL ControlNet: a trainable copy of the UNet's encoder half (``time_embed``,
``label_emb``, ``input_blocks``, ``middle_block``), a hint block that brings the keypoint image
down to the latent size, and zero convolutions that turn each of the 9 input-block outputs and
the middle output into residuals for the UNet's skips. Its cross-attention context is the
InstantID face tokens.

The blocks are made from the classes the host UNet is made of (the WebUI's ``sgm`` for SDXL,
``ldm`` in the tests): ``ResBlock``, ``Downsample``, ``TimestepEmbedSequential`` and
``timestep_embedding`` from the module that defines ``type(unet)``, and the spatial transformer
class of the UNet's own attention blocks. So the WebUI's cross-attention optimisation (installed
on those classes) and its other patches apply to IdentityNet as to the UNet, and nothing here
imports the WebUI.
"""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace
from typing import List, Optional

import torch
from torch import nn

from ..errors import CheckpointError
from .identitynet_config import IdentityNetConfig, config_from_diffusers, config_from_shapes, describe
from .identitynet_weights import Progress, check_weights, open_weights, read_tensors

__all__ = ["IdentityNet", "IdentityNetConfig", "host_classes", "load_identitynet"]

_NEEDED = ("ResBlock", "Downsample", "TimestepEmbedSequential", "timestep_embedding")


def host_classes(unet: nn.Module) -> SimpleNamespace:
    """The building blocks of ``unet``: its module (for ``timestep_embedding`` at call time) and classes.

    ``SpatialTransformer`` is the class of the UNet's first attention block (so a host that
    subclasses it gets its own), else the one its module imports.
    """
    module = sys.modules.get(type(unet).__module__)
    if module is None or any(not hasattr(module, name) for name in _NEEDED):
        raise TypeError(f"{type(unet).__module__}.{type(unet).__name__} is not an ldm/sgm UNetModel: "
                        f"IdentityNet needs its module's {', '.join(_NEEDED)}")
    spatial = next((type(m) for m in unet.modules() if type(m).__name__.endswith("SpatialTransformer")), None)
    spatial = spatial or getattr(module, "SpatialTransformer", None)
    if spatial is None:
        raise TypeError(f"{type(unet).__name__} has no SpatialTransformer; IdentityNet needs an SDXL UNet")
    return SimpleNamespace(module=module, ResBlock=module.ResBlock, Downsample=module.Downsample,
                           TimestepEmbedSequential=module.TimestepEmbedSequential, SpatialTransformer=spatial)


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)


class IdentityNet(nn.Module):
    """The ControlNet: ``forward(x, hint, timesteps, context, y)`` -> 10 residuals.

    Parameter names are the ldm/cldm ones (``input_blocks.N``, ``input_hint_block.N``,
    ``zero_convs.N.0``, ``middle_block_out.0``), as sd-webui-controlnet names a converted file.
    """

    def __init__(self, config: IdentityNetConfig, host: SimpleNamespace):
        super().__init__()
        self.config = config
        self._host: ModuleType = host.module  # looked up per call: the WebUI patches timestep_embedding
        c = config
        emb = c.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(c.model_channels, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(c.adm_in_channels, emb), nn.SiLU(), nn.Linear(emb, emb)))
        self.input_hint_block = self._hint_block(c)
        seq = host.TimestepEmbedSequential
        self.input_blocks = nn.ModuleList([seq(_conv(c.in_channels, c.model_channels))])
        self.zero_convs = nn.ModuleList([self._zero_conv(c.model_channels)])
        ch = c.model_channels
        for level, width in enumerate(c.widths):
            for _ in range(c.num_res_blocks):
                layers: List[nn.Module] = [host.ResBlock(ch, emb, 0.0, out_channels=width, dims=2, use_checkpoint=False)]
                ch = width
                if c.transformer_depth[level]:
                    layers.append(self._attention(host, ch, c.heads[level], c.transformer_depth[level]))
                self.input_blocks.append(seq(*layers))
                self.zero_convs.append(self._zero_conv(ch))
            if level != len(c.widths) - 1:
                self.input_blocks.append(seq(host.Downsample(ch, True, dims=2, out_channels=ch)))
                self.zero_convs.append(self._zero_conv(ch))
        self.middle_block = seq(
            host.ResBlock(ch, emb, 0.0, dims=2, use_checkpoint=False),
            self._attention(host, ch, c.heads[-1], c.middle_depth),
            host.ResBlock(ch, emb, 0.0, dims=2, use_checkpoint=False),
        )
        self.middle_block_out = self._zero_conv(ch)

    @staticmethod
    def _hint_block(c: IdentityNetConfig) -> nn.Sequential:
        # conv_in, then per width step a same-width conv and a stride-2 conv, SiLU between all, conv_out
        widths = c.hint_block_channels
        layers: List[nn.Module] = [_conv(c.hint_channels, widths[0]), nn.SiLU()]
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            layers += [_conv(w_in, w_in), nn.SiLU(), _conv(w_in, w_out, stride=2), nn.SiLU()]
        layers.append(_conv(widths[-1], c.model_channels))
        return nn.Sequential(*layers)

    @staticmethod
    def _zero_conv(ch: int) -> nn.Sequential:
        return nn.Sequential(_conv(ch, ch, kernel=1))

    def _attention(self, host, ch: int, heads: int, depth: int) -> nn.Module:
        c = self.config
        return host.SpatialTransformer(ch, heads, ch // heads, depth=depth, context_dim=[c.context_dim] * depth,
                                       use_linear=c.use_linear, use_checkpoint=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> List[torch.Tensor]:
        """The 10 residuals: 9 for the UNet's skips in ``input_blocks`` order, then the middle one.

        ``x`` [B, 4, h, w] latents, ``hint`` [B, 3, 8h, 8w] RGB in 0..1, ``timesteps`` [B],
        ``context`` [B, tokens, context_dim] (InstantID: the face tokens), ``y`` [B, adm] (SDXL's
        pooled text and size embedding, the UNet's own ``y``). Residuals are in the module's dtype.
        """
        dtype = self.dtype
        if hint.shape[-2:] != tuple(8 * s for s in x.shape[-2:]) or hint.shape[0] != x.shape[0]:
            raise ValueError(f"IdentityNet: the hint is {list(hint.shape)} for latents {list(x.shape)}; "
                             "it must have the batch of the latents and 8x their height and width")
        if self.config.bgr_hint:
            hint = hint.flip(1)
        t_emb = self._host.timestep_embedding(timesteps, self.config.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb.to(dtype)) + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype))
        h = x.to(dtype)
        out = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            out.append(zero(h))
        h = self.middle_block(h, emb, context)
        out.append(self.middle_block_out(h))
        return out


def _unet_dims(unet: nn.Module):
    """The host UNet's context width and added-condition width (None where it has none)."""
    context = next((m.attn2.to_k.in_features for m in unet.modules() if hasattr(m, "attn2")), None)
    label = getattr(unet, "label_emb", None)
    first = next((m for m in label.modules() if isinstance(m, nn.Linear)), None) if label is not None else None
    return context, (first.in_features if first is not None else None)


def load_identitynet(path: str, *, unet: nn.Module, device=None, dtype: Optional[torch.dtype] = None,
                     progress: Progress = None) -> IdentityNet:
    """Load IdentityNet strictly into a module built from ``unet``'s classes, in ``dtype`` on ``device``.

    ``path``: a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) or one
    ``.safetensors`` (or ``.bin``, read with ``weights_only``) in diffusers or ldm naming, fp16 or
    fp32, under any name. ``device``/``dtype`` default to the UNet's. Every tensor of the file must
    be a parameter of the model and every parameter must be in the file, with its shape; else a
    ``CheckpointError`` names the file and the keys. ``progress(done, total)`` follows the read.
    """
    host = host_classes(unet)
    if device is None or dtype is None:
        first = next(unet.parameters())
        device = first.device if device is None else device
        dtype = first.dtype if dtype is None else dtype
    weights = open_weights(path)
    if weights.config is not None:
        config, built_from = config_from_diffusers(weights.config, weights.source), "its config.json"
    else:
        config, built_from = config_from_shapes(weights.shapes, weights.weights_path), "its shapes"
    unet_context, unet_adm = _unet_dims(unet)
    if (unet_context is not None and unet_context != config.context_dim) or unet_adm not in (None, config.adm_in_channels):
        raise CheckpointError(weights.source, f"this ControlNet is for a UNet with context {config.context_dim} and "
                                              f"added condition {config.adm_in_channels}, the loaded checkpoint has "
                                              f"{unet_context} and {unet_adm}: IdentityNet needs an SDXL checkpoint")
    with torch.device("meta"):
        net = IdentityNet(config, host)
    check_weights({k: tuple(v.shape) for k, v in net.state_dict().items()}, weights,
                  f"{built_from} ({describe(config)})")
    tensors = read_tensors(weights, device, dtype, progress)
    net.load_state_dict(tensors, strict=True, assign=True)
    return net.requires_grad_(False).eval()
