"""Per-slice retrieval quality of the live generation, for the Drift tab and ``/metrics``.

When the live generation's items have captions, text→image R@10 is measured on a sample of them
(:func:`vitrine.quality.generation_quality`: the stored image embeddings, captions encoded by the live
model), overall and per value of ``--quality-slice FIELD``, each slice with its item count and 95 %
Wilson interval. Encoding a few thousand captions takes seconds, so it runs in a background thread:
at once for a new generation or model, and again after later commits to the same generation (photos
indexed from the page) at most every ``REMEASURE_SECONDS``. The refresh loop offers it the current
searcher (an in-memory comparison), and requests never wait for it. Drift checks watch the *inputs*;
this watches the *answers*, where the index's own captions say what a right answer is.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from app.metrics import Metrics
from vitrine.errors import VitrineError
from vitrine.quality import generation_quality

log = logging.getLogger("vitrine.app")
REMEASURE_SECONDS = 300.0  # the same generation, changed by commits, is measured again at most this often


class LiveQuality:
    """The newest measurement (``latest``: a dict, or None before the first or without captions)."""

    def __init__(self, metrics: Metrics, *, field: str | None, size: int) -> None:
        self.metrics, self.field, self.size = metrics, field, size
        self.latest: dict[str, Any] | None = None
        self._measured: tuple | None = None  # (generation, model, commit seq) of the last measurement
        self._measured_at = 0.0
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def offer(self, searcher: Any) -> None:
        """Measure ``searcher``'s generation in the background unless it is measured or being measured."""
        if searcher is None or self.size <= 0:
            return
        key = (searcher.store.generation, searcher.model_version, searcher.store.seq)
        with self._lock:
            if key == self._measured or (self._thread is not None and self._thread.is_alive()):
                return
            recent = time.monotonic() - self._measured_at < REMEASURE_SECONDS
            if self._measured is not None and key[:2] == self._measured[:2] and recent:
                return
            self._measured, self._measured_at = key, time.monotonic()
            self._thread = threading.Thread(
                target=self._measure, args=(searcher,), name="live-quality", daemon=True
            )
            self._thread.start()

    def _measure(self, searcher: Any) -> None:
        try:
            result = generation_quality(searcher.store, searcher.encoder, size=self.size, field=self.field)
        except (VitrineError, OSError, ValueError) as exc:
            log.warning("live quality not measured: %s", exc)
            return
        self.latest = result
        self.metrics.set_quality(result)
        if result is not None:
            log.info("live quality of %s: text->image R@10 %.1f", result["generation"], result["recall"])

    def wait(self, timeout: float) -> None:
        """Until the running measurement (if any) ends, or ``timeout`` seconds (tests, shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
