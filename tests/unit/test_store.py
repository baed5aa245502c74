"""IndexStore on real SQLite + FAISS in tmp_path: writes, dedup, filters, failures, locking, readers,
stale snapshots, generations."""

from __future__ import annotations

import json
import threading
import typing
from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import FingerprintMismatch, QueryError, StoreError
from vitrine.index.store import Failure, IndexReader, IndexStore, IndexWriter, NewItem

DIM = 16
FP = {"id": "tiny-clip@abc123", "model": "tiny-clip", "dim": DIM}


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def item(i: int, *, sha: str | None = None, seed: int | None = None, **meta: object) -> NewItem:
    return NewItem(
        key=f"img/{i:03d}.jpg",
        path=f"/photos/{i:03d}.jpg",
        sha256=sha or f"sha-{i}",
        size=100 + i,
        mtime_ns=10**9 + i,
        captions=[f"caption {i}"],
        metadata=dict(meta),
        source="cat",
        embedding=vec(i if seed is None else seed),
    )


def top(store: IndexStore, query: np.ndarray, k: int = 5, **filters: str) -> list:
    return store.search(query, k=k, filters=filters or None)[0]


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "index"


@pytest.fixture()
def store(root: Path):
    with IndexStore.create(root, FP) as s:
        yield s


def test_create_lays_out_the_directory_and_manifest(root: Path) -> None:
    with IndexStore.create(root, FP, factory="HNSW32", search_params={"efSearch": 64}) as s:
        assert s.generation == "gen-000001" and s.dim == DIM and s.fingerprint == FP
        assert (root / "CURRENT").read_text() == "gen-000001"
        assert {p.name for p in (root / "gen-000001").iterdir()} >= {
            "manifest.json",
            "meta.sqlite",
            "index.0.faiss",
        }
    manifest = IndexStore.read_manifest(root)
    assert manifest["format"] == 1 and manifest["metric"] == "ip" and manifest["fingerprint"] == FP
    assert manifest["factory"] == "HNSW32" and manifest["search_params"] == {"efSearch": 64}
    assert manifest["generation"] == "gen-000001" and manifest["created"]
    assert IndexStore.exists(root) and not IndexStore.exists(root.parent / "nothing")
    with pytest.raises(StoreError, match="already exists"):
        IndexStore.create(root, FP)
    with pytest.raises(StoreError, match="no Vitrine index"):
        IndexStore.open(root.parent / "nothing")
    with pytest.raises(StoreError, match="factory"):
        IndexStore.create(root.parent / "other", FP, factory="Nonsense7")
    with pytest.raises(StoreError, match="dim"):
        IndexStore.create(root.parent / "other", {"id": "x"})


