"""Encoding reference pictures (and the unconditional side) with a CLIP vision encoder, cached.

``encode_images`` returns the encoder-side tensors for the cond and the uncond rows; the
caller applies the adapter's projection to both. The uncond kinds:

* ``"zero"`` - what the official code does: for ``image_embeds`` (linear / FaceID adapters)
  a zero *embedding*, no encoder run; for ``hidden_states[-2]`` (plus / full-face) the
  encoder run on an all-zero pixel tensor *after* normalisation (``torch.zeros_like(pixel_values)``
  in ``IPAdapterPlus.get_image_embeds``).
* ``"noise"`` - the encoder run on a fixed square of uniform random pixels (seed 0) at the
  encoder's size; the same for every reference and every run, so it is cached too.
* a picture (or one per reference) - a negative reference, prepared and encoded like the references.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import EncoderError
from .cache import EncoderRegistry, EncodingCache, default_cache, default_registry
from .clip_vision import check_output, run_encoder
from .preprocess import DEFAULT_PREPARATION, ImageLike, Preparation, image_digest, normalize, prepare_pixels

UNCOND_KINDS = ("zero", "noise")
NOISE_SEED = 0
# references encoded per forward pass; bounds the activation memory of a long list
BATCH = 8


def _as_list(images) -> List[ImageLike]:
    if isinstance(images, (Image.Image, np.ndarray)):
        return [images]
    if images is None:
        return []
    return list(images)


def _noise_pixels(size: int):
    import torch

    rng = np.random.default_rng(NOISE_SEED)
    picture = Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
    return torch.from_numpy(normalize(picture))[None]


def encode_images(
    encoder,
    images: Union[ImageLike, Sequence[ImageLike]],
    output: str = "image_embeds",
    prep: Preparation = DEFAULT_PREPARATION,
    device=None,
    dtype=None,
    uncond: Union[str, ImageLike, Sequence[ImageLike]] = "zero",
    *,
    encoder_id: Optional[str] = None,
    cache: Optional[EncodingCache] = None,
    registry: Optional[EncoderRegistry] = None,
) -> Tuple["object", "object"]:
    """``(cond, uncond)`` encoder outputs for the reference ``images``.

    ``encoder``: a path (file or folder; loaded once through the registry) or a loaded
    ``CLIPVisionModelWithProjection``. ``output``: ``"image_embeds"`` -> ``[N, E]`` or
    ``"hidden_states[-2]"`` -> ``[N, tokens, H]``. ``uncond``: ``"zero"``, ``"noise"`` or a
    negative picture (one, or one per reference). Results are cached by (picture content,
    encoder file, preparation, output, dtype); only what is missing runs the encoder, which is
    on ``device``/``dtype`` just for that run. Both tensors are returned on ``device`` in ``dtype``.
    """
    refs = _as_list(images)
    if not refs:
        raise EncoderError("no reference pictures to encode")
    return _encode(encoder, refs, len(refs), output, prep, device, dtype, uncond, encoder_id, cache, registry)


def encode_uncond(encoder, count: int, output: str = "image_embeds", prep: Preparation = DEFAULT_PREPARATION,
                  device=None, dtype=None, uncond: Union[str, ImageLike, Sequence[ImageLike]] = "zero", *,
                  like=None, encoder_id: Optional[str] = None, cache: Optional[EncodingCache] = None,
                  registry: Optional[EncoderRegistry] = None):
    """The uncond side alone, for ``count`` references whose encodings exist already (a profile's):
    the same tensor ``encode_images`` gives as its second result. ``like``: the cond encodings,
    whose shape a zero embedding takes (``"zero"`` with ``image_embeds`` runs no encoder)."""
    _, negative = _encode(encoder, [], count, output, prep, device, dtype, uncond, encoder_id, cache, registry)
    if negative is None:
        import torch

        return torch.zeros_like(like.to(device=device, dtype=dtype)) if like is not None else None
    return negative


def _encode(encoder, refs: List[ImageLike], count: int, output: str, prep: Preparation, device, dtype, uncond,
            encoder_id, cache, registry):
    import torch

    check_output(output)
    if not isinstance(prep, Preparation):
        raise EncoderError(f"preparation must be a Preparation, got {type(prep).__name__}")
    cache = cache if cache is not None else default_cache()
    registry = registry if registry is not None else default_registry()
    ident = registry.identity(encoder)
    tail = (ident, prep, output, str(dtype) if dtype is not None else "native")

    # What is needed: key -> how to make its pixels. Duplicates collapse to one key.
    needed = {}

    def want_picture(img) -> Tuple:
        key = ("picture", image_digest(img)) + tail
        needed.setdefault(key, ("picture", img))
        return key

    cond_keys = [want_picture(img) for img in refs]
    uncond_keys: Optional[List[Tuple]] = None
    if isinstance(uncond, str):
        kind = uncond.strip().lower()
        if kind not in UNCOND_KINDS:
            raise EncoderError(f"unknown uncond '{uncond}'; expected 'zero', 'noise' or a negative picture")
        if kind == "noise":
            key = ("noise", NOISE_SEED, ident, output, tail[-1])
            needed.setdefault(key, ("noise", None))
            uncond_keys = [key] * count
        elif output != "image_embeds":
            key = ("zero-pixels", ident, output, tail[-1])
            needed.setdefault(key, ("zeros", None))
            uncond_keys = [key] * count
        # zero + image_embeds: a zero embedding, made below without the encoder
    else:
        negatives = _as_list(uncond)
        if len(negatives) not in (1, count):
            raise EncoderError(f"{len(negatives)} negative pictures for {count} references; give one, or one per reference")
        keys = [want_picture(img) for img in negatives]
        uncond_keys = keys * count if len(keys) == 1 else keys

    found = {key: cache.get(key) for key in needed}
    missing = [key for key, value in found.items() if value is None]
    if missing:
        with registry.use(encoder, device=device, dtype=dtype, encoder_id=encoder_id) as model:
            size = int(model.config.image_size)
            for start in range(0, len(missing), BATCH):
                chunk = missing[start:start + BATCH]
                pixels = []
                for key in chunk:
                    how, img = needed[key]
                    if how == "picture":
                        pixels.append(prepare_pixels(img, prep, size))
                    elif how == "noise":
                        pixels.append(_noise_pixels(size))
                    else:
                        pixels.append(torch.zeros(1, 3, size, size))
                out = run_encoder(model, torch.cat(pixels), output)
                for key, row in zip(chunk, out):
                    if dtype is not None:
                        row = row.to(dtype)
                    cache.put(key, row)
                    found[key] = row.detach().to("cpu")

    target = dict(device=device) if device is not None else {}
    if dtype is not None:
        target["dtype"] = dtype
    cond = torch.stack([found[k] for k in cond_keys]).to(**target) if cond_keys else None
    if uncond_keys is None:
        return cond, (torch.zeros_like(cond) if cond is not None else None)
    return cond, torch.stack([found[k] for k in uncond_keys]).to(**target)
