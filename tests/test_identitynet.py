"""IdentityNet: parity with diffusers' ControlNetModel on the same random weights, in every file form.

The oracle is diffusers' own ``ControlNetModel`` (tiny widths, SDXL layout: text_time added
condition, transformer_layers_per_block, linear projections, its conditioning embedding). Our
module is built from the ldm classes of the tests' SDXL UNet (and from the WebUI's real ``sgm``
classes when ``SD_WEBUI_ROOT`` is set) and loaded from the files diffusers wrote.
"""

import copy
import math
import re

import pytest
import torch
from safetensors.torch import save_file

import oracles
from checkpoints import manifest
from lib_identity import formats
from lib_identity.errors import CheckpointError
from lib_identity.formats.controlnet_names import diffusers_to_ldm, hint_block_count, ldm_to_diffusers
from lib_identity.models.identitynet import IdentityNet, host_classes, load_identitynet
from lib_identity.models.identitynet_config import config_from_diffusers, config_from_shapes
from test_unet_sgm import SDXL_BASE, UNetModel  # noqa: F401 - UNetModel: the real sgm class, a fixture
from test_unet_sgm import pytestmark as needs_webui
from unet_models import SDXL, build_ldm_unet, ldm_to_diffusers_key, randomize_

CONTEXT = 2048  # SDXL's, so that formats.detect takes these files for IdentityNet
TIME_DIM = 8  # addition_time_embed_dim of the tiny model (SDXL: 256)
TEXT_DIM = 32  # pooled text width of the tiny model (SDXL: 1280)


def tiny_config(heads=(1, 2, 4)):
    return dict(
        in_channels=4, block_out_channels=[64, 128, 256], layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        transformer_layers_per_block=[1, 1, 2], attention_head_dim=list(heads), cross_attention_dim=CONTEXT,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM,
        conditioning_embedding_out_channels=[16, 32, 48, 64],
    )


def diffusers_controlnet(seed, heads=(1, 2, 4)):
    with torch.device("meta"):  # every weight is set below: skip diffusers' own initialisation
        model = oracles.diffusers().ControlNetModel(**tiny_config(heads))
    return randomize_(model.to_empty(device="cpu"), seed=seed).eval()


def own_identitynet(host, seed):
    with torch.device("meta"):
        net = IdentityNet(config_from_diffusers(tiny_config(), "test"), host_classes(host))
    return randomize_(net.to_empty(device="cpu"), seed=seed).eval()


@pytest.fixture(scope="module")
def host():
    """The tests' SDXL UNet (ldm classes), on the meta device: only its classes are used."""
    return build_ldm_unet(SDXL, model_channels=64, context_dim=CONTEXT, head_channels=64, device="meta")


@pytest.fixture(scope="module")
def reference():
    return diffusers_controlnet(seed=11)


