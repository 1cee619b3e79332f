"""The patch session: what it adds, how it coexists with other patches, and how it goes away."""

import contextlib
import types

import pytest
import torch
import torch.nn.functional as F

from lib_identity.errors import PatchError
from lib_identity.unet import ImagePrompt, PatchSession, find_cross_attentions, live_sessions, remove_sessions
from unet_helpers import hook_counts, random_ip_pairs, random_prompt, unet_inputs
from unet_models import SD15, SDXL, build_ldm_unet, randomize_

C = 32


@pytest.fixture(scope="module")
def unet():
    return randomize_(build_ldm_unet(SD15, context_dim=C), seed=3)


@pytest.fixture(scope="module")
def xl_unet():
    return randomize_(build_ldm_unet(SDXL, context_dim=C), seed=4)


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    remove_sessions(None)


def run(unet, inputs, session=None, n_cond=None, progress=None):
    x, t, c = inputs
    if session is not None:
        session.begin_step(n_cond, progress)
    with torch.no_grad():
        return unet(x, t, context=c)


# ---------------------------------------------------------------- install / remove


def test_removal_gives_bit_identical_outputs(unet):
    inputs = unet_inputs(2, C)
    hooks = hook_counts(unet)
    bare = run(unet, inputs)
    with PatchSession(unet, [random_prompt(unet, C)]) as session:
        patched = run(unet, inputs, session, n_cond=1)
    assert (patched - bare).abs().max() > 1e-2
    assert torch.equal(run(unet, inputs), bare)
    assert hook_counts(unet) == hooks


def test_an_error_during_sampling_still_removes_everything(unet):
    inputs = unet_inputs(2, C)
    bare = run(unet, inputs)
    with pytest.raises(KeyboardInterrupt):
        with PatchSession(unet, [random_prompt(unet, C)]) as session:
            run(unet, inputs, session, n_cond=1)
            raise KeyboardInterrupt  # the user pressed Interrupt
    assert not live_sessions()
    assert torch.equal(run(unet, inputs), bare)


def test_a_leftover_session_is_removed_when_the_next_one_installs(unet):
    inputs = unet_inputs(2, C)
    prompt = random_prompt(unet, C)
    crashed = PatchSession(unet, [prompt]).install()  # a run that never reached its cleanup
    fresh = PatchSession(unet, [prompt]).install()
    assert not crashed.installed and live_sessions() == [fresh]
    once = run(unet, inputs, fresh, n_cond=1)
    fresh.remove()
    with PatchSession(unet, [prompt]) as only:
        assert torch.equal(run(unet, inputs, only, n_cond=1), once)  # applied once, not twice


def test_sessions_of_other_owners_are_left_alone_and_stack(unet):
    inputs = unet_inputs(2, C)
    a, b = random_prompt(unet, C, seed=1), random_prompt(unet, C, seed=2)
    with PatchSession(unet, [a, b]) as both:
        expected = run(unet, inputs, both, n_cond=1)
    other = PatchSession(unet, [a], owner="another-extension").install()
    mine = PatchSession(unet, [b]).install()
    assert other.installed
    for s in (other, mine):
        s.begin_step(1)
    torch.testing.assert_close(run(unet, inputs), expected, atol=1e-5, rtol=0)
    assert remove_sessions() == 1 and other.installed
    assert remove_sessions("another-extension") == 1


def test_remove_is_idempotent_and_survives_others_clearing_hooks(unet):
    inputs = unet_inputs(2, C)
    bare = run(unet, inputs)
    session = PatchSession(unet, [random_prompt(unet, C)]).install()
    for layer in find_cross_attentions(unet):
        layer.module.to_q._forward_hooks.clear()  # someone else wiped the hooks
    session.remove()
    session.remove()
    assert torch.equal(run(unet, inputs), bare)


def test_bad_inputs_are_refused_before_the_unet_is_touched(unet):
    hooks = hook_counts(unet)
    layers = find_cross_attentions(unet)
    good = random_prompt(unet, C)
    cases = [
        (dict(ip_layers=good.ip_layers[:-1]), "15 cross-attention layers, the loaded UNet has 16"),
        (dict(ip_layers=[(k[:, :-1], v) for k, v in good.ip_layers]), "ip_adapter.1.to_k_ip.weight"),
        (dict(cond_tokens=torch.zeros(1, 4, C + 1)), f"context has {C}"),
        (dict(start=0.8, end=0.2), "start 0.8 and end 0.2"),
        (dict(mask=torch.full((4, 4), 255.0)), "divide an 8-bit mask by 255"),
        (dict(layer_weights="style-ish"), "unknown layer weighting"),
        (dict(layer_weights=[1.0] * 3), "3 layer weights given; this UNet needs 16"),
        (dict(combine="sum"), "unknown combine mode"),
    ]
    for change, message in cases:
        fields = dict(vars(good), name="unit 2")
        fields.update(change)
        with pytest.raises(PatchError, match=message) as info:
            PatchSession(unet, [ImagePrompt(**fields)]).install()
        assert str(info.value).startswith("unit 2")
    assert hook_counts(unet) == hooks and len(layers) == 16


