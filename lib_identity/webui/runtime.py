"""One generation, as the WebUI runs it: parse and check the units, install the patch session for
every sampling pass, and take everything away again.

The WebUI catches exceptions from script hooks and goes on without the script, which would give
an image without the identity. So a problem found in a hook is kept as ``pending error`` and a
pre-hook on the model wrapper (``p.sd_model.model``) raises it at the first UNet call: the
generation stops with the message (red text in the UI, the ``errors`` field of an API error).

The units are prepared once per run (``_prepared``): at the first prompt encoding when a
PhotoMaker unit acts in the prompt (``prompt_hook``, inside ``setup_conds``, where an error
stops the run directly), otherwise at the first sampling pass.
"""

from __future__ import annotations

import logging
import threading
from typing import List, Optional

from .. import image_input
from .. import units as U
from ..errors import IdentityError
from ..unet import PatchSession, remove_sessions
from ..units import write_infotext
from . import likeness, lookup, prompt_hook, settings

log = logging.getLogger("sd-webui-identity")

OWNER = "sd-webui-identity"


class _State:
    """What the current generation installed; module level, so a reloaded script finds it."""

    def __init__(self):
        self.lock = threading.RLock()
        self.resolved: List[U.ResolvedUnit] = []
        self.session: Optional[PatchSession] = None
        self.gate = None  # hook handle on sd_model.model that raises the pending error
        self.error: Optional[BaseException] = None
        self.cfg_callback = None
        self.pending: Optional[BaseException] = None  # found in before_process; raised from process
        self.parts = None  # methods.Contributions of this run, prepared once (first encoding or first pass)


state = _State()


# ---------------------------------------------------------------------------- helpers


def _decode_image(text: str):
    return image_input.decode_image_string(text)


def _cond_rows(text_cond) -> int:
    if isinstance(text_cond, dict):
        text_cond = text_cond.get("crossattn")
    return int(text_cond.shape[0])


# ---------------------------------------------------------------------------- lifecycle


def cleanup():
    """Remove everything a previous generation may have left: sessions, callbacks, the gate."""
    from modules import script_callbacks

    with state.lock:
        remove_sessions(OWNER)
        state.session = None
        if state.cfg_callback is not None:
            script_callbacks.remove_callbacks_for_function(state.cfg_callback)
            state.cfg_callback = None
        if state.gate is not None:
            state.gate.remove()
            state.gate = None
        state.error = None
        state.resolved = []
        state.parts = None
    likeness.stop()


def _fail(p, error: BaseException):
    """Stop this generation with ``error`` at the first UNet call (see the module docstring)."""
    print(f"[identity] {error}")
    state.error = error
    if state.gate is None:
        def gate(module, args):
            if state.error is not None:
                raise state.error
        state.gate = p.sd_model.model.register_forward_pre_hook(gate)


def units_for(p, args) -> List[U.Unit]:
    """The script args plus any X/Y/Z overrides of this cell, as Units."""
    units = U.parse_script_args(args, unit_count=settings.unit_count(), decode_image=_decode_image,
                                open_upload=lookup.upload_opener())
    overrides = getattr(p, "identity_overrides", None)
    if overrides:
        units = U.apply_overrides(units, overrides)
    return units


def before_process(p, args):
    """``Script.before_process``: units that run through the ControlNet extension get its units
    now, before the extension reads them in its own ``process`` (``controlnet_bridge``)."""
    from . import controlnet_bridge

    controlnet_bridge.restore()  # slots of a generation that never reached postprocess
    state.pending = None
    try:
        units = units_for(p, args)
        if any(u.enabled and controlnet_bridge.runs_through_controlnet(u) for u in units):
            controlnet_bridge.apply(p, lookup.resolve_units(units, lookup.loaded_base()))
    except IdentityError as e:
        state.pending = e  # process() starts by cleaning up: it raises this afterwards


def before_batch(p):
    """``Script.before_process_batch``: the extension has written its infotext by now."""
    from . import controlnet_bridge

    controlnet_bridge.forget_infotext(p)


def _identitynets():
    from ..methods.identitynet_cache import identitynets

    return identitynets


def process(p, args):
    """``Script.process``: parse, check, write infotext. Nothing heavy happens before sampling."""
    cleanup()
    likeness.stop(p)
    try:
        if state.pending is not None:
            pending, state.pending = state.pending, None
            raise pending
        units = units_for(p, args)
        if not any(u.enabled for u in units):
            write_infotext(p.extra_generation_params, [])
            return
        resolved = lookup.resolve_units(units, lookup.loaded_base())
        titles = {r.number: r.unit.model for r in resolved}
        # the units as they run (a method's own defaults applied), with the keys their method records
        as_run = {r.number: r.unit for r in resolved}
        methods = {r.number: U.METHOD_OF_FAMILY.get(r.model.info.family) for r in resolved}
        write_infotext(p.extra_generation_params, [as_run.get(n, u) for n, u in enumerate(units, 1)],
                       model_titles=titles, methods=methods)
        state.resolved = resolved
        _remove_when_sampling_ends(p)
        if any(r.model.info.family == "photomaker" for r in resolved):
            prompt_hook.install(p, lambda: _prompt_identities(p))
    except IdentityError as e:
        write_infotext(p.extra_generation_params, [])
        _fail(p, e)
        return
    likeness.start(p, resolved)


