"""The on-disk layout of an index directory: CURRENT, generations, manifests, the writer lock, and the
SQLite schema and helpers that :class:`vitrine.index.store.IndexStore` builds on.

Every file is replaced atomically (temporary name, fsync, rename); ``CURRENT`` names the live
generation; ``.lock`` (flock) admits one writer at a time while readers never block.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import numpy as np

from vitrine.errors import StoreError
from vitrine.index import embeddings, fulltext
from vitrine.index.ann import AnnIndex
from vitrine.index.atomic import write_atomic

FORMAT = 1
CHUNK = 500
GEN_RE = re.compile(r"^gen-(\d{6})$")
#: Names only an index directory holds (any one of them marks a folder as an index, perhaps damaged).
INDEX_ENTRY_RE = re.compile(r"^(CURRENT|HISTORY|\.lock|drift\.sqlite|reindex\.jsonl|gen-\d{6})$")
SCHEMA = """
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
INSERT INTO state(name, value) VALUES ('seq', 0), ('schema', 1);
"""


#: Address space a read-only connection maps of its database (shared page cache, not private memory).
READER_MMAP_BYTES = 1 << 30
#: Below this much free space, a failed open or write is reported as a full disk.
MIN_FREE_BYTES = 1 << 20


def connect(db: Path, readonly: bool, create: bool = False) -> sqlite3.Connection:
    """A connection to ``db``; readers fall back to read-only opening where the normal one fails.

    Why the fallback: a WAL database is normally read through its ``-shm`` file, which a reader
    creates (and writes) beside the database. On a read-only mount, or a full disk, that fails with
    "unable to open database file" / "disk I/O error" although every byte of the index is readable.
    """
    try:
        conn = _open(db, "rwc" if create else "rw", readonly)
        if readonly:
            _probe(conn)
        return conn
    except sqlite3.Error as exc:
        if not readonly:
            raise StoreError(f"cannot open index database {db}: {exc}{space_note(db.parent)}") from exc
        return _connect_fallback(db, exc)


def space_note(folder: Path) -> str:
    """``"; no space left on device ..."`` when ``folder``'s file system is full, else ``""``: SQLite
    reports a full disk as "disk I/O error" when it cannot grow its ``-shm`` file."""
    try:
        free = os.statvfs(folder)
    except OSError:
        return ""
    if free.f_bavail * free.f_frsize >= MIN_FREE_BYTES:
        return ""
    return (
        f"; no space left on device: the disk holding {folder} has {free.f_bavail * free.f_frsize} bytes free"
    )


def _open(db: Path, mode: str, readonly: bool, immutable: bool = False) -> sqlite3.Connection:
    conn = sqlite3.connect(
        f"file:{quote(str(db))}?mode={mode}" + ("&immutable=1" if immutable else ""),
        uri=True,
        isolation_level=None,
        check_same_thread=False,
        timeout=30.0,
    )
    try:
        if not immutable:
            conn.execute("PRAGMA synchronous=FULL")  # a commit survives power loss, not only kill -9
        if readonly:
            conn.execute("PRAGMA query_only=1")
            # Searches read ~10 random rows each: through the OS page cache by mmap that is several times
            # faster than through SQLite's read() and its small page cache (bench/RESULTS.md, "Load").
            conn.execute(f"PRAGMA mmap_size={READER_MMAP_BYTES}")
        else:  # a batch's staged rows (vitrine.index.upsert) stay in memory, never in a temp file
            conn.execute("PRAGMA temp_store=MEMORY")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _probe(conn: sqlite3.Connection) -> None:
    """SQLite opens lazily: read the schema now so a failure shows here, not in the first search."""
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        conn.close()
        raise


def _connect_fallback(db: Path, first: sqlite3.Error) -> sqlite3.Connection:
    """``mode=ro`` (works while ``-wal`` and ``-shm`` exist), else ``immutable=1``, but only when the
    ``-wal`` file is absent or empty: immutable ignores the WAL, so with commits still in it the reader
    would see an older (or broken) database. With an empty WAL the main file holds every commit.
    Immutable skips locking, so it assumes no writer: true where this fallback is needed (no writer
    can create its ``-wal``/``-shm`` on a read-only mount or a full disk either); a writer appearing
    later is not seen by this connection until the reader reopens.
    """
    with contextlib.suppress(sqlite3.Error):
        conn = _open(db, "ro", True)
        _probe(conn)
        return conn
    wal = Path(f"{db}-wal")
    if wal.exists() and wal.stat().st_size > 0:
        raise StoreError(
            f"cannot open index database {db} read-only: {first}; its write-ahead log {wal.name} holds "
            "commits that SQLite can only read with write access to that folder (or a -shm file beside it)"
        ) from first
    try:
        conn = _open(db, "ro", True, immutable=True)
        _probe(conn)
        return conn
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open index database {db}: {first}; read-only: {exc}") from exc


@contextlib.contextmanager
def reading(conn: sqlite3.Connection) -> Iterator[None]:
    """One consistent snapshot across several SELECTs (WAL readers never block the writer)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


