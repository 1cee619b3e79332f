"""Reading the containers safely: safetensors headers, zip and legacy ``.bin`` with
``weights_only``, and diffusers folders. Nothing here knows what the tensors mean.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile

from ..errors import CheckpointError

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")

SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64", "I64": "int64", "I32": "int32", "F8_E4M3": "float8_e4m3fn"}


def fail(path, reason):
    raise CheckpointError(path, reason)


def check_file(path: str):
    if not os.path.exists(path):
        fail(path, "no such file")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        fail(path, "the file is empty (0 bytes); download it again")


def safetensors_header(path: str):
    """keys -> (shape, dtype) straight from the header, so nothing is read but the header."""
    from safetensors import safe_open

    # our own length check first: a download that stopped short is named as such, with both
    # sizes, whatever the installed safetensors says about it (some versions accept it)
    check_safetensors_length(path, os.path.getsize(path))
    try:
        out = {}
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    except Exception as e:  # safetensors raises its own SafetensorError / OSError
        fail(path, f"not a readable .safetensors file ({short_error(e)}); the download may be truncated or corrupt")
    return out


def check_safetensors_length(path: str, size: int):
    """Refuse a file shorter than the data its header describes (a truncated download).

    A header that cannot be read is left to the safetensors library, which says what is wrong.
    """
    import struct

    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            fail(path, "not a .safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size:
            return
        try:
            header = json.loads(fh.read(n))
            end = max((int(meta["data_offsets"][1]) for key, meta in header.items() if key != "__metadata__"), default=0)
        except Exception:  # noqa: BLE001 - not a header we can read: safe_open reports it
            return
    if size < 8 + n + end:
        fail(path, f"the file is truncated: {size} bytes on disk, its header describes {8 + n + end}; download it again")


def short_error(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:200]


# The WebUI replaces torch.load with its own pickle check (modules/safe.py), which refuses the zip
# entries newer torch writes (.format_version, .storage_alignment) and then returns None instead
# of raising. weights_only=True is torch's own allow-list unpickler and runs no code either, so the
# WebUI layer hands the original torch.load over (``use_torch_load``); it is only ever called so.
_torch_load = None


def use_torch_load(load) -> None:
    """Read ``.bin`` files with ``load`` (an unwrapped ``torch.load``, always called with ``weights_only=True``)."""
    global _torch_load
    _torch_load = load


def torch_load_weights_only(path: str, mmap: bool = True):
    """``torch.load`` that never runs code from the pickle: plain tensors and containers only."""
    import torch

    load = _torch_load or torch.load
    try:
        try:
            obj = load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as e:
            # mmap needs the zip container; old-style pickles are read whole instead.
            if mmap and "mmap" in str(e).lower():
                obj = load(path, map_location="cpu", weights_only=True)
            else:
                raise
    except pickle.UnpicklingError as e:
        msg = str(e)
        # torch 2.1 (the WebUI's) says "Unsupported class posix.mkdir", later ones "GLOBAL posix.mkdir"
        m = re.search(r"(?:GLOBAL|Unsupported class)\s+([\w.]+)", msg)
        what = f" ({m.group(1)})" if m else ""
        fail(
            path,
            f"refused: the file's pickle asks to run code{what}, which a weights file never needs. "
            "It was not loaded. Use the official .safetensors or .bin file.",
        )
    except (zipfile.BadZipFile, EOFError) as e:
        fail(path, f"the .bin file is truncated or corrupt ({short_error(e)}); download it again")
    except RuntimeError as e:
        fail(path, f"the .bin file is truncated, corrupt or not a torch file ({short_error(e)}); download it again")
    except Exception as e:  # noqa: BLE001 - any other decoding failure is a bad file, said plainly
        fail(path, f"not a readable torch file ({short_error(e)})")
    if obj is None:
        fail(path, "reading it gave nothing (None); if the console says 'Error verifying pickled file', "
                   "a pickle check in front of torch.load refused it")
    return obj


def flatten(obj, path: str, prefix: str = "", out=None):
    import torch

    if out is None:
        out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                fail(path, f"unexpected non-text key {k!r} in the checkpoint")
            flatten(v, path, f"{prefix}.{k}" if prefix else k, out)
    else:
        fail(path, f"'{prefix or 'top level'}' holds a {type(obj).__name__}, not tensors; this is not a weights file")
    return out



def diffusers_weights(folder: str) -> str:
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
        "pytorch_model.bin",
    ):
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            return p
    fail(folder, "a folder with no diffusers/transformers weights file (diffusion_pytorch_model.safetensors or model.safetensors)")
