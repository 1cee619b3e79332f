"""The Unit: one model, its reference images and its knobs, built from the field table.

``Unit`` is a frozen dataclass whose fields are exactly ``fields.FIELDS`` (plus a kept error, see
below). It is made from an API object (``from_api``) or the accordion's positional values
(``from_ui``); pasted infotext and X/Y/Z cells go through the same parsers and the same
cross-field rules (``finish``). Every failure is a ``UnitError`` that names the unit (1-based, as
the UI shows "Unit 1") and the field, says what was expected and what came instead.
"""

from __future__ import annotations

import dataclasses
import difflib
from functools import cached_property
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from .. import image_input
from ..errors import UnitError
from .fields import API_FIELDS, CUSTOM_LAYERS, DEFAULTS, FIELDS, SPECS, UI_FIELDS, WEIGHTED
from .parsers import API, UI, Context, Invalid, fmt_number, show_value


class _UnitBehaviour:
    """What a Unit does beyond holding its fields; ``Unit`` below adds the fields from the table.

    Invariants: ``start < end``; ``len(image_weights) == len(images)``; ``layer_weights`` is
    set exactly when ``layer_preset == "custom"``; ``negative_image`` is set exactly when
    ``uncond == "image"``. Build it with ``from_api`` / ``from_ui`` / ``parse_script_args``.
    """

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
            raise UnitError(number, None, f"expected a unit object with named fields ({', '.join(API_FIELDS)}), got {show_value(d)}")
        for key in d:
            if key not in SPECS:
                raise UnitError(number, str(key), unknown_field(str(key), API_FIELDS))
        ctx = Context(API, decode_image, _refuse_paths)
        values = dict(DEFAULTS, enabled=True)
        given = set()
        for name, raw in d.items():
            if raw is None:
                continue
            values[name] = parse_field(name, raw, number, ctx)
            given.add(name)
        return finish(values, number, API, given, _unset=frozenset(SPECS) - frozenset(given))

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
        ctx = Context(UI, decode_image, open_upload)
        out = dict(DEFAULTS)
        for name, raw in zip(UI_FIELDS, vals):
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                continue  # empty textboxes / image slots mean "default"
            out[name] = parse_field(name, raw, number, ctx)
        return finish(out, number, UI, set(UI_FIELDS))

    def to_api(self) -> dict:
        """The unit as an API JSON object (images as PNG data URLs); ``from_api`` reads it back."""
        d = {}
        for spec in FIELDS:
            v = getattr(self, spec.name)
            if spec.widget == "files":
                v = [image_input.encode_png_data_url(img) for img in v]
            elif spec.widget in ("image", "mask"):
                v = None if v is None else image_input.encode_png_data_url(v)
            elif isinstance(v, tuple):
                v = list(v)
            d[spec.name] = v
        return d

    def values(self) -> dict:
        """The table's fields of this unit, by name."""
        return {spec.name: getattr(self, spec.name) for spec in FIELDS}


Unit = dataclasses.make_dataclass(
    "Unit",
    [(spec.name, Any, dataclasses.field(default=spec.default, metadata={"spec": spec})) for spec in FIELDS]
    # A disabled UI unit with a bad value keeps its error here instead of failing every
    # generation; it is raised if an X/Y/Z cell turns the unit on.
    + [("_deferred_error", Optional[UnitError], dataclasses.field(default=None, compare=False, repr=False)),
       # The fields its entry point left to their defaults (API units): a method whose default
       # differs (PhotoMaker's start) sets them when the model is known (``validate_for_run``).
       ("_unset", frozenset, dataclasses.field(default=frozenset(), compare=False, repr=False))],
    bases=(_UnitBehaviour,),
    frozen=True,
    namespace={"__doc__": "One identity unit, validated and normalised (images decoded, choices spelled canonically). "
                          "Its fields are ``units.fields.FIELDS``. " + (_UnitBehaviour.__doc__ or "").split("\n\n", 1)[1],
               "__module__": __name__},
)


def unknown_field(key: str, valid: Sequence[str]) -> str:
    """The message for a field name that does not exist, with the closest valid name."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"unknown field; {hint}valid fields are: {', '.join(valid)}"


def _refuse_paths(path):
    raise image_input.ImageInputError("file paths are not accepted here; send the image as base64")


def parse_field(name: str, raw, number: Optional[int], ctx: Context):
    """One field's value through its parser; a bad value becomes a ``UnitError`` naming unit and field."""
    try:
        return SPECS[name].parse(raw, ctx)
    except Invalid as e:
        raise UnitError(number, name, e.message) from None
    except image_input.ImageInputError as e:
        raise UnitError(number, name, str(e)) from None


def finish(values: dict, number: int, source: str, given: set, **extra) -> "Unit":
    """Cross-field rules, then the Unit. ``given``: the fields this entry point set explicitly."""
    v = values
    if v["end"] <= v["start"]:
        if "start" in given and "end" not in given:
            raise UnitError(number, "start", f"expected a number below end ({fmt_number(v['end'])}), got {fmt_number(v['start'])}")
        raise UnitError(number, "end", f"expected a number above start ({fmt_number(v['start'])}) and at most 1, got {fmt_number(v['end'])}")
    _layers_rule(v, number, source, given)
    _negative_rule(v, number, source, given)
    _profile_rule(v, number)
    _image_weights_rule(v, number)
    _pose_face_rule(v, number, source, given)
    return Unit(**v, **extra)


def _layers_rule(v: dict, number: int, source: str, given: set) -> None:
    # The UI keeps a stale custom list while a named preset is chosen (dropped); an API unit that
    # names a preset *and* sends a list is contradictory.
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


def _negative_rule(v: dict, number: int, source: str, given: set) -> None:
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


def _profile_rule(v: dict, number: int) -> None:
    # Both at once would leave one of them unused without a word.
    if v["profile"] and v["images"]:
        raise UnitError(number, "profile", f"the unit has reference images and profile '{v['profile']}'; "
                        "use one of them: remove the images to use the profile, or clear the profile")


def _image_weights_rule(v: dict, number: int) -> None:
    n, w = len(v["images"]), v["image_weights"]
    if n == 0 and v["profile"]:
        v["image_weights"] = tuple(w or ())  # checked against the profile's pictures when it is read
        return
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


def _pose_face_rule(v: dict, number: int, source: str, given: set) -> None:
    # A face of the pose picture named for a unit without one: the UI keeps stale choices (harmless),
    # an API unit or an X/Y/Z cell asked for something that cannot happen.
    if v["pose_image"] is None and v["pose_face"] != "auto" and source != UI and "pose_face" in given:
        raise UnitError(number, "pose_face", f"pose_face {show_value(v['pose_face'])} picks a face of the pose picture, "
                        "and this unit has no pose_image; send a pose_image, or leave pose_face out (without a pose "
                        "picture the reference picture's face, chosen by face, sets the pose)")
