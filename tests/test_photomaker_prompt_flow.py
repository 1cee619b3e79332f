"""PhotoMaker in the WebUI's prompt over a run: which steps see the identity, the cond cache,
prompt editing, the errors a user gets, and that nothing stays patched (see test_photomaker_prompt.py
for the rows themselves)."""

import sys
from types import SimpleNamespace

import pytest
import torch

from lib_identity.errors import IdentityError, UnitError
from lib_identity.webui import prompt_hook
from prompt_stack import P, identity, make_stack, reset_caches, webui_root
from test_photomaker_prompt import encode

PROMPT = "a photo of a man img, smiling"
TRIGGER_FREE = "a photo of a man, smiling"


@pytest.fixture(params=[False, True], ids=["stand-in", "webui"])
def stack(request, monkeypatch):
    if request.param and webui_root() is None:
        pytest.skip("SD_WEBUI_ROOT (a WebUI 1.10 checkout) and lark are needed for the WebUI's own prompt code")
    reset_caches()
    yield make_stack(monkeypatch, real=request.param)
    reset_caches()


def cond(p, step, hires=False):
    """The cond rows' context and pooled vector the UNet gets at ``step``."""
    _, stacked = p.stack.parser.reconstruct_multicond_batch(p.hr_c if hires else p.c, step)
    return stacked["crossattn"], stacked["vector"]


def same(a, b):
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("start,steps,last_plain", [(0.2, 50, 10), (0.5, 20, 10), (0.3, 7, 2)])
def test_steps_up_to_the_start_step_use_the_prompt_without_the_trigger(stack, start, steps, last_plain):
    fused = encode(stack, [PROMPT], [identity(2, start=0.0)], steps=steps)
    plain = encode(stack, [TRIGGER_FREE], steps=steps)
    p = encode(stack, [PROMPT], [identity(2, start=start)], steps=steps)
    for step in range(steps):
        want = plain if step <= last_plain else fused  # official: i <= start_merge_step is text only
        assert same(cond(p, step), cond(want, step)), step
    assert not same(cond(fused, 0), cond(plain, 0))


def test_start_0_fuses_from_the_first_step_and_start_1_never(stack):
    fused = encode(stack, [PROMPT], [identity(1, start=0.0)], steps=10)
    plain = encode(stack, [TRIGGER_FREE], steps=10)
    never = encode(stack, [PROMPT], [identity(1, start=1.0)], steps=10)
    for step in (0, 5, 9):
        assert same(cond(never, step), cond(plain, step))
    assert len(fused.c.batch[0][0].schedules) == 1


def test_the_hires_pass_has_the_identity_from_its_first_step(stack):
    p = encode(stack, [PROMPT], [identity(2, start=0.5)], steps=20, hr_steps=10)
    fused = encode(stack, [PROMPT], [identity(2, start=0.0)], steps=20, hr_steps=10)
    assert same(cond(p, 0), cond(encode(stack, [TRIGGER_FREE], steps=20), 0))  # first pass: text only first
    for step in (0, 4, 9):
        assert same(cond(p, step, hires=True), cond(fused, step, hires=True))
        assert same(cond(p, step, hires=True), cond(fused, 15))


def test_prompt_editing_switches_the_identity_at_its_step(stack):
    ident = identity(2, start=0.25)  # S = 5 of 20
    fused = encode(stack, [PROMPT], [identity(2, start=0.0)])
    man = encode(stack, [TRIGGER_FREE])
    dog = encode(stack, ["a photo of a dog, smiling"])
    leaves = encode(stack, ["a photo of a [man img:dog:0.5], smiling"], [ident])  # man until step 10
    comes = encode(stack, ["a photo of a [dog:man img:0.5], smiling"], [ident])
    for step, (a, b) in {0: (man, dog), 5: (man, dog), 6: (fused, dog), 10: (fused, dog),
                         11: (dog, fused), 19: (dog, fused)}.items():
        assert same(cond(leaves, step), cond(a, step)), step
        assert same(cond(comes, step), cond(b, step)), step


def test_and_sub_prompts_with_the_trigger_each_get_it(stack):
    ident = identity(1)
    p = encode(stack, [PROMPT + " AND a painting of a dog AND a man img in a garden"], [ident])
    ctx, _ = cond(p, 0)
    assert ctx.shape[0] == 3
    first = cond(encode(stack, [PROMPT], [ident]), 0)[0][0]
    third = cond(encode(stack, ["a man img in a garden"], [ident]), 0)[0][0]
    dog = cond(encode(stack, ["a painting of a dog"]), 0)[0][0]
    assert torch.equal(ctx[0], first) and torch.equal(ctx[1], dog) and torch.equal(ctx[2], third)


