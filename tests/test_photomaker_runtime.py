"""PhotoMaker's LoRA in the WebUI's (ldm) SDXL UNet: against diffusers/peft, and gone afterwards.

The LoRA of a tiny official-layout file (1120 keys over the tiny SDXL UNet's 140 attentions) is
loaded by diffusers the way the official pipeline loads it (``load_lora_weights`` of the
``lora_weights`` section: diffusers converts the attention-processor names for peft, scale 1)
and compared with our hooks at several ``lora_weight``s. The WebUI path (API unit -> runtime ->
``p.sample``) must leave the UNet bit-identical, also when sampling raises, and write the
infotext that restores the unit.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import oracles
from handoff import Wrapper, b64, new_p, picture
from fake_webui import install_fake_modules
from lib_identity import formats
from lib_identity import units as U
from lib_identity.methods import photomaker
from lib_identity.unet import PatchSession, remove_sessions
from photomaker_helpers import write_photomaker
from unet_helpers import CONTEXT, hook_counts
from unet_models import SDXL, build_ldm_unet, randomize_, to_diffusers

ATOL = 1e-4


@pytest.fixture(scope="module")
def ldm():
    return randomize_(build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL]), seed=31)


@pytest.fixture(autouse=True)
def _clean():
    yield
    remove_sessions(None)
    photomaker.release()


def inputs(rows=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 4, 8, 8, generator=g), torch.full((rows,), 400.0), torch.randn(rows, 7, CONTEXT[SDXL], generator=g)


@pytest.mark.parametrize("lora_weight", [1.0, 0.6])
def test_the_files_lora_matches_diffusers_and_peft(ldm, tmp_path, lora_weight):
    diffusers = oracles.diffusers()
    path = write_photomaker(tmp_path, ldm, v2=False, seed=5, lora_scale=0.5)
    lora_weights = {k: v.float() for k, v in torch.load(path, weights_only=True)["lora_weights"].items()}
    dunet = to_diffusers(ldm, SDXL, context_dim=CONTEXT[SDXL])
    mixin = diffusers.loaders.lora_pipeline.StableDiffusionXLLoraLoaderMixin
    state, alphas = mixin.lora_state_dict(copy.deepcopy(lora_weights))
    mixin.load_lora_into_unet(state, alphas, dunet, adapter_name="photomaker")
    model = photomaker.models.get(formats.inspect(path), path)
    x, t, c = inputs()
    with torch.no_grad():
        # peft's scale on every LoRA layer alike (set_adapters' float weight is expanded per block)
        expected = dunet(x, t, encoder_hidden_states=c, cross_attention_kwargs={"scale": lora_weight}).sample
        bare = ldm(x, t, context=c)
        with PatchSession(ldm, [], loras=[photomaker.lora_of(model, lora_weight, "unit 1")]):
            got = ldm(x, t, context=c)
    assert (expected - bare).abs().max() > 1e-2  # the LoRA changes the prediction
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_a_lora_for_another_unet_is_refused_before_anything_is_installed(ldm, tmp_path):
    other = build_ldm_unet(SDXL, model_channels=64, context_dim=CONTEXT[SDXL], device="meta")
    path = write_photomaker(tmp_path, other, v2=False, seed=6)
    model = photomaker.models.get(formats.inspect(path), path)
    hooks = hook_counts(ldm)
    with pytest.raises(Exception, match="needs down"):
        PatchSession(ldm, [], loras=[photomaker.lora_of(model, 1.0, "Identity unit 1")]).install()
    assert hook_counts(ldm) == hooks


# ------------------------------------------------------------------------ through the WebUI glue


def _env(monkeypatch, tmp_path, ldm):
    from lib_identity import discovery
    from lib_identity.webui import runtime

    folder = tmp_path / "identity-models"
    folder.mkdir()
    path = write_photomaker(folder, ldm, v2=False, seed=7)
    model = SimpleNamespace(is_sdxl=True, is_sd1=False, model=Wrapper(ldm))
    callbacks = install_fake_modules(monkeypatch, models_path=tmp_path / "models", identity_models_dir=str(folder),
                                     sd_model=model)
    discovery.list_models([str(folder)], refresh=True)
    return SimpleNamespace(model=model, runtime=runtime, callbacks=callbacks, path=path)


def _weights(unet):
    return {k: (v.data_ptr(), v.clone()) for k, v in unet.state_dict().items()}


def test_the_unet_is_bit_identical_after_a_run_that_raised(monkeypatch, tmp_path, ldm):
    env = _env(monkeypatch, tmp_path, ldm)
    x, t, c = inputs(seed=3)
    before, hooks = _weights(ldm), hook_counts(ldm)
    with torch.no_grad():
        bare = ldm(x, t, context=c)
    seen = {}

    def sample(*a, **k):
        env.runtime.before_sampling(p)
        with torch.no_grad():
            seen["patched"] = env.model.model(x, t, c)
        raise KeyboardInterrupt  # the user pressed Interrupt halfway

    p = new_p(env.model, sample)
    env.runtime.process(p, [{"model": "photomaker-v1-7", "images": [b64(picture(1)), b64(picture(2))]}])
    with pytest.raises(KeyboardInterrupt):
        p.sample()
    assert (seen["patched"] - bare).abs().max() > 1e-3  # the LoRA was on while sampling
    with torch.no_grad():
        assert torch.equal(ldm(x, t, context=c), bare)
    assert hook_counts(ldm) == hooks
    now = ldm.state_dict()
    for key, (ptr, value) in before.items():  # the same storage, the same bits: nothing merged, nothing copied
        assert now[key].data_ptr() == ptr and torch.equal(now[key], value), key


def test_infotext_records_what_restores_the_unit(monkeypatch, tmp_path, ldm):
    env = _env(monkeypatch, tmp_path, ldm)
    pictures = [picture(1), picture(2)]
    p = new_p(env.model, lambda *a, **k: None)
    env.runtime.process(p, [{"model": "photomaker-v1-7", "images": [b64(i) for i in pictures]}])
    text = p.extra_generation_params["Identity 1"]
    for part in ("model: photomaker-v1-7 [", "start: 0.2", "lora weight: 1.0", "trigger: img",
                 "images: " + "+".join(U.Unit.from_api({"images": [b64(i) for i in pictures]}, 1).image_hashes)):
        assert part in text, (part, text)
    keys = [pair.split(":")[0].strip() for pair in text.split(", ")]
    assert not {"weight", "end", "combine", "layers"} & set(keys)  # IP-Adapter's knobs say nothing here
    (entry,) = U.units_from_infotext({"Identity 1": text})
    assert entry["fields"]["start"] == 0.2 and entry["fields"]["trigger"] == "img" and entry["fields"]["lora_weight"] == 1.0

    p = new_p(env.model, lambda *a, **k: None)
    env.runtime.process(p, [{"model": "photomaker-v1-7", "images": [b64(pictures[0])], "trigger": "sks",
                             "start": 0.5, "lora_weight": 0.4}])
    (entry,) = U.units_from_infotext(p.extra_generation_params)
    assert (entry["fields"]["trigger"], entry["fields"]["start"], entry["fields"]["lora_weight"]) == ("sks", 0.5, 0.4)


def test_xyz_axes_offer_start_and_lora_weight():
    assert {"start", "lora_weight"} <= set(U.AXIS_FIELDS)
    assert U.parse_axis_value("lora_weight", "0.25", 1) == 0.25 and U.parse_axis_value("start", "0.3", 1) == 0.3


def test_photomaker_works_beside_a_faceid_unit_and_both_loras_go_away(ldm, tmp_path):
    """One generation, two methods: FaceID's image tokens and LoRA and PhotoMaker's identity and
    LoRA; each LoRA adds its own delta on the same projections, and removal restores the UNet."""
    import dataclasses
    import os

    from PIL import Image

    import face_models as fm
    from faceid_helpers import write_faceid
    from lib_identity.methods import prepare_units

    pack = fm.write_pack(str(tmp_path / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    paths = {"faceid": write_faceid(tmp_path, ldm, "faceid", seed=3), "pm": write_photomaker(tmp_path, ldm, v2=False, seed=8)}
    resolved = []
    for number, path in enumerate(paths.values(), 1):
        entry = SimpleNamespace(name=os.path.basename(str(path)), title=os.path.basename(str(path)), path=str(path),
                                info=formats.inspect(str(path)))
        unit = dataclasses.replace(U.Unit(), enabled=True, model=entry.title, images=(t1,))
        resolved.append(U.ResolvedUnit(number, unit, entry, {"insightface:buffalo_l": pack}))
    parts = prepare_units(resolved, device="cpu", dtype=torch.float32)
    assert len(parts.prompts) == 1 and len(parts.loras) == 2 and len(parts.prompt_identities) == 1
    assert parts.prompt_identities[0].unit_number == 2
    x, t, c = inputs(seed=4)
    hooks = hook_counts(ldm)
    with torch.no_grad():
        bare = ldm(x, t, context=c)
        outs = {}
        for label, loras in (("faceid", parts.loras[:1]), ("both", parts.loras)):
            with PatchSession(ldm, parts.prompts, loras=loras) as session:
                session.begin_step(n_cond=1, progress=0.5)
                outs[label] = ldm(x, t, context=c)
        assert torch.equal(ldm(x, t, context=c), bare)
    assert (outs["both"] - outs["faceid"]).abs().max() > 1e-3  # PhotoMaker's LoRA acts on top of FaceID's
    assert hook_counts(ldm) == hooks
