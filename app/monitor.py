"""DriftMonitor: the web app's part in drift detection (no gradio imports here).

* **Records queries.** Each answered search offers its query embedding, best score and mode (text,
  image, both, similar) to a :class:`~vitrine.drift.journal.QueryRecorder`; the search thread only appends to
  an in-memory reservoir, a background thread writes to ``INDEX/drift.sqlite``. Query texts are kept
  only with ``store_query_text``; images never.
* **Shows status.** The latest drift report (from the app's own checks, ``python -m indexer drift`` or
  a reindex scheduler), the history of scores, the last reindex job (``INDEX/reindex.jsonl``) and the
  reference sample. ``/metrics`` gets the same numbers through :meth:`Metrics.set_drift`.
* **Measures quality.** With captioned items, the live generation's text→image R@10, overall and per
  slice (:class:`app.quality.LiveQuality`, in the background), in the status and on ``/metrics``.
* **Runs jobs.** "Check now" runs :func:`vitrine.drift.assess.assess` in-process (a second or two); with
  ``admin`` set, "Start reindex" launches ``python -m indexer reindex`` as a child process, one at a
  time, so the server keeps answering and picks up the new generation when it is published.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.metrics import Metrics
from app.quality import LiveQuality
from vitrine.build.reindex import read_log
from vitrine.drift import reference
from vitrine.drift.assess import assess
from vitrine.drift.journal import Entry, Journal, QueryRecorder
from vitrine.errors import VitrineError
from vitrine.index.store import IndexStore

log = logging.getLogger("vitrine.app")


class JobRefused(VitrineError):
    """A reindex cannot be started from the page (not an admin, or one is running)."""

    reason = "reindex_refused"


class DriftMonitor:
    """See the module docstring. ``reindex_args`` are extra flags for the reindex job (e.g. ``--model M``)."""

    def __init__(
        self,
        index: str | Path,
        metrics: Metrics,
        *,
        record_queries: bool = True,
        store_query_text: bool = False,
        admin: bool = False,
        reindex_args: Sequence[str] = (),
        quality_slice: str | None = None,
        quality_size: int = 500,
    ) -> None:
        self.index, self.metrics = Path(index), metrics
        self.quality = LiveQuality(metrics, field=quality_slice, size=quality_size)
        self.journal = Journal(self.index)
        self.recorder = QueryRecorder(self.journal, store_text=store_query_text) if record_queries else None
        self.admin, self.reindex_args = admin, list(reindex_args)
        self._job: subprocess.Popen | None = None
        self._job_lock = threading.Lock()
        self._job_log = self.index.parent / f"{self.index.name}-reindex.log"
        self._last_report_time = 0.0

    def start(self) -> None:
        if self.recorder is not None:
            self.recorder.start()

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.journal.close()

    # ---------------------------------------------------------------- recording
    def record(self, generation: str, model: str, vector: np.ndarray, best: float | None, mode: str) -> None:
        """Offer one answered query (cheap: an append under a lock)."""
        if self.recorder is not None:
            self.recorder.add(generation, model, Entry(np.asarray(vector, np.float32), {"mode": mode}, best))

    # ---------------------------------------------------------------- status
    def poll(self, searcher: Any = None) -> None:
        """Publish the newest report to the metrics and offer the live ``searcher`` for a quality
        measurement (called from the service's refresh loop)."""
        self.quality.offer(searcher)
        try:
            latest = self.journal.reports(limit=1)
        except (VitrineError, OSError) as exc:
            log.debug("drift journal unreadable: %s", exc)
            return
        if latest and latest[-1].get("time", 0) > self._last_report_time:
            self._last_report_time = latest[-1].get("time", 0)
            self.metrics.set_drift(latest[-1])

    def check(self, fingerprint: dict | None) -> dict[str, Any]:
        """Run a drift assessment of the live generation now, record it and publish it."""
        report = assess(self.index, fingerprint=fingerprint, journal=self.journal).to_dict()
        self.journal.add_report(report)
        self.poll()
        return report

    def status(self, history: int = 200) -> dict[str, Any]:
        reports = self.journal.reports(limit=history)
        ref = None
        try:
            ref = reference.summary(self.index) if IndexStore.exists(self.index) else None
        except VitrineError as exc:
            log.warning("reference sample unreadable: %s", exc)
        return {
            "latest": reports[-1] if reports else None,
            "history": [
                {
                    k: r.get(k)
                    for k in ("time", "p_value", "auc", "mean_shift", "drifted", "source", "generation")
                }
                for r in reports
            ],
            "reference": ref,
            "last_reindex": self.last_reindex(),
            "job": self.job_state(),
            "admin": self.admin,
            "recording": self.recorder is not None,
            "quality": self.quality.latest,
        }

    def last_reindex(self) -> dict[str, Any] | None:
        """The newest record of ``INDEX/reindex.jsonl`` (written by every reindex job), if any."""
        records = read_log(self.index, limit=1)
        return records[-1] if records else None

    # ---------------------------------------------------------------- reindex job
    def job_state(self) -> dict[str, Any]:
        job = self._job
        if job is None:
            return {"state": "idle"}
        code = job.poll()
        state = "running" if code is None else ("finished" if code == 0 else "failed")
        return {"state": state, "pid": job.pid, "returncode": code, "log": str(self._job_log)}

    def start_reindex(self) -> dict[str, Any]:
        """Launch ``python -m indexer reindex --index INDEX`` (admin only, one at a time)."""
        if not self.admin:
            raise JobRefused("reindexing from the page is disabled: start the app with --admin")
        with self._job_lock:
            if self._job is not None and self._job.poll() is None:
                raise JobRefused(f"a reindex is already running (pid {self._job.pid})")
            command = [
                sys.executable,
                "-m",
                "indexer",
                "reindex",
                "--index",
                str(self.index),
                "--json",
                *self.reindex_args,
            ]
            root = str(Path(__file__).resolve().parents[1])  # where app/ and indexer/ are installed
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
            }
            with self._job_log.open("ab") as out:
                out.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
                self._job = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
            log.info("reindex started (pid %d): %s", self._job.pid, " ".join(command))
        return self.job_state()
