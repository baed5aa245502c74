"""An IVF index served from its snapshot on disk (mapped by readers): rebuilt from SQLite in chunks
exactly as in memory, and damage to the mapped file caught before it is served. Real FAISS and SQLite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitrine.index import ann, factories, layout, snapshots
from vitrine.index.ann import AnnIndex
from vitrine.index.store import IndexStore, NewItem

DIM = 32
FP = {"id": "tiny@1", "model": "tiny", "dim": DIM}
FACTORY = "IVF16,SQ8"


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(root: Path, n: int = 2000) -> np.ndarray:
    vecs = unit(np.random.default_rng(5).standard_normal((n, DIM)))
    with IndexStore.create(root, FP, factory=FACTORY, search_params={"nprobe": 4}) as store:
        store.write(
            [NewItem(f"k{i:05d}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs)]
        )
    return vecs


def top_keys(store: IndexStore, queries: np.ndarray) -> list[list[str]]:
    return [[h.key for h in hits] for hits in store.search(queries, k=10)]


def test_a_rebuild_from_sqlite_in_chunks_equals_one_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "index"
    vecs = build(root)
    monkeypatch.setattr(snapshots, "REBUILD_CHUNK", 97)  # many chunks, the last one short
    with IndexStore.open(root, writable=True) as writer:
        writer.flush(retrain=True)  # snapshots.build_from_sqlite
        streamed = writer._gen.ann
        assert streamed.effective_factory == FACTORY and streamed.ntotal == len(vecs)
        queries = unit(np.random.default_rng(6).standard_normal((30, DIM)))
        rows = writer.connection().execute("SELECT id, embedding FROM vectors ORDER BY id")
        in_memory = AnnIndex(DIM, FACTORY, {"nprobe": 4})
        in_memory.rebuild(*layout.id_vectors(rows, DIM))  # all at once, as before
        for a, b in zip(streamed.search(queries, 10), in_memory.search(queries, 10), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_mapped_ivf_answers_like_one_read_into_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "index"
    build(root)
    queries = unit(np.random.default_rng(7).standard_normal((30, DIM)))
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 0)
    with IndexStore.open(root) as mapped:
        monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 1 << 40)
        with IndexStore.open(root) as loaded:
            assert mapped._gen.ann.mapped and not loaded._gen.ann.mapped
            assert mapped._gen.ann.effective_factory == FACTORY
            assert top_keys(mapped, queries) == top_keys(loaded, queries)


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damage_to_a_mapped_ivf_snapshot_is_caught_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    root = tmp_path / "index"
    vecs = build(root)
    snap = snapshots.snapshots(root / "gen-000001")[0][1]
    data = bytearray(snap.read_bytes())
    if damage == "truncate":
        snap.write_bytes(data[: len(data) - 4096])
    else:  # same size, new bytes in the inverted lists' codes: the mtime moved, so the reader hashes
        mid = len(data) // 2
        data[mid : mid + 256] = bytes(b ^ 0xFF for b in data[mid : mid + 256])
        snap.write_bytes(bytes(data))
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 0)
    with IndexStore.open(root) as reader:
        reason = reader.snapshot_damage[0]
        expected = "bytes, its checksum was recorded over" if damage == "truncate" else "recorded checksum"
        assert expected in reason and reader.stats()["snapshot_seq"] is None
        hits = reader.search(vecs[:50], k=1)
        assert sum(h[0].key == f"k{i:05d}" for i, h in enumerate(hits)) >= 45  # served from the rebuild


def test_the_store_moves_to_the_largest_tier_and_readers_map_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Auto mode through the real store, tiers scaled down: the writer's flush rebuilds from SQLite into
    the fast-scan PQ + SQ8 refine structure, and a mapped reader answers as the writer does."""
    for name, value in [("FLAT_MAX", 100), ("HNSW_MAX", 200), ("SQ8_MAX", 1000), ("IVF_NLIST_LARGE", 16)]:
        monkeypatch.setattr(factories, name, value)
    monkeypatch.setattr(snapshots, "REBUILD_CHUNK", 500)
    root = tmp_path / "index"
    vecs = unit(np.random.default_rng(8).standard_normal((3000, DIM)))
    items = [NewItem(f"k{i:05d}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs)]
    with IndexStore.create(root, FP) as writer:
        writer.write(items[:150])
        writer.flush()
        assert writer.stats()["effective_factory"] == "HNSW32"
        writer.write(items[150:])
        writer.flush()
        assert writer.stats()["effective_factory"] == "IVF16,PQ4x4fs,Refine(SQ8)"
        queries = unit(vecs[:40] + 0.1 * np.random.default_rng(9).standard_normal((40, DIM)))
        expected = top_keys(writer, queries)
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 0)
    with IndexStore.open(root) as reader:
        assert reader._gen.ann.mapped and reader.snapshot_damage == []
        assert top_keys(reader, queries) == expected
        assert [h[0].key for h in reader.search(vecs[:40], k=1)] == [f"k{i:05d}" for i in range(40)]
