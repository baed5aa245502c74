"""Opening an index directory: SQLite (source of truth) + a FAISS snapshot (derived) + a manifest, in
generations. Readers and the writer are different types, so misuse fails where it is written:

* :meth:`IndexStore.open` → :class:`~vitrine.index.reader.IndexReader` (search, get, stats, catalogs,
  metadata, refresh; any number, in any process);
* :meth:`IndexStore.open_writer`, :meth:`IndexStore.create`, :meth:`IndexStore.create_generation` →
  :class:`~vitrine.index.writer.IndexWriter` (an ``IndexReader`` that also writes, removes, flushes,
  records catalogs and exclusions, publishes; one at a time, by ``ROOT/.lock``).

``ROOT/CURRENT`` names the live generation; ``ROOT/gen-NNNNNN/`` holds ``manifest.json``, ``meta.sqlite``
(WAL, every embedding) and ``index.<seq>.faiss`` (the ANN as of SQLite commit ``seq``). Why a ``kill -9``
at any instant loses nothing is explained in :mod:`vitrine.index.writer`; how a generation is loaded and
its snapshot proved good, in :mod:`vitrine.index.snapshots`; the search path, in
:mod:`vitrine.index.searching`. A reindex builds the next generation beside the live one
(:meth:`IndexStore.create_generation`) and ``IndexWriter.publish`` swaps CURRENT; readers move over in
``IndexReader.refresh``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, TypeVar, overload

from vitrine.errors import StoreError
from vitrine.index import diagnosis, embeddings, generations, layout
from vitrine.index.hits import Hit
from vitrine.index.layout import Failure, NewItem
from vitrine.index.reader import IndexReader
from vitrine.index.writer import IndexWriter

__all__ = ["Failure", "Hit", "IndexReader", "IndexStore", "IndexWriter", "NewItem"]
_Opened = TypeVar("_Opened", bound=IndexReader)


class IndexStore:
    """The constructors of index readers and writers (not instantiated itself)."""

    @overload
    @staticmethod
    def open(
        root: str | Path, *, expected_fingerprint: dict | None = None, writable: Literal[False] = False
    ) -> IndexReader: ...

    @overload
    @staticmethod
    def open(
        root: str | Path, *, expected_fingerprint: dict | None = None, writable: Literal[True]
    ) -> IndexWriter: ...

    @staticmethod
    def open(
        root: str | Path, *, expected_fingerprint: dict | None = None, writable: bool = False
    ) -> IndexReader:
        """Open the live generation for reading (``writable=True``: the older spelling of
        :meth:`open_writer`). FingerprintMismatch when it was built with another model, and
        :class:`IndexDamaged` (the shared diagnosis, with the way out) when the directory is damaged."""
        if writable:
            return IndexStore.open_writer(root, expected_fingerprint=expected_fingerprint)
        return _open(IndexReader, Path(root), expected_fingerprint, lock=False)

    @staticmethod
    def open_writer(root: str | Path, *, expected_fingerprint: dict | None = None) -> IndexWriter:
        """Open the live generation for writing: takes the writer lock (StoreError while another
        process holds it)."""
        return _open(IndexWriter, Path(root), expected_fingerprint, lock=True)

    @staticmethod
    def create(
        root: str | Path,
        fingerprint: dict,
        *,
        factory: str | None = None,
        search_params: dict | None = None,
        embedding_dtype: str = embeddings.DEFAULT,
    ) -> IndexWriter:
        """A new index at ``root`` (a new folder, or one without CURRENT), returned open for writing.

        ``embedding_dtype``: float16 (default) or float32 storage of embeddings in SQLite
        (:mod:`vitrine.index.embeddings`)."""
        writer = _start(
            Path(root), fingerprint, factory, search_params, diagnosis.require_absent, None, embedding_dtype
        )
        try:
            writer.publish()
        except BaseException:
            writer.close(flush=False)
            raise
        return writer

    @staticmethod
    def create_generation(
        root: str | Path,
        fingerprint: dict,
        *,
        factory: str | None = None,
        search_params: dict | None = None,
        resume: Callable[[Path], str | None] | None = None,
        embedding_dtype: str = embeddings.DEFAULT,
    ) -> IndexWriter:
        """Start the next generation beside the live one (a reindex); readers see it after ``publish``.

        It holds the writer lock, so incremental indexing waits until the reindex is done. ``resume``
        runs under that lock and may name an unpublished generation to continue instead of a new one
        (a resumable reindex job; it may also delete stale ones).
        """
        return _start(Path(root), fingerprint, factory, search_params, None, resume, embedding_dtype)

    @staticmethod
    def exists(root: str | Path) -> bool:
        """True when ``root`` holds an index, healthy or damaged (``diagnosis.diagnose``)."""
        return diagnosis.diagnose(root).kind != diagnosis.ABSENT

    @staticmethod
    def read_manifest(root: str | Path) -> dict:
        """The live generation's manifest, without loading FAISS (callers learn the model first)."""
        return layout.read_manifest(Path(root) / layout.read_current(Path(root)))


def _open(kind: type[_Opened], root: Path, expected: dict | None, lock: bool) -> _Opened:
    try:
        layout.read_current(root)  # fail before locking, naming the problem, when missing or corrupt
    except StoreError as exc:
        raise diagnosis.explain(root, exc) from exc
    fd = layout.acquire_lock(root) if lock else None
    try:  # (re)read under the lock: a reindex may have published meanwhile
        return kind(root, layout.read_current(root), lock_fd=fd, expected=expected)
    except StoreError as exc:
        layout.release_lock(fd)
        raise diagnosis.explain(root, exc) from exc
    except BaseException:
        layout.release_lock(fd)
        raise


def _start(
    root: Path,
    fingerprint: dict,
    factory: str | None,
    search_params: dict | None,
    absent: Callable[[Path], None] | None,
    resume: Callable[[Path], str | None] | None,
    embedding_dtype: str,
) -> IndexWriter:
    lock, name = generations.start(root, fingerprint, factory, search_params, absent, resume, embedding_dtype)
    try:
        return IndexWriter(root, name, lock_fd=lock, expected=None)
    except BaseException:
        layout.release_lock(lock)
        raise
