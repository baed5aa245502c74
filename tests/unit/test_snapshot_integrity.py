"""Damaged FAISS snapshots are noticed (checksum, SQLite sample), rebuilt from SQLite, never served or
saved again; real FAISS and SQLite in tmp_path."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import IndexDamaged
from vitrine.index import ann, embeddings, generations, snapshots
from vitrine.index.store import IndexStore, NewItem

DIM = 16
FP = {"id": "tiny@1", "model": "tiny", "dim": DIM}


def vectors(n: int) -> np.ndarray:
    v = np.random.default_rng(7).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(root: Path, n: int = 300) -> np.ndarray:
    vecs = vectors(n)
    with IndexStore.create(root, FP) as store:
        store.write([NewItem(f"k{i:04d}", f"/p/{i}", f"sha{i}", 1, 1, embedding=vecs[i]) for i in range(n)])
    return vecs


def snapshot(root: Path) -> Path:
    return snapshots.snapshots(root / "gen-000001")[0][1]


def all_find_themselves(store: IndexStore, vecs: np.ndarray) -> bool:
    hits = store.search(vecs, k=1)
    return [h[0].key for h in hits] == [f"k{i:04d}" for i in range(len(vecs))]


def garble(path: Path, start: float, length: int) -> None:
    data = bytearray(path.read_bytes())
    at = int(len(data) * start)
    data[at : at + length] = bytes(b ^ 0x5A for b in data[at : at + length])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate", "flip-without-checksum"])
def test_a_damaged_snapshot_is_rebuilt_from_sqlite_and_replaced(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "index"
    vecs = build(root)
    snap = snapshot(root)
    if damage == "truncate":
        snap.write_bytes(snap.read_bytes()[: snap.stat().st_size // 2])
    elif damage == "flip":
        garble(snap, 0.5, 64)
    else:  # a snapshot written before checksums existed: the SQLite sample must catch it
        snapshots.sum_path(snap).unlink()
        garble(snap, 0.1, int(snap.stat().st_size * 0.6))
    with IndexStore.open(root) as reader:
        assert reader.snapshot_damage and reader.stats()["snapshot_seq"] is None, reader.snapshot_damage
        assert all_find_themselves(reader, vecs)  # served from the rebuild, never from the bad bytes
    if damage == "flip":
        assert "checksum" in IndexStore.open(root).snapshot_damage[0]
    with IndexStore.open(root, writable=True) as writer:  # the writer's flush replaces the bad file
        assert writer.snapshot_damage
    good = snapshot(root)
    assert snapshots.Record.read(snapshots.sum_path(good)) == snapshots.Record.of(good)
    with IndexStore.open(root) as reader:
        assert reader.snapshot_damage == [] and reader.stats()["snapshot_seq"] is not None
        assert all_find_themselves(reader, vecs)


def test_a_good_snapshot_passes_both_checks_and_is_used(tmp_path: Path) -> None:
    root = tmp_path / "index"
    vecs = build(root)
    with IndexStore.open(root) as reader:
        assert reader.snapshot_damage == [] and reader.stats()["snapshot_seq"] == 1
        assert all_find_themselves(reader, vecs)


def test_pruning_keeps_what_history_names_and_generations_holding_items(tmp_path: Path) -> None:
    root = tmp_path / "index"
    build(root, 20)
    (root / "CURRENT").unlink()  # the lost CURRENT of issue 11: the old code pruned gen-000001 here
    (root / "HISTORY").write_text("garbage\n")
    with pytest.raises(IndexDamaged, match="CURRENT is missing") as err:
        IndexStore.create(root, FP)
    assert "indexer repair" in str(err.value)
    generations.publish(root, "gen-000001")  # even a direct publish of another name deletes nothing
    assert (root / "gen-000001" / "meta.sqlite").is_file()
    new = IndexStore.create_generation(root, FP)
    try:
        new.publish()
    finally:
        new.close()
    assert sorted(p.name for p in root.glob("gen-*")) == ["gen-000001", "gen-000002"]


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc/self/io)."""
    return int(
        next(ln for ln in Path("/proc/self/io").read_text().splitlines() if ln.startswith("rchar")).split()[1]
    )


