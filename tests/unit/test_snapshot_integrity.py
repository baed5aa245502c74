"""Damaged FAISS snapshots are noticed (checksum, SQLite sample), rebuilt from SQLite, never served or
saved again; real FAISS and SQLite in tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import IndexDamaged
from vitrine.index import generations, snapshots
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
    assert snapshots.sum_path(good).read_text() == snapshots.digest(good)
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
