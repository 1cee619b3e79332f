"""Trigger words in prompt text: finding them, the text without them, and the prompt checks.

A trigger is a whole word (``img`` in "a man img", "(man img:1.2)", "man img,"), matched without
regard to case because CLIP's tokenizer lowercases the text anyway. "imgur" or "img2" are other
words and do not count.
"""

from __future__ import annotations

import re
from typing import Iterable, Pattern, Sequence

from ..errors import UnitError


def trigger_regex(triggers: Iterable[str]) -> Pattern:
    """One pattern matching any of ``triggers`` as a whole word; group 1 is the trigger as written."""
    words = sorted({t for t in triggers}, key=len, reverse=True)  # longest first: "img" must not win over "img_x"
    body = "|".join(re.escape(w) for w in words)
    return re.compile(r"(?<!\w)(" + body + r")(?!\w)", re.IGNORECASE)


def has_trigger(text: str, trigger: str) -> bool:
    """Whether ``trigger`` occurs in ``text`` as a word (prompt-editing and emphasis syntax included)."""
    return trigger_regex([trigger]).search(text) is not None


def strip_triggers(text: str, triggers: Iterable[str]) -> str:
    """``text`` without the trigger words and the white space before each: the prompt as it reads
    without the identity ("a man img, smiling" -> "a man, smiling")."""
    triggers = list(triggers)
    if not triggers:
        return text
    pattern = trigger_regex(triggers)
    return re.sub(r"\s*" + pattern.pattern, "", text, flags=re.IGNORECASE)


def check_triggers(identities: Sequence, *, positive: Sequence[str] = (), negative: Sequence[str] = ()) -> None:
    """Raise ``UnitError`` when a unit's trigger is in a negative prompt, or in none of the positive ones.

    ``identities`` are ``PromptIdentity``s. Two units with the same trigger cannot be told apart
    in the prompt, so that is an error too.
    """
    seen = {}
    for ident in identities:
        key = ident.trigger.strip().lower()
        if not key or re.search(r"\s", key):
            raise UnitError(ident.unit_number, "trigger", f"the trigger word '{ident.trigger}' must be one word, "
                            "e.g. 'img'")
        if key in seen:
            raise UnitError(ident.unit_number, "trigger", f"unit {seen[key]} already uses the trigger word "
                            f"'{ident.trigger}'; give each PhotoMaker unit its own trigger word")
        seen[key] = ident.unit_number
    for ident in identities:
        for text in negative:
            if has_trigger(text, ident.trigger):
                raise UnitError(ident.unit_number, "trigger", f"the trigger word '{ident.trigger}' is in the negative "
                                f"prompt \"{_short(text)}\"; it marks the class word of the positive prompt "
                                f"(\"a photo of a man {ident.trigger}\"): remove it from the negative prompt")
        if positive and not any(has_trigger(text, ident.trigger) for text in positive):
            raise UnitError(ident.unit_number, "trigger", f"the prompt has no trigger word '{ident.trigger}'; write it "
                            f"right after the class word, e.g. \"a photo of a man {ident.trigger}, ...\" "
                            f"(prompt: \"{_short(positive[0])}\")")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