def test_new_pictures_never_reuse_a_cached_cond_and_cached_tensors_stay_as_they_were(stack):
    without = encode(stack, [PROMPT])  # a run without the unit fills the WebUI's shared cache
    cached = P.cached_c[1]
    kept = cond(without, 0)[0].clone()
    a = encode(stack, [PROMPT], [identity(2, seed=1)])
    b = encode(stack, [PROMPT], [identity(2, seed=2)])
    again_a = encode(stack, [PROMPT], [identity(2, seed=1)])
    assert not torch.equal(cond(a, 0)[0], cond(b, 0)[0])
    assert torch.equal(cond(a, 0)[0], cond(again_a, 0)[0])
    assert P.cached_c[1] is cached and torch.equal(cond(without, 0)[0], kept)  # shared cache untouched
    calls = len(stack.model.encoded)
    assert torch.equal(cond(encode(stack, [PROMPT]), 0)[0], kept) and len(stack.model.encoded) == calls


def test_the_prompt_is_kept_with_its_trigger_for_infotext(stack):
    p = encode(stack, [PROMPT], [identity(1)], hr_steps=5)
    assert p.prompts == [PROMPT] and p.all_prompts == [PROMPT] and p.hr_prompts == [PROMPT]


@pytest.mark.parametrize("prompt,negative,message", [
    ("a photo of a man, smiling", "", r"Identity unit 1, field 'trigger': the prompt has no trigger word 'img'"),
    (PROMPT, "blurry, img", r"Identity unit 1, field 'trigger': the trigger word 'img' is in the negative prompt"),
    ("img of a man", "", r"the trigger word 'img' must come right after the class word"),
])
def test_bad_prompts_stop_with_a_message(stack, prompt, negative, message):
    with pytest.raises(UnitError, match=message):
        encode(stack, [prompt], [identity(1)], negative=(negative,))
    _assert_nothing_patched(stack)


def test_a_prompt_error_that_stops_an_api_run_is_answered_422(stack):
    """The WebUI's API answers an exception from a run with ``vars(e).get('status_code', 500)``
    (modules/api/api.py, ``handle_exception``): a unit's bad settings are the client's to fix, 422."""
    with pytest.raises(UnitError) as e:
        encode(stack, [TRIGGER_FREE], [identity(1)])
    assert vars(e.value).get("status_code", 500) == 422


def test_two_units_need_two_trigger_words(stack):
    with pytest.raises(UnitError, match=r"unit 1 already uses the trigger word 'img'"):
        encode(stack, [PROMPT], [identity(1), identity(1, unit=2)])


def test_two_units_with_their_own_triggers_each_fuse_their_class_word(stack):
    woman, man = identity(1, trigger="ohwx", unit=2, seed=3), identity(2)
    both = cond(encode(stack, ["a man img and a woman ohwx"], [man, woman]), 0)[0]
    only_man = cond(encode(stack, ["a man img and a woman"], [man]), 0)[0]
    only_woman = cond(encode(stack, ["a man man and a woman ohwx"], [woman]), 0)[0]
    rows_man = [r for r in range(77) if not torch.equal(only_man[0, r], only_woman[0, r])]
    assert len(rows_man) == 3  # man's two copies, woman's one
    for r in range(77):
        src = only_man if r in rows_man[:2] else only_woman
        assert torch.equal(both[0, r], src[0, r]), r


