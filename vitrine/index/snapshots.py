"""Loading one generation of an index directory: its manifest, and a FAISS snapshot that is proved good.

A snapshot ``index.<seq>.faiss`` is derived state (every embedding is in SQLite), so a damaged one must
cost a rebuild, never wrong answers, and must never be saved again as if it were good. Two checks:

* a checksum: :func:`save` hashes the written file and records the digest in ``index.<seq>.faiss.sha256``
  (atomically, before the snapshot is renamed into place, so a snapshot never sits beside the sum of
  other bytes); loading recomputes it, and a mismatch (overwritten or truncated bytes) means rebuild.
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

    @property
    def dim(self) -> int:
        return int(self.manifest["fingerprint"]["dim"])

    def reload(self, conn: sqlite3.Connection) -> None:
        """(Re)load the ANN: the newest good snapshot plus a replay, else a rebuild from SQLite."""
        self.ann, self.seq, self.snapshot_seq, self.verified, self.damage = load_ann(
            conn, self.path, self.manifest, self.dim
        )


def load_generation(root: Path, name: str, expected: dict | None, writable: bool) -> Generation:
    """Open generation ``name``: manifest, fingerprint check, ANN (FingerprintMismatch, StoreError)."""
    path = root / name
    manifest = layout.read_manifest(path)
    if expected is not None and expected.get("id") != manifest["fingerprint"].get("id"):
        raise FingerprintMismatch(manifest["fingerprint"], expected)
    gen = Generation(name, path, manifest, AnnIndex(int(manifest["fingerprint"]["dim"])))
    conn = layout.connect(path / "meta.sqlite", readonly=not writable)
    try:
        gen.reload(conn)
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


def save(gen: Generation) -> None:
    """Save the ANN as ``index.<seq>.faiss`` with its checksum, then delete older snapshots."""
    target = gen.path / f"index.{gen.seq}.faiss"
    gen.ann.save(target, written=lambda tmp: write_atomic(sum_path(target), digest(tmp).encode()))
    gen.snapshot_seq, gen.verified = gen.seq, True
    for snap_seq, snap in snapshots(gen.path):
        if snap_seq != gen.seq:
            snap.unlink(missing_ok=True)
            sum_path(snap).unlink(missing_ok=True)


def checksum_problem(snap: Path) -> tuple[bool, str | None]:
    """(checksum recorded, damage reason or None). Raises OSError when the snapshot itself is gone."""
    try:
        recorded = sum_path(snap).read_text().strip()
    except FileNotFoundError:
        return False, None  # written before checksums existed, or killed before its sum: the sample decides
    except (OSError, UnicodeDecodeError) as exc:
        return True, f"{sum_path(snap).name} is unreadable ({exc})"
    actual = digest(snap)
    if actual != recorded:
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
    conn: sqlite3.Connection, path: Path, manifest: dict, dim: int
) -> tuple[AnnIndex, int, int | None, bool, list[str]]:
    """(ann, seq, snapshot seq, verified, damage): the newest snapshot that passes the checks, plus a
    replay of later commits, or a full build from SQLite when none does (missing, unreadable, damaged,
    or disagreeing with SQLite after the replay).

    Read-only connections (store readers, ``PRAGMA query_only``) map snapshots of at least
    ``ann.MMAP_MIN_BYTES``; a writer always reads them, as it adds to the structure right away.
    """
    factory, params = manifest.get("factory"), manifest.get("search_params")
    seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'")
    readonly = bool(layout.scalar(conn, "PRAGMA query_only"))
    damage: list[str] = []
    for snap_seq, snap in snapshots(path):
        if snap_seq > seq:
            continue
        try:
            recorded, problem = checksum_problem(snap)
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
    with layout.reading(conn):
        seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'")
        ids, vectors = layout.id_vectors(conn.execute("SELECT id, embedding FROM vectors"), dim)
    ann = AnnIndex(dim, factory, params)
    ann.rebuild(ids, vectors)
    return ann, seq, None, False, damage


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
