"""Region masks at every attention resolution, and the per-layer weight presets."""

import pytest
import torch

from lib_identity.errors import PatchError
from lib_identity.unet import PRESETS, PatchSession, find_cross_attentions, remove_sessions, resolve_layer_weights
from lib_identity.unet.masks import level_sizes, resize_mask, token_grid
from handoff import attention_probe
from unet_helpers import random_prompt, unet_inputs
from unet_models import SD15, SDXL, build_ldm_unet, randomize_

C = 32


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("hw", [(64, 64), (96, 64), (65, 47), (13, 7), (128, 72)])
def test_the_grid_of_every_level_follows_the_unets_own_downsampling(hw):
    """Compare with what ldm's stride-2 convolutions actually produce."""
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    x = torch.zeros(1, 1, *hw)
    for h, w in level_sizes(*hw, levels=4):
        assert (x.shape[-2], x.shape[-1]) == (h, w)
        assert token_grid(h * w, hw) == (h, w)
        x = conv(x)


def test_without_a_latent_size_the_grid_follows_the_mask_aspect():
    assert token_grid(96, None, aspect=1.5) == (8, 12)
    assert token_grid(96, None, aspect=1 / 1.5) == (12, 8)


def test_resizing_keeps_coverage_and_range():
    mask = torch.zeros(100, 60)
    mask[:, :30] = 1.0  # left half
    small = resize_mask(mask, 10, 6)
    assert torch.equal(small[:, :3], torch.ones(10, 3)) and torch.equal(small[:, 3:], torch.zeros(10, 3))
    odd = resize_mask(mask, 7, 5)  # the middle column straddles the edge: half covered
    torch.testing.assert_close(odd[:, 2], torch.full((7,), 0.5))
    big = resize_mask(torch.tensor([[0.0, 1.0]]), 4, 8)
    assert big.min() >= 0 and big.max() <= 1 and big[:, 0].max() == 0 and big[:, -1].min() == 1


# ---------------------------------------------------------------- masks in the UNet


@pytest.fixture(scope="module")
def unet():
    return randomize_(build_ldm_unet(SD15, context_dim=C), seed=13)


def test_a_full_mask_is_no_mask_and_an_empty_one_is_no_unit(unet):
    inputs = unet_inputs(2, C, hw=(16, 8))
    outs = {}
    for label, mask in (("none", None), ("ones", torch.ones(30, 20)), ("zeros", torch.zeros(30, 20))):
        with torch.no_grad(), PatchSession(unet, [random_prompt(unet, C, mask=mask)]) as session:
            session.begin_step(1)
            outs[label] = unet(*inputs[:2], context=inputs[2])
    with torch.no_grad():
        bare = unet(*inputs[:2], context=inputs[2])
    torch.testing.assert_close(outs["ones"], outs["none"], atol=1e-6, rtol=0)
    assert torch.equal(outs["zeros"], bare)


def test_a_mask_scales_the_image_branch_per_token_at_every_resolution(unet):
    """At each attention resolution of a 16x8 latent (16x8, 8x4, 4x2, 2x1 tokens): the unit's
    change to a layer's output, token by token, is its unmasked change times the mask there."""
    mask = torch.zeros(48, 24)
    mask[:, :6] = 1.0
    mask[:12, 6:12] = 0.5  # some partial coverage, which the coarse grids average
    g = torch.Generator().manual_seed(3)
    checked = set()
    for hw in level_sizes(16, 8, levels=4):
        n = hw[0] * hw[1]
        layer = [l for l in find_cross_attentions(unet) if l.block.startswith(("input_blocks", "middle"))][
            {128: 0, 32: 2, 8: 4, 2: 6}[n]]
        x = torch.randn(2, n, layer.hidden_size, generator=g)
        context = torch.randn(2, 7, C, generator=g)
        outs = {}
        for label, m in (("plain", None), ("masked", mask)):
            with torch.no_grad(), PatchSession(unet, [random_prompt(unet, C, mask=m)]) as session:
                session.begin_step(1)
                session.begin_call(torch.zeros(2, 4, 16, 8))  # what the UNet's pre-hook records
                outs[label] = layer.module(x, context=context)
        with torch.no_grad():
            bare = layer.module(x, context=context)
        grid = resize_mask(mask, *hw).reshape(1, n, 1)
        torch.testing.assert_close(outs["masked"] - bare, grid * (outs["plain"] - bare), atol=1e-5, rtol=0)
        assert (outs["plain"] - bare).abs().max() > 1e-3
        checked.add(hw)
    assert checked == {(16, 8), (8, 4), (4, 2), (2, 1)}


