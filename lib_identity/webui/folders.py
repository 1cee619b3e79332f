"""The model folders as the WebUI configures them: flag, setting, its models folder, the ControlNet extension's."""

from __future__ import annotations

from typing import List

from .. import discovery


def _split(value) -> List[str]:
    if not value:
        return []
    return [part.strip() for part in str(value).replace(";", "\n").splitlines() if part.strip()]


def model_folders() -> List[str]:
    """Every folder searched for identity models, most specific first."""
    from modules import paths, shared

    extra: List[str] = []
    flag = getattr(shared.cmd_opts, "identity_models_dir", None)
    if flag:
        extra.append(flag)
    extra += _split(shared.opts.data.get("identity_extra_model_dirs", ""))
    # where ControlNet-extension users already keep IP-Adapter and InstantID files
    cn_flag = getattr(shared.cmd_opts, "controlnet_dir", None)
    if cn_flag:
        extra.append(cn_flag)
    extra += _split(shared.opts.data.get("control_net_models_path", ""))
    return discovery.model_folders(paths.models_path, extra)


def list_models(refresh: bool = False):
    return discovery.list_models(model_folders(), refresh=refresh)


def find_model(name: str, families=None):
    return discovery.find_model(name, model_folders(), families=families)
