"""Loading one generation of an index directory: its manifest, and a FAISS snapshot that is proved good.

A snapshot ``index.<seq>.faiss`` is derived state (every embedding is in SQLite), so a damaged one must
cost a rebuild, never wrong answers, and must never be saved again as if it were good. Two checks:

* a checksum: :func:`save` hashes the written file and records the digest, with the file's size and
  mtime, in ``index.<seq>.faiss.sha256`` (atomically, before the snapshot is renamed into place, so a
  snapshot never sits beside the sum of other bytes). A writer (and ``indexer repair``) recomputes the
  digest when it opens, as it reads every byte anyway; a reader only compares size and mtime, because
  hashing a snapshot of several GB at every open would cost seconds and pull the whole file through
  memory although a reader maps it and touches a few lists per query. A file rewritten since it was
  hashed (another mtime: copied without keeping times, overwritten) is hashed by readers too; damage
  that keeps size and mtime is left to the writer's next open and :func:`full_check` (run lazily by a
  server, after it is already answering). A mismatch means rebuild.
* a sample: after the replay of later commits, up to :data:`SAMPLE` vectors of SQLite (spread over the
  id range) are compared with what the structure holds for the same ids, where it keeps vectors exactly
  (:meth:`AnnIndex.stored`). That also covers snapshots written before checksums existed.

A failed check is logged with its reason and the ANN is rebuilt from SQLite; ``Generation.damage`` keeps
the reason (``status`` shows it) and ``verified`` stays False, so the writer's next flush saves a good
snapshot over the bad one. The manifest is mirrored into ``meta.sqlite`` (``state.manifest``) at every
flush, so ``indexer repair`` can rewrite a lost ``manifest.json`` exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitrine.errors import FingerprintMismatch, StoreError
from vitrine.index import layout
from vitrine.index.ann import AnnIndex
from vitrine.index.atomic import write_atomic

SNAPSHOT_RE = re.compile(r"^index\.(\d+)\.faiss$")
SUM_SUFFIX = ".sha256"
#: Vectors compared between SQLite and the loaded structure (indexed lookups: cheap at any size).
SAMPLE = 32
#: Rows read from SQLite per step of a rebuild (about 130 MB of float32 at dim 512).
REBUILD_CHUNK = 65_536
log = logging.getLogger(__name__)


@dataclass
class Generation:
    """Everything tied to one generation, swapped as a whole when CURRENT moves.

    ``verified``: the in-memory ANN matches a snapshot on disk whose checksum was checked (or that this
    process wrote); ``damage``: why a snapshot was refused at load (empty when none was).
    """

    name: str
    path: Path
    manifest: dict
    ann: AnnIndex
    seq: int = 0
    snapshot_seq: int | None = None
    verified: bool = False
    damage: list[str] = field(default_factory=list)
    hashed: bool = False  # the snapshot's whole checksum was recomputed at load (or none was loaded)

    @property
    def dim(self) -> int:
        return int(self.manifest["fingerprint"]["dim"])

    def reload(self, conn: sqlite3.Connection, full: bool | None = None) -> None:
        """(Re)load the ANN: the newest good snapshot plus a replay, else a rebuild from SQLite
        (``full``: hash the snapshot even in a reader, see :func:`load_ann`)."""
        self.ann, self.seq, self.snapshot_seq, self.verified, self.damage = load_ann(
            conn, self.path, self.manifest, self.dim, full
        )
        self.hashed = self.snapshot_seq is None or bool(full) or not layout.scalar(conn, "PRAGMA query_only")

    def full_check(self) -> str | None:
        """Why the snapshot this generation was loaded from fails its full checksum, or None (also when
        it was rebuilt from SQLite, or a writer has replaced that snapshot since)."""
        if self.snapshot_seq is None:
            return None
        snap = self.path / f"index.{self.snapshot_seq}.faiss"
        try:
            return checksum_problem(snap, full=True)[1]
        except FileNotFoundError:
            return None


def load_generation(
    root: Path, name: str, expected: dict | None, writable: bool, full: bool | None = None
) -> Generation:
    """Open generation ``name``: manifest, fingerprint check, ANN (FingerprintMismatch, StoreError);
    ``full`` as in :func:`load_ann`."""
    path = root / name
    manifest = layout.read_manifest(path)
    if expected is not None and expected.get("id") != manifest["fingerprint"].get("id"):
        raise FingerprintMismatch(manifest["fingerprint"], expected)
    gen = Generation(name, path, manifest, AnnIndex(int(manifest["fingerprint"]["dim"])))
    conn = layout.connect(path / "meta.sqlite", readonly=not writable)
    try:
        gen.reload(conn, full)
    except sqlite3.Error as exc:
        raise StoreError(f"index generation {path} has an unreadable meta.sqlite: {exc}") from exc
    finally:
        conn.close()
    return gen


def snapshots(folder: Path) -> list[tuple[int, Path]]:
    """``index.<seq>.faiss`` files in a folder as (seq, path), newest first."""
    found = ((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := SNAPSHOT_RE.match(p.name)))
    return sorted(found, reverse=True)


def sum_path(snapshot: Path) -> Path:
    return snapshot.with_name(snapshot.name + SUM_SUFFIX)


def digest(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class Record:
    """What a snapshot's sidecar holds: its sha256 and, since sidecars are JSON, its size and mtime
    when it was hashed (None in the bare-digest sidecars written before, which are always rehashed)."""

    sha256: str
    size: int | None = None
    mtime_ns: int | None = None

    @staticmethod
    def of(path: Path) -> Record:
        st = path.stat()
        return Record(digest(path), st.st_size, st.st_mtime_ns)

    @staticmethod
    def read(path: Path) -> Record:
        """ValueError when the sidecar holds neither a digest nor the JSON record; OSError when unreadable."""
        text = path.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", text):
            return Record(text)
        data = json.loads(text)
        if not isinstance(data, dict) or not re.fullmatch(r"[0-9a-f]{64}", str(data.get("sha256"))):
            raise ValueError("no sha256 in it")
        size, mtime = data.get("size"), data.get("mtime_ns")
        if not isinstance(size, int) or not isinstance(mtime, int):
            raise ValueError("no integer size and mtime_ns in it")
        return Record(data["sha256"], size, mtime)

    def to_bytes(self) -> bytes:
        return json.dumps({"sha256": self.sha256, "size": self.size, "mtime_ns": self.mtime_ns}).encode()


def save(gen: Generation) -> None:
    """Save the ANN as ``index.<seq>.faiss`` with its checksum, then delete older snapshots.

    The record is taken from the temporary file: the rename into place keeps its size and mtime."""
    target = gen.path / f"index.{gen.seq}.faiss"
    gen.ann.save(target, written=lambda tmp: write_atomic(sum_path(target), Record.of(tmp).to_bytes()))
    gen.snapshot_seq, gen.verified = gen.seq, True
    for snap_seq, snap in snapshots(gen.path):
        if snap_seq != gen.seq:
            snap.unlink(missing_ok=True)
            sum_path(snap).unlink(missing_ok=True)


def checksum_problem(snap: Path, full: bool = True) -> tuple[bool, str | None]:
    """(checksum recorded, damage reason or None). Raises OSError when the snapshot itself is gone.

    ``full=False`` (readers) trusts a snapshot whose size and mtime are those it was hashed with."""
    try:
        recorded = Record.read(sum_path(snap))
    except FileNotFoundError:
        return False, None  # written before checksums existed, or killed before its sum: the sample decides
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return True, f"{sum_path(snap).name} is unreadable ({exc})"
    st = snap.stat()
    if recorded.size is not None and st.st_size != recorded.size:
        return True, (
            f"{snap.name} has {st.st_size} bytes, its checksum was recorded over {recorded.size} "
            "(truncated or overwritten)"
        )
    if not full and recorded.mtime_ns == st.st_mtime_ns:
        return True, None
    if digest(snap) != recorded.sha256:
        return True, f"{snap.name} does not match its recorded checksum (overwritten or truncated)"
    return True, None


def sample_problem(conn: sqlite3.Connection, ann: AnnIndex, dim: int) -> str | None:
    """Why the structure disagrees with SQLite on a sample of vectors, or None (also when it cannot tell)."""
    lo, hi = conn.execute("SELECT MIN(id), MAX(id) FROM vectors").fetchone()
    if lo is None:
        return None
    rows = {}
    for at in np.linspace(lo, hi, SAMPLE).astype(np.int64).tolist():
        row = conn.execute("SELECT id, embedding FROM vectors WHERE id >= ? ORDER BY id LIMIT 1", (at,))
        rows.update(row.fetchall())
    ids, vectors = layout.id_vectors(rows.items(), dim)
    missing = ids[~np.isin(ids, ann.ids())]
    if missing.size:
        return f"vector ids {missing[:5].tolist()} of meta.sqlite are missing from the structure"
    held = ann.stored(ids)
    if held is not None and not np.allclose(held, vectors, rtol=0, atol=1e-6):
        wrong = ids[np.abs(held - vectors).max(axis=1) > 1e-6]
        return f"vectors {wrong[:5].tolist()} differ from meta.sqlite"
    return None


def load_ann(
    conn: sqlite3.Connection, path: Path, manifest: dict, dim: int, full: bool | None = None
) -> tuple[AnnIndex, int, int | None, bool, list[str]]:
    """(ann, seq, snapshot seq, verified, damage): the newest snapshot that passes the checks, plus a
    replay of later commits, or a full build from SQLite when none does (missing, unreadable, damaged,
    or disagreeing with SQLite after the replay).

    Read-only connections (store readers, ``PRAGMA query_only``) map snapshots of at least
    ``ann.MMAP_MIN_BYTES`` and check checksums by size and mtime only, unless ``full``; a writer always
    reads and hashes them, as it reads every byte anyway and adds to the structure right away.
    """
    factory, params = manifest.get("factory"), manifest.get("search_params")
    seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'")
    readonly = bool(layout.scalar(conn, "PRAGMA query_only"))
    full = not readonly if full is None else full
    damage: list[str] = []
    for snap_seq, snap in snapshots(path):
        if snap_seq > seq:
            continue
        try:
            recorded, problem = checksum_problem(snap, full)
            if problem is not None:
                damage.append(problem)
                continue
            ann = AnnIndex.load(snap, params, factory, mmap=readonly and AnnIndex.worth_mapping(snap))
        except FileNotFoundError:
            continue  # replaced by the writer since it was listed
        except (StoreError, OSError) as exc:
            damage.append(f"{snap.name} is unreadable ({exc})")
            continue
        delta = layout.changes(conn, snap_seq, dim)
        problem = None if layout.apply_delta(ann, delta) else "disagrees with meta.sqlite after replay"
        problem = problem or sample_problem(conn, ann, dim)
        if problem is None:
            return ann, delta[0], snap_seq, recorded, damage
        damage.append(f"{snap.name} {problem}")
        break
    if damage:
        log.warning("%s: rebuilding the FAISS index from meta.sqlite: %s", path, "; ".join(damage))
    ann = AnnIndex(dim, factory, params)
    return ann, build_from_sqlite(conn, ann), None, False, damage


def build_from_sqlite(conn: sqlite3.Connection, ann: AnnIndex) -> int:
    """Rebuild ``ann`` from every vector of meta.sqlite, in one read transaction; returns its seq.

    Streamed: the training sample is read by id and the vectors in :data:`REBUILD_CHUNK` rows, so a
    store of 10M vectors (20 GB of float32) rebuilds in the memory of its ANN structure plus one chunk.
    """
    with layout.reading(conn):
        seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'")
        ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM vectors ORDER BY id")), np.int64)

        def sample(positions: np.ndarray) -> np.ndarray:
            sql = "SELECT id, embedding FROM vectors WHERE id IN ({})"
            return layout.id_vectors(layout.select_in(conn, sql, ids[positions].tolist()), ann.dim)[1]

        def chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
            cursor = conn.execute("SELECT id, embedding FROM vectors ORDER BY id")
            while rows := cursor.fetchmany(REBUILD_CHUNK):
                yield layout.id_vectors(rows, ann.dim)

        ann.rebuild_from(len(ids), sample, chunks())
    return seq


def mirror_manifest(conn: sqlite3.Connection, root: Path, manifest: dict) -> None:
    """Keep a copy of the manifest in meta.sqlite (writers, at each flush), for :func:`mirrored_manifest`."""
    text = json.dumps(manifest, sort_keys=True)
    row = conn.execute("SELECT value FROM state WHERE name='manifest'").fetchone()
    if row is None or row[0] != text:
        with layout.writing(conn, root):
            conn.execute("INSERT OR REPLACE INTO state(name, value) VALUES ('manifest', ?)", (text,))


def mirrored_manifest(db: Path) -> dict | None:
    """The manifest copy a generation's meta.sqlite holds, or None (none recorded, or unreadable)."""
    if not db.is_file():
        return None
    try:
        conn = layout.connect(db, readonly=True)
        try:
            row = conn.execute("SELECT value FROM state WHERE name='manifest'").fetchone()
        finally:
            conn.close()
        manifest = json.loads(row[0]) if row else None
    except (sqlite3.Error, StoreError, ValueError, TypeError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("fingerprint"), dict) else None
