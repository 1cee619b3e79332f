"""Likeness: the ArcFace cosine of a generated image's face to a unit's reference face.

* ``measure``: the number for one image (``reference_embedding``, ``measure``, ``format_likeness``,
  ``NO_FACE``), the region rule for masked units.
* ``runs``: one generation's units to measure (``targets_for``) and their values per image
  (``LikenessRun``).
* ``table``: the X/Y/Z table (``LikenessGrid``).

No WebUI imports; insightface is imported only when a face is analysed.
"""

from .measure import NO_FACE, REGION_COVERAGE, Measurement, best_match, format_likeness, measure, reference_embedding, region_array, region_coverage, unit_vector
from .runs import LikenessRun, Target, targets_for, unit_pack
from .table import LikenessGrid

__all__ = [
    "NO_FACE", "REGION_COVERAGE", "LikenessGrid", "LikenessRun", "Measurement", "Target", "best_match",
    "format_likeness", "measure", "reference_embedding", "region_array", "region_coverage", "targets_for",
    "unit_pack", "unit_vector",
]