@contextlib.contextmanager
def writing(conn: sqlite3.Connection, root: Path) -> Iterator[None]:
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot write index {root}: {exc}{space_note(root)}") from exc


def scalar(conn: sqlite3.Connection, sql: str) -> int:
    return int(conn.execute(sql).fetchone()[0])


def id_vectors(rows: Iterable[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, float32 vectors) of ``(id, embedding blob)`` rows (:mod:`vitrine.index.embeddings`)."""
    rows = list(rows)
    return np.array([r[0] for r in rows], dtype=np.int64), embeddings.decode([r[1] for r in rows], dim)


def select_in(conn: sqlite3.Connection, sql: str, values: list, args: Sequence = ()) -> list[tuple]:
    """``sql`` with one ``IN ({})``, run in chunks to stay under SQLite's variable limit."""
    rows: list[tuple] = []
    for i in range(0, len(values), CHUNK):
        chunk = values[i : i + CHUNK]
        rows += conn.execute(sql.format(",".join("?" * len(chunk))), [*args, *chunk]).fetchall()
    return rows


def changes(conn: sqlite3.Connection, since: int, dim: int) -> tuple[int, np.ndarray, np.ndarray, list, int]:
    """(seq, added ids, their vectors, dropped ids, vector count) for commits after ``since``."""
    with reading(conn):
        rows = conn.execute("SELECT id, embedding FROM vectors WHERE seq > ?", (since,))
        ids, vectors = id_vectors(rows, dim)
        dropped = [r[0] for r in conn.execute("SELECT vector_id FROM removed WHERE seq > ?", (since,))]
        return (
            scalar(conn, "SELECT value FROM state WHERE name='seq'"),
            ids,
            vectors,
            dropped,
            scalar(conn, "SELECT COUNT(*) FROM vectors"),
        )


def apply_delta(ann: AnnIndex, delta: tuple) -> bool:
    """Replay a delta; False when the result disagrees with SQLite (the caller then rebuilds)."""
    ann.add(delta[1], delta[2])
    ann.remove(np.array(delta[3], dtype=np.int64))
    return ann.ntotal == delta[4]


# ---------------------------------------------------------------------- files
def new_generation(
    root: Path,
    fingerprint: dict,
    factory: str | None,
    search_params: dict | None,
    embedding_dtype: str = embeddings.DEFAULT,
) -> str:
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := GEN_RE.match(p.name))]
    name = f"gen-{max(numbers, default=0) + 1:06d}"
    try:
        (root / name).mkdir()
        conn = connect(root / name / "meta.sqlite", readonly=False, create=True)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA + fulltext.SCHEMA)  # items_fts and the triggers keeping it in step
        finally:
            conn.close()
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot create index generation {root / name}: {exc}") from exc
    manifest = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "metric": "ip",
        "factory": factory,
        "search_params": dict(search_params or {}),
        "dim": fingerprint["dim"],
        "embedding_dtype": embeddings.check_dtype(embedding_dtype),
        "generation": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_atomic(root / name / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    AnnIndex(int(fingerprint["dim"]), factory, search_params).save(root / name / "index.0.faiss")
    return name


def check_index_dir(root: Path) -> None:
    """StoreError unless ``root`` may hold an index: absent, an empty folder, or an index's own layout.

    A photo folder given as ``--index`` by mistake must be refused before anything is written into it.
    """
    if not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"--index {root} is a file, not an index directory")
    try:
        entries = sorted(os.listdir(root))
    except OSError as exc:
        raise StoreError(f"cannot list index directory {root}: {exc.strerror}") from exc
    if entries and not any(INDEX_ENTRY_RE.match(name) for name in entries):
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise StoreError(
            f"--index {root} is an existing folder that is not a Vitrine index (it holds {shown}); "
            "give a new or empty folder"
        )


def read_current(root: Path) -> str:
    try:
        name = (root / "CURRENT").read_text().strip()
    except OSError as exc:
        raise StoreError(f"no Vitrine index at {root}: cannot read CURRENT ({exc.strerror})") from exc
    if not GEN_RE.match(name):
        raise StoreError(f"index {root} is corrupt: CURRENT names {name!r}, not a generation")
    return name


def read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"index generation {path} has no readable manifest.json: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise StoreError(f"index generation {path}: unsupported manifest format (expected {FORMAT})")
    if not isinstance(manifest.get("fingerprint"), dict) or "dim" not in manifest["fingerprint"]:
        raise StoreError(f"index generation {path}: manifest has no fingerprint with a dim")
    return manifest


def acquire_lock(root: Path) -> int:
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


def release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
    """A catalog item that could not be read or decoded, with a user-facing reason."""

    key: str
    path: str
    reason: str
    source: str = ""


COLS = ("key", "path", "vector_id", "sha256", "size", "mtime_ns", "captions", "metadata", "source", "added")
