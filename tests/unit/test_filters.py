"""The filter language, pages, the relevance cutoff and sorting, on a real store (SQLite + FAISS)."""

from __future__ import annotations

from itertools import chain
from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import QueryError
from vitrine.index import searching
from vitrine.index.filters import cli_filter_object, parse_filter, to_sql
from vitrine.index.store import IndexStore, IndexWriter, NewItem

DIM = 16
FP = {"id": "tiny@filters", "dim": DIM}
COLORS = ("red", "green", "blue")


def vec(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def item(i: int, **meta: object) -> NewItem:
    return NewItem(f"k{i:04d}", f"/p/{i}.jpg", f"sha{i}", 1, 1, [f"c{i}"], dict(meta), "cat", vec(i))


def catalog_item(i: int) -> NewItem:
    meta: dict = {"color": COLORS[i % 3], "price": i * 1.5, "year": 2000 + i % 25, "sale": i % 2 == 0}
    meta["date"] = f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}"
    if i % 5:
        meta["brand"] = f"b{i % 4}"
    return item(i, **meta)


@pytest.fixture()
def store(tmp_path: Path):
    with IndexStore.create(tmp_path / "index", FP) as s:
        s.write([catalog_item(i) for i in range(120)])
        yield s


def keys(store: IndexWriter, query: np.ndarray, k: int = 200, **kwargs: object) -> list[str]:
    return [h.key for h in store.search(query, k, **kwargs)[0]]


def matching(store: IndexWriter, predicate) -> set[str]:
    return {key for key in sorted(store.keys()) if predicate(store.get(key)["metadata"])}


def test_the_schema_is_inferred_from_typed_values(store: IndexWriter) -> None:
    schema = {name: info.to_dict() for name, info in store.schema().items()}
    assert schema["price"] == {"type": "number", "count": 120, "min": 0.0, "max": 178.5}
    assert schema["year"] == {"type": "number", "count": 120, "min": 2000, "max": 2024}
    assert schema["sale"] == {"type": "boolean", "count": 120}
    assert schema["color"] == {"type": "string", "count": 120}
    assert schema["brand"]["count"] == 96 and schema["brand"]["type"] == "string"
    assert schema["date"]["type"] == "date" and schema["date"]["min"].startswith("2024-01-01")


def test_operators_select_exactly_the_matching_items(store: IndexWriter) -> None:
    q = vec(999)
    cases = [
        ({"color": "red"}, lambda m: m["color"] == "red"),
        ({"price": {"$lt": 30}}, lambda m: m["price"] < 30),
        ({"price": {"$gte": 30, "$lte": 60}}, lambda m: 30 <= m["price"] <= 60),
        ({"year": {"$ne": 2003}}, lambda m: m["year"] != 2003),
        ({"color": {"$in": ["red", "blue"]}}, lambda m: m["color"] in ("red", "blue")),
        ({"color": {"$nin": ["red", "blue"]}}, lambda m: m["color"] == "green"),
        ({"brand": {"$exists": False}}, lambda m: "brand" not in m),
        ({"brand": {"$nin": ["b1"]}}, lambda m: m.get("brand") != "b1"),  # also items without brand
        ({"sale": True}, lambda m: m["sale"] is True),
        ({"date": {"$gt": "2024-06-15"}}, lambda m: m["date"] > "2024-06-15"),
        ({"date": {"$lt": "2024-03-01T00:00:00+00:00"}}, lambda m: m["date"] < "2024-03-01"),
        (
            {"$or": [{"color": "red"}, {"price": {"$gt": 150}}]},
            lambda m: m["color"] == "red" or m["price"] > 150,
        ),
        (
            {"$and": [{"sale": False}, {"$or": [{"year": {"$in": [2001, 2003]}}, {"brand": "b2"}]}]},
            lambda m: not m["sale"] and (m["year"] in (2001, 2003) or m.get("brand") == "b2"),
        ),
        ({"year": "2021"}, lambda m: m["year"] == 2021),  # the old string form still matches numbers
        ({"color": {"$in": []}}, lambda m: False),
    ]
    for filters, predicate in cases:
        assert set(keys(store, q, filters=filters)) == matching(store, predicate), filters


