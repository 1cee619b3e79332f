"""InstantID in the ldm SDXL UNet against the math of diffusers' InstantID pipeline.

The pipeline (InstantID ``pipeline_stable_diffusion_xl_instantid.py``) under CFG, with diffusers'
own modules: the raw face embedding and a zero embedding go through the adapter's Resampler
(diffusers' ``IPAdapterPlusImageProjection``, loaded by ``_load_ip_adapter_weights``); IdentityNet
runs on every row with those tokens as its context (uncond rows: the zero embedding's
projection) and the keypoint image as its hint; its residuals times the conditioning scale go
into diffusers' ``UNet2DConditionModel`` as ``down_block_additional_residuals`` /
``mid_block_additional_residual``, with IP-Adapter attention at ``ip_weight``. The control module
is the same on both sides (its own parity with ``ControlNetModel`` is the identitynet branch's
test); what is compared is everything around it: tokens, per-row contexts, the hint, where each
residual enters, the scales, the adapter. Rows: ours cond first, diffusers uncond first.
"""

import pytest
import torch

from instantid_helpers import StandInIdentityNet, standin_modules, write_instantid_adapter
from lib_identity import formats
from lib_identity.methods.instantid import instantid_parts
from lib_identity.models import load_adapter
from lib_identity.unet import PatchSession, remove_sessions
from unet_helpers import CONTEXT, diffusers_state_dict, hook_counts
from unet_models import SDXL, build_ldm_unet, randomize_, to_diffusers

ATOL = 1e-4
KPS = [[20.0, 24.0], [44.0, 24.0], [32.0, 34.0], [23.0, 46.0], [41.0, 46.0]]  # on a 64x64 picture


@pytest.fixture(scope="module")
def ldm():
    return randomize_(build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL]), seed=31)


@pytest.fixture(scope="module")
def unets(ldm):
    """The ldm UNet and the same weights in diffusers (the oracle; the pins lane skips these tests)."""
    return {SDXL: (ldm, to_diffusers(ldm, SDXL, context_dim=CONTEXT[SDXL]))}


@pytest.fixture(scope="module")
def parts(ldm, tmp_path_factory):
    path = write_instantid_adapter(tmp_path_factory.mktemp("instantid"), ldm, seed=5)
    info = formats.inspect(str(path))
    assert info.family == "instantid-adapter"
    image_proj, ip_layers = load_adapter(info, formats.load_tensors(str(path)))
    return path, image_proj, ip_layers, StandInIdentityNet(ldm, seed=6)


@pytest.fixture(autouse=True)
def _keypoints(monkeypatch):
    standin_modules(monkeypatch)
    yield
    remove_sessions(None)


def inputs(rows, seed=0, hw=(8, 8)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, *hw, generator=g), torch.full((rows,), 600.0),
            torch.randn(rows, 7, CONTEXT[SDXL], generator=g))


def ours(ldm, parts, raw, *, batch, progress=0.5, total_steps=10, hw=(8, 8), seed=0, **knobs):
    _, image_proj, ip_layers, net = parts
    unit = instantid_parts(image_proj, ip_layers, list(raw), identitynet=net, keypoints=KPS, source_size=(64, 64), **knobs)
    x, t, c = inputs(2 * batch, seed, hw)
    with torch.no_grad(), PatchSession(ldm, [unit.prompt], controls=[unit.control] if unit.control else []) as s:
        s.begin_step(n_cond=batch, progress=progress, total_steps=total_steps)
        return unit, ldm(x, t, context=c)


def diffusers_pipeline_math(unets, parts, raw, unit, *, batch, ip_weight, identitynet_weight, hw=(8, 8), seed=0):
    """One UNet step of the InstantID pipeline under CFG, with diffusers' modules (rows: uncond, cond)."""
    import copy

    path, _, _, net = parts
    dunet = copy.deepcopy(unets[SDXL][1])
    dunet._load_ip_adapter_weights([diffusers_state_dict(path)], low_cpu_mem_usage=False)
    for proc in dunet.attn_processors.values():
        if hasattr(proc, "to_k_ip"):
            proc.scale = [ip_weight]
    face = raw.mean(dim=0, keepdim=True)  # several pictures: their raw embeddings averaged
    embeds = torch.cat([torch.zeros_like(face)] * batch + [face] * batch)[:, None, None]  # [rows, 1 image, 1, 512]
    projection = dunet.encoder_hid_proj.image_projection_layers[0]
    x, t, c = inputs(2 * batch, seed, hw)
    order = list(range(batch, 2 * batch)) + list(range(batch))  # ours cond-first -> diffusers uncond-first
    x, t, c = x[order], t[order], c[order]
    height, width = hw[0] * 8, hw[1] * 8
    hint = torch.from_numpy(unit.control.hint(width, height)).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        prompt_image_emb = projection(embeds[:, 0])  # the pipeline's controlnet context: [rows, 16, 2048]
        residuals = net(x, hint.expand(2 * batch, -1, -1, -1), t, prompt_image_emb, None)
        residuals = [r * identitynet_weight for r in residuals]
        out = dunet(x, t, encoder_hidden_states=c, added_cond_kwargs={"image_embeds": [embeds]},
                    down_block_additional_residuals=residuals[:-1], mid_block_additional_residual=residuals[-1]).sample
    return out


