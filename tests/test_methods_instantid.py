"""InstantID's method on real insightface code (a small ONNX pack with antelopev2's file names):
several pictures average their raw embeddings, a pose picture sets the keypoints, the uncond
noise is ComfyUI_InstantID's, and IdentityNet gets the face tokens as its context."""

import numpy as np
import pytest
import torch

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")

import face_models as fm  # noqa: E402
from instantid_helpers import StandInIdentityNet, standin_modules, write_instantid_adapter  # noqa: E402
from lib_identity import formats  # noqa: E402
from lib_identity.methods import instantid  # noqa: E402
from lib_identity.models import load_adapter  # noqa: E402
from unet_helpers import CONTEXT  # noqa: E402
from unet_models import SD15, SDXL, build_ldm_unet, randomize_  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("instantid")
    unet = randomize_(build_ldm_unet(SDXL, context_dim=CONTEXT[SDXL]), seed=4)
    path = write_instantid_adapter(root, unet, seed=3)
    image_proj, ip_layers = load_adapter(formats.inspect(str(path)), formats.load_tensors(str(path)))
    pack = fm.write_antelopev2_pack(str(root / "antelopev2"), fm.T1_FACES, max(fm.T1_SIZE))
    group = Image.open(fm.insightface_image("t1.jpg")).convert("RGB")
    crop = group.crop((300, 0, 1186, 886))  # another picture: its faces sit elsewhere in its frame
    return dict(unet=unet, image_proj=image_proj, ip_layers=ip_layers, pack=pack, group=group, crop=crop,
                net=StandInIdentityNet(unet, seed=1))


@pytest.fixture(autouse=True)
def _standins(monkeypatch):
    standin_modules(monkeypatch)


def unit(s, images, **kw):
    return instantid.from_pictures(s["image_proj"], s["ip_layers"], images, pack_dir=s["pack"], identitynet=s["net"], **kw)


def test_several_pictures_average_their_raw_embeddings(setup):
    both = unit(setup, [setup["group"], setup["crop"]])
    raw = torch.stack([torch.from_numpy(np.array(f.embedding)) for f in both.faces])
    assert raw.norm(dim=-1).min() > 1.5  # raw, not normed
    cond, uncond = instantid.instantid_tokens(setup["image_proj"], raw.mean(0, keepdim=True), device="cpu",
                                              dtype=torch.float32)
    torch.testing.assert_close(both.prompt.cond_tokens, cond, atol=0, rtol=0)
    torch.testing.assert_close(both.control.cond_context, cond, atol=0, rtol=0)  # IdentityNet's context: the same tokens
    torch.testing.assert_close(both.control.uncond_context, uncond, atol=0, rtol=0)
    one = unit(setup, [setup["group"]])
    assert not torch.allclose(one.prompt.cond_tokens, both.prompt.cond_tokens, atol=1e-4)
    assert tuple(both.prompt.cond_tokens.shape) == (1, 16, 2048)


def test_the_pose_picture_sets_the_keypoints(setup):
    from lib_identity.encoders.faces.keypoints import draw_keypoints, keypoints_in_frame

    plain = unit(setup, [setup["group"]], face=2)
    posed = unit(setup, [setup["group"]], face=2, pose_image=setup["crop"])
    from lib_identity.encoders.faces import analyse_faces

    assert posed.pose_face.area == max(f.area for f in analyse_faces(setup["crop"], setup["pack"]))  # its largest face
    w, h = 96, 128
    want = draw_keypoints(keypoints_in_frame(posed.pose_face.keypoints, setup["crop"].size, (w, h)), w, h)
    assert np.array_equal(posed.control.hint(w, h), want)
    assert not np.array_equal(plain.control.hint(w, h), want)
    torch.testing.assert_close(posed.prompt.cond_tokens, plain.prompt.cond_tokens, atol=0, rtol=0)  # identity unchanged


def test_uncond_noise_is_comfyui_instantids(setup):
    emb = torch.randn(1, 512, generator=torch.Generator().manual_seed(8)) * 20
    assert torch.equal(instantid.uncond_embedding(emb, 0.0), torch.zeros_like(emb))
    torch.manual_seed(int(torch.sum(emb).item()) % 1000000007)
    expected = 0.35 * torch.rand_like(emb)
    assert torch.equal(instantid.uncond_embedding(emb, 0.35), expected)
    noisy = instantid.instantid_parts(setup["image_proj"], setup["ip_layers"], emb, uncond_noise=0.35)
    quiet = instantid.instantid_parts(setup["image_proj"], setup["ip_layers"], emb)
    assert noisy.control is None  # no IdentityNet given: the Image Adapter alone
    assert not torch.allclose(noisy.prompt.uncond_tokens, quiet.prompt.uncond_tokens, atol=1e-4)
    torch.testing.assert_close(noisy.prompt.cond_tokens, quiet.prompt.cond_tokens, atol=0, rtol=0)


def test_an_sd15_unet_is_refused_with_a_clear_message():
    from lib_identity.errors import UnitError

    with pytest.raises(UnitError, match="InstantID runs on SDXL checkpoints only.*768"):
        instantid.check_unet(build_ldm_unet(SD15, context_dim=768, device="meta"), 1)
