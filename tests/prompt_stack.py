"""The WebUI's prompt side for PhotoMaker tests: ``modules.prompt_parser``, an SDXL text model, a ``p``.

``make_stack(monkeypatch, real=False)`` puts a ``modules`` package into ``sys.modules`` with the
stand-in prompt parser (``standin_prompt_parser.py``) and an ``SDXLTextModel`` built on
``standin_sdxl_text.StandInTextModel``. With ``real=True`` (``SD_WEBUI_ROOT`` names a WebUI
1.10.x checkout and ``lark`` is importable) it loads the WebUI's own ``modules/prompt_parser.py``,
``sd_emphasis.py`` and ``sd_hijack_clip.py`` (with stubs for what they import) and puts the real
``TextConditionalModel`` under the tiny encoders. ``P`` does what ``processing.py`` does with
conds: ``get_conds_with_caching`` over class-level caches, ``setup_conds``, ``calculate_hr_conds``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch

import standin_prompt_parser
import standin_sdxl_text
from lib_identity.conditioning import PromptIdentity
from lib_identity.models.photomaker import PhotoMakerIDEncoder, PhotoMakerIDEncoderV2

WIDTHS = (8, 16)  # CLIP-L and OpenCLIP-G columns, 768 and 1280 in SDXL
TINY_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1,
               "patch_size": 8, "image_size": 32, "projection_dim": WIDTHS[0], "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "num_channels": 3}


def webui_root():
    """The WebUI checkout whose real prompt code the tests can load, or None."""
    root = os.environ.get("SD_WEBUI_ROOT")
    if not root or not (Path(root) / "modules" / "sd_hijack_clip.py").is_file():
        return None
    if importlib.util.find_spec("lark") is None:
        return None
    return Path(root)


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_stack(monkeypatch, real=False):
    """``SimpleNamespace(parser, model, opts, set_emphasis)``; ``modules.shared.sd_model`` is the model."""
    pkg = types.ModuleType("modules")
    shared = types.ModuleType("modules.shared")
    shared.opts = SimpleNamespace(emphasis="Original", comma_padding_backtrack=20, use_old_emphasis_implementation=False,
                                  textual_inversion_add_hashes_to_infotext=False, use_old_scheduling=False)
    monkeypatch.setitem(sys.modules, "modules", pkg)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    pkg.shared = shared
    if real:
        root = webui_root()
        devices = types.ModuleType("modules.devices")
        devices.device = torch.device("cpu")
        devices.torch_npu_set_device = lambda: None
        hijack = types.ModuleType("modules.sd_hijack")
        db = SimpleNamespace(find_embedding_at_position=_textual_inversion)
        hijack.model_hijack = SimpleNamespace(embedding_db=db, fixes=None, extra_generation_params={})
        for name, mod in {"devices": devices, "sd_hijack": hijack}.items():
            monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
            setattr(pkg, name, mod)
        for name in ("prompt_parser", "sd_emphasis", "sd_hijack_clip"):
            monkeypatch.setitem(sys.modules, f"modules.{name}", None)
            setattr(pkg, name, _load(f"modules.{name}", root / "modules" / f"{name}.py"))
            monkeypatch.setitem(sys.modules, f"modules.{name}", getattr(pkg, name))
        parser = pkg.prompt_parser
        base = pkg.sd_hijack_clip.TextConditionalModel

        class RealTextModel(standin_sdxl_text.TinyEncoder, base):
            def __init__(self, parser, width, seed, **kw):
                base.__init__(self)
                self.setup_encoder(width, seed, **kw)

        encoder_class, opts = RealTextModel, shared.opts
    else:
        parser = standin_prompt_parser
        monkeypatch.setitem(sys.modules, "modules.prompt_parser", parser)
        pkg.prompt_parser = parser
        encoder_class, opts = standin_sdxl_text.StandInTextModel, standin_sdxl_text.opts
        monkeypatch.setattr(opts, "emphasis", "Original")
    model = standin_sdxl_text.SDXLTextModel(encoder_class, parser, WIDTHS)
    shared.sd_model = model

    def set_emphasis(mode):
        monkeypatch.setattr(opts, "emphasis", mode)

    return SimpleNamespace(parser=parser, model=model, opts=opts, set_emphasis=set_emphasis, real=real)


TEXTUAL_INVERSION = "zebra"  # in the real stack, this word is a 3-vector textual-inversion embedding


def _textual_inversion(tokens, offset):
    """The WebUI's ``embedding_db.find_embedding_at_position`` knowing one embedding (for the real stack)."""
    from clip_tokenizer import clip_tokenizer

    if tokens[offset] == clip_tokenizer().convert_tokens_to_ids(TEXTUAL_INVERSION + "</w>"):
        return SimpleNamespace(vectors=3, name=TEXTUAL_INVERSION, shorthash=None), 1
    return None, None


