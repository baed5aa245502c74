"""Incremental, resumable indexing of a catalog into an index store.

For each record: unchanged files (same size and mtime as indexed) are skipped without reading;
others are read and hashed in worker threads; content already in the index (a touched file, a
duplicate, a rename) reuses its stored vector, and so does content known to a ``donor`` store (the
live generation, while a reindex with the same model fills the next one); only new content is decoded
and encoded. Results
are committed in batches of ``commit_every`` items, each one SQLite transaction, so a kill at any
moment loses at most the batch in flight and a re-run resumes where the last commit ended. Files
that cannot be read or decoded are recorded as failures with a reason and never stop the run.

One file listed by two catalogs of an index is one item (its key is the resolved path), and it belongs
to the catalog that indexed it first: a later catalog's build leaves its captions and metadata alone
and reports it under ``conflicts``, so metadata never flips with the order of builds. When the owner
stops listing the file (its build prunes it), the next build of another catalog that lists it takes it.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from vitrine.catalog.readers import Catalog, Record, read_source
from vitrine.errors import FingerprintMismatch, ImageDecodeError
from vitrine.files import DEFAULT_MAX_FILE_BYTES
from vitrine.index.store import Failure, IndexReader, IndexWriter, NewItem
from vitrine.model.encoder import Encoder


@dataclass
class BuildReport:
    """What one build did; ``count`` is the index size afterwards."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    reused: int = 0
    donor_reused: int = 0
    removed: int = 0
    failed: int = 0
    conflicted: int = 0
    count: int = 0
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)  # {"path", "catalog"}: kept by that catalog

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Job:
    record: Record
    size: int = 0
    mtime_ns: int = 0
    sha256: str = ""
    is_update: bool = False
    stored: np.ndarray | None = None  # the index already holds this content: no decode, no model
    donated: bool = False  # ... and it came from the donor store


def catalog_source(catalog: Catalog) -> str:
    """Identity of a catalog inside an index: its resolved path."""
    return str(catalog.spec.get("path", catalog.root))


