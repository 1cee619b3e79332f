"""Turning what a request or the UI sends as a picture into a PIL image, strictly.

Images are the only binary input the extension takes from outside, so this is the one place
that decodes them: base64 strings and ``data:image/…`` URLs from the API, files that gradio
uploaded to its temp folder, and the PIL images / numpy arrays gradio hands to the UI glue.
Only PNG, JPEG and WebP are accepted, with size limits checked before the pixels are decoded,
and nothing is ever fetched from a URL or unpickled.

Failures raise ``ImageInputError`` (a ``ValueError``) with a sentence for the user; the unit
parser adds which unit and field it was.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import tempfile
from typing import Callable, Iterable, Optional, Sequence

# Limits: a 50-megapixel camera photo passes, a decompression bomb does not.
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_IMAGE_PIXELS = 8192 * 8192
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")

_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)
_MIME_FORMATS = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}
# First bytes of formats people send by mistake, so the message can say what it was.
_OTHER_MAGIC = (
    (b"GIF8", "a GIF image"),
    (b"BM", "a BMP image"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x00\x0cjP", "a JPEG 2000 image"),
    (b"PK\x03\x04", "a zip archive (a torch.save file?)"),
    (b"\x80", "a Python pickle"),
    (b"<", "text / HTML"),
    (b"{", "JSON text"),
)


class ImageInputError(ValueError):
    """A picture could not be taken: the message says why and what to send instead."""


def _sniff(data: bytes) -> Optional[str]:
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _what_is(data: bytes) -> str:
    for magic, name in _OTHER_MAGIC:
        if data.startswith(magic):
            return name
    return f"data that is no image (it starts with {data[:8]!r})"


def image_from_bytes(data: bytes):
    """Decode PNG, JPEG or WebP bytes into an upright PIL image; anything else is refused."""
    from PIL import Image, ImageOps

    if not data:
        raise ImageInputError("the image is empty (0 bytes)")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageInputError(f"the image is {len(data) / 2**20:.1f} MiB; the limit is {MAX_IMAGE_BYTES // 2**20} MiB")
    kind = _sniff(data)
    if kind is None:
        raise ImageInputError(f"expected a PNG, JPEG or WebP image, got {_what_is(data)}")
    try:
        img = Image.open(io.BytesIO(data), formats=[kind])
    except Image.DecompressionBombError:
        raise ImageInputError(f"the image has more than {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad headers
        raise ImageInputError(f"the {kind} header cannot be read ({type(e).__name__}); the image is corrupt") from None
    check_size(img.size)
    try:
        img.load()
    except Exception as e:  # noqa: BLE001
        raise ImageInputError(f"the {kind} data is truncated or corrupt ({_short(e)})") from None
    return _upright(img, ImageOps)


def _upright(img, ImageOps):
    # Browsers show phone photos rotated by their EXIF orientation and gradio decodes them the
    # same way, so the API path must too, or the same photo would give two different references.
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the picture
        return img


def _short(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:120]


def check_size(size: Sequence[int]):
    """Refuse empty images and images over ``MAX_IMAGE_PIXELS`` before their pixels are decoded."""
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ImageInputError(f"the image is {w}x{h} pixels; it has no pixels")
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageInputError(
            f"the image is {w}x{h} pixels ({w * h / 1e6:.0f} megapixels); the limit is {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels"
        )


def decode_image_string(text: str):
    """A base64 string or a ``data:image/png|jpeg|webp;base64,…`` URL -> PIL image.

    URLs are never fetched and nothing but the three image formats is decoded.
    """
    if not isinstance(text, str):
        raise ImageInputError(f"expected a base64 string or a data URL, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise ImageInputError("the image string is empty")
    if re.match(r"^[a-z][a-z0-9+.-]*://", s, re.IGNORECASE):
        raise ImageInputError("image URLs are not fetched; send the image itself as base64 or a data:image/png;base64,… URL")
    m = _DATA_URL.match(s)
    if m:
        mime = m.group(1).strip().lower()
        if ";base64" not in m.group(2).lower():
            raise ImageInputError("a data URL must be base64-encoded (data:image/png;base64,…)")
        if mime not in _MIME_FORMATS:
            raise ImageInputError(f"data URL of type '{mime or 'none'}'; expected image/png, image/jpeg or image/webp")
        s = s[m.end():]
    # JSON clients wrap long strings; padding is often dropped. Nothing else is forgiven.
    s = re.sub(r"\s+", "", s)
    if len(s) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise ImageInputError(f"the image string is {len(s)} characters; the limit is {MAX_IMAGE_BYTES // 2**20} MiB of image data")
    s += "=" * (-len(s) % 4)
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ImageInputError("not valid base64 (send the file's bytes base64-encoded, or a data:image/…;base64, URL)") from None
    return image_from_bytes(data)


def upload_roots() -> list:
    """The folder gradio 3.41 writes uploads and gallery files to: ``$GRADIO_TEMP_DIR``, else
    ``<system temp>/gradio``. (The WebUI's own "temp_dir" setting is added by the UI glue.)"""
    return [os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")]


def upload_opener(roots: Iterable[str]) -> Callable[[str], object]:
    """A function that opens an uploaded file by path, but only below ``roots``.

    The UI glue passes the WebUI's temp folders; a path anywhere else (a request that puts
    ``{"name": "/etc/passwd", "is_file": true}`` in an image slot) is refused.
    """
    real_roots = [os.path.realpath(r) for r in roots if r]

    def open_upload(path: str):
        if not isinstance(path, str) or not path:
            raise ImageInputError("expected the path of an uploaded file")
        real = os.path.realpath(path.split("?", 1)[0])
        if not any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in real_roots):
            raise ImageInputError("the file is not an upload (only files in the WebUI's temp folder are read)")
        try:
            size = os.path.getsize(real)
            if size > MAX_IMAGE_BYTES:
                raise ImageInputError(f"the file is {size / 2**20:.1f} MiB; the limit is {MAX_IMAGE_BYTES // 2**20} MiB")
            with open(real, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise ImageInputError(f"the uploaded file cannot be read ({e.strerror or e})") from None
        return image_from_bytes(data)

    return open_upload


def open_upload(path: str):
    """Open an uploaded file found below ``upload_roots()`` (see ``upload_opener``)."""
    return upload_opener(upload_roots())(path)


def image_from_array(arr):
    """A numpy image as gradio gives it (HxW, HxWx1/3/4; uint8, bool or floats in 0..1) -> PIL."""
    import numpy as np
    from PIL import Image

    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise ImageInputError(f"an image array of shape {list(a.shape)}; expected height x width (x 3 or 4)")
    check_size((a.shape[1], a.shape[0]))
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype.kind == "f":
        if not np.isfinite(a).all():
            raise ImageInputError("the image array holds NaN or infinite values")
        # gradio gives uint8; floats come from Python callers, in 0..1 or 0..255
        scale = 255.0 if a.size and float(a.max()) <= 1.0 else 1.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise ImageInputError(f"the image array holds values outside 0..255 ({a.dtype})")
        a = a.astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def image_hash(img) -> str:
    """8 hex digits naming a picture by its pixels: the same image from the UI or the API hashes the same.

    The first 8 hex digits of the digest the encoding cache keys on (size and RGB pixels), so
    file format, metadata and compression don't matter.
    """
    from .encoders.preprocess import image_digest

    return image_digest(img)[:8]


def encode_png_data_url(img) -> str:
    """A PIL image as a ``data:image/png;base64,…`` URL (what the API accepts)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
