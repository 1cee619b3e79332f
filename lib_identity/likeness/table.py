"""The likeness of every cell of an X/Y/Z plot, as a table laid out like the grid.

One table per unit (and per Z value when the plot has a Z axis): rows are the Y values, columns
the X values, each cell the likeness of that cell's images (their mean when a cell holds several;
``(2/3)`` after it when only 2 of its 3 images showed a face), ``no face`` when none did, and
``-`` for a cell that made no image or where the unit was off. The same text goes to the console
and, JSON-quoted by the WebUI, into the grid's infotext.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .measure import NO_FACE, format_likeness

MISSING = "-"
TITLE = "Identity likeness (ArcFace cosine to the unit's reference face; 1 = the same face)"


class LikenessGrid:
    """Likeness values per X/Y/Z cell; ``record`` them as cells finish, ``text()`` when the plot is done."""

    def __init__(self, x_labels: Sequence[str], y_labels: Sequence[str], z_labels: Sequence[str] = ("",)):
        self.x_labels = [str(x) for x in x_labels] or [""]
        self.y_labels = [str(y) for y in y_labels] or [""]
        self.z_labels = [str(z) for z in z_labels] or [""]
        self._cells: Dict[Tuple[int, int, int], Dict[int, List[Optional[float]]]] = {}

    def record(self, ix: int, iy: int, iz: int, values: Mapping[int, Sequence[Optional[float]]]) -> None:
        """The likeness of one cell: unit number -> one value per image (None: no face)."""
        self._cells[(int(ix), int(iy), int(iz))] = {int(n): list(v) for n, v in values.items()}

    @property
    def units(self) -> List[int]:
        """The units measured in at least one cell."""
        return sorted({n for cell in self._cells.values() for n in cell})

    def cell_text(self, ix: int, iy: int, iz: int, unit: int) -> str:
        values = self._cells.get((ix, iy, iz), {}).get(unit)
        if not values:
            return MISSING
        found = [v for v in values if v is not None]
        if not found:
            return NO_FACE
        text = format_likeness(sum(found) / len(found))
        return text if len(found) == len(values) else f"{text} ({len(found)}/{len(values)})"

    def cell_value(self, ix: int, iy: int, iz: int, unit: int) -> Optional[float]:
        """The mean likeness of a cell's images that showed a face, or None."""
        values = [v for v in self._cells.get((ix, iy, iz), {}).get(unit, ()) if v is not None]
        return sum(values) / len(values) if values else None

    def lines(self, z: Optional[int] = None) -> List[str]:
        """The tables (all Z values, or only ``z``), one line each, under a title line."""
        out = [TITLE]
        zs = range(len(self.z_labels)) if z is None else [z]
        for unit in self.units:
            for iz in zs:
                heading = f"unit {unit}" + (f", {self.z_labels[iz]}" if self.z_labels[iz] else "")
                out.append(heading + ":")
                header = [[""] + self.x_labels] if any(self.x_labels) else []
                out += _aligned(header + [
                    [self.y_labels[iy]] + [self.cell_text(ix, iy, iz, unit) for ix in range(len(self.x_labels))]
                    for iy in range(len(self.y_labels))
                ])
        return out

    def text(self, z: Optional[int] = None) -> str:
        return "\n".join(self.lines(z))


def _aligned(rows: List[List[str]]) -> List[str]:
    """Rows of cells as text columns: ``label | cell | cell``; the empty label column is left out."""
    if all(not r[0] for r in rows):
        rows = [r[1:] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + " | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
