"""SearchService: everything the web app does except drawing it (no gradio imports here).

The UI and the API both call this one object, so a request from the page and one from ``gradio_client``
are validated, timed, logged and counted identically. Its jobs:

* **Load once.** The encoder and the index are opened once per process; ``refresh_seconds`` sets how
  often a background thread calls ``IndexStore.refresh()`` so builds by ``python -m indexer build`` and
  reindex swaps show up without a restart. Requests in flight keep the searcher they started with; a
  generation built with another model is opened beside the old one and swapped in whole.
* **Bad input is normal traffic.** Every refusal raises :class:`RequestRefused` with a short ``reason``
  (the ``errors_total`` label) and a message for a person; nothing a client sends can stop the server.
* **Serve only indexed items.** Pictures are found by key (:meth:`SearchService.thumbnail`): the index
  says where an item's image is, so no path a client sends is ever opened. Hits carry ``file`` (a name
  for display) and ``url`` (the item's image), never the server's path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from app.batcher import MicroBatcher
from app.indexing import IndexBuilder, IndexLimits, Progress
from app.memory import QueryDecodes
from app.metrics import Metrics
from app.monitor import DriftMonitor
from app.ratelimit import RateLimiter, Rates
from app.requests import (
    RequestRefused,
    file_size,
    known_filters,
    normalise_filters,
    number,
    optional_text,
    translate,
)
from app.sources import ItemImages, public_hit
from app.textqueries import Answer, TextQuery, encode_or_search
from app.uploads import Uploads
from vitrine.errors import FingerprintMismatch, ImageDecodeError, VitrineError
from vitrine.index.store import IndexStore
from vitrine.open_index import open_searcher
from vitrine.search.searcher import Searcher, SearchLimits, check_k, check_text, check_weight, mix

log = logging.getLogger("vitrine.app")

ENDPOINTS = ("search_text", "search_image", "search", "more_like")


@dataclass
class ServiceSettings:
    """Knobs of one running service (the CLI fills these from flags and ``VITRINE_*``)."""

    index: str
    model: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    max_text_chars: int = 1000
    max_k: int = 100
    max_upload_mb: float = 20.0
    max_pixels: int = 100_000_000
    max_query_pixels: int = 40_000_000
    rates: Rates = field(default_factory=Rates)
    index_limits: IndexLimits = field(default_factory=IndexLimits)
    refresh_seconds: float = 2.0
    max_batch: int = 16
    batch_wait_ms: float = 2.0
    trace: bool = True
    record_queries: bool = True
    store_query_text: bool = False
    admin: bool = False
    reindex_args: list[str] = field(default_factory=list)


def settle_heap() -> None:
    """Take everything alive now (model, index, libraries, the page) out of the garbage collector's
    view, for a long-running server.

    CPython's full (generation 2) collection walks every tracked object. With torch, transformers and
    Gradio loaded that took 316-477 ms here, every ~18 s under load, and it stalled every request in
    flight: it was the load benchmark's p99. After ``gc.freeze()`` a full collection walks only what
    was allocated since. Unfreezing first means that objects which became garbage since the last
    freeze (an old model after a swap, in reference cycles) are collected instead of kept forever.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class SearchService:
    """Validated, timed search over one index directory; see the module docstring."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.limits = SearchLimits(max_text_chars=settings.max_text_chars, max_k=settings.max_k)
        self._searcher: Searcher | None = None
        self._swap_lock = threading.Lock()
        # Model calls go through one MicroBatcher per modality (batched, and serialised as fast tokenizers
        # need); decoding runs in the request threads within app.memory's limits.
        self._batchers: dict[int, tuple[MicroBatcher, MicroBatcher]] = {}
        self.decodes = QueryDecodes(settings.max_query_pixels)
        self.limiter = RateLimiter(settings.rates)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.images = ItemImages(max_pixels=settings.max_pixels)
        self.uploads = Uploads()  # Gradio's record of received uploads, attached by the server
        self.builder = IndexBuilder(settings, self.limiter, self.uploads)
        self.drift = DriftMonitor(
            settings.index, self.metrics, record_queries=settings.record_queries,
            store_query_text=settings.store_query_text, admin=settings.admin,
            reindex_args=settings.reindex_args,
        )  # fmt: skip
        self.load_error: str | None = None
        self._info: dict[str, Any] = {}
        self._try_open()

    # ------------------------------------------------------------------ lifecycle
    @property
    def searcher(self) -> Searcher | None:
        return self._searcher

    @property
    def ready(self) -> bool:
        return self._searcher is not None

    def _try_open(self) -> None:
        """Open the index if it exists; a missing index is a normal state (the page explains it)."""
        if not IndexStore.exists(self.settings.index):
            return
        try:
            searcher = open_searcher(
                self.settings.index, self.settings.model, self.limits, **self._encoder_kwargs()
            )
        except VitrineError as exc:
            self.load_error = str(exc)
            log.error("cannot open index %s: %s", self.settings.index, exc)
            return
        self._install(searcher)

    def _encoder_kwargs(self) -> dict[str, Any]:
        return {**self.settings.encoder_kwargs, "max_pixels": self.settings.max_pixels}

    def _install(self, searcher: Searcher) -> None:
        encoder = searcher.encoder
        if id(encoder) not in self._batchers:
            if self.settings.trace:  # before the batchers exist, so no request sees a half-swapped model
                log.info("model forwards: %s", encoder.trace())
            size, wait = self.settings.max_batch, self.settings.batch_wait_ms
            sizes = self.metrics.batch_size
            self._batchers[id(encoder)] = (
                MicroBatcher(functools.partial(encode_or_search, encoder, self._answer_texts), max_batch=size,
                             max_wait_ms=wait, name="text-batcher", on_batch=sizes.labels("text").observe),
                MicroBatcher(lambda px: encoder.encode_pixels(torch.cat(px)), max_batch=size,
                             max_wait_ms=wait, name="image-batcher", on_batch=sizes.labels("image").observe),
            )  # fmt: skip
        with self._swap_lock:
            old, self._searcher = self._searcher, searcher
        self.load_error = None
        self.images.forget()
        self.metrics.set_model(searcher.encoder.fingerprint.get("model", ""), searcher.model_version)
        self._publish_index()
        if old is not None and old.store is not searcher.store:
            old.store.close()
        if old is not None and old.encoder is not encoder:  # a new model: retire the old batchers later,
            retired = self._batchers.pop(id(old.encoder), ())  # once requests in flight are answered
            for batcher in retired:
                threading.Timer(60, batcher.close).start()
            settle_heap()  # the new model's objects join the frozen heap; the old one's can be freed

    def _publish_index(self) -> None:
        """Refresh the cached identity (per-request results must not run COUNT(*) over the index)."""
        searcher = self._searcher
        if searcher is not None:
            stats = searcher.store.stats()
            self.metrics.set_index(stats["count"], str(stats["generation"]), str(stats["model"]))
            self._info = {
                "model": searcher.encoder.fingerprint.get("model"),
                "model_version": searcher.model_version,
                "generation": stats["generation"],
                "count": stats["count"],
            }

    def refresh(self) -> bool:
        """Pick up index changes now; True when something changed. Never raises (the old state stays)."""
        searcher = self._searcher
        try:
            if searcher is None:
                self._try_open()
                changed = self._searcher is not None
            else:
                changed = searcher.store.refresh()
                if changed:
                    self.images.forget()
                    self._publish_index()
        except FingerprintMismatch:
            log.info("index now uses another model: loading it")
            self._searcher_for_new_model()
            changed = True
        except (VitrineError, OSError) as exc:
            log.warning("index refresh failed (still serving the previous state): %s", exc)
            return False
        if changed:
            self.metrics.refreshes.inc()
        return changed

    def _searcher_for_new_model(self) -> None:
        try:
            searcher = open_searcher(self.settings.index, None, self.limits, **self._encoder_kwargs())
        except VitrineError as exc:
            log.error("cannot load the new generation's model (still serving the old one): %s", exc)
            return
        self._install(searcher)

    def start(self) -> None:
        """Start the refresh thread (idempotent)."""
        self.drift.start()
        if self._thread is None and self.settings.refresh_seconds > 0:
            self._thread = threading.Thread(target=self._refresh_loop, name="index-refresh", daemon=True)
            self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.settings.refresh_seconds):
            self.refresh()
            self.drift.poll()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._searcher is not None:
            self._searcher.store.close()
        for pair in self._batchers.values():
            for batcher in pair:
                batcher.close()
        self.drift.close()

    # ------------------------------------------------------------------ status
    def info(self) -> dict[str, Any]:
        """Model and index identity shown on the page and returned with every result."""
        if self._searcher is None:
            return {"model": None, "model_version": None, "generation": None, "count": 0}
        return dict(self._info)

    def health(self) -> dict[str, Any]:
        """Body of ``/healthz``: ``ok`` only when both the model and the index are loaded."""
        searcher = self._searcher
        body: dict[str, Any] = {
            "ok": searcher is not None,
            "index_loaded": searcher is not None,
            "model_loaded": searcher is not None,
        }
        if searcher is None:
            body["reason"] = self.load_error or "no index yet: build one with `python -m indexer build`"
            return body
        stats = searcher.store.stats()
        body.update(
            model=searcher.encoder.fingerprint.get("model"),
            model_version=searcher.model_version,
            generation=stats["generation"],
            count=stats["count"],
            vectors=stats["vectors"],
            failed=stats["failed"],
            forwards=searcher.encoder.trace_notes or "eager",
        )
        return body

    def check_drift(self) -> dict[str, Any]:
        """Assess drift of the live generation now (model change included) and record the report."""
        searcher = self._searcher
        if searcher is None:
            raise RequestRefused("no_index", self.empty_message())
        try:
            return self.drift.check(searcher.encoder.fingerprint)
        except VitrineError as exc:
            raise RequestRefused("drift_failed", f"drift check failed: {exc}") from None

    def metadata_fields(self) -> dict[str, list[str]]:
        searcher = self._searcher
        return searcher.store.metadata_fields() if searcher is not None else {}

    # ------------------------------------------------------------------ search
    def search_text(self, text: str | None, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        start = time.perf_counter()
        with self._handled("search_text", start):
            searcher, kk, future = self._submit_text(text, k, filters)
            hits = translate(lambda: _unwrap(future.result()))
        return self._result("search_text", start, kk, hits, searcher)

    async def search_text_async(self, text: str | None, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        """:meth:`search_text` for the event loop: same checks and result, no worker thread
        (:mod:`app.textqueries` says why)."""
        start = time.perf_counter()
        with self._handled("search_text", start):
            searcher, kk, future = self._submit_text(text, k, filters)
            answer = await asyncio.wrap_future(future)
            hits = translate(lambda: _unwrap(answer))
        return self._result("search_text", start, kk, hits, searcher)

    def _submit_text(self, text: str | None, k: Any, filters: Any) -> tuple[Searcher, int, Future]:
        """Validate a text search and hand it to the text batcher, which answers it (hits or error)."""
        searcher, kk = self._require(), number(k, "k", int)

        def checked() -> list:
            check_k(kk, self.limits)
            return [TextQuery(searcher, check_text(optional_text(text), self.limits), kk, filters)]

        query = translate(checked)[0]
        return searcher, kk, self._batchers[id(searcher.encoder)][0].submit(query)

    def _answer_texts(self, queries: list[TextQuery], vectors: Any) -> list[Answer]:
        """In the text batcher's thread: the hits of queries sharing searcher, k and filters, or the
        error that is all of their answer (a bad filter is every such query's error)."""
        s = queries[0].searcher
        try:
            answers = s.by_vectors(vectors, queries[0].k, self._filters(s, queries[0].filters))
        except Exception as exc:  # reported to these requests alone
            return [exc] * len(queries)
        for vector, hits in zip(vectors, answers, strict=True):
            best = hits[0].score if hits else None
            self.drift.record(s.store.generation, s.model_version, vector, best, "text")
        return list(answers)

    def search_image(self, image: Any, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        return self._run(
            "search_image",
            lambda s, f, kk: self._query(s, self._image(s, image, True), None, 0.0, kk, f),
            k,
            filters,
        )

    def search(
        self, image: Any, text: str | None, weight: Any = 0.5, k: Any = 10, filters: Any = None
    ) -> dict:
        def run(s: Searcher, f: dict[str, str], kk: int) -> list:
            w, words = number(weight, "weight", float), optional_text(text)
            check_weight(w)
            photo = self._image(s, image, False)
            if photo is None and not (words or "").strip():
                raise RequestRefused("empty_query", "give a photo, a text, or both")
            return self._query(s, photo, words, w, kk, f)

        return self._run("search", run, k, filters)

    def more_like(self, key: str | None, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        def run(s: Searcher, f: dict[str, str], kk: int) -> list:
            if not key or not isinstance(key, str):
                raise RequestRefused("empty_query", "choose a result to search for more like it")
            return s.more_like(key, kk, f)

        return self._run("more_like", run, k, filters)

    def _run(
        self, endpoint: str, work: Callable[[Searcher, dict[str, str], int], list], k: Any, filters: Any
    ) -> dict:
        start = time.perf_counter()
        with self._handled(endpoint, start):
            searcher, kk = self._require(), number(k, "k", int)

            def checked() -> list:
                check_k(kk, self.limits)
                return work(searcher, self._filters(searcher, filters), kk)

            hits = translate(checked)
        return self._result(endpoint, start, kk, hits, searcher)

    def _require(self) -> Searcher:
        searcher = self._searcher
        if searcher is None:
            raise RequestRefused("no_index", self.empty_message())
        return searcher

    @contextlib.contextmanager
    def _handled(self, endpoint: str, start: float) -> Iterator[None]:
        """Time and count a request; refusals are logged, anything else becomes an ``internal`` refusal."""
        try:
            with self.metrics.track(endpoint):
                yield
        except RequestRefused as exc:
            log.info("%s error=%s %.1fms: %s", endpoint, exc.reason, _ms(start), exc)
            raise
        except Exception as exc:  # a bug must not take the server down, and the client hears about it
            log.exception("%s failed after %.1fms", endpoint, _ms(start))
            raise RequestRefused("internal", f"search failed: {type(exc).__name__}") from exc

    def _result(self, endpoint: str, start: float, k: int, hits: list, searcher: Searcher) -> dict:
        took = _ms(start)
        log.info("%s ok %.1fms k=%d hits=%d", endpoint, took, k, len(hits))
        info, folders = self.info(), self.images.folders(searcher.store)
        return {
            "hits": [public_hit(h.to_dict(), folders) for h in hits],
            "model": info["model"],
            "model_version": searcher.model_version,
            "generation": hits[0].generation if hits else info["generation"],
            "count": info["count"],
            "took_ms": round(took, 2),
        }

    def _query(
        self, s: Searcher, image: Image.Image | None, text: str | None, weight: float, k: int,
        filters: dict[str, str],
    ) -> list:  # fmt: skip
        has_text = bool((text or "").strip())
        if has_text:
            text = check_text(text, self.limits)
        text_batcher, image_batcher = self._batchers[id(s.encoder)]
        pending = [] if image is None else [image_batcher.submit(s.encoder.preprocess([image]))]
        vector = text_batcher(text) if has_text and text is not None else None
        query = mix(vector, pending[0].result() if pending else None, weight)
        hits = s.by_vector(query, k, filters)
        mode = "both" if pending and vector is not None else ("image" if pending else "text")
        self.drift.record(s.store.generation, s.model_version, query, hits[0].score if hits else None, mode)
        return hits

    def _image(self, s: Searcher, image: Any, required: bool) -> Image.Image | None:
        """Decode an upload (path, bytes or PIL) with the safety limits, in the request thread."""
        if image is None or image == "":
            if required:
                raise RequestRefused("empty_query", "upload a photo to search with")
            return None
        if isinstance(image, Image.Image):
            return image.convert("RGB")
        cap = int(self.settings.max_upload_mb * 1024 * 1024)
        size = len(image) if isinstance(image, bytes) else file_size(image)
        if size > cap:
            raise RequestRefused(
                "upload_too_large",
                f"the upload is {size / 1e6:.1f} MB; the limit is {self.settings.max_upload_mb:g} MB",
            )
        try:
            return self.decodes.load(s.encoder, image)
        except ImageDecodeError as exc:
            raise RequestRefused("bad_image", f"cannot read the uploaded image: {exc.reason}") from None

    def _filters(self, searcher: Searcher, filters: Any) -> dict[str, str]:
        # the store caches its metadata fields until the index changes
        return known_filters(normalise_filters(filters), searcher.store.metadata_fields())

    # ------------------------------------------------------------------ files and indexing
    def item(self, key: Any) -> dict | None:
        """The indexed item ``key`` (path, captions, metadata), or None: unknown, not a string, no index."""
        searcher = self._searcher
        if searcher is None or not isinstance(key, str) or not key:
            return None
        return searcher.store.get(key)

    def thumbnail(self, key: Any, size: int = 320) -> Image.Image | None:
        """A small RGB picture of the indexed item ``key``, or None (not indexed, missing, undecodable)."""
        searcher = self._searcher
        return None if searcher is None else self.images.thumbnail(searcher.store, key, size)

    def build_index(self, files: list[str], progress: Progress | None = None, client: str = "") -> dict:
        """Index uploaded images into this service's index (creating it), then load it (admin only)."""
        try:
            report = self.builder.build(files, self._searcher, progress, client)
        except VitrineError as exc:
            raise RequestRefused(getattr(exc, "reason", "build_failed"), str(exc)) from None
        if self._searcher is None:
            self._try_open()
        else:
            self.refresh()
        return report

    def empty_message(self) -> str:
        if self.load_error:
            return f"the index could not be loaded: {self.load_error}"
        return (
            f"no index at {self.settings.index} yet: build one with "
            f"`python -m indexer build CATALOG --index {self.settings.index}`, "
            "or add photos under 'Index photos' on the page"
        )


def _unwrap(answer: Answer) -> list:
    if isinstance(answer, Exception):
        raise answer
    return answer


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
