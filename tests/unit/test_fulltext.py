"""Full-text index and lexical/hybrid search on a real store (SQLite FTS5 + FAISS), synthetic vectors:
kept in step by triggers, escaping, product codes, column weights, filters, RRF, pages, migration."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import QueryError
from vitrine.index import fulltext
from vitrine.index.store import IndexStore, NewItem
from vitrine.search import hybrid

DIM = 16
FP = {"id": "tiny@1", "model": "tiny", "dim": DIM}


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def item(i: int, captions: list[str], *, name: str | None = None, sha: str | None = None, **meta) -> NewItem:
    return NewItem(
        key=f"k{i:03d}",
        path=f"/photos/{name or f'img_{i:03d}.jpg'}",
        sha256=sha or f"sha-{i}",
        size=1,
        mtime_ns=1,
        captions=captions,
        metadata=meta,
        embedding=vec(i),
    )


CATALOG = [
    item(0, ["a red dress on a hanger"], color="red", sku="SKU-4471-B"),
    item(1, ["a blue shirt folded"], color="blue", sku="SKU-4472-A"),
    item(2, ["a café table with cups"], color="brown", sku="TB-100"),
    item(3, ["two dogs running in snow"], color="white", sku="DG-7"),
    item(4, ["a black cat asleep"], name="holiday_dress.jpg", color="black", sku="CT-1"),
]


@pytest.fixture()
def store(tmp_path: Path):
    with IndexStore.create(tmp_path / "index", FP) as s:
        s.write(CATALOG)
        yield s


def keys(hits) -> list[str]:
    return [h.key for h in hits]


def fts_rows(store: IndexStore) -> dict[int, tuple]:
    return {r[0]: r[1:] for r in store._conn().execute("SELECT rowid, * FROM items_fts")}


def test_triggers_keep_the_table_in_step_with_writes_updates_and_removals(store):
    rows = fts_rows(store)
    assert len(rows) == 5
    assert ("a red dress on a hanger", "red SKU-4471-B", "img_000.jpg") in rows.values()
    store.write([item(0, ["a green coat"], color="green", sku="SKU-9")])  # upsert by key: an UPDATE
    assert keys(hybrid.lexical(store, "coat")) == ["k000"]
    assert hybrid.lexical(store, "hanger") == [] and len(fts_rows(store)) == 5
    store.write(remove_keys=["k000"], exclude=["/photos/img_000.jpg"])  # a takedown
    assert hybrid.lexical(store, "coat") == [] and hybrid.lexical(store, "SKU-9") == []
    assert len(fts_rows(store)) == 4


def test_product_codes_whole_partial_and_diacritics(store):
    assert keys(hybrid.lexical(store, "SKU-4471-B")) == ["k000"]
    assert keys(hybrid.lexical(store, "sku-4471-b")) == ["k000"]
    assert sorted(keys(hybrid.lexical(store, "SKU-447"))) == ["k000", "k001"]  # partial code: a prefix
    assert keys(hybrid.lexical(store, "4472")) == ["k001"]
    assert keys(hybrid.lexical(store, "cafe")) == ["k002"]  # remove_diacritics 2
    assert keys(hybrid.lexical(store, "CAFÉ")) == ["k002"]
    assert keys(hybrid.lexical(store, "dog")) == ["k003"]  # prefix: dogs


def test_caption_outranks_file_name(store):
    hits = hybrid.lexical(store, "dress")  # k000's caption, k004's file name
    assert keys(hits) == ["k000", "k004"]
    assert hits[0].lexical_score > hits[1].lexical_score > 0 and hits[0].vector_score is None
    assert hits[0].score == hits[0].lexical_score


@pytest.mark.parametrize(
    "text",
    [
        '"',
        'red "dress',
        "*",
        "dress*",
        "NEAR(red dress)",
        "red AND",
        "AND",
        "OR NOT",
        "-red",
        "- -",
        "color:red",
        "captions:red",
        "(red",
        "red)",
        "()",
        "{red}",
        "^red",
        "+",
        "red\x00dress",
        "\x00",
        "👗 dress",
        "ドレス",
        "'; DROP TABLE items; --",
        "a" * 1000,
        " ".join(["red"] * 500),
    ],
)
def test_fts_syntax_in_a_query_is_never_an_error(store, text):
    hits = hybrid.lexical(store, text)
    assert all(isinstance(h.lexical_score, float) for h in hits)
    hybrid.search(store, vec(0), text, k=3)
    assert len(store) == 5


def test_operators_are_searched_as_words(store):
    for text in ("NEAR( red", "-red", "red AND", "(red)", "red*", "file_name: red", "red OR"):
        assert keys(hybrid.lexical(store, text)) == ["k000"], text  # no operator, filter or negation
    assert keys(hybrid.lexical(store, "file_name:img_004")) == []  # a phrase "file name img 004"
    assert fulltext.match_expression("- * ()") is None
    assert fulltext.match_expression('hi "you"') == '"hi" OR """you""" OR """you"""*'


def test_filters_apply_to_the_lexical_side(store):
    assert keys(hybrid.lexical(store, "a", filters={"color": "blue"})) == ["k001"]
    assert keys(hybrid.search(store, vec(0), "red dress", filters={"color": "blue"})) == ["k001"]
    with pytest.raises(QueryError, match=r"unknown filter field\(s\) size"):
        hybrid.lexical(store, "red", filters={"size": "M"})


def test_rrf_matches_a_hand_computation():
    fused = hybrid.rrf([["a", "b", "c"], ["c", "d"]], rrf_k=60)
    expected = {
        "c": 1 / 63 + 1 / 61,
        "a": 1 / 61,
        "d": 1 / 62,
        "b": 1 / 62,
    }
    assert list(fused) == ["c", "a", "b", "d"]  # b and d tie: by key
    assert fused == pytest.approx(expected)
    weighted = hybrid.rrf([["a", "b"], ["b"]], rrf_k=1, weights=[1.0, 0.5])
    assert weighted == pytest.approx({"b": 1 / 3 + 0.5 / 2, "a": 1 / 2})
    with pytest.raises(QueryError, match="rrf_k must be a positive integer"):
        hybrid.rrf([["a"]], rrf_k=0)


def test_hybrid_scores_each_side_and_fuses_by_rank(store):
    hits = hybrid.search(store, vec(3), "SKU-4471-B", k=5)
    by_key = {h.key: h for h in hits}
    vector_rank = keys(store.search(vec(3), k=5)[0])
    assert vector_rank[0] == "k003" and vector_rank.index("k000") > 0
    code = by_key["k000"]  # ranked 1st lexically
    assert code.lexical_score > 0 and code.vector_score is not None
    assert code.score == pytest.approx(1 / 61 + 1 / (61 + vector_rank.index("k000")))
    # abs: the stored vector is vec(3) rounded to float16 (the default storage)
    assert by_key["k003"].lexical_score is None
    assert by_key["k003"].vector_score == pytest.approx(1.0, abs=1e-3)
    assert set(keys(hits[:2])) == {"k000", "k003"}


def test_pages_concatenate_to_the_top_k(store):
    whole = keys(hybrid.search(store, vec(1), "a dress", k=5))
    pages = [keys(hybrid.search(store, vec(1), "a dress", k=2, offset=o)) for o in (0, 2, 4)]
    assert [key for page in pages for key in page] == whole
    assert keys(hybrid.lexical(store, "a", k=2, offset=1)) == keys(hybrid.lexical(store, "a", k=5))[1:3]
    with pytest.raises(QueryError, match="offset must be an integer >= 0"):
        hybrid.lexical(store, "a", offset=-1)


def test_identical_content_is_one_hit_on_both_sides(tmp_path):
    with IndexStore.create(tmp_path / "index", FP) as s:
        s.write([item(7, ["twin photo"], sha="same"), item(8, ["twin copy"], sha="same")])
        hits = hybrid.search(s, vec(7), "twin", k=5)
        assert keys(hits) == ["k007"] and hits[0].duplicates == ["k008"]
        assert hits[0].vector_score is not None and hits[0].lexical_score is not None


def make_old_index(root: Path) -> None:
    """An index as made before full-text search: no items_fts, no triggers, no state row."""
    with IndexStore.create(root, FP) as s:
        s.write(CATALOG)
    conn = sqlite3.connect(root / "gen-000001" / "meta.sqlite")
    for name in ("insert", "update", "delete"):
        conn.execute(f"DROP TRIGGER items_fts_{name}")
    conn.execute("DROP TABLE items_fts")
    conn.execute("DELETE FROM state WHERE name = 'fulltext'")
    conn.commit()
    conn.close()


def test_an_old_index_is_refused_by_readers_and_migrated_by_the_first_writer(tmp_path):
    root = tmp_path / "index"
    make_old_index(root)
    with IndexStore.open(root) as reader:
        with pytest.raises(QueryError, match=r"has no full-text index .* open it once for writing") as err:
            hybrid.lexical(reader, "dress")
        assert err.value.reason == "lexical_unavailable"
        assert keys(reader.search(vec(0), k=1)[0]) == ["k000"]  # vector search unaffected
    with IndexStore.open(root, writable=True) as writer:
        assert keys(hybrid.lexical(writer, "SKU-4471-B")) == ["k000"]
        writer.write([item(9, ["a yellow umbrella"])])
    with IndexStore.open(root) as reader:
        assert keys(hybrid.lexical(reader, "umbrella")) == ["k009"]
        assert keys(hybrid.lexical(reader, "dress")) == ["k000", "k004"]
