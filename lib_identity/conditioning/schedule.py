"""When the identity acts: the unit's ``start`` as a point on the WebUI's prompt-editing timeline.

PhotoMaker denoises steps ``i <= start_merge_step`` with the prompt without the trigger word and
the later steps with the fused prompt (official default 10 of 50 steps = start 0.2). Here
``start`` behaves exactly like the WebUI's own prompt editing ``[prompt without trigger:prompt:start]``:

* first pass: ``S = int(start * steps)`` (``steps`` as the WebUI counts them for the sampler);
  steps ``0..S`` use the trigger-free prompt, steps after S the fused one; 0.2 of 50 -> S = 10,
  the official schedule. ``S < 1`` (start 0, or a start too small for the step count) means the
  identity acts from the first step, as ``[a:b:0.01]`` does in the WebUI.
* hires pass: the WebUI's timeline goes on (a fraction ``f`` there is ``f - 1``), so a ``start``
  below 1 lies in the first pass and the identity acts in the whole hires pass. With the WebUI's
  "old prompt editing timelines" option the hires pass counts the first pass's steps again, and
  so does ``start``.

The split is applied to each prompt's schedule (a list of ``[end_at_step, text]``), so prompt
editing that adds or removes the trigger word and ``AND`` sub-prompts keep their own steps.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from .triggers import has_trigger, strip_triggers


def start_step(start: float, steps: int, hires_steps: Optional[int] = None, use_old_scheduling: bool = False) -> int:
    """The last step (0-based) that uses the trigger-free prompt; below 1 means none does."""
    if hires_steps is None or use_old_scheduling:
        return min(steps, int(float(start) * steps))
    return min(hires_steps, int((float(start) - 1.0) * hires_steps))


def split_schedule(schedule: Sequence[Sequence], starts: Sequence[Tuple[str, int]]) -> List[list]:
    """``schedule`` (``[[end_at_step, text], ...]``, ascending) with each trigger removed up to its start step.

    ``starts``: ``(trigger, S)`` per unit (``start_step``). Entries are split at every S that falls
    inside one whose text has that trigger; neighbours that end up with the same text are merged.
    """
    entries = [[int(end), text] for end, text in schedule]
    if not entries or not starts:
        return entries
    last = entries[-1][0]
    bounds = {end for end, _ in entries}
    for trigger, s in starts:
        if 1 <= s < last and any(has_trigger(text, trigger) for _, text in entries):
            bounds.add(s)
    out: List[list] = []
    for bound in sorted(bounds):
        text = next(t for end, t in entries if bound <= end)
        early = [trigger for trigger, s in starts if bound <= s]
        text = strip_triggers(text, early)
        if out and out[-1][1] == text:
            out[-1][0] = bound
        else:
            out.append([bound, text])
    return out
