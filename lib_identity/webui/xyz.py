"""X/Y/Z plot axes: every axis field of every unit ("[Identity] Unit 2 weight"), and the likeness
table after a plot (``xyz_likeness``).

A cell's values go to ``p.identity_overrides`` (a new dict per cell: ``copy(p)`` shares
attributes between cells) and are applied by ``runtime.units_for`` through the Unit parser.
"""

from __future__ import annotations

from .. import units as U
from . import lookup, settings, xyz_likeness

LABEL = "[Identity] Unit {number} {field}"
# numbers (sliders) take the WebUI's range syntax ("0.2-1 (+0.2)"), everything else is text
_TYPES = {f.name: float for f in U.FIELDS if f.widget == "slider"}


def _find_xyz_module():
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid"):
            return data.module
    return None


def _apply(field, number):
    def apply(p, value, xs):
        overrides = dict(getattr(p, "identity_overrides", None) or {})
        overrides[(field, number)] = value
        p.identity_overrides = overrides

    return apply


def _confirm(field, number):
    def confirm(p, xs):
        for value in xs:
            U.parse_axis_value(field, value, number)  # UnitError names unit, field and the value

    return confirm


def _choices(field):
    if field == "model":
        def models():
            return lookup.model_choices()[1:]
        return models
    if U.SPECS[field].widget == "profile":
        def saved_profiles():
            return lookup.profile_choices()[1:]  # the names; "None" (the pictures) can still be typed
        return saved_profiles
    options = U.axis_choices(field)
    return (lambda: list(options)) if options else None


def register():
    """Add the axes once per script load (the xyz module is loaded before extension scripts)."""
    xyz = _find_xyz_module()
    if xyz is None:
        return
    xyz_likeness.install(xyz)
    existing = {getattr(o, "label", None) for o in xyz.axis_options}
    for number in range(1, settings.unit_count() + 1):
        for field in U.AXIS_FIELDS:
            label = LABEL.format(number=number, field=field.replace("_", " "))
            if label in existing:
                continue
            xyz.axis_options.append(
                xyz.AxisOption(
                    label,
                    _TYPES.get(field, str),
                    _apply(field, number),
                    confirm=_confirm(field, number),
                    choices=_choices(field),
                )
            )