def test_the_old_key_value_form_and_json_objects_still_parse() -> None:
    assert cli_filter_object(["color=red", "a=b=c"]) == {"$and": [{"color": "red"}, {"a": "b=c"}]}
    assert cli_filter_object(['{"price": {"$lt": 5}}']) == {"price": {"$lt": 5}}
    assert cli_filter_object([]) == {}
    with pytest.raises(QueryError, match="not of the form key=value"):
        cli_filter_object(["color"])
    with pytest.raises(QueryError, match="not valid JSON"):
        cli_filter_object(["{nope"])


def test_bad_filters_name_the_known_fields(store: IndexWriter) -> None:
    schema = store.schema()
    bad = [
        ({"shape": "round"}, r"unknown filter field\(s\) shape; known fields: brand \(string\), color"),
        ({"price": {"$lt": "cheap"}}, r"'price' holds number values.*known fields: .*price \(number\)"),
        ({"sale": {"$gt": True}}, r"'sale' holds boolean values"),
        ({"date": {"$gt": "last year"}}, r"'date' holds date values"),
        ({"color": {"$lt": 5}}, r"'color' holds string values"),
        ({"price": {"$near": 3}}, r"unknown filter operator '\$near'.*known"),
        ({"price": {"$in": 3}}, r"\$in takes a list"),
        ({"brand": {"$exists": "yes"}}, r"\$exists takes true or false"),
        ({"$or": []}, r"\$or takes a non-empty list"),
        ({"$not": {"color": "red"}}, r"unknown filter operator '\$not'"),
    ]
    for filters, reason in bad:
        with pytest.raises(QueryError, match=reason):
            parse_filter(filters, schema)
        with pytest.raises(QueryError, match=reason):
            store.search(vec(1), 5, filters=filters)
    deep: dict = {"color": "red"}
    for _ in range(6):
        deep = {"$and": [deep]}
    with pytest.raises(QueryError, match="nest"):
        parse_filter(deep, schema)
    with pytest.raises(QueryError, match="at most 64 conditions"):
        parse_filter({"$or": [{"year": y} for y in range(65)]}, schema)


def test_injection_attempts_in_names_and_values_are_inert(store: IndexWriter) -> None:
    hostile = "red' OR 1=1; DROP TABLE items; --"
    assert keys(store, vec(1), filters={"color": hostile}) == []
    assert keys(store, vec(1), filters={"color": {"$in": [hostile, "red"]}}) == keys(
        store, vec(1), filters={"color": "red"}
    )
    for name in ('color" OR 1=1 --', "x') OR 1=1 --"):
        with pytest.raises(QueryError, match="unknown filter field"):
            store.search(vec(1), 5, filters={name: "red"})
    with pytest.raises(QueryError, match=r"unknown filter operator '\$\.color'"):
        store.search(vec(1), 5, filters={"$.color": "red"})
    sql, args = to_sql(parse_filter({"color": hostile}, store.schema()))
    assert hostile not in sql and hostile in args
    assert len(store) == 120 and len(keys(store, vec(1))) == 120  # every item still there