@pytest.mark.skipif(
    not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io to count bytes read"
)
def test_a_reader_opens_a_large_snapshot_without_reading_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mapped snapshot is checked by its recorded size and mtime: the old open hashed every byte
    (gigabytes at 10M vectors) before answering anything."""
    root, n, dim = tmp_path / "index", 4000, 512
    vecs = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    with IndexStore.create(root, {"id": "big@1", "model": "big", "dim": dim}, factory="Flat") as store:
        store.write(
            [NewItem(f"k{i:05d}", f"/p/{i}", f"sha{i}", 1, 1, embedding=v) for i, v in enumerate(vecs)]
        )
    size = snapshot(root).stat().st_size
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 0)  # readers map it, as they do past 256 MiB
    before = _rchar()
    with IndexStore.open(root) as reader:
        read = _rchar() - before
        assert reader.snapshot_damage == [] and reader._gen.ann.mapped
        assert (
            reader.search(vecs[:3] / np.linalg.norm(vecs[:3], axis=1, keepdims=True), k=1)[0][0].key
            == "k00000"
        )
    assert read < size // 4, f"opening read {read} bytes of a {size}-byte snapshot"


def _garble_unsampled_vector_keeping_mtime(root: Path, dim: int = DIM) -> str:
    """Overwrite one stored vector in place, bytes found by value, then put size and mtime back as they
    were (media damage, or a tool that restores times); the vector is one the SQLite sample skips."""
    db = sqlite3.connect(root / "gen-000001" / "meta.sqlite")
    try:
        (blob,) = db.execute("SELECT embedding FROM vectors WHERE id = 5").fetchone()
        (key,) = db.execute("SELECT key FROM items WHERE vector_id = 5").fetchone()
    finally:
        db.close()
    vector = embeddings.decode([blob], dim)[0]  # SQLite's row (float16 or 32) as FAISS holds it: float32
    wanted = vector.tobytes()
    snap = snapshot(root)
    st, data = snap.stat(), bytearray(snap.read_bytes())
    at = data.find(wanted)
    assert at > 0 and data.count(wanted) == 1
    data[at : at + len(wanted)] = (-vector).tobytes()  # the vector, pointing away
    with open(snap, "r+b") as fh:
        fh.write(data)
    os.utime(snap, ns=(st.st_atime_ns, st.st_mtime_ns))
    return key


@pytest.mark.parametrize("mapped", [True, False])
def test_damage_keeping_size_and_mtime_is_caught_lazily_and_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mapped: bool
) -> None:
    root = tmp_path / "index"
    vecs = build(root)
    assert 5 not in np.linspace(1, 300, snapshots.SAMPLE).astype(int)  # vector 5 is not in the sample
    key = _garble_unsampled_vector_keeping_mtime(root)
    monkeypatch.setattr(ann, "MMAP_MIN_BYTES", 0 if mapped else 1 << 40)
    with IndexStore.open(root) as reader:
        assert reader.snapshot_damage == []  # trusted at open: same size and mtime as when hashed
        assert reader.search(vecs[4], k=1)[0][0].key != key  # ... and the damaged vector is served
        problem = reader.verify_snapshot()
        assert problem is not None and "does not match its recorded checksum" in problem
        assert "checksum" in reader.snapshot_damage[0] and reader.stats()["snapshot_seq"] is None
        assert all_find_themselves(reader, vecs)  # now served from the rebuild out of SQLite
        assert reader.verify_snapshot() is None  # once per loaded snapshot
    with IndexStore.open(root, writable=True) as writer:  # a writer hashes at open and replaces it
        assert writer.snapshot_damage and "checksum" in writer.snapshot_damage[0]
    with IndexStore.open(root) as reader:
        assert reader.snapshot_damage == [] and reader.verify_snapshot() is None
        assert all_find_themselves(reader, vecs)


def test_a_copy_with_new_mtimes_is_hashed_and_accepted(tmp_path: Path) -> None:
    root = tmp_path / "index"
    vecs = build(root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, copy_function=shutil.copyfile)  # contents only: every mtime is new
    assert snapshot(copy).stat().st_mtime_ns != snapshot(root).stat().st_mtime_ns
    with IndexStore.open(copy) as reader:
        assert reader.snapshot_damage == [] and reader.stats()["snapshot_seq"] == 1
        assert all_find_themselves(reader, vecs)
