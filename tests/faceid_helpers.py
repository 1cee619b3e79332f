"""FaceID files in the official layout for the tiny test UNets, and diffusers' FaceID on them.

The files have the official context (768 / 2048), ArcFace (512) and CLIP ViT-H (1280) widths
and the official FaceID MLP (512 -> 1024 -> T·C), so ``lib_identity.formats`` recognises the
real variants; only the UNet widths (and the LoRA rank: 4 instead of 128) are small. The file
name carries what the layout cannot tell ("portrait", "plusv2"), as the official names do.
"""

import torch

from checkpoints import write_random
from lib_identity.unet import find_cross_attentions

ID_DIM, ID_HIDDEN, CLIP_HIDDEN = 512, 1024, 1280
NAMES = {"faceid": "ip-adapter-faceid_{base}", "portrait": "ip-adapter-faceid-portrait_{base}",
         "plus": "ip-adapter-faceid-plus_{base}", "plusv2": "ip-adapter-faceid-plusv2_{base}"}


def _perceiver_keys(C: int) -> dict:
    keys = {"proj_in.weight": (C, CLIP_HIDDEN), "proj_in.bias": (C,), "proj_out.weight": (C, C), "proj_out.bias": (C,),
            "norm_out.weight": (C,), "norm_out.bias": (C,)}
    for layer in range(4):
        p = f"layers.{layer}."
        keys.update({p + "0.norm1.weight": (C,), p + "0.norm1.bias": (C,), p + "0.norm2.weight": (C,),
                     p + "0.norm2.bias": (C,), p + "0.to_q.weight": (C, C), p + "0.to_kv.weight": (2 * C, C),
                     p + "0.to_out.weight": (C, C), p + "1.0.weight": (C,), p + "1.0.bias": (C,),
                     p + "1.1.weight": (4 * C, C), p + "1.3.weight": (C, 4 * C)})
    return {"perceiver_resampler." + k: v for k, v in keys.items()}


def faceid_shapes(unet, kind: str, lora_rank: int = 4) -> dict:
    """Official FaceID keys and shapes for this UNet's attention widths."""
    layers = find_cross_attentions(unet)
    C = layers[0].context_dim
    tokens = 16 if kind == "portrait" else 4
    proj = {"proj.0.weight": (ID_HIDDEN, ID_DIM), "proj.0.bias": (ID_HIDDEN,), "proj.2.weight": (tokens * C, ID_HIDDEN),
            "proj.2.bias": (tokens * C,), "norm.weight": (C,), "norm.bias": (C,)}
    if kind.startswith("plus"):
        proj.update(_perceiver_keys(C))
    shapes = {f"image_proj.{k}": v for k, v in proj.items()}
    for layer in layers:
        h = layer.hidden_size
        for name in ("to_k_ip", "to_v_ip"):
            shapes[f"ip_adapter.{layer.file_key}.{name}.weight"] = (h, C)
        if kind == "portrait":
            continue
        for n in (2 * layer.ordinal, 2 * layer.ordinal + 1):
            for p in ("to_q", "to_k", "to_v", "to_out"):
                width_in = C if n % 2 and p in ("to_k", "to_v") else h
                shapes[f"ip_adapter.{n}.{p}_lora.down.weight"] = (lora_rank, width_in)
                shapes[f"ip_adapter.{n}.{p}_lora.up.weight"] = (h, lora_rank)
    return shapes


def write_faceid(folder, unet, kind: str, seed: int, suffix: str = ".bin", lora_rank: int = 4):
    """A random-weight FaceID file (float16, as published) whose numbers keep activations O(1)."""
    shapes = faceid_shapes(unet, kind, lora_rank)
    base = "sd15" if find_cross_attentions(unet)[0].context_dim == 768 else "sdxl"
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            tensors[key] = (1.0 if key.endswith("weight") and "norm" in key else 0.0) + 0.1 * torch.randn(shape, generator=g)
        elif "_lora.up" in key:
            tensors[key] = torch.randn(shape, generator=g) * 0.5 / shape[-1] ** 0.5
        else:
            tensors[key] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    path = folder / (NAMES[kind].format(base=base) + f"-{seed}{suffix}")
    write_random(tensors, path, dtype=torch.float16)
    return path


def diffusers_faceid(base_unet, state_dict: dict, *, weight: float, lora_weight: float, with_ip: bool = True):
    """A copy of diffusers' UNet with the file loaded the way ``IPAdapterMixin.load_ip_adapter`` does:
    the image projection and ``IPAdapterAttnProcessor2_0`` (``_load_ip_adapter_weights``), the LoRA
    converted by ``_load_ip_adapter_loras`` and loaded through peft at ``lora_weight``."""
    import copy

    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin

    dunet = copy.deepcopy(base_unet)
    if with_ip:
        dunet._load_ip_adapter_weights([state_dict], low_cpu_mem_usage=False)
        for proc in dunet.attn_processors.values():
            if hasattr(proc, "to_k_ip"):
                proc.scale = [weight]
    loras = dunet._load_ip_adapter_loras([state_dict])
    if loras:
        lora_sd, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(loras[0])
        StableDiffusionLoraLoaderMixin.load_lora_into_unet(lora_sd, alphas, dunet, adapter_name="faceid_0")
        dunet.set_adapters(["faceid_0"], weights=[lora_weight])
    return dunet.eval()