def test_a_damaged_directory_gives_store_errors(root: Path) -> None:
    IndexStore.create(root, FP).close()
    gen = root / "gen-000001"
    (gen / "meta.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"meta\.sqlite"):
        IndexStore.open(root)
    (gen / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="manifest"):
        IndexStore.open(root)
    (root / "CURRENT").write_text("../../etc")
    with pytest.raises(StoreError, match="CURRENT"):
        IndexStore.open(root)
    assert IndexStore.exists(root)  # damaged is not absent: nothing may start a new index over it


def test_write_then_search_returns_the_item_first(store: IndexStore) -> None:
    seq = store.write([item(i, color="red") for i in range(40)])
    assert seq == store.seq == 1 and len(store) == 40
    for i in (0, 17, 39):
        hit = top(store, vec(i))[0]
        # float16 storage (the default): the stored vector is the rounding of vec(i), so not exactly 1
        assert hit.key == f"img/{i:03d}.jpg" and hit.score == pytest.approx(1.0, abs=1e-3)
        assert hit.model == FP["id"] and hit.generation == "gen-000001" and hit.duplicates == []
        assert hit.captions == [f"caption {i}"] and hit.metadata == {"color": "red"}
        assert json.loads(json.dumps(hit.to_dict())) == hit.to_dict()
        assert set(hit.to_dict()) == {
            "key",
            "path",
            "score",
            "captions",
            "metadata",
            "model",  # deprecated name of model_version (README)
            "model_version",
            "generation",
            "duplicates",
        }
    many = store.search(np.stack([vec(1), vec(2)]), k=100)
    assert len(many) == 2 and len(many[0]) == 40  # k above the item count is fine
    assert store.get("img/001.jpg")["size"] == 101 and store.get("nope") is None


def test_upsert_by_key_replaces_the_vector(store: IndexStore) -> None:
    store.write([item(1)])
    store.write([item(1, sha="sha-new", seed=999)])
    assert len(store) == 1 and store.stats()["vectors"] == 1 and store.vector_for("sha-1") is None
    assert top(store, vec(999))[0].score == pytest.approx(1.0, abs=1e-4)
    assert top(store, vec(1))[0].score < 0.99
    assert store.get("img/001.jpg")["sha256"] == "sha-new"


def test_identical_content_is_stored_once_and_listed_as_duplicates(store: IndexStore) -> None:
    store.write([item(2, sha="same"), item(1, sha="same")])
    copy = item(3, sha="same")
    copy.embedding = None  # reuse the stored vector
    store.write([copy])
    assert len(store) == 3 and store.stats()["vectors"] == 1 and store.vector_for("same") is not None
    hits = top(store, vec(2))
    assert len(hits) == 1 and hits[0].key == "img/001.jpg"
    assert hits[0].duplicates == ["img/002.jpg", "img/003.jpg"]
    store.write(remove_keys=["img/001.jpg", "img/003.jpg"])
    assert [(h.key, h.duplicates) for h in top(store, vec(2))] == [("img/002.jpg", [])]
    store.write(remove_keys=["img/002.jpg", "never-there"])
    assert len(store) == 0 and store.stats()["vectors"] == 0 and top(store, vec(2)) == []
    orphan = item(9, sha="unknown")
    orphan.embedding = None
    with pytest.raises(StoreError, match="no stored vector"):
        store.write([orphan])
    with pytest.raises(StoreError, match="dim"):
        store.write([NewItem("k", "p", "s", 1, 1, embedding=np.ones(DIM + 1))])
    assert len(store) == 0  # a failed batch leaves nothing behind


def test_failures_are_recorded_and_cleared_by_a_later_success(store: IndexStore) -> None:
    store.write(failures=[Failure("img/001.jpg", "/photos/001.jpg", "truncated JPEG", "cat")])
    store.write(failures=[Failure("img/002.jpg", "/photos/002.jpg", "not an image")])
    assert [f["key"] for f in store.failures()] == ["img/002.jpg", "img/001.jpg"]
    assert store.failures()[1]["reason"] == "truncated JPEG" and store.stats()["failed"] == 2
    store.write([item(1)])
    assert [f["key"] for f in store.failures()] == ["img/002.jpg"]
    store.write(remove_keys=["img/002.jpg"])
    assert store.failures() == []


def test_filters_match_metadata_as_strings(store: IndexStore) -> None:
    store.write([item(i, color="red" if i % 2 else "blue", year=2020 + i % 3) for i in range(30)])
    red = top(store, vec(4), k=10, color="red")
    assert len(red) == 10 and all(h.metadata["color"] == "red" for h in red)
    both = top(store, vec(4), k=30, color="blue", year="2021")
    assert both and all(h.metadata == {"color": "blue", "year": 2021} for h in both)
    assert len(both) == sum(1 for i in range(30) if i % 2 == 0 and i % 3 == 1) < 30  # fewer than k
    assert top(store, vec(4), color="green") == []
    with pytest.raises(QueryError, match=r"unknown filter field.*shape.*known fields.*color.*year"):
        top(store, vec(4), shape="round")
    assert store.metadata_fields() == {"color": ["blue", "red"], "year": ["2020", "2021", "2022"]}


def test_filtered_search_on_an_approximate_index_is_exact(root: Path) -> None:
    with IndexStore.create(root, FP, factory="HNSW32") as s:
        s.write([item(i, group=str(i % 7)) for i in range(300)])
        keys, emb = s.embeddings()
        wanted = [k for k in keys if s.get(k)["metadata"]["group"] == "3"]
        sims = emb[[keys.index(k) for k in wanted]] @ vec(1234)
        expected = [wanted[j] for j in np.argsort(-sims)[:5]]
        assert [h.key for h in top(s, vec(1234), group="3")] == expected


def test_bad_queries_are_refused(store: IndexStore) -> None:
    store.write([item(1)])
    not_finite = "queries must be finite, non-zero vectors"
    bad_queries = [(np.ones(DIM + 1), "queries must have shape"), (np.zeros(DIM), not_finite)]
    for bad, reason in [*bad_queries, (np.full(DIM, np.nan), not_finite)]:
        with pytest.raises(QueryError, match=reason):
            store.search(bad)
    with pytest.raises(QueryError, match="k must be"):
        store.search(vec(1), k=0)


def test_fingerprint_mismatch_names_both_models(store: IndexStore, root: Path) -> None:
    other = {"id": "other-model@def456", "dim": DIM}
    with pytest.raises(FingerprintMismatch) as err:
        IndexStore.open(root, expected_fingerprint=other)
    assert FP["id"] in str(err.value) and other["id"] in str(err.value)
    IndexStore.open(root, expected_fingerprint=dict(FP)).close()


def test_a_second_writer_is_refused(store: IndexStore, root: Path) -> None:
    with pytest.raises(StoreError, match="being written by another process"):
        IndexStore.open(root, writable=True)
    reader = IndexStore.open(root)
    assert type(reader) is IndexReader and isinstance(store, IndexWriter)
    reader.close()
    store.close()
    IndexStore.open(root, writable=True).close()
    IndexStore.open_writer(root).close()


WRITER_ONLY = {"write", "flush", "restore", "record_catalog", "publish"}


def test_readers_have_no_writing_methods_and_the_constructors_say_which_type() -> None:
    """Misuse fails where it is written: a reader type has no method that changes the index, and every
    constructor's annotation names the type it returns (what a type checker and a reader of code see)."""
    assert set(dir(IndexWriter)) >= WRITER_ONLY and not WRITER_ONLY & set(dir(IndexReader))
    assert issubclass(IndexWriter, IndexReader)  # a writer searches and reads like a reader
    returns = {
        name: typing.get_type_hints(getattr(IndexStore, name))["return"]
        for name in ("open", "open_writer", "create", "create_generation")
    }
    assert returns == {
        "open": IndexReader,
        "open_writer": IndexWriter,
        "create": IndexWriter,
        "create_generation": IndexWriter,
    }
    opens = typing.get_overloads(IndexStore.open)
    assert [typing.get_type_hints(o)["return"] for o in opens] == [IndexReader, IndexWriter]


def test_a_closed_writer_refuses_writes(root: Path) -> None:
    writer = IndexStore.create(root, FP)
    writer.close()
    with pytest.raises(StoreError, match="closed; it cannot be changed"):
        writer.write([item(1)])


def test_a_reader_sees_the_writers_commits_after_refresh(store: IndexStore, root: Path) -> None:
    store.write([item(i) for i in range(10)])
    store.flush()
    reader = IndexStore.open(root)
    assert len(reader) == 10 and not reader.refresh()
    store.write([item(i) for i in range(10, 15)], remove_keys=["img/000.jpg"])
    store.write([item(1, sha="changed", seed=77)])
    assert top(reader, vec(12))[0].key != "img/012.jpg"  # not in the reader's FAISS yet
    assert reader.refresh() and not reader.refresh()
    assert reader.seq == store.seq and len(reader) == 14
    assert top(reader, vec(12))[0].key == "img/012.jpg"
    assert top(reader, vec(77))[0].key == "img/001.jpg"
    assert all(h.key != "img/000.jpg" for h in top(reader, vec(0), k=20))
    assert reader.stats()["indexed"] == store.stats()["vectors"] == 14
    reader.close()


def test_a_stale_or_missing_snapshot_is_caught_up_exactly(root: Path) -> None:
    s = IndexStore.create(root, FP)
    s.write([item(i) for i in range(20)])
    s.flush()
    s.write([item(i) for i in range(20, 30)], remove_keys=["img/003.jpg"])
    s.write([item(5, sha="five-b", seed=55)])
    expected = {k: v for k, v in s.item_states().items()}
    s.close(flush=False)  # as if killed between the SQLite commit and the FAISS save
    gen = root / "gen-000001"
    assert [p.name for p in gen.glob("index.*.faiss")] == ["index.1.faiss"]

    def check() -> None:
        with IndexStore.open(root) as r:
            assert r.item_states() == expected and r.stats()["indexed"] == r.stats()["vectors"] == 29
            for i in (0, 7, 25):
                assert top(r, vec(i))[0].key == f"img/{i:03d}.jpg"
            assert top(r, vec(55))[0].key == "img/005.jpg"
            assert all(h.key != "img/003.jpg" for h in top(r, vec(3), k=30))

    check()
    (gen / "index.3.faiss").write_bytes(b"garbage")  # unreadable newest snapshot: falls back
    (gen / "index.99.faiss").write_bytes(b"from the future")  # beyond the committed seq: ignored
    check()
    for snap in gen.glob("index.*.faiss"):
        snap.unlink()
    check()
    with IndexStore.open(root, writable=True) as w:
        assert w.stats()["snapshot_seq"] is None
    assert [p.name for p in gen.glob("index.*.faiss")] == ["index.3.faiss"]  # close() flushed
    check()


def test_stats_and_bookkeeping(store: IndexStore) -> None:
    store.write([item(i) for i in range(5)])
    store.record_catalog("cat", {"kind": "folder", "path": "/photos"})
    assert store.catalogs() == {"cat": {"kind": "folder", "path": "/photos"}}
    stats = store.stats()
    assert stats["count"] == stats["vectors"] == stats["indexed"] == 5 and stats["failed"] == 0
    assert stats["factory"] is None and stats["effective_factory"] == "Flat" and stats["seq"] == 2
    assert stats["generation"] == "gen-000001" and stats["model"] == FP["id"]
    assert stats["memory_bytes"] > 0 and stats["bytes_per_vector"] >= 4 * DIM
    assert store.keys("cat") == {f"img/{i:03d}.jpg" for i in range(5)} and store.keys("x") == set()
    assert store.item_states("cat")["img/002.jpg"] == (102, 10**9 + 2, "sha-2")
    keys, emb = store.embeddings(["img/004.jpg", "missing", "img/001.jpg"])
    stored = np.stack([vec(4), vec(1)]).astype(np.float16).astype(np.float32)  # float16 storage, exactly
    assert keys == ["img/004.jpg", "img/001.jpg"] and emb.dtype == np.float32 and np.array_equal(emb, stored)
    assert store.embeddings()[1].shape == (5, DIM)


def test_flush_retrains_once_enough_data_exists(root: Path) -> None:
    with IndexStore.create(root, FP, factory="IVF4,SQ8") as s:
        s.write([item(i) for i in range(100)])
        s.flush()
        assert s.stats()["effective_factory"] == "Flat" and "IVF4,SQ8" in s.stats()["fallback_reason"]
        s.write([item(i) for i in range(100, 200)])
        s.flush()
        assert s.stats()["effective_factory"] == "IVF4,SQ8"
    with IndexStore.open(root) as r:
        assert r.stats()["effective_factory"] == "IVF4,SQ8" and r.stats()["snapshot_seq"] == 2
        assert top(r, vec(150))[0].key == "img/150.jpg"


def test_a_published_generation_reaches_readers(store: IndexStore, root: Path) -> None:
    store.write([item(i) for i in range(5)])
    store.close()
    reader = IndexStore.open(root, expected_fingerprint=FP)
    with IndexStore.create_generation(root, FP) as new:
        new.write([item(i) for i in range(100, 103)])
        assert not reader.refresh()  # not published yet
        new.publish()
    assert reader.refresh() and reader.generation == "gen-000002" and len(reader) == 3
    assert top(reader, vec(101))[0].generation == "gen-000002"
    with IndexStore.create_generation(root, {"id": "new-model", "dim": DIM}) as newer:
        newer.publish()
    with pytest.raises(FingerprintMismatch, match="index was built with a different model/preprocessing"):
        reader.refresh()
    assert reader.generation == "gen-000002" and len(reader) == 3  # keeps serving the old one
    assert sorted(p.name for p in root.glob("gen-*")) == ["gen-000002", "gen-000003"]
    reader.close()


def test_searches_from_threads_while_writing_and_refreshing(store: IndexStore, root: Path) -> None:
    store.write([item(i) for i in range(50)])
    reader = IndexStore.open(root)
    errors: list[BaseException] = []

    def search_loop(target: IndexStore) -> None:
        try:
            for i in range(60):
                assert top(target, vec(i % 50))[0].key == f"img/{i % 50:03d}.jpg"
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=search_loop, args=(t,)) for t in (store, store, reader, reader)]
    for t in threads:
        t.start()
    for batch in range(10):
        store.write([item(i) for i in range(100 + batch * 5, 105 + batch * 5)])
        reader.refresh()
    for t in threads:
        t.join()
    assert errors == []
    reader.refresh()
    assert len(reader) == 100
    reader.close()
