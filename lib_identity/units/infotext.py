"""Units in infotext: one ``Identity N`` entry per enabled unit, and reading it back.

An entry looks like (the WebUI JSON-quotes the whole value, because it holds ``,`` and ``:``)::

    Identity 1: "model: ip-adapter_sd15 [0123abcd], weight: 0.8, start: 0.0, end: 1.0, combine: average,
                 preparation: crop, layers: style, images: 1a2b3c4d+5e6f7a8b"

Inside, ``key: value`` pairs; a value holding ``,``, ``:`` or ``"`` is JSON-quoted itself
(custom layer weights, odd model names). The keys, their order and when each is written come
from the field table (``FieldSpec.infotext`` and ``record``): e.g. ``image weights`` only with
combine 'weighted average', ``uncond`` only when it is not 'zero'. Pictures (reference images,
mask, negative image) come last, as ``image_input.image_hash`` content hashes, so pasting says
which pictures to add; pixels are never written.

Reading uses the same field parsers as the API, so a bad value fails with the unit and field.
Unknown keys (from a newer version) are skipped and listed, not fatal.
"""

from __future__ import annotations

import json
import re
from typing import Dict, List, Mapping, MutableMapping, Optional, Sequence

from .. import image_input
from ..errors import UnitError
from .fields import CUSTOM_LAYERS, FIELDS, LAYER_PRESETS
from .parsers import INFOTEXT, Context, fmt_number, norm_word
from .unit import Unit, parse_field

INFOTEXT_KEY = "Identity {}"
_KEY = re.compile(r"^Identity (\d+)$")
_HASH = re.compile(r"^[0-9a-f]{8}$")
# One "key: value" pair of an entry, the value bare (up to the next comma) or JSON-quoted.
_PAIR = re.compile(r'\s*(\w[\w \-]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,"]*?)\s*(?:,|$)')

# infotext key -> Unit field, for the keys that are one field each (the field table's keys; the
# layer keys and the pictures are read below)
_SIMPLE = {f.infotext: f.name for f in FIELDS if f.infotext and not f.picture and f.infotext != "layers"}
_PICTURES = {f.infotext: f for f in FIELDS if f.picture}


def infotext_key(number: int, field: Optional[str] = None) -> str:
    """``Identity 2``, or with a field ``Identity 2 weight`` (the keys ``expand_infotext`` adds)."""
    key = INFOTEXT_KEY.format(number)
    return f"{key} {field}" if field else key


def _quote(text: str) -> str:
    if any(c in text for c in ',:"\n') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _numbers(values, sep: str) -> str:
    return sep.join(fmt_number(x) for x in values)


def _text(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return fmt_number(value)
    if isinstance(value, (tuple, list)):
        return "+".join(_text(x) for x in value)
    return str(value)


def format_unit(unit: Unit, model_title: Optional[str] = None, method: Optional[str] = None) -> str:
    """The infotext value of one unit (before the WebUI's own quoting): the field table's keys in its
    order, each where its ``record`` rule says so, or always for a ``method`` the field's
    ``recorded_for`` names (PhotoMaker's trigger and LoRA weight); pictures (as content hashes)
    last. Given the unit's ``method``, fields that method does not use are left out."""
    pairs, pictures = [], []
    for spec in FIELDS:
        if spec.infotext is None or (method is not None and method not in spec.methods):
            continue  # a field the unit's method does not use says nothing about the image
        if spec.record is not None and not spec.record(unit) and method not in spec.recorded_for:
            continue
        value = getattr(unit, spec.name)
        if spec.name == "model":
            text = model_title or unit.model or "None"
        elif spec.name == "layer_preset":
            text = _numbers(unit.layer_weights, ", ") if value == CUSTOM_LAYERS else value
        elif spec.name == "images":
            text = "+".join(unit.image_hashes)
        elif spec.picture:
            text = image_input.image_hash(value)
        else:
            text = _text(value)
        (pictures if spec.picture else pairs).append((spec.infotext, text))
    return ", ".join(f"{k}: {_quote(v)}" for k, v in pairs + pictures)


def units_to_infotext(units: Sequence[Unit], *, model_titles: Optional[Mapping[int, str]] = None,
                      methods: Optional[Mapping[int, str]] = None) -> Dict[str, str]:
    """``{"Identity N": value}`` for each enabled unit, N its 1-based position.

    ``model_titles`` (unit number -> "name [hash]", e.g. from ``validate_for_run``) records the
    model's hash when the unit named the model without one; ``methods`` (unit number -> method,
    e.g. "photomaker") leaves out the fields a unit's method does not use and adds the keys that
    method always records.
    """
    titles, kinds = model_titles or {}, methods or {}
    return {infotext_key(n): format_unit(u, titles.get(n), kinds.get(n)) for n, u in enumerate(units, 1) if u.enabled}


def write_infotext(params: MutableMapping, units: Sequence[Unit], *, model_titles: Optional[Mapping[int, str]] = None,
                   methods: Optional[Mapping[int, str]] = None) -> None:
    """Replace every ``Identity N`` key in ``params`` (``p.extra_generation_params``) with the
    current units' entries. X/Y/Z cells share that dict, so keys of units that are off in this
    cell must go, not linger from the previous cell."""
    for key in [k for k in params if isinstance(k, str) and _KEY.match(k)]:
        del params[key]
    params.update(units_to_infotext(units, model_titles=model_titles, methods=methods))


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == '"' and text[-1] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, str) else text
    return text


