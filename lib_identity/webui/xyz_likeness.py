"""The likeness table after an X/Y/Z plot: printed in the console and carried by the grid's infotext.

The WebUI's X/Y/Z script gives no hook after its cells, so ``install`` wraps the script module's
``draw_xyz_grid`` (the function its ``run`` calls with every cell's callback and the axis labels):

* each cell's callback is wrapped to read the likeness of that cell's run
  (``likeness.latest_values``) under its (x, y, z) position;
* when the plot is done the table (``likeness.LikenessGrid``) is printed, and added as
  ``Identity likeness table`` to the grid infotexts the script keeps in its ``grid_infotext`` list
  (made after the first cell, read after ``draw_xyz_grid`` returns, for the saved grid file, the
  gallery and the API's ``infotexts``). That list is found among the variables the cell callback
  closes over (WebUI 1.6 to 1.10); a WebUI that keeps it elsewhere gets the console table only.
"""

from __future__ import annotations

import functools
import inspect

from .. import likeness as L
from . import likeness

TABLE_KEY = "Identity likeness table"
_MARK = "_identity_likeness"


def install(xyz_module) -> bool:
    """Wrap ``xyz_module.draw_xyz_grid`` once (a reloaded script module is a new module); True when wrapped."""
    original = getattr(xyz_module, "draw_xyz_grid", None)
    if original is None or getattr(original, _MARK, False):
        return False
    xyz_module.draw_xyz_grid = with_likeness_table(original)
    return True


def with_likeness_table(draw):
    """``draw`` (the X/Y/Z script's ``draw_xyz_grid``) that also collects, prints and records the table."""
    signature = inspect.signature(draw)

    @functools.wraps(draw)
    def draw_xyz_grid(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
            cell = bound.arguments["cell"]
            grid = L.LikenessGrid(bound.arguments["x_labels"], bound.arguments["y_labels"], bound.arguments["z_labels"])
        except (TypeError, KeyError):  # another WebUI's signature: draw the plot as it is
            return draw(*args, **kwargs)
        if not likeness.enabled():
            return draw(*args, **kwargs)

        def cell_with_likeness(x, y, z, ix, iy, iz):
            likeness.forget_latest()
            result = cell(x, y, z, ix, iy, iz)
            grid.record(ix, iy, iz, likeness.latest_values())
            return result

        bound.arguments["cell"] = cell_with_likeness
        processed = draw(*bound.args, **bound.kwargs)
        if grid.units:
            print("[identity] " + grid.text())
            if not add_to_grid_infotexts(cell, grid):
                print("[identity] (this WebUI's X/Y/Z script keeps its grid infotext elsewhere: the table is in the console only)")
        return processed

    setattr(draw_xyz_grid, _MARK, True)
    return draw_xyz_grid


def grid_infotexts(cell):
    """The X/Y/Z script's ``grid_infotext`` list (main grid, then one per Z value), or None."""
    code, closure = getattr(cell, "__code__", None), getattr(cell, "__closure__", None)
    if code is None or not closure or "grid_infotext" not in code.co_freevars:
        return None
    value = closure[code.co_freevars.index("grid_infotext")].cell_contents
    return value if isinstance(value, list) else None


def add_to_grid_infotexts(cell, grid: L.LikenessGrid) -> bool:
    """Append ``Identity likeness table: "<table>"`` to the main grid's infotext (every Z) and to each
    Z sub-grid's (its own Z); False when the list is not found."""
    texts = grid_infotexts(cell)
    if texts is None:
        return False
    for i, text in enumerate(texts):
        if isinstance(text, str) and text:
            table = grid.text() if i == 0 else grid.text(z=i - 1)
            texts[i] = f"{text}, {TABLE_KEY}: {_quote(table)}"
    return True


def _quote(text: str) -> str:
    """As the WebUI quotes an infotext value (``infotext_utils.quote``: JSON when it holds , : or a newline)."""
    try:
        from modules.infotext_utils import quote
    except Exception:  # noqa: BLE001 - a WebUI before 1.7 or the tests' stand-in: the same rule
        import json

        return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n') else text
    return quote(text)
