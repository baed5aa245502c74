"""The write side of an index directory: :class:`IndexWriter`, a reader that holds the writer lock.

Why a ``kill -9`` at any instant loses nothing: each :meth:`IndexWriter.write` is one SQLite transaction
that bumps ``state.seq``; vector rows carry the seq that added them, deleted vectors leave a tombstone
carrying the seq that deleted them, and vector ids are never reused. Opening loads the newest snapshot
``s <= seq`` and replays what came after ``s`` (:mod:`vitrine.index.snapshots`); a snapshot that is
missing, stale, unreadable or disagrees with SQLite after replay only costs a rebuild, never data. Files
are written to a temporary name, fsynced and renamed (:mod:`vitrine.index.atomic`), so a half-written file
is never mistaken for a real one; the next writer deletes the temporary files a killed one left.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vitrine.errors import StoreError
from vitrine.index import embeddings, exclusions, fulltext, generations, layout, snapshots, upsert
from vitrine.index.ann import AnnIndex
from vitrine.index.layout import Failure, NewItem
from vitrine.index.reader import IndexReader


class IndexWriter(IndexReader):
    """The one writer of an index directory (``ROOT/.lock``); it reads and searches like a reader.

    Open one with :meth:`vitrine.index.store.IndexStore.open_writer`, ``create`` or ``create_generation``.
    """

    writable = True

    def __init__(self, root: Path, generation: str, *, lock_fd: int | None, expected: dict | None) -> None:
        for folder in (root, root / generation):
            for tmp in folder.glob("*.tmp-*"):  # left by a killed writer
                tmp.unlink(missing_ok=True)
        super().__init__(root, generation, lock_fd=lock_fd, expected=expected)

    def _load_generation(self, name: str, full: bool | None = None) -> snapshots.Generation:
        gen = super()._load_generation(name, full)
        with layout.writing(self._conn_to(gen.path), self.root):
            self._conn_to(gen.path).execute(exclusions.TABLE)
            fulltext.ensure(self._conn_to(gen.path))  # migration of indexes made before full text
        return gen

    def close(self, flush: bool = True) -> None:
        """Flush (``flush=False`` abandons the snapshot), close connections, unlock. Idempotent."""
        if self._closed:
            return
        try:
            if flush:
                self.flush()
        finally:
            super().close()

    def __enter__(self) -> IndexWriter:
        return self

    def refresh(self) -> bool:
        """Nothing to pick up: this process makes every commit (the lock admits no other writer)."""
        return False

    def publish(self, keep: int = 2) -> None:
        """Flush, then make this generation the live one by replacing CURRENT atomically.

        The last ``keep`` published generations stay (at least the one it replaces, for readers that
        have not refreshed yet, and for rollback); older ones and leftovers of interrupted builds are
        deleted (:mod:`vitrine.index.generations`).
        """
        self.flush()
        generations.publish(self.root, self.generation, keep)

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
        self._require_open()
        now = time.time()
        with self._write_lock:
            conn = self._conn()
            with layout.writing(conn, self.root):
                seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'") + 1
                model = str(self.fingerprint.get("id"))
                batch = upsert.Batch(conn, seq, self.dim, self.embedding_dtype, model)
                exclusions.add(conn, exclude, now)
                excluded = exclusions.read(conn)
                conn.executemany(
                    "INSERT OR REPLACE INTO failures(key, path, reason, time, source) VALUES (?,?,?,?,?)",
                    [(f.key, f.path, f.reason, now, f.source) for f in failures],
                )
                upsert.upsert(batch, [item for item in items if not excluded.covers(item.key)], now)
                upsert.remove(batch, remove_keys)
                upsert.drop_orphans(batch)
                conn.execute("UPDATE state SET value=? WHERE name='seq'", (seq,))
            self._apply(batch.added, batch.dropped, seq)
            return seq

    @property
    def embedding_dtype(self) -> str:
        """How this generation stores embeddings: float16, or float32 for generations made before."""
        return embeddings.of_manifest(self.manifest)

    def _apply(self, added: dict[int, np.ndarray], dropped: list[int], seq: int) -> None:
        """Mirror a committed batch into the in-memory FAISS (searches wait for the exclusive lock)."""
        with self._ann_lock.exclusive():
            if added:
                self._gen.ann.add(np.array(list(added), dtype=np.int64), np.stack(list(added.values())))
            self._gen.ann.remove(np.array(dropped, dtype=np.int64))
            self._gen.seq = seq

    def restore(self, paths: Sequence[str]) -> list[str]:
        """Lift exclusions; returns those that were recorded (the next build indexes them again)."""
        self._require_open()
        with self._write_lock:
            conn = self._conn()
            with layout.writing(conn, self.root):
                lifted = exclusions.remove(conn, paths)
                conn.execute("UPDATE state SET value=value+1 WHERE name='seq'")
            self._gen.seq += 1
            return lifted

    def record_catalog(self, source: str, spec: dict) -> None:
        """Remember how a catalog was indexed, so a reindex job can reopen it later."""
        self._require_open()
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
        self._require_open()
        with self._write_lock:
            gen = self._gen
            rebuild = retrain or gen.ann.needs_rebuild(gen.ann.ntotal)
            if rebuild:
                fresh = AnnIndex(gen.dim, gen.manifest.get("factory"), gen.manifest.get("search_params"))
                snapshots.build_from_sqlite(self._conn(), fresh)
                with self._ann_lock.exclusive():
                    gen.ann = fresh
            snapshots.mirror_manifest(self._conn(), self.root, gen.manifest)
            if gen.snapshot_seq == gen.seq and gen.verified and not rebuild:
                return
            snapshots.save(gen)  # with its checksum; also replaces a snapshot that failed its checks

    def _require_open(self) -> None:
        if self._closed:
            raise StoreError(f"index {self.root} is closed; it cannot be changed")
