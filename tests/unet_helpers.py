"""Random adapter weights and tokens for the UNet patch tests."""

import torch

from lib_identity.unet import ImagePrompt, find_cross_attentions


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
