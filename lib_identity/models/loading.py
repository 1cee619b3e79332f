"""Loading an official state dict into a module strictly, with errors a person can act on.

``torch.nn.Module.load_state_dict(strict=True)`` raises one long ``RuntimeError`` listing every
mismatch in module terms. Here the comparison is done first, against the keys and shapes the
module expects, and a mismatch becomes a ``CheckpointError`` naming the file, the key as it is
spelled in the file (``section.key``) and both shapes. Only then are the tensors cast to the
module's dtype and device (the official PhotoMaker files mix bfloat16 and float32) and assigned,
so a module built on the ``meta`` device never allocates random weights first.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch

from ..errors import CheckpointError

# How many problems of each kind one message lists; the rest are counted.
_LIST_AT_MOST = 5


def _shape(t) -> List[int]:
    return [int(d) for d in t.shape]


def _named(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def check_state_dict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str,
                     section: str = "", optional: Iterable[str] = ()) -> None:
    """Raise ``CheckpointError`` unless ``state_dict`` has exactly the keys and shapes ``module`` expects.

    ``optional`` keys may be present or absent on either side (e.g. the CLIP ``position_ids``
    buffer, which some transformers versions save and others do not).
    """
    optional = set(optional)
    expected = {k: v for k, v in module.state_dict().items() if k not in optional}
    given = {k: v for k, v in state_dict.items() if k not in optional}
    problems: List[str] = []
    missing = [k for k in expected if k not in given]
    unexpected = sorted(k for k in given if k not in expected)
    wrong = [k for k in expected if k in given and _shape(given[k]) != _shape(expected[k])]
    for k in wrong[:_LIST_AT_MOST]:
        problems.append(f"{_named(section, k)} has shape {_shape(given[k])}, expected {_shape(expected[k])}")
    for k in missing[:_LIST_AT_MOST]:
        problems.append(f"{_named(section, k)} is missing (expected shape {_shape(expected[k])})")
    for k in unexpected[:_LIST_AT_MOST]:
        problems.append(f"{_named(section, k)} is not part of this model")
    if not problems:
        return
    more = sum(max(0, len(x) - _LIST_AT_MOST) for x in (wrong, missing, unexpected))
    raise CheckpointError(
        source,
        "the weights do not fit the model its layout describes: "
        + "; ".join(problems)
        + (f"; and {more} more" if more else "")
        + ". The file is damaged or a modified variant; download the official file again.",
    )


def load_state_dict_strict(module: torch.nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str,
                           section: str = "", device="cpu", dtype: Optional[torch.dtype] = torch.float32,
                           optional: Iterable[str] = ()) -> torch.nn.Module:
    """Check ``state_dict`` against ``module`` (see ``check_state_dict``), then assign it.

    Floating-point tensors are moved to ``device`` and cast to ``dtype`` (``None`` keeps each
    tensor's own dtype); the module's parameters become those tensors (``assign``), which is what
    lets the module be built on the ``meta`` device. ``optional`` keys in ``state_dict`` are
    ignored. Returns the module.
    """
    optional = set(optional)
    check_state_dict(module, state_dict, source=source, section=section, optional=optional)
    cast = {}
    for k, t in state_dict.items():
        if k in optional:
            continue
        if t.is_floating_point():
            cast[k] = t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)
        else:
            cast[k] = t.to(device=device)
    # strict=False: the comparison above is the strict one, and it knows the optional keys.
    module.load_state_dict(cast, strict=False, assign=True)
    return module