# ---------------------------------------------------------------- the text branch is someone else's


def _sdpa_forward(self, x, context=None, mask=None, **kwargs):
    """What the WebUI installs at class level ("sdp" optimisation), written for this test."""
    h = self.heads
    q, k, v = self.to_q(x), self.to_k(x if context is None else context), self.to_v(x if context is None else context)
    b = q.shape[0]
    q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
    return self.to_out(out)


def test_the_text_branch_is_the_forward_installed_before(unet):
    """An instance-level replacement (as sd-webui-controlnet does) keeps running, with its kwargs."""
    inputs = unet_inputs(2, C)
    prompt = random_prompt(unet, C)
    with PatchSession(unet, [prompt]) as session:
        reference = run(unet, inputs, session, n_cond=1)
    calls = []
    layers = find_cross_attentions(unet)

    def replacement(self, x, context=None, **kwargs):
        calls.append(sorted(kwargs))
        return _sdpa_forward(self, x, context)

    try:
        for layer in layers:
            layer.module.forward = types.MethodType(replacement, layer.module)
        with PatchSession(unet, [prompt]) as session:
            replaced = run(unet, inputs, session, n_cond=1)
            # the other extension restores its own patch in the middle of our session ...
            for layer in layers:
                del layer.module.forward
            restored = run(unet, inputs, session, n_cond=1)
    finally:
        for layer in layers:
            layer.module.__dict__.pop("forward", None)
    assert len(calls) == len(layers)
    torch.testing.assert_close(replaced, reference, atol=1e-5, rtol=0)
    assert torch.equal(restored, reference)


def test_a_class_level_swap_during_the_session_keeps_the_image_branch(unet):
    """The WebUI re-applies its attention optimisation (class attribute) when a setting changes."""
    inputs = unet_inputs(2, C)
    cls = type(find_cross_attentions(unet)[0].module)
    original = cls.forward
    with PatchSession(unet, [random_prompt(unet, C)]) as session:
        before = run(unet, inputs, session, n_cond=1)
        try:
            cls.forward = _sdpa_forward
            after = run(unet, inputs, session, n_cond=1)
        finally:
            cls.forward = original
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)


