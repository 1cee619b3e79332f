"""Loaded IdentityNets, kept between generations (2.5 GB each in fp16: one by default).

An IdentityNet is built from the host UNet's own classes and loaded in the UNet's dtype on the
device the UNet is kept on, so an entry is keyed by the file (path, size, mtime), the dtype,
the device and the UNet's class. A changed file, another dtype or another checkpoint type loads
again; the least recently used entry goes first.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch

from .. import formats


class IdentityNetCache:
    """IdentityNets by file identity, dtype, device and UNet class; at most ``size`` kept."""

    def __init__(self, size: int = 1):
        self.size = size
        self._items: "OrderedDict[tuple, torch.nn.Module]" = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _key(path: str, unet, device, dtype) -> tuple:
        target = formats.diffusers_weights(path) if os.path.isdir(path) else path
        st = os.stat(target)
        cls = type(unet)
        return (os.path.abspath(path), st.st_size, st.st_mtime_ns, str(torch.device(device)), str(dtype),
                f"{cls.__module__}.{cls.__qualname__}")

    def get(self, path: str, *, unet, device, dtype, progress=None) -> torch.nn.Module:
        """The IdentityNet in ``path`` (a diffusers folder or one .safetensors), loaded once."""
        from ..models.identitynet import load_identitynet

        key = self._key(path, unet, device, dtype)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        name = os.path.basename(path.rstrip(os.sep))
        print(f"[identity] loading IdentityNet {name}")
        close = None
        if progress is None:
            progress, close = _console_progress(name)
        with self._lock:  # make room first: two 2.5 GB models at once is what the bound is for
            while self._items and len(self._items) >= max(1, self.size):
                self._items.popitem(last=False)
        try:
            loaded = load_identitynet(path, unet=unet, device=device, dtype=dtype, progress=progress)
        finally:
            if close is not None:
                close()
        loaded.eval().requires_grad_(False)
        with self._lock:
            self._items[key] = loaded
            while len(self._items) > max(0, self.size):
                self._items.popitem(last=False)
        return loaded

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = max(0, int(size))
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


def _console_progress(name: str):
    """A console bar over the tensors read (2.5 GB take a while on a slow disk), and its closer."""
    try:
        from tqdm import tqdm
    except ImportError:  # the WebUI ships tqdm; without it the start line is all there is
        return None, None
    bar = tqdm(desc=f"[identity] {name}", unit=" tensors", leave=False)

    def step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return step, bar.close


identitynets = IdentityNetCache()
