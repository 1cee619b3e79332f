"""The real CLIP BPE tokenizer (the one SD/SDXL text encoders use), without a download.

open_clip ships OpenAI's BPE file (``bpe_simple_vocab_16e6.txt.gz``); the WebUI's CLIP-L side uses
transformers' ``CLIPTokenizer``, whose ``vocab.json``/``merges.txt`` are that same vocabulary: the
256 byte symbols, the same with ``</w>``, one entry per merge, then the two special tokens.
This module writes those two files from the shipped BPE file and loads transformers' tokenizer.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

N_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus bytes and specials, as both tokenizers cut it


def _bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")  # the package is not imported (it wants torchvision)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("open_clip is not installed; tests/run.sh installs it (no deps) for its BPE file")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _byte_symbols():
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


@lru_cache(maxsize=1)
def tokenizer_files() -> Path:
    """A folder with ``vocab.json`` and ``merges.txt`` for transformers' CLIPTokenizer."""
    import tempfile

    lines = gzip.open(_bpe_file()).read().decode("utf-8").split("\n")
    merges = lines[1:N_MERGES + 1]
    vocab = _byte_symbols()
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = Path(tempfile.mkdtemp(prefix="clip-bpe-"))
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return folder


@lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers' CLIPTokenizer on the real vocabulary (49408 tokens)."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(tokenizer_files()))
