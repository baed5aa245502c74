"""Queries: client values validated once into a Query (one reason per problem), and what a Query does in
the Searcher: pages that concatenate to the top-k, the relevance cutoff, negative terms, photo+key rules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.app.live import build_index
from vitrine.errors import QueryError
from vitrine.index.filters import Condition, Group
from vitrine.index.schema import FieldInfo
from vitrine.open_index import open_searcher
from vitrine.search.query import Query, SearchLimits, parse_query
from vitrine.search.vectors import mix, push_away

LIMITS = SearchLimits(max_text_chars=50, max_k=20, max_depth=40, max_negative=2)
FIELDS = {"color": FieldInfo("string", 3), "shop": FieldInfo("string", 3), "price": FieldInfo("number", 3)}


def parse(**fields: object) -> Query:
    return parse_query(LIMITS, schema=lambda: FIELDS, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "reason", "message"),
    [
        ({"text": "a", "k": 0}, "bad_k", "k must be between 1 and 20, got 0"),
        ({"text": "a", "k": "many"}, "bad_k", "k must be a number, got 'many'"),
        ({"text": "a", "k": 2.5}, "bad_k", "k must be a whole number"),
        ({"text": "a", "k": True}, "bad_k", "k must be a number"),
        ({"text": ["a"]}, "bad_text", "the text query must be a string, got list"),
        ({"text": "x" * 51}, "text_too_long", "51 characters long; the limit is 50"),
        ({"text": "  "}, "empty_query", "give a photo, a text, or both"),
        ({"text": "a", "weight": 1.5}, "bad_weight", "weight must be between 0 and 1"),
        ({"text": "a", "weight": float("nan")}, "bad_weight", "weight must be a finite number"),
        ({"text": "a", "offset": -1}, "bad_offset", "offset must be at least 0"),
        ({"text": "a", "k": 20, "offset": 21}, "bad_offset", "offset + k at most 40"),
        ({"text": "a", "filters": {"brand": "x"}}, "unknown_filter", "known fields: color (string), price"),
        ({"text": "a", "filters": "{nope"}, "bad_filter", "not valid JSON"),
        ({"text": "a", "filters": {"price": {"$lt": "cheap"}}}, "bad_filter", "'price' holds number values"),
        ({"text": "a", "filters": {"color": {"$near": 1}}}, "bad_filter", "unknown filter operator '$near'"),
        ({"text": "a", "min_score": 2}, "bad_min_score", "between -1 and 1"),
        ({"text": "a", "mode": "fuzzy"}, "bad_mode", "vector, lexical, hybrid"),
        ({"key": "k1", "mode": "hybrid"}, "bad_mode", "mode 'hybrid' ranks by the words of a text"),
        ({"text": "a", "sort": "-size"}, "bad_sort", "unknown field '-size'; known fields: color"),
        ({"text": "a", "negative": "b"}, None, None),
        ({"text": "a", "negative": [1]}, "bad_negative", "negative must be a list of texts"),
        ({"text": "a", "negative": ["b", "c", "d"]}, "bad_negative", "at most 2 negative texts"),
        ({"key": 3}, "bad_key", "key must be a string"),
    ],
)
def test_each_problem_has_one_reason(fields: dict, reason: str | None, message: str | None) -> None:
    if reason is None:
        assert parse(**fields).negative == ("b",)
        return
    with pytest.raises(QueryError) as info:
        parse(**fields)
    assert info.value.reason == reason and message in str(info.value)


def test_loose_values_become_typed_fields() -> None:
    q = parse(text="  red dress ", k=5.0, weight="0.25", filters="color=red", offset="3", min_score="0.1")
    red = Condition("color", "$eq", "red", "text")
    assert q == Query(text="red dress", k=5, weight=0.25, filters=red, offset=3, min_score=0.1)
    assert q.texts_only and q.kind == "text"
    assert parse(key="k1", text="but red").kind == "both" and not parse(key="k1").texts_only


def test_filters_in_every_form_parse_once_into_one_expression() -> None:
    """The old forms (object, JSON string, pairs) and the language all become the expression the store
    and the full-text side search with; operators, $or, sort and the other modes are accepted."""
    red = Condition("color", "$eq", "red", "text")
    for form in ({"color": "red"}, '{"color": "red"}', "color=red", ["color=red"], {"color": "red", "x": ""}):
        assert parse(text="a", filters=form).filters == red
    cheap = parse(text="a", filters={"$or": [{"price": {"$lt": 50}}, {"color": {"$in": ["red"]}}]})
    assert cheap.filters == Group(
        "$or", (Condition("price", "$lt", 50, "number"), Condition("color", "$in", ("red",), "text"))
    )
    q = parse(text="a", sort="-price", mode="hybrid", min_score=0.02)
    assert (q.sort, q.mode, q.min_score, q.texts_only) == ("-price", "hybrid", 0.02, False)
    assert parse(text="a", mode="lexical", min_score=7.5).min_score == 7.5  # BM25 scores exceed 1


def test_vectors_mix_and_push_away_stay_unit_length() -> None:
    a, b = np.eye(4, dtype=np.float32)[0], np.eye(4, dtype=np.float32)[1]
    np.testing.assert_allclose(np.linalg.norm(mix(a, b, 0.3)), 1.0, atol=1e-6)
    away = push_away(mix(a, b, 0.5), b[None, :], 0.5)
    assert np.linalg.norm(away) == pytest.approx(1.0, abs=1e-6) and away @ b < mix(a, b, 0.5) @ b
    assert push_away(a, None, 0.5) is a


def test_pages_concatenate_to_the_top_k_and_the_cutoff_ends_them(
    photo_folder: Path, tmp_path: Path, clip_path: Path
) -> None:
    build_index(photo_folder, tmp_path / "index", clip_path)
    searcher = open_searcher(tmp_path / "index", limits=SearchLimits(max_k=100, max_depth=100))
    try:
        top = searcher.run(searcher.parse(text="a photo", k=12)).hits
        pages = [searcher.run(searcher.parse(text="a photo", k=5, offset=o)) for o in (0, 5, 10)]
        assert [p.next_offset for p in pages] == [5, 10, None]
        assert [h.key for p in pages for h in p.hits] == [h.key for h in top]
        cut = (top[3].score + top[4].score) / 2
        first = searcher.run(searcher.parse(text="a photo", k=3, min_score=cut))
        second = searcher.run(searcher.parse(text="a photo", k=3, offset=3, min_score=cut))
        assert len(first.hits) == 3 and first.next_offset == 3
        assert [h.key for h in second.hits] == [top[3].key] and second.next_offset is None
    finally:
        searcher.store.close()


def test_negative_terms_push_their_neighbours_down(
    photo_folder: Path, tmp_path: Path, clip_path: Path
) -> None:
    """Ranking by (a - w·b)·x: every item loses ground in proportion to its likeness to the negative,
    so the item most like it can only move down, and the scores are exactly the re-normalised ones."""
    build_index(photo_folder, tmp_path / "index", clip_path)
    searcher = open_searcher(tmp_path / "index")
    try:
        keys, items = searcher.store.embeddings()
        a, b = searcher.encoder.encode_texts(["a photo of a pattern", "stripes"])
        plain = [h.key for h in searcher.run(searcher.parse(text="a photo of a pattern", k=12)).hits]
        query = searcher.parse(text="a photo of a pattern", negative=["stripes"], negative_weight=1.0, k=12)
        pushed = searcher.run(query).hits
        expected = (a - b) / np.linalg.norm(a - b)
        by_key = dict(zip(keys, items @ expected, strict=True))
        assert [h.score for h in pushed] == pytest.approx([by_key[h.key] for h in pushed], abs=1e-4)
        most_like_b = keys[int(np.argmax(items @ b))]
        assert [h.key for h in pushed].index(most_like_b) >= plain.index(most_like_b)
        with pytest.raises(QueryError) as info:
            searcher.run(searcher.parse(key="no-such-item"))
        assert info.value.reason == "unknown_key"
    finally:
        searcher.store.close()
