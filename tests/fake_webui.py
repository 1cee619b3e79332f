"""A stand-in for the WebUI's ``modules`` package: just what ``lib_identity.webui`` touches."""

import sys
import threading
import types
from types import SimpleNamespace

import torch


def install_fake_modules(monkeypatch, *, models_path, identity_models_dir=None, sd_model=None, api_auth=None):
    """Put ``modules.{shared,paths,devices,script_callbacks,call_queue}`` into ``sys.modules``.

    Returns the list that ``script_callbacks.on_cfg_denoiser`` appends to.
    """
    callbacks = []
    cb = types.ModuleType("modules.script_callbacks")
    cb.on_cfg_denoiser = callbacks.append
    cb.remove_callbacks_for_function = lambda fn: callbacks.remove(fn) if fn in callbacks else None
    shared = types.ModuleType("modules.shared")
    shared.sd_model = sd_model
    shared.opts = SimpleNamespace(data={})
    shared.cmd_opts = SimpleNamespace(identity_models_dir=identity_models_dir, controlnet_dir=None, api_auth=api_auth)
    paths = types.ModuleType("modules.paths")
    paths.models_path = str(models_path)
    devices = types.ModuleType("modules.devices")
    devices.device, devices.dtype_unet = torch.device("cpu"), torch.float32
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = threading.Lock()
    pkg = types.ModuleType("modules")
    parts = {"script_callbacks": cb, "shared": shared, "paths": paths, "devices": devices, "call_queue": call_queue}
    for name, mod in parts.items():
        setattr(pkg, name, mod)
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
    monkeypatch.setitem(sys.modules, "modules", pkg)
    return callbacks
