"""Incremental, resumable indexing of a catalog into an index store.

For each record: unchanged files (same size and mtime as indexed) are skipped without reading;
others are read and hashed in worker threads; content already in the index (a touched file, a
duplicate, a rename) reuses its stored vector, and so does content known to a ``donor`` store (the
live generation, while a reindex with the same model fills the next one); only new content is decoded
and encoded. Results
are committed in batches of ``commit_every`` items, each one SQLite transaction (on a second thread,
while the next batch is prepared), so a kill at any moment loses at most the batch being committed and
the one being prepared, and a re-run resumes where the last commit ended. Files
that cannot be read or decoded are recorded as failures with a reason and never stop the run.

One file listed by two catalogs of an index is one item (its key is the resolved path), and it belongs
to the catalog that indexed it first: a later catalog's build leaves its captions and metadata alone
and reports it under ``conflicts``, so metadata never flips with the order of builds. When the owner
stops listing the file (its build prunes it), the next build of another catalog that lists it takes it.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from vitrine.catalog.readers import Catalog, Record, read_source
from vitrine.errors import FingerprintMismatch, ImageDecodeError
from vitrine.files import DEFAULT_MAX_FILE_BYTES
from vitrine.index.store import Failure, IndexReader, IndexWriter, NewItem
from vitrine.model.encoder import Encoder

#: Catalog records whose owners are looked up in one query.
OWNER_CHUNK = 1024


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

    def _jobs(
        self, catalog: Catalog, source: str, states: dict, seen: set[str], report: BuildReport
    ) -> Iterator[_Job]:
        records = iter(catalog)
        while chunk := list(itertools.islice(records, OWNER_CHUNK)):
            owners = self._other_owners(chunk, source, states)
            for record in chunk:
                if record.key in seen or self._excluded.covers(record.key):
                    continue
                seen.add(record.key)
                if record.key in owners:
                    report.conflicted += 1
                    report.conflicts.append({"path": record.key, "catalog": owners[record.key]})
                    self.progress(1)
                    continue
                job = self._job(record, states, report)
                if job is not None:
                    yield job

    def _other_owners(self, records: list[Record], source: str, states: dict) -> dict[str, str]:
        """key -> owning catalog, for keys of ``records`` that another catalog holds (module docstring).
        Only keys new to this catalog are looked up, one query per chunk, so a build never loads every
        key of the index into memory nor pays a query per record."""
        owners = self.store.sources([r.key for r in records if r.key not in states])
        return {key: owner for key, owner in owners.items() if owner != source}

    def _job(self, record: Record, states: dict, report: BuildReport) -> _Job | None:
        """The job of one record, or None when its file is unchanged since it was indexed."""
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
            return None
        job.is_update = known is not None
        return job

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
        """Batches of ``commit_every`` results, each committed on a second thread while the next one is
        prepared here (SQLite releases the GIL while it works), one commit in flight at a time, in order."""
        items: list[NewItem] = []
        failures: list[Failure] = []
        last_flush = time.monotonic()
        with ThreadPoolExecutor(1, thread_name_prefix="vitrine-commit") as committer:
            pending = None
            for job, result in results:
                if isinstance(result, ImageDecodeError):
                    failures.append(Failure(job.record.key, job.record.path, result.reason, source))
                else:
                    items.append(self._new_item(job, result, source, report))
                self.progress(1)
                if len(items) + len(failures) >= self.commit_every:
                    pending = self._hand_off(committer, pending, items, failures, report)
                    items, failures = [], []
                    if time.monotonic() - last_flush > self.flush_seconds:
                        self._settle(pending)
                        pending = None
                        self.store.flush()
                        last_flush = time.monotonic()
            self._settle(self._hand_off(committer, pending, items, failures, report))
            committer.submit(self.store.close_thread_connection).result()  # the thread ends with the run

    def _hand_off(
        self,
        committer: ThreadPoolExecutor,
        pending: tuple[Future, list[NewItem]] | None,
        items: list[NewItem],
        failures: list[Failure],
        report: BuildReport,
    ) -> tuple[Future, list[NewItem]] | None:
        """Wait for the commit in flight, then start this batch's (None when it is empty)."""
        self._settle(pending)
        if not items and not failures:
            return None
        return committer.submit(self._commit, items, failures, report), items

    def _settle(self, pending: tuple[Future, list[NewItem]] | None) -> None:
        """Wait for a commit (its error is raised here) and report its items to ``on_commit``."""
        if pending is None:
            return
        pending[0].result()
        if self.on_commit is not None and pending[1]:
            self.on_commit(list(pending[1]))

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
        """The committer thread: one batch, one transaction."""
        self.store.write(items=items, failures=failures)
        report.failed += len(failures)
        report.failures.extend({"path": f.path, "reason": f.reason} for f in failures)
