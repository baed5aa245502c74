"""How a generation stores its embeddings in SQLite (table ``vectors``): float16 or float32 blobs.

New generations store float16 (the manifest's ``embedding_dtype``): half the bytes on disk and in the
page cache, and for unit vectors the rounding (a relative error of at most 2**-11 per component) keeps
the top-10 neighbours of float32 storage (tests/unit/test_embedding_dtype.py, bench/RESULTS.md
"Bulk ingest"). Generations made before the setting existed have no ``embedding_dtype`` and keep
float32 for good, including the vectors they add later.

Every reader gets float32 arrays. The in-memory FAISS structure holds exactly the stored values (the
float16 rounding widened to float32), so a snapshot and a rebuild from SQLite agree bit for bit. Blobs
are decoded by their length (``dim`` components of 2 or 4 bytes), so reading needs no manifest.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from vitrine.errors import StoreError

FLOAT16, FLOAT32 = "float16", "float32"
DTYPES = {FLOAT16: np.dtype(np.float16), FLOAT32: np.dtype(np.float32)}
#: What new generations store.
DEFAULT = FLOAT16


def check_dtype(name: str) -> str:
    """``name`` when it is a storable dtype, else StoreError naming the choices."""
    if name not in DTYPES:
        raise StoreError(f"embedding dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return name


def of_manifest(manifest: dict) -> str:
    """The dtype a generation stores: its manifest's ``embedding_dtype``, float32 for older manifests."""
    return check_dtype(str(manifest.get("embedding_dtype", FLOAT32)))


def encode(vectors: np.ndarray, dtype: str) -> tuple[list[bytes], np.ndarray]:
    """(one blob per row, the stored values as float32): what SQLite keeps and what FAISS must hold."""
    stored = np.ascontiguousarray(vectors, dtype=DTYPES[dtype])
    return [row.tobytes() for row in stored], stored.astype(np.float32)


def decode(blobs: Iterable[bytes], dim: int) -> np.ndarray:
    """Stored blobs → float32 array (n, dim); StoreError when a blob is neither dtype's size."""
    blobs = blobs if isinstance(blobs, list) else list(blobs)
    data = bytearray().join(blobs)
    if not blobs:
        return np.zeros((0, dim), dtype=np.float32)
    for dtype in DTYPES.values():
        if len(data) == len(blobs) * dim * dtype.itemsize:
            return np.frombuffer(data, dtype=dtype).astype(np.float32, copy=False).reshape(-1, dim)
    raise StoreError(
        f"stored embeddings do not have {dim} float16 or float32 components each "
        f"({len(data)} bytes for {len(blobs)} vectors): meta.sqlite is damaged"
    )
