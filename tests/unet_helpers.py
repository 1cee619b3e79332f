"""Random adapter weights and tokens for the UNet patch tests."""

import torch

from checkpoints import write_random
from lib_identity.unet import ImagePrompt, find_cross_attentions
from unet_models import SD15, SDXL

CONTEXT = {SD15: 768, SDXL: 2048}  # the official context widths the adapter files are written for
D, Q = 256, 16  # Resampler width (four 64-wide heads; official: 768 / 1280) and queries


def random_ip_pairs(unet, context_dim, seed=0, scale=1.0):
    """One (to_k_ip.weight, to_v_ip.weight) per cross-attention of ``unet``, official order."""
    g = torch.Generator().manual_seed(seed)
    std = scale / context_dim ** 0.5
    return [
        (torch.randn(l.hidden_size, context_dim, generator=g) * std, torch.randn(l.hidden_size, context_dim, generator=g) * std)
        for l in find_cross_attentions(unet)
    ]


def random_prompt(unet, context_dim, seed=0, tokens=4, images=1, **kwargs):
    g = torch.Generator().manual_seed(seed + 1000)
    cond = torch.randn(images, tokens, context_dim, generator=g)
    uncond = torch.randn(1, tokens, context_dim, generator=g)
    return ImagePrompt(cond_tokens=cond, uncond_tokens=uncond, ip_layers=random_ip_pairs(unet, context_dim, seed), **kwargs)


def unet_inputs(batch, context_dim, seed=0, hw=(8, 8), context_len=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)
    t = torch.linspace(50.0, 900.0, batch)
    c = torch.randn(batch, context_len, context_dim, generator=g)
    return x, t, c


def hook_counts(unet):
    """How many hooks every module carries: to compare before and after a session."""
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in unet.named_modules()}


# ---------------------------------------------------------------- adapter files in the official layout


def encoder_width(layout, kind):
    """ViT-H's projection (1024) for the SD1.5 linear adapter, else 1280 (ViT-bigG projection, ViT-H hidden)."""
    return 1024 if (layout, kind) == (SD15, "linear") else 1280


def image_proj_keys(kind, C, E):
    """Official ``image_proj`` keys and shapes at test widths (formats.md §3)."""
    if kind == "linear":
        return {"proj.weight": (4 * C, E), "proj.bias": (4 * C,), "norm.weight": (C,), "norm.bias": (C,)}
    if kind == "mlp":
        return {"proj.0.weight": (E, E), "proj.0.bias": (E,), "proj.2.weight": (C, E), "proj.2.bias": (C,),
                "proj.3.weight": (C,), "proj.3.bias": (C,)}
    keys = {"latents": (1, Q, D), "proj_in.weight": (D, E), "proj_in.bias": (D,), "proj_out.weight": (C, D),
            "proj_out.bias": (C,), "norm_out.weight": (C,), "norm_out.bias": (C,)}
    for layer in range(4):
        p = f"layers.{layer}."
        keys.update({p + "0.norm1.weight": (D,), p + "0.norm1.bias": (D,), p + "0.norm2.weight": (D,),
                     p + "0.norm2.bias": (D,), p + "0.to_q.weight": (D, D), p + "0.to_kv.weight": (2 * D, D),
                     p + "0.to_out.weight": (D, D), p + "1.0.weight": (D,), p + "1.0.bias": (D,),
                     p + "1.1.weight": (4 * D, D), p + "1.3.weight": (D, 4 * D)})
    return keys


def write_adapter(folder, unet, kind, seed, suffix=".safetensors"):
    """A random-weight adapter file in the official layout, for this UNet's cross-attentions."""
    layers = find_cross_attentions(unet)
    C = layers[0].context_dim
    E = encoder_width(SD15 if C == 768 else SDXL, kind)
    shapes = {f"image_proj.{k}": v for k, v in image_proj_keys(kind, C, E).items()}
    for layer in layers:
        for name in ("to_k_ip", "to_v_ip"):
            shapes[f"ip_adapter.{layer.file_key}.{name}.weight"] = (layer.hidden_size, C)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():  # O(1) activations: norms near 1, matrices 1/sqrt(fan_in)
        if len(shape) == 1:
            base = 1.0 if key.endswith("weight") else 0.0
            tensors[key] = base + 0.1 * torch.randn(shape, generator=g)
        else:
            tensors[key] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    path = folder / f"{kind}-{seed}{suffix}"
    write_random(tensors, path)
    return path


def diffusers_state_dict(path):
    """What diffusers' own loader reads: the nested .bin dict, or the .safetensors prefixes split."""
    from safetensors.torch import load_file

    if str(path).endswith(".bin"):
        return torch.load(str(path), map_location="cpu", weights_only=True)
    out = {"image_proj": {}, "ip_adapter": {}}
    for key, value in load_file(str(path)).items():
        section, rest = key.split(".", 1)
        out[section][rest] = value
    return out


