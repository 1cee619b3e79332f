"""The script's args -> Units: the accordion's positional values or the API's unit objects."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, List, Mapping, Optional, Sequence

from .. import image_input
from ..errors import UnitError
from .fields import UI_FIELDS
from .parsers import Bool, Invalid, show_value
from .unit import Unit


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
        return Bool()(value, None)
    except Invalid as e:
        raise UnitError(None, "enabled", "the accordion's on/off value: " + e.message) from None


def _wants(block) -> bool:
    if not block or block[0] is None:
        return False
    try:
        return Bool()(block[0], None)
    except Invalid:
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
                f"expected a unit object, got {show_value(item)}; in API requests each arg of 'identity' is one unit "
                "object ({\"enabled\": true, \"model\": …, \"images\": […], …})",
            )
    if not accordion:
        units = [dataclasses.replace(u, enabled=False) if u.enabled else u for u in units]
    return units


# ---------------------------------------------------------------------------- X/Y/Z
