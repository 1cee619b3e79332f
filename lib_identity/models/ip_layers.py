"""The per-layer weights of the ``ip_adapter`` section: image key/value projections and FaceID LoRA.

``ip_adapter.<n>.*`` is numbered by diffusers' attention-processor order (self- and
cross-attention together): cross-attention ordinal m has file key n = 2m + 1, and FaceID's LoRA
covers every processor n = 0 … 2L − 1. Keys are always read as integers: safetensors lists them
sorted as strings (1, 11, 13, …).
"""

from __future__ import annotations

import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..errors import CheckpointError

LORA_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
_LORA_KEY = re.compile(r"^(\d+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def file_key(ordinal: int) -> int:
    """The ``ip_adapter`` key number of the cross-attention with this ordinal (UNet order)."""
    return 2 * ordinal + 1


class IPKeyValue(nn.Module):
    """``to_k_ip`` / ``to_v_ip`` of one cross-attention: image tokens → keys and values (no bias)."""

    def __init__(self, context_dim: int, hidden_size: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(context_dim, hidden_size, bias=False)

    def forward(self, image_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.to_k_ip(image_tokens), self.to_v_ip(image_tokens)


class IPAttentionLayers(nn.Module):
    """All image key/value projections of an adapter, indexed by cross-attention ordinal.

    ``layers[m]`` is the ``IPKeyValue`` of the m-th cross-attention in UNet order (input blocks,
    output blocks, middle block); its state-dict keys are the file's ``<2m+1>.to_k_ip.weight``.
    ``lora`` holds the FaceID LoRA of the same section when the file has one (else ``None``).
    """

    def __init__(self, hidden_sizes: Sequence[int], context_dim: int):
        super().__init__()
        self.context_dim = context_dim
        self.hidden_sizes: List[int] = list(hidden_sizes)
        for m, hidden in enumerate(self.hidden_sizes):
            self.add_module(str(file_key(m)), IPKeyValue(context_dim, hidden))
        self.lora: Optional[FaceIDLoRA] = None

    def __len__(self) -> int:
        return len(self.hidden_sizes)

    def __getitem__(self, ordinal: int) -> IPKeyValue:
        if not 0 <= ordinal < len(self):
            raise IndexError(f"cross-attention {ordinal} of {len(self)}")
        return getattr(self, str(file_key(ordinal)))

    def __iter__(self) -> Iterator[IPKeyValue]:
        return (self[m] for m in range(len(self)))

    def key_value(self, ordinal: int, image_tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens for the cross-attention with this ordinal."""
        return self[ordinal](image_tokens)


class FaceIDLoRA:
    """FaceID's LoRA, read (not applied): ``layers[n][proj] = (down [r, in], up [out, r])``.

    ``n`` is the attention-processor index (even: attn1, odd: attn2 of the same block), ``proj``
    one of ``to_q``, ``to_k``, ``to_v``, ``to_out``. The delta is ``up @ down`` with no alpha
    scaling (the official processors use none).
    """

    def __init__(self, layers: Dict[int, Dict[str, Tuple[torch.Tensor, torch.Tensor]]], rank: int):
        self.layers = layers
        self.rank = rank

    def __len__(self) -> int:
        return len(self.layers)

    def to(self, device=None, dtype=None) -> "FaceIDLoRA":
        """A copy with every tensor moved/cast."""
        return FaceIDLoRA(
            {n: {p: (d.to(device=device, dtype=dtype), u.to(device=device, dtype=dtype)) for p, (d, u) in projs.items()}
             for n, projs in self.layers.items()},
            self.rank,
        )

    @classmethod
    def from_section(cls, section: Dict[str, torch.Tensor], *, source: str,
                     hidden_sizes: Optional[Sequence[int]] = None, context_dim: Optional[int] = None,
                     device="cpu", dtype: Optional[torch.dtype] = torch.float32) -> "FaceIDLoRA":
        """Read every ``N.to_{q,k,v,out}_lora.{down,up}.weight`` of an ``ip_adapter`` section.

        Other keys are ignored. Raises ``CheckpointError`` when a projection lacks its down or up
        matrix, the ranks differ or the shapes do not chain. Given the UNet's cross-attention
        widths (``hidden_sizes``, in ordinal order) and ``context_dim``, it also checks that the
        processors are exactly 0 … 2L − 1 and every shape: processor 2m (attn1) and 2m + 1 (attn2)
        both have width ``hidden_sizes[m]``; attn2's k/v read the context.
        """
        expected_layers = None if hidden_sizes is None else 2 * len(hidden_sizes)
        found: Dict[int, Dict[str, Dict[str, torch.Tensor]]] = {}
        for key, t in section.items():
            m = _LORA_KEY.match(key)
            if m:
                found.setdefault(int(m.group(1)), {}).setdefault(m.group(2), {})[m.group(3)] = t
        if not found:
            raise CheckpointError(source, "the ip_adapter section has no FaceID LoRA keys (N.to_q_lora.down.weight …)")
        numbers = sorted(found)
        if expected_layers is not None and numbers != list(range(expected_layers)):
            missing = sorted(set(range(expected_layers)) - set(numbers))[:5]
            raise CheckpointError(
                source,
                f"FaceID LoRA covers {len(numbers)} attention layers, {expected_layers} expected"
                + (f" (missing e.g. ip_adapter.{missing[0]}.to_q_lora.*)" if missing else ""),
            )
        rank = None
        layers: Dict[int, Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = {}
        for n in numbers:
            layers[n] = {}
            for proj in LORA_PROJECTIONS:
                pair = found[n].get(proj, {})
                for part in ("down", "up"):
                    if part not in pair:
                        raise CheckpointError(source, f"ip_adapter.{n}.{proj}_lora.{part}.weight is missing")
                down, up = pair["down"], pair["up"]
                name = f"ip_adapter.{n}.{proj}_lora"
                if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                    raise CheckpointError(
                        source,
                        f"{name}: down {list(down.shape)} and up {list(up.shape)} do not chain "
                        "(expected down [rank, in] and up [out, rank])",
                    )
                if rank is None:
                    rank = int(down.shape[0])
                elif down.shape[0] != rank:
                    raise CheckpointError(source, f"{name}.down.weight has rank {down.shape[0]}, the others {rank}")
                if hidden_sizes is not None:
                    width = hidden_sizes[n // 2]
                    reads_context = n % 2 == 1 and proj in ("to_k", "to_v") and context_dim is not None
                    want_in = context_dim if reads_context else width
                    if [down.shape[1], up.shape[0]] != [want_in, width]:
                        raise CheckpointError(
                            source,
                            f"{name}: down {list(down.shape)} / up {list(up.shape)}, expected down "
                            f"[{rank}, {want_in}] and up [{width}, {rank}] for this UNet layer",
                        )
                layers[n][proj] = (
                    down.to(device=device, dtype=dtype) if dtype is not None else down.to(device=device),
                    up.to(device=device, dtype=dtype) if dtype is not None else up.to(device=device),
                )
        return cls(layers, rank)


def is_lora_key(key: str) -> bool:
    """Whether an ``ip_adapter`` key belongs to the FaceID LoRA."""
    return _LORA_KEY.match(key) is not None
