"""Embedding storage (vitrine/index/embeddings.py) and the set-based batch write (vitrine/index/upsert.py),
on real SQLite + FAISS: float16 exactness on every read path, old float32 indexes opening and growing,
top-10 agreement with float32 storage, and no per-item lookups in a batch."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import StoreError
from vitrine.index.store import IndexStore, NewItem

DIM = 32
FP = {"id": "tiny-clip@abc123", "model": "tiny-clip", "dim": DIM}


def raw(seed: int, n: int = 1) -> np.ndarray:
    """Unnormalised vectors: the store normalises, then rounds."""
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32) * 3


def item(i: int, embedding: np.ndarray | None, sha: str | None = None) -> NewItem:
    return NewItem(
        key=f"/p/{i:04d}.jpg",
        path=f"/p/{i:04d}.jpg",
        sha256=sha or f"sha-{i}",
        size=i,
        mtime_ns=i,
        captions=[f"photo {i}"],
        source="cat",
        embedding=embedding,
    )


def float16_of(vectors: np.ndarray) -> np.ndarray:
    """What the store must hold: the float16 rounding of the L2-normalised input, widened to float32."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit.astype(np.float16).astype(np.float32)


def blob_sizes(root: Path) -> set[int]:
    gen = (root / "CURRENT").read_text()
    conn = sqlite3.connect(root / gen / "meta.sqlite")
    try:
        return {r[0] for r in conn.execute("SELECT length(embedding) FROM vectors")}
    finally:
        conn.close()


def test_float16_is_exact_on_every_read_path(tmp_path: Path) -> None:
    root, vectors = tmp_path / "index", raw(0, 50)
    expected = float16_of(vectors)
    keys = [f"/p/{i:04d}.jpg" for i in range(50)]
    with IndexStore.create(root, FP) as store:
        assert store.manifest["embedding_dtype"] == "float16" and store.embedding_dtype == "float16"
        live = IndexStore.open(root)  # a reader that catches up by replaying the commits
        store.write([item(i, vectors[i]) for i in range(50)])
        got_keys, got = store.embeddings(keys)
        assert got_keys == keys and got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.array_equal(store.vector_for("sha-7"), expected[7])
        ids = np.array([store.get(k)["vector_id"] for k in keys])
        assert np.array_equal(store._gen.ann.stored(ids), expected)  # FAISS holds the stored values
        assert live.refresh() and np.array_equal(live._gen.ann.stored(ids), expected)
        live.close()
        top = store.search(expected[:5], k=1)
        assert [h[0].key for h in top] == keys[:5]
    assert blob_sizes(root) == {DIM * 2}
    with IndexStore.open(root) as reader:  # snapshot path: checksum + SQLite sample agree
        assert reader._gen.verified and not reader.snapshot_damage
        assert np.array_equal(reader.embeddings(keys)[1], expected)
    for snap in (root / "gen-000001").glob("index.*.faiss*"):
        snap.unlink()
    with IndexStore.open(root) as reader:  # rebuilt from SQLite: the same values
        ids = np.array([reader.get(k)["vector_id"] for k in keys])
        assert np.array_equal(reader._gen.ann.stored(ids), expected)


def test_an_index_with_an_old_manifest_keeps_float32_and_grows(tmp_path: Path) -> None:
    root, vectors = tmp_path / "index", raw(1, 30)
    with IndexStore.create(root, FP, embedding_dtype="float32") as store:
        store.write([item(i, vectors[i]) for i in range(20)])
    manifest_path = root / "gen-000001" / "manifest.json"
    old = json.loads(manifest_path.read_text())
    del old["embedding_dtype"]  # as written before the setting existed
    manifest_path.write_text(json.dumps(old))
    conn = sqlite3.connect(root / "gen-000001" / "meta.sqlite")
    with conn:
        conn.execute("UPDATE state SET value=? WHERE name='manifest'", (json.dumps(old, sort_keys=True),))
    conn.close()
    with IndexStore.open_writer(root) as store:
        assert store.embedding_dtype == "float32" and "embedding_dtype" not in store.manifest
        store.write([item(i, vectors[i]) for i in range(20, 30)])
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        keys = [f"/p/{i:04d}.jpg" for i in range(30)]
        assert np.allclose(store.embeddings(keys)[1], unit, rtol=0, atol=1e-7)
        assert store.search(unit[25:26], k=1)[0][0].key == keys[25]
    assert blob_sizes(root) == {DIM * 4}
    assert "embedding_dtype" not in IndexStore.read_manifest(root)


