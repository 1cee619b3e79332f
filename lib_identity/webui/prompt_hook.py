"""PhotoMaker in the WebUI's own prompt: the identity enters while the WebUI encodes the prompts.

``install(p, identities)`` wraps this run's ``p.get_conds_with_caching``, through which every
prompt encoding of the run passes (``setup_conds``, ``calculate_hr_conds`` in the hires pass, a
refiner's re-encoding). While the WebUI's encoding function runs, and only then:

* ``prompt_parser.get_learned_conditioning_prompt_schedules`` splits each prompt's schedule at
  the units' start steps (``conditioning.schedule``): up to there the text without the trigger;
* ``sd_model.get_learned_conditioning`` (this model instance) encodes texts that still hold a
  trigger with the class token repeated (``conditioning.tokens``, as each text encoder's
  ``tokenize``), keeps each encoder's output before emphasis, finds the copies with the
  WebUI's own ``process_texts`` and returns a new context whose class rows are fused
  (``conditioning.rows``).

Everything is put back in ``finally`` blocks, so nothing stays patched when encoding raises.
The WebUI's cond caches do not know about ID pictures: with identities the run encodes into
caches of its own, keyed by the identities' ``key``; the shared caches are never read or filled.
Negative prompts are encoded as they are, after a check that they hold no trigger word.
``p.prompts`` and ``p.all_prompts`` are never changed, so infotext keeps the trigger word.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Sequence

import torch

from ..conditioning.rows import fuse_rows, placements
from ..conditioning.schedule import split_schedule, start_step
from ..conditioning.tokens import ClassTokenRepeater
from ..conditioning.triggers import check_triggers, strip_triggers, trigger_regex
from ..errors import IdentityError

_MARK = "_identity_prompt_hook"


def install(p, identities: Callable[[], Sequence]) -> None:
    """Wrap ``p.get_conds_with_caching``; ``identities()`` gives this run's ``PromptIdentity``s (maybe none)."""
    current = p.get_conds_with_caching
    original = getattr(current, "_identity_original", current) if getattr(current, _MARK, False) else current
    own_caches = {}

    def get_conds_with_caching(function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        idents = list(identities() or [])
        if not idents:
            return original(function, required_prompts, steps, caches, extra_network_data, hires_steps)
        texts = list(required_prompts)
        if getattr(required_prompts, "is_negative_prompt", False):
            check_triggers(idents, negative=texts)
            return original(function, required_prompts, steps, caches, extra_network_data, hires_steps)
        check_triggers(idents, positive=texts)
        key = tuple(i.key for i in idents)
        mine = [own_caches.setdefault((id(c), key), (c, [None, None]))[1] for c in caches]

        def encode(model, prompts, steps_, hires_steps_=None, use_old_scheduling=False):
            with _encoding(model, idents, steps_, hires_steps_, use_old_scheduling):
                return function(model, prompts, steps_, hires_steps_, use_old_scheduling)

        return original(encode, required_prompts, steps, mine, extra_network_data, hires_steps)

    setattr(get_conds_with_caching, _MARK, True)
    get_conds_with_caching._identity_original = original
    p.get_conds_with_caching = get_conds_with_caching


@contextlib.contextmanager
def _encoding(model, idents, steps, hires_steps, use_old_scheduling):
    from modules import prompt_parser

    starts = [(i.trigger, start_step(i.start, steps, hires_steps, use_old_scheduling)) for i in idents]
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules

    def split_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
        found = schedules(prompts, base_steps, hires_steps, use_old_scheduling)
        return [split_schedule(s, starts) for s in found]

    encode = model.get_learned_conditioning

    def get_learned_conditioning(texts):
        return conditioning_with_identities(model, encode, texts, idents)

    with _swapped(prompt_parser, "get_learned_conditioning_prompt_schedules", split_schedules), \
            _swapped(model, "get_learned_conditioning", get_learned_conditioning):
        yield


def conditioning_with_identities(model, encode: Callable, texts, idents: Sequence):
    """``encode(texts)`` (the model's own ``get_learned_conditioning``) with the identities fused in."""
    pattern = trigger_regex(i.trigger for i in idents)
    if getattr(texts, "is_negative_prompt", False) or not any(pattern.search(t) for t in texts):
        return encode(texts)
    embedders = text_embedders(model)
    if len(embedders) != 2:
        # An SDXL refiner (OpenCLIP-G only) re-encodes the prompts when it takes over: PhotoMaker's
        # fuse needs both SDXL encoders, so the refiner gets the prompt without the trigger words.
        _note_once("the refiner (or a model with one text encoder) gets the prompt without the trigger word; "
                   "PhotoMaker acts through the base model")
        return encode(_same_kind(texts, [strip_triggers(t, [i.trigger for i in idents]) for t in texts]))
    raw: List[list] = [[] for _ in embedders]
    seen_tokens: List[list] = [[] for _ in embedders]
    with contextlib.ExitStack() as stack, torch.no_grad():
        for e, store, tokens in zip(embedders, raw, seen_tokens):
            stack.enter_context(_swapped(e, "tokenize", ClassTokenRepeater(idents, e.tokenize)))
            stack.enter_context(_swapped(e, "encode_with_transformers",
                                         _capture(e.encode_with_transformers, store, tokens)))
        cond = encode(texts)
    if not isinstance(cond, dict) or "crossattn" not in cond:
        raise IdentityError("PhotoMaker works with SDXL models only: this model's text conditioning has no "
                            "SDXL cross-attention context; load an SDXL checkpoint")
    found = _placements(embedders, texts, idents, raw, seen_tokens)
    with torch.no_grad():
        crossattn = fuse_rows(cond["crossattn"], raw, found, idents)
    out = dict(cond)
    out["crossattn"] = crossattn
    return out


_noted = set()


def _note_once(message: str) -> None:
    if message not in _noted:
        _noted.add(message)
        print(f"[identity] PhotoMaker: {message}")


def _same_kind(texts, new: list):
    """``new`` as the same kind of list as ``texts`` (the WebUI's SdConditioning keeps size and sign)."""
    try:
        return type(texts)(new, copy_from=texts)
    except TypeError:
        return new


def text_embedders(model) -> list:
    """The WebUI's text encoders of an SDXL model, in the order of their context columns."""
    conditioner = getattr(model, "conditioner", None)
    found = [e for e in getattr(conditioner, "embedders", [])
             if hasattr(e, "process_texts") and hasattr(e, "encode_with_transformers") and hasattr(e, "tokenize")]
    if not found:
        raise IdentityError("PhotoMaker works with SDXL models only: the loaded model has no SDXL text encoders; "
                            "load an SDXL checkpoint")
    return found


def _placements(embedders, texts, idents, raw, seen_tokens):
    counts = [int(i.id_embeds.shape[0]) for i in idents]
    result = None
    for e, chunks_seen, tokens_seen in zip(embedders, raw, seen_tokens):
        with _swapped(e, "tokenize", ClassTokenRepeater(idents, e.tokenize, marking=True)):
            batch_chunks, _ = e.process_texts(list(texts))
        found = placements(batch_chunks, counts)
        n_chunks = max(len(c) for c in batch_chunks)
        if len(chunks_seen) != n_chunks or not _copies_are_class_tokens(found, tokens_seen):
            raise IdentityError("PhotoMaker: the prompt could not be lined up with its encoding (another extension or "
                                "an option changes how prompts are split into chunks); the class word before the "
                                "trigger word must be a plain word")
        if result is not None and found != result:
            raise IdentityError("PhotoMaker: the two SDXL text encoders split this prompt differently, so the class "
                                "word is not at the same place in both; simplify the text around the trigger word")
        result = found
    return result


def _copies_are_class_tokens(found, tokens_seen) -> bool:
    for place in found:
        ids = {int(tokens_seen[r // 77][place.text][r % 77]) for r in place.rows}
        if len(ids) != 1 or min(ids) < 0:
            return False
    return True


def _capture(encode, store: list, tokens: list):
    def encode_with_transformers(batch_tokens):
        z = encode(batch_tokens)
        store.append(z)
        tokens.append(torch.as_tensor(batch_tokens).tolist())
        return z

    return encode_with_transformers


@contextlib.contextmanager
def _swapped(obj, name: str, value):
    """Set ``obj.name = value`` for the block; afterwards put back what was there (instance attribute
    or none), unless someone else replaced ours meanwhile."""
    had_own = name in getattr(obj, "__dict__", {})
    before = obj.__dict__[name] if had_own else None
    setattr(obj, name, value)
    try:
        yield
    finally:
        if getattr(obj, "__dict__", {}).get(name) is value or (not hasattr(obj, "__dict__") and getattr(obj, name) is value):
            if had_own:
                setattr(obj, name, before)
            else:
                delattr(obj, name)