def test_a_field_named_like_sql_is_filtered_as_data(tmp_path: Path) -> None:
    with IndexStore.create(tmp_path / "index", FP) as s:
        s.write([item(i, **{"a') OR 1=1 --": "x" if i < 3 else "y", "dotted.name": i}) for i in range(10)])
        assert set(keys(s, vec(1), filters={"a') OR 1=1 --": "x"})) == {"k0000", "k0001", "k0002"}
        assert set(keys(s, vec(1), filters={"dotted.name": {"$gte": 8}})) == {"k0008", "k0009"}


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW32"])
def test_a_selective_filter_still_returns_k_hits_on_an_approximate_index(
    tmp_path: Path, factory: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the FAISS id selector (the exact path switched off), widening when the beam fell short."""
    monkeypatch.setattr(searching, "EXACT_FILTER_MAX", 0)
    params = {"nprobe": 1} if factory.startswith("IVF") else {"efSearch": 16}
    with IndexStore.create(tmp_path / "index", FP, factory=factory, search_params=params) as s:
        s.write([item(i, rare=i % 100 == 7) for i in range(2000)])
        s.flush(retrain=True)
        assert s.stats()["effective_factory"] == factory
        rare = {k for k in sorted(s.keys()) if s.get(k)["metadata"]["rare"]}
        assert len(rare) == 20
        rare_keys, emb = s.embeddings(sorted(rare))
        found = 0
        for seed in range(5):
            hits = s.search(vec(5000 + seed), 10, filters={"rare": True})[0]
            assert len(hits) == 10 and {h.key for h in hits} <= rare
            best = {rare_keys[j] for j in np.argsort(-(emb @ vec(5000 + seed)))[:10]}
            found += len(best & {h.key for h in hits})
        assert found >= 45  # recall@10 >= 0.9 over the allowed items


def test_pages_concatenate_to_the_top_k(store: IndexWriter) -> None:
    q = vec(4242)
    top = keys(store, q, 60)
    pages = [keys(store, q, 10, offset=o) for o in range(0, 60, 10)]
    assert list(chain(*pages)) == top and len(top) == 60
    red = keys(store, q, 40, filters={"color": "red"})
    assert (
        keys(store, q, 15, offset=0, filters={"color": "red"})
        + keys(store, q, 25, offset=15, filters={"color": "red"})
        == red
    )
    assert keys(store, q, 10, offset=115) == keys(store, q, 120)[115:]
    assert keys(store, q, 10, offset=200) == []


def test_ties_are_broken_by_id_so_pages_are_stable(tmp_path: Path) -> None:
    with IndexStore.create(tmp_path / "index", FP) as s:
        s.write([NewItem(f"k{i:02d}", "p", f"s{i}", 1, 1, embedding=vec(i % 3)) for i in range(30)])
        # identical vectors by sha would dedupe; these differ by sha, so 10 items share each score
        top = keys(s, vec(0), 30)
        assert top[:10] == sorted(top[:10])
        assert list(chain(*(keys(s, vec(0), 4, offset=o) for o in range(0, 30, 4)))) == top


def test_depth_is_bounded(store: IndexWriter) -> None:
    with pytest.raises(QueryError, match=r"offset \+ k = 1001 is deeper .*max_depth 1000"):
        store.search(vec(1), 10, offset=991)
    with pytest.raises(QueryError, match=r"max_depth 50"):
        store.search(vec(1), 10, offset=41, max_depth=50)
    with pytest.raises(QueryError, match="offset must be a non-negative integer"):
        store.search(vec(1), 10, offset=-1)
    assert len(store.search(vec(1), 10, offset=990)[0]) == 0  # legal, past the 120 items


def test_min_score_cuts_the_ranking_before_the_page(store: IndexWriter) -> None:
    q = vec(17)  # item 17's own vector: one perfect match, the rest far lower
    every = store.search(q, 120)[0]
    cut = every[5].score
    above = [h.key for h in every if h.score >= cut]
    assert keys(store, q, min_score=cut) == above and len(above) >= 6
    assert keys(store, q, 3, offset=3, min_score=cut) == above[3:6]
    assert keys(store, q, min_score=1.01) == []
    with pytest.raises(QueryError, match="min_score must be a finite number"):
        store.search(q, 5, min_score=float("nan"))


def test_sort_orders_the_relevant_hits_by_a_field(store: IndexWriter) -> None:
    q = vec(3)
    relevant = store.search(q, 120, min_score=0.0)[0]
    by_price = store.search(q, 120, min_score=0.0, sort="-price")[0]
    assert {h.key for h in by_price} == {h.key for h in relevant}
    prices = [h.metadata["price"] for h in by_price]
    assert prices == sorted(prices, reverse=True)
    dates = [h.metadata["date"] for h in store.search(q, 50, sort="date")[0]]
    assert dates == sorted(dates)
    brands = [h.metadata.get("brand") for h in store.search(q, 120, sort="brand")[0]]
    assert brands[-24:] == [None] * 24 and brands[:-24] == sorted(brands[:-24])  # missing ones last
    paged = list(chain(*(keys(store, q, 7, offset=o, sort="-year") for o in range(0, 49, 7))))
    assert paged == keys(store, q, 49, sort="-year")
    with pytest.raises(QueryError, match=r"cannot sort by unknown field 'size'; known fields: .*price"):
        store.search(q, 5, sort="-size")
