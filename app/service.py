"""SearchService: the endpoints of the web app and the REST API (no gradio imports here).

The page, ``gradio_client`` and the REST API all call this one object, so a request from any of them
is validated, timed, logged and counted identically. Each search walks down once:

    client values → :func:`vitrine.search.query.parse_query` (the only validation) → Query
    → :class:`app.live_index.LiveIndex` (batched model calls) → Searcher → IndexStore → result JSON

* **Bad input is normal traffic.** Every refusal raises :class:`RequestRefused` with a short ``reason``
  (the ``errors_total`` label) and a message for a person; nothing a client sends can stop the server.
* **Serve only indexed items.** Pictures are found by key (:meth:`SearchService.thumbnail`): the index
  says where an item's image is, so no path a client sends is ever opened. Hits carry ``file`` (a name
  for display) and ``url`` (the item's image), never the server's path.

Loading, refreshing and swapping models is :class:`~app.live_index.LiveIndex`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from app.indexing import IndexBuilder, IndexLimits, Progress
from app.live_index import LiveIndex, public_model_name, settle_heap, unwrap
from app.memory import QueryDecodes
from app.metrics import Metrics
from app.monitor import DriftMonitor
from app.ratelimit import RateLimiter, Rates
from app.requests import RequestRefused, file_size, translate
from app.sources import ItemImages, public_hit
from app.uploads import Uploads
from vitrine.errors import ImageDecodeError, VitrineError
from vitrine.index.store import Hit
from vitrine.search.batch import photo_only
from vitrine.search.query import EMPTY_ANY, EMPTY_TEXT, Query, with_image
from vitrine.search.searcher import Page, Searcher

__all__ = ["RequestRefused", "SearchService", "ServiceSettings", "settle_heap"]

log = logging.getLogger("vitrine.app")
#: The fields :meth:`SearchService.query` takes (the REST body's, less ``image``).
QUERY_FIELDS = frozenset(
    {
        "text",
        "key",
        "negative",
        "weight",
        "negative_weight",
        "k",
        "offset",
        "filters",
        "min_score",
        "mode",
        "sort",
    }
)


@dataclass
class ServiceSettings:
    """Knobs of one running service (the CLI fills these from flags and ``VITRINE_*``)."""

    index: str
    model: str | None = None
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    max_text_chars: int = 1000
    max_k: int = 100
    max_depth: int = 1000
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
    quality_slice: str | None = None
    quality_size: int = 500


@dataclass(frozen=True)
class Answered:
    """A search's outcome, before it is written as JSON."""

    endpoint: str
    query: Query
    page: Page
    searcher: Searcher
    took_ms: float


