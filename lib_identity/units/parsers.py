"""Field parsers: each turns what an entry point sent into a field's value, or says in words what
it expected (``expected``, also shown in the README's field table).

One parser per kind of value (true/false, a number in a range, a list of numbers, a choice, a
model name, reference pictures, one picture or mask), used by every entry point: the accordion,
the API, pasted infotext and X/Y/Z cells. Images are PIL images; nothing here imports gradio.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

from .. import image_input

API = "api"
UI = "ui"
INFOTEXT = "infotext"
XYZ = "xyz"

MAX_IMAGES = 16


class Invalid(Exception):
    """Raised by a parser; the caller turns it into a UnitError naming unit and field."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class Context:
    source: str  # API | UI | INFOTEXT | XYZ
    decode_image: Callable[[str], Any] = image_input.decode_image_string
    open_upload: Optional[Callable[[str], Any]] = None


def show_value(value) -> str:
    """A value as a message quotes it: short, and never a whole base64 image."""
    if isinstance(value, str):
        if len(value) > 40:
            return repr(value[:24] + "…") + f" ({len(value)} characters)"
        return repr(value)
    if isinstance(value, (bool, int, float)) or value is None:
        return repr(value)
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"a {type(value).__name__}"


def got(expected: str, value) -> Invalid:
    return Invalid(f"expected {expected}, got {show_value(value)}")


def fmt_number(x: float) -> str:
    # repr is the shortest text that reads back as the same float: infotext keeps numbers exactly
    return repr(float(x))


def plain_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else fmt_number(x)


