"""Prometheus instruments shared by the web app and batch jobs.

Each :class:`Metrics` owns a private ``CollectorRegistry`` rather than using prometheus_client's global
one: a test process may start several servers (or a server and a job) and each must report only its own
traffic, and re-creating instruments on a global registry raises "Duplicated timeseries". A process that
exposes ``/metrics`` renders its instance with :meth:`Metrics.render`; a job that wants to push can hand
``metrics.registry`` to ``prometheus_client.push_to_gateway``.

Names (all prefixed ``vitrine_``):

* ``requests_total{endpoint, outcome}`` — outcome is ``ok`` or ``error``.
* ``request_seconds{endpoint}`` — latency histogram; buckets from 5 ms to 10 s (text search is tens of
  ms on CPU, image search with a 50-megapixel upload is seconds).
* ``errors_total{endpoint, reason}`` — refused or failed requests by a short machine-readable reason
  (``empty_query``, ``text_too_long``, ``bad_image``, ``unknown_filter``, ``no_index``…).
* ``index_items`` — items in the live index; ``index_info{generation, model_version}`` — always 1,
  labels say which generation and embedding space are live.
* ``model_info{model, model_version, version}`` — always 1; ``model`` is the display name (checkpoint),
  ``model_version`` the embedding-space id (the encoder fingerprint id) returned with every result;
  ``version`` is the same id under its old label name (deprecated).

Terms: ``model_version`` is always the embedding-space id, ``model`` always a display name.
* ``model_batch_size{modality}`` — queries per model call (``text`` or ``image``): how well concurrent
  requests share forwards under load.
* ``index_refreshes_total`` — times a reader picked up new commits or a new generation.
* ``index_generation`` — number of the live generation (``gen-000003`` → 3): a step means a reindex
  was published (or rolled back).
* ``drift_score{source}`` — domain-classifier AUC of the newest drift report (0.5 calm, 1 separable);
  ``drift_p_value{source}``, ``drift_mean_shift{source}``, ``drift_detected{source}`` (0/1) and
  ``drift_checked_timestamp_seconds`` come from the same report; ``source`` is ``ingest``,
  ``queries``, ``sample``, ``fingerprint`` (a model change) or ``none``.
* ``quality_recall{slice}`` — text→image R@10 (percent) of the live generation on a sample of its own
  captioned items (``slice="(all)"``), and per value of ``--quality-slice FIELD``; ``quality_items{slice}``
  counts the sampled items behind each number (:mod:`app.quality`). Absent when nothing is captioned.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Histogram buckets in seconds; dense around the 250 ms p99 target of text search."""
OVERALL = "(all)"  # the quality_recall slice label of the whole sample (field values are never parenthesised)


class Metrics:
    """One set of instruments on its own registry (see the module docstring for the names)."""

    def __init__(self, namespace: str = "vitrine") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ns, reg = namespace, self.registry
        self.requests = Counter(
            "requests",
            "Requests handled, by endpoint and outcome",
            ["endpoint", "outcome"],
            namespace=ns,
            registry=reg,
        )
        self.latency = Histogram(
            "request_seconds",
            "Request latency by endpoint",
            ["endpoint"],
            namespace=ns,
            registry=reg,
            buckets=LATENCY_BUCKETS,
        )
        self.errors = Counter(
            "errors",
            "Failed or refused requests by reason",
            ["endpoint", "reason"],
            namespace=ns,
            registry=reg,
        )
        self.index_items = Gauge("index_items", "Items in the live index", namespace=ns, registry=reg)
        self.index_info = Gauge(
            "index_info",
            "Live index generation (value is always 1)",
            ["generation", "model_version"],
            namespace=ns,
            registry=reg,
        )
        self.model_info = Gauge(
            "model_info",
            "Loaded model (value is always 1)",
            ["model", "model_version", "version"],
            namespace=ns,
            registry=reg,
        )
        self.batch_size = Histogram(
            "model_batch_size",
            "Queries per model call (micro-batching)",
            ["modality"],
            namespace=ns,
            registry=reg,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.refreshes = Counter(
            "index_refreshes", "Index changes picked up without a restart", namespace=ns, registry=reg
        )
        self.index_generation = Gauge(
            "index_generation", "Number of the live index generation", namespace=ns, registry=reg
        )
        self.drift = {
            name: Gauge(f"drift_{name}", text, ["source"], namespace=ns, registry=reg)
            for name, text in (
                ("score", "Domain-classifier AUC of the newest drift report (0.5 = no drift)"),
                ("p_value", "MMD permutation p-value of the newest drift report"),
                ("mean_shift", "Distance between mean embeddings in the newest drift report"),
                ("detected", "1 when the newest drift report found drift"),
            )
        }
        self.drift_checked = Gauge(
            "drift_checked_timestamp_seconds",
            "When the newest drift report was made",
            namespace=ns,
            registry=reg,
        )

        self.quality_recall = Gauge(
            "quality_recall",
            "Text-to-image R@10 of the live generation on its own captions, overall ((all)) and per slice",
            ["slice"],
            namespace=ns,
            registry=reg,
        )
        self.quality_items = Gauge(
            "quality_items",
            "Sampled captioned items behind each quality_recall",
            ["slice"],
            namespace=ns,
            registry=reg,
        )

    def observe(self, endpoint: str, seconds: float, error_reason: str | None = None) -> None:
        """Record one finished request; ``error_reason`` set means it failed or was refused."""
        self.latency.labels(endpoint).observe(seconds)
        self.requests.labels(endpoint, "error" if error_reason else "ok").inc()
        if error_reason:
            self.errors.labels(endpoint, error_reason).inc()

    @contextmanager
    def track(self, endpoint: str) -> Iterator[None]:
        """Time a block; an exception counts as an error with reason = its ``reason`` attribute or type."""
        start = time.perf_counter()
        try:
            yield
        except Exception as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.observe(endpoint, time.perf_counter() - start, str(reason))
            raise
        self.observe(endpoint, time.perf_counter() - start)

    def set_index(self, items: int, generation: str, model_version: str) -> None:
        """Publish the live index's size and identity (old label sets are dropped)."""
        self.index_items.set(items)
        self.index_info.clear()
        self.index_info.labels(generation, model_version).set(1)
        number = generation.rpartition("-")[2]
        if number.isdigit():
            self.index_generation.set(int(number))

    def set_drift(self, report: dict) -> None:
        """Publish a drift report (JSON of ``vitrine.drift.assess.DriftReport``); old sources are dropped."""
        values = {
            "score": report.get("auc"),
            "p_value": report.get("p_value"),
            "mean_shift": report.get("mean_shift"),
            "detected": float(bool(report.get("drifted"))),
        }
        source = str(report.get("source") or "none")
        for name, gauge in self.drift.items():
            gauge.clear()
            if values[name] is not None:
                gauge.labels(source).set(float(values[name]))
        self.drift_checked.set(float(report.get("time") or time.time()))

    def set_quality(self, result: dict | None) -> None:
        """Publish a live-quality measurement (:func:`vitrine.quality.generation_quality`); None clears."""
        self.quality_recall.clear()
        self.quality_items.clear()
        if result is None:
            return
        rows = [(OVERALL, result["recall"], result["items"])]
        rows += [(s["value"], s["recall"], s["items"]) for s in result["slices"]]
        for name, recall, items in rows:
            self.quality_recall.labels(name).set(float(recall))
            self.quality_items.labels(name).set(float(items))

    def set_model(self, model: str, model_version: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model, model_version, model_version).set(1)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition format."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
