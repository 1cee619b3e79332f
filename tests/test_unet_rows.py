"""Cond and uncond rows are told apart for every batch layout the WebUI's CFG denoiser produces.

``denoiser_calls`` replays how ``CFGDenoiser.forward`` (A1111 v1.10.1,
modules/sd_samplers_cfg_denoiser.py) stacks rows and slices them into UNet calls.
"""

import pytest
import torch

from lib_identity.unet import CondRows, ImagePrompt, PatchSession, find_cross_attentions
from unet_models import SD15, build_ldm_unet, randomize_


def denoiser_calls(batch_size, repeats, *, same_tokens=True, batch_cond_uncond=True, skip_uncond=False, edit=False):
    """(n_cond, total rows, [(a, b) row slice of each UNet call, in order])."""
    n_cond = sum(repeats)
    total = n_cond + batch_size * (2 if edit else 1)
    if skip_uncond:
        total -= batch_size
    if same_tokens or skip_uncond:
        if batch_cond_uncond:
            return n_cond, total, [(0, total)]
        return n_cond, total, [(a, min(a + batch_size, total)) for a in range(0, total, batch_size)]
    step = batch_size * 2 if batch_cond_uncond else batch_size
    calls = [(a, min(a + step, n_cond)) for a in range(0, n_cond, step)]
    calls.append((total - batch_size, total))
    return n_cond, total, calls


LAYOUTS = {
    "one image": dict(batch_size=1, repeats=[1]),
    "batch of 3": dict(batch_size=3, repeats=[1, 1, 1]),
    "AND": dict(batch_size=1, repeats=[3]),
    "AND in a batch": dict(batch_size=2, repeats=[2, 1]),
    "long prompt (cond and uncond token counts differ)": dict(batch_size=2, repeats=[1, 1], same_tokens=False),
    "long prompt, AND, batch_cond_uncond off": dict(batch_size=2, repeats=[2, 2], same_tokens=False,
                                                    batch_cond_uncond=False),
    "batch_cond_uncond off": dict(batch_size=2, repeats=[1, 2], batch_cond_uncond=False),
    "NGMS / skip early cond": dict(batch_size=2, repeats=[1, 1], skip_uncond=True),
    "skip uncond, batch_cond_uncond off": dict(batch_size=3, repeats=[1, 1, 1], skip_uncond=True,
                                               batch_cond_uncond=False),
    "InstructPix2Pix": dict(batch_size=2, repeats=[1, 1], edit=True),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_call_knows_its_cond_rows(name):
    n_cond, total, calls = denoiser_calls(**LAYOUTS[name])
    rows = CondRows()
    for _ in range(2):  # two denoiser steps: the offset starts again at each step
        rows.begin_step(n_cond, total)
        for a, b in calls:
            expected = sum(1 for r in range(a, b) if r < n_cond)
            assert rows.begin_call(b - a) == expected
            assert rows.cond_count(b - a) == expected


def test_without_step_information_every_row_is_cond():
    rows = CondRows()
    assert rows.begin_call(4) == 4
    assert rows.cond_count(3) == 3


def test_a_layer_seeing_another_batch_assumes_the_step_starts_there():
    rows = CondRows()
    rows.begin_step(2)
    rows.begin_call(4)
    assert rows.cond_count(3) == 2  # e.g. ControlNet's reference pass, not counted as a call


# ---------------------------------------------------------------- the same through a real UNet

C = 32


@pytest.fixture(scope="module")
def unet():
    return randomize_(build_ldm_unet(SD15, context_dim=C), seed=7)


def _prompt(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    layers = find_cross_attentions(unet)
    pairs = [(torch.randn(l.hidden_size, C, generator=g) / C ** 0.5, torch.randn(l.hidden_size, C, generator=g) / C ** 0.5)
             for l in layers]
    return ImagePrompt(cond_tokens=torch.randn(1, 4, C, generator=g), uncond_tokens=torch.randn(1, 4, C, generator=g),
                       ip_layers=pairs, weight=1.5)


@pytest.mark.parametrize("name", ["AND in a batch", "long prompt, AND, batch_cond_uncond off"])
def test_uncond_rows_get_the_uncond_tokens(unet, name):
    """Running the layout's calls equals running every row alone as what it is (cond or uncond)."""
    spec = LAYOUTS[name]
    n_cond, total, calls = denoiser_calls(**spec)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(total, 4, 8, 8, generator=g)
    t = torch.full((total,), 321.0)
    cond_len = 7 if spec.get("same_tokens", True) else 14
    context = [torch.randn(1, cond_len if r < n_cond else 7, C, generator=g) for r in range(total)]
    prompt = _prompt(unet)
    with torch.no_grad():
        with PatchSession(unet, [prompt]) as session:
            session.begin_step(n_cond, progress=0.5, n_rows=total)
            out = torch.cat([unet(x[a:b], t[a:b], context=torch.cat(context[a:b])) for a, b in calls])
            alone = []
            for r in range(total):
                session.begin_step(1 if r < n_cond else 0, progress=0.5)
                alone.append(unet(x[r:r + 1], t[r:r + 1], context=context[r]))
    torch.testing.assert_close(out, torch.cat(alone), atol=1e-5, rtol=0)
    if total == n_cond:
        return  # no uncond rows in this layout
    # and the uncond rows really differ from what cond tokens would give them
    with torch.no_grad(), PatchSession(unet, [prompt]) as session:
        session.begin_step(None, progress=0.5)
        as_cond = unet(x[-1:], t[-1:], context=context[-1])
    assert (as_cond - out[-1:]).abs().max() > 1e-3
