"""InstantID test material: the adapter file for the tiny SDXL UNet and a stand-in IdentityNet.

The tests' tiny SDXL UNet has no ``label_emb`` (it is called without ``y``), which the real
IdentityNet needs; so the glue and parity tests use a control module with IdentityNet's call
built from the UNet's own blocks. The real module's numbers are tests/test_identitynet.py's
(parity with diffusers' ControlNetModel), its loading through the cache is tested there too.

* ``write_instantid_adapter``: InstantID's ``ip-adapter.bin`` layout (Resampler on the 512-wide
  ArcFace embedding, 16 queries, 2048-wide tokens; ``to_k_ip``/``to_v_ip`` per cross-attention)
  at a small Resampler width, so ``formats`` recognises it as InstantID.
* ``StandInIdentityNet``: a ControlNet built from the UNet's own ldm modules (copies of its
  ``time_embed``, ``input_blocks`` and ``middle_block``, a hint convolution, zero convolutions
  with random weights) with IdentityNet's call: ``forward(x, hint, timesteps, context, y)`` ->
  9 skips and the middle; it stands for any control module with that call.
* ``standin_modules(monkeypatch)``: ``lib_identity.models.identitynet`` replaced by a loader of
  the stand-in's files.
"""

from __future__ import annotations

import copy
import sys
import types

import torch

from checkpoints import write_random
from lib_identity.unet import find_cross_attentions
from unet_helpers import image_proj_keys

def write_instantid_adapter(folder, unet, seed: int, name: str = "ip-adapter", suffix: str = ".bin"):
    """A random-weight InstantID adapter (fp32, as published) for ``unet``'s cross-attentions."""
    layers = find_cross_attentions(unet)
    C = layers[0].context_dim
    shapes = {f"image_proj.{k}": v for k, v in image_proj_keys("resampler", C, 512).items()}
    for layer in layers:
        for n in ("to_k_ip", "to_v_ip"):
            shapes[f"ip_adapter.{layer.file_key}.{n}.weight"] = (layer.hidden_size, C)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            tensors[key] = (1.0 if key.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            # the raw ArcFace embedding is ~20 long: keep proj_in's output O(1)
            scale = 0.05 if key.endswith("proj_in.weight") else 1.0
            tensors[key] = torch.randn(shape, generator=g) * scale / shape[-1] ** 0.5
    path = folder / f"{name}-{seed}{suffix}"
    write_random(tensors, path)
    return path


class StandInIdentityNet(torch.nn.Module):
    """A ControlNet from the UNet's own modules (see the module docstring)."""

    def __init__(self, unet, seed: int = 0):
        super().__init__()
        from ldm.modules.diffusionmodules.util import timestep_embedding

        self._timestep_embedding = timestep_embedding
        self.model_channels = unet.model_channels
        self.in_channels = unet.in_channels  # 4: an inpainting UNet's extra channels are not the control's
        self.time_embed = copy.deepcopy(unet.time_embed)
        self.input_blocks = copy.deepcopy(unet.input_blocks)
        self.middle_block = copy.deepcopy(unet.middle_block)
        self.hint_block = torch.nn.Conv2d(3, unet.model_channels, kernel_size=8, stride=8)
        channels = [self._out_channels(b) for b in self.input_blocks] + [self._out_channels(self.middle_block)]
        self.zero_convs = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 1) for c in channels)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in list(self.hint_block.parameters()) + list(self.zero_convs.parameters()):
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5 if p.dim() > 1 else 0.05))
            for p in list(self.input_blocks.parameters()) + list(self.middle_block.parameters()):
                p.add_(0.02 * torch.randn(p.shape, generator=g))  # not the UNet's own numbers
        self.eval()

    @staticmethod
    def _out_channels(block) -> int:
        for m in reversed(list(block.modules())):
            if isinstance(m, torch.nn.Conv2d):
                return m.out_channels
            if hasattr(m, "out_channels") and isinstance(m.out_channels, int) and not isinstance(m, torch.nn.Linear):
                return m.out_channels
        raise ValueError(block)

    def forward(self, x, hint, timesteps, context, y=None):
        emb = self.time_embed(self._timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
        guided = self.hint_block(hint.to(x.dtype))
        h, out = x, []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:
                h = h + guided
            out.append(zero(h))
        h = self.middle_block(h, emb, context)
        out.append(self.zero_convs[-1](h))
        return out


# ---------------------------------------------------------------- stand-in modules


def write_standin_identitynet(path, unet, seed: int):
    """A file that ``formats`` takes for IdentityNet (diffusers ControlNet marker keys, SDXL context)
    holding the stand-in's weights, for the stand-in loader."""
    net = StandInIdentityNet(unet, seed=seed)
    tensors = {f"standin.{k}": v.contiguous() for k, v in net.state_dict().items()}
    tensors.update({
        "controlnet_cond_embedding.conv_in.weight": torch.zeros(16, 3, 3, 3),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight": torch.zeros(64, 2048),
        "add_embedding.linear_1.weight": torch.zeros(64, 2816),
        "standin.seed": torch.tensor([seed]),
    })
    write_random(tensors, path)
    return path


def standin_modules(monkeypatch, loads: list = None):
    """Put the stand-in IdentityNet loader in place of ``load_identitynet``.

    ``loads`` collects ``(path, device, dtype)`` of every load."""
    from safetensors.torch import load_file

    ident = types.ModuleType("lib_identity.models.identitynet")

    def load_identitynet(path, *, unet, device, dtype, progress=None):
        sd = load_file(str(path))
        net = StandInIdentityNet(unet, seed=int(sd["standin.seed"][0]))
        net.load_state_dict({k[len("standin."):]: v for k, v in sd.items() if k.startswith("standin.") and k != "standin.seed"})
        if loads is not None:
            loads.append((str(path), str(device), dtype))
        return net.to(device=device, dtype=dtype)

    ident.load_identitynet = load_identitynet
    monkeypatch.setitem(sys.modules, "lib_identity.models.identitynet", ident)
