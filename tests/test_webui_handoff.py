"""Every unit setting reaches the UNet through the WebUI path, as numbers (``handoff.py``).

What a user would notice if a hand-off broke: the setting is accepted and written to infotext,
yet the identity acts on the whole image (mask), the negative side is not what they chose
(noise, negative image), another part of the picture is used (crop position, pad), the
negative rows get the picture (cond/uncond rows), or the identity acts in other steps (window).
"""

import pytest
import torch
from PIL import Image

from handoff import b64, encode, generate, make_env, picture, prompt_from_encodings, reference
from lib_identity.encoders import Preparation, prepare_pixels
from unet_helpers import unet_inputs

ATOL = 2e-5  # the WebUI path encodes cond and uncond pictures in one batch; the reference one by one


@pytest.fixture
def env(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    yield env
    env.runtime.cleanup()


def unit(env, **fields):
    return dict({"model": env.adapter, "images": [b64(picture(1))]}, **fields)


def pixels(img, **prep):
    return prepare_pixels(img, Preparation(**prep), size=32)


def zero_uncond_prompt(env, cond_picture=None, **prep):
    cond = encode(env, pixels(cond_picture or picture(1), **prep))
    return prompt_from_encodings(env, cond, torch.zeros_like(cond))


# ---------------------------------------------------------------- region mask


def half_mask(white_left=True):
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32) if white_left else (16, 0, 32, 32))
    return mask


