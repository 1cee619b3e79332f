"""Turning reference pictures into the pixel tensor a CLIP vision encoder takes.

The default (``Preparation()``) is exactly what the official code feeds the encoder:
transformers' ``CLIPImageProcessor()`` - shortest side to 224 with PIL's bicubic filter,
centre crop, scale to [0, 1], OpenAI mean/std. The same steps are done here with PIL and
numpy in the same order and precision, so the numbers are identical, not merely close.

Non-square pictures lose their ends to the centre crop, so three other fits are offered
(users asked the other tools for them): ``crop`` at another position, ``pad`` (letterbox: the
whole picture, bars of ``pad_color``) and ``squash`` (the whole picture, stretched).

Transparency: pictures with an alpha channel are laid on white first, as transformers'
current ``convert_to_rgb`` does (older versions dropped the alpha and kept whatever colour
the transparent pixels had, which is usually black and arbitrary).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from ..errors import PreparationError

# OpenAI CLIP normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

MODES = ("crop", "pad", "squash")
CROP_POSITIONS = ("center", "top", "bottom", "left", "right")

ImageLike = Union[Image.Image, np.ndarray]


def _parse_color(value) -> Tuple[int, int, int]:
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"#?[0-9a-fA-F]{6}", text):
            text = text.lstrip("#")
            return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
        raise PreparationError(f"pad colour '{value}' is not a colour; use '#rrggbb' or three numbers 0-255")
    try:
        rgb = tuple(int(c) for c in value)
    except (TypeError, ValueError):
        raise PreparationError(f"pad colour {value!r} is not a colour; use '#rrggbb' or three numbers 0-255") from None
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        raise PreparationError(f"pad colour {value!r} must be three numbers from 0 to 255 (red, green, blue)")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class Preparation:
    """How a reference picture is fitted into the encoder's square.

    ``mode``: ``"crop"`` (shortest side to the encoder size, then crop a square at
    ``crop_position``; the default with ``"center"`` is the official processor),
    ``"pad"`` (longest side to the size, bars of ``pad_color`` keep the whole picture) or
    ``"squash"`` (both sides to the size; the whole picture, its proportions changed).
    ``crop_position`` only matters for ``crop``; ``top``/``bottom`` act on tall pictures and
    ``left``/``right`` on wide ones (the other axis is already the full picture).
    ``pad_color`` is ``(r, g, b)`` or ``"#rrggbb"``; black by default, as ComfyUI_IPAdapter_plus pads.
    """

    mode: str = "crop"
    crop_position: str = "center"
    pad_color: Tuple[int, int, int] = (0, 0, 0)

    def __post_init__(self):
        mode = str(self.mode).strip().lower()
        if mode not in MODES:
            raise PreparationError(f"image preparation '{self.mode}' is not one of {', '.join(MODES)}")
        position = str(self.crop_position).strip().lower()
        if position == "centre":
            position = "center"
        if position not in CROP_POSITIONS:
            raise PreparationError(f"crop position '{self.crop_position}' is not one of {', '.join(CROP_POSITIONS)}")
        # frozen: normalised values are written once, here
        object.__setattr__(self, "mode", mode)
        object.__setattr__(self, "crop_position", position)
        object.__setattr__(self, "pad_color", _parse_color(self.pad_color))

    def describe(self) -> str:
        """Short text for infotext and logs, e.g. ``crop center`` or ``pad #000000``; ``parse`` reads it back."""
        if self.mode == "crop":
            return f"crop {self.crop_position}"
        if self.mode == "pad":
            return "pad #%02x%02x%02x" % self.pad_color
        return "squash"

    @classmethod
    def parse(cls, text: str) -> "Preparation":
        """The preparation ``describe`` wrote (``crop top``, ``pad #ffffff``, ``squash``; a bare mode takes defaults)."""
        words = str(text or "").split()
        if not words or len(words) > 2:
            raise PreparationError(f"image preparation '{text}' is not 'crop <position>', 'pad <#rrggbb>' or 'squash'")
        mode, arg = words[0], words[1] if len(words) == 2 else None
        if arg is None:
            return cls(mode=mode)
        if mode.lower() == "crop":
            return cls(mode=mode, crop_position=arg)
        if mode.lower() == "pad":
            return cls(mode=mode, pad_color=arg)
        raise PreparationError(f"image preparation '{text}': '{mode}' takes no setting")


