"""Lexical and hybrid search: BM25 over the full-text index, and its fusion with the vector ranking.

Hybrid search fuses two rankings by reciprocal rank fusion (Cormack et al. 2009): an item's score is
``sum over rankings of weight / (rrf_k + rank)``, ranks from 1. Only ranks count, so a cosine and a
BM25 score never have to be put on one scale. Each side is taken to depth ``max(k + offset, floor)``
so that page 2 is fused from the same lists as page 1 (pages are stable within a generation).

``min_score`` cuts the ranked list before the page is taken (a BM25 score in lexical mode, an RRF value
in hybrid mode); ``sort`` (a metadata field, ``-field`` descending) reorders what is above the cutoff
among the ranked candidates, as the store does for vector search.

Filters apply to both sides: the vector side through :meth:`IndexStore.search`, the lexical side as
the same SQL condition on ``items``. Items with identical content share a vector and come back as one
hit on both sides (the first matching key, the others as ``duplicates``), so they fuse by key.
How hybrid compares with either side alone on Flickr8k: bench/RESULTS.md "Hybrid search".
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from vitrine.errors import QueryError
from vitrine.index import fulltext
from vitrine.index.filters import Condition, Group, parse_filter, to_sql
from vitrine.index.hits import Hit, assemble_hits
from vitrine.index.searching import MAX_DEPTH, sort_hits, sort_key
from vitrine.index.store import IndexStore

#: RRF's constant: larger flattens the difference between the top ranks (60 is the paper's value).
RRF_K = 60
#: Each side is ranked at least this deep before fusion, so an item ranked low on one side but high
#: on the other still gets both contributions.
DEPTH_FLOOR = 100


@dataclass
class RankedHit(Hit):
    """A hit with the score of each side that found it (None where that side did not rank it).

    ``score`` is the fused RRF score in hybrid mode and the lexical score in lexical mode;
    ``lexical_score`` is ``-bm25()`` (higher is better), ``vector_score`` the cosine.
    """

    vector_score: float | None = None
    lexical_score: float | None = None


def rrf(
    rankings: Sequence[Sequence[str]], rrf_k: int = RRF_K, weights: Sequence[float] | None = None
) -> dict[str, float]:
    """key -> fused score, best first (ties by key), for rankings given best first."""
    if isinstance(rrf_k, bool) or not isinstance(rrf_k, int) or rrf_k < 1:
        raise QueryError(f"rrf_k must be a positive integer, got {rrf_k!r}", "bad_rrf_k")
    weights = [1.0] * len(rankings) if weights is None else list(weights)
    if len(weights) != len(rankings) or any(not np.isfinite(w) or w < 0 for w in weights):
        raise QueryError(f"need one finite weight >= 0 per ranking, got {weights}", "bad_weight")
    scores: dict[str, float] = {}
    for ranking, weight in zip(rankings, weights, strict=True):
        for rank, key in enumerate(ranking, start=1):
            scores[key] = scores.get(key, 0.0) + weight / (rrf_k + rank)
    return dict(sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])))


def lexical(
    store: IndexStore,
    text: str,
    k: int = 10,
    offset: int = 0,
    filters: Any = None,
    *,
    min_score: float | None = None,
    sort: str | None = None,
) -> list[RankedHit]:
    """Hits ``offset .. offset + k`` by BM25 over captions, metadata strings and file names."""
    hits = _lexical_hits(store, text, _depth(k, offset, MAX_DEPTH if sort else 0), filters)
    return _cut(store, hits, k, offset, min_score, sort)


def search(
    store: IndexStore,
    vector: np.ndarray,
    text: str,
    k: int = 10,
    offset: int = 0,
    filters: Any = None,
    *,
    min_score: float | None = None,
    sort: str | None = None,
    rrf_k: int = RRF_K,
    floor: int = DEPTH_FLOOR,
    lexical_weight: float = 1.0,
) -> list[RankedHit]:
    """Hits ``offset .. offset + k`` of the RRF fusion of the vector ranking (``vector``, a query
    embedding) and the lexical ranking (``text``); ``lexical_weight`` scales the lexical side's share."""
    depth = _depth(k, offset, MAX_DEPTH if sort else floor)
    found = store.search(vector, k=depth, filters=filters, max_depth=depth)[0]
    by_vector = [ranked(h, vector_score=h.score) for h in found]
    by_text = _lexical_hits(store, text, depth, filters)
    fused = rrf([[h.key for h in by_vector], [h.key for h in by_text]], rrf_k, [1.0, lexical_weight])
    hits = {h.key: h for h in by_text} | {h.key: h for h in by_vector}
    lexical_scores = {h.key: h.lexical_score for h in by_text}
    out = []
    for key, score in fused.items():
        hit = hits[key]
        hit.score, hit.lexical_score = score, lexical_scores.get(key)
        out.append(hit)
    return _cut(store, out, k, offset, min_score, sort)


def _cut(
    store: IndexStore, hits: list[RankedHit], k: int, offset: int, min_score: float | None, sort: str | None
) -> list[RankedHit]:
    """The page of a ranked list: cut at ``min_score``, ordered by ``sort`` if given."""
    if min_score is not None:
        hits = [h for h in hits if h.score >= min_score]
    if sort:
        hits = sort_hits(hits, sort_key(sort, store.schema))  # type: ignore[assignment]
    return hits[offset : offset + k]


def _lexical_hits(store: IndexStore, text: str, depth: int, filters: Any) -> list[RankedHit]:
    conn = _connection(store)
    fulltext.require(conn, f"{store.root}/{store.generation}")
    where, args = _filter_sql(store, filters)
    rows = fulltext.search(conn, text, depth, where, args)
    if not rows:
        return []
    ids = np.array([r[0] for r in rows], dtype=np.int64)[None, :]
    scores = np.array([r[1] for r in rows], dtype=np.float32)[None, :]
    model = str(store.fingerprint.get("id"))
    hits = assemble_hits(conn, store.generation, model, scores, ids, where, args)[0]
    return [ranked(h, lexical_score=h.score) for h in hits]


def _connection(store: IndexStore) -> sqlite3.Connection:
    """The store's per-thread connection to its live generation, so both sides read the same one."""
    return store.connection()


def _filter_sql(store: IndexStore, filters: Any) -> tuple[str, list]:
    """The SQL condition of a filter (a parsed expression, or a filter object checked against the
    index's schema, as the vector side does), so both sides see the same items."""
    expr = filters if isinstance(filters, Condition | Group) or filters is None else None
    if expr is None and filters:
        expr = parse_filter(filters, store.schema())
    return to_sql(expr) if expr is not None else ("", [])


def ranked(hit: Hit, **scores: float) -> RankedHit:
    """``hit`` with the given side scores."""
    return RankedHit(**{f.name: getattr(hit, f.name) for f in fields(Hit)}, **scores)


def _depth(k: int, offset: int, floor: int) -> int:
    for name, value, least in (("k", k, 1), ("offset", offset, 0)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            raise QueryError(f"{name} must be an integer >= {least}, got {value!r}", f"bad_{name}")
    return max(int(k) + int(offset), floor)