def _pairs(text: str, number: int) -> List[tuple]:
    out, pos, text = [], 0, text.strip()
    while pos < len(text):
        m = _PAIR.match(text, pos)
        if not m or m.end() == pos:
            raise UnitError(number, None, f"cannot read the infotext entry near {text[pos:pos + 30]!r}; expected 'key: value' pairs")
        out.append((m.group(1).strip().lower(), _unquote(m.group(2))))
        pos = m.end()
    return out


def _hashes(value: str, number: int, field: str) -> List[str]:
    hashes = [h.strip().lower() for h in value.split("+") if h.strip()]
    for h in hashes:
        if not _HASH.match(h):
            raise UnitError(number, field, f"expected 8-hex image hashes joined by '+', got {value!r}")
    return hashes


def _read_entry(number: int, raw, strict: bool) -> dict:
    entry = {"number": number, "fields": {"enabled": True}, "images_needed": [], "mask_needed": None,
             "negative_image_needed": None, "errors": [], "ignored": [], "message": ""}
    fields = entry["fields"]
    ctx = Context(INFOTEXT)
    for key, value in _pairs(_unquote(str(raw)), number):
        try:
            if key in _SIMPLE:
                fields[_SIMPLE[key]] = parse_field(_SIMPLE[key], value, number, ctx)
            elif key == "layers":
                if norm_word(value) in {norm_word(p) for p in LAYER_PRESETS}:
                    fields["layer_preset"] = parse_field("layer_preset", value, number, ctx)
                else:
                    fields["layer_weights"] = parse_field("layer_weights", value, number, ctx)
                    fields["layer_preset"] = CUSTOM_LAYERS
            elif key in _PICTURES:
                name = _PICTURES[key].name
                hashes = _hashes(value, number, name)
                entry[f"{name}_needed"] = hashes if name == "images" else hashes[0]
            else:
                entry["ignored"].append(key)
        except UnitError as e:
            if strict:
                raise
            entry["errors"].append(str(e))
    start, end = fields.get("start", 0.0), fields.get("end", 1.0)
    if end <= start:
        e = UnitError(number, "end", f"expected a number above start ({fmt_number(start)}), got {fmt_number(end)}")
        if strict:
            raise e
        entry["errors"].append(str(e))
        fields.pop("start", None), fields.pop("end", None)
    entry["message"] = _needs_message(entry)
    return entry


def _needs_message(entry: dict) -> str:
    needs = []
    if entry["images_needed"]:
        word = "image" if len(entry["images_needed"]) == 1 else "images"
        needs.append(f"reference {word} {', '.join(entry['images_needed'])}")
    if entry["mask_needed"]:
        needs.append(f"a region mask ({entry['mask_needed']})")
    if entry["negative_image_needed"]:
        needs.append(f"a negative image ({entry['negative_image_needed']})")
    if not needs:
        return ""
    return f"Identity unit {entry['number']} needs " + "; ".join(needs) + " (pictures are not stored in infotext; add them again)"


def units_from_infotext(params: Mapping, *, strict: bool = True) -> List[dict]:
    """The ``Identity N`` entries of a parsed infotext (the WebUI's params dict), by unit number.

    Each entry: ``number``; ``fields`` (Unit field values: enabled, model, weight, start, end,
    combine, preparation, crop_position, layer_preset, layer_weights, image_weights, uncond,
    as far as recorded); ``images_needed`` (image hashes); ``mask_needed`` and
    ``negative_image_needed`` (a hash or None); ``message`` (what the user has to add, or "");
    ``ignored`` (unknown keys); ``errors`` (with ``strict=False``; strict raises ``UnitError``).
    """
    entries = []
    for key, raw in params.items():
        m = _KEY.match(key) if isinstance(key, str) else None
        if m and raw is not None:
            entries.append(_read_entry(int(m.group(1)), raw, strict))
    return sorted(entries, key=lambda e: e["number"])


def ui_value(field: str, value):
    """A restored field value as the accordion's component shows it (lists as "1, 0.5" text)."""
    if field in ("layer_weights", "image_weights"):
        return "" if not value else _numbers(value, ", ")
    if field in ("face", "pose_face"):
        return ", ".join(fmt_number(x) for x in value) if isinstance(value, tuple) else str(value)
    return value


def expand_infotext(params: MutableMapping, *, unit_count: Optional[int] = None) -> List[dict]:
    """For ``on_infotext_pasted``: add ``Identity N <field>`` keys (UI-ready values) for each
    recorded unit, ``Identity N needs`` with what to add, and, when ``unit_count`` is given and
    the text has Identity entries, ``Identity N enabled: False`` for the units it doesn't list.
    Bad values are left out (listed under ``Identity N errors``), never fatal to pasting."""
    entries = units_from_infotext(params, strict=False)
    seen = set()
    for entry in entries:
        n = entry["number"]
        seen.add(n)
        for field, value in entry["fields"].items():
            params[infotext_key(n, field)] = ui_value(field, value)
        if entry["message"]:
            params[infotext_key(n, "needs")] = entry["message"]
        if entry["errors"]:
            params[infotext_key(n, "errors")] = "; ".join(entry["errors"])
    if unit_count and entries:
        for n in range(1, unit_count + 1):
            if n not in seen:
                params[infotext_key(n, "enabled")] = False
    return entries