class SearchService:
    """Validated, timed search over one index directory; see the module docstring."""

    def __init__(self, settings: ServiceSettings, metrics: Metrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.decodes = QueryDecodes(settings.max_query_pixels)
        self.limiter = RateLimiter(settings.rates)
        self.images = ItemImages(max_pixels=settings.max_pixels)
        self.uploads = Uploads()  # Gradio's record of received uploads, attached by the server
        self.builder = IndexBuilder(settings, self.limiter, self.uploads)
        self.drift = DriftMonitor(
            settings.index,
            self.metrics,
            record_queries=settings.record_queries,
            store_query_text=settings.store_query_text,
            admin=settings.admin,
            reindex_args=settings.reindex_args,
            quality_slice=settings.quality_slice,
            quality_size=settings.quality_size,
        )
        self.live = LiveIndex(settings, self.metrics, self.drift, self.images)
        self.limits = self.live.limits

    # ------------------------------------------------------------------ lifecycle (LiveIndex's)
    @property
    def searcher(self) -> Searcher | None:
        return self.live.searcher

    @property
    def ready(self) -> bool:
        return self.live.searcher is not None

    @property
    def load_error(self) -> str | None:
        return self.live.load_error

    def refresh(self) -> bool:
        """Pick up index changes now; True when something changed. Never raises (the old state stays)."""
        return self.live.refresh()

    def start(self) -> None:
        """Start the refresh thread and the drift monitor (idempotent)."""
        self.drift.start()
        self.live.start()

    def close(self) -> None:
        self.live.close()
        self.drift.close()

    # ------------------------------------------------------------------ status
    def info(self) -> dict[str, Any]:
        """Model and index identity shown on the page and returned with every result."""
        return self.live.info()

    def health(self) -> dict[str, Any]:
        """Body of ``/healthz``: ``ok`` only when both the model and the index are loaded."""
        searcher = self.live.searcher
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
            model=public_model_name(searcher.encoder),
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
        searcher = self._require()
        try:
            return self.drift.check(searcher.encoder.fingerprint)
        except VitrineError as exc:
            raise RequestRefused("drift_failed", f"drift check failed: {exc}") from None

    def metadata_fields(self) -> dict[str, list[str]]:
        searcher = self.live.searcher
        return searcher.store.metadata_fields() if searcher is not None else {}

    # ------------------------------------------------------------------ the Gradio endpoints
    def search_text(self, text: Any, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        return self.result(self.answer("search_text", dict(text=text, k=k, filters=filters), EMPTY_TEXT))

    async def search_text_async(self, text: Any, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        """:meth:`search_text` for the event loop: the same checks and result, no worker thread (the
        text batcher answers it; :mod:`app.live_index` says why)."""
        fields = dict(text=text, k=k, filters=filters)
        return self.result(await self.answer_async("search_text", fields, EMPTY_TEXT))

    def search_image(self, image: Any, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        photo = Photo(self, image, required=True)
        return self.result(self.answer("search_image", dict(k=k, filters=filters), EMPTY_ANY, photo))

    async def search_image_async(self, image: Any, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        """:meth:`search_image` for the event loop: the photo is decoded and preprocessed in a worker
        thread, then embedded and searched with the photos that arrived with it (the image batcher)."""
        fields, photo = dict(k=k, filters=filters), Photo(self, image, required=True)
        return self.result(await self.answer_async("search_image", fields, EMPTY_ANY, photo))

    def search(self, image: Any, text: Any, weight: Any = 0.5, k: Any = 10, filters: Any = None) -> dict:
        fields = dict(text=text, weight=weight, k=k, filters=filters)
        return self.result(self.answer("search", fields, EMPTY_ANY, Photo(self, image, required=False)))

    def more_like(self, key: Any, k: Any = 10, filters: Any = None) -> dict[str, Any]:
        fields = dict(key=key if isinstance(key, str) else None, k=k, filters=filters)
        return self.result(self.answer("more_like", fields, "choose a result to search for more like it"))

    def query(self, fields: dict[str, Any], image: Any = None) -> dict[str, Any]:
        """A search from the REST body's fields (``text``, ``key``, ``negative``, ``weight``,
        ``negative_weight``, ``k``, ``offset``, ``filters``, ``min_score``, ``mode``, ``sort``) and an
        optional photo (an upload's path, bytes or PIL); answers what ``POST /api/v1/search`` answers.
        The page's controls call this; unknown field names are refused."""
        if not isinstance(fields, dict) or set(fields) - QUERY_FIELDS:
            unknown = sorted(map(str, set(fields) - QUERY_FIELDS)) if isinstance(fields, dict) else []
            raise RequestRefused("bad_request", f"unknown search field(s): {', '.join(unknown)[:200]}")
        photo = None if image is None or image == "" else Photo(self, image, required=True)
        return self.page_result(self.answer("query", dict(fields), EMPTY_ANY, photo))

    def page_result(self, answered: Answered) -> dict[str, Any]:
        """The REST answer: hits with ``vector_score``/``lexical_score``, the page's ``offset`` and
        ``next_offset`` (null at the end); a hit's ``model`` is the display name, ``model_version`` the id."""
        page, searcher = answered.page, answered.searcher
        info, folders = self.info(), self.images.folders(searcher.store)
        hits = [{**self.public_hit(h, folders), "model": info["model"]} for h in page.hits]
        return {
            "hits": hits,
            "offset": answered.query.offset,
            "next_offset": page.next_offset,
            "mode": answered.query.mode,
            "model": info["model"],
            "model_version": searcher.model_version,
            "generation": page.hits[0].generation if page.hits else info["generation"],
            "took_ms": round(answered.took_ms, 2),
        }

    # ------------------------------------------------------------------ answering (any front end)
    def answer(
        self, endpoint: str, fields: dict[str, Any], empty: str, photo: PhotoSource | None = None
    ) -> Answered:
        """Parse ``fields`` into a Query (the photo is decoded only once the rest is valid), search, and
        time and count it under ``endpoint``."""
        start = time.perf_counter()
        with self._handled(endpoint, start):
            searcher = self._require()
            query = self.parse(searcher, fields, empty, photo)
            page = translate(lambda: self.live.search(searcher, query))
        return _logged(Answered(endpoint, query, page, searcher, _ms(start)))

    async def answer_async(
        self, endpoint: str, fields: dict[str, Any], empty: str, photo: PhotoSource | None = None
    ) -> Answered:
        """:meth:`answer` on the event loop: a text-only query is awaited from the text batcher, a
        photo-only one from the image batcher once a worker thread has decoded and preprocessed its
        photo, any other is answered in a worker thread."""
        start = time.perf_counter()
        with self._handled(endpoint, start):
            searcher = self._require()
            if photo is None:
                query, photo_answer = self.parse(searcher, fields, empty, None), None
            else:
                query, photo_answer = await asyncio.to_thread(
                    self._photo_query, searcher, fields, empty, photo
                )
            if query.texts_only:
                answer = await asyncio.wrap_future(self.live.submit_text(searcher, query))
                page = translate(lambda: unwrap(answer).page)
            elif photo_answer is not None:
                answer = await asyncio.wrap_future(photo_answer)
                page = translate(lambda: unwrap(answer).page)
            else:
                page = await asyncio.to_thread(translate, lambda: self.live.search(searcher, query))
        return _logged(Answered(endpoint, query, page, searcher, _ms(start)))

    def _photo_query(
        self, searcher: Searcher, fields: dict[str, Any], empty: str, photo: PhotoSource
    ) -> tuple[Query, Future | None]:
        """Worker thread: the query with its photo decoded and, when the photo is all it searches with,
        preprocessed and handed to the image batcher (the future of its answer)."""
        query = self.parse(searcher, fields, empty, photo)
        return query, self.live.submit_photo(searcher, query) if photo_only(query) else None

    def parse(
        self, searcher: Searcher, fields: dict[str, Any], empty: str, photo: PhotoSource | None
    ) -> Query:
        """The request's fields → Query: the one validation (:func:`vitrine.search.query.parse_query`)."""
        if photo is None:
            return translate(lambda: searcher.parse(**fields, empty=empty))
        query = translate(lambda: searcher.parse(**fields, empty=None))
        decoded = photo.decode(searcher)
        return translate(lambda: with_image(query, decoded, empty))

    def result(self, answered: Answered) -> dict[str, Any]:
        """The Gradio endpoints' JSON: hits (``file``, ``url``, no path), model and index identity.

        ``model_version`` is the embedding-space id; ``model`` the checkpoint's display name. A hit's
        ``model`` is the same id as its ``model_version`` (kept for existing clients; deprecated)."""
        page, searcher = answered.page, answered.searcher
        info, folders = self.info(), self.images.folders(searcher.store)
        return {
            "hits": [self.public_hit(h, folders) for h in page.hits],
            "model": info["model"],
            "model_version": searcher.model_version,
            "generation": page.hits[0].generation if page.hits else info["generation"],
            "count": info["count"],
            "took_ms": round(answered.took_ms, 2),
        }

    @staticmethod
    def public_hit(hit: Hit, folders: list[str]) -> dict[str, Any]:
        return public_hit(hit.to_dict(), folders)

    def _require(self) -> Searcher:
        searcher = self.live.searcher
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

    def decode(self, s: Searcher, image: Any, required: bool = False) -> Image.Image | None:
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

    # ------------------------------------------------------------------ items and indexing
    def item(self, key: Any) -> dict | None:
        """The indexed item ``key`` (path, captions, metadata), or None: unknown, not a string, no index."""
        searcher = self.live.searcher
        if searcher is None or not isinstance(key, str) or not key:
            return None
        return searcher.store.get(key)

    def thumbnail(self, key: Any, size: int = 320) -> Image.Image | None:
        """A small RGB picture of the indexed item ``key``, or None (not indexed, missing, undecodable)."""
        searcher = self.live.searcher
        return None if searcher is None else self.images.thumbnail(searcher.store, key, size)

    def build_index(self, files: list[str], progress: Progress | None = None, client: str = "") -> dict:
        """Index uploaded images into this service's index (creating it), then load it (admin only)."""
        try:
            report = self.builder.build(files, self.live.searcher, progress, client)
        except VitrineError as exc:
            raise RequestRefused(getattr(exc, "reason", "build_failed"), str(exc)) from None
        if self.live.searcher is None:
            self.live.try_open()
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


class PhotoSource(Protocol):
    """Where a query's photo comes from; decoded only once the rest of the query is valid."""

    def decode(self, searcher: Searcher) -> Image.Image | None: ...


@dataclass(frozen=True)
class Photo:
    """A query photo as the client sent it (an upload's path, bytes, or PIL), decoded on demand."""

    service: SearchService
    sent: Any
    required: bool

    def decode(self, searcher: Searcher) -> Image.Image | None:
        return self.service.decode(searcher, self.sent, self.required)


def _logged(answered: Answered) -> Answered:
    """One log line per answered request, with its latency (refusals are logged by ``_handled``)."""
    k, hits = answered.query.k, len(answered.page.hits)
    log.info("%s ok %.1fms k=%d hits=%d", answered.endpoint, answered.took_ms, k, hits)
    return answered


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
