"""Which rows of a UNet call are cond rows, for every batch layout the WebUI produces.

The WebUI's CFG denoiser (``modules/sd_samplers_cfg_denoiser.py``) stacks, for one denoiser step,
the cond rows first (one per image, more with ``AND``), then one uncond row per image (and a
second uncond block for InstructPix2Pix). It then runs the UNet once over all rows, or in
several calls: ``batch_cond_uncond`` off, cond and uncond prompts of different token counts
(prompts over 75 tokens), or without the uncond rows at all (NGMS, skip-early-cond). In every
case the calls walk the stacked rows in ascending, contiguous slices. So with

* ``begin_step(n_cond)`` at each denoiser step (the WebUI: ``on_cfg_denoiser``,
  ``params.text_cond.shape[0]``), and
* ``begin_call(n_rows)`` at each UNet call (the session's pre-hook on the UNet does this),

a call covers rows ``[offset, offset + n_rows)`` and exactly its rows below ``n_cond`` are cond
rows. They always come first within the call, so one number, the count of leading cond rows,
describes a call. Nothing here knows about the WebUI, so every layout is tested by replaying
the denoiser's slicing.
"""

from __future__ import annotations

from typing import Optional


class CondRows:
    """Row bookkeeping for one sampling pass; see the module docstring.

    Before any ``begin_step`` (a caller that does not use CFG), every row is a cond row.
    """

    def __init__(self):
        self.n_cond: Optional[int] = None
        self.n_rows: Optional[int] = None
        self._offset = 0
        self._call_rows: Optional[int] = None
        self._call_cond: Optional[int] = None

    def begin_step(self, n_cond: Optional[int], n_rows: Optional[int] = None) -> None:
        """A new denoiser step: ``n_cond`` cond rows lead the stacked batch of ``n_rows`` rows.

        ``n_rows`` (cond + uncond, before any uncond rows are dropped) is optional; when given, a
        step whose calls run past it starts again at row 0 instead of counting every later row
        as uncond.
        """
        if n_cond is not None and n_cond < 0:
            raise ValueError(f"n_cond must be >= 0, got {n_cond}")
        self.n_cond = n_cond
        self.n_rows = n_rows
        self._offset = 0
        self._call_rows = None
        self._call_cond = None

    def begin_call(self, n_rows: int) -> int:
        """A UNet call over the next ``n_rows`` rows; returns how many of them (leading) are cond."""
        if self.n_cond is None:
            cond = n_rows
        else:
            if self.n_rows and self._offset >= self.n_rows:
                self._offset = 0
            cond = max(0, min(n_rows, self.n_cond - self._offset))
            self._offset += n_rows
        self._call_rows, self._call_cond = n_rows, cond
        return cond

    def cond_count(self, n_rows: int) -> int:
        """Leading cond rows of the current call, as seen by a layer whose input has ``n_rows`` rows.

        A layer normally sees the call's own batch. If it sees another one (a UNet run that did
        not pass through ``begin_call``, such as ControlNet's reference pass over a different
        batch), the rows are assumed to start at row 0 of the step.
        """
        if self._call_rows == n_rows and self._call_cond is not None:
            return self._call_cond
        if self.n_cond is None:
            return n_rows
        return min(n_rows, self.n_cond)
