"""The AlwaysOn script's behaviour (``scripts/identity.py`` only binds it to ``modules.scripts.Script``)."""

from __future__ import annotations

from . import TITLE, runtime


class IdentityScript:
    """Mixin for the WebUI's Script class; not a Script subclass itself, so the WebUI registers only one."""

    def title(self):
        return TITLE

    def show(self, is_img2img):
        from modules import scripts

        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        from . import ui

        return ui.build(self, is_img2img)

    def before_process(self, p, *args):
        runtime.before_process(p, args)

    def process(self, p, *args):
        runtime.process(p, args)

    def before_process_batch(self, p, *args, **kwargs):
        runtime.before_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs):
        runtime.before_sampling(p)

    def post_sample(self, p, ps, *args):
        runtime.end_pass(p)

    def postprocess(self, p, processed, *args):
        runtime.finish(p)


def register_callbacks():
    """Called each time the WebUI executes ``scripts/identity.py`` (it clears callbacks on reload)."""
    from modules import script_callbacks

    from . import api, controlnet_bridge, settings, xyz
    from ..units import expand_infotext

    def on_infotext_pasted(infotext, params):
        expand_infotext(params, unit_count=settings.unit_count())

    def on_unloaded():
        runtime.cleanup()
        from ..encoders import release_encoders
        from .. import methods

        release_encoders()
        methods.release()
        controlnet_bridge.restore()

    def on_model_loaded(sd_model):
        runtime.cleanup()

    _read_bin_files_with_torch_load()
    script_callbacks.on_ui_settings(settings.register)
    _register_settings_without_ui(settings)
    script_callbacks.on_app_started(api.register)
    script_callbacks.on_infotext_pasted(on_infotext_pasted)
    script_callbacks.on_script_unloaded(on_unloaded)
    script_callbacks.on_model_loaded(on_model_loaded)
    script_callbacks.on_before_ui(xyz.register)
    # our face preprocessors for the ControlNet extension's units: now if it has loaded already,
    # else before the UI is built (its dropdowns are made from its registry then)
    controlnet_bridge.register_preprocessors()
    script_callbacks.on_before_ui(controlnet_bridge.register_preprocessors)


def _read_bin_files_with_torch_load():
    """``.bin`` files are read with torch's own ``weights_only=True`` loader, not through the WebUI's
    pickle check, which refuses files saved by newer torch (see ``formats.containers.use_torch_load``)."""
    from ..formats import containers

    try:
        from modules import safe
    except ImportError:  # a WebUI fork without modules/safe.py: torch.load is its own
        return

    original = getattr(safe, "unsafe_torch_load", None)
    if original is not None:
        containers.use_torch_load(original)


def _register_settings_without_ui(settings):
    """With ``--nowebui`` the WebUI builds no UI, so ``on_ui_settings`` never runs and our options
    would be unknown to ``override_settings`` and ``/sdapi/v1/options``: register them now."""
    from modules import shared

    if getattr(shared.cmd_opts, "nowebui", False):
        settings.register()
