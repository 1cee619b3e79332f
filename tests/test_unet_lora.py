"""The attention LoRA of a patch session: its formula, what it sits on, and what it refuses."""

import pytest
import torch
import torch.nn.functional as F

from lib_identity.errors import PatchError
from lib_identity.unet import AttentionLoRA, PatchSession, attention_modules, find_cross_attentions, remove_sessions
from unet_helpers import hook_counts, random_prompt
from unet_models import SD15, build_ldm_unet, randomize_

C = 32
RANK = 3


@pytest.fixture(scope="module")
def unet():
    return randomize_(build_ldm_unet(SD15, context_dim=C), seed=5)


@pytest.fixture(autouse=True)
def _no_leftovers():
    yield
    remove_sessions(None)


def random_lora(unet, seed=0, numbers=None):
    """``{n: {proj: (down, up)}}`` for every attention of ``unet`` (or the ``numbers`` given)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m in attention_modules(unet, find_cross_attentions(unet)):
        if numbers is not None and m.number not in numbers:
            continue
        layers[m.number] = {}
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            linear = m.projection(proj)
            layers[m.number][proj] = (torch.randn(RANK, linear.in_features, generator=g),
                                      torch.randn(linear.out_features, RANK, generator=g))
    return layers


def test_numbering_is_attn1_then_attn2_of_each_block_in_official_order(unet):
    layers = find_cross_attentions(unet)
    modules = attention_modules(unet, layers)
    assert [m.number for m in modules] == list(range(2 * len(layers)))
    assert modules[0].name == "input_blocks.1.1.transformer_blocks.0.attn1"
    assert modules[1].name == "input_blocks.1.1.transformer_blocks.0.attn2"
    assert modules[-1].name == "middle_block.1.transformer_blocks.0.attn2"


def test_the_delta_is_lora_weight_times_up_down_on_top_of_what_the_layer_computes(unet, monkeypatch):
    """No alpha, no 1/rank; a weight the WebUI's LoRA merged in, or a class-level forward it
    installed, during the pass is still there underneath."""
    layers = random_lora(unet, seed=1)
    second = random_lora(unet, seed=2)
    attn2 = find_cross_attentions(unet)[0].module
    down, up = layers[1]["to_k"]
    down2, up2 = second[1]["to_k"]
    x = torch.randn(2, 5, C)
    original = attn2.to_k.weight.detach().clone()
    with PatchSession(unet, [], loras=[AttentionLoRA(layers, weight=0.7), AttentionLoRA(second, weight=-0.2)]):
        with torch.no_grad():
            attn2.to_k.weight.add_(0.5)  # the WebUI's own LoRA, merged into the weight
            monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, t: F.linear(t, self.weight, self.bias) + 1.0)
            got = attn2.to_k(x)
            monkeypatch.undo()
            attn2.to_k.weight.copy_(original)
    want = F.linear(x, original + 0.5) + 1.0 + 0.7 * (x @ down.T @ up.T) - 0.2 * (x @ down2.T @ up2.T)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_every_projection_of_both_attentions_is_changed_and_nothing_else(unet):
    layers = random_lora(unet, seed=3, numbers={4, 5})
    touched = {f"{m.name}.{p}" for m in attention_modules(unet, find_cross_attentions(unet)) if m.number in (4, 5)
               for p in ("to_q", "to_k", "to_v", "to_out.0")}
    before = hook_counts(unet)
    with PatchSession(unet, [], loras=[AttentionLoRA(layers)], track_calls=False):
        during = hook_counts(unet)
    changed = {name for name in before if before[name] != during[name]}
    assert changed == touched
    assert hook_counts(unet) == before


def test_zero_weight_installs_nothing(unet):
    before = hook_counts(unet)
    with PatchSession(unet, [], loras=[AttentionLoRA(random_lora(unet), weight=0.0)], track_calls=False):
        assert hook_counts(unet) == before


def test_the_lora_runs_before_the_image_branch_keeps_the_queries(unet):
    """The image branch attends with the adapted queries, as the official LoRAIPAttnProcessor does."""
    layer = find_cross_attentions(unet)[0]
    with PatchSession(unet, [random_prompt(unet, C)], loras=[AttentionLoRA(random_lora(unet))]):
        hooks = list(layer.module.to_q._forward_hooks.values())
    assert type(hooks[0]).__name__ == "_Delta" and type(hooks[-1]).__name__ != "_Delta"


def test_a_lora_for_another_unet_is_refused_before_the_unet_is_touched(unet):
    before = hook_counts(unet)
    n = 2 * len(find_cross_attentions(unet))
    too_many = random_lora(unet)
    too_many[n] = too_many[0]
    with pytest.raises(PatchError, match=rf"attention layer {n}, the loaded UNet has {n}.*SD1.5"):
        PatchSession(unet, [], loras=[AttentionLoRA(too_many, name="unit 2")]).install()
    wrong = random_lora(unet)
    down, up = wrong[3]["to_k"]
    wrong[3]["to_k"] = (torch.zeros(RANK, down.shape[1] + 1), up)
    with pytest.raises(PatchError, match=r"unit 1: LoRA 3\.to_k has down \[3, 33\].*needs down \[3, 32\]"):
        PatchSession(unet, [random_prompt(unet, C)], loras=[AttentionLoRA(wrong, name="unit 1")]).install()
    assert hook_counts(unet) == before


def test_half_precision_activations_get_the_delta_in_their_dtype(unet):
    layers = random_lora(unet, seed=4)
    attn1 = attention_modules(unet, find_cross_attentions(unet))[0].module
    x = torch.randn(1, 4, attn1.to_q.in_features)
    with PatchSession(unet, [], loras=[AttentionLoRA(layers, weight=0.5)], track_calls=False):
        with torch.no_grad():
            full = attn1.to_q(x)
            attn1.to_q.to(torch.bfloat16)
            try:
                half = attn1.to_q(x.to(torch.bfloat16))
            finally:
                attn1.to_q.to(torch.float32)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, atol=0.1, rtol=0.05)
