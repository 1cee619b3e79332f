"""The X/Y/Z axis over profiles: it offers the saved profiles' names, refuses a name that cannot be
one, and each cell of a grid runs with its own profile (the same image tokens as that profile's
pictures would give), recorded in the cell's infotext. A stand-in WebUI around the real ldm UNet."""

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from handoff import b64, denoise, make_env, new_p, picture
from unet_helpers import CONTEXT, unet_inputs
from unet_models import SD15

PICTURES = {"alice": [picture(1), picture(2)], "bob": [picture(7)]}


@pytest.fixture
def webui(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    yield env
    env.runtime.cleanup()


def fake_xyz_module():
    """The WebUI's scripts/xyz_grid.py as far as the axes go."""
    module = types.ModuleType("xyz_grid.py")
    module.axis_options = []
    module.AxisOption = lambda label, type, apply, confirm=None, choices=None: SimpleNamespace(
        label=label, apply=apply, confirm=confirm, choices=choices)
    return module


def profile_axis(monkeypatch):
    from lib_identity.webui import xyz

    module = fake_xyz_module()
    scripts = types.ModuleType("modules.scripts")
    scripts.scripts_data = [SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)]
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    xyz.register()
    return next(o for o in module.axis_options if o.label == "[Identity] Unit 1 profile")


def build_profiles():
    from lib_identity.webui import profile_build

    for name, pictures in PICTURES.items():
        profile_build.build_and_save(name, pictures, progress=lambda text: None)


def run(webui, args, overrides=None):
    """One generation's first denoiser step: (the UNet's output, the unit's infotext)."""
    x, t, c = unet_inputs(2, CONTEXT[SD15])
    p = new_p(webui.model, None)
    if overrides:
        p.identity_overrides = overrides
    webui.runtime.process(p, args)
    webui.runtime.before_sampling(p)
    out = denoise(webui, x, t, c, n_cond=1)
    webui.runtime.end_pass(p)
    return out, p.extra_generation_params.get("Identity 1", "")


def test_the_axis_offers_the_saved_profiles_and_refuses_bad_names(webui, monkeypatch):
    axis = profile_axis(monkeypatch)
    assert axis.choices() == []
    build_profiles()
    assert axis.choices() == ["alice", "bob"]  # read when the plot's UI asks, so new profiles show
    axis.confirm(SimpleNamespace(), ["alice", "bob", "None"])
    with pytest.raises(Exception, match="profile"):
        axis.confirm(SimpleNamespace(), ["alice", "../bob"])


def test_each_cell_of_a_grid_over_two_profiles_uses_its_profile(webui, monkeypatch):
    axis = profile_axis(monkeypatch)
    build_profiles()
    # what each profile's pictures give, sent as images
    expected = {name: run(webui, [{"model": webui.adapter, "images": [b64(p) for p in pics]}])[0]
                for name, pics in PICTURES.items()}
    assert not torch.equal(expected["alice"], expected["bob"])
    args = [{"model": webui.adapter}]  # the unit names no profile: the axis gives each cell one
    for name in ("alice", "bob", "alice"):
        p = new_p(webui.model, None)
        axis.apply(p, name, ["alice", "bob"])
        out, infotext = run(webui, args, overrides=p.identity_overrides)
        assert f"profile: {name}" in infotext
        torch.testing.assert_close(out, expected[name], rtol=1e-4, atol=1e-5)
