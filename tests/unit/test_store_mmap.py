"""Store readers map large snapshots (ann.MMAP_MIN_BYTES, lowered here) and answer exactly like readers
that read them, also after another process commits; writers never map."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vitrine.index import ann
from vitrine.index.store import IndexStore, NewItem

DIM = 16
FP = {"id": "tiny-clip@abc123", "model": "tiny-clip", "dim": DIM}
REPO = Path(__file__).resolve().parents[2]

# Run in another process: add items 1500..1699 and delete 0..49, one commit, then flush (which also
# deletes the snapshot the readers mapped: their mapping must outlive the file name).
WRITER = """
import sys
import numpy as np
from vitrine.index.store import IndexStore, NewItem
root, dim = sys.argv[1], int(sys.argv[2])
vecs = np.random.default_rng(1).standard_normal((200, dim)).astype(np.float32)
vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
items = [NewItem(f"k{i}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs, 1500)]
with IndexStore.open(root, writable=True) as store:
    store.write(items, remove_keys=[f"k{i}" for i in range(50)])
"""


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ids(store: IndexStore, queries: np.ndarray) -> list[list[str]]:
    return [[h.key for h in hits] for hits in store.search(queries, k=10)]


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])  # compacting remove vs soft delete
def test_mapped_reader_searches_and_refreshes_like_a_reading_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factory: str
) -> None:
    root, vecs = tmp_path / "index", _vectors(1500)
    with IndexStore.create(root, FP, factory=factory, search_params={"nprobe": 16}) as writer:
        writer.write([NewItem(f"k{i}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs)])
    snapshot = next((root / "gen-000001").glob("index.*.faiss"))
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", snapshot.stat().st_size)  # exactly at the threshold: maps
    mapped = IndexStore.open(root)
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", snapshot.stat().st_size + 1)
    loaded = IndexStore.open(root)
    try:
        assert mapped._gen.ann.mapped and not loaded._gen.ann.mapped
        queries = _vectors(40, seed=2)
        before = _ids(mapped, queries)
        assert before == _ids(loaded, queries) and all(len(hits) == 10 for hits in before)

        env = {**os.environ, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", WRITER, str(root), str(DIM)], check=True, env=env, timeout=120)
        assert not snapshot.exists()  # the writer's flush replaced the mapped file
        assert mapped.refresh() and loaded.refresh()
        assert not mapped._gen.ann.mapped  # the replayed adds copied the structure into memory once
        after = _ids(mapped, queries)
        assert after == _ids(loaded, queries) and after != before
        keys = {k for hits in after for k in hits}
        assert keys & {f"k{i}" for i in range(1500, 1700)} and not keys & {f"k{i}" for i in range(50)}
        assert mapped.stats()["indexed"] == loaded.stats()["indexed"] == 1650
    finally:
        mapped.close()
        loaded.close()


def test_writers_never_map(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root, vecs = tmp_path / "index", _vectors(200)
    with IndexStore.create(root, FP) as writer:
        writer.write([NewItem(f"k{i}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs)])
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 1)
    with IndexStore.open(root, writable=True) as writer:
        assert not writer._gen.ann.mapped
    with IndexStore.open(root) as reader:
        assert reader._gen.ann.mapped
