"""PhotoMaker in the WebUI's own prompt: the context the UNet receives, step by step.

Each check encodes through the WebUI's prompt path (``get_conds_with_caching`` -> prompt parser
-> ``sd_model.get_learned_conditioning`` -> the text encoders' chunking and emphasis) with the
identity hook installed, and compares with the WebUI's *plain* conditioning of the prompt written
without the trigger and with the class word repeated: every row equal, except the class-word
rows, which must be the fuse of those rows (before emphasis) with the ID embeddings, scaled as
the WebUI scaled those tokens. Tokens come from the real CLIP BPE vocabulary; with
``SD_WEBUI_ROOT`` set, the same checks also run on the WebUI's own prompt_parser/sd_hijack_clip.
"""

import re

import pytest
import torch

from lib_identity.errors import UnitError
from lib_identity.webui import prompt_hook
from prompt_stack import WIDTHS, P, identity, make_stack, reset_caches, webui_root


@pytest.fixture(params=[False, True], ids=["stand-in", "webui"])
def stack(request, monkeypatch):
    if request.param and webui_root() is None:
        pytest.skip("SD_WEBUI_ROOT (a WebUI 1.10 checkout) and lark are needed for the WebUI's own prompt code")
    reset_caches()
    yield make_stack(monkeypatch, real=request.param)
    reset_caches()


def encode(stack, prompts, idents=None, steps=20, hr_steps=None, negative=("",)):
    p = P(stack, prompts, negative=negative, steps=steps, hr_steps=hr_steps)
    if idents is not None:
        prompt_hook.install(p, lambda: idents)
    p.setup_conds()
    if hr_steps:
        p.calculate_hr_conds()
    return p


def repeated(prompt, n, trigger="img"):
    """The prompt as the WebUI would encode it by hand: trigger gone, class word ("man") n times."""
    return re.sub(r"man " + trigger, " ".join(["man"] * n), prompt)


def class_rows(stack, text):
    """Rows of the "man" tokens in ``text``, from the WebUI's own chunking (77 per chunk)."""
    man = stack.model.conditioner.embedders[0].tokenize(["man"])[0][0]
    chunks = stack.model.conditioner.embedders[0].process_texts([text])[0][0]
    return [77 * c + j for c, chunk in enumerate(chunks) for j, t in enumerate(chunk.tokens) if t == man]


def expected_rows(plain_rows, raw_rows, ident):
    """fuse(raw rows, ID embeddings), each encoder's columns scaled as the WebUI scaled the token."""
    fused = ident.fuse(raw_rows, ident.id_embeds)
    out, col = [], 0
    for width in WIDTHS:
        seen, raw = plain_rows[:, col:col + width], raw_rows[:, col:col + width]
        scale = seen[:, :1] / raw[:, :1]
        torch.testing.assert_close(seen, raw * scale, rtol=1e-5, atol=1e-6)  # emphasis is a per-row factor
        out.append(fused[:, col:col + width] * scale)
        col += width
    return torch.cat(out, -1), scale


def check_fused(stack, prompt, ident, step=0, emphasis_on_class=None, reference=None):
    n = ident.id_embeds.shape[0]
    got = encode(stack, [prompt], [ident]).unet_cond(step)
    reference = reference or repeated(prompt, n)
    plain = encode(stack, [reference]).unet_cond(step)
    mode = stack.opts.emphasis
    stack.set_emphasis("Ignore")
    raw = encode(stack, [reference]).unet_cond(step)
    stack.set_emphasis(mode)
    assert got.shape == plain.shape
    for k, sub in enumerate(re.split(r"\s*\bAND\b\s*", reference)):
        rows = class_rows(stack, sub)
        assert len(rows) == n
        others = [r for r in range(got.shape[1]) if r not in rows]
        assert torch.equal(got[k, others], plain[k, others])
        want, scale = expected_rows(plain[k, rows], raw[k, rows], ident)
        torch.testing.assert_close(got[k, rows], want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[k, rows], plain[k, rows], atol=1e-3)
        if emphasis_on_class is not None:
            assert (scale - emphasis_on_class).abs().max() < 0.05 and (scale - 1).abs().min() > 0.05
    return rows


LONG = ", ".join(f"detail{i}" for i in range(40))  # well over 75 tokens before the trigger

PROMPTS = {
    "plain": "a photo of a man img, smiling, in a garden",
    "emphasis": "a photo of a (man img:1.3), smiling",
    "BREAK": "a garden at dusk BREAK a photo of a man img, smiling",
    "chunk 2": LONG + ", a photo of a man img",
    "AND": "a photo of a man img, smiling AND a painting of a man img:0.7",
}
IDENTITIES = {"v1x1": (1, False), "v1x2": (2, False), "v1x4": (4, False),  # n = 1, 2, 4
              "v2x1": (1, True), "v2x2": (2, True), "v2x4": (4, True)}  # n = 2, 4, 8
CASES = [("plain", name) for name in IDENTITIES] + [(case, name) for case in list(PROMPTS)[1:] for name in ("v1x2", "v2x2")]


@pytest.mark.parametrize("case,name", CASES, ids=[f"{c}-{n}" for c, n in CASES])
def test_only_the_class_rows_change_and_they_are_the_fuse(stack, case, name):
    pictures, v2 = IDENTITIES[name]
    ident = identity(pictures, v2=v2)
    assert ident.id_embeds.shape[0] == pictures * (2 if v2 else 1)
    rows = check_fused(stack, PROMPTS[case], ident, emphasis_on_class=1.3 if case == "emphasis" else None)
    if case in ("chunk 2", "BREAK"):
        assert min(rows) > 77  # the class word and its copies sit in the second chunk


def test_the_copies_count_against_the_75_token_chunks(stack):
    prompt = ", ".join(["cat"] * 34) + " man img, smiling"  # 71 tokens: one chunk without the identity
    assert encode(stack, [prompt.replace(" img", "")]).unet_cond(0).shape[1] == 77
    ident = identity(4, v2=True)  # 8 copies of "man": 77 tokens, so a second chunk
    rows = check_fused(stack, prompt, ident)
    assert encode(stack, [prompt], [ident]).unet_cond(0).shape[1] == 154 and len(rows) == 8


def test_a_textual_inversion_before_the_class_word_moves_its_rows(stack):
    if not stack.real:
        pytest.skip("the stand-in has no textual inversion; the WebUI's own chunking has")
    prompt = "a zebra photo of a man img, smiling"  # "zebra" is a 3-vector embedding here
    rows = check_fused(stack, prompt, identity(2))
    assert rows == [8, 9]  # start, a, 3 vectors, photo, of, a -> "man" at 8, not 6


def test_emphasis_without_mean_restoration_scales_the_fused_rows_by_the_weight(stack):
    stack.set_emphasis("No norm")
    check_fused(stack, "a photo of a (man img:0.8), smiling", identity(2), emphasis_on_class=0.8)


def test_the_copies_take_the_class_words_emphasis_when_the_trigger_is_outside_it(stack):
    check_fused(stack, "a photo of a (man:1.3) img, smiling", identity(2), emphasis_on_class=1.3,
                reference="a photo of a (man man:1.3), smiling")