def test_a_forward_it_does_not_understand_is_left_alone_with_one_warning(unet, caplog):
    """A text branch that runs ``to_out`` on half the batch at a time: no guessing, no crash."""
    layer = find_cross_attentions(unet)[0]
    attn = layer.module

    def chunked(self, x, context=None, **kwargs):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, h = q.shape[0], self.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[-1])
        return torch.cat([self.to_out(out[: b // 2]), self.to_out(out[b // 2:])])

    g = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 16, layer.hidden_size, generator=g), torch.randn(2, 7, C, generator=g)
    attn.forward = types.MethodType(chunked, attn)
    try:
        with torch.no_grad():
            bare = attn(x, context=context)
            with PatchSession(unet, [random_prompt(unet, C)]) as session:
                session.begin_step(1)
                first, second = attn(x, context=context), attn(x, context=context)
    finally:
        del attn.forward
    assert torch.equal(first, bare) and torch.equal(second, bare)
    warnings = [r for r in caplog.records if "not understood" in r.getMessage()]
    assert len(warnings) == 1 and layer.name in warnings[0].getMessage()


def test_sgm_additional_tokens_are_passed_through_and_cut_from_the_queries(xl_unet):
    """sgm's attention prepends ``additional_tokens`` to the queries and strips them afterwards."""
    layer = find_cross_attentions(xl_unet)[5]
    attn = layer.module
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, layer.hidden_size, generator=g)
    extra = torch.randn(2, 3, layer.hidden_size, generator=g)
    context = torch.randn(2, 7, C, generator=g)
    prompt = random_prompt(xl_unet, C, weight=0.6)
    with torch.no_grad():
        bare = attn(x, context=context, additional_tokens=extra)
        with PatchSession(xl_unet, [prompt]) as session:
            session.begin_step(1)
            patched = attn(x, context=context, additional_tokens=extra)
        # by hand: the image branch over the real tokens' queries, through to_out's matrix
        wk, wv = prompt.ip_layers[layer.ordinal]
        q = attn.to_q(x)
        tokens = torch.cat([prompt.cond_tokens, prompt.uncond_tokens])
        h, d = layer.heads, layer.head_dim
        split = lambda t: t.view(t.shape[0], -1, h, d).transpose(1, 2)  # noqa: E731
        img = F.scaled_dot_product_attention(split(q), split(tokens @ wk.T), split(tokens @ wv.T))
        img = img.transpose(1, 2).reshape(2, 12, h * d)
    torch.testing.assert_close(patched - bare, 0.6 * img @ attn.to_out[0].weight.T, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- controls


def test_step_window(unet):
    layer = find_cross_attentions(unet)[2]
    g = torch.Generator().manual_seed(5)
    x, context = torch.randn(2, 16, layer.hidden_size, generator=g), torch.randn(2, 7, C, generator=g)
    with torch.no_grad():
        bare = layer.module(x, context=context)
        with PatchSession(unet, [random_prompt(unet, C, start=0.25, end=0.5)]) as session:
            for progress, active in [(0.0, False), (0.24, False), (0.25, True), (0.49, True), (0.5, False),
                                     (None, True)]:
                session.begin_step(1, progress)
                assert torch.equal(layer.module(x, context=context), bare) is not active, progress
        with PatchSession(unet, [random_prompt(unet, C, start=0.5, end=1.0)]) as session:
            session.begin_step(1, 1.0)
            assert not torch.equal(layer.module(x, context=context), bare)


def _layer_output(unet, ordinal, prompt_kwargs, weight):
    layer = find_cross_attentions(unet)[ordinal]
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 16, layer.hidden_size, generator=g)
    context = torch.randn(2, 7, C, generator=g)
    with torch.no_grad(), PatchSession(unet, [random_prompt(unet, C, weight=weight, **prompt_kwargs)]) as session:
        session.begin_step(1)
        return layer.module(x, context=context)


def test_weight_scales_the_image_branch_and_may_be_negative(unet):
    zero, plus, minus = (_layer_output(unet, 3, {}, w) for w in (0.0, 0.8, -0.8))
    torch.testing.assert_close(minus - zero, -(plus - zero), atol=1e-5, rtol=0)
    assert (plus - zero).abs().max() > 1e-3


def test_weight_zero_installs_nothing(unet):
    hooks = hook_counts(unet)
    with PatchSession(unet, [random_prompt(unet, C, weight=0.0)]) as session:
        assert session.patched_layers == []
        assert sum(a + b for a, b in hook_counts(unet).values()) == sum(a + b for a, b in hooks.values()) + 1


def test_layer_presets_patch_only_their_blocks(xl_unet):
    with PatchSession(xl_unet, [random_prompt(xl_unet, C, layer_weights="style transfer")]) as session:
        assert {l.block for l in session.patched_layers} == {"output_blocks.1.1"}
        assert len(session.patched_layers) == 10
    with PatchSession(xl_unet, [random_prompt(xl_unet, C, layer_weights="style and composition",
                                              composition_weight=0.5)]) as session:
        assert {l.block for l in session.patched_layers} == {"output_blocks.1.1", "input_blocks.8.1"}
        (prepared,) = session.prepared
        assert {prepared.layer_weight(l.ordinal) for l in session.patched_layers if l.block == "input_blocks.8.1"} == {0.5}


def test_a_free_list_per_block_or_per_layer(xl_unet):
    layers = find_cross_attentions(xl_unet)
    per_block = [0.0] * 11
    per_block[2] = 0.5  # the third attention block in official order: input_blocks.7.1
    with PatchSession(xl_unet, [random_prompt(xl_unet, C, layer_weights=per_block)]) as session:
        assert {l.block for l in session.patched_layers} == {"input_blocks.7.1"}
    per_layer = [0.0] * 70
    per_layer[69] = 2.0
    with PatchSession(xl_unet, [random_prompt(xl_unet, C, layer_weights=per_layer)]) as session:
        assert [l.name for l in session.patched_layers] == [layers[69].name] == ["middle_block.1.transformer_blocks.9.attn2"]


def test_several_units_add_up_each_with_its_own_weight(unet):
    """At one layer: both units together = the sum of each one's change."""
    layer = find_cross_attentions(unet)[7]
    g = torch.Generator().manual_seed(8)
    x, context = torch.randn(3, 16, layer.hidden_size, generator=g), torch.randn(3, 7, C, generator=g)
    a = random_prompt(unet, C, seed=1, weight=0.7)
    b = random_prompt(unet, C, seed=2, weight=-0.3, tokens=16)

    def out(prompts):
        with torch.no_grad(), PatchSession(unet, prompts) as s:
            s.begin_step(2)
            return layer.module(x, context=context)

    bare = out([])
    torch.testing.assert_close(out([a, b]) - bare, (out([a]) - bare) + (out([b]) - bare), atol=1e-5, rtol=0)


def test_reference_combination(unet):
    layer_inputs = unet_inputs(2, C)
    g = torch.Generator().manual_seed(9)
    refs = torch.randn(3, 4, C, generator=g)
    pairs = random_ip_pairs(unet, C)

    def out(**kw):
        with PatchSession(unet, [ImagePrompt(ip_layers=pairs, **kw)]) as s:
            return run(unet, layer_inputs, s, n_cond=1)

    torch.testing.assert_close(out(cond_tokens=refs, combine="average"),
                               out(cond_tokens=refs.mean(0, keepdim=True)), atol=1e-6, rtol=0)
    weighted = (refs * torch.tensor([1.0, 0.0, 3.0])[:, None, None]).sum(0, keepdim=True) / 4
    torch.testing.assert_close(out(cond_tokens=refs, combine="weighted average", reference_weights=[1, 0, 3]),
                               out(cond_tokens=weighted), atol=1e-6, rtol=0)
    torch.testing.assert_close(out(cond_tokens=refs, combine="concat"),
                               out(cond_tokens=refs.reshape(1, 12, C)), atol=1e-6, rtol=0)


@contextlib.contextmanager
def counting_projections(prompt):
    """Counts the image key/value projections (``F.linear`` with the prompt's to_k_ip/to_v_ip weights)."""
    ip_weights = {id(w) for pair in prompt.ip_layers for w in pair}
    projections = []
    real_linear = F.linear

    def counting_linear(input, weight, *args, **kwargs):
        if id(weight) in ip_weights:
            projections.append(1)
        return real_linear(input, weight, *args, **kwargs)

    F.linear = counting_linear
    try:
        yield projections
    finally:
        F.linear = real_linear


def test_keys_and_values_are_projected_once_per_pass_per_dtype(unet):
    inputs = unet_inputs(2, C)
    prompt = random_prompt(unet, C)
    with PatchSession(unet, [prompt]) as session, counting_projections(prompt) as projections:
        for step in range(3):
            run(unet, inputs, session, n_cond=1, progress=step / 3)
    assert len(projections) == 2 * 16  # to_k_ip and to_v_ip of every layer, once for three steps


def test_dtype_changes_between_calls_use_their_own_cache(unet):
    """Calls in another dtype (half precision, or --lowvram bringing blocks over) get their own keys/values."""
    inputs = unet_inputs(2, C)
    prompt = random_prompt(unet, C)

    def in_bf16(session):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return run(unet, inputs, session, n_cond=1)

    with PatchSession(unet, [prompt]) as fresh:
        expected_bf16 = in_bf16(fresh)
    with PatchSession(unet, [prompt]) as session, counting_projections(prompt) as projections:
        full = run(unet, inputs, session, n_cond=1)
        assert len(projections) == 2 * 16
        got_bf16 = in_bf16(session)
        assert len(projections) == 4 * 16  # bf16 needs its own keys/values: projected again
        again = run(unet, inputs, session, n_cond=1)
        in_bf16(session)
        assert len(projections) == 4 * 16  # both are kept for the rest of the pass
    assert torch.equal(got_bf16, expected_bf16)
    assert torch.equal(again, full)
    assert (got_bf16.float() - full).abs().max() < 0.2  # same prompt, lower precision


def test_a_unet_moved_to_another_device_mid_pass_gets_keys_and_values_there(unet):
    """--lowvram / --medvram move UNet blocks between devices during sampling; the adapter's
    weights stay where they are and the keys/values are made once per device (``meta`` stands
    in for the GPU here)."""
    import copy

    moving = copy.deepcopy(unet)
    x, t, c = unet_inputs(2, C)
    prompt = random_prompt(moving, C)
    with torch.no_grad(), PatchSession(moving, [prompt]) as session, counting_projections(prompt) as projections:
        session.begin_step(1)
        moving(x, t, context=c)
        assert len(projections) == 2 * 16
        moving.to("meta")
        out = moving(x.to("meta"), t.to("meta"), context=c.to("meta"))
        assert len(projections) == 4 * 16  # made again for the new device
        session.begin_step(1)
        moving(x.to("meta"), t.to("meta"), context=c.to("meta"))
        assert len(projections) == 4 * 16  # and kept there
    assert out.device.type == "meta" and out.shape == x.shape
    assert all(w.device.type == "cpu" for pair in prompt.ip_layers for w in pair)


def test_begin_call_by_hand_when_the_session_does_not_track_calls(unet):
    x, t, c = unet_inputs(4, C)
    prompt = random_prompt(unet, C)
    with PatchSession(unet, [prompt]) as tracked:
        tracked.begin_step(2)
        expected = torch.cat([unet(x[:3], t[:3], context=c[:3]), unet(x[3:], t[3:], context=c[3:])])
    with PatchSession(unet, [prompt], track_calls=False) as manual:
        manual.begin_step(2)
        assert manual.begin_call(x[:3]) == 2
        first = unet(x[:3], t[:3], context=c[:3])
        assert manual.begin_call(x[3:]) == 0
        second = unet(x[3:], t[3:], context=c[3:])
    assert torch.equal(torch.cat([first, second]), expected)