def sinusoid(t, dim):
    """SDXL's size embedding of one number (cos half first), as sgm's conditioner builds ``y``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def inputs(batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    hint = torch.rand(batch, 3, 8 * size, 8 * size, generator=g)
    t = torch.tensor([999.0, 421.0][:batch])
    context = torch.randn(batch, 16, CONTEXT, generator=g)
    text = torch.randn(batch, TEXT_DIM, generator=g)
    time_ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 768.0]] * batch)
    y = torch.cat([text, sinusoid(time_ids.flatten(), TIME_DIM).reshape(batch, -1)], dim=1)
    return dict(x=x, hint=hint, t=t, context=context, text=text, time_ids=time_ids, y=y)


def run_diffusers(model, a):
    with torch.no_grad():
        down, mid = model(a["x"], a["t"], encoder_hidden_states=a["context"], controlnet_cond=a["hint"],
                          added_cond_kwargs={"text_embeds": a["text"], "time_ids": a["time_ids"]}, return_dict=False)
    return list(down) + [mid]


def run_ours(net, a):
    with torch.no_grad():
        return net(a["x"], a["hint"], a["t"], a["context"], a["y"])


def assert_parity(net, model, a=None):
    a = a or inputs()
    expected, got = run_diffusers(model, a), run_ours(net, a)
    assert len(got) == len(expected) == 10
    assert [tuple(r.shape) for r in got] == [tuple(r.shape) for r in expected]
    assert min(r.abs().max() for r in expected) > 1e-2  # random weights everywhere: no residual is zero
    for ours, theirs in zip(got, expected):
        torch.testing.assert_close(ours.float(), theirs.float(), atol=1e-4, rtol=0)


# ldm (cldm) names of the parts the tests' UNet key helper does not know
def _cldm_to_diffusers(key, hint_blocks):
    fixed = {"label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",
             "middle_block_out.0.": "controlnet_mid_block."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"zero_convs\.(\d+)\.0\.(.*)", key)
    if m:
        return f"controlnet_down_blocks.{m.group(1)}.{m.group(2)}"
    m = re.match(r"input_hint_block\.(\d+)\.(.*)", key)
    if m:
        i = int(m.group(1))
        part = "conv_in" if i == 0 else "conv_out" if i == 2 * hint_blocks + 2 else f"blocks.{i // 2 - 1}"
        return f"controlnet_cond_embedding.{part}.{m.group(2)}"
    return ldm_to_diffusers_key(key)


def ldm_named(model, host):
    """diffusers' weights under the names of our module, mapped by the tests' own key rules."""
    with torch.device("meta"):
        names = IdentityNet(config_from_diffusers(model.config, "test"), host_classes(host)).state_dict()
    sd = model.state_dict()
    return {k: sd[_cldm_to_diffusers(k, hint_blocks=6)].clone() for k in names}


@pytest.fixture(scope="module")
def files(tmp_path_factory, reference, host):
    root = tmp_path_factory.mktemp("identitynet")
    reference.save_pretrained(str(root / "ControlNetModel"))
    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    save_file(sd, str(root / "my identitynet.safetensors"))
    save_file({k: v.half() for k, v in sd.items()}, str(root / "identitynet_fp16.safetensors"))
    save_file(ldm_named(reference, host), str(root / "control_instant_id_sdxl.safetensors"))
    return root


@pytest.mark.parametrize("name", ["ControlNetModel", "my identitynet.safetensors", "control_instant_id_sdxl.safetensors"])
def test_parity_with_diffusers_controlnet(files, reference, host, name):
    net = load_identitynet(str(files / name), unet=host, device="cpu", dtype=torch.float32)
    assert net.dtype == torch.float32 and not any(p.is_meta for p in net.parameters())
    assert_parity(net, reference)


def test_fp16_file_loads_into_fp32(files, reference, host):
    net = load_identitynet(str(files / "identitynet_fp16.safetensors"), unet=host, device="cpu", dtype=torch.float32)
    rounded = copy.deepcopy(reference)
    rounded.load_state_dict({k: v.half().float() for k, v in reference.state_dict().items()})
    assert net.dtype == torch.float32
    assert_parity(net, rounded)


def test_the_config_json_gives_the_heads(tmp_path, host):
    # 4 heads of 16 channels at width 64 cannot be read off the shapes; the folder's config says so
    model = diffusers_controlnet(seed=12, heads=(4, 4, 8))
    model.save_pretrained(str(tmp_path / "cn"))
    net = load_identitynet(str(tmp_path / "cn"), unet=host, device="cpu", dtype=torch.float32)
    assert_parity(net, model, inputs(batch=1, seed=3))


def test_hint_changes_the_residuals(files, host):
    net = load_identitynet(str(files / "ControlNetModel"), unet=host, device="cpu", dtype=torch.float32)
    a = inputs(batch=1)
    b = dict(a, hint=torch.zeros_like(a["hint"]))
    assert (run_ours(net, a)[0] - run_ours(net, b)[0]).abs().max() > 1e-2


def test_the_files_are_still_recognised(files):
    for name, naming in [("ControlNetModel", "diffusers"), ("my identitynet.safetensors", "diffusers"),
                         ("control_instant_id_sdxl.safetensors", "ldm"), ("identitynet_fp16.safetensors", "diffusers")]:
        info = formats.inspect(str(files / name))
        assert info.family == "instantid-identitynet" and info.params["naming"] == naming, name


@pytest.fixture(scope="module")
def own_file(tmp_path_factory, host):
    """Our module's random weights in a diffusers-named file (no diffusers needed: runs in both lanes)."""
    net = own_identitynet(host, seed=5)
    path = tmp_path_factory.mktemp("own") / "diffusers.safetensors"
    save_file({ldm_to_diffusers(k): v.half() for k, v in net.state_dict().items()}, str(path))
    return path


def _damaged(own_file, tmp_path, change):
    from safetensors.torch import load_file

    sd = load_file(str(own_file))
    change(sd)
    path = tmp_path / "damaged.safetensors"
    save_file(sd, str(path))
    return path


