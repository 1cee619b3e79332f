"""The Unit: one model, its reference images and its knobs, from every entry point.

One type and one set of field parsers serve the accordion (positional UI values), the API
(``alwayson_scripts: {"identity": {"args": [unit, unit, …]}}`` with units as JSON objects),
pasted infotext (``lib_identity.unit_infotext``) and X/Y/Z cells (``apply_overrides``).
Every failure is a ``UnitError`` that names the unit (1-based, as the UI shows "Unit 1") and
the field, says what was expected and what came instead.

A field is declared once, in ``Unit``: its default, its parser (which also says in words what
it accepts, for messages and the README) and a line of help. Adding a field is one line there;
the API accepts it, the UI layout (``UI_FIELDS``) gains it at the end of the unit's block,
and unknown API fields keep being refused.

No WebUI or gradio imports. Images are PIL images.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from . import image_input
from .errors import IdentityError, UnitError
from .formats import CROSS_ATTENTION_LAYERS, describe_encoder
from .unet.layer_weights import PRESETS
from .unet.references import COMBINE_MODES as REFERENCE_COMBINE_MODES

# ---------------------------------------------------------------------------- choices

# The layer-weight presets and combine modes are named where they are implemented, so the UI,
# the API, infotext and X/Y/Z offer exactly what the UNet code does.
LAYER_PRESETS = PRESETS  # defined with their block choices in lib_identity.unet.layer_weights
CUSTOM_LAYERS = "custom"  # the preset name that means "use layer_weights"
LAYER_PRESET_CHOICES = LAYER_PRESETS + (CUSTOM_LAYERS,)
COMBINE_MODES = REFERENCE_COMBINE_MODES  # lib_identity.unet.references
WEIGHTED = "weighted average"
PREPARATIONS = ("crop", "pad", "squash")
CROP_POSITIONS = ("center", "top", "bottom", "left", "right")
UNCOND_MODES = ("zero", "noise", "image")

WEIGHT_RANGE = (-1.0, 3.0)
LAYER_WEIGHT_RANGE = (-1.0, 3.0)
IMAGE_WEIGHT_RANGE = (0.0, 10.0)
MAX_IMAGES = 16
MAX_LAYER_WEIGHTS = max(CROSS_ATTENTION_LAYERS.values())

BASE_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
# Model families a unit can run; encoders and IdentityNet are helpers found by the unit's model.
ADAPTER_FAMILIES = ("ip-adapter", "ip-adapter-faceid", "instantid-adapter", "photomaker")

# Where a missing helper model goes, said when ``find_encoder`` has nothing better to say.
ENCODER_HELP = {
    "clip-vit-h": "put the CLIP ViT-H/14 image encoder (model.safetensors of laion/CLIP-ViT-H-14-laion2B-s32B-b79K) "
    "into models/clip_vision",
    "clip-vit-bigg": "put the CLIP ViT-bigG/14 image encoder (model.safetensors of laion/CLIP-ViT-bigG-14-laion2B-39B-b160k) "
    "into models/clip_vision",
    "clip-vit-l": "put the CLIP ViT-L/14 image encoder (model.safetensors of openai/clip-vit-large-patch14) into models/clip_vision",
    "insightface:buffalo_l": "unpack insightface's buffalo_l face models into models/insightface/models/buffalo_l",
    "insightface:antelopev2": "unpack insightface's antelopev2 face models into models/insightface/models/antelopev2",
    "instantid-identitynet": "put InstantID's IdentityNet (ControlNet/diffusion_pytorch_model.safetensors of InstantX/InstantID) "
    "into models/ControlNet, e.g. as control_instant_id_sdxl.safetensors",
}

API = "api"
UI = "ui"
INFOTEXT = "infotext"
XYZ = "xyz"


# ---------------------------------------------------------------------------- field parsers


class _Invalid(Exception):
    """Raised by a parser; the caller turns it into a UnitError naming unit and field."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass
class _Context:
    source: str  # API | UI | INFOTEXT | XYZ
    decode_image: Callable[[str], Any] = image_input.decode_image_string
    open_upload: Optional[Callable[[str], Any]] = None