class P:
    """The parts of ``StableDiffusionProcessingTxt2Img`` that encode prompts (1.10.1 ``processing.py``)."""

    cached_c = [None, None]
    cached_uc = [None, None]
    cached_hr_c = [None, None]
    cached_hr_uc = [None, None]

    def __init__(self, stack, prompts, negative=("",), steps=20, hr_steps=None):
        self.stack = stack
        self.prompts, self.negative_prompts = list(prompts), list(negative) * (len(prompts) if len(negative) == 1 else 1)
        self.all_prompts = list(self.prompts)
        self.hr_prompts, self.hr_negative_prompts = list(self.prompts), list(self.negative_prompts)
        self.steps, self.hr_steps = steps, hr_steps
        self.extra_generation_params = {}
        self.sample = None
        self.sd_model = SimpleNamespace(model=SimpleNamespace(diffusion_model=None))  # only the UNet's place

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        params = (list(required_prompts), steps, hires_steps, False, self.stack.opts.emphasis)
        for cache in caches:
            if cache[0] is not None and cache[0] == params:
                return cache[1]
        cache = caches[0]
        cache[1] = function(sys.modules["modules.shared"].sd_model, required_prompts, steps, hires_steps, False)
        cache[0] = params
        return cache[1]

    def setup_conds(self):
        pp = self.stack.parser
        prompts = pp.SdConditioning(self.prompts, width=1024, height=1024)
        negative = pp.SdConditioning(self.negative_prompts, width=1024, height=1024, is_negative_prompt=True)
        self.uc = self.get_conds_with_caching(pp.get_learned_conditioning, negative, self.steps, [self.cached_uc], None)
        self.c = self.get_conds_with_caching(pp.get_multicond_learned_conditioning, prompts, self.steps, [self.cached_c], None)

    def calculate_hr_conds(self):
        pp = self.stack.parser
        prompts = pp.SdConditioning(self.hr_prompts, width=2048, height=2048)
        negative = pp.SdConditioning(self.hr_negative_prompts, width=2048, height=2048, is_negative_prompt=True)
        self.hr_uc = self.get_conds_with_caching(pp.get_learned_conditioning, negative, self.steps,
                                                 [self.cached_hr_uc, self.cached_uc], None, self.hr_steps)
        self.hr_c = self.get_conds_with_caching(pp.get_multicond_learned_conditioning, prompts, self.steps,
                                                [self.cached_hr_c, self.cached_c], None, self.hr_steps)

    def unet_cond(self, step, hires=False):
        """The cross-attention context the CFG denoiser gives the UNet at ``step``: ``[cond rows, T, D]``."""
        _, stacked = self.stack.parser.reconstruct_multicond_batch(self.hr_c if hires else self.c, step)
        return stacked["crossattn"]


def reset_caches():
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        setattr(P, name, [None, None])


_ENCODERS = {}


def encoder(v2=False):
    """A small real PhotoMaker ID encoder (random weights, fixed seed) whose fuse works on L+G columns."""
    if v2 not in _ENCODERS:
        torch.manual_seed(11 if v2 else 10)
        if v2:
            perceiver = {"dim": sum(WIDTHS), "depth": 1, "dim_head": 8, "heads": 2,
                         "embedding_dim": TINY_VISION["hidden_size"], "output_dim": sum(WIDTHS), "ff_mult": 2}
            enc = PhotoMakerIDEncoderV2(TINY_VISION, WIDTHS[1], sum(WIDTHS), id_embeddings_dim=16, hidden_dim=32,
                                        num_tokens=2, perceiver=perceiver)
        else:
            enc = PhotoMakerIDEncoder(TINY_VISION, WIDTHS[1], sum(WIDTHS))
        _ENCODERS[v2] = enc.eval()
    return _ENCODERS[v2]


def fuse_with(enc):
    """``PromptIdentity.fuse`` for ``enc``: its fuse module on class rows and ID embeddings."""
    def fuse(class_rows, id_embeds):
        with torch.no_grad():
            out = enc.fuse_module(class_rows.float(), id_embeds.to(class_rows.device, torch.float32))
        return out.to(class_rows.dtype)
    return fuse


def identity(pictures=1, v2=False, trigger="img", start=0.0, unit=1, seed=0):
    """A ``PromptIdentity`` from ``pictures`` random ID pictures through the real (tiny) encoder."""
    enc = encoder(v2)
    return PromptIdentity(unit_number=unit, trigger=trigger, id_embeds=_id_embeds(pictures, v2, seed),
                          fuse=fuse_with(enc), start=start, key=f"{unit}:{v2}:{pictures}:{seed}")


@functools.lru_cache(maxsize=None)
def _id_embeds(pictures, v2, seed):
    enc = encoder(v2)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.rand(pictures, 3, 32, 32, generator=g)
    with torch.no_grad():
        if v2:
            ids = enc.id_embeddings(pixels, torch.randn(pictures, 16, generator=g) * 10)
        else:
            ids = enc.id_embeddings(pixels)
    return ids.reshape(-1, ids.shape[-1]).float()
