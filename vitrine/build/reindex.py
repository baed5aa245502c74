"""Reindex jobs: build the next generation beside the live one, validate it, and only then swap it in.

A job rebuilds every catalog the live generation records (``IndexReader.catalogs()``) into a new
generation, with a new model or with the same one (then every vector is copied from the live
generation, never re-encoded, and an IVF index gets a fresh coarse quantizer trained on the current
data: ``retrain_ivf``). Readers keep serving the live generation throughout and move over in
``IndexReader.refresh()`` once ``CURRENT`` is replaced.

Why it is safe to ``kill -9`` at any moment: the build holds the writer lock and commits in batches
like any build; the job (model id, factory, flags, start time) is recorded in ``reindex-job.json``
inside the generation being built, so a re-run of the same job finds that generation and continues
it, while a job for another model or other flags discards it. Nothing the readers use is touched
until the single atomic rename of ``CURRENT``.

Validation before the swap (knobs in :class:`ReindexSettings`): the item count equals the distinct
catalog records minus the records that failed; no record fails that did not fail in the live
generation; and where items have captions, text→image R@10 on a deterministic sample of up to
``eval_size`` captioned items (stored image embeddings of each generation, captions encoded by each
generation's model) is not worse than the live generation's by more than ``recall_margin`` points,
overall and, with ``slice_field``, in every slice (value of that metadata field) holding at least
``slice_min_items`` sampled items (:mod:`vitrine.quality`): an aggregate can hide a slice that got worse.
A rejected generation is kept for inspection and discarded by the next job. Every job appends one
JSON line to ``ROOT/reindex.jsonl`` (:func:`read_log` reads the last ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vitrine.build.ingest import Ingestor
from vitrine.catalog.readers import open_catalog
from vitrine.drift import assess, reference
from vitrine.errors import ReindexError, StoreError, ValidationFailed
from vitrine.index import generations, layout
from vitrine.index.atomic import write_atomic
from vitrine.index.generations import JOB_FILE, read_job
from vitrine.index.store import IndexReader, IndexStore, IndexWriter
from vitrine.model.encoder import Encoder
from vitrine.open_index import encoder_fingerprint
from vitrine.quality import RECALL_K, CaptionSample, caption_sample, compare_slices, sample_ranks, t2i_recall

LOG_FILE = "reindex.jsonl"


@dataclass(frozen=True)
class ReindexSettings:
    """``keep``: published generations kept (>= 2; rollback can step back ``keep - 1`` times).
    ``eval_size``: captioned items in the recall check (R@10 among that many images; larger is
    steadier and costs one text encoding per caption per model). ``recall_margin``: points of R@10 the
    new generation may lose, overall and in each slice of ``slice_field`` (a metadata field; None =
    no slices) with at least ``slice_min_items`` sampled items. ``commit_every``: items per
    transaction, the most a kill can lose."""

    retrain_ivf: bool = False
    keep: int = 3
    eval_size: int = 500
    recall_margin: float = 2.0
    commit_every: int = 256
    slice_field: str | None = None
    slice_min_items: int = 50


@dataclass
class Validation:
    """The numbers of the three checks; ``problems`` says which failed (empty: publish)."""

    count: int
    expected: int
    new_failures: int
    recall_old: float | None
    recall_new: float | None
    margin: float
    problems: list[str] = field(default_factory=list)
    slices: list[dict[str, Any]] = field(default_factory=list)  # per slice: items, old and new R@10

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "problems"}


@dataclass
class ReindexReport:
    """One job, as logged to ``reindex.jsonl`` and printed by ``--json``.

    ``status``: published, rejected, skipped (no drift), rolled_back, or failed (an error stopped it;
    a re-run resumes). ``model`` is the fingerprint id of the model the job used."""

    status: str
    from_generation: str | None
    to_generation: str | None
    model: str | None
    reason: str = ""
    validation: dict[str, Any] | None = None
    seconds: float = 0.0
    time: float = field(default_factory=time.time)
    model_name: str | None = None
    build: dict[str, int] = field(default_factory=dict)
    drift: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Reindexer:
    """Reindex the index at ``root`` with ``encoder`` (the live generation's model or a new one).

    ``old_encoder`` loads the live generation's model; it is only called for the recall check when
    the models differ and items have captions. ``progress`` gets the number of records handled.
    """

    def __init__(
        self,
        root: str | Path,
        encoder: Encoder,
        *,
        old_encoder: Callable[[], Encoder] | None = None,
        settings: ReindexSettings | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self.root = Path(root)
        self.encoder = encoder
        self.old_encoder = old_encoder
        self.settings = settings or ReindexSettings()
        self.progress = progress
        if self.settings.keep < generations.MIN_KEEP:
            raise ReindexError(f"keep must be at least {generations.MIN_KEEP}, got {self.settings.keep}")
        if (
            self.settings.eval_size < 0
            or self.settings.recall_margin < 0
            or self.settings.slice_min_items < 1
        ):
            raise ReindexError("eval_size and recall_margin must not be negative, slice_min_items at least 1")

    def run(self, *, if_drifted: bool = False) -> ReindexReport:
        """Build, validate, publish. Raises ValidationFailed (live generation untouched) when a check
        fails; with ``if_drifted`` it returns a ``skipped`` report when no drift is detected."""
        start = time.monotonic()
        live = IndexStore.open(self.root)
        report = ReindexReport("failed", live.generation, None, self.encoder.version)
        report.model_name = str(self.encoder.fingerprint.get("model"))
        try:
            if if_drifted and not self._drifted(live, report):
                report.status = "skipped"
                return report
            self._build_and_swap(live, report)
            return report
        except BaseException as exc:  # logged as failed (a re-run resumes), then raised as it was
            if report.status == "failed":
                report.reason = str(exc) or type(exc).__name__
            raise
        finally:
            live.close()
            report.seconds = round(time.monotonic() - start, 3)
            append_log(self.root, report.to_dict())

    def _drifted(self, live: IndexReader, report: ReindexReport) -> bool:
        """A model change is drift by definition; otherwise :func:`vitrine.drift.assess.assess` decides."""
        if live.fingerprint.get("id") != self.encoder.version:
            report.reason = (
                f"model changed: {live.fingerprint.get('model')} (id {live.fingerprint.get('id')}) -> "
                f"{self.encoder.fingerprint.get('model')} (id {self.encoder.version})"
            )
            return True
        assessed = assess.assess(self.root, fingerprint=self.encoder.fingerprint, window_seconds=None)
        report.reason, report.drift = assessed.reason, assessed.to_dict()
        return bool(assessed.drifted)

    def _build_and_swap(self, live: IndexReader, report: ReindexReport) -> None:
        job = self._job(live)
        new = IndexStore.create_generation(
            self.root,
            encoder_fingerprint(self.encoder),
            factory=live.manifest.get("factory"),
            search_params=live.manifest.get("search_params"),
            resume=lambda root: _resume(root, job),
        )
        try:
            report.to_generation = new.generation
            resumed = read_job(self.root / new.generation)
            job = {**(resumed or job), "state": "building"}
            write_job(self.root / new.generation, job)
            report.build, keys = self._build(live, new)
            report.build["resumed"] = int(resumed is not None)
            check = self._validate(live, new, keys)
            report.validation = check.to_dict()
            if check.problems:
                self._reject(live, new, job, report, check)
            reference.capture(new)
            new.publish(keep=self.settings.keep)
            write_job(self.root / new.generation, {**job, "state": "published"})
            report.status = "published"
            report.reason = report.reason or self._purpose(live)
        finally:
            new.close()

    def _purpose(self, live: IndexReader) -> str:
        if live.fingerprint.get("id") != self.encoder.version:
            return f"new model {self.encoder.fingerprint.get('model')} (id {self.encoder.version})"
        return "same model, IVF retrained" if self.settings.retrain_ivf else "same model, rebuilt"

    def _job(self, live: IndexReader) -> dict[str, Any]:
        return {
            "model": self.encoder.version,
            "model_name": self.encoder.fingerprint.get("model"),
            "factory": live.manifest.get("factory"),
            "retrain_ivf": self.settings.retrain_ivf,
            "started": time.time(),
            "from_generation": live.generation,
        }

    def _build(self, live: IndexReader, new: IndexWriter) -> tuple[dict[str, int], set[str]]:
        """Ingest every recorded catalog into ``new``; (summed build counters, distinct catalog keys)."""
        catalogs = live.catalogs()
        if not catalogs:
            raise ReindexError(
                f"generation {live.generation} of {self.root} records no catalog to rebuild from; "
                "index a catalog with `python -m indexer build CATALOG --index DIR` first"
            )
        donor = live if live.fingerprint.get("id") == new.fingerprint.get("id") else None
        excluded = live.exclusions()  # takedowns carry over to the new generation before anything is read
        if excluded:
            new.write(exclude=sorted(excluded.paths))
        totals: Counter[str] = Counter()
        keys: set[str] = set()
        for spec in catalogs.values():  # first-indexed first, so each file keeps its owner
            catalog = open_catalog(**spec)
            keys.update(r.key for r in catalog if not excluded.covers(r.key))
            every = self.settings.commit_every
            ingest = Ingestor(new, self.encoder, commit_every=every, donor=donor, progress=self.progress)
            done = ingest.run(catalog).to_dict()
            totals.update({k: v for k, v in done.items() if isinstance(v, int)})
        if "IVF" in str(new.stats()["effective_factory"]):
            new.flush(retrain=True)  # centroids from all current data, not from the first batches
        totals["count"] = len(new)
        return dict(totals), keys

    def _validate(self, live: IndexReader, new: IndexWriter, keys: set[str]) -> Validation:
        failed_new = {f["key"]: f for f in new.failures() if f["key"] in keys}
        beyond = sorted(set(failed_new) - {f["key"] for f in live.failures()})
        s = self.settings
        check = Validation(len(new), len(keys - set(failed_new)), len(beyond), None, None, s.recall_margin)
        if check.count != check.expected:
            check.problems.append(
                f"item count {check.count} != expected {check.expected} (catalog records minus failures)"
            )
        if beyond:
            shown = ", ".join(f"{failed_new[k]['path']} ({failed_new[k]['reason']})" for k in beyond[:3])
            check.problems.append(f"{len(beyond)} new failure(s) not failing in {live.generation}: {shown}")
        self._check_recall(live, new, check)
        return check

    def _check_recall(self, live: IndexReader, new: IndexWriter, check: Validation) -> None:
        """R@10 of the live and the new generation on the same captioned sample (nothing when nothing
        is captioned), overall and per slice."""
        s = self.settings
        sample = caption_sample(new, s.eval_size)
        sample = sample.restrict(live.embeddings(sample.keys)[0])  # items both generations hold
        if not sample.keys:
            return
        old, fresh = self._ranks(live, new, sample)
        check.recall_old, check.recall_new = t2i_recall(old), t2i_recall(fresh)
        if check.recall_new < check.recall_old - s.recall_margin:
            check.problems.append(
                f"text->image R@{RECALL_K} {check.recall_new:.2f} vs {check.recall_old:.2f} in "
                f"{live.generation}: worse by more than the {s.recall_margin:g}-point margin"
            )
        if s.slice_field is not None:
            values = sample.values(s.slice_field)
            check.slices, problems = compare_slices(
                old, fresh, values, min_items=s.slice_min_items, margin=s.recall_margin
            )
            check.problems += [f"{p} (in {live.generation})" for p in problems]

    def _ranks(self, live: IndexReader, new: IndexWriter, sample: CaptionSample) -> tuple[Any, Any]:
        """Caption ranks in (live, new): each generation's images, captions encoded by its own model."""
        captions, owner = sample.texts()
        new_texts = self.encoder.encode_texts(captions)
        same = live.fingerprint.get("id") == self.encoder.version
        old_encoder = self.encoder if same or self.old_encoder is None else self.old_encoder()
        if old_encoder.version != live.fingerprint.get("id"):
            raise ReindexError(f"the recall check needs the model of {live.generation} (old_encoder)")
        old_texts = new_texts if old_encoder is self.encoder else old_encoder.encode_texts(captions)
        return sample_ranks(live, sample, old_texts, owner), sample_ranks(new, sample, new_texts, owner)

    def _reject(
        self, live: IndexReader, new: IndexWriter, job: dict, report: ReindexReport, check: Validation
    ) -> None:
        write_job(self.root / new.generation, {**job, "state": "rejected"})
        report.status = "rejected"
        report.reason = (
            f"validation failed, {new.generation} not published ({live.generation} stays live): "
            + "; ".join(check.problems)
        )
        raise ValidationFailed(report.reason, report)


def _resume(root: Path, job: dict[str, Any]) -> str | None:
    """Under the writer lock: the unpublished generation building this same job, if any. Builds of
    other jobs and rejected builds are deleted; generations rolled away from and folders without a job
    (a job killed before it recorded itself) are left for the next publish to prune, so a name readers
    may have seen is never reused for another generation."""
    found = None
    for name in generations.unpublished(root):
        recorded = read_job(root / name)
        if recorded is not None and recorded.get("state") in ("published", generations.ROLLED_BACK):
            continue
        if recorded is None:
            continue  # not a job's (or its job was never recorded): the next publish prunes it
        if recorded is not None and recorded.get("state") == "building" and _same_job(recorded, job):
            if found is not None:
                shutil.rmtree(root / found, ignore_errors=True)
            found = name
            continue
        shutil.rmtree(root / name, ignore_errors=True)
    return found


def _same_job(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(k) == b.get(k) for k in ("model", "factory", "retrain_ivf"))


def write_job(folder: Path, job: dict[str, Any]) -> None:
    write_atomic(folder / JOB_FILE, json.dumps(job, indent=2, sort_keys=True).encode())


def rollback(root: str | Path) -> ReindexReport:
    """Make the previously published generation live again (readers follow on refresh); logged like a
    job. Raises ReindexError when there is nothing to roll back to."""
    start, root = time.monotonic(), Path(root)
    before, after = generations.rollback(root)
    manifest = layout.read_manifest(root / after)
    report = ReindexReport("rolled_back", before, after, str(manifest["fingerprint"].get("id")))
    report.model_name = str(manifest["fingerprint"].get("model"))
    report.reason = f"rolled back from {before} to {after}"
    report.seconds = round(time.monotonic() - start, 3)
    append_log(root, report.to_dict())
    return report


def append_log(root: Path, record: dict[str, Any]) -> None:
    """One JSON line, one ``write`` with O_APPEND and an fsync: concurrent jobs never interleave."""
    line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode()
    try:
        fd = os.open(root / LOG_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StoreError(f"cannot append to {root / LOG_FILE}: {exc.strerror or exc}") from exc


def read_log(root: str | Path, limit: int = 20, tail_bytes: int = 1 << 20) -> list[dict[str, Any]]:
    """The last ``limit`` job records, oldest first (a torn last line is skipped).

    Only the last ``tail_bytes`` of the file are read, so a scheduler's years-long log costs the app
    nothing when it shows the last job.
    """
    path = Path(root) / LOG_FILE
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - tail_bytes))
            lines = fh.read().decode(errors="replace").splitlines()[-limit:]
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def run_every(
    interval: float,
    job: Callable[[], object],
    *,
    on_error: Callable[[Exception], None],
    stop: threading.Event | None = None,
) -> int:
    """Run ``job`` now and then every ``interval`` seconds until ``stop`` is set; returns the runs.

    Start times keep a fixed rate (a run that overruns starts the next at once, never two at a time).
    An ``Exception`` from one run goes to ``on_error`` and the loop goes on; KeyboardInterrupt (and
    whatever the caller maps SIGTERM to) ends it.
    """
    stop = stop or threading.Event()
    runs, next_at = 0, time.monotonic()
    while not stop.is_set():
        try:
            job()
        except Exception as exc:  # one bad run must not end the scheduler
            on_error(exc)
        runs += 1
        next_at = max(next_at + interval, time.monotonic())
        stop.wait(next_at - time.monotonic())
    return runs
