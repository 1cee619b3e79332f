"""Keeping encoders and encodings between generations.

* ``EncodingCache``: a bounded LRU of encoder outputs (CPU tensors), so the second generation
  with the same references runs no encoder. Keys are built by ``encode.py`` from the image
  content hash, the encoder's identity, the preparation, the output and the dtype.
* ``EncoderRegistry``: each encoder file is loaded once; it is moved to the UNet's device and
  dtype only while it encodes, and afterwards handled by the offload policy (a WebUI setting):
  ``keep`` it on the device, move it to the ``cpu``, or ``unload`` it.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from typing import Dict, Hashable, List, Optional, Tuple

from .. import formats
from ..errors import EncoderError

# policy value -> what the settings page says
OFFLOAD_POLICIES = {
    "keep": "keep on device",
    "cpu": "move to CPU after use",
    "unload": "unload after use",
}
DEFAULT_POLICY = "cpu"


class EncodingCache:
    """Least-recently-used encoder outputs, bounded by entry count and by bytes."""

    def __init__(self, max_entries: int = 256, max_bytes: int = 512 * 1024 * 1024):
        if max_entries < 0 or max_bytes < 1:
            raise ValueError("the encoding cache needs a size of 0 (off) or more entries")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._items: "OrderedDict[Hashable, object]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable):
        """The stored tensor or None; a hit becomes the most recently used."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, tensor) -> None:
        """Store a CPU copy of ``tensor``; the least recently used entries go when a bound is passed."""
        value = tensor.detach().to("cpu").clone()
        size = value.element_size() * value.nelement()
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.element_size() * old.nelement()
            if size > self.max_bytes or self.max_entries == 0:
                return  # larger than the whole cache, or the cache is off: not kept
            self._items[key] = value
            self._bytes += size
            while len(self._items) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.element_size() * dropped.nelement()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def resize(self, max_entries: int) -> None:
        """A new entry bound (the WebUI setting); 0 keeps nothing. The oldest entries go first."""
        if max_entries < 0:
            raise ValueError("the encoding cache size must be 0 or more")
        with self._lock:
            self.max_entries = int(max_entries)
            while len(self._items) > self.max_entries:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= dropped.element_size() * dropped.nelement()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key) -> bool:
        return key in self._items

    @property
    def nbytes(self) -> int:
        return self._bytes


def _file_identity(path: str) -> Tuple:
    """(path, size, mtime) of the file(s) that define an encoder: a changed file is a new encoder."""
    path = os.path.abspath(os.fspath(path))
    parts: List[Tuple] = []
    files = [path]
    if os.path.isdir(path):
        files = [formats.diffusers_weights(path)]
        cfg = os.path.join(path, "config.json")
        if os.path.isfile(cfg):
            files.append(cfg)
    for f in files:
        st = os.stat(f)
        parts.append((f, st.st_size, st.st_mtime_ns))
    return ("file", path, tuple(parts))


def check_policy(policy: str) -> str:
    """The policy value, validated (``keep``, ``cpu``, ``unload``; the settings' labels are accepted too)."""
    p = str(policy or "").strip().lower()
    for value, label in OFFLOAD_POLICIES.items():
        if p in (value, label.lower()):
            return value
    raise EncoderError(f"unknown encoder offload policy '{policy}'; expected one of: {', '.join(OFFLOAD_POLICIES.values())}")


class EncoderRegistry:
    """Loaded encoders by file identity, and where they go after each use.

    Models handed in by the caller (not paths) are used as they are; after use they follow
    the policy too, except that ``unload`` moves them to the CPU (the caller owns them).
    """

    def __init__(self, policy: str = DEFAULT_POLICY, loader=None):
        self._policy = check_policy(policy)
        self._models: Dict[Tuple, object] = {}
        self._lock = threading.RLock()
        self._loader = loader  # (path, encoder_id) -> model; tests count loads through it

    @property
    def policy(self) -> str:
        return self._policy

    @policy.setter
    def policy(self, value: str) -> None:
        self._policy = check_policy(value)
        if self._policy == "unload":
            self.release()

    def identity(self, encoder) -> Tuple:
        """A hashable name for an encoder: its file's (path, size, mtime), or a token for a model object."""
        if isinstance(encoder, (str, os.PathLike)):
            try:
                return _file_identity(encoder)
            except OSError as e:
                raise EncoderError(f"image encoder {os.fspath(encoder)} cannot be read: {e.strerror or e}") from None
        token = getattr(encoder, "_identity_token", None)
        if token is None:
            token = uuid.uuid4().hex
            encoder._identity_token = token
        return ("model", token)

    def _load(self, path, encoder_id):
        if self._loader is not None:
            return self._loader(path, encoder_id)
        from .clip_vision import load_encoder

        return load_encoder(path, encoder_id=encoder_id)

    def model(self, encoder, encoder_id: Optional[str] = None):
        """The loaded model for a path (loaded on first use) or the model object itself."""
        if not isinstance(encoder, (str, os.PathLike)):
            return encoder
        key = self.identity(encoder)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                # a changed file replaces the old copy rather than keeping both
                stale = [k for k in self._models if k[1] == key[1]]
                for k in stale:
                    del self._models[k]
                model = self._load(os.fspath(encoder), encoder_id)
                self._models[key] = model
            return model

    @contextmanager
    def use(self, encoder, device=None, dtype=None, encoder_id: Optional[str] = None):
        """The model on ``device`` in ``dtype`` for the duration of the block, then the policy applies.

        float16 on the CPU is computed in float32: several CPU kernels of older torch have no
        half-precision version.
        """
        import torch

        with self._lock:
            model = self.model(encoder, encoder_id)
            target = torch.device(device) if device is not None else next(model.parameters()).device
            compute = dtype
            if target.type == "cpu" and dtype == torch.float16:
                compute = torch.float32
            model.to(device=target, dtype=compute) if compute is not None else model.to(device=target)
            try:
                yield model
            finally:
                self._after_use(encoder, model)

    def _after_use(self, encoder, model) -> None:
        owned = isinstance(encoder, (str, os.PathLike))
        if self._policy == "keep":
            return
        if self._policy == "unload" and owned:
            key = self.identity(encoder)
            self._models.pop(key, None)
            return
        model.to("cpu")

    def release(self, encoder=None) -> None:
        """Forget loaded encoders (all, or the one for ``encoder``'s path) so their memory can be freed."""
        with self._lock:
            if encoder is None:
                self._models.clear()
            else:
                self._models.pop(self.identity(encoder), None)

    def loaded(self) -> List[str]:
        """Paths of the encoders held now (for status lines and ``doctor``)."""
        with self._lock:
            return [k[1] for k in self._models]


_default_cache = EncodingCache()
_default_registry = EncoderRegistry()


def default_cache() -> EncodingCache:
    return _default_cache


def default_registry() -> EncoderRegistry:
    return _default_registry


def set_offload_policy(policy: str) -> None:
    """Apply the WebUI setting: ``keep``, ``cpu`` or ``unload`` (or their labels in ``OFFLOAD_POLICIES``)."""
    _default_registry.policy = policy


def release_encoders() -> None:
    """Drop every loaded encoder and every cached encoding (script unload, model folder refresh), faces included."""
    from .faces import release_faces

    _default_registry.release()
    _default_cache.clear()
    release_faces()