def test_a_dtype_is_checked_before_anything_is_written(tmp_path: Path) -> None:
    with pytest.raises(
        StoreError, match=r"embedding dtype must be one of \['float16', 'float32'\], got 'int8'"
    ):
        IndexStore.create(tmp_path / "index", FP, embedding_dtype="int8")
    assert not (tmp_path / "index").exists()


def test_top10_with_float16_storage_agrees_with_float32(tmp_path: Path) -> None:
    """Clustered unit vectors (CLIP-like: neighbours are close), exact search, 100 near-data queries."""
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((40, DIM)).astype(np.float32)
    data = centres[rng.integers(0, 40, 3000)] + 0.35 * rng.standard_normal((3000, DIM)).astype(np.float32)
    queries = data[rng.choice(3000, 100, replace=False)] + 0.1 * rng.standard_normal((100, DIM))
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    found = {}
    for dtype in ("float16", "float32"):
        with IndexStore.create(tmp_path / dtype, FP, factory="Flat", embedding_dtype=dtype) as store:
            store.write([item(i, data[i]) for i in range(len(data))])
            found[dtype] = [{h.key for h in hits} for hits in store.search(queries, k=10)]
    recall = np.mean([len(a & b) / 10 for a, b in zip(found["float16"], found["float32"], strict=True)])
    assert recall >= 0.99, recall


def test_a_batch_looks_content_and_keys_up_as_sets(tmp_path: Path) -> None:
    """The old writer ran two SELECTs per item (owner of the key, vector of the content); a batch now
    runs a fixed number of statements whatever its size, and keeps the item-by-item semantics."""
    vectors = raw(2, 300)
    with IndexStore.create(tmp_path / "index", FP) as store:
        store.write([item(i, vectors[i]) for i in range(100)])
        selects: list[str] = []
        store._conn().set_trace_callback(
            lambda sql: selects.append(sql) if sql.startswith("SELECT") else None
        )
        batch = [item(i, vectors[i]) for i in range(50, 300)]  # 50 updates, 200 new
        batch += [item(7, vectors[299], sha="sha-299"), item(5, None, sha="sha-6")]  # same content twice
        store.write(batch)
        store._conn().set_trace_callback(None)
        assert len(selects) <= 10, selects
        assert len(store) == 300 and store.stats()["vectors"] == 298  # sha-7 and sha-5 orphaned
        assert store.get("/p/0007.jpg")["vector_id"] == store.get("/p/0299.jpg")["vector_id"]
        assert store.get("/p/0005.jpg")["vector_id"] == store.get("/p/0006.jpg")["vector_id"]
        assert store.vector_for("sha-7") is None and store.vector_for("sha-5") is None
        assert store.search(float16_of(vectors[299:]), k=2)[0][0].duplicates  # one vector, two keys
        tombstones = store._conn().execute("SELECT COUNT(*) FROM removed").fetchone()[0]
        assert tombstones == 2 and store._gen.ann.ntotal == 298


def test_a_key_given_twice_in_a_batch_keeps_its_last_item(tmp_path: Path) -> None:
    vectors = raw(3, 3)
    with IndexStore.create(tmp_path / "index", FP) as store:
        store.write(
            [item(1, vectors[0], sha="a"), item(2, vectors[1], sha="b"), item(1, vectors[2], sha="c")]
        )
        assert store.get("/p/0001.jpg")["sha256"] == "c" and len(store) == 2
        assert store.vector_for("a") is None and store.stats()["vectors"] == 2 == store._gen.ann.ntotal
        with pytest.raises(StoreError, match=r"item '/p/0009.jpg': no embedding given and no stored vector"):
            store.write([item(8, vectors[0], sha="d"), item(9, None, sha="e")])
        assert store.get("/p/0008.jpg") is None  # the whole batch rolled back
        with pytest.raises(StoreError, match=r"finite non-zero vector of dim 32 \(model tiny-clip@abc123\)"):
            store.write([item(8, np.zeros(DIM, np.float32), sha="z")])