def norm_word(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


class Bool:
    expected = "true or false"
    _words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def __call__(self, value, ctx):
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in self._words:
            return self._words[value.strip().lower()]
        raise got(self.expected, value)


class Number:
    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.expected = f"a number from {plain_number(lo)} to {plain_number(hi)}"

    def number(self, value) -> Optional[float]:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return None
        if isinstance(value, numbers.Real):
            x = float(value)
        elif isinstance(value, str):
            try:
                x = float(value.strip())
            except ValueError:
                return None
        else:
            return None
        if not math.isfinite(x) or not self.lo <= x <= self.hi:
            return None
        return x

    def __call__(self, value, ctx):
        x = self.number(value)
        if x is None:
            raise got(self.expected, value)
        return x


class Numbers:
    """A list of numbers: a JSON list, or text like ``"0.5, 1, 0"`` (commas, spaces or ``+``)."""

    def __init__(self, lo, hi, *, most: int, empty, each: str):
        self.item = Number(lo, hi)
        self.most, self.empty = most, empty
        self.expected = f"a list of numbers from {self.item.expected[len('a number from '):]}, one per {each} (e.g. \"1, 0.5\")"

    def __call__(self, value, ctx):
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [t for t in re.split(r"[\s,;+]+", text) if t]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise got(self.expected, value)
        if not items:
            return self.empty
        if len(items) > self.most:
            raise Invalid(f"expected at most {self.most} numbers, got {len(items)}")
        out = []
        for i, item in enumerate(items, 1):
            x = self.item.number(item)
            if x is None:
                raise Invalid(f"expected {self.expected}; item {i} is {show_value(item)}")
            out.append(x)
        return tuple(out)


class Choice:
    def __init__(self, options: Sequence[str]):
        self.options = tuple(options)
        self.expected = "one of " + ", ".join(f"'{o}'" for o in self.options)

    def __call__(self, value, ctx):
        if isinstance(value, str):
            wanted = norm_word(value)
            for option in self.options:
                if norm_word(option) == wanted:
                    return option
        raise got(self.expected, value)


class Word:
    """One word of a prompt (PhotoMaker's trigger): letters, digits, ``_`` or ``-``; not a word of
    the WebUI's prompt syntax (``AND``, ``BREAK``)."""

    expected = "one word of letters, digits, '_' or '-' (like img), not AND or BREAK"
    _word = re.compile(r"^[\w\-]{1,40}$")
    _reserved = ("AND", "BREAK")

    def __call__(self, value, ctx):
        if isinstance(value, str):
            text = value.strip()
            if self._word.match(text) and text not in self._reserved:
                return text
        raise got(self.expected, value)


class FaceChoice:
    """Which face of a picture: ``"largest"``, an index in the face picker's numbering (0 = the
    largest face), or a box ``[x0, y0, x1, y1]`` in picture pixels (the face overlapping it most)."""

    expected = ("'largest', a face index (0 = the largest face; the face picker numbers them), "
                "or a box [x0, y0, x1, y1] in picture pixels")
    most_faces = 100

    def __call__(self, value, ctx):
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("largest", "auto", ""):
                return "largest"
            if text.isdigit():
                return self._index(int(text), value)
            parts = [t for t in re.split(r"[\s,;+]+", text.strip("[]()")) if t]
            if len(parts) == 4:
                return self._box(parts, value)
            raise got(self.expected, value)
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            raise got(self.expected, value)
        if isinstance(value, numbers.Integral):
            return self._index(int(value), value)
        if isinstance(value, numbers.Real) and float(value).is_integer():
            return self._index(int(value), value)
        if isinstance(value, (list, tuple)) and len(value) == 4:
            return self._box(value, value)
        raise got(self.expected, value)

    def _index(self, index: int, value):
        if not 0 <= index < self.most_faces:
            raise got(self.expected, value)
        return index

    def _box(self, parts, value):
        box = []
        for part in parts:
            x = Number(-1e6, 1e6).number(part)
            if x is None:
                raise got(self.expected, value)
            box.append(x)
        if not (box[0] < box[2] and box[1] < box[3]):
            raise Invalid(f"expected a box [x0, y0, x1, y1] with x0 < x1 and y0 < y1, got {show_value(value)}")
        return tuple(box)


class PoseFace(Choice):
    """Which face of InstantID's pose picture: ``"auto"``, ``"largest"`` or an index counted from
    the left (0 = the leftmost face). The options (for the dropdown and the X/Y/Z axis) list the
    first indexes; any index up to ``most_faces - 1`` is accepted."""

    most_faces = 100

    def __init__(self, listed: int = 8):
        super().__init__(("auto", "largest") + tuple(str(i) for i in range(listed)))
        self.expected = ("'auto' (the InstantID units sharing a pose picture take its faces from the left, in unit "
                         "order; a unit alone takes the largest face), 'largest', or a face index counted from the "
                         "left (0 = the leftmost face)")

    def __call__(self, value, ctx):
        if isinstance(value, str) and value.strip().lower() in ("auto", "largest"):
            return value.strip().lower()
        index = None
        if isinstance(value, str) and value.strip().isdigit():
            index = int(value.strip())
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and type(value).__name__ != "bool_" \
                and float(value).is_integer():
            index = int(value)
        if index is None or not 0 <= index < self.most_faces:
            raise got(self.expected, value)
        return index


class ModelName:
    expected = "a model name as GET /identity/v1/models lists it (e.g. 'ip-adapter_sd15' or 'ip-adapter_sd15 [0123abcd]')"

    def __call__(self, value, ctx):
        if not isinstance(value, str):
            raise got(self.expected, value)
        name = value.strip()
        if name.lower() == "none":  # what an empty dropdown shows
            return ""
        if len(name) > 300 or any(ord(c) < 32 for c in name):
            raise got(self.expected, value)
        return name


class ProfileName:
    """A saved identity profile, by name (``profiles.check_name``'s rule); "None" or empty: no profile."""

    expected = "a profile name as GET /identity/v1/profiles lists it (e.g. 'alice'), or empty for none"

    def __call__(self, value, ctx):
        if not isinstance(value, str):
            raise got(self.expected, value)
        name = value.strip()
        if name.lower() in ("", "none"):  # what an empty dropdown shows
            return ""
        from ..profiles.profile import ProfileError
        from ..profiles.store import check_name

        try:
            return check_name(name)
        except ProfileError as e:
            raise Invalid(str(e)) from None


def _to_image(value, ctx: Context):
    """One picture in any form the entry point allows -> PIL image (not yet converted)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image_input.check_size(value.size)
        return value
    if isinstance(value, str):
        return ctx.decode_image(value)
    if ctx.source == API:
        raise Invalid(f"expected a base64 string or a data:image/…;base64 URL, got {show_value(value)}")
    if hasattr(value, "__array_interface__"):
        return image_input.image_from_array(value)
    if isinstance(value, Mapping):
        if "image" in value or "mask" in value:  # gradio's image editor: {"image": …, "mask": …}
            if value.get("image") is None:
                raise Invalid("the image editor sent no image")
            return _to_image(value["image"], ctx)
        data, name = value.get("data"), value.get("name")
        if isinstance(data, str) and data:
            return ctx.decode_image(data)
        if isinstance(name, str) and name:  # a gallery entry: {"name": "/tmp/…png", "is_file": true}
            return _open_upload(name, ctx)
        raise Invalid("an image entry without image data or a file name")
    name = getattr(value, "name", None)  # the tempfile wrapper gr.File / gr.UploadButton give
    if isinstance(name, str) and name:
        return _open_upload(name, ctx)
    raise Invalid(f"expected an image, got {show_value(value)}")


def _open_upload(path: str, ctx: Context):
    opener = ctx.open_upload or image_input.open_upload
    return opener(path)


def _image_or_invalid(value, ctx, *, label="the image"):
    try:
        return _to_image(value, ctx)
    except Invalid as e:
        raise Invalid(f"{label}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - decoders the glue passes in may raise anything
        raise Invalid(f"{label}: {str(e) or type(e).__name__}") from None


def _as_mask(img):
    """Region masks become one 8-bit channel: the alpha channel where the image has transparency,
    its brightness otherwise (white = where the unit acts)."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        alpha = img.convert("RGBA").getchannel("A")
        if alpha.getextrema() != (255, 255):
            return _plain_image(alpha)
    return _plain_image(img.convert("L"))


def _rgb_copy(img):
    """RGB as the encoders see it (transparency laid on white, ``encoders.to_rgb``), as our own copy:
    callers' objects stay untouched."""
    from ..encoders.preprocess import to_rgb

    rgb = to_rgb(img)
    return rgb.copy() if rgb is img else rgb


def _plain_image(img):
    # Our own copy: drop file metadata (EXIF, ICC, PNG text) so a picture is only its pixels.
    img.info = {}
    return img


class Images:
    expected = f"a list of images (base64 strings or data:image/png|jpeg|webp;base64 URLs), at most {MAX_IMAGES}"

    def __call__(self, value, ctx):
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # one image on its own is a list of one
        if len(items) > MAX_IMAGES:
            raise Invalid(f"expected at most {MAX_IMAGES} reference images, got {len(items)}")
        out = []
        for i, item in enumerate(items, 1):
            if ctx.source == UI and isinstance(item, (list, tuple)) and len(item) == 2 and (item[1] is None or isinstance(item[1], str)):
                item = item[0]  # gradio gallery entries come as [image, caption]
            if item is None:
                raise Invalid(f"image {i} of {len(items)} is empty (null)")
            img = _image_or_invalid(item, ctx, label=f"image {i} of {len(items)}")
            out.append(_plain_image(_rgb_copy(img)))
        return tuple(out)


class OneImage:
    def __init__(self, *, mask: bool):
        self.mask = mask
        if mask:
            self.expected = "a grayscale or RGBA image (white or opaque = where the unit acts), as base64 or a data URL"
        else:
            self.expected = "an image, as base64 or a data URL"

    def __call__(self, value, ctx):
        if not self.mask:
            return _plain_image(_rgb_copy(_image_or_invalid(value, ctx)))
        if ctx.source != API and isinstance(value, Mapping) and ("image" in value or "mask" in value):
            # gradio's image editor: the painted strokes are the mask; with nothing painted, the
            # uploaded picture itself is taken as the mask.
            painted, picture = value.get("mask"), value.get("image")
            if painted is not None:
                mask = _as_mask(_image_or_invalid(painted, ctx, label="the mask"))
                if mask.getextrema()[1] > 0 or picture is None:
                    return mask
            if picture is None:
                raise Invalid("the image editor sent no mask")
            value = picture
        return _as_mask(_image_or_invalid(value, ctx, label="the mask"))


# ---------------------------------------------------------------------------- the Unit

