"""Likeness in the WebUI: measured after each image, written into that image's infotext.

* ``start(p, resolved)`` (``runtime.process``): the units to measure (``likeness.targets_for``;
  off with the setting ``identity_likeness``) and, for each, the infotext entry
  ``Identity N likeness``. Its value is a function the WebUI calls when it writes an image's
  infotext (``create_infotext`` accepts callables in ``extra_generation_params``): it answers
  that image's number, ``no face``, or nothing (a batch's grid, an image not measured yet).
* ``measure_image(p, image)`` (``Script.postprocess_image_after_composite``): one analysis of the
  finished image (after the inpainting composite, the picture that is saved and shown), kept
  under the WebUI's (batch, position in batch) of that image. The WebUI writes the image's
  infotext right after this hook, so its PNG info, the gallery's info text and the API's
  ``info`` (``infotexts``) carry the number.
* ``settle(p)`` (``Script.postprocess``): the function becomes the first image's text, for what
  the WebUI makes from the parameters after the run (the API's ``extra_generation_params``, the
  X/Y/Z grid's infotext).

The entry is never read back into a unit: ``units.infotext`` reads only ``Identity N``.
Measuring must not cost the user an image: a failure says so once in the console and the run goes on
without likeness.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Dict, List, Optional

from .. import likeness as L
from ..errors import IdentityError
from . import lookup, settings

log = logging.getLogger("sd-webui-identity")

SETTING = "identity_likeness"
KEY = "Identity {} likeness"
_KEY = re.compile(r"^Identity \d+ likeness$")
DEFAULT_PACK = "insightface:buffalo_l"


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.current: Optional[L.LikenessRun] = None  # the generation being measured
        self.latest: Optional[L.LikenessRun] = None  # the last one started (the X/Y/Z table reads it)


state = _State()


def enabled() -> bool:
    """The setting ``identity_likeness`` (on unless turned off)."""
    return bool(settings.option(SETTING))


def default_pack() -> Optional[str]:
    """The default FaceID pack's folder (buffalo_l, or what the setting names), or None when it is not there."""
    try:
        return lookup.find_encoder_for_run(DEFAULT_PACK)
    except IdentityError:
        return None


def stop(p=None) -> None:
    """No measuring for this run; the ``Identity N likeness`` entries of an earlier X/Y/Z cell go
    (cells share ``extra_generation_params``)."""
    with state.lock:
        state.current = None
    params = getattr(p, "extra_generation_params", None)
    if params is not None:
        for key in [k for k in params if isinstance(k, str) and _KEY.match(k)]:
            del params[key]


def start(p, resolved) -> Optional[L.LikenessRun]:
    """Decide what this run measures and put the infotext entries in place (see the module docstring)."""
    stop(p)
    if not resolved or not enabled():
        return None
    try:
        targets = L.targets_for(resolved, default_pack)
    except Exception as e:  # noqa: BLE001 - never stop a generation for its likeness
        print(f"[identity] likeness is not measured in this run: {type(e).__name__}: {e}")
        return None
    if not targets:
        return None
    run = L.LikenessRun(targets)
    with state.lock:
        state.current = state.latest = run
    for target in targets:
        p.extra_generation_params[KEY.format(target.number)] = _infotext_value(run, target.number)
    return run


def use_regions(regions) -> None:
    """The regions units made for themselves while preparing (``methods.Contributions.regions``):
    each such unit's likeness is measured on the face in its region, as with a mask."""
    run = state.current
    if run is not None and regions:
        run.use_regions(regions)


def _infotext_value(run: L.LikenessRun, number: int):
    def likeness(p=None, index=0, use_main_prompt=False, **_):
        if use_main_prompt:  # a batch's grid stands for several images
            return None
        m = run.value(number, (getattr(p, "iteration", 0), index))
        return None if m is None else m.text

    def first():
        m = run.value(number, run.order[0]) if run.order else None
        return None if m is None else m.text

    likeness.first = first
    return likeness


def measure_image(p, image) -> Dict[int, L.Measurement]:
    """Measure one finished image for every unit of the current run; {} when nothing is measured."""
    run = state.current
    if run is None or image is None:
        return {}
    key = (getattr(p, "iteration", 0), getattr(p, "batch_index", 0))
    try:
        return run.measure_image(image, key)
    except Exception as e:  # noqa: BLE001 - the image is made; only its number is lost
        log.debug("likeness failed", exc_info=True)
        print(f"[identity] likeness is not measured in this run: {type(e).__name__}: {e}")
        with state.lock:
            state.current = None
        return {}


def settle(p) -> None:
    """``Script.postprocess``: the images are made; each entry's function becomes the first image's text.

    The WebUI hands ``extra_generation_params`` to the API as JSON (``info``), where a function
    would be ``null``; later infotexts of this run (the X/Y/Z grid's, made from its first cell)
    stand for the first image. Each image's own number stays in its own infotext.
    """
    params = getattr(p, "extra_generation_params", None)
    if not params:
        return
    for key in [k for k in params if isinstance(k, str) and _KEY.match(k)]:
        value = params[key]
        if callable(value):
            first = getattr(value, "first", lambda: None)()
            if first is None:
                del params[key]
            else:
                params[key] = first


def forget_latest() -> None:
    """Before an X/Y/Z cell: a cell that makes no image must not show the previous cell's values."""
    with state.lock:
        state.latest = None


def latest_values() -> Dict[int, List[Optional[float]]]:
    """Unit number -> likeness of each image of the last run (None: no face)."""
    run = state.latest
    return run.per_unit() if run is not None else {}
