"""InstantID and PhotoMaker from a profile: the same face tokens, IdentityNet context and keypoint
image (InstantID), the same ID embeddings and identity key (PhotoMaker V1 and V2) as from the
pictures the profile was built from; real photos through the real insightface code."""

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from instantid_helpers import StandInIdentityNet, standin_modules, write_instantid_adapter  # noqa: E402
from lib_identity import formats  # noqa: E402
from lib_identity import profiles as P  # noqa: E402
from lib_identity import units as U  # noqa: E402
from lib_identity.errors import UnitError  # noqa: E402
from lib_identity.methods import instantid, photomaker  # noqa: E402
from lib_identity.models import load_adapter  # noqa: E402
from photomaker_helpers import write_photomaker  # noqa: E402
from unet_helpers import CONTEXT  # noqa: E402
from unet_models import SDXL, build_ldm_unet, randomize_  # noqa: E402


def quiet(_):
    pass


@pytest.fixture(scope="module")
def photos():
    t1 = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    # one person in each (the same face index picks the same face), three different pictures
    return [t1, ImageEnhance.Brightness(t1).enhance(0.8), t1.resize((960, 664), Image.BICUBIC)]


@pytest.fixture(scope="module")
def instant(tmp_path_factory):
    root = tmp_path_factory.mktemp("instantid-profile")
    unet = randomize_(build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL]), seed=4)
    path = write_instantid_adapter(root, unet, seed=3)
    image_proj, ip_layers = load_adapter(formats.inspect(str(path)), formats.load_tensors(str(path)))
    pack = fm.write_antelopev2_pack(str(root / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    return SimpleNamespace(image_proj=image_proj, ip_layers=ip_layers, pack=pack, net=StandInIdentityNet(unet, seed=1))


def test_instantid_from_a_profile_equals_instantid_from_its_pictures(instant, photos, monkeypatch):
    standin_modules(monkeypatch)
    t1 = photos[0]
    profile = P.build_profile("alice", photos, P.Sources(packs={"antelopev2": instant.pack}), face=1,
                              progress=quiet).profile
    args = (instant.image_proj, instant.ip_layers)
    for pose in (None, t1):
        kw = dict(identitynet=instant.net, pose_image=pose, ip_weight=0.7, uncond_noise=0.2)
        a = instantid.from_pictures(*args, photos, pack_dir=instant.pack, face=1, **kw)
        b = instantid.from_profile(*args, profile, pack_dir=instant.pack, **kw)
        for x, y in ((a.prompt.cond_tokens, b.prompt.cond_tokens), (a.prompt.uncond_tokens, b.prompt.uncond_tokens),
                     (a.control.cond_context, b.control.cond_context), (a.control.uncond_context, b.control.uncond_context)):
            assert torch.equal(x, y)
        for w, h in ((96, 128), (160, 96)):
            assert np.array_equal(a.control.hint(w, h), b.control.hint(w, h))
        if pose is not None:  # a group pose picture and no mask: the face's region, as from pictures
            assert np.array_equal(a.region(64, 48), b.region(64, 48)) and a.region(64, 48).any()
    # the built face sets the pose: another face draws elsewhere
    other = P.build_profile("bob", photos, P.Sources(packs={"antelopev2": instant.pack}), face=2, progress=quiet).profile
    c = instantid.from_profile(*args, other, pack_dir=instant.pack, identitynet=instant.net)
    assert not np.array_equal(c.control.hint(96, 128), b.control.hint(96, 128))
    with pytest.raises(UnitError, match="field 'profile': profile 'alice' has no faces found by the 'buffalo_l'"):
        instantid.from_profile(*args, profile, pack_dir="/packs/buffalo_l", identitynet=instant.net, unit_number=2)


@pytest.fixture(scope="module")
def pm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pm-profile")
    unet = build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL], device="meta")
    pack = fm.write_pack(str(folder / "insightface" / "models" / "buffalo_l"), fm.T1_FACES, max(fm.T1_SIZE))
    return SimpleNamespace(pack=pack, v1=write_photomaker(folder, unet, v2=False, seed=1),
                           v2=write_photomaker(folder, unet, v2=True, seed=2, suffix=".safetensors"))


def _resolved(path, pack, **fields):
    from lib_identity.discovery import short_hash

    entry = SimpleNamespace(name=os.path.basename(str(path)), path=str(path), short_hash=short_hash(str(path)),
                            info=formats.inspect(str(path)))
    entry.title = f"{entry.name} [{entry.short_hash}]"
    unit = dataclasses.replace(U.Unit(), enabled=True, model=entry.title, **fields)
    return U.ResolvedUnit(1, unit, entry, {"insightface:buffalo_l": pack})


def test_photomaker_from_a_profile_equals_photomaker_from_its_pictures(pm, photos):
    from lib_identity.profiles.sources import gather

    entries = [_resolved(p, pm.pack).model for p in (pm.v1, pm.v2)]
    try:
        sources, notes = gather(entries, lambda need: pm.pack if need == "insightface:buffalo_l" else None)
        assert notes == [] and [e.name for _, e, _ in sources.photomaker] == [e.name for e in entries]
        profile = P.build_profile("alice", photos, sources, face=2, progress=quiet).profile
        for path in (pm.v1, pm.v2):
            a = photomaker.prepare(_resolved(path, pm.pack, images=tuple(photos), face=2), device="cpu", dtype=torch.float32)
            b = photomaker.prepare(dataclasses.replace(_resolved(path, pm.pack, profile="alice"), profile=profile),
                                   device="cpu", dtype=torch.float32)
            assert torch.equal(a.identity.id_embeds, b.identity.id_embeds) and a.identity.key == b.identity.key
            assert a.pictures_used == b.pictures_used == (0, 1, 2)
        # a PhotoMaker file the profile was not built with
        only_v1 = P.build_profile("v1 only", photos, P.Sources(photomaker=[(entries[0].short_hash, entries[0], None)]),
                                  progress=quiet).profile
        with pytest.raises(UnitError, match=r"field 'profile': profile 'v1 only' was built without the PhotoMaker file"):
            photomaker.prepare(dataclasses.replace(_resolved(pm.v2, pm.pack, profile="v1 only"), profile=only_v1),
                               device="cpu", dtype=torch.float32)
        with pytest.raises(P.ProfileError, match="has no faces found by the 'buffalo_l'"):
            P.use.check(only_v1, entries[1], {"insightface:buffalo_l": pm.pack}, U.Unit())
    finally:
        photomaker.release()