def _show(value) -> str:
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


def _got(expected: str, value) -> _Invalid:
    return _Invalid(f"expected {expected}, got {_show(value)}")


def _fmt(x: float) -> str:
    return repr(round(float(x), 6))


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else _fmt(x)


def _norm_word(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


class _Bool:
    expected = "true or false"
    _words = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def __call__(self, value, ctx):
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        if isinstance(value, numbers.Integral) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in self._words:
            return self._words[value.strip().lower()]
        raise _got(self.expected, value)


class _Number:
    def __init__(self, lo: float, hi: float):
        self.lo, self.hi = lo, hi
        self.expected = f"a number from {_plain(lo)} to {_plain(hi)}"

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
            raise _got(self.expected, value)
        return x


class _Numbers:
    """A list of numbers: a JSON list, or text like ``"0.5, 1, 0"`` (commas, spaces or ``+``)."""

    def __init__(self, lo, hi, *, most: int, empty, each: str):
        self.item = _Number(lo, hi)
        self.most, self.empty = most, empty
        self.expected = f"a list of numbers from {self.item.expected[len('a number from '):]}, one per {each} (e.g. \"1, 0.5\")"

    def __call__(self, value, ctx):
        if isinstance(value, str):
            text = value.strip().strip("[]()")
            items = [t for t in re.split(r"[\s,;+]+", text) if t]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _got(self.expected, value)
        if not items:
            return self.empty
        if len(items) > self.most:
            raise _Invalid(f"expected at most {self.most} numbers, got {len(items)}")
        out = []
        for i, item in enumerate(items, 1):
            x = self.item.number(item)
            if x is None:
                raise _Invalid(f"expected {self.expected}; item {i} is {_show(item)}")
            out.append(x)
        return tuple(out)


class _Choice:
    def __init__(self, options: Sequence[str]):
        self.options = tuple(options)
        self.expected = "one of " + ", ".join(f"'{o}'" for o in self.options)

    def __call__(self, value, ctx):
        if isinstance(value, str):
            wanted = _norm_word(value)
            for option in self.options:
                if _norm_word(option) == wanted:
                    return option
        raise _got(self.expected, value)


class _ModelName:
    expected = "a model name as GET /identity/v1/models lists it (e.g. 'ip-adapter_sd15' or 'ip-adapter_sd15 [0123abcd]')"

    def __call__(self, value, ctx):
        if not isinstance(value, str):
            raise _got(self.expected, value)
        name = value.strip()
        if name.lower() == "none":  # what an empty dropdown shows
            return ""
        if len(name) > 300 or any(ord(c) < 32 for c in name):
            raise _got(self.expected, value)
        return name


def _to_image(value, ctx: _Context):
    """One picture in any form the entry point allows -> PIL image (not yet converted)."""
    from PIL import Image

    if isinstance(value, Image.Image):
        image_input.check_size(value.size)
        return value
    if isinstance(value, str):
        return ctx.decode_image(value)
    if ctx.source == API:
        raise _Invalid(f"expected a base64 string or a data:image/…;base64 URL, got {_show(value)}")
    if hasattr(value, "__array_interface__"):
        return image_input.image_from_array(value)
    if isinstance(value, Mapping):
        if "image" in value or "mask" in value:  # gradio's image editor: {"image": …, "mask": …}
            if value.get("image") is None:
                raise _Invalid("the image editor sent no image")
            return _to_image(value["image"], ctx)
        data, name = value.get("data"), value.get("name")
        if isinstance(data, str) and data:
            return ctx.decode_image(data)
        if isinstance(name, str) and name:  # a gallery entry: {"name": "/tmp/…png", "is_file": true}
            return _open_upload(name, ctx)
        raise _Invalid("an image entry without image data or a file name")
    name = getattr(value, "name", None)  # the tempfile wrapper gr.File / gr.UploadButton give
    if isinstance(name, str) and name:
        return _open_upload(name, ctx)
    raise _Invalid(f"expected an image, got {_show(value)}")


def _open_upload(path: str, ctx: _Context):
    opener = ctx.open_upload or image_input.open_upload
    return opener(path)


def _image_or_invalid(value, ctx, *, label="the image"):
    try:
        return _to_image(value, ctx)
    except _Invalid as e:
        raise _Invalid(f"{label}: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - decoders the glue passes in may raise anything
        raise _Invalid(f"{label}: {str(e) or type(e).__name__}") from None


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
    from .encoders.preprocess import to_rgb

    rgb = to_rgb(img)
    return rgb.copy() if rgb is img else rgb


def _plain_image(img):
    # Our own copy: drop file metadata (EXIF, ICC, PNG text) so a picture is only its pixels.
    img.info = {}
    return img


class _Images:
    expected = f"a list of images (base64 strings or data:image/png|jpeg|webp;base64 URLs), at most {MAX_IMAGES}"

    def __call__(self, value, ctx):
        if isinstance(value, (list, tuple)):
            items = list(value)
        else:
            items = [value]  # one image on its own is a list of one
        if len(items) > MAX_IMAGES:
            raise _Invalid(f"expected at most {MAX_IMAGES} reference images, got {len(items)}")
        out = []
        for i, item in enumerate(items, 1):
            if ctx.source == UI and isinstance(item, (list, tuple)) and len(item) == 2 and (item[1] is None or isinstance(item[1], str)):
                item = item[0]  # gradio gallery entries come as [image, caption]
            if item is None:
                raise _Invalid(f"image {i} of {len(items)} is empty (null)")
            img = _image_or_invalid(item, ctx, label=f"image {i} of {len(items)}")
            out.append(_plain_image(_rgb_copy(img)))
        return tuple(out)


class _OneImage:
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
                raise _Invalid("the image editor sent no mask")
            value = picture
        return _as_mask(_image_or_invalid(value, ctx, label="the mask"))


# ---------------------------------------------------------------------------- the Unit


@dataclass(frozen=True)
class _Spec:
    parse: Callable
    help: str
    axis: bool = False  # offered as an X/Y/Z axis
    overridable: bool = True  # settable per X/Y/Z cell (images are not)


def _field(default, parse, help_text, *, axis=False, overridable=True):
    return field(default=default, metadata={"spec": _Spec(parse, help_text, axis, overridable)})


@dataclass(frozen=True)
class Unit:
    """One identity unit, validated and normalised (images decoded, choices spelled canonically).

    Invariants: ``start < end``; ``len(image_weights) == len(images)``; ``layer_weights`` is
    set exactly when ``layer_preset == "custom"``; ``negative_image`` is set exactly when
    ``uncond == "image"``. Build it with ``from_api`` / ``from_ui`` / ``parse_script_args``.
    """

    enabled: bool = _field(False, _Bool(), "use this unit", axis=True)
    model: str = _field("", _ModelName(), "the model, by the name GET /identity/v1/models lists (name or 'name [hash]')", axis=True)
    images: Tuple[Any, ...] = _field((), _Images(), "the reference pictures", overridable=False)
    image_weights: Tuple[float, ...] = _field(
        (),
        _Numbers(*IMAGE_WEIGHT_RANGE, most=MAX_IMAGES, empty=(), each="reference image"),
        "how much each reference image counts when combine is 'weighted average' (default 1 each)",
    )
    weight: float = _field(1.0, _Number(*WEIGHT_RANGE), "strength of the unit; negative pushes away from the reference", axis=True)
    start: float = _field(0.0, _Number(0.0, 1.0), "fraction of the sampling steps where the unit starts acting", axis=True)
    end: float = _field(1.0, _Number(0.0, 1.0), "fraction of the sampling steps where it stops (after start)", axis=True)
    combine: str = _field("average", _Choice(COMBINE_MODES), "how several reference images are combined", axis=True)
    preparation: str = _field("crop", _Choice(PREPARATIONS), "how a reference image is fitted to the encoder's square input")
    crop_position: str = _field("center", _Choice(CROP_POSITIONS), "which part a 'crop' preparation keeps")
    layer_preset: str = _field("standard", _Choice(LAYER_PRESET_CHOICES), "which UNet layers get the identity ('custom': layer_weights)", axis=True)
    layer_weights: Optional[Tuple[float, ...]] = _field(
        None,
        _Numbers(*LAYER_WEIGHT_RANGE, most=MAX_LAYER_WEIGHTS, empty=None, each="cross-attention layer"),
        "custom weight per cross-attention layer in UNet order (16 for SD1.5, 70 for SDXL); implies layer_preset 'custom'",
    )
    mask: Optional[Any] = _field(None, _OneImage(mask=True), "region where the unit acts (white), the rest is left alone", overridable=False)
    uncond: str = _field("zero", _Choice(UNCOND_MODES), "what the negative (uncond) side sees: zeros, noise, or negative_image")
    negative_image: Optional[Any] = _field(None, _OneImage(mask=False), "the picture to steer away from (uncond 'image')", overridable=False)

    # A disabled UI unit with a bad value keeps its error here instead of failing every
    # generation; it is raised if an X/Y/Z cell turns the unit on.
    _deferred_error: Optional[UnitError] = field(default=None, compare=False, repr=False)

    @cached_property
    def image_hashes(self) -> Tuple[str, ...]:
        """8-hex content hash of each reference image (``image_input.image_hash``)."""
        return tuple(image_input.image_hash(img) for img in self.images)

    @classmethod
    def from_api(cls, d: Mapping, number: int, *, decode_image: Callable[[str], Any] = image_input.decode_image_string) -> "Unit":
        """A unit from an API JSON object. ``number`` is the unit's 1-based position (for messages).

        Missing fields take their defaults, except ``enabled``, which is true: sending a unit
        means using it. ``null`` means "the default". Unknown fields are refused.
        """
        if isinstance(d, Unit):
            return d
        if not isinstance(d, Mapping):
            raise UnitError(number, None, f"expected a unit object with named fields ({', '.join(API_FIELDS)}), got {_show(d)}")
        for key in d:
            if key not in _SPECS:
                raise UnitError(number, str(key), _unknown_field(str(key), API_FIELDS))
        ctx = _Context(API, decode_image, _refuse_paths)
        values = dict(_DEFAULTS, enabled=True)
        given = set()
        for name, raw in d.items():
            if raw is None:
                continue
            values[name] = _parse(name, raw, number, ctx)
            given.add(name)
        return _finish(values, number, API, given)

    @classmethod
    def from_ui(
        cls,
        values: Sequence,
        number: int,
        *,
        decode_image: Callable[[str], Any] = image_input.decode_image_string,
        open_upload: Optional[Callable[[str], Any]] = None,
    ) -> "Unit":
        """A unit from the accordion's positional values, in ``UI_FIELDS`` order.

        Takes what gradio 3.41 components give: PIL images, numpy arrays, ``{"image", "mask"}``
        dicts from the image editor, gallery entries (``{"name": path, "is_file": true}``,
        ``[entry, caption]``), upload tempfiles, and base64 strings from API callers that send
        positional values. Files are read only through ``open_upload`` (default: below the
        temp folders gradio writes uploads to). Missing trailing values take their defaults.
        """
        vals = list(values)
        if len(vals) > len(UI_FIELDS):
            raise UnitError(number, None, f"expected {len(UI_FIELDS)} values ({', '.join(UI_FIELDS)}), got {len(vals)}")
        ctx = _Context(UI, decode_image, open_upload)
        out = dict(_DEFAULTS)
        for name, raw in zip(UI_FIELDS, vals):
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue  # empty textboxes / image slots mean "default"
            out[name] = _parse(name, raw, number, ctx)
        return _finish(out, number, UI, set(UI_FIELDS))

    def to_api(self) -> dict:
        """The unit as an API JSON object (images as PNG data URLs); ``from_api`` reads it back."""
        d = {}
        for name in API_FIELDS:
            v = getattr(self, name)
            if name == "images":
                v = [image_input.encode_png_data_url(img) for img in v]
            elif name in ("mask", "negative_image"):
                v = None if v is None else image_input.encode_png_data_url(v)
            elif isinstance(v, tuple):
                v = list(v)
            d[name] = v
        return d


_SPECS: Dict[str, _Spec] = {f.name: f.metadata["spec"] for f in dataclasses.fields(Unit) if "spec" in f.metadata}
_DEFAULTS: Dict[str, Any] = {f.name: f.default for f in dataclasses.fields(Unit) if "spec" in f.metadata}

# The named fields of an API unit object.
API_FIELDS: Tuple[str, ...] = tuple(_SPECS)
# The order of one unit's values in the script's args (the UI glue lays out its components in
# this order). A new field is appended, so older positional callers keep working. No default
# value of these components may be a dict: a dict in the args means an API unit object.
UI_FIELDS: Tuple[str, ...] = tuple(_SPECS)
# Fields an X/Y/Z cell may override, and the ones offered as axes.
OVERRIDABLE_FIELDS: Tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.overridable)
AXIS_FIELDS: Tuple[str, ...] = tuple(n for n, s in _SPECS.items() if s.axis)
API_DEFAULTS: Dict[str, Any] = dict(_DEFAULTS, enabled=True)


def field_docs() -> List[dict]:
    """Every field with its API default, what it accepts and what it does (for the README)."""
    rows = []
    for name, spec in _SPECS.items():
        default = API_DEFAULTS[name]
        rows.append({"name": name, "default": list(default) if isinstance(default, tuple) else default,
                     "accepts": spec.parse.expected, "help": spec.help})
    return rows


def _unknown_field(key: str, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown field; {hint}valid fields are: {', '.join(valid)}"


def _refuse_paths(path):
    raise image_input.ImageInputError("file paths are not accepted here; send the image as base64")


def _parse(name: str, raw, number: int, ctx: _Context):
    try:
        return _SPECS[name].parse(raw, ctx)
    except _Invalid as e:
        raise UnitError(number, name, e.message) from None
    except image_input.ImageInputError as e:
        raise UnitError(number, name, str(e)) from None


def _finish(values: dict, number: int, source: str, given: set, **extra) -> Unit:
    """Cross-field rules, then the Unit. ``given``: the fields this entry point set explicitly."""
    v = values
    if v["end"] <= v["start"]:
        if "start" in given and "end" not in given:
            raise UnitError(number, "start", f"expected a number below end ({_fmt(v['end'])}), got {_fmt(v['start'])}")
        raise UnitError(number, "end", f"expected a number above start ({_fmt(v['start'])}) and at most 1, got {_fmt(v['end'])}")

    # layer_preset / layer_weights: the UI keeps a stale custom list while a named preset is
    # chosen (dropped); an API unit that names a preset *and* sends a list is contradictory.
    preset, lw = v["layer_preset"], v["layer_weights"]
    if preset == CUSTOM_LAYERS:
        if lw is None:
            raise UnitError(number, "layer_weights", "layer_preset is 'custom', so layer_weights must list one weight per layer, e.g. \"0, 0, 1, 0\"")
    elif lw is not None:
        if source == UI or ("layer_preset" in given and "layer_weights" not in given):
            v["layer_weights"] = None
        elif "layer_preset" in given:
            raise UnitError(number, "layer_weights", f"layer_weights replace the preset; leave out layer_preset '{preset}' or set it to 'custom'")
        else:
            v["layer_preset"] = CUSTOM_LAYERS

    uncond, neg = v["uncond"], v["negative_image"]
    if uncond == "image":
        if neg is None:
            raise UnitError(number, "negative_image", "uncond is 'image', so a negative_image is needed")
    elif neg is not None:
        if source == UI or ("uncond" in given and "negative_image" not in given):
            v["negative_image"] = None
        elif "uncond" in given:
            raise UnitError(number, "negative_image", f"a negative_image is used only with uncond 'image', and this unit asks for uncond '{uncond}'")
        else:
            v["uncond"] = "image"

    n, w = len(v["images"]), v["image_weights"]
    if n == 0:
        w = ()
    elif not w:
        w = (1.0,) * n
    elif len(w) != n:
        if v["combine"] == WEIGHTED:
            raise UnitError(number, "image_weights", f"expected one weight per reference image ({n}), got {len(w)}")
        w = (1.0,) * n  # only 'weighted' reads them; a stale list elsewhere is harmless
    if v["combine"] == WEIGHTED and n and not any(w):
        raise UnitError(number, "image_weights", "all image weights are 0; at least one must be above 0")
    v["image_weights"] = tuple(w)
    return Unit(**v, **extra)


def _values_of(unit: Unit) -> dict:
    return {name: getattr(unit, name) for name in _SPECS}


# ---------------------------------------------------------------------------- script args


def _is_unit_object(x) -> bool:
    return isinstance(x, (Mapping, Unit))


def parse_script_args(
    args: Sequence,
    *,
    unit_count: int,
    decode_image: Callable[[str], Any] = image_input.decode_image_string,
    open_upload: Optional[Callable[[str], Any]] = None,
) -> List[Unit]:
    """The script's slice of ``p.script_args`` -> one Unit per unit, numbered by position.

    Two layouts, told apart by the first positions (the input objects are never changed):

    * UI values: ``[accordion_enabled, *unit_1 (UI_FIELDS), *unit_2, …]``, ``unit_count`` blocks.
      A unit is on only if both the accordion and its own ``enabled`` are. A unit that is off
      never fails the generation; a bad value in it is kept and raised only if an X/Y/Z cell
      turns it on.
    * API unit objects: ``[unit, unit, …]`` (or ``[accordion_enabled, unit, …]``); the WebUI
      fills the positions after the sent units with UI defaults, which are not objects, so the
      units run up to the last object; a ``null`` in between is an empty (disabled) unit.
    """
    args = list(args or ())
    if not args:
        return []
    if _is_unit_object(args[0]):
        return _units_from_objects(args, 0, True, decode_image)
    if len(args) > 1 and _is_unit_object(args[1]):
        return _units_from_objects(args, 1, _accordion_flag(args[0]), decode_image)

    accordion = _accordion_flag(args[0])
    width = len(UI_FIELDS)
    units = []
    for i in range(unit_count):
        number = i + 1
        block = args[1 + i * width: 1 + (i + 1) * width]
        wanted = accordion and _wants(block)
        try:
            unit = Unit.from_ui(block, number, decode_image=decode_image, open_upload=open_upload)
        except UnitError as e:
            if wanted:
                raise
            units.append(Unit(_deferred_error=e))
            continue
        if not accordion and unit.enabled:
            unit = dataclasses.replace(unit, enabled=False)
        units.append(unit)
    return units


def _accordion_flag(value) -> bool:
    if value is None:
        return False
    try:
        return _Bool()(value, None)
    except _Invalid as e:
        raise UnitError(None, "enabled", "the accordion's on/off value: " + e.message) from None


def _wants(block) -> bool:
    if not block or block[0] is None:
        return False
    try:
        return _Bool()(block[0], None)
    except _Invalid:
        return True  # unreadable: treat as on, so the error is reported, not hidden


def _units_from_objects(args, start, accordion, decode_image) -> List[Unit]:
    items = args[start:]
    last = max(i for i, x in enumerate(items) if _is_unit_object(x))
    units = []
    for i, item in enumerate(items[: last + 1]):
        number = i + 1
        if item is None:
            units.append(Unit())
        elif isinstance(item, Unit):
            units.append(item)
        elif isinstance(item, Mapping):
            units.append(Unit.from_api(item, number, decode_image=decode_image))
        else:
            raise UnitError(
                number, None,
                f"expected a unit object, got {_show(item)}; in API requests each arg of 'identity' is one unit "
                "object ({\"enabled\": true, \"model\": …, \"images\": […], …})",
            )
    if not accordion:
        units = [dataclasses.replace(u, enabled=False) if u.enabled else u for u in units]
    return units


# ---------------------------------------------------------------------------- X/Y/Z


def parse_axis_value(field_name: str, value, number: Optional[int] = None):
    """One X/Y/Z value for ``field_name``, parsed and range-checked like any other input."""
    if field_name not in OVERRIDABLE_FIELDS:
        raise UnitError(number, field_name, f"cannot be set per X/Y/Z cell; these can: {', '.join(OVERRIDABLE_FIELDS)}")
    return _parse(field_name, value, number, _Context(XYZ))


def axis_choices(field_name: str, model_names: Iterable[str] = ()) -> Optional[List[str]]:
    """The values an X/Y/Z axis offers as a dropdown, or None for free values (numbers)."""
    if field_name == "model":
        return list(model_names)
    if field_name == "enabled":
        return ["true", "false"]
    parser = _SPECS[field_name].parse
    if isinstance(parser, _Choice):
        return list(LAYER_PRESETS) if field_name == "layer_preset" else list(parser.options)
    return None


def apply_overrides(units: Sequence[Unit], overrides: Mapping) -> List[Unit]:
    """New units with X/Y/Z values applied; ``units`` stay as they are.

    ``overrides`` maps ``(field, unit_number)`` to a value (``unit_number`` 1-based; None or a
    bare field name means every unit). Values go through the same parsers and rules as API
    input, so a bad cell value fails with a message naming the unit and field.
    """
    units = list(units)
    changes: Dict[int, dict] = {}
    for key, raw in overrides.items():
        name, number = key if isinstance(key, tuple) else (key, None)
        if name not in OVERRIDABLE_FIELDS:
            raise UnitError(number, name, f"cannot be set per X/Y/Z cell; these can: {', '.join(OVERRIDABLE_FIELDS)}")
        if number is None:
            targets = range(1, len(units) + 1)
        elif isinstance(number, int) and 1 <= number <= len(units):
            targets = [number]
        else:
            raise UnitError(number, name, f"there is no unit {number}; there are {len(units)} (numbered from 1)")
        for t in targets:
            changes.setdefault(t, {})[name] = raw
    out = []
    ctx = _Context(XYZ)
    for number, unit in enumerate(units, 1):
        todo = changes.get(number)
        if not todo:
            out.append(unit)
            continue
        values = _values_of(unit)
        for name, raw in todo.items():
            values[name] = _DEFAULTS[name] if raw is None else _parse(name, raw, number, ctx)
        new = _finish(values, number, XYZ, set(todo), _deferred_error=unit._deferred_error)
        if new.enabled and new._deferred_error is not None:
            raise new._deferred_error
        out.append(new)
    return out


# ---------------------------------------------------------------------------- run-time checks


@dataclass(frozen=True)
class ResolvedUnit:
    """An enabled unit with its model file and helper models found."""

    number: int
    unit: Unit  # with ``model`` set to the found model's "name [hash]"
    model: Any  # discovery.ModelEntry
    encoders: Dict[str, Any]  # requirement id ("clip-vit-h", "insightface:antelopev2", …) -> what find_encoder returned


def required_encoders(info) -> List[str]:
    """What a model needs besides itself: CLIP vision encoders, insightface packs, IdentityNet."""
    needs = []
    for part in (info.image_encoder or "").split("+"):
        if not part or "(embedded)" in part:
            continue
        needs.append(f"insightface:{info.face_model or 'buffalo_l'}" if part == "insightface" else part)
    if info.family == "instantid-adapter":
        needs.append("instantid-identitynet")
    return needs


def _describe_need(need: str) -> str:
    if need.startswith("insightface:"):
        return f"the insightface '{need.split(':', 1)[1]}' face models"
    if need == "instantid-identitynet":
        return "InstantID's IdentityNet"
    return describe_encoder(need)


def validate_for_run(
    units: Sequence[Unit],
    *,
    base: Optional[str],
    find_model: Callable[[str], Any],
    find_encoder: Callable[[str], Any],
    model_names: Any = (),
    layer_counts: Optional[Mapping[str, Iterable[int]]] = None,
) -> List[ResolvedUnit]:
    """Check the enabled units against the model folders and the loaded checkpoint.

    ``base``: "sd15" or "sdxl" for the loaded checkpoint (None skips the check).
    ``find_model(name)``: a ``discovery.ModelEntry`` (``.name``, ``.title``, ``.info``,
    ``.error``), or None / an ``IdentityError`` when there is none.
    ``find_encoder(need)``: anything truthy when the helper named by ``required_encoders`` is
    there; None, or an ``IdentityError`` whose message says where to put it, when not.
    ``model_names``: names (or a callable giving them) offered when a name is unknown.
    ``layer_counts``: base -> accepted lengths of ``layer_weights`` (default: one weight per
    cross-attention layer, 16 for SD1.5 and 70 for SDXL).
    """
    counts = {k: tuple(v) for k, v in (layer_counts or {b: (n,) for b, n in CROSS_ATTENTION_LAYERS.items()}).items()}
    resolved = []
    for number, unit in enumerate(units, 1):
        if not unit.enabled:
            continue
        if unit._deferred_error is not None:
            raise unit._deferred_error
        if not unit.model:
            raise UnitError(number, "model", "no model selected; choose one (GET /identity/v1/models lists them)")
        entry = _find(unit.model, number, find_model, model_names)
        if getattr(entry, "info", None) is None:
            raise UnitError(number, "model", f"model '{entry.name}' cannot be used: {entry.error or 'it is not an identity model'}")
        info = entry.info
        if info.family not in ADAPTER_FAMILIES:
            what = "a CLIP vision encoder" if info.family == "clip-vision" else "InstantID's IdentityNet" if info.family == "instantid-identitynet" else info.family
            raise UnitError(
                number, "model",
                f"model '{entry.name}' is {what}, which the unit's model finds by itself; choose an IP-Adapter, FaceID, InstantID or PhotoMaker model",
            )
        if base and info.base and info.base != base:
            raise UnitError(
                number, "model",
                f"model '{entry.name}' is {BASE_NAMES.get(info.base, info.base)}, the loaded checkpoint is {BASE_NAMES.get(base, base)}; "
                f"choose a model made for {BASE_NAMES.get(base, base)}",
            )
        encoders = {}
        for need in required_encoders(info):
            try:
                found = find_encoder(need)
            except IdentityError as e:
                raise UnitError(number, "model", f"model '{entry.name}' needs {_describe_need(need)}: {e}") from None
            if not found:
                help_text = ENCODER_HELP.get(need, "put it into the model folders")
                raise UnitError(number, "model", f"model '{entry.name}' needs {_describe_need(need)}, which was not found: {help_text}")
            encoders[need] = found
        if not unit.images:
            raise UnitError(number, "images", "the unit is on but has no reference images; add at least one")
        if unit.mask is not None and unit.mask.getextrema()[1] == 0:
            raise UnitError(number, "mask", "the region mask is all black, so the unit would change nothing; paint the region white or remove the mask")
        if unit.layer_weights is not None and info.family != "photomaker":
            allowed = counts.get(info.base, ())
            if allowed and len(unit.layer_weights) not in allowed:
                want = " or ".join(str(a) for a in allowed)
                raise UnitError(
                    number, "layer_weights",
                    f"expected {want} weights for an {BASE_NAMES.get(info.base, info.base)} model (one per cross-attention layer), got {len(unit.layer_weights)}",
                )
        resolved.append(ResolvedUnit(number, dataclasses.replace(unit, model=entry.title), entry, encoders))
    return resolved


def _find(name: str, number: int, find_model, model_names):
    try:
        entry = find_model(name)
    except IdentityError:
        entry = None
    if entry is not None:
        return entry
    names = list(model_names() if callable(model_names) else model_names)
    bare = name.split(" [", 1)[0]
    by_lower = {n.lower(): n for n in names}
    close = [by_lower[c] for c in difflib.get_close_matches(bare.lower(), list(by_lower), n=3, cutoff=0.5)]
    msg = f"unknown model '{name}'"
    if close:
        msg += "; did you mean " + ", ".join(f"'{c}'" for c in close) + "?"
    elif names:
        shown = ", ".join(names[:8]) + (", …" if len(names) > 8 else "")
        msg += f"; the model folders hold: {shown}"
    else:
        msg += "; no identity models were found in the model folders"
    raise UnitError(number, "model", msg + " (GET /identity/v1/models lists the names; after adding a file, press refresh)")
