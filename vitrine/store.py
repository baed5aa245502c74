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
import fcntl
import json
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar
from urllib.parse import quote

import numpy as np

from vitrine.ann import AnnIndex, exact_search, snapshots, write_atomic
from vitrine.errors import FingerprintMismatch, QueryError, StoreError

FORMAT = 1
EXACT_FILTER_MAX = 8192
_CHUNK = 500
_T = TypeVar("_T")
_GEN_RE = re.compile(r"^gen-(\d{6})$")
_SCHEMA = """
CREATE TABLE vectors(id INTEGER PRIMARY KEY AUTOINCREMENT, sha256 TEXT NOT NULL UNIQUE,
    embedding BLOB NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX vectors_seq ON vectors(seq);
CREATE TABLE items(key TEXT PRIMARY KEY, path TEXT NOT NULL, vector_id INTEGER NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER, mtime_ns INTEGER, captions TEXT NOT NULL DEFAULT '[]',
    metadata TEXT NOT NULL DEFAULT '{}', source TEXT NOT NULL DEFAULT '', added REAL NOT NULL);
CREATE INDEX items_vector ON items(vector_id);
CREATE INDEX items_source ON items(source);
CREATE TABLE removed(vector_id INTEGER NOT NULL, seq INTEGER NOT NULL);
CREATE INDEX removed_seq ON removed(seq);
CREATE TABLE failures(key TEXT PRIMARY KEY, path TEXT, reason TEXT, time REAL, source TEXT DEFAULT '');
CREATE TABLE state(name TEXT PRIMARY KEY, value);
CREATE TABLE catalogs(source TEXT PRIMARY KEY, spec TEXT NOT NULL, updated REAL NOT NULL);
CREATE TABLE samples(kind TEXT NOT NULL, id INTEGER, embedding BLOB NOT NULL, time REAL NOT NULL, slice TEXT);
INSERT INTO state(name, value) VALUES ('seq', 0), ('schema', 1);
"""
_COLS = ("key", "path", "vector_id", "sha256", "size", "mtime_ns", "captions", "metadata", "source", "added")
_UPSERT = (f"INSERT INTO items({', '.join(_COLS)}) VALUES ({','.join('?' * len(_COLS))}) "
           "ON CONFLICT(key) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in _COLS[1:-1]))


@dataclass
class NewItem:
    """What the ingest pipeline hands to the store; ``embedding=None`` reuses the vector of ``sha256``."""

    key: str
    path: str
    sha256: str
    size: int
    mtime_ns: int
    captions: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    source: str = ""  # catalog id
    embedding: np.ndarray | None = None


@dataclass
class Failure:
    key: str
    path: str
    reason: str
    source: str = ""


@dataclass
class Hit:
    """One result; ``model`` (fingerprint id) and ``generation`` say which embedding space produced it."""

    key: str
    path: str
    score: float
    captions: list[str]
    metadata: dict
    model: str
    generation: str
    duplicates: list[str]  # other keys with identical content

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Generation:
    """Everything tied to one generation, swapped as a whole when CURRENT moves."""

    name: str
    path: Path
    manifest: dict
    ann: AnnIndex
    seq: int
    snapshot_seq: int | None

    @property
    def dim(self) -> int:
        return int(self.manifest["fingerprint"]["dim"])


class IndexStore:
    """An index directory opened for reading (any number, any process) or writing (one, via ``.lock``).

    Searches may run from many threads while another thread refreshes or writes: the in-memory FAISS
    is guarded by an RLock and every thread gets its own SQLite connection.
    """

    def __init__(self, root: Path, generation: str, *, writable: bool, lock_fd: int | None,
                 expected: dict | None) -> None:
        """Private: use :meth:`create`, :meth:`open` or :meth:`create_generation`."""
        self.root, self.writable, self._lock_fd, self._expected = root, writable, lock_fd, expected
        self._ann_lock, self._write_lock = threading.RLock(), threading.Lock()
        self._local, self._conns, self._cache, self._closed = threading.local(), [], {}, False
        for folder in (root, root / generation) if writable else ():
            for tmp in folder.glob("*.tmp-*"):  # left by a killed writer
                tmp.unlink(missing_ok=True)
        self._gen = self._load_generation(generation)

    @classmethod
    def create(cls, root: str | Path, fingerprint: dict, *, factory: str | None = None,
               search_params: dict | None = None) -> IndexStore:
        """A new index at ``root`` (a new folder, or one without CURRENT), returned open for writing."""
        store = cls._start(Path(root), fingerprint, factory, search_params, require_new=True)
        try:
            store.publish()
        except BaseException:
            store.close(flush=False)
            raise
        return store

    @classmethod
    def create_generation(cls, root: str | Path, fingerprint: dict, *, factory: str | None = None,
                          search_params: dict | None = None) -> IndexStore:
        """Start the next generation beside the live one (a reindex); readers see it after :meth:`publish`.

        It holds the writer lock, so incremental indexing waits until the reindex is done.
        """
        return cls._start(Path(root), fingerprint, factory, search_params, require_new=False)

    @classmethod
    def _start(cls, root: Path, fingerprint: dict, factory: str | None, search_params: dict | None,
               require_new: bool) -> IndexStore:
        dim = fingerprint.get("dim") if isinstance(fingerprint, dict) else None
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or not fingerprint.get("id"):
            raise StoreError(f"fingerprint needs a non-empty 'id' and a positive int 'dim': {fingerprint!r}")
        try:
            AnnIndex(dim, factory, search_params)
            root.mkdir(parents=True, exist_ok=True)
        except (ValueError, OSError) as exc:
            raise StoreError(f"cannot create index at {root}: {exc}") from exc
        lock = _acquire_lock(root)
        try:
            if require_new and (root / "CURRENT").exists():
                raise StoreError(f"an index already exists at {root}; open it or choose another folder")
            name = _new_generation(root, fingerprint, factory, search_params)
            return cls(root, name, writable=True, lock_fd=lock, expected=None)
        except BaseException:
            _release_lock(lock)
            raise

    def publish(self) -> None:
        """Flush, then make this generation the live one by replacing CURRENT atomically.

        The generation it replaces is kept for readers that have not refreshed yet; older ones and
        leftovers of interrupted builds are deleted.
        """
        self.flush()
        previous = _read_current(self.root) if (self.root / "CURRENT").exists() else None
        write_atomic(self.root / "CURRENT", self.generation.encode())
        for path in self.root.iterdir():
            if _GEN_RE.match(path.name) and path.name not in (self.generation, previous):
                shutil.rmtree(path, ignore_errors=True)

    @classmethod
    def open(cls, root: str | Path, *, expected_fingerprint: dict | None = None,
             writable: bool = False) -> IndexStore:
        """Open the live generation; FingerprintMismatch when it was built with another model."""
        root = Path(root)
        _read_current(root)  # fail before locking, naming the problem, when missing or corrupt
        lock = _acquire_lock(root) if writable else None
        try:  # (re)read under the lock: a reindex may have published meanwhile
            return cls(root, _read_current(root), writable=writable, lock_fd=lock,
                       expected=expected_fingerprint)
        except BaseException:
            _release_lock(lock)
            raise

    @staticmethod
    def exists(root: str | Path) -> bool:
        with contextlib.suppress(StoreError):
            return (Path(root) / _read_current(Path(root)) / "manifest.json").is_file()
        return False

    @staticmethod
    def read_manifest(root: str | Path) -> dict:
        """The live generation's manifest, without loading FAISS (callers learn the model first)."""
        return _read_manifest(Path(root) / _read_current(Path(root)))

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
            _release_lock(self._lock_fd)
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

    def _load_generation(self, name: str) -> _Generation:
        path = self.root / name
        manifest = _read_manifest(path)
        if self._expected is not None and self._expected.get("id") != manifest["fingerprint"].get("id"):
            raise FingerprintMismatch(manifest["fingerprint"], self._expected)
        gen = _Generation(name, path, manifest, AnnIndex(int(manifest["fingerprint"]["dim"])), 0, None)
        conn = _connect(path / "meta.sqlite", readonly=not self.writable)
        try:
            self._load_ann(conn, gen)
        except sqlite3.Error as exc:
            raise StoreError(f"index generation {path} has an unreadable meta.sqlite: {exc}") from exc
        finally:
            conn.close()
        return gen

    def _load_ann(self, conn: sqlite3.Connection, gen: _Generation) -> None:
        """Newest readable snapshot + replay of later commits; a full build from SQLite otherwise."""
        factory, params = gen.manifest.get("factory"), gen.manifest.get("search_params")
        seq = _one(conn, "SELECT value FROM state WHERE name='seq'")
        for snap_seq, snap in snapshots(gen.path):
            if snap_seq > seq:
                continue
            try:
                ann = AnnIndex.load(snap, params, factory)
            except (StoreError, OSError):
                continue  # unreadable, or replaced by the writer since it was listed
            delta = _changes(conn, snap_seq, gen.dim)
            if _apply(ann, delta):
                gen.ann, gen.seq, gen.snapshot_seq = ann, delta[0], snap_seq
                return
            break
        with _reading(conn):
            gen.seq = _one(conn, "SELECT value FROM state WHERE name='seq'")
            ids, vectors = _id_vectors(conn.execute("SELECT id, embedding FROM vectors"), gen.dim)
        gen.ann, gen.snapshot_seq = AnnIndex(gen.dim, factory, params), None
        gen.ann.rebuild(ids, vectors)

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise StoreError(f"index {self.root} is closed")
        path = self._gen.path
        if getattr(self._local, "path", None) != path:
            self._local.conn, self._local.path = _connect(path / "meta.sqlite", not self.writable), path
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
            name = _read_current(self.root)
            if name != self._gen.name:
                new = self._load_generation(name)
                with self._ann_lock:
                    self._gen, self._cache = new, {}
                return True
            gen, conn = self._gen, self._conn()
            if _one(conn, "SELECT value FROM state WHERE name='seq'") == gen.seq:
                return False
            delta = _changes(conn, gen.seq, gen.dim)
            with self._ann_lock:
                if _apply(gen.ann, delta):
                    gen.seq = delta[0]
                else:
                    self._load_ann(conn, gen)
                self._cache = {}
            return True

    # ------------------------------------------------------------------ reads
    def __len__(self) -> int:
        return _one(self._conn(), "SELECT COUNT(*) FROM items")

    def stats(self) -> dict:
        conn, gen = self._conn(), self._gen
        with _reading(conn):
            count, vectors, failed, catalogs = (_one(conn, f"SELECT COUNT(*) FROM {t}")
                                                for t in ("items", "vectors", "failures", "catalogs"))
        with self._ann_lock:
            ann = gen.ann
            memory, indexed = ann.memory_bytes(), ann.ntotal
        return {"count": count, "vectors": vectors, "failed": failed, "catalogs": catalogs,
                "factory": gen.manifest.get("factory"), "effective_factory": ann.effective_factory,
                "fallback_reason": ann.fallback_reason, "generation": gen.name, "seq": gen.seq,
                "snapshot_seq": gen.snapshot_seq, "indexed": indexed, "deleted_slots": ann.deleted,
                "memory_bytes": memory, "bytes_per_vector": memory / indexed if indexed else 0.0,
                "dim": gen.dim, "model": gen.manifest["fingerprint"].get("id")}

    def item_states(self, source: str | None = None) -> dict[str, tuple[int, int, str]]:
        """key -> (size, mtime_ns, sha256) in one query, so the indexer can skip unchanged files."""
        sql = "SELECT key, size, mtime_ns, sha256 FROM items" + ("" if source is None else " WHERE source=?")
        rows = self._conn().execute(sql, () if source is None else (source,))
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    def has_content(self, sha256: str) -> bool:
        return self._conn().execute("SELECT 1 FROM vectors WHERE sha256=?", (sha256,)).fetchone() is not None

    def get(self, key: str) -> dict | None:
        row = self._conn().execute(f"SELECT {', '.join(_COLS)} FROM items WHERE key=?", (key,)).fetchone()
        if row is None:
            return None
        item = dict(zip(_COLS, row, strict=True))
        item["captions"], item["metadata"] = json.loads(item["captions"]), json.loads(item["metadata"])
        return item

    def keys(self, source: str | None = None) -> set[str]:
        sql = "SELECT key FROM items" + ("" if source is None else " WHERE source=?")
        return {r[0] for r in self._conn().execute(sql, () if source is None else (source,))}

    def failures(self) -> list[dict]:
        """Recorded failures, newest first: key, path, reason, time, source."""
        rows = self._conn().execute("SELECT key, path, reason, time, source FROM failures ORDER BY time DESC")
        return [dict(zip(("key", "path", "reason", "time", "source"), r, strict=True)) for r in rows]

    def catalogs(self) -> dict[str, dict]:
        return {r[0]: json.loads(r[1]) for r in self._conn().execute("SELECT source, spec FROM catalogs")}

    def metadata_fields(self, limit_values: int = 50) -> dict[str, list[str]]:
        """field -> up to ``limit_values`` distinct scalar values, as the strings filters compare."""
        def compute() -> dict[str, list[str]]:
            out: dict[str, list[str]] = {name: [] for name in self._known_fields()}
            for name, value in self._conn().execute(
                    "SELECT je.key, CAST(je.value AS TEXT) FROM items, json_each(items.metadata) AS je "
                    "WHERE je.type NOT IN ('object', 'array', 'null') GROUP BY 1, 2 ORDER BY 1, 2"):
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
            found = dict(_select_in(self._conn(), sql + " WHERE i.key IN ({})", list(keys)))
            rows = [(k, found[k]) for k in dict.fromkeys(keys) if k in found]
        return [r[0] for r in rows], _blobs(r[1] for r in rows).reshape(-1, self.dim)

    # ------------------------------------------------------------------ search
    def search(self, queries: np.ndarray, k: int = 10, filters: dict[str, str] | None = None
               ) -> list[list[Hit]]:
        """Top-k items per query by cosine; ``filters`` match metadata fields exactly, as strings, ANDed.

        Items with identical content share one vector and so come back as one hit: the first matching
        key (sorted) is the hit, the other keys are its ``duplicates``.
        """
        q = self._check_queries(queries)
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise QueryError(f"k must be a positive integer, got {k!r}")
        gen = self._gen
        where, args = self._filter_sql(filters or {})
        allowed = self._allowed(where, args) if where else None
        if allowed is not None and allowed.size == 0:
            return [[] for _ in q]
        if allowed is not None and allowed.size <= EXACT_FILTER_MAX and gen.ann.effective_factory != "Flat":
            sql = "SELECT id, embedding FROM vectors WHERE id IN ({})"
            rows = _select_in(self._conn(), sql, allowed.tolist())
            scores, ids = exact_search(q, int(k), *_id_vectors(rows, gen.dim))
        else:
            with self._ann_lock:
                scores, ids = gen.ann.search(q, int(k), allowed)
        return self._hits(gen, scores, ids, where, args)

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.asarray(queries, dtype=np.float32)
        q = q[None, :] if q.ndim == 1 else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise QueryError(f"queries must have shape (n, {self.dim}) or ({self.dim},), got {q.shape}")
        norms = np.linalg.norm(q, axis=1, keepdims=True)
        if not np.isfinite(q).all() or (norms == 0).any():
            raise QueryError("queries must be finite, non-zero vectors")
        return np.ascontiguousarray(q / norms)

    def _filter_sql(self, filters: dict[str, str]) -> tuple[str, list]:
        if not filters:
            return "", []
        known = self._known_fields()
        unknown = sorted(set(filters) - set(known))
        if unknown:
            raise QueryError(f"unknown filter field(s) {unknown}; known fields: {known or 'none'}")
        if any('"' in name for name in filters):
            raise QueryError("filter field names containing '\"' are not supported")
        args = [a for name, value in sorted(filters.items()) for a in (f'$."{name}"', str(value))]
        return " AND ".join(["CAST(json_extract(metadata, ?) AS TEXT) = ?"] * len(filters)), args

    def _known_fields(self) -> list[str]:
        sql = "SELECT DISTINCT je.key FROM items, json_each(items.metadata) AS je ORDER BY 1"
        return self._cached(("known",), lambda: [r[0] for r in self._conn().execute(sql)])

    def _allowed(self, where: str, args: list) -> np.ndarray:
        sql = f"SELECT DISTINCT vector_id FROM items WHERE {where}"
        return self._cached(("allowed", *args), lambda: np.fromiter(
            (r[0] for r in self._conn().execute(sql, args)), dtype=np.int64))

    def _cached(self, key: tuple, compute: Callable[[], _T]) -> _T:
        """Memo for derived reads (fields, filter id sets), dropped whenever seq or generation moves."""
        stamp = (self._gen.name, self._gen.seq)
        if self._cache.get("stamp") != stamp or len(self._cache) > 64:
            self._cache = {"stamp": stamp}
        cache = self._cache
        if key not in cache:
            cache[key] = compute()
        return cache[key]

    def _hits(self, gen: _Generation, scores: np.ndarray, ids: np.ndarray, where: str, args: list
              ) -> list[list[Hit]]:
        sql = (f"SELECT vector_id, key, path, captions, metadata, {f'({where})' if where else '1'} "
               "FROM items WHERE vector_id IN ({}) ORDER BY vector_id, key")
        groups: dict[int, list[tuple]] = {}
        for row in _select_in(self._conn(), sql, np.unique(ids[ids >= 0]).tolist(), args):
            groups.setdefault(row[0], []).append(row[1:])
        model, out = str(gen.manifest["fingerprint"].get("id")), []
        for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=True):
            hits = []
            for score, vid in zip(row_scores, row_ids, strict=True):
                group = groups.get(vid, [])
                first = next((g for g in group if g[4]), None)
                if first is not None:  # else: no match, or deleted after this ANN state was taken
                    dups = [g[0] for g in group if g is not first]
                    hits.append(Hit(first[0], first[1], float(score), json.loads(first[2]),
                                    json.loads(first[3]), model, gen.name, dups))
            out.append(hits)
        return out

    # ------------------------------------------------------------------ writes
    def write(self, items: Sequence[NewItem] = (), failures: Sequence[Failure] = (),
              remove_keys: Sequence[str] = ()) -> int:
        """Apply one batch as ONE transaction and return the new seq.

        Failures are recorded first, then items upserted by key (clearing their failure), then keys
        removed; vectors no longer referenced by any item are deleted and tombstoned.
        """
        self._require_writable()
        now, added, candidates = time.time(), {}, set()
        with self._write_lock:
            conn = self._conn()
            with _writing(conn, self.root):
                seq = _one(conn, "SELECT value FROM state WHERE name='seq'") + 1
                conn.executemany("INSERT OR REPLACE INTO failures(key, path, reason, time, source) VALUES "
                                 "(?,?,?,?,?)", [(f.key, f.path, f.reason, now, f.source) for f in failures])
                for item in items:
                    self._upsert(conn, item, seq, now, added, candidates)
                for key in remove_keys:
                    candidates.update(r[0] for r in conn.execute(
                        "DELETE FROM items WHERE key=? RETURNING vector_id", (key,)).fetchall())
                    conn.execute("DELETE FROM failures WHERE key=?", (key,))
                dropped = _drop_orphans(conn, seq, candidates, added)
                conn.execute("UPDATE state SET value=? WHERE name='seq'", (seq,))
            with self._ann_lock:
                if added:
                    self._gen.ann.add(np.array(list(added), dtype=np.int64), np.stack(list(added.values())))
                self._gen.ann.remove(np.array(dropped, dtype=np.int64))
                self._gen.seq = seq
            return seq

    def _upsert(self, conn: sqlite3.Connection, item: NewItem, seq: int, now: float,
                added: dict[int, np.ndarray], candidates: set[int]) -> None:
        if not item.key or not item.sha256:
            raise StoreError(f"item {item.key!r} ({item.path}): key and sha256 must be non-empty")
        old = conn.execute("SELECT vector_id FROM items WHERE key=?", (item.key,)).fetchone()
        row = conn.execute("SELECT id FROM vectors WHERE sha256=?", (item.sha256,)).fetchone()
        if row is not None:
            vid = row[0]
        else:
            vec = self._normalised(item)
            vid = conn.execute("INSERT INTO vectors(sha256, embedding, seq) VALUES (?,?,?)",
                               (item.sha256, vec.tobytes(), seq)).lastrowid
            added[vid] = vec
        conn.execute(_UPSERT, (item.key, item.path, vid, item.sha256, item.size, item.mtime_ns,
                               json.dumps(list(item.captions), ensure_ascii=False),
                               json.dumps(item.metadata, ensure_ascii=False, sort_keys=True, default=str),
                               item.source, now))
        conn.execute("DELETE FROM failures WHERE key=?", (item.key,))
        if old is not None and old[0] != vid:
            candidates.add(old[0])

    def _normalised(self, item: NewItem) -> np.ndarray:
        if item.embedding is None:
            raise StoreError(f"item {item.key!r}: no embedding given and no stored vector for content "
                             f"{item.sha256}; encode the image first")
        vec = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vec)) if vec.size == self.dim else 0.0
        if not np.isfinite(norm) or norm == 0.0:
            raise StoreError(f"item {item.key!r}: embedding must be a finite non-zero vector of dim "
                             f"{self.dim} (model {self.fingerprint.get('id')}), got size {vec.size}")
        return vec / norm

    def record_catalog(self, source: str, spec: dict) -> None:
        """Remember how a catalog was indexed, so a reindex job can reopen it later."""
        self._require_writable()
        with self._write_lock:
            conn = self._conn()
            with _writing(conn, self.root):
                conn.execute("INSERT OR REPLACE INTO catalogs(source, spec, updated) VALUES (?,?,?)",
                             (source, json.dumps(spec, sort_keys=True, default=str), time.time()))
                conn.execute("UPDATE state SET value=value+1 WHERE name='seq'")
            self._gen.seq += 1

    def flush(self) -> None:
        """Save the FAISS snapshot for the current seq atomically (retraining first when the ANN asks
        for it), then delete older snapshots."""
        self._require_writable()
        with self._write_lock:
            gen = self._gen
            rebuild = gen.ann.needs_rebuild(gen.ann.ntotal)
            if rebuild:
                fresh = AnnIndex(gen.dim, gen.manifest.get("factory"), gen.manifest.get("search_params"))
                rows = self._conn().execute("SELECT id, embedding FROM vectors")
                fresh.rebuild(*_id_vectors(rows, gen.dim))
                with self._ann_lock:
                    gen.ann = fresh
            if gen.snapshot_seq == gen.seq and not rebuild:
                return
            gen.ann.save(gen.path / f"index.{gen.seq}.faiss")
            gen.snapshot_seq = gen.seq
            for snap_seq, snap in snapshots(gen.path):
                if snap_seq != gen.seq:
                    snap.unlink(missing_ok=True)

    def _require_writable(self) -> None:
        if not self.writable or self._closed:
            state = "closed" if self._closed else "opened read-only (open it with writable=True)"
            raise StoreError(f"index {self.root} is {state}; it cannot be changed")


