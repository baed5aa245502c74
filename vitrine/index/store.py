"""The index directory: SQLite (source of truth) + a FAISS snapshot (derived) + a manifest, in generations.

``ROOT/CURRENT`` names the live generation; ``ROOT/.lock`` admits one writer (flock) and any number
of readers; ``ROOT/gen-NNNNNN/`` holds ``manifest.json``, ``meta.sqlite`` (WAL, every embedding) and
``index.<seq>.faiss`` (the ANN as of SQLite commit ``seq``).

Why a ``kill -9`` at any instant loses nothing: each :meth:`IndexStore.write` is one SQLite
transaction that bumps ``state.seq``; vector rows carry the seq that added them, deleted vectors
leave a tombstone carrying the seq that deleted them, and vector ids are never reused. Opening loads
the newest snapshot ``s <= seq`` and replays what came after ``s``; a snapshot that is missing, stale,
unreadable or disagrees with SQLite after replay only costs a rebuild, never data. Files are written
to a temporary name, fsynced and renamed, so a half-written file is never mistaken for a real one.

A reindex builds the next generation beside the live one (:meth:`IndexStore.create_generation`) and
:meth:`IndexStore.publish` swaps CURRENT; readers move over in :meth:`IndexStore.refresh`.
Knob: :data:`EXACT_FILTER_MAX` - filters that leave fewer vectors are scored exactly from SQLite,
because graph and inverted-list search lose recall when most candidates are filtered out.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from vitrine.errors import QueryError, StoreError
from vitrine.index import diagnosis, exclusions, fulltext, generations, layout, snapshots
from vitrine.index.ann import AnnIndex, exact_search
from vitrine.index.hits import Hit, assemble_hits, check_queries, filter_sql
from vitrine.index.layout import Failure, NewItem
from vitrine.index.rwlock import SharedLock

EXACT_FILTER_MAX = 8192
_T = TypeVar("_T")


class IndexStore:
    """An index directory opened for reading (any number, any process) or writing (one, via ``.lock``).

    Searches may run from many threads while another thread refreshes or writes: the in-memory FAISS
    is guarded by an RLock and every thread gets its own SQLite connection.
    """

    def __init__(
        self, root: Path, generation: str, *, writable: bool, lock_fd: int | None, expected: dict | None
    ) -> None:
        """Private: use :meth:`create`, :meth:`open` or :meth:`create_generation`."""
        self.root, self.writable, self._lock_fd, self._expected = root, writable, lock_fd, expected
        self._ann_lock, self._write_lock = SharedLock(), threading.Lock()
        self._local, self._conns, self._cache, self._closed = threading.local(), [], {}, False
        for folder in (root, root / generation) if writable else ():
            for tmp in folder.glob("*.tmp-*"):  # left by a killed writer
                tmp.unlink(missing_ok=True)
        self._gen = self._load_generation(generation)

    @classmethod
    def create(
        cls,
        root: str | Path,
        fingerprint: dict,
        *,
        factory: str | None = None,
        search_params: dict | None = None,
    ) -> IndexStore:
        """A new index at ``root`` (a new folder, or one without CURRENT), returned open for writing."""
        store = cls._start(Path(root), fingerprint, factory, search_params, require_new=True)
        try:
            store.publish()
        except BaseException:
            store.close(flush=False)
            raise
        return store

    @classmethod
    def create_generation(
        cls,
        root: str | Path,
        fingerprint: dict,
        *,
        factory: str | None = None,
        search_params: dict | None = None,
        resume: Callable[[Path], str | None] | None = None,
    ) -> IndexStore:
        """Start the next generation beside the live one (a reindex); readers see it after :meth:`publish`.

        It holds the writer lock, so incremental indexing waits until the reindex is done. ``resume``
        runs under that lock and may name an unpublished generation to continue instead of a new one
        (a resumable reindex job; it may also delete stale ones).
        """
        return cls._start(Path(root), fingerprint, factory, search_params, require_new=False, resume=resume)

    @classmethod
    def _start(
        cls,
        root: Path,
        fingerprint: dict,
        factory: str | None,
        search_params: dict | None,
        require_new: bool,
        resume: Callable[[Path], str | None] | None = None,
    ) -> IndexStore:
        absent = diagnosis.require_absent if require_new else None
        lock, name = generations.start(root, fingerprint, factory, search_params, absent, resume)
        try:
            return cls(root, name, writable=True, lock_fd=lock, expected=None)
        except BaseException:
            layout.release_lock(lock)
            raise

    def publish(self, keep: int = 2) -> None:
        """Flush, then make this generation the live one by replacing CURRENT atomically.

        The last ``keep`` published generations stay (at least the one it replaces, for readers that
        have not refreshed yet, and for rollback); older ones and leftovers of interrupted builds are
        deleted (:mod:`vitrine.index.generations`).
        """
        self.flush()
        generations.publish(self.root, self.generation, keep)

    @classmethod
    def open(
        cls, root: str | Path, *, expected_fingerprint: dict | None = None, writable: bool = False
    ) -> IndexStore:
        """Open the live generation; FingerprintMismatch when it was built with another model, and
        :class:`IndexDamaged` (the shared diagnosis, with the way out) when the directory is damaged."""
        root = Path(root)
        try:
            layout.read_current(root)  # fail before locking, naming the problem, when missing or corrupt
        except StoreError as exc:
            raise diagnosis.explain(root, exc) from exc
        lock = layout.acquire_lock(root) if writable else None
        try:  # (re)read under the lock: a reindex may have published meanwhile
            name = layout.read_current(root)
            return cls(root, name, writable=writable, lock_fd=lock, expected=expected_fingerprint)
        except StoreError as exc:
            layout.release_lock(lock)
            raise diagnosis.explain(root, exc) from exc
        except BaseException:
            layout.release_lock(lock)
            raise

    @staticmethod
    def exists(root: str | Path) -> bool:
        """True when ``root`` holds an index, healthy or damaged (``diagnosis.diagnose``)."""
        return diagnosis.diagnose(root).kind != diagnosis.ABSENT

    @staticmethod
    def read_manifest(root: str | Path) -> dict:
        """The live generation's manifest, without loading FAISS (callers learn the model first)."""
        return layout.read_manifest(Path(root) / layout.read_current(Path(root)))

    def close(self, flush: bool = True) -> None:
        """Flush (writers; ``flush=False`` abandons the snapshot), close connections, unlock. Idempotent."""
        if self._closed:
            return
        try:
            if self.writable and flush:
                self.flush()
        finally:
            self._closed = True
            for conn in self._conns:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            layout.release_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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

    def _load_generation(self, name: str) -> snapshots.Generation:
        gen = snapshots.load_generation(self.root, name, self._expected, self.writable)
        if self.writable:
            with layout.writing(self._conn_to(gen.path), self.root):
                self._conn_to(gen.path).execute(exclusions.TABLE)
                fulltext.ensure(self._conn_to(gen.path))  # migration of indexes made before FTS
        return gen

    @property
    def snapshot_damage(self) -> list[str]:
        """Why the snapshot on disk was refused at load (then rebuilt from SQLite); empty if it was not."""
        return list(self._gen.damage)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"index {self.root} is closed")
        return self._conn_to(self._gen.path)

    def _conn_to(self, path: Path) -> sqlite3.Connection:
        if getattr(self._local, "path", None) != path:
            self._local.conn, self._local.path = (
                layout.connect(path / "meta.sqlite", not self.writable),
                path,
            )
            self._conns.append(self._local.conn)
        return self._local.conn

    def refresh(self) -> bool:
        """Reader side: pick up another process's commits or a newly published generation.

        True when anything changed. FingerprintMismatch (the old generation stays in use) when the
        new generation was built with another model than ``expected_fingerprint``.
        """
        if self.writable:
            return False
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
        # fmt: off
        return {
            "count": count, "vectors": vectors, "failed": failed, "catalogs": catalogs,
            "factory": gen.manifest.get("factory"), "effective_factory": ann.effective_factory,
            "fallback_reason": ann.fallback_reason, "generation": gen.name, "seq": gen.seq,
            "snapshot_seq": gen.snapshot_seq, "indexed": indexed, "deleted_slots": ann.deleted,
            "memory_bytes": memory, "bytes_per_vector": memory / indexed if indexed else 0.0,
            "dim": gen.dim, "model": gen.manifest["fingerprint"].get("id"),
        }
        # fmt: on

    def item_states(self, source: str | None = None) -> dict[str, tuple[int, int, str]]:
        """key -> (size, mtime_ns, sha256) in one query, so the indexer can skip unchanged files."""
        sql = "SELECT key, size, mtime_ns, sha256 FROM items" + ("" if source is None else " WHERE source=?")
        return {r[0]: r[1:] for r in self._conn().execute(sql, () if source is None else (source,))}

    def vector_for(self, sha256: str) -> np.ndarray | None:
        """The stored embedding of this content, if any (lets the indexer skip re-encoding duplicates)."""
        row = self._conn().execute("SELECT embedding FROM vectors WHERE sha256=?", (sha256,)).fetchone()
        return None if row is None else np.frombuffer(row[0], dtype=np.float32).copy()

    def get(self, key: str) -> dict | None:
        row = (
            self._conn().execute(f"SELECT {', '.join(layout.COLS)} FROM items WHERE key=?", (key,)).fetchone()
        )
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

    def catalogs(self) -> dict[str, dict]:
        """source -> spec in the order catalogs were first indexed (the first to claim a file owns it)."""
        rows = self._conn().execute("SELECT source, spec FROM catalogs ORDER BY rowid")
        return {source: json.loads(spec) for source, spec in rows}

    def metadata_fields(self, limit_values: int = 50) -> dict[str, list[str]]:
        """field -> up to ``limit_values`` distinct scalar values, as the strings filters compare."""

        def compute() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {name: [] for name in self._known_fields()}
            for name, value in self._conn().execute(
                "SELECT je.key, CAST(je.value AS TEXT) FROM items, json_each(items.metadata) AS je "
                "WHERE je.type NOT IN ('object', 'array', 'null') GROUP BY 1, 2 ORDER BY 1, 2"
            ):
                if len(out[name]) < limit_values:
                    out[name].append(value)
            return out

        return self._cached(("fields", limit_values), compute)

    def embeddings(self, keys: list[str] | None = None) -> tuple[list[str], np.ndarray]:
        """Stored (normalised) item embeddings, sorted by key or in the order asked; unknown keys left out."""
        sql = "SELECT i.key, v.embedding FROM items i JOIN vectors v ON v.id = i.vector_id"
        if keys is None:
            rows = self._conn().execute(sql + " ORDER BY i.key").fetchall()
        else:
            found = dict(layout.select_in(self._conn(), sql + " WHERE i.key IN ({})", list(keys)))
            rows = [(k, found[k]) for k in dict.fromkeys(keys) if k in found]
        return [r[0] for r in rows], layout.blobs(r[1] for r in rows).reshape(-1, self.dim)

    # ------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int = 10, filters: dict[str, str] | None = None
    ) -> list[list[Hit]]:
        """Top-k items per query by cosine; ``filters`` match metadata fields exactly, as strings, ANDed.

        Items with identical content share one vector and so come back as one hit: the first matching
        key (sorted) is the hit, the other keys are its ``duplicates``.
        """
        q = check_queries(queries, self.dim)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        gen = self._gen
        where, args = filter_sql(filters or {}, self._known_fields() if filters else [])
        allowed = self._allowed(where, args) if where else None
        if allowed is not None and allowed.size == 0:
            return [[] for _ in q]
        if allowed is not None and allowed.size <= EXACT_FILTER_MAX and gen.ann.effective_factory != "Flat":
            sql = "SELECT id, embedding FROM vectors WHERE id IN ({})"
            rows = layout.select_in(self._conn(), sql, allowed.tolist())
            scores, ids = exact_search(q, int(k), *layout.id_vectors(rows, gen.dim))
        else:
            with self._ann_lock.shared():
                scores, ids = gen.ann.search(q, int(k), allowed)
        model = str(gen.manifest["fingerprint"].get("id"))
        return assemble_hits(self._conn(), gen.name, model, scores, ids, where, args)

    def _known_fields(self) -> list[str]:
        sql = "SELECT DISTINCT je.key FROM items, json_each(items.metadata) AS je ORDER BY 1"
        return self._cached(("known",), lambda: [r[0] for r in self._conn().execute(sql)])

    def _allowed(self, where: str, args: list) -> np.ndarray:
        sql = f"SELECT DISTINCT vector_id FROM items WHERE {where}"
        return self._cached(
            ("allowed", *args),
            lambda: np.fromiter((r[0] for r in self._conn().execute(sql, args)), dtype=np.int64),
        )

    def _cached(self, key: tuple, compute: Callable[[], _T]) -> _T:
        """Memo for derived reads (fields, filter id sets), dropped whenever seq or generation moves."""
        stamp = (self._gen.name, self._gen.seq)
        if self._cache.get("stamp") != stamp or len(self._cache) > 64:
            self._cache = {"stamp": stamp}
        cache = self._cache
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    # ------------------------------------------------------------------ writes
    def write(
        self,
        items: Sequence[NewItem] = (),
        failures: Sequence[Failure] = (),
        remove_keys: Sequence[str] = (),
        exclude: Sequence[str] = (),
    ) -> int:
        """Apply one batch as ONE transaction and return the new seq.

        ``exclude`` paths are recorded as exclusions first (:mod:`vitrine.index.exclusions`), then failures,
        then items upserted by key (clearing their failure; excluded ones are left out), then keys
        removed; vectors no longer referenced by any item are deleted and tombstoned.
        """
        self._require_writable()
        now, added, candidates = time.time(), {}, set()
        with self._write_lock:
            conn = self._conn()
            with layout.writing(conn, self.root):
                seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'") + 1
                exclusions.add(conn, exclude, now)
                excluded = exclusions.read(conn)
                items = [i for i in items if not excluded.covers(i.key)]
                conn.executemany(
                    "INSERT OR REPLACE INTO failures(key, path, reason, time, source) VALUES (?,?,?,?,?)",
                    [(f.key, f.path, f.reason, now, f.source) for f in failures],
                )
                for item in items:
                    layout.upsert_item(conn, item, seq, now, added, candidates, self._normalised)
                for key in remove_keys:
                    candidates.update(
                        r[0]
                        for r in conn.execute(
                            "DELETE FROM items WHERE key=? RETURNING vector_id", (key,)
                        ).fetchall()
                    )
                    conn.execute("DELETE FROM failures WHERE key=?", (key,))
                dropped = layout.drop_orphans(conn, seq, candidates, added)
                conn.execute("UPDATE state SET value=? WHERE name='seq'", (seq,))
            with self._ann_lock.exclusive():
                if added:
                    self._gen.ann.add(np.array(list(added), dtype=np.int64), np.stack(list(added.values())))
                self._gen.ann.remove(np.array(dropped, dtype=np.int64))
                self._gen.seq = seq
            return seq

    def _normalised(self, item: NewItem) -> np.ndarray:
        if item.embedding is None:
            raise StoreError(
                f"item {item.key!r}: no embedding given and no stored vector for content "
                f"{item.sha256}; encode the image first"
            )
        vec = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vec)) if vec.size == self.dim else 0.0
        if not np.isfinite(norm) or norm == 0.0:
            raise StoreError(
                f"item {item.key!r}: embedding must be a finite non-zero vector of dim "
                f"{self.dim} (model {self.fingerprint.get('id')}), got size {vec.size}"
            )
        return vec / norm

    def exclusions(self) -> exclusions.Exclusions:
        """Paths removed from this index that builds must not add again (until :meth:`restore`)."""
        return self._cached(("excluded",), lambda: exclusions.read(self._conn()))

    def restore(self, paths: Sequence[str]) -> list[str]:
        """Lift exclusions; returns those that were recorded (the next build indexes them again)."""
        self._require_writable()
        with self._write_lock:
            conn = self._conn()
            with layout.writing(conn, self.root):
                lifted = exclusions.remove(conn, paths)
                conn.execute("UPDATE state SET value=value+1 WHERE name='seq'")
            self._gen.seq += 1
            return lifted

    def record_catalog(self, source: str, spec: dict) -> None:
        """Remember how a catalog was indexed, so a reindex job can reopen it later."""
        self._require_writable()
        with self._write_lock:
            conn = self._conn()
            with layout.writing(conn, self.root):
                conn.execute(
                    "INSERT INTO catalogs(source, spec, updated) VALUES (?,?,?) ON CONFLICT(source) "
                    "DO UPDATE SET spec=excluded.spec, updated=excluded.updated",  # keeps first-seen order
                    (source, json.dumps(spec, sort_keys=True, default=str), time.time()),
                )
                conn.execute("UPDATE state SET value=value+1 WHERE name='seq'")
            self._gen.seq += 1

    def flush(self, retrain: bool = False) -> None:
        """Save the FAISS snapshot for the current seq atomically (retraining first when the ANN asks
        for it, or always with ``retrain``: a fresh coarse quantizer on all current data), then delete
        older snapshots."""
        self._require_writable()
        with self._write_lock:
            gen = self._gen
            rebuild = retrain or gen.ann.needs_rebuild(gen.ann.ntotal)
            if rebuild:
                fresh = AnnIndex(gen.dim, gen.manifest.get("factory"), gen.manifest.get("search_params"))
                rows = self._conn().execute("SELECT id, embedding FROM vectors")
                fresh.rebuild(*layout.id_vectors(rows, gen.dim))
                with self._ann_lock.exclusive():
                    gen.ann = fresh
            snapshots.mirror_manifest(self._conn(), self.root, gen.manifest)
            if gen.snapshot_seq == gen.seq and gen.verified and not rebuild:
                return
            snapshots.save(gen)  # with its checksum; also replaces a snapshot that failed its checks

    def _require_writable(self) -> None:
        if not self.writable or self._closed:
            state = "closed" if self._closed else "opened read-only (open it with writable=True)"
            raise StoreError(f"index {self.root} is {state}; it cannot be changed")
