"""Hash partitioning of product ids: the plan and the feature store split work by ``bucket``.

The hash is computed here (FNV-1a over the id's UTF-8 bytes, then a 64-bit finaliser) rather
than by a library whose hash may change between versions or be salted per process: a bucket
number is stored and compared across processes, runs and machines. Vectorised over the Arrow
buffers with numpy: no Python object per id.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_FNV_OFFSET, _FNV_PRIME = np.uint64(0xCBF29CE484222325), np.uint64(0x100000001B3)
_CHUNK = 1 << 20  # ids hashed at a time: bounds the per-byte scratch arrays


def bucket(product_ids: pa.Array | pa.ChunkedArray, n: int) -> pa.Array:
    """int32 bucket in [0, n) of each id (a null id is bucket 0)."""
    if n < 1:
        raise ValueError(f"bucket count must be >= 1, got {n}")
    if isinstance(product_ids, pa.ChunkedArray):
        product_ids = product_ids.combine_chunks() if product_ids.num_chunks != 1 else product_ids.chunk(0)
    if not pa.types.is_string(product_ids.type):
        product_ids = product_ids.cast(pa.string())
    if n == 1 or len(product_ids) == 0:
        return pa.array(np.zeros(len(product_ids), np.int32))
    out = np.empty(len(product_ids), np.int32)
    for start in range(0, len(product_ids), _CHUNK):
        part = product_ids.slice(start, _CHUNK)
        out[start:start + len(part)] = (hash64(part) % np.uint64(n)).astype(np.int32)
    return pa.array(out)


def hash64(ids: pa.StringArray) -> np.ndarray:
    """uint64 hash of each string (null -> hash of ""), stable everywhere."""
    ids = pc.fill_null(ids, "")
    if not isinstance(ids, pa.StringArray):
        ids = pa.array(ids, pa.string())
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset: ids.offset + len(ids) + 1]
    data = np.frombuffer(ids.buffers()[2], np.uint8) if ids.buffers()[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.full(len(ids), _FNV_OFFSET, np.uint64)
    with np.errstate(over="ignore"):
        for k in range(int(lengths.max()) if len(lengths) else 0):  # FNV-1a, one byte position at a time
            live = np.flatnonzero(lengths > k)
            h[live] = (h[live] ^ data[offsets[live] + k].astype(np.uint64)) * _FNV_PRIME
        h ^= h >> np.uint64(33)  # murmur3 finaliser: FNV's low bits alone bucket poorly
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
    return h