def test_nothing_stays_patched_when_encoding_raises(stack, monkeypatch):
    clip_g = stack.model.conditioner.embedders[1]
    encode_g = type(clip_g).encode_with_transformers

    def broken(self, tokens):
        if "tokenize" in vars(self):  # while the identity's hook is on: the failure happens inside it
            raise RuntimeError("CUDA out of memory")
        return encode_g(self, tokens)

    monkeypatch.setattr(type(clip_g), "encode_with_transformers", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        encode(stack, [PROMPT], [identity(1)])
    _assert_nothing_patched(stack)
    monkeypatch.undo()


def _assert_nothing_patched(stack):
    model = stack.model
    assert "get_learned_conditioning" not in vars(model)
    for e in model.conditioner.embedders[:2]:
        assert "tokenize" not in vars(e) and "encode_with_transformers" not in vars(e)
    parser = sys.modules["modules.prompt_parser"]
    assert parser.get_learned_conditioning_prompt_schedules.__module__ == parser.__name__


def test_a_model_without_sdxl_text_encoders_is_refused(stack):
    class SD15:
        conditioner = None

        def get_learned_conditioning(self, batch):
            return torch.zeros(len(batch), 77, 8)

    sys.modules["modules.shared"].sd_model = SD15()
    with pytest.raises(IdentityError, match="PhotoMaker works with SDXL models only"):
        encode(stack, [PROMPT], [identity(1)])
    sys.modules["modules.shared"].sd_model = stack.model


# ---------------------------------------------------------------------------- the run's lifecycle


@pytest.fixture
def run(monkeypatch):
    """``runtime.process`` on a stand-in p whose units resolve to one PhotoMaker unit; ``run.prepared``
    counts how often the units were prepared."""
    import types

    from lib_identity import methods
    from lib_identity.webui import lookup, runtime

    reset_caches()
    stack = make_stack(monkeypatch)
    devices = types.ModuleType("modules.devices")
    devices.device, devices.dtype_unet = torch.device("cpu"), torch.float32
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.remove_callbacks_for_function = lambda fn: None
    for name, mod in {"devices": devices, "script_callbacks": callbacks}.items():
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
        setattr(sys.modules["modules"], name, mod)
    monkeypatch.setattr(sys.modules["modules.shared"].opts, "data", {}, raising=False)
    state = SimpleNamespace(prepared=0, identities=[identity(2, start=0.5)], fail=None)
    unit = SimpleNamespace(number=1, model=SimpleNamespace(info=SimpleNamespace(family="photomaker"), name="pm"),
                           unit=SimpleNamespace(model="pm"))

    def prepare_units(resolved, device, dtype, unet=None):
        state.prepared += 1
        if state.fail:
            raise state.fail
        return methods.Contributions(prompt_identities=list(state.identities))

    monkeypatch.setattr(runtime, "units_for", lambda p, args: [SimpleNamespace(enabled=True)])
    monkeypatch.setattr(runtime, "write_infotext", lambda params, units, **kw: params.update(written=True))
    monkeypatch.setattr(lookup, "resolve_units", lambda units, base: [unit])
    monkeypatch.setattr(lookup, "loaded_base", lambda: None)
    monkeypatch.setattr(methods, "prepare_units", prepare_units)
    state.stack, state.runtime = stack, runtime
    yield state
    runtime.cleanup()
    reset_caches()


def test_a_run_encodes_its_prompts_with_the_identity_prepared_once(run, monkeypatch):
    p = P(run.stack, [PROMPT], steps=20, hr_steps=10)
    p.sample = lambda *a, **k: None
    run.runtime.process(p, ())
    p.setup_conds()
    p.calculate_hr_conds()
    want = encode(run.stack, [PROMPT], [run.identities[0]], steps=20, hr_steps=10)
    for step in (0, 10, 11, 19):
        assert same(cond(p, step), cond(want, step))
    assert same(cond(p, 3, hires=True), cond(want, 3, hires=True))
    assert run.prepared == 1 and p.all_prompts == [PROMPT]
    # the next run without units encodes as the WebUI does
    monkeypatch.setattr(run.runtime, "units_for", lambda p, args: [SimpleNamespace(enabled=False)])
    q = P(run.stack, [TRIGGER_FREE])
    run.runtime.process(q, ())
    q.setup_conds()
    assert same(cond(q, 15), cond(want, 5)) and "get_conds_with_caching" not in vars(q)


def test_preparing_the_units_failing_stops_the_run_in_setup_conds(run):
    run.fail = MemoryError("out of memory")
    p = P(run.stack, [PROMPT])
    p.sample = None
    run.runtime.process(p, ())
    with pytest.raises(IdentityError, match="preparing the units failed: MemoryError: out of memory"):
        p.setup_conds()
    _assert_nothing_patched(run.stack)


def test_a_refiner_gets_the_prompt_without_the_trigger(stack):
    import standin_sdxl_text

    encoder_class = type(stack.model.conditioner.embedders[0])
    refiner = standin_sdxl_text.SDXLRefinerTextModel(encoder_class, stack.parser)
    sys.modules["modules.shared"].sd_model = refiner
    try:
        p = encode(stack, [PROMPT], [identity(2)])
        assert refiner.encoded[-1] == [TRIGGER_FREE]
        assert same(cond(p, 0), cond(encode(stack, [TRIGGER_FREE]), 0))
    finally:
        sys.modules["modules.shared"].sd_model = stack.model