def test_a_hires_pass_resizes_the_mask_to_its_new_grids(unet):
    """A new pass at twice the size (hires fix): at every attention grid of that pass, the unit
    adds nothing where the mask is black and acts where it is white."""
    mask = torch.zeros(40, 40)
    mask[:20] = 1.0  # top half
    for hw in ((8, 8), (16, 16)):  # first pass, then a 2x hires pass with a new session
        x, t, c = unet_inputs(2, C, hw=hw)
        with torch.no_grad(), PatchSession(unet, [random_prompt(unet, C, mask=mask)]) as session, \
                attention_probe(unet) as seen:
            session.begin_step(1, 0.2)
            unet(x, t, context=c)
        grids = set()
        for name in seen.text:
            added = seen.added(name)
            h, w = token_grid(added.shape[1], hw)
            if h < 2:  # the 1x1 middle of the first pass averages the mask
                continue
            grid = added.reshape(2, h, w, -1)
            assert torch.count_nonzero(grid[:, h // 2:]) == 0, (hw, name)
            assert grid[:, : h // 2].abs().max() > 1e-4, (hw, name)
            grids.add((h, w))
        assert grids == {s for s in level_sizes(*hw, levels=4) if s[0] >= 2}  # 3 levels (or 4), each checked


# ---------------------------------------------------------------- presets


# cubiq/ComfyUI_IPAdapter_plus numbers attention blocks in the order the UNet runs them
# (ComfyUI's transformer_index: input, middle, output); its weight_type tables, as index -> weight
EXECUTION_ORDER = {
    SD15: [f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
    + [f"output_blocks.{i}.1" for i in range(3, 12)],
    SDXL: [f"input_blocks.{i}.1" for i in (4, 5, 7, 8)] + ["middle_block.1"] + [f"output_blocks.{i}.1" for i in range(6)],
}
CUBIQ = {  # weight_type -> layout -> {transformer_index: multiplier of (weight, composition weight)}
    "style transfer": {SDXL: {6: "w"}, SD15: {i: "w" for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}},
    "composition": {SDXL: {3: "w"}, SD15: {4: "w/4", 5: "w"}},
    "strong style transfer": {SDXL: {i: "w" for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)},
                              SD15: {i: "w" for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}},
    "style and composition": {SDXL: {3: "c", 6: "w"},
                              SD15: {**{i: "w" for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, 4: "c/4", 5: "c"}},
    "strong style and composition": {SDXL: {**{i: "w" for i in range(11)}, 3: "c"},
                                     SD15: {**{i: "w" for i in range(16)}, 4: "c", 5: "c"}},
}
VALUES = {"w": 1.0, "w/4": 0.25, "c": 0.4, "c/4": 0.1}


@pytest.fixture(scope="module")
def meta_layers():
    return {SD15: find_cross_attentions(build_ldm_unet(SD15, device="meta")),
            SDXL: find_cross_attentions(build_ldm_unet(SDXL, device="meta"))}


@pytest.mark.parametrize("preset", sorted(CUBIQ))
@pytest.mark.parametrize("layout", [SD15, SDXL])
def test_presets_are_cubiqs_block_choices(meta_layers, preset, layout):
    layers = meta_layers[layout]
    got = resolve_layer_weights(preset, layers, composition_weight=0.4)
    table = CUBIQ[preset][layout]
    for layer, value in zip(layers, got):
        index = EXECUTION_ORDER[layout].index(layer.block)
        assert value == VALUES[table[index]] if index in table else value == 0.0, (layer.name, value)


def test_instantstyle_blocks_for_sdxl(meta_layers):
    layers = meta_layers[SDXL]
    style = {l.diffusers_name.split(".transformer_blocks")[0] for l, w in
             zip(layers, resolve_layer_weights("style transfer", layers)) if w}
    composition = {l.diffusers_name.split(".transformer_blocks")[0] for l, w in
                   zip(layers, resolve_layer_weights("composition", layers)) if w}
    assert style == {"up_blocks.0.attentions.1"} and composition == {"down_blocks.2.attentions.1"}


def test_every_preset_name_is_accepted_in_any_spelling(meta_layers):
    for name in PRESETS:
        assert len(resolve_layer_weights(name.upper().replace(" ", "_"), meta_layers[SD15])) == 16


def test_a_preset_on_an_unknown_unet_says_what_to_do():
    tiny = build_ldm_unet(SD15, device="meta")
    layers = find_cross_attentions(tiny)[:5]  # pretend a UNet with 5 attention blocks
    with pytest.raises(PatchError, match="Give one weight per layer instead"):
        resolve_layer_weights("style transfer", layers, unit_name="unit 1")