@pytest.mark.parametrize("change, words", [
    (lambda sd: sd.pop("down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight"),
     ["down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k.weight is missing"]),
    (lambda sd: sd.__setitem__("down_blocks.1.attentions.0.extra.weight", torch.zeros(3)),
     ["down_blocks.1.attentions.0.extra.weight is not part of the model"]),
    (lambda sd: sd.__setitem__("controlnet_mid_block.weight", torch.zeros(256, 128, 1, 1, dtype=torch.float16)),
     ["controlnet_mid_block.weight has shape [256, 128, 1, 1], expected [256, 256, 1, 1]"]),
])
def test_strict_loading_names_the_file_and_the_key(own_file, host, tmp_path, change, words):
    path = _damaged(own_file, tmp_path, change)
    with pytest.raises(CheckpointError) as err:
        load_identitynet(str(path), unet=host, device="cpu", dtype=torch.float32)
    message = str(err.value)
    assert str(path) in message and "IdentityNet" in message
    for w in words:
        assert w in message


def test_an_sd15_unet_is_refused(own_file):
    sd15 = build_ldm_unet("sd15", model_channels=32, context_dim=768, heads=8, device="meta")
    with pytest.raises(CheckpointError, match="SDXL"):
        load_identitynet(str(own_file), unet=sd15, device="cpu", dtype=torch.float32)


def test_names_match_the_official_full_size_layout(host):
    """The official 844 keys: our names are sd-webui-controlnet's ldm names, shapes those of our module."""
    m = manifest("instantid_controlnet")
    keys = {k: tuple(v) for k, v in m["keys"].items()}
    ldm = {k: tuple(v) for k, v in m["ldm_keys"].items()}
    n = hint_block_count(keys)
    assert {diffusers_to_ldm(k, hint_blocks=n): v for k, v in keys.items()} == ldm
    assert {ldm_to_diffusers(k, hint_blocks=n) for k in ldm} == set(keys)
    for config in (config_from_diffusers(m["diffusers_config"], "manifest"), config_from_shapes(ldm, "manifest")):
        with torch.device("meta"):
            net = IdentityNet(config, host_classes(host))
        assert {k: tuple(v.shape) for k, v in net.state_dict().items()} == ldm
        assert sum(p.numel() for p in net.parameters()) == m["param_count"]
        assert config.heads == (5, 10, 20)


# ----------------------------------------------------------------------------- the WebUI's sgm classes


@needs_webui
def test_parity_on_the_real_sgm_classes(UNetModel, files, reference):  # noqa: F811 - the fixture
    params = dict(SDXL_BASE, model_channels=64, transformer_depth=[1, 1, 2], use_checkpoint=False,
                  adm_in_channels=TEXT_DIM + 6 * TIME_DIM)
    with torch.device("meta"):
        unet = UNetModel(**params)
    net = load_identitynet(str(files / "ControlNetModel"), unet=unet, device="cpu", dtype=torch.float32)
    assert type(net.input_blocks[1][0]).__module__.startswith("sgm.")
    assert type(net.input_blocks[4][1].transformer_blocks[0].attn2).__module__.startswith("sgm.")
    assert_parity(net, reference)


def test_a_file_round_trips_without_diffusers(tmp_path, host):
    """Runs in the WebUI-pins lane too (torch 2.1.2's assign load): saved weights come back as they were."""
    source = own_identitynet(host, seed=6)
    sd = source.state_dict()
    save_file({k: v.half() for k, v in sd.items()}, str(tmp_path / "ldm.safetensors"))
    save_file({ldm_to_diffusers(k): v.half() for k, v in sd.items()}, str(tmp_path / "diffusers.safetensors"))
    a = inputs(batch=1, seed=4)
    source.load_state_dict({k: v.half().float() for k, v in sd.items()})
    expected = run_ours(source, a)
    for name in ("ldm.safetensors", "diffusers.safetensors"):
        seen = []
        net = load_identitynet(str(tmp_path / name), unet=host, device="cpu", dtype=torch.float32,
                               progress=lambda done, total: seen.append((done, total)))
        assert seen[-1] == (len(sd), len(sd)) and len(seen) == len(sd)
        for got, want in zip(run_ours(net, a), expected):
            torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_the_cache_loads_a_real_file_once_with_console_progress(own_file, host, capsys):
    """What InstantID units use: the file read once per dtype, with a start line and a progress bar."""
    from lib_identity.methods.identitynet_cache import IdentityNetCache

    cache = IdentityNetCache(size=1)
    first = cache.get(str(own_file), unet=host, device="cpu", dtype=torch.float32)
    assert isinstance(first, IdentityNet) and first.dtype == torch.float32
    assert cache.get(str(own_file), unet=host, device="cpu", dtype=torch.float32) is first
    err = capsys.readouterr()
    assert err.out.count("loading IdentityNet diffusers.safetensors") == 1
    assert "tensors" in err.err  # the bar over the tensors read
    half = cache.get(str(own_file), unet=host, device="cpu", dtype=torch.float16)
    assert half is not first and half.dtype == torch.float16 and len(cache) == 1
