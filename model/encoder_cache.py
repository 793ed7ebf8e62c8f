"""The encoded-image cache: each image's encoder output (its cross-attention keys and values, a `Cross` of
model/interface.py) kept by a hash of the decoded pixels, bounded in bytes, the least recently used out first.

A client that asks several questions of one image (refer after refer, a box after a box) pays the encoder
once: the engine core (model/core.py) looks every image of a prefill up here, encodes only the ones it misses,
and keeps them. The key is the model's input, not the bytes sent, so the same picture as PNG or as JPEG of
identical pixels shares an entry, and two images share one only when their pixels are equal (a 128-bit
BLAKE2b, with the array's dtype and shape).

    cache = EncoderCache(256 << 20)
    cross = cache.get(key)              # None: a miss
    cache.put(key, cross)               # evicts the least recently used entries until the bound holds
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .interface import Cross


def image_key(pixels: np.ndarray) -> bytes:
    """A 128-bit BLAKE2b of a model input (dtype, shape and every byte): equal keys mean equal pixels."""
    pixels = np.ascontiguousarray(pixels)
    h = hashlib.blake2b(f"{pixels.dtype.str}{pixels.shape}".encode(), digest_size=16)
    h.update(memoryview(pixels).cast("B"))
    return h.digest()


@dataclass
class CacheStats:
    """Counts since the last `take_stats()`, and the cache's state now."""
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    bytes: int = 0      # held now
    entries: int = 0    # held now
    max_bytes: int = 0


class EncoderCache:
    def __init__(self, max_bytes: int):
        """max_bytes: the bound on the entries' bytes (each `Cross.nbytes`); 0 turns the cache off."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Cross] = OrderedDict()  # oldest use first
        self._stats = CacheStats(max_bytes=max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:  # no use: the order and the counts stay as they are
        return key in self._entries

    def get(self, key: bytes) -> Cross | None:
        cross = self._entries.get(key)
        if cross is None:
            self._stats.misses += 1
            return None
        self._entries.move_to_end(key)
        self._stats.hits += 1
        return cross

    def put(self, key: bytes, cross: Cross) -> None:
        """Keep `cross` (one image's, owning its memory) under `key`; an entry larger than the whole bound is
        not kept."""
        size = cross.nbytes
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self._entries and self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.nbytes
            self._stats.evictions += 1
        self._entries[key] = cross
        self.bytes += size

    def take_stats(self) -> CacheStats:
        stats = self._stats
        stats.bytes, stats.entries = self.bytes, len(self._entries)
        self._stats = CacheStats(max_bytes=self.max_bytes)
        return stats
