"""FaceID in the ldm UNet against diffusers' FaceID (IP-Adapter processors + the LoRA through peft).

Both sides read the same random-weight file in the official layout (``faceid_helpers``):
diffusers as ``IPAdapterMixin.load_ip_adapter`` does (``_load_ip_adapter_weights``, then
``_load_ip_adapter_loras`` → peft at ``lora_weight``), we through ``formats.inspect`` →
``models.load_adapter`` → ``methods.faceid.faceid_prompt`` → ``PatchSession(..., loras=[...])``.
Embeddings are given raw (ours norms them; diffusers gets them normed, as its pipelines expect);
CLIP features of the face crop are random stand-ins, the same on both sides. Noise predictions
must agree within 1e-4 (fp32), cond rows first and uncond rows last.
"""

import pytest
import torch
import torch.nn.functional as F

from faceid_helpers import diffusers_faceid, write_faceid
from lib_identity import api, formats
from lib_identity.methods.faceid import faceid_prompt
from lib_identity.models import load_adapter
from lib_identity.unet import AttentionLoRA, PatchSession, remove_sessions
from unet_helpers import CONTEXT, diffusers_state_dict, hook_counts
from unet_models import SD15, SDXL, ldm_and_diffusers_unets

ATOL = 1e-4
S = 9  # CLIP tokens per crop (257 for ViT-H at 224)


@pytest.fixture(scope="module")
def unets():
    return ldm_and_diffusers_unets({SD15: 21, SDXL: 22}, CONTEXT)


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)


def inputs(layout, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, 4, 8, 8, generator=g), torch.full((rows,), 400.0),
            torch.randn(rows, 7, CONTEXT[layout], generator=g))


def run_both(unets, layout, path, *, faces=1, weight=0.8, lora_weight=1.0, s_scale=1.0, batch=2, seed=0,
             through_api=False):
    """Noise predictions of diffusers' FaceID, of our patched ldm UNet and of the bare ldm UNet.

    ``through_api``: ours as another extension would call it (``api.load_faceid``,
    ``api.faceid_prompt``, ``api.apply``)."""
    ldm, base = unets[layout]
    info = formats.inspect(str(path))
    plus = info.projection == "faceid-plus"
    dunet = diffusers_faceid(base, diffusers_state_dict(path), weight=weight, lora_weight=lora_weight)
    g = torch.Generator().manual_seed(100 + seed)
    raw = torch.randn(faces, 512, generator=g) * 20  # ArcFace embeddings are not unit length
    normed = F.normalize(raw, dim=-1)
    rows = 2 * batch
    embeds = torch.stack([normed] * batch + [torch.zeros_like(normed)] * batch)  # [rows, faces, 512]
    extra = {}
    if plus:
        clip, clip_zero = torch.randn(faces, S, 1280, generator=g), torch.randn(1, S, 1280, generator=g)
        projection = dunet.encoder_hid_proj.image_projection_layers[0]
        projection.clip_embeds = torch.stack([clip] * batch + [clip_zero.expand(faces, -1, -1)] * batch)
        projection.shortcut, projection.shortcut_scale = "v2" in info.variant, s_scale
        extra = dict(clip_hidden=clip, uncond_clip_hidden=clip_zero, s_scale=s_scale)
    if through_api:
        unit = api.faceid_prompt(api.load_faceid(path), list(raw), lora_weight=lora_weight, weight=weight)
        session = api.apply(ldm, [unit])
    else:
        image_proj, ip_layers = load_adapter(info, formats.load_tensors(str(path)))
        unit = faceid_prompt(info, image_proj, ip_layers, raw, lora_weight=lora_weight, weight=weight, **extra)
        session = PatchSession(ldm, [unit.prompt], loras=[unit.lora])
    x, t, context = inputs(layout, rows, seed)
    with torch.no_grad():
        expected = dunet(x, t, encoder_hidden_states=context, added_cond_kwargs={"image_embeds": [embeds]}).sample
        with session:
            session.begin_step(n_cond=batch, progress=0.5)
            got = ldm(x, t, context=context)
        bare = ldm(x, t, context=context)
    return expected, got, bare, unit