def test_outside_the_region_mask_the_attention_is_left_alone(env):
    (plain,) = generate(env, [unit(env)])
    (masked,) = generate(env, [unit(env, mask=b64(half_mask()))])
    checked = 0
    for name in masked.text:
        added, unmasked = masked.added(name), plain.added(name)
        n = added.shape[1]
        side = int(n ** 0.5)
        if side < 2:  # the 1x1 middle grid averages the mask: no token is outside it
            continue
        grid = added.reshape(added.shape[0], side, side, -1)
        assert torch.count_nonzero(grid[:, :, side // 2:]) == 0, name  # right half: nothing added
        assert grid[:, :, : side // 2].abs().max() > 1e-4, name  # left half: the identity acts
        checked += 1
    assert checked >= 3
    # the first cross-attention sees the same input in both runs: there the masked addition is
    # exactly the unmasked one on the left half
    first = next(iter(masked.text))
    assert torch.equal(masked.text[first], plain.text[first])
    keep = torch.zeros(8, 8)
    keep[:, :4] = 1
    torch.testing.assert_close(masked.added(first), plain.added(first) * keep.reshape(1, 64, 1), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- negative side


def test_negative_noise_gives_the_uncond_rows_the_projection_of_the_noise_encoding(env):
    from lib_identity.encoders import EncodingCache, encode_images

    (seen,) = generate(env, [unit(env, uncond="noise")])
    cond = encode(env, pixels(picture(1)))
    # the fixed noise picture, encoded on its own (fresh cache) by the encoder loaded by transformers
    from transformers import CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(env.encoder).eval()
    _, noise = encode_images(model, [picture(1)], "image_embeds", uncond="noise", cache=EncodingCache())
    want = reference(env, [prompt_from_encodings(env, cond, noise)])
    zero = reference(env, [zero_uncond_prompt(env)])
    torch.testing.assert_close(seen.out, want, atol=ATOL, rtol=0)
    assert (want[1] - zero[1]).abs().max() > 1e-3  # the uncond row tells noise from zero
    torch.testing.assert_close(want[0], zero[0], atol=1e-6, rtol=0)  # the cond row does not change


def test_a_negative_image_gives_the_uncond_rows_the_projection_of_its_encoding(env):
    negative = picture(7, size=(48, 48))
    (seen,) = generate(env, [unit(env, uncond="image", negative_image=b64(negative))])
    want = reference(env, [prompt_from_encodings(env, encode(env, pixels(picture(1))), encode(env, pixels(negative)))])
    torch.testing.assert_close(seen.out, want, atol=ATOL, rtol=0)
    zero = reference(env, [zero_uncond_prompt(env)])
    assert (want[1] - zero[1]).abs().max() > 1e-3


# ---------------------------------------------------------------- crop position, pad, and the cache


def test_crop_position_and_pad_choose_what_is_encoded_and_each_is_encoded_anew(env, monkeypatch):
    from transformers import CLIPVisionModelWithProjection

    runs = []
    real = CLIPVisionModelWithProjection.forward
    monkeypatch.setattr(CLIPVisionModelWithProjection, "forward",
                        lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
    outputs = {}
    for label, fields, prep in [
        ("top", dict(crop_position="top"), dict(crop_position="top")),
        ("bottom", dict(crop_position="bottom"), dict(crop_position="bottom")),
        ("pad", dict(preparation="pad"), dict(mode="pad")),
        ("top again", dict(crop_position="top"), dict(crop_position="top")),
    ]:
        before = len(runs)
        (seen,) = generate(env, [unit(env, **fields)])
        encoded = len(runs) - before
        monkeypatch.setattr(CLIPVisionModelWithProjection, "forward", real)  # the reference is not counted
        want = reference(env, [zero_uncond_prompt(env, **prep)])
        monkeypatch.setattr(CLIPVisionModelWithProjection, "forward",
                            lambda self, *a, **k: runs.append(1) or real(self, *a, **k))
        torch.testing.assert_close(seen.out, want, atol=ATOL, rtol=0, msg=label)
        # the same picture with another crop or fit is encoded again; the same one is not
        assert encoded == (0 if label == "top again" else 1), label
        outputs[label] = seen.out
    assert (outputs["top"] - outputs["bottom"]).abs().max() > 1e-3
    assert (outputs["top"] - outputs["pad"]).abs().max() > 1e-3


# ---------------------------------------------------------------- cond and uncond rows


@pytest.mark.parametrize("layout", [
    dict(rows=2, n_cond=1),                       # one picture, one call
    dict(rows=3, n_cond=2),                       # "A AND B": two cond rows, one uncond
    dict(rows=4, n_cond=2, calls=[2, 2]),         # batch of two, batch_cond_uncond off
    dict(rows=4, n_cond=2, calls=[2, 1, 1]),      # long negative prompt: cond call, then uncond rows
    dict(rows=1, n_cond=1),                       # uncond skipped (NGMS / skip early cond)
    dict(rows=3, n_cond=2, sdxl_style=True),      # text_cond as SDXL's denoiser reports it (a dict)
])
def test_uncond_rows_get_the_uncond_tokens_as_the_denoiser_reports_them(env, layout):
    inputs = unet_inputs(layout["rows"], 768, seed=4)
    (seen,) = generate(env, [unit(env, uncond="image", negative_image=b64(picture(9)))], n_cond=layout["n_cond"],
                       calls=layout.get("calls"), inputs=inputs, sdxl_style=layout.get("sdxl_style", False))
    prompt = prompt_from_encodings(env, encode(env, pixels(picture(1))), encode(env, pixels(picture(9))))
    all_cond = reference(env, [prompt], n_cond=None, inputs=inputs)
    all_uncond = reference(env, [prompt], n_cond=0, inputs=inputs)
    n = layout["n_cond"]
    torch.testing.assert_close(seen.out[:n], all_cond[:n], atol=ATOL, rtol=0)
    torch.testing.assert_close(seen.out[n:], all_uncond[n:], atol=ATOL, rtol=0)
    assert (all_cond - all_uncond).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every row tells them apart


# ---------------------------------------------------------------- start / end window


@pytest.mark.parametrize("start,end,acting", [
    (0.0, 0.25, [True, False, False, False]),
    (0.5, 1.0, [False, False, True, True]),
    (0.25, 0.75, [False, True, True, False]),
    (0.0, 1.0, [True, True, True, True]),
])
def test_the_window_holds_step_by_step(env, start, end, acting):
    steps = generate(env, [unit(env, start=start, end=end)], steps=4)
    assert [s.acted() for s in steps] == acting
    want = reference(env, [zero_uncond_prompt(env)])
    x, t, c = env.inputs
    with torch.no_grad():
        bare = env.unet(x, t, context=c)
    for s, on in zip(steps, acting):
        torch.testing.assert_close(s.out, want if on else bare, atol=ATOL, rtol=0)
