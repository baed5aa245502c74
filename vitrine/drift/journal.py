"""The drift journal, ``ROOT/drift.sqlite``: live embedding samples and the history of drift reports.

It sits beside the generations, not inside one, because its writers are not the index's writer: the
web app (a reader of the index) records query embeddings, the indexer records newly ingested items,
and any drift check appends its report. SQLite in WAL mode lets them all write without the index's
writer lock. Nothing here is precious (samples are a statistical view), so commits are not fsynced
and a failure to record never fails a search or a build.

Kinds of samples, each tagged with the generation and model fingerprint id it was embedded with
(a sample from another model's space is never compared):

* ``ingest``: items added to a generation after its reference was captured (new batches).
* ``query_baseline``: the first ``baseline_size`` queries a generation served: what its users asked
  while it was fresh. Kept until the generation goes.
* ``query``: later queries, the live window compared against that baseline.

Privacy: only embeddings and small metadata (query mode, filters) are stored; query texts only when
the recorder is told to (``store_text``), images never.
"""

from __future__ import annotations

import json
import random
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitrine.drift.twosample import Sample
from vitrine.errors import StoreError

FILE = "drift.sqlite"
SCHEMA = """
CREATE TABLE IF NOT EXISTS samples(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL,
    generation TEXT NOT NULL, model TEXT NOT NULL, time REAL NOT NULL, embedding BLOB NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}', score REAL, text TEXT);
CREATE INDEX IF NOT EXISTS samples_lookup ON samples(kind, generation, model, time);
CREATE TABLE IF NOT EXISTS reports(id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL,
    generation TEXT, model TEXT, source TEXT, drifted INTEGER NOT NULL, p_value REAL, auc REAL,
    mean_shift REAL, body TEXT NOT NULL);
"""


@dataclass
class Entry:
    """One embedding to record: ``meta`` is what slices are made of; ``score`` the query's best hit."""

    embedding: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    score: float | None = None
    text: str | None = None