@pytest.mark.parametrize("layout", [SD15, SDXL])
def test_faceid_with_its_lora_matches_diffusers(unets, tmp_path, layout):
    path = write_faceid(tmp_path, unets[layout][0], "faceid", seed=1)
    expected, got, bare, unit = run_both(unets, layout, path, weight=0.8, lora_weight=0.7, through_api=layout == SD15)
    assert unit.lora is not None and (expected - bare).abs().max() > 1e-2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_portrait_lays_every_face_side_by_side_as_diffusers_does(unets, tmp_path):
    path = write_faceid(tmp_path, unets[SD15][0], "portrait", seed=2, suffix=".safetensors")
    expected, got, bare, unit = run_both(unets, SD15, path, faces=3, weight=1.0)
    assert unit.lora is None and tuple(unit.prompt.cond_tokens.shape) == (1, 48, 768)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_faceid_plus_v2_matches_diffusers(unets, tmp_path):
    # v1 differs only by the shortcut, which tests/test_models.py compares with diffusers
    path = write_faceid(tmp_path, unets[SD15][0], "plusv2", seed=3)
    expected, got, bare, _ = run_both(unets, SD15, path, weight=1.0, lora_weight=1.0, s_scale=0.6, batch=1)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_the_lora_alone_matches_peft(unets, tmp_path):
    """No image tokens: only the LoRA, numbered by diffusers' own conversion and applied by peft."""
    ldm, base = unets[SD15]
    lora_weight = -0.5  # any real number: the sign and size reach every projection
    path = write_faceid(tmp_path, ldm, "faceid", seed=4)
    dunet = diffusers_faceid(base, diffusers_state_dict(path), weight=0.0, lora_weight=lora_weight, with_ip=False)
    _, ip_layers = load_adapter(formats.inspect(str(path)), formats.load_tensors(str(path)))
    x, t, context = inputs(SD15, 2, seed=5)
    with torch.no_grad():
        expected = dunet(x, t, encoder_hidden_states=context).sample
        with PatchSession(ldm, [], loras=[AttentionLoRA(ip_layers.lora, weight=lora_weight)]):
            got = ldm(x, t, context=context)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- the UNet afterwards


def _weights(unet):
    return {k: (v.data_ptr(), v.clone()) for k, v in unet.state_dict().items()}


def _unit(ldm, tmp_path, seed):
    path = write_faceid(tmp_path, ldm, "faceid", seed=seed)
    info = formats.inspect(str(path))
    image_proj, ip_layers = load_adapter(info, formats.load_tensors(str(path)))
    return faceid_prompt(info, image_proj, ip_layers, torch.randn(1, 512))


def test_after_removal_weights_and_outputs_are_bit_identical(unets, tmp_path):
    ldm = unets[SD15][0]
    unit = _unit(ldm, tmp_path, seed=6)
    before, hooks = _weights(ldm), hook_counts(ldm)
    x, t, context = inputs(SD15, 2, seed=7)
    with torch.no_grad():
        bare = ldm(x, t, context=context)
        with PatchSession(ldm, [unit.prompt], loras=[unit.lora]) as session:
            session.begin_step(n_cond=1, progress=0.5)
            got = ldm(x, t, context=context)
        after = ldm(x, t, context=context)
    assert (got - bare).abs().max() > 1e-2
    assert torch.equal(after, bare)
    assert hook_counts(ldm) == hooks
    now = ldm.state_dict()
    for key, (ptr, value) in before.items():  # the same storage, the same bits: nothing merged, nothing copied
        assert now[key].data_ptr() == ptr and torch.equal(now[key], value), key


def test_the_lora_is_removed_when_sampling_raises(unets, tmp_path):
    ldm = unets[SD15][0]
    unit = _unit(ldm, tmp_path, seed=8)
    x, t, context = inputs(SD15, 2, seed=9)
    hooks = hook_counts(ldm)
    with torch.no_grad():
        bare = ldm(x, t, context=context)
        with pytest.raises(KeyboardInterrupt):
            with PatchSession(ldm, [unit.prompt], loras=[unit.lora]) as session:
                session.begin_step(n_cond=1, progress=0.1)
                assert not torch.equal(ldm(x, t, context=context), bare)
                raise KeyboardInterrupt  # the user pressed Interrupt
        assert torch.equal(ldm(x, t, context=context), bare)
    assert hook_counts(ldm) == hooks


def test_the_api_loads_only_faceid_files_and_plus_needs_its_crops(unets, tmp_path):
    from lib_identity.errors import PatchError
    from unet_helpers import write_adapter

    ldm = unets[SD15][0]
    with pytest.raises(PatchError, match="not an IP-Adapter FaceID model; load it with load_ip_adapter"):
        api.load_faceid(write_adapter(tmp_path, ldm, "linear", seed=1))
    plus = api.load_faceid(write_faceid(tmp_path, ldm, "plusv2", seed=2))
    with pytest.raises(PatchError, match="needs face_crops .aligned at 224. and the CLIP ViT-H clip_encoder"):
        api.faceid_prompt(plus, torch.randn(1, 512))