class Ingestor:
    """Runs one build of ``catalog`` into ``store`` with ``encoder``.

    ``prune`` removes items of this catalog whose files are gone (like rclip), leaving other
    catalogs in the same index alone. ``flush_seconds`` bounds how stale the on-disk FAISS snapshot
    may get (a stale one is caught up from SQLite on open, so this only bounds reopen time).
    ``donor``: another store in the same embedding space (same fingerprint id) whose stored vectors
    are reused for content it knows, so a rebuild with the same model never re-encodes.
    ``on_commit`` is called with the items of each batch once it is committed (drift sampling).
    ``max_file_bytes``: larger files (and anything but a regular file) are recorded failures, never read.
    """

    def __init__(
        self,
        store: IndexWriter,
        encoder: Encoder,
        *,
        commit_every: int = 256,
        flush_seconds: float = 120.0,
        prune: bool = True,
        progress: Callable[[int], None] | None = None,
        donor: IndexReader | None = None,
        on_commit: Callable[[list[NewItem]], None] | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    ) -> None:
        if donor is not None and donor.fingerprint.get("id") != store.fingerprint.get("id"):
            raise FingerprintMismatch(donor.fingerprint, store.fingerprint)
        self.store = store
        self.donor = donor
        self.on_commit = on_commit
        self.encoder = encoder
        self.commit_every = commit_every
        self.flush_seconds = flush_seconds
        self.prune = prune
        self.max_file_bytes = max_file_bytes
        self.progress = progress or (lambda n: None)

    def run(self, catalog: Catalog) -> BuildReport:
        start = time.perf_counter()
        source = catalog_source(catalog)
        self.store.record_catalog(source, catalog.spec)
        report = BuildReport()
        states = self.store.item_states(source)
        seen: set[str] = set()
        self._excluded = self.store.exclusions()  # taken down with `indexer remove`: never read again
        jobs = self._jobs(catalog, source, states, seen, report)
        self._commit_stream(self.encoder.encode_stream(jobs, self._load), source, report)
        if self.prune:
            gone = sorted(set(states) - seen)
            if gone:
                self.store.write(remove_keys=gone)
            report.removed = len(gone)
        self.store.flush()
        report.count = len(self.store)
        report.seconds = round(time.perf_counter() - start, 3)
        return report

    def _other_owner(self, key: str, source: str, states: dict) -> str | None:
        """The catalog that already owns ``key`` when it is not this one (module docstring). Only keys new
        to this catalog are looked up, one primary-key read each, so a build never loads every key of
        the index into memory."""
        if key in states:
            return None
        item = self.store.get(key)
        return item["source"] if item is not None and item["source"] != source else None

    def _jobs(
        self, catalog: Catalog, source: str, states: dict, seen: set[str], report: BuildReport
    ) -> Iterator[_Job]:
        for record in catalog:
            if record.key in seen or self._excluded.covers(record.key):
                continue
            seen.add(record.key)
            owner = self._other_owner(record.key, source, states)
            if owner is not None:
                report.conflicted += 1
                report.conflicts.append({"path": record.key, "catalog": owner})
                self.progress(1)
                continue
            job = _Job(record)
            try:
                stat = os.stat(record.path)
                job.size, job.mtime_ns = stat.st_size, stat.st_mtime_ns
            except OSError:
                pass  # dataset rows and missing files: decided when read
            known = states.get(record.key)
            if known and job.size and (known[0], known[1]) == (job.size, job.mtime_ns):
                report.unchanged += 1
                self.progress(1)
                continue
            job.is_update = known is not None
            yield job

    def _load(self, job: _Job) -> Image.Image | None:
        """Worker thread: read, hash, and decode only when the content is new to the index.

        Content already stored (a touched file, a copy, a rename) takes its stored vector here, so a
        commit never depends on another item of the same run; copies inside one run are simply
        encoded twice and stored once.
        """
        data = read_source(job.record.path, self.max_file_bytes)
        job.size = job.size or len(data)
        job.sha256 = hashlib.sha256(data).hexdigest()
        job.stored = self.store.vector_for(job.sha256)
        if job.stored is None and self.donor is not None:
            job.stored = self.donor.vector_for(job.sha256)
            job.donated = job.stored is not None
        return None if job.stored is not None else self.encoder.load_image(data)

    def _commit_stream(self, results: Iterator, source: str, report: BuildReport) -> None:
        items: list[NewItem] = []
        failures: list[Failure] = []
        last_flush = time.monotonic()
        for job, result in results:
            if isinstance(result, ImageDecodeError):
                failures.append(Failure(job.record.key, job.record.path, result.reason, source))
            else:
                items.append(self._new_item(job, result, source, report))
            self.progress(1)
            if len(items) + len(failures) >= self.commit_every:
                self._commit(items, failures, report)
                if time.monotonic() - last_flush > self.flush_seconds:
                    self.store.flush()
                    last_flush = time.monotonic()
        self._commit(items, failures, report)

    def _new_item(self, job: _Job, embedding: np.ndarray | None, source: str, report: BuildReport) -> NewItem:
        if job.stored is not None:
            report.reused += 1
            report.donor_reused += job.donated
        if job.is_update:
            report.updated += 1
        else:
            report.added += 1
        r = job.record
        return NewItem(
            key=r.key,
            path=r.path,
            sha256=job.sha256,
            size=job.size,
            mtime_ns=job.mtime_ns,
            captions=list(r.captions),
            metadata=dict(r.metadata),
            source=source,
            embedding=job.stored if job.stored is not None else embedding,
        )

    def _commit(self, items: list[NewItem], failures: list[Failure], report: BuildReport) -> None:
        if not items and not failures:
            return
        self.store.write(items=items, failures=failures)
        if self.on_commit is not None and items:
            self.on_commit(list(items))
        report.failed += len(failures)
        report.failures.extend({"path": f.path, "reason": f.reason} for f in failures)
        items.clear()
        failures.clear()