DEFAULT_PREPARATION = Preparation()


def to_rgb(image: ImageLike) -> Image.Image:
    """An RGB PIL image: alpha laid on white, other modes converted; numpy HxW(xC) uint8 accepted."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise PreparationError(
                f"a reference picture given as an array must be height x width (x 1, 3 or 4) of uint8, "
                f"got shape {list(image.shape)} of {image.dtype}"
            )
        image = Image.fromarray(image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise PreparationError(f"a reference picture must be a PIL image, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise PreparationError(f"a reference picture is empty ({image.width}x{image.height})")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def image_digest(image: ImageLike) -> str:
    """sha256 of the picture's content as the encoder sees it (RGB pixels and size), in hex.

    Two PIL objects with the same pixels have the same digest; file name, metadata and
    object identity do not count.
    """
    rgb = to_rgb(image)
    h = hashlib.sha256()
    h.update(f"{rgb.mode}:{rgb.width}x{rgb.height}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def _shortest_side_size(width: int, height: int, size: int) -> Tuple[int, int]:
    # transformers' get_resize_output_image_size(default_to_square=False): the long side is
    # truncated, not rounded.
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def fit(image: ImageLike, prep: Preparation = DEFAULT_PREPARATION, size: int = 224) -> Image.Image:
    """The picture fitted into a ``size`` x ``size`` RGB square as ``prep`` says."""
    rgb = to_rgb(image)
    w, h = rgb.size
    if prep.mode == "squash":
        return rgb.resize((size, size), resample=Image.BICUBIC)
    if prep.mode == "pad":
        scale = size / max(w, h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        canvas = Image.new("RGB", (size, size), prep.pad_color)
        canvas.paste(rgb.resize((nw, nh), resample=Image.BICUBIC), ((size - nw) // 2, (size - nh) // 2))
        return canvas
    nw, nh = _shortest_side_size(w, h, size)
    resized = rgb.resize((nw, nh), resample=Image.BICUBIC)
    # centre offsets floor like transformers' center_crop
    left, top = (nw - size) // 2, (nh - size) // 2
    if prep.crop_position == "top":
        top = 0
    elif prep.crop_position == "bottom":
        top = nh - size
    elif prep.crop_position == "left":
        left = 0
    elif prep.crop_position == "right":
        left = nw - size
    return resized.crop((left, top, left + size, top + size))


def cropped_fraction(image: ImageLike, prep: Preparation = DEFAULT_PREPARATION) -> float:
    """How much of the picture's area ``prep`` cuts away (0 for pad and squash).

    For warnings: the official centre crop drops the ends of a non-square picture, which
    may be where the subject is.
    """
    if prep.mode != "crop":
        return 0.0
    w, h = image.size if isinstance(image, Image.Image) else (image.shape[1], image.shape[0])
    return 1.0 - min(w, h) / max(w, h)


def normalize(square: Image.Image) -> np.ndarray:
    """3 x H x W float32, scaled and normalised in the processor's precision (float64 scale, float32 rest)."""
    arr = np.asarray(square, dtype=np.uint8)
    arr = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    arr = (arr - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def prepare_pixels(images: Union[ImageLike, Sequence[ImageLike]], prep: Preparation = DEFAULT_PREPARATION, size: int = 224):
    """``Tensor[N, 3, size, size]`` (float32, normalised) for one picture or a list of them."""
    import torch

    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    images = list(images)
    if not images:
        raise PreparationError("no reference pictures were given")
    if not isinstance(prep, Preparation):
        raise PreparationError(f"preparation must be a Preparation, got {type(prep).__name__}")
    return torch.from_numpy(np.stack([normalize(fit(img, prep, size)) for img in images]))


__all__: List[str] = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CROP_POSITIONS",
    "DEFAULT_PREPARATION",
    "MODES",
    "Preparation",
    "cropped_fraction",
    "PreparationError",
    "fit",
    "image_digest",
    "normalize",
    "prepare_pixels",
    "to_rgb",
]
