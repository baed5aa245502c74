"""One batch of item upserts and removals, as set-based SQL inside the writer's transaction.

Why set-based: a per-item loop paid two SELECTs, an INSERT, an UPSERT and a DELETE per item, each a
round trip through the sqlite3 module, and fired the full-text triggers once per statement. Here the
batch is staged once (``executemany`` into a TEMP table), each lookup is one join against it, new
vectors go in with one ``executemany``, the items with one ``INSERT ... SELECT``, and the embeddings
are checked and normalised as one array.

Semantics (those of applying the items one by one, in order): content already stored (same sha256)
reuses its vector, whatever embedding the item carries; new content stores the embedding of its first
item in the batch; a key given twice keeps its last item; a vector that no item references any more is
deleted, with a tombstone when it existed before this commit (:mod:`vitrine.index.writer`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vitrine.errors import StoreError
from vitrine.index import embeddings
from vitrine.index.layout import COLS, NewItem, select_in

#: Rows of one batch, staged in the connection's TEMP database (never in meta.sqlite itself).
STAGE = (
    "CREATE TEMP TABLE IF NOT EXISTS staged_items(key TEXT PRIMARY KEY, path TEXT, sha256 TEXT, "
    "size INTEGER, mtime_ns INTEGER, captions TEXT, metadata TEXT, source TEXT, added REAL)"
)
_STAGED = ("key", "path", "sha256", "size", "mtime_ns", "captions", "metadata", "source", "added")
#: One statement for the whole batch: the full-text triggers then cost half of what they cost per
#: executemany row (bench/RESULTS.md, "Bulk ingest"). ``WHERE true`` lets SQLite parse the upsert clause.
UPSERT = (
    f"INSERT INTO items({', '.join(COLS)}) SELECT s.key, s.path, v.id, s.sha256, s.size, s.mtime_ns, "
    "s.captions, s.metadata, s.source, s.added FROM temp.staged_items s "
    "JOIN vectors v ON v.sha256 = s.sha256 WHERE true ORDER BY s.rowid ON CONFLICT(key) DO UPDATE SET "
    + ", ".join(f"{c}=excluded.{c}" for c in COLS[1:-1])
)


#: Made once: ``json.dumps`` with options builds a new encoder per call.
_CAPTIONS = json.JSONEncoder(ensure_ascii=False)
_METADATA = json.JSONEncoder(ensure_ascii=False, sort_keys=True, default=str)


@dataclass
class Batch:
    """Where one commit stands: ``added`` vector id -> stored values (for FAISS), ``dropped`` ids
    (tombstoned), ``candidates`` vector ids some key stopped using (orphans unless still referenced)."""

    conn: sqlite3.Connection
    seq: int
    dim: int
    dtype: str
    model: str = ""
    added: dict[int, np.ndarray] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    candidates: set[int] = field(default_factory=set)


def upsert(batch: Batch, items: Sequence[NewItem], now: float) -> None:
    """Insert or replace ``items`` by key (deduplicating content by sha256) and clear their failures."""
    latest = {item.key: item for item in items}  # a key given twice: its last item
    for item in latest.values():
        if not item.key or not item.sha256:
            raise StoreError(f"item {item.key!r} ({item.path}): key and sha256 must be non-empty")
    if not latest:
        return
    conn = batch.conn
    _stage(conn, latest.values(), now)
    sql = "SELECT DISTINCT v.sha256 FROM temp.staged_items s JOIN vectors v ON v.sha256 = s.sha256"
    known = {r[0] for r in conn.execute(sql)}
    new: dict[str, NewItem] = {}
    for item in latest.values():
        if item.sha256 not in known:
            new.setdefault(item.sha256, item)
    if new:
        _insert_vectors(batch, list(new.values()))
    sql = (  # keys moving to another vector leave their old one as an orphan candidate
        "SELECT i.vector_id FROM temp.staged_items s JOIN items i ON i.key = s.key "
        "JOIN vectors v ON v.sha256 = s.sha256 WHERE i.vector_id != v.id"
    )
    batch.candidates.update(r[0] for r in conn.execute(sql))
    conn.execute(UPSERT)
    conn.execute("DELETE FROM failures WHERE key IN (SELECT key FROM temp.staged_items)")
    conn.execute("DELETE FROM temp.staged_items")


def _stage(conn: sqlite3.Connection, items: Iterable[NewItem], now: float) -> None:
    conn.execute(STAGE)
    conn.execute("DELETE FROM temp.staged_items")
    marks = ",".join("?" * len(_STAGED))
    conn.executemany(
        f"INSERT INTO temp.staged_items({', '.join(_STAGED)}) VALUES ({marks})", [_row(i, now) for i in items]
    )


def remove(batch: Batch, keys: Sequence[str]) -> None:
    """Delete items by key (and their failures); the vectors they used become orphan candidates."""
    keys = list(dict.fromkeys(keys))
    if not keys:
        return
    used = select_in(batch.conn, "SELECT vector_id FROM items WHERE key IN ({})", keys)
    batch.candidates.update(r[0] for r in used)
    batch.conn.executemany("DELETE FROM items WHERE key=?", [(k,) for k in keys])
    batch.conn.executemany("DELETE FROM failures WHERE key=?", [(k,) for k in keys])


def drop_orphans(batch: Batch) -> None:
    """Delete candidate vectors no item references; tombstone those that existed before this commit."""
    if not batch.candidates:
        return
    candidates = sorted(batch.candidates)
    sql = "SELECT DISTINCT vector_id FROM items WHERE vector_id IN ({})"
    orphans = sorted(set(candidates) - {r[0] for r in select_in(batch.conn, sql, candidates)})
    batch.conn.executemany("DELETE FROM vectors WHERE id=?", [(vid,) for vid in orphans])
    older = [vid for vid in orphans if batch.added.pop(vid, None) is None]
    tombstones = [(vid, batch.seq) for vid in older]
    batch.conn.executemany("INSERT INTO removed(vector_id, seq) VALUES (?,?)", tombstones)
    batch.dropped.extend(older)


def _insert_vectors(batch: Batch, items: list[NewItem]) -> None:
    """Store the normalised embeddings of new content (``batch.added`` gets their ids)."""
    blobs, stored = embeddings.encode(_normalised(items, batch.dim, batch.model), batch.dtype)
    batch.conn.executemany(
        "INSERT INTO vectors(sha256, embedding, seq) VALUES (?,?,?)",
        [(item.sha256, blob, batch.seq) for item, blob in zip(items, blobs, strict=True)],
    )
    # Only this commit writes rows with this seq (the writer lock, one transaction per seq).
    ids = dict(batch.conn.execute("SELECT sha256, id FROM vectors WHERE seq=?", (batch.seq,)).fetchall())
    for item, vec in zip(items, stored, strict=True):
        batch.added[ids[item.sha256]] = vec


def _normalised(items: list[NewItem], dim: int, model: str) -> np.ndarray:
    """The items' embeddings as one L2-normalised float32 array; StoreError naming the first bad item."""
    try:  # the usual batch: equal-shape arrays, converted in one call
        rows = np.asarray([item.embedding for item in items], dtype=np.float32)
    except (TypeError, ValueError):
        rows = None
    if rows is None or rows.shape != (len(items), dim):
        rows = _one_by_one(items, dim, model)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(rows, axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        raise _bad_vector(items[int(bad[0])], dim, dim, model)
    return rows / norms[:, None]


def _one_by_one(items: list[NewItem], dim: int, model: str) -> np.ndarray:
    rows = np.zeros((len(items), dim), dtype=np.float32)
    for i, item in enumerate(items):
        if item.embedding is None:
            raise StoreError(
                f"item {item.key!r}: no embedding given and no stored vector for content "
                f"{item.sha256}; encode the image first"
            )
        vec = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
        if vec.size != dim:
            raise _bad_vector(item, vec.size, dim, model)
        rows[i] = vec
    return rows


def _bad_vector(item: NewItem, size: int, dim: int, model: str) -> StoreError:
    return StoreError(
        f"item {item.key!r}: embedding must be a finite non-zero vector of dim "
        f"{dim} (model {model}), got size {size}"
    )


def _row(item: NewItem, now: float) -> tuple:
    return (
        item.key,
        item.path,
        item.sha256,
        item.size,
        item.mtime_ns,
        _CAPTIONS.encode(list(item.captions)),
        _METADATA.encode(item.metadata),
        item.source,
        now,
    )
