"""The accordion's profile controls: the profile dropdown with its 🔄 button, and the
"Save as profile…" row under the reference pictures, which builds a profile from the unit's
pictures and face choice (through ``profile_build``, as ``POST /identity/v1/profiles`` does)."""

from __future__ import annotations

import html

from ..errors import IdentityError
from . import folders, lookup, profile_build

SAVE_LABEL = "Save as profile…"


def dropdown(gr, **kw):
    """The ``profile`` field's component: "None" (use the pictures) or a saved profile's name.

    Custom values are allowed: pasted infotext may name a profile that is not (or no longer) saved
    here, and the run then says so instead of the dropdown dropping the name silently.
    """
    return gr.Dropdown(choices=lookup.profile_choices(), value="None", allow_custom_value=True, **kw)


def refresh_button(ToolButton, elem_id):
    return ToolButton(value="\U0001f504", elem_id=elem_id, tooltip="Look for new profiles")


def save_row(gr, eid) -> dict:
    """The "Save as profile…" row: a name, overwrite, the button, and a message line below."""
    with gr.Row():
        name = gr.Textbox(label="Profile name", placeholder="e.g. alice", max_lines=1, elem_id=eid("profile_name"))
        overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id=eid("profile_overwrite"))
        button = gr.Button(SAVE_LABEL, elem_id=eid("profile_save"))
    message = gr.Markdown("", elem_id=eid("profile_message"))
    return {"profile_name": name, "profile_overwrite": overwrite, "profile_save": button, "profile_message": message}


def _warn(text: str) -> str:
    return "⚠ " + html.escape(folders.shorten(text), quote=False)


def _file_name(f):
    return getattr(f, "name", None) or (f.get("name") if isinstance(f, dict) else None)


def save_from_unit(name, files, face="largest", preparation="crop", crop_position="center", overwrite=False) -> str:
    """Build and save a profile from the unit's uploaded pictures; the message line's text.

    Every failure comes back as one line for people (which picture, which rule), never a traceback.
    """
    from .. import units as U
    from ..image_input import ImageInputError
    from ..units.parsers import UI, Context, Invalid

    if not files:
        return "⚠ Add the pictures to build the profile from under Reference images first."
    open_upload = lookup.upload_opener()
    pictures = []
    for number, f in enumerate(files, 1):
        try:
            pictures.append(open_upload(_file_name(f)))
        except ImageInputError as e:
            return _warn(f"picture {number}: {e}")
    options = {}
    for field, value in (("face", face), ("preparation", preparation), ("crop_position", crop_position)):
        try:
            options[field] = U.SPECS[field].parse(value if value not in (None, "") else U.SPECS[field].default, Context(UI))
        except Invalid as e:
            return _warn(f"{U.SPECS[field].label}: {e.message}")
    try:
        result, path = profile_build.build_and_save(name or "", pictures, overwrite=bool(overwrite), **options)
    except IdentityError as e:
        return _warn(str(e))
    except Exception as e:  # noqa: BLE001 - the message line explains; the console keeps the details
        import traceback

        traceback.print_exc()
        return _warn(f"building the profile failed: {type(e).__name__}: {e}")
    lines = [profile_build.saved_line(result.profile.summary(), path) + "; choose it under Profile to use it"]
    lines += list(result.messages)
    return "\n".join("- " + html.escape(folders.shorten(line), quote=False) for line in lines)


def wire(gr, units: list) -> None:
    """Events of every unit of one tab: 🔄 refreshes its dropdown; "Save as profile…" saves and refreshes
    every unit's dropdown in the tab (each keeps its value). ``units``: one dict per unit (``ui._unit_block``'s
    ``"profiles"``): the ``profile`` field's component under ``dropdown``, its 🔄 under ``refresh``, the
    pictures, face and fit components, and the save row's components."""
    dropdowns = [u["dropdown"] for u in units]

    def refreshed(*values):
        choices = lookup.profile_choices()
        return [gr.update(choices=choices, value=v) for v in values]

    for u in units:
        u["refresh"].click(lambda value: refreshed(value)[0], inputs=[u["dropdown"]], outputs=[u["dropdown"]],
                           show_progress=False)

        def on_save(name, files, face, preparation, crop_position, overwrite, *values):
            message = save_from_unit(name, files, face, preparation, crop_position, overwrite)
            return [message] + refreshed(*values)

        u["profile_save"].click(on_save, inputs=[u["profile_name"], u["images"], u["face"], u["preparation"],
                                                 u["crop_position"], u["profile_overwrite"]] + dropdowns,
                                outputs=[u["profile_message"]] + dropdowns)
