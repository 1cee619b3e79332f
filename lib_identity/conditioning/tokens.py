"""The class word repeated in the tokens, before the WebUI counts them into 75-token chunks.

Official PhotoMaker tokenizes the prompt, drops the trigger token and repeats the token just
before it (the class word, e.g. ``man</w>``) once per ID embedding. The WebUI tokenizes each
emphasis fragment of a prompt line with ``tokenize(fragments)`` and only then fills its chunks
(BREAK, comma back-tracking, textual inversion). ``ClassTokenRepeater`` stands in for that
``tokenize``: each fragment is tokenized in pieces around the trigger words (a trigger is a
whole word, so the pieces tokenize as they do in the whole text), the trigger's tokens are left
out and the class token is repeated in place, in its own fragment, so it keeps its emphasis
and the copies count against the chunks like any token.

In *marking* mode the copies are negative numbers (``marker(i)`` for identity ``i``) instead of
the class token, so that the WebUI's own chunking shows where they landed.
"""

from __future__ import annotations

from typing import Callable, List, Sequence

from ..errors import UnitError
from .triggers import trigger_regex

BREAK = "BREAK"  # the WebUI's fragment for a BREAK; its tokens are never put into a chunk


def marker(index: int) -> int:
    """The stand-in token for the class-word copies of identity ``index`` (never a real token id)."""
    return -1 - index


def marker_index(token: int) -> int:
    """The identity index of a ``marker`` token, or -1 for a real token."""
    return -1 - token if token < 0 else -1


class ClassTokenRepeater:
    """A ``tokenize(texts) -> token lists`` that removes trigger words and repeats the class token.

    ``identities``: ``PromptIdentity``s (their ``trigger`` and ``id_embeds.shape[0]`` copies);
    ``tokenize``: the WebUI embedder's own ``tokenize``; ``marking``: see the module docstring.
    """

    def __init__(self, identities: Sequence, tokenize: Callable, *, marking: bool = False):
        self.identities = list(identities)
        self.tokenize = tokenize
        self.marking = marking
        self.pattern = trigger_regex(i.trigger for i in self.identities)
        self.by_trigger = {i.trigger.lower(): n for n, i in enumerate(self.identities)}

    def __call__(self, texts: Sequence[str]) -> List[List[int]]:
        texts = list(texts)
        split = [self.pattern.split(t) if t != BREAK else [t] for t in texts]
        if all(len(parts) == 1 for parts in split):
            return self.tokenize(texts)
        pieces = [piece for parts in split for piece in parts[0::2]]
        tokenized = iter(self.tokenize(pieces))
        out: List[List[int]] = []
        last = None  # (fragment, position) of the last real token so far: the class token candidate
        for parts, text in zip(split, texts):
            tokens: List[int] = []
            out.append(tokens)
            for k, piece in enumerate(parts):
                if k % 2 == 0:
                    ids = list(next(tokenized))
                    tokens.extend(ids)
                    if ids and text != BREAK:
                        last = (len(out) - 1, len(tokens) - 1)
                    continue
                index = self.by_trigger[piece.lower()]
                if last is None:
                    ident = self.identities[index]
                    raise UnitError(ident.unit_number, "trigger", f"the trigger word '{ident.trigger}' must come right "
                                    f"after the class word it stands for, e.g. \"a photo of a man {ident.trigger}\"; "
                                    f"here nothing comes before it: \"{text.strip()}\"")
                last = self._repeat(out, last, index)
        return out

    def _repeat(self, out: List[List[int]], at, index: int):
        """Replace the class token at ``at`` by its copies; returns where the last copy is."""
        fragment, position = at
        tokens = out[fragment]
        class_token = tokens[position]
        if class_token < 0:
            ident = self.identities[index]
            raise UnitError(ident.unit_number, "trigger", f"the trigger word '{ident.trigger}' follows another trigger "
                            "word; write each trigger right after its own class word")
        count = int(self.identities[index].id_embeds.shape[0])
        copy = marker(index) if self.marking else class_token
        tokens[position:position + 1] = [copy] * count
        return fragment, position + count - 1