@pytest.mark.parametrize("batch", [1, 2])
def test_adapter_and_identitynet_together_match_the_pipeline(unets, parts, batch):
    ldm = unets[SDXL][0]
    g = torch.Generator().manual_seed(40 + batch)
    raw = torch.randn(2, 512, generator=g) * 20  # two ID pictures, raw (ArcFace embeddings are ~20 long)
    knobs = dict(ip_weight=0.7, identitynet_weight=0.6)
    unit, got = ours(ldm, parts, raw, batch=batch, **knobs)
    expected = diffusers_pipeline_math(unets, parts, raw, unit, batch=batch, **knobs)
    expected = torch.cat([expected[batch:], expected[:batch]])  # back to cond rows first
    x, t, c = inputs(2 * batch)
    with torch.no_grad():
        bare = ldm(x, t, context=c)
    assert (expected - bare).abs().max() > 1e-2
    torch.testing.assert_close(got[:batch], expected[:batch], atol=ATOL, rtol=0)  # cond rows
    torch.testing.assert_close(got[batch:], expected[batch:], atol=ATOL, rtol=0)  # uncond rows


def test_a_larger_pass_gets_its_keypoints_drawn_at_its_size(unets, parts):
    """hires fix: a 96x128 pass redraws the keypoints for that frame (the pipeline would draw them there)."""
    ldm = unets[SDXL][0]
    raw = torch.randn(1, 512, generator=torch.Generator().manual_seed(3)) * 20
    unit, got = ours(ldm, parts, raw, batch=1, hw=(12, 16), ip_weight=0.5, identitynet_weight=1.0)
    expected = diffusers_pipeline_math(unets, parts, raw, unit, batch=1, hw=(12, 16), ip_weight=0.5,
                                             identitynet_weight=1.0)
    torch.testing.assert_close(got, torch.cat([expected[1:], expected[:1]]), atol=ATOL, rtol=0)


def official_keep(i, n, start, end):
    """The pipeline's controlnet_keep for step i of n."""
    return not (i / n < start or (i + 1) / n > end)


def test_identitynet_acts_exactly_in_its_step_window(ldm, parts):
    _, image_proj, ip_layers, net = parts
    raw = torch.randn(1, 512, generator=torch.Generator().manual_seed(4)) * 20
    n, start, end = 10, 0.2, 0.55
    unit = instantid_parts(image_proj, ip_layers, [raw[0]], identitynet=net, keypoints=KPS, source_size=(64, 64),
                           identitynet_start=start, identitynet_end=end)
    x, t, c = inputs(2)
    acted = []
    with torch.no_grad():
        bare = ldm(x, t, context=c)
        with PatchSession(ldm, [], controls=[unit.control]) as s:
            for i in range(n):
                s.begin_step(n_cond=1, progress=i / n, total_steps=n)
                acted.append(not torch.equal(ldm(x, t, context=c), bare))
    assert acted == [official_keep(i, n, start, end) for i in range(n)]
    assert acted.count(True) == 3  # steps 2, 3, 4: step 5 ends at 0.6 > 0.55


def test_removal_leaves_the_unet_bit_identical_also_when_sampling_raises(ldm, parts):
    _, image_proj, ip_layers, net = parts
    unit = instantid_parts(image_proj, ip_layers, [torch.randn(512) * 20], identitynet=net, keypoints=KPS,
                           source_size=(64, 64))
    weights = {k: (v.data_ptr(), v.clone()) for k, v in ldm.state_dict().items()}
    hooks = hook_counts(ldm)
    x, t, c = inputs(2, seed=9)
    with torch.no_grad():
        bare = ldm(x, t, context=c)
        with pytest.raises(KeyboardInterrupt):
            with PatchSession(ldm, [unit.prompt], controls=[unit.control]) as s:
                s.begin_step(n_cond=1, progress=0.0, total_steps=4)
                assert not torch.equal(ldm(x, t, context=c), bare)
                raise KeyboardInterrupt
        after = ldm(x, t, context=c)
    assert torch.equal(after, bare) and hook_counts(ldm) == hooks
    assert all(ldm.state_dict()[k].data_ptr() == p and torch.equal(ldm.state_dict()[k], v) for k, (p, v) in weights.items())
