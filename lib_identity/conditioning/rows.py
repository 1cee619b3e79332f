"""The class-word rows of an encoded prompt, and their fused replacement.

The WebUI's text encoders return ``T = 77 * chunks`` rows per prompt: the token at index ``j`` of
chunk ``c`` (``PromptChunk.tokens``, start token included) is row ``77 * c + j``. SDXL's cross-
attention context puts CLIP-L's 768 columns first and OpenCLIP-bigG's 1280 after them.

Emphasis: the WebUI multiplies each token's encoder output by its weight, and (option
"Original") rescales the whole chunk so its mean stays what it was. A fused row is treated as that
token's encoder output: the fuse takes the class rows *before* emphasis (the raw encoder output)
and the fused rows get the very scale the WebUI gave those tokens in this encoding (weight x
the chunk's mean factor). Every other row stays exactly the WebUI's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from ..errors import IdentityError
from .tokens import marker_index

CHUNK = 77


@dataclass(frozen=True)
class Placement:
    """One trigger occurrence in one prompt text: identity ``index`` at ``rows`` (its copies, in order)."""

    text: int
    index: int
    rows: tuple


def placements(batch_chunks: Sequence[Sequence], counts: Sequence[int]) -> List[Placement]:
    """Where the marked class-word copies landed, from ``process_texts`` run in marking mode.

    ``batch_chunks``: per text, its ``PromptChunk``s; ``counts[i]``: copies per occurrence of identity i.
    """
    out = []
    for t, chunks in enumerate(batch_chunks):
        found: Dict[int, List[int]] = {}
        for c, chunk in enumerate(chunks):
            for j, token in enumerate(chunk.tokens):
                index = marker_index(int(token))
                if index >= 0:
                    found.setdefault(index, []).append(CHUNK * c + j)
        for index, rows in sorted(found.items()):
            n = counts[index]
            for k in range(0, len(rows), n):
                out.append(Placement(t, index, tuple(rows[k:k + n])))
    return out


def row_scale(out_rows: torch.Tensor, raw_rows: torch.Tensor) -> torch.Tensor:
    """Per row, the factor the WebUI's emphasis applied: ``out = scale * raw`` (least squares, [n, 1])."""
    out_rows, raw_rows = out_rows.float(), raw_rows.float()
    den = (raw_rows * raw_rows).sum(-1, keepdim=True)
    num = (out_rows * raw_rows).sum(-1, keepdim=True)
    return torch.where(den > 0, num / den.clamp_min(1e-30), torch.ones_like(den))


def fuse_rows(crossattn: torch.Tensor, raw: Sequence[Sequence[torch.Tensor]], found: Sequence[Placement],
              identities: Sequence) -> torch.Tensor:
    """A new context ``[B, T, D]``: ``crossattn`` with each placement's rows fused with its identity.

    ``raw[e][c]``: text encoder ``e``'s output before emphasis for chunk ``c`` (``[B, 77, width_e]``),
    in column order; ``identities[i].fuse(class_rows, id_embeds)`` gives the fused rows.
    ``crossattn`` itself is never changed (the WebUI may cache it).
    """
    widths = [int(chunks[0].shape[-1]) for chunks in raw]
    if sum(widths) != crossattn.shape[-1]:
        raise IdentityError(f"PhotoMaker: the text encoders give {widths} columns, the context has "
                            f"{crossattn.shape[-1]}; PhotoMaker needs an SDXL model")
    out = crossattn.clone()
    for place in found:
        ident = identities[place.index]
        if ident.id_embeds.shape[-1] != crossattn.shape[-1]:
            raise IdentityError(f"PhotoMaker (unit {ident.unit_number}) makes {ident.id_embeds.shape[-1]}-wide ID "
                                f"embeddings, the model's text context is {crossattn.shape[-1]} wide; PhotoMaker "
                                "needs an SDXL model")
        if len(place.rows) != ident.id_embeds.shape[0]:
            raise IdentityError(f"PhotoMaker: identity {ident.unit_number} found {len(place.rows)} class-word copies, "
                                f"expected {ident.id_embeds.shape[0]}")
        raw_parts = []
        for chunks in raw:
            raw_parts.append(torch.stack([chunks[r // CHUNK][place.text, r % CHUNK] for r in place.rows]))
        raw_rows = torch.cat(raw_parts, dim=-1).to(crossattn.dtype)
        fused = ident.fuse(raw_rows, ident.id_embeds)
        rows = list(place.rows)
        col = 0
        for part, width in zip(raw_parts, widths):
            seen = crossattn[place.text, rows, col:col + width]
            scale = row_scale(seen, part)
            out[place.text, rows, col:col + width] = (fused[:, col:col + width].float() * scale).to(out.dtype)
            col += width
    return out
