"""``.bin`` files in a WebUI whose torch.load is wrapped by its pickle check (modules/safe.py).

That check refuses the zip entries newer torch writes (.format_version, .storage_alignment) and
returns None; the extension reads ``.bin`` files with the original torch.load and
``weights_only=True`` instead, and says so plainly when a wrapped loader hands back nothing.
"""

import sys
import types

import pytest
import torch

from checkpoints import manifest_keys, write_random
from lib_identity import formats
from lib_identity.errors import CheckpointError
from lib_identity.formats import containers


@pytest.fixture
def faceid_bin(tmp_path):
    path = tmp_path / "ip-adapter-faceid_sd15.bin"
    write_random(manifest_keys("ip-adapter-faceid_sd15"), path, dtype=torch.float16)
    return str(path)


@pytest.fixture
def webui_safe(monkeypatch):
    """torch.load replaced as the WebUI replaces it, by a check that refuses this torch's files (returns None)."""
    original = torch.load
    calls = []

    def unsafe_torch_load(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", lambda *a, **k: None)
    monkeypatch.setattr(containers, "_torch_load", None)
    safe = types.ModuleType("modules.safe")
    safe.unsafe_torch_load = unsafe_torch_load
    modules = sys.modules.get("modules") or types.ModuleType("modules")
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.safe", safe)
    monkeypatch.setattr(modules, "safe", safe, raising=False)
    return calls


def test_a_refused_file_says_so_instead_of_not_a_weights_file(webui_safe, faceid_bin):
    with pytest.raises(CheckpointError, match=r"gave nothing \(None\).*Error verifying pickled file"):
        containers.torch_load_weights_only(faceid_bin)


def test_the_webui_layer_reads_bin_files_with_the_original_loader_and_weights_only(webui_safe, faceid_bin):
    from lib_identity.webui import script

    script._read_bin_files_with_torch_load()
    info = formats.inspect(faceid_bin)
    assert info.variant == "ip-adapter-faceid_sd15" and info.lora_rank == 128
    assert webui_safe and all(kw.get("weights_only") is True for kw in webui_safe)
