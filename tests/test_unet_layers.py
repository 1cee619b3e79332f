"""The cross-attention layers are found in the order the official adapter files number them."""

import pytest
import torch

import oracles
from checkpoints import manifest
from lib_identity.errors import PatchError
from lib_identity.unet import attention_blocks, find_cross_attentions
from unet_models import SD15, SDXL, build_ldm_unet, diffusers_config


def _full_size(layout):
    if layout == SD15:  # the WebUI's v1-inference.yaml
        return build_ldm_unet(SD15, model_channels=320, context_dim=768, heads=8, device="meta", use_checkpoint=True)
    return build_ldm_unet(SDXL, model_channels=320, context_dim=2048, head_channels=64, device="meta")


@pytest.mark.parametrize("layout", [SD15, SDXL])
def test_full_size_layers_match_the_official_table(layout):
    rows = [r for r in manifest(f"unet_attention_order_{layout}")["rows"] if r["ip_key"]]
    layers = find_cross_attentions(_full_size(layout))
    assert len(layers) == len(rows) == {SD15: 16, SDXL: 70}[layout]
    for layer, row in zip(layers, rows):
        assert layer.name == row["ldm"]
        assert layer.diffusers_name == row["diffusers"]
        assert f"{layer.file_key}.to_k_ip.weight" in row["ip_key"]
        assert (layer.hidden_size, layer.context_dim) == (row["hidden_size"], row["context_dim"])
    assert len(attention_blocks(layers)) == {SD15: 16, SDXL: 11}[layout]


@pytest.mark.parametrize("layout", [SD15, SDXL])
def test_order_is_diffusers_processor_order_on_a_tiny_unet(layout):
    """An independent check: diffusers' own attn_processors order on the same block structure."""
    UNet2DConditionModel = oracles.diffusers().UNet2DConditionModel

    names = [n for n in UNet2DConditionModel(**diffusers_config(layout)).attn_processors if n.endswith("attn2.processor")]
    layers = find_cross_attentions(build_ldm_unet(layout, device="meta"))
    assert [layer.diffusers_name for layer in layers] == names


def test_heads_and_widths_are_read_from_the_modules():
    layers = find_cross_attentions(_full_size(SDXL))
    assert {(layer.hidden_size, layer.heads) for layer in layers} == {(640, 10), (1280, 20)}
    assert all(layer.head_dim == 64 for layer in layers)


def test_a_module_that_is_not_a_unet_is_refused():
    with pytest.raises(PatchError, match="not an ldm/sgm UNetModel"):
        find_cross_attentions(torch.nn.Linear(2, 2))
