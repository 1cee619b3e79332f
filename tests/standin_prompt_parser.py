"""A stand-in for the WebUI's ``modules/prompt_parser.py`` (1.10.1), for tests without a WebUI checkout.

Only what the prompt tests use, with the WebUI's behaviour: prompt editing ``[a:b:N]`` and
``[a:N]`` (not nested; N an int step or a float fraction, the hires timeline going on from 1),
``AND`` with ``:weight``, emphasis ``(text:w)`` and ``BREAK``; the schedule and cond-batch
structures; and, as in the WebUI, functions look each other up through the module at call time.
With ``SD_WEBUI_ROOT`` set the tests load the real module instead (``prompt_stack.py``).
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

_EDIT = re.compile(r"\[([^\[\]:]*):(?:([^\[\]:]*):)?\s*([0-9.]+)\s*\]")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps

    def when(number):
        v = float(number)
        v = (v - flt_offset) * steps if "." in number else v - int_offset
        return min(steps, int(v))

    def schedule(prompt):
        edits = list(_EDIT.finditer(prompt))
        ends = sorted({steps} | {w for w in (when(m.group(3)) for m in edits) if w >= 1})
        out = []
        for t in ends:
            def at(m):
                before, after = (m.group(1), m.group(2)) if m.group(2) is not None else ("", m.group(1))
                return before if t <= when(m.group(3)) else after
            out.append([t, _EDIT.sub(at, prompt)])
        return out

    return [schedule(p) for p in prompts]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res, cache = [], {}
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    for prompt, schedule in zip(prompts, schedules):
        if prompt in cache:
            res.append(cache[prompt])
            continue
        texts = SdConditioning([x[1] for x in schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        out = []
        for i, (end, _) in enumerate(schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            out.append(ScheduledPromptConditioning(end, cond))
        cache[prompt] = out
        res.append(out)
    return res


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    flat = SdConditioning(prompts)
    flat.clear()
    index_of, per_prompt = {}, []
    for prompt in prompts:
        parts = []
        for sub in _AND.split(prompt):
            text, weight = _WEIGHT.search(sub).groups()
            if text not in index_of:
                index_of[text] = len(flat)
                flat.append(text)
            parts.append((index_of[text], float(weight) if weight is not None else 1.0))
        per_prompt.append(parts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in parts] for parts in per_prompt]
    return MulticondLearnedConditioning((len(prompts),), batch)


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable in c.batch:
        row = []
        for prompt in composable:
            index = next((k for k, e in enumerate(prompt.schedules) if current_step <= e.end_at_step), 0)
            row.append((len(tensors), prompt.weight))
            tensors.append(prompt.schedules[index].cond)
        conds_list.append(row)
    keys = list(tensors[0].keys())
    return conds_list, {k: _stack([x[k] for x in tensors]) for k in keys}


def _stack(tensors):
    """Rows of different lengths are padded with their last vector, as the WebUI's stack_conds does."""
    n = max(t.shape[0] for t in tensors)
    return torch.stack([t if t.shape[0] == n else torch.cat([t, t[-1:].repeat(n - t.shape[0], 1)]) for t in tensors])


def parse_prompt_attention(text):
    """``(text:w)`` and BREAK (all the tests need); everything else is plain text."""
    res = []
    pos = 0
    for m in re.finditer(r"\(([^():]*):([0-9.]+)\)", text):
        res.extend(_plain(text[pos:m.start()]))
        res.append([m.group(1), float(m.group(2))])
        pos = m.end()
    res.extend(_plain(text[pos:]))
    return res or [["", 1.0]]


def _plain(text):
    out = []
    for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", text)):
        if i > 0:
            out.append(["BREAK", -1])
        if part:
            out.append([part, 1.0])
    return out
