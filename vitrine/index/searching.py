"""The search path of a reader: query checks, the ids a filter allows, ANN or exact scoring, pages,
the relevance cutoff, sorting, hits.

Filters are applied *inside* the search, never after it, so a filtered search still returns k hits when
k items match: the allowed vector ids go to FAISS as an id selector, widening the beam
(:data:`WIDEN_STEPS`) when a selective filter left fewer than k, or, when they are few
(:data:`EXACT_FILTER_MAX`), are scored exactly from SQLite, because graph and inverted-list search lose
recall when most candidates are filtered out.

Pages: a search ranks the top ``offset + k`` by score, ties broken by vector id, and returns the slice
``[offset, offset + k)``; page 2 therefore continues page 1 exactly within a generation wherever the
structure's candidate set does not depend on k (Flat, IVF, the exact filtered path; HNSW while ``offset
+ k`` stays within ``efSearch``). Deeper than ``max_depth`` (:data:`MAX_DEPTH`) is refused.

``min_score`` drops hits scoring below it (cosine similarity), before the page is cut. ``sort`` (a
metadata field, ``-field`` for descending) reorders the hits above the cutoff among the top
``max_depth`` by score, items without the field last, ties by score: "the newest of the relevant ones",
stable across pages because the set sorted does not depend on the page.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timezone
from typing import Any

import numpy as np

from vitrine.errors import QueryError
from vitrine.index import layout
from vitrine.index.ann import exact_search
from vitrine.index.filters import Condition, FilterExpr, Group, parse_filter, parse_iso_date, to_sql
from vitrine.index.hits import Hit, assemble_hits, check_queries
from vitrine.index.rwlock import SharedLock
from vitrine.index.schema import FieldInfo
from vitrine.index.snapshots import Generation

#: Filters that leave at most this many vectors are scored exactly from SQLite.
EXACT_FILTER_MAX = 8192
#: Deepest result a page may reach (offset + k), unless the caller configures another.
MAX_DEPTH = 1000
#: Beam multipliers tried, in order, while a filtered ANN search returns fewer than k allowed hits.
WIDEN_STEPS = (1, 4, 16)
#: Extra candidates fetched so that ties at the page boundary are broken by id, not by FAISS's heap.
TIE_MARGIN = 8


@dataclass(frozen=True)
class SortKey:
    """``sort``: a metadata field, its direction, and how its values compare (from the schema)."""

    field: str
    descending: bool
    compare: str


@dataclass(frozen=True)
class Plan:
    """One checked search: unit query rows, the page, the compiled filter, cutoff and sort."""

    queries: np.ndarray
    k: int
    offset: int
    where: str
    args: list
    min_score: float | None
    sort: SortKey | None
    fetch: int  # candidates ranked per query before the page is cut


def plan(
    queries: np.ndarray,
    k: int,
    dim: int,
    *,
    filters: FilterExpr | Mapping | None,
    schema: Callable[[], dict[str, FieldInfo]],
    offset: int = 0,
    min_score: float | None = None,
    sort: str | None = None,
    max_depth: int = MAX_DEPTH,
) -> Plan:
    """Check every argument (QueryError) and compile the filter; ``schema`` gives the metadata fields."""
    q = check_queries(queries, dim)
    k, offset = _count(k, "k", 1), _count(offset, "offset", 0)
    if offset + k > max_depth:
        raise QueryError(f"offset + k = {offset + k} is deeper than this index pages (max_depth {max_depth})")
    if min_score is not None and (
        isinstance(min_score, bool) or not isinstance(min_score, int | float) or not math.isfinite(min_score)
    ):
        raise QueryError(f"min_score must be a finite number, got {min_score!r}")
    if filters is not None and not isinstance(filters, Condition | Group | Mapping):
        raise QueryError(f"filters must be a JSON object, got {type(filters).__name__}")
    expr = parse_filter(dict(filters), schema()) if isinstance(filters, Mapping) else filters
    where, args = to_sql(expr) if expr is not None else ("", [])
    key = sort_key(sort, schema) if sort else None
    return Plan(q, k, offset, where, args, min_score, key, max_depth if key else offset + k)


def _count(value: Any, name: str, least: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < least:
        kind = "a positive" if least else "a non-negative"
        raise QueryError(f"{name} must be {kind} integer, got {value!r}")
    return int(value)


def sort_key(sort: str, schema: Callable[[], dict[str, FieldInfo]]) -> SortKey:
    fields = schema()
    if not isinstance(sort, str):
        raise QueryError(f"sort must be a metadata field name (-name for descending), got {sort!r}")
    name = sort[1:] if sort.startswith("-") else sort
    if name not in fields:
        known = ", ".join(f"{n} ({f.type})" for n, f in sorted(fields.items())) or "none"
        raise QueryError(f"cannot sort by unknown field {name!r}; known fields: {known}")
    kind = fields[name].type
    compare = kind if kind in ("number", "date", "boolean") else "text"
    return SortKey(name, sort.startswith("-"), compare)


def run(
    conn: sqlite3.Connection, gen: Generation, plan: Plan, allowed: np.ndarray | None, lock: SharedLock
) -> list[list[Hit]]:
    """The page of hits per query over the vectors ``allowed`` (None: all)."""
    if allowed is not None and allowed.size == 0:
        return [[] for _ in plan.queries]
    scores, ids = _candidates(conn, gen, plan, allowed, lock)
    model = str(gen.manifest["fingerprint"].get("id"))
    out = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        row_scores, row_ids = _rank(row_scores, row_ids, plan)
        if plan.sort is None:
            page = slice(plan.offset, plan.offset + plan.k)
            row_scores, row_ids = row_scores[page], row_ids[page]
        hits = assemble_hits(conn, gen.name, model, row_scores[None], row_ids[None], plan.where, plan.args)[0]
        if plan.sort is not None:
            hits = sort_hits(hits, plan.sort)[plan.offset : plan.offset + plan.k]
        out.append(hits)
    return out


def _candidates(
    conn: sqlite3.Connection, gen: Generation, plan: Plan, allowed: np.ndarray | None, lock: SharedLock
) -> tuple[np.ndarray, np.ndarray]:
    n = plan.fetch + TIE_MARGIN
    if allowed is not None and allowed.size <= EXACT_FILTER_MAX and gen.ann.effective_factory != "Flat":
        return _exact(conn, gen, plan.queries, n, allowed)
    for widen in WIDEN_STEPS:
        with lock.shared():
            scores, ids = gen.ann.search(plan.queries, n, allowed, widen)
        if allowed is None or (ids >= 0).sum(axis=1).min() >= min(n, allowed.size):
            return scores, ids
    return _exact(conn, gen, plan.queries, n, allowed)


def _exact(
    conn: sqlite3.Connection, gen: Generation, queries: np.ndarray, n: int, allowed: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    rows = layout.select_in(conn, "SELECT id, embedding FROM vectors WHERE id IN ({})", allowed.tolist())
    return exact_search(queries, n, *layout.id_vectors(rows, gen.dim))


def _rank(scores: np.ndarray, ids: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
    """Found candidates by score, ties by id, cut to the ranked depth and at ``min_score``."""
    keep = ids >= 0
    if plan.min_score is not None:
        keep &= scores >= plan.min_score
    scores, ids = scores[keep], ids[keep]
    order = np.lexsort((ids, -scores.astype(np.float64)))[: plan.fetch]
    return scores[order], ids[order]


def sort_hits(hits: list[Hit], key: SortKey) -> list[Hit]:
    """Hits ordered by a metadata field (items without it last), ties by score then key."""
    valued = [(_sort_value(h.metadata.get(key.field), key.compare), h) for h in hits]
    present = sorted((pair for pair in valued if pair[0] is not None), key=lambda p: (-p[1].score, p[1].key))
    present.sort(key=lambda p: p[0], reverse=key.descending)  # stable: equal values stay by score
    return [h for _, h in present] + [h for value, h in valued if value is None]


def _sort_value(value: Any, compare: str) -> Any:
    if value is None:
        return None
    if compare == "number":
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if compare == "date":
        moment = parse_iso_date(value) if isinstance(value, str) else None
        if moment is None:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    if compare == "boolean":
        return int(value) if isinstance(value, bool) else None
    return str(value)


def known_fields(conn: sqlite3.Connection) -> list[str]:
    """Every metadata field name some item has, sorted."""
    sql = "SELECT DISTINCT je.key FROM items, json_each(items.metadata) AS je ORDER BY 1"
    return [r[0] for r in conn.execute(sql)]


def allowed(conn: sqlite3.Connection, where: str, args: list) -> np.ndarray:
    """The vector ids of the items that satisfy ``where``."""
    sql = f"SELECT DISTINCT vector_id FROM items WHERE {where}"
    return np.fromiter((r[0] for r in conn.execute(sql, args)), dtype=np.int64)


def field_values(conn: sqlite3.Connection, limit_values: int) -> dict[str, list[str]]:
    """field -> up to ``limit_values`` distinct scalar values, as text."""
    out: dict[str, list[str]] = {name: [] for name in known_fields(conn)}
    for name, value in conn.execute(
        "SELECT je.key, CAST(je.value AS TEXT) FROM items, json_each(items.metadata) AS je "
        "WHERE je.type NOT IN ('object', 'array', 'null') GROUP BY 1, 2 ORDER BY 1, 2"
    ):
        if len(out[name]) < limit_values:
            out[name].append(value)
    return out