# ---------------------------------------------------------------------- SQLite helpers
def _connect(db: Path, readonly: bool, create: bool = False) -> sqlite3.Connection:
    try:
        conn = sqlite3.connect(f"file:{quote(str(db))}?mode={'rwc' if create else 'rw'}", uri=True,
                               isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only kill -9
        if readonly:
            conn.execute("PRAGMA query_only=1")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open index database {db}: {exc}") from exc
    return conn


@contextlib.contextmanager
def _reading(conn: sqlite3.Connection) -> Iterator[None]:
    """One consistent snapshot across several SELECTs (WAL readers never block the writer)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


@contextlib.contextmanager
def _writing(conn: sqlite3.Connection, root: Path) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write index {root}: {exc}") from exc


def _one(conn: sqlite3.Connection, sql: str) -> int:
    return int(conn.execute(sql).fetchone()[0])


def _blobs(blobs: Iterable[bytes]) -> np.ndarray:
    return np.frombuffer(bytearray().join(blobs), dtype=np.float32)


def _id_vectors(rows: Iterable[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = list(rows)
    return np.array([r[0] for r in rows], dtype=np.int64), _blobs(r[1] for r in rows).reshape(-1, dim)


def _select_in(conn: sqlite3.Connection, sql: str, values: list, args: Sequence = ()) -> list[tuple]:
    """``sql`` with one ``IN ({})``, run in chunks to stay under SQLite's variable limit."""
    rows: list[tuple] = []
    for i in range(0, len(values), _CHUNK):
        chunk = values[i:i + _CHUNK]
        rows += conn.execute(sql.format(",".join("?" * len(chunk))), [*args, *chunk]).fetchall()
    return rows


def _changes(conn: sqlite3.Connection, since: int, dim: int) -> tuple[int, np.ndarray, np.ndarray, list, int]:
    """(seq, added ids, their vectors, dropped ids, vector count) for commits after ``since``."""
    with _reading(conn):
        rows = conn.execute("SELECT id, embedding FROM vectors WHERE seq > ?", (since,))
        ids, vectors = _id_vectors(rows, dim)
        dropped = [r[0] for r in conn.execute("SELECT vector_id FROM removed WHERE seq > ?", (since,))]
        return (_one(conn, "SELECT value FROM state WHERE name='seq'"), ids, vectors, dropped,
                _one(conn, "SELECT COUNT(*) FROM vectors"))


def _apply(ann: AnnIndex, delta: tuple) -> bool:
    """Replay a delta; False when the result disagrees with SQLite (the caller then rebuilds)."""
    ann.add(delta[1], delta[2])
    ann.remove(np.array(delta[3], dtype=np.int64))
    return ann.ntotal == delta[4]


def _drop_orphans(conn: sqlite3.Connection, seq: int, candidates: set[int], added: dict) -> list[int]:
    """Delete vectors no item references any more; tombstone those that existed before this commit."""
    dropped = []
    for vid in sorted(candidates):
        if conn.execute("SELECT 1 FROM items WHERE vector_id=? LIMIT 1", (vid,)).fetchone() is None:
            conn.execute("DELETE FROM vectors WHERE id=?", (vid,))
            if added.pop(vid, None) is None:
                conn.execute("INSERT INTO removed(vector_id, seq) VALUES (?,?)", (vid, seq))
                dropped.append(vid)
    return dropped


# ---------------------------------------------------------------------- files
def _new_generation(root: Path, fingerprint: dict, factory: str | None, search_params: dict | None) -> str:
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := _GEN_RE.match(p.name))]
    name = f"gen-{max(numbers, default=0) + 1:06d}"
    try:
        (root / name).mkdir()
        conn = _connect(root / name / "meta.sqlite", readonly=False, create=True)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot create index generation {root / name}: {exc}") from exc
    manifest = {"format": FORMAT, "fingerprint": fingerprint, "metric": "ip", "factory": factory,
                "search_params": dict(search_params or {}), "dim": fingerprint["dim"], "generation": name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomic(root / name / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    AnnIndex(int(fingerprint["dim"]), factory, search_params).save(root / name / "index.0.faiss")
    return name


def _read_current(root: Path) -> str:
    try:
        name = (root / "CURRENT").read_text().strip()
    except OSError as exc:
        raise StoreError(f"no Vitrine index at {root}: cannot read CURRENT ({exc.strerror})") from exc
    if not _GEN_RE.match(name):
        raise StoreError(f"index {root} is corrupt: CURRENT names {name!r}, not a generation")
    return name


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"index generation {path} has no readable manifest.json: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"index generation {path}: unsupported manifest format (expected {FORMAT})")
    if not isinstance(manifest.get("fingerprint"), dict) or "dim" not in manifest["fingerprint"]:
        raise StoreError(f"index generation {path}: manifest has no fingerprint with a dim")
    return manifest


def _acquire_lock(root: Path) -> int:
    try:
        fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot lock index {root} for writing: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise StoreError(f"index {root} is being written by another process; wait for it or stop it") from exc
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