def measure_likeness(p, image):
    """``Script.postprocess_image_after_composite``: the likeness of a finished image (``likeness``)."""
    likeness.measure_image(p, image)


def _remove_when_sampling_ends(p):
    """Wrap this run's ``p.sample`` so the patch goes also when sampling raises.

    ``post_sample``/``postprocess`` are skipped when sampling raises; the next run would clean
    up, but until then the UNet would carry the hooks. ``p.sample`` holds every pass (first and
    hires), so its end is the end of sampling.
    """
    sample = p.sample
    if getattr(sample, "_identity_wrapper", False):
        return

    def sample_then_remove(*args, **kwargs):
        try:
            return sample(*args, **kwargs)
        finally:
            end_pass(p)

    sample_then_remove._identity_wrapper = True
    p.sample = sample_then_remove


def _prepared(p):
    """This run's contributions, prepared once: at the first prompt encoding when a unit acts in
    the prompt (PhotoMaker), else at the first sampling pass; every pass installs the same."""
    if state.parts is None:
        from modules import devices

        from ..encoders import default_cache, default_face_cache, set_offload_policy
        from ..methods import prepare_units

        set_offload_policy(settings.option("identity_encoder_offload"))
        default_cache().resize(max(0, int(settings.option("identity_cache_size"))))
        default_face_cache().resize(max(0, int(settings.option("identity_cache_size"))))
        _identitynets().resize(int(settings.option("identity_identitynet_cache")))
        unet = p.sd_model.model.diffusion_model  # InstantID builds IdentityNet from its classes
        state.parts = prepare_units(state.resolved, device=devices.device, dtype=devices.dtype_unet, unet=unet)
        likeness.use_regions(state.parts.regions)
    return state.parts


def _prompt_identities(p):
    """The PhotoMaker units' ``PromptIdentity``s for the WebUI's prompt encoding (see ``prompt_hook``).

    Called inside ``setup_conds``: an error raised here stops the run with its message."""
    if not state.resolved or state.error is not None:
        return []
    try:
        return list(_prepared(p).prompt_identities)
    except IdentityError:
        raise
    except Exception as e:  # noqa: BLE001 - the run must stop with the cause, not go on without the identity
        log.exception("identity: preparing the units failed")
        raise IdentityError(f"Identity: preparing the units failed: {type(e).__name__}: {e}") from e


def before_sampling(p):
    """``Script.process_before_every_sampling`` (first pass, hires pass, img2img)."""
    if not state.resolved or state.error is not None:
        return
    from modules import script_callbacks

    try:
        if state.session is not None:
            state.session.remove()
            state.session = None
        parts = _prepared(p)
        unet = p.sd_model.model.diffusion_model
        session = PatchSession(unet, parts.prompts, owner=OWNER, loras=parts.loras, controls=parts.controls).install()
        state.session = session

        def on_cfg_denoiser(params):
            denoiser = params.denoiser
            progress = total = None
            if denoiser is not None and getattr(denoiser, "total_steps", None):
                total = int(denoiser.total_steps)
                progress = denoiser.step / total
            session.begin_step(_cond_rows(params.text_cond), progress, n_rows=int(params.x.shape[0]), total_steps=total)

        if state.cfg_callback is not None:
            script_callbacks.remove_callbacks_for_function(state.cfg_callback)
        state.cfg_callback = on_cfg_denoiser
        script_callbacks.on_cfg_denoiser(on_cfg_denoiser)
    except IdentityError as e:
        _fail(p, e)
    except Exception as e:  # noqa: BLE001 - anything else must still stop the run, with its cause
        log.exception("identity: preparing the units failed")
        _fail(p, IdentityError(f"Identity: preparing the units failed: {type(e).__name__}: {e}"))


def end_pass(p):
    """Sampling is over (``Script.post_sample``, or ``p.sample`` ended, also by an exception):
    take the patch and the per-step callback away before decoding."""
    from modules import script_callbacks

    with state.lock:
        if state.session is not None:
            state.session.remove()
            state.session = None
        if state.cfg_callback is not None:
            script_callbacks.remove_callbacks_for_function(state.cfg_callback)
            state.cfg_callback = None


def finish(p):
    """``Script.postprocess``: settles the likeness and gives the ControlNet slots back."""
    from . import controlnet_bridge

    likeness.settle(p)
    cleanup()
    controlnet_bridge.restore(p)
