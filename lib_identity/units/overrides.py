"""X/Y/Z plot cells: one field's value per cell, through the same parsers and rules as the API."""

from __future__ import annotations

from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from ..errors import UnitError
from .fields import DEFAULTS, LAYER_PRESETS, OVERRIDABLE_FIELDS, SPECS
from .parsers import XYZ, Choice, Context
from .unit import Unit, finish, parse_field


def parse_axis_value(field_name: str, value, number: Optional[int] = None):
    """One X/Y/Z value for ``field_name``, parsed and range-checked like any other input."""
    if field_name not in OVERRIDABLE_FIELDS:
        raise UnitError(number, field_name, f"cannot be set per X/Y/Z cell; these can: {', '.join(OVERRIDABLE_FIELDS)}")
    return parse_field(field_name, value, number, Context(XYZ))


def axis_choices(field_name: str, model_names: Iterable[str] = ()) -> Optional[List[str]]:
    """The values an X/Y/Z axis offers as a dropdown, or None for free values (numbers)."""
    if field_name == "model":
        return list(model_names)
    if field_name == "enabled":
        return ["true", "false"]
    parser = SPECS[field_name].parse
    if isinstance(parser, Choice):
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
    ctx = Context(XYZ)
    for number, unit in enumerate(units, 1):
        todo = changes.get(number)
        if not todo:
            out.append(unit)
            continue
        values = unit.values()
        for name, raw in todo.items():
            values[name] = DEFAULTS[name] if raw is None else parse_field(name, raw, number, ctx)
        new = finish(values, number, XYZ, set(todo), _deferred_error=unit._deferred_error,
                     _unset=unit._unset - frozenset(todo))
        if new.enabled and new._deferred_error is not None:
            raise new._deferred_error
        out.append(new)
    return out

