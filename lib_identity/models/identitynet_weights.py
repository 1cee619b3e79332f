"""IdentityNet's file: where its tensors are, their names in ldm terms, a strict check, a streamed read.

IdentityNet is 2.5 GB in fp16, so nothing is read twice: the header (or the memory-mapped
``.bin``) gives names and shapes, the module is built on the ``meta`` device and checked against
them, and only then is each tensor read, cast and moved on its own, so the peak is the loaded
model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..errors import CheckpointError
from ..formats.containers import (
    check_file,
    diffusers_weights,
    flatten,
    safetensors_header,
    short_error,
    torch_load_weights_only,
)
from ..formats.controlnet_names import LDM_MARKER, diffusers_to_ldm, hint_block_count, is_diffusers_naming, ldm_to_diffusers

_LIST_AT_MOST = 5
WHAT_TO_DO = ("Use InstantID's IdentityNet as published (the ControlNetModel folder with config.json and "
              "diffusion_pytorch_model.safetensors, or that .safetensors file alone, under any name); "
              "download it again if it may be incomplete.")

Progress = Optional[Callable[[int, int], None]]


@dataclass
class IdentityNetWeights:
    """One IdentityNet file, opened: names and shapes in ldm terms, tensors not read yet."""

    source: str  # what was asked for: a folder or a file
    weights_path: str  # the file holding the tensors
    naming: str  # "diffusers" or "ldm"
    file_keys: Dict[str, str]  # ldm name -> the key as the file spells it
    shapes: Dict[str, Tuple[int, ...]]  # ldm name -> shape
    config: Optional[dict] = None  # diffusers config.json, when it came with one
    per_level: int = 3
    hint_blocks: int = 6
    _bin: Optional[dict] = field(default=None, repr=False)  # the memory-mapped tensors of a .bin

    def file_name(self, ldm_key: str) -> str:
        """How this file spells (or would spell) an ldm key: for messages."""
        if ldm_key in self.file_keys:
            return self.file_keys[ldm_key]
        if self.naming == "diffusers":
            return ldm_to_diffusers(ldm_key, per_level=self.per_level, hint_blocks=self.hint_blocks)
        return ldm_key


def _read_config(folder: str) -> Optional[dict]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except Exception as e:  # noqa: BLE001 - any decoding problem is a broken file, said plainly
        raise CheckpointError(path, f"config.json is not valid JSON ({short_error(e)})") from None


def _per_level(diffusers_keys) -> int:
    # input blocks per level: the res blocks of the first down block, plus its downsampler
    found = {int(m.group(1)) for k in diffusers_keys for m in [re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k)] if m}
    return (max(found) + 2) if found else 3


def open_weights(path: str) -> IdentityNetWeights:
    """Open a diffusers folder or one ``.safetensors`` / ``.bin`` file, reading names and shapes only."""
    path = os.fspath(path)
    check_file(path)
    config = None
    weights = path
    if os.path.isdir(path):
        weights = diffusers_weights(path)
        config = _read_config(path)
    lower = weights.lower()
    raw_bin = None
    if lower.endswith(".safetensors"):
        raw = {k: tuple(v[0]) for k, v in safetensors_header(weights).items()}
    elif lower.endswith((".bin", ".pt", ".pth", ".ckpt")):
        raw_bin = flatten(torch_load_weights_only(weights, mmap=True), weights)
        raw = {k: tuple(t.shape) for k, t in raw_bin.items()}
    else:
        raise CheckpointError(weights, "unknown file type; IdentityNet is a .safetensors file (or a diffusers folder)")
    if is_diffusers_naming(raw):
        naming, per_level, hint_blocks = "diffusers", _per_level(raw), hint_block_count(raw)
    elif LDM_MARKER in raw:
        naming, per_level = "ldm", 3
        hint_blocks = len([k for k in raw if re.match(r"input_hint_block\.\d+\.weight$", k)]) - 2
    else:
        raise CheckpointError(weights, "not a ControlNet: neither controlnet_cond_embedding.conv_in.weight (diffusers "
                                       "naming) nor input_hint_block.0.weight (ldm naming) is in it. " + WHAT_TO_DO)
    file_keys: Dict[str, str] = {}
    for key in raw:
        ldm = diffusers_to_ldm(key, per_level=per_level, hint_blocks=hint_blocks) if naming == "diffusers" else key
        if ldm in file_keys:
            raise CheckpointError(weights, f"{key} and {file_keys[ldm]} are the same tensor in two namings; "
                                           "the file mixes diffusers and ldm names. " + WHAT_TO_DO)
        file_keys[ldm] = key
    shapes = {ldm: raw[key] for ldm, key in file_keys.items()}
    return IdentityNetWeights(source=path, weights_path=weights, naming=naming, file_keys=file_keys, shapes=shapes,
                              config=config, per_level=per_level, hint_blocks=hint_blocks, _bin=raw_bin)


def check_weights(expected: Dict[str, Tuple[int, ...]], weights: IdentityNetWeights, built_from: str) -> None:
    """Raise ``CheckpointError`` unless the file has exactly the tensors ``expected`` (ldm name -> shape)."""
    given = weights.shapes
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    wrong = [k for k in expected if k in given and tuple(given[k]) != tuple(expected[k])]
    problems: List[str] = []
    for k in wrong[:_LIST_AT_MOST]:
        problems.append(f"{weights.file_name(k)} has shape {list(given[k])}, expected {list(expected[k])}")
    for k in missing[:_LIST_AT_MOST]:
        problems.append(f"{weights.file_name(k)} is missing (expected shape {list(expected[k])})")
    for k in unexpected[:_LIST_AT_MOST]:
        problems.append(f"{weights.file_name(k)} is not part of the model")
    if not problems:
        return
    more = sum(max(0, len(x) - _LIST_AT_MOST) for x in (wrong, missing, unexpected))
    raise CheckpointError(
        weights.weights_path,
        f"the IdentityNet weights do not fit the model {built_from} describes: " + "; ".join(problems)
        + (f"; and {more} more" if more else "") + ". " + WHAT_TO_DO)


def read_tensors(weights: IdentityNetWeights, device, dtype: torch.dtype, progress: Progress = None) -> Dict[str, torch.Tensor]:
    """Every tensor under its ldm name, cast to ``dtype`` on ``device``, one at a time.

    ``progress(done, total)`` is called after each tensor.
    """
    out: Dict[str, torch.Tensor] = {}
    total = len(weights.file_keys)

    def put(ldm: str, tensor: torch.Tensor) -> None:
        out[ldm] = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device=device)
        if progress is not None:
            progress(len(out), total)

    if weights._bin is not None:
        for ldm, key in weights.file_keys.items():
            put(ldm, weights._bin[key])
        return out
    from safetensors import safe_open

    try:
        with safe_open(weights.weights_path, framework="pt", device="cpu") as f:
            for ldm, key in weights.file_keys.items():
                put(ldm, f.get_tensor(key))
    except CheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own errors for damaged files
        raise CheckpointError(weights.weights_path, f"could not read the tensors ({short_error(e)}); "
                                                    "the file may be corrupt. " + WHAT_TO_DO) from None
    return out