class Journal:
    """``ROOT/drift.sqlite``, opened lazily per thread. ``max_rows`` caps each live kind (oldest go first).

    ``baseline_size`` is how many of a generation's first queries form its query baseline.
    """

    def __init__(self, root: str | Path, *, max_rows: int = 20000, baseline_size: int = 1000) -> None:
        self.path = Path(root) / FILE
        self.max_rows, self.baseline_size = max_rows, baseline_size
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(SCHEMA)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open drift journal {self.path}: {exc}") from exc
            self._local.conn = conn
            with self._lock:
                self._conns.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        self._local = threading.local()

    # -------------------------------------------------------------- samples
    def add(
        self, kind: str, generation: str, model: str, entries: Iterable[Entry], when: float | None = None
    ) -> int:
        """Record ``entries`` in one transaction; returns how many were stored."""
        now = time.time() if when is None else when
        rows = [
            (
                kind,
                generation,
                model,
                now,
                np.asarray(e.embedding, dtype=np.float32).tobytes(),
                json.dumps(e.meta, sort_keys=True, default=str),
                e.score,
                e.text,
            )
            for e in entries
        ]
        if not rows:
            return 0
        try:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT INTO samples(kind, generation, model, time, embedding, meta, score, text) "
                    "VALUES (?,?,?,?,?,?,?,?)",
                    rows,
                )
                if kind != "query_baseline":
                    conn.execute(
                        "DELETE FROM samples WHERE kind=? AND id <= (SELECT id FROM samples WHERE kind=? "
                        "ORDER BY id DESC LIMIT 1 OFFSET ?)",
                        (kind, kind, self.max_rows),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record drift samples in {self.path}: {exc}") from exc
        return len(rows)

    def count(self, kind: str, generation: str, model: str) -> int:
        sql = "SELECT COUNT(*) FROM samples WHERE kind=? AND generation=? AND model=?"
        return int(self._conn().execute(sql, (kind, generation, model)).fetchone()[0])

    def sample(
        self, kind: str, generation: str, model: str, *, since: float | None = None, limit: int = 5000
    ) -> Sample:
        """The newest ``limit`` rows of ``kind`` for this generation and model, from ``since`` on."""
        rows = (
            self._conn()
            .execute(
                "SELECT embedding, meta FROM samples WHERE kind=? AND generation=? AND model=? AND time>=? "
                "ORDER BY id DESC LIMIT ?",
                (kind, generation, model, since if since is not None else 0.0, limit),
            )
            .fetchall()
        )
        if not rows:
            return Sample(np.zeros((0, 0), dtype=np.float32), [])
        emb = np.stack([np.frombuffer(r[0], dtype=np.float32) for r in rows])
        return Sample(emb, [json.loads(r[1]) for r in rows])

    def last_time(self, kind: str, generation: str, model: str) -> float | None:
        sql = "SELECT MAX(time) FROM samples WHERE kind=? AND generation=? AND model=?"
        return self._conn().execute(sql, (kind, generation, model)).fetchone()[0]

    # -------------------------------------------------------------- reports
    def add_report(self, report: dict[str, Any]) -> None:
        """Append a drift report (the JSON of :class:`vitrine.drift.assess.DriftReport`) to the history."""
        try:
            self._conn().execute(
                "INSERT INTO reports(time, generation, model, source, drifted, p_value, auc, mean_shift, "
                "body) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    report.get("time", time.time()),
                    report.get("generation"),
                    report.get("model"),
                    report.get("source"),
                    int(bool(report.get("drifted"))),
                    report.get("p_value"),
                    report.get("auc"),
                    report.get("mean_shift"),
                    json.dumps(report, sort_keys=True),
                ),
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot record a drift report in {self.path}: {exc}") from exc

    def reports(self, limit: int = 500) -> list[dict[str, Any]]:
        """The newest ``limit`` reports, oldest first (ready to plot)."""
        if not self.path.exists():
            return []
        rows = self._conn().execute("SELECT body FROM reports ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [json.loads(r[0]) for r in reversed(rows)]


class Reservoir:
    """A uniform sample of at most ``capacity`` of everything offered (Algorithm R), in bounded memory."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity, self.seen, self.items = capacity, 0, []
        self._random = random.Random(seed)

    def offer(self, item: Entry) -> None:
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
        elif (slot := self._random.randrange(self.seen)) < self.capacity:
            self.items[slot] = item


class QueryRecorder:
    """Samples the live query stream into the journal without slowing searches down.

    ``add`` only offers the query to an in-memory :class:`Reservoir` (at most ``per_flush`` kept per
    period, each query of the period equally likely, whatever the traffic); :meth:`flush` (every
    ``flush_seconds`` from a background thread once :meth:`start` ed) writes them. The first
    ``journal.baseline_size`` queries of a generation become its baseline. Journal failures (a
    read-only index folder, a full disk) are counted in ``errors`` and never reach the search.
    """

    def __init__(
        self, journal: Journal, *, per_flush: int = 256, flush_seconds: float = 10.0, store_text: bool = False
    ) -> None:
        self.journal, self.per_flush, self.flush_seconds = journal, per_flush, flush_seconds
        self.store_text = store_text
        self._pending: dict[tuple[str, str], Reservoir] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0

    def add(self, generation: str, model: str, entry: Entry) -> None:
        if not self.store_text:
            entry.text = None
        with self._lock:
            key = (generation, model)
            if key not in self._pending:
                self._pending[key] = Reservoir(self.per_flush, seed=len(self._pending))
            self._pending[key].offer(entry)

    def flush(self) -> int:
        """Write what was sampled since the last flush; returns rows written."""
        with self._lock:
            pending, self._pending = self._pending, {}
        written = 0
        for (generation, model), reservoir in pending.items():
            entries = reservoir.items
            try:
                room = max(
                    0, self.journal.baseline_size - self.journal.count("query_baseline", generation, model)
                )
                written += self.journal.add("query_baseline", generation, model, entries[:room])
                written += self.journal.add("query", generation, model, entries[room:])
            except (StoreError, sqlite3.Error):
                self.errors += 1
        return written

    def start(self) -> QueryRecorder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vitrine-query-recorder", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.flush()


class IngestSampler:
    """``Ingestor(on_commit=...)`` hook: a uniform sample of a build's new items, for the ``ingest`` check.

    Only builds into a generation that already has its reference record samples (the first build
    *is* the reference). Written once at :meth:`close`, so a killed build records none; its items
    are still indexed, and the next batch is sampled as usual.
    """

    def __init__(self, journal: Journal, generation: str, model: str, capacity: int = 5000) -> None:
        self.journal, self.generation, self.model = journal, generation, model
        self.reservoir = Reservoir(capacity)

    def __call__(self, items: Iterable[Any]) -> None:
        for item in items:
            if item.embedding is not None:
                vec = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
                self.reservoir.offer(Entry(vec / max(float(np.linalg.norm(vec)), 1e-12), dict(item.metadata)))

    def close(self) -> int:
        return self.journal.add("ingest", self.generation, self.model, self.reservoir.items)
