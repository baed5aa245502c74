"""The read side of an index directory: :class:`IndexReader` (searches, item reads, stats, refresh).

Open one with :meth:`vitrine.index.store.IndexStore.open`; any number may be open, in any process, while
one writer (:class:`vitrine.index.writer.IndexWriter`, a reader that may also write) commits. A reader has
no method that changes the index, so misuse is caught where it is written (by a type checker, or an
``AttributeError`` on the first try), not deep inside a run.

Threads: searches run side by side under the shared side of a :class:`SharedLock`; :meth:`refresh` (and a
writer's commits) take it alone to change the in-memory FAISS. Every thread gets its own SQLite connection.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from vitrine.errors import StoreError
from vitrine.index import embeddings, exclusions, layout, searching, snapshots
from vitrine.index.filters import FilterExpr
from vitrine.index.hits import Hit
from vitrine.index.rwlock import SharedLock
from vitrine.index.schema import FieldInfo, infer_schema

_T = TypeVar("_T")
#: Derived reads kept per (generation, seq): field lists, filter id sets, the schema.
CACHE_ENTRIES = 64


class IndexReader:
    """An index directory opened for reading: the live generation (CURRENT), refreshed on demand."""

    writable = False

    def __init__(self, root: Path, generation: str, *, lock_fd: int | None, expected: dict | None) -> None:
        """Private: use :meth:`vitrine.index.store.IndexStore.open` (or the writer's constructors)."""
        self.root, self._lock_fd, self._expected = root, lock_fd, expected
        self._ann_lock, self._write_lock = SharedLock(), threading.Lock()
        self._local, self._conns, self._cache, self._closed = threading.local(), [], {}, False
        self._gen = self._load_generation(generation)

    def close(self) -> None:
        """Close connections and release the writer lock if held. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for conn in self._conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        layout.release_lock(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> IndexReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the generation in memory
    @property
    def generation(self) -> str:
        return self._gen.name

    @property
    def manifest(self) -> dict:
        return self._gen.manifest

    @property
    def fingerprint(self) -> dict:
        return self._gen.manifest["fingerprint"]

    @property
    def dim(self) -> int:
        return self._gen.dim

    @property
    def seq(self) -> int:
        """The last SQLite commit reflected in memory."""
        return self._gen.seq

    @property
    def snapshot_damage(self) -> list[str]:
        """Why the snapshot on disk was refused at load (then rebuilt from SQLite); empty if it was not."""
        return list(self._gen.damage)

    def _load_generation(self, name: str, full: bool | None = None) -> snapshots.Generation:
        return snapshots.load_generation(self.root, name, self._expected, self.writable, full)

    def verify_snapshot(self) -> str | None:
        """Recompute the whole checksum of the snapshot this reader loaded, once per loaded snapshot
        (opening compared only its size and mtime, see :mod:`vitrine.index.snapshots`). When it is
        damaged, the generation is loaded again with every snapshot hashed (so from a good one or from
        SQLite) and swapped in; returns why, else None. Reads the whole file: meant for a background
        thread of a process that is already answering."""
        gen = self._gen
        if gen.hashed:
            return None
        checked, problem = gen.snapshot_seq, gen.full_check()  # unlocked: refreshes go on meanwhile
        with self._write_lock:
            if self._gen is not gen or gen.hashed or gen.snapshot_seq != checked:
                return None  # loaded again meanwhile: that load is checked on the next call
            gen.hashed = True
            if problem is None:
                return None
            fresh = self._load_generation(gen.name, full=True)
            with self._ann_lock.exclusive():
                self._gen, self._cache = fresh, {}
            return problem

    def connection(self) -> sqlite3.Connection:
        """This thread's read connection to the live generation's SQLite (for queries beside the
        vector search, e.g. full text, that must see the same commit)."""
        return self._conn()

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"index {self.root} is closed")
        return self._conn_to(self._gen.path)

    def _conn_to(self, path: Path) -> sqlite3.Connection:
        if getattr(self._local, "path", None) != path:
            self._local.conn = layout.connect(path / "meta.sqlite", not self.writable)
            self._local.path = path
            self._conns.append(self._local.conn)
        return self._local.conn

    def close_thread_connection(self) -> None:
        """Close the calling thread's SQLite connection, if it has one (a worker thread about to end:
        connections otherwise stay open until :meth:`close`)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            return
        self._local.conn = self._local.path = None
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    def refresh(self) -> bool:
        """Pick up another process's commits or a newly published generation.

        True when anything changed. FingerprintMismatch (the old generation stays in use) when the
        new generation was built with another model than ``expected_fingerprint``.
        """
        with self._write_lock:
            name = layout.read_current(self.root)
            if name != self._gen.name:
                new = self._load_generation(name)
                with self._ann_lock.exclusive():
                    self._gen, self._cache = new, {}
                return True
            gen, conn = self._gen, self._conn()
            if layout.scalar(conn, "SELECT value FROM state WHERE name='seq'") == gen.seq:
                return False
            delta = layout.changes(conn, gen.seq, gen.dim)
            with self._ann_lock.exclusive():
                if layout.apply_delta(gen.ann, delta):
                    gen.seq = delta[0]
                else:
                    gen.reload(conn)
                self._cache = {}
            return True

    def _cached(self, key: tuple, compute: Callable[[], _T]) -> _T:
        """Memo for derived reads (fields, filter id sets), dropped whenever seq or generation moves."""
        stamp = (self._gen.name, self._gen.seq)
        if self._cache.get("stamp") != stamp or len(self._cache) > CACHE_ENTRIES:
            self._cache = {"stamp": stamp}
        cache = self._cache
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return layout.scalar(self._conn(), "SELECT COUNT(*) FROM items")

    def stats(self) -> dict:
        conn, gen = self._conn(), self._gen
        with layout.reading(conn):
            count, vectors, failed, catalogs = (
                layout.scalar(conn, f"SELECT COUNT(*) FROM {t}")
                for t in ("items", "vectors", "failures", "catalogs")
            )
        with self._ann_lock.shared():
            ann = gen.ann
            memory, indexed = ann.memory_bytes(), ann.ntotal
        return {
            "count": count,
            "vectors": vectors,
            "failed": failed,
            "catalogs": catalogs,
            "factory": gen.manifest.get("factory"),
            "effective_factory": ann.effective_factory,
            "fallback_reason": ann.fallback_reason,
            "generation": gen.name,
            "seq": gen.seq,
            "snapshot_seq": gen.snapshot_seq,
            "indexed": indexed,
            "deleted_slots": ann.deleted,
            "memory_bytes": memory,
            "bytes_per_vector": memory / indexed if indexed else 0.0,
            "dim": gen.dim,
            "model": gen.manifest["fingerprint"].get("id"),
        }

    def item_states(self, source: str | None = None) -> dict[str, tuple[int, int, str]]:
        """key -> (size, mtime_ns, sha256) in one query, so the indexer can skip unchanged files."""
        sql = "SELECT key, size, mtime_ns, sha256 FROM items" + ("" if source is None else " WHERE source=?")
        return {r[0]: r[1:] for r in self._conn().execute(sql, () if source is None else (source,))}

    def vector_for(self, sha256: str) -> np.ndarray | None:
        """The stored embedding of this content, if any (lets the indexer skip re-encoding duplicates)."""
        row = self._conn().execute("SELECT embedding FROM vectors WHERE sha256=?", (sha256,)).fetchone()
        return None if row is None else embeddings.decode([row[0]], self.dim)[0].copy()

    def known_content(self, sha256s: list[str]) -> set[str]:
        """Those of ``sha256s`` whose content has a stored vector (one lookup per chunk, not per item)."""
        sql = "SELECT sha256 FROM vectors WHERE sha256 IN ({})"
        return {r[0] for r in layout.select_in(self._conn(), sql, list(dict.fromkeys(sha256s)))}

    def sources(self, keys: list[str]) -> dict[str, str]:
        """key -> the catalog (source) that holds it, for those of ``keys`` in the index (one lookup per
        chunk of keys, not per key)."""
        sql = "SELECT key, source FROM items WHERE key IN ({})"
        return dict(layout.select_in(self._conn(), sql, list(dict.fromkeys(keys))))

    def get(self, key: str) -> dict | None:
        sql = f"SELECT {', '.join(layout.COLS)} FROM items WHERE key=?"
        row = self._conn().execute(sql, (key,)).fetchone()
        if row is None:
            return None
        item = dict(zip(layout.COLS, row, strict=True))
        item["captions"], item["metadata"] = json.loads(item["captions"]), json.loads(item["metadata"])
        return item

    def keys(self, source: str | None = None) -> set[str]:
        return set(self.item_states(source))

    def failures(self) -> list[dict]:
        """Recorded failures, newest first: key, path, reason, time, source."""
        rows = self._conn().execute("SELECT key, path, reason, time, source FROM failures ORDER BY time DESC")
        return [dict(zip(("key", "path", "reason", "time", "source"), r, strict=True)) for r in rows]

    def first_captions(self) -> list[tuple[str, str]]:
        """(key, first caption) of every captioned item, by key."""
        sql = "SELECT key, json_extract(captions, '$[0]') FROM items WHERE captions != '[]' ORDER BY key"
        return [(key, caption) for key, caption in self._conn().execute(sql) if isinstance(caption, str)]

    def catalogs(self) -> dict[str, dict]:
        """source -> spec in the order catalogs were first indexed (the first to claim a file owns it)."""
        rows = self._conn().execute("SELECT source, spec FROM catalogs ORDER BY rowid")
        return {source: json.loads(spec) for source, spec in rows}

    def exclusions(self) -> exclusions.Exclusions:
        """Paths removed from this index that builds must not add again (until a writer's ``restore``)."""
        return self._cached(("excluded",), lambda: exclusions.read(self._conn()))

    def metadata_fields(self, limit_values: int = 50) -> dict[str, list[str]]:
        """field -> up to ``limit_values`` distinct scalar values, as the strings filters compare."""
        return self._cached(
            ("fields", limit_values), lambda: searching.field_values(self._conn(), limit_values)
        )

    def embeddings(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Stored (normalised) item embeddings as float32, sorted by key or in the order asked; unknown
        keys left out."""
        sql = "SELECT i.key, v.embedding FROM items i JOIN vectors v ON v.id = i.vector_id"
        if keys is None:
            rows = self._conn().execute(sql + " ORDER BY i.key").fetchall()
        else:
            found = dict(layout.select_in(self._conn(), sql + " WHERE i.key IN ({})", list(keys)))
            rows = [(k, found[k]) for k in dict.fromkeys(keys) if k in found]
        return [r[0] for r in rows], embeddings.decode([r[1] for r in rows], self.dim)

    # ------------------------------------------------------------------ search
    def schema(self) -> dict[str, FieldInfo]:
        """The inferred metadata schema: field -> type, count, range (:mod:`vitrine.index.schema`)."""
        return self._cached(("schema",), lambda: infer_schema(self._conn()))

    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        filters: FilterExpr | Mapping | None = None,
        *,
        offset: int = 0,
        min_score: float | None = None,
        sort: str | None = None,
        max_depth: int = searching.MAX_DEPTH,
    ) -> list[list[Hit]]:
        """A page of hits per query (the ranks ``[offset, offset + k)``) by cosine similarity.

        ``filters``: an expression from :func:`vitrine.index.filters.parse_filter` (parse once at the
        edge, against :meth:`schema`), or a filter object parsed here; the filter language, pages,
        ``min_score`` and ``sort`` are described in :mod:`vitrine.index.searching`. Items with identical
        content share one vector and so come back as one hit: the first matching key (sorted) is the
        hit, the other keys are its ``duplicates``. QueryError for anything malformed.
        """
        gen = self._gen
        plan = searching.plan(
            queries,
            k,
            gen.dim,
            filters=filters,
            schema=self.schema,
            offset=offset,
            min_score=min_score,
            sort=sort,
            max_depth=max_depth,
        )
        allowed = self._allowed(plan.where, plan.args) if plan.where else None
        return searching.run(self._conn(), gen, plan, allowed, self._ann_lock)

    def _allowed(self, where: str, args: list) -> np.ndarray:
        return self._cached(("allowed", where, *args), lambda: searching.allowed(self._conn(), where, args))
