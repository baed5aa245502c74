"""The search path of a reader: query checks, the ids a filter allows, ANN or exact scoring, hits.

Filters are applied *inside* the search, never after it, so a filtered search still returns k hits when
k items match: the allowed vector ids go to FAISS as an id selector, or, when they are few
(:data:`EXACT_FILTER_MAX`), are scored exactly from SQLite, because graph and inverted-list search lose
recall when most candidates are filtered out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vitrine.errors import QueryError
from vitrine.index import layout
from vitrine.index.ann import exact_search
from vitrine.index.hits import Hit, assemble_hits, check_queries, filter_sql
from vitrine.index.rwlock import SharedLock
from vitrine.index.snapshots import Generation

#: Filters that leave at most this many vectors are scored exactly from SQLite.
EXACT_FILTER_MAX = 8192


@dataclass(frozen=True)
class Plan:
    """One checked search: unit query rows, how many hits, and the SQL condition a filter compiled to."""

    queries: np.ndarray
    k: int
    where: str
    args: list


def plan(queries: np.ndarray, k: int, dim: int, filters: dict | None, known: Callable[[], list[str]]) -> Plan:
    """Check the queries and k (QueryError) and compile the filter; ``known`` lists the metadata fields."""
    q = check_queries(queries, dim)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise QueryError(f"k must be a positive integer, got {k!r}")
    where, args = filter_sql(filters or {}, known() if filters else [])
    return Plan(q, int(k), where, args)


def run(
    conn: sqlite3.Connection, gen: Generation, plan: Plan, allowed: np.ndarray | None, lock: SharedLock
) -> list[list[Hit]]:
    """Top-k hits per query over the vectors ``allowed`` (None: all)."""
    if allowed is not None and allowed.size == 0:
        return [[] for _ in plan.queries]
    if allowed is not None and allowed.size <= EXACT_FILTER_MAX and gen.ann.effective_factory != "Flat":
        rows = layout.select_in(conn, "SELECT id, embedding FROM vectors WHERE id IN ({})", allowed.tolist())
        scores, ids = exact_search(plan.queries, plan.k, *layout.id_vectors(rows, gen.dim))
    else:
        with lock.shared():
            scores, ids = gen.ann.search(plan.queries, plan.k, allowed)
    model = str(gen.manifest["fingerprint"].get("id"))
    return assemble_hits(conn, gen.name, model, scores, ids, plan.where, plan.args)


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
