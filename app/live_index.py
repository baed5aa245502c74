"""LiveIndex: the model and index one server process searches, loaded once and kept current.

* **Load once.** The encoder and the index are opened once per process; ``refresh_seconds`` sets how
  often a background thread calls ``IndexStore.refresh()`` so builds by ``python -m indexer build`` and
  reindex swaps show up without a restart. Requests in flight keep the searcher they started with; a
  generation built with another model is opened beside the old one and swapped in whole.
* **Model calls are batched.** One :class:`~app.batcher.MicroBatcher` per modality and model: concurrent
  requests share a forward (and the model is serialised, as fast tokenizers need). Text-only queries are
  answered whole in the text batcher's thread (:func:`vitrine.search.batch.search_texts`): with Gradio's
  queue, a request thread that hands a text to the model thread and waits cost 0.8 ms of CPU per request
  for the hop alone and most of the latency budget under 16 clients (bench/RESULTS.md, Load), so the
  text endpoint is a coroutine that awaits the batcher's answer instead. Photo-only queries likewise:
  decoded and preprocessed in the request's thread, embedded and searched together in the image
  batcher's (:func:`vitrine.search.batch.search_photos`: one forward, one store call per page shape).
* **The heap is settled** after loading (:func:`settle_heap`).

It takes :class:`~vitrine.search.query.Query` objects as validated by the service and never re-checks them.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from app.batcher import MicroBatcher
from app.metrics import Metrics
from app.monitor import DriftMonitor
from app.sources import ItemImages
from vitrine.errors import FingerprintMismatch, VitrineError
from vitrine.index.store import IndexStore
from vitrine.model.encoder import Encoder
from vitrine.open_index import open_searcher
from vitrine.search.batch import (
    Answer,
    Found,
    PhotoSearch,
    TextSearch,
    photo_only,
    search_photos,
    search_texts,
)
from vitrine.search.query import Query, SearchLimits
from vitrine.search.searcher import Page, Searcher

if TYPE_CHECKING:
    from app.service import ServiceSettings

log = logging.getLogger("vitrine.app")


def settle_heap() -> None:
    """Take everything alive now (model, index, libraries, the page) out of the garbage collector's
    view, for a long-running server.

    CPython's full (generation 2) collection walks every tracked object; with torch, transformers and
    Gradio loaded it stalled every request in flight and was the load benchmark's p99 (bench/RESULTS.md,
    Load). After ``gc.freeze()`` a full collection walks only what was allocated since. Unfreezing first
    means that objects which became garbage since the last freeze (an old model after a swap, in
    reference cycles) are collected instead of kept forever.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class BatchedEmbed:
    """:class:`vitrine.search.searcher.Embed` through a model's two batchers."""

    def __init__(self, encoder: Encoder, text: MicroBatcher, image: MicroBatcher) -> None:
        self.encoder, self.text, self.image_batcher = encoder, text, image

    def texts(self, texts: list[str]) -> np.ndarray:
        futures = [self.text.submit(t) for t in texts]
        return np.stack([f.result() for f in futures])

    def image(self, image: Image.Image) -> np.ndarray:
        return self.image_batcher.submit(self.encoder.preprocess([image])).result()


class LiveIndex:
    """The current searcher of ``settings.index`` and its batched model calls; see the module docstring."""

    def __init__(
        self, settings: ServiceSettings, metrics: Metrics, drift: DriftMonitor, images: ItemImages
    ) -> None:
        self.settings, self.metrics, self.drift, self.images = settings, metrics, drift, images
        self.limits = SearchLimits(
            max_text_chars=settings.max_text_chars, max_k=settings.max_k, max_depth=settings.max_depth
        )
        self._searcher: Searcher | None = None
        self._swap_lock = threading.Lock()
        self._embeds: dict[int, BatchedEmbed] = {}  # per encoder
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_error: str | None = None
        self._info: dict[str, Any] = {}
        self.try_open()

    @property
    def searcher(self) -> Searcher | None:
        return self._searcher

    def info(self) -> dict[str, Any]:
        """Model and index identity (cached: per-request results must not run COUNT(*) over the index)."""
        if self._searcher is None:
            return {"model": None, "model_version": None, "generation": None, "count": 0}
        return dict(self._info)

    # ------------------------------------------------------------------ searching
    def submit_text(self, searcher: Searcher, query: Query) -> Future:
        """A text-only query for the text batcher; the future's result is an Answer."""
        return self._embeds[id(searcher.encoder)].text.submit(TextSearch(searcher, query))

    def submit_photo(self, searcher: Searcher, query: Query) -> Future:
        """A photo-only query for the image batcher, preprocessed here (in the caller's thread); the
        future's result is an Answer."""
        assert query.image is not None
        pixels = searcher.encoder.preprocess([query.image])
        return self._embeds[id(searcher.encoder)].image_batcher.submit(PhotoSearch(searcher, query, pixels))

    def search(self, searcher: Searcher, query: Query) -> Page:
        """Any query, blocking: text-only and photo-only ones are answered whole in their batcher,
        others here."""
        if query.texts_only:
            return unwrap(self.submit_text(searcher, query).result()).page
        if photo_only(query):
            return unwrap(self.submit_photo(searcher, query).result()).page
        if query.mode == "lexical":  # no query vector: nothing for the drift journal
            return searcher.answer(query, None)
        vector = searcher.vector(query, self._embeds[id(searcher.encoder)])
        page = searcher.answer(query, vector)
        self._record(searcher, vector, page, query.kind)
        return page

    def _answer_texts(self, encoder: Encoder, items: Sequence[str | TextSearch]) -> list[Any]:
        """The text batcher's function; samples each answered query's vector for drift checks."""
        out = search_texts(encoder, items)
        for item, answer in zip(items, out, strict=True):
            if isinstance(answer, Found) and isinstance(item, TextSearch):
                self._record(item.searcher, answer.vector, answer.page, "text")
        return out

    def _answer_photos(self, encoder: Encoder, items: Sequence[torch.Tensor | PhotoSearch]) -> list[Any]:
        """The image batcher's function: one forward for every photo, then the photo-only searches
        grouped into store calls (as texts); samples each answered query's vector for drift checks."""
        out = search_photos(encoder, items)
        for item, answer in zip(items, out, strict=True):
            if isinstance(answer, Found) and isinstance(item, PhotoSearch):
                self._record(item.searcher, answer.vector, answer.page, "image")
        return out

    def _record(self, searcher: Searcher, vector: np.ndarray, page: Page, mode: str) -> None:
        # the best cosine (the first hit is not it when sorted by a field or fused with the lexical side)
        best = max((h.vector_score for h in page.hits if h.vector_score is not None), default=None)
        self.drift.record(searcher.store.generation, searcher.model_version, vector, best, mode)

    # ------------------------------------------------------------------ loading and swapping
    def try_open(self) -> None:
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

    def _batchers_for(self, encoder: Encoder) -> BatchedEmbed:
        if self.settings.trace:  # before the batchers exist, so no request sees a half-swapped model
            log.info("model forwards: %s", encoder.trace())
        size, wait, sizes = self.settings.max_batch, self.settings.batch_wait_ms, self.metrics.batch_size
        text = MicroBatcher(
            functools.partial(self._answer_texts, encoder),
            max_batch=size,
            max_wait_ms=wait,
            name="text-batcher",
            on_batch=sizes.labels("text").observe,
        )
        image = MicroBatcher(
            functools.partial(self._answer_photos, encoder),
            max_batch=size,
            max_wait_ms=wait,
            name="image-batcher",
            on_batch=sizes.labels("image").observe,
        )
        return BatchedEmbed(encoder, text, image)

    def _install(self, searcher: Searcher) -> None:
        encoder = searcher.encoder
        if id(encoder) not in self._embeds:
            self._embeds[id(encoder)] = self._batchers_for(encoder)
        with self._swap_lock:
            old, self._searcher = self._searcher, searcher
        self.load_error = None
        self.images.forget()
        self.metrics.set_model(public_model_name(encoder), searcher.model_version)
        self._publish()
        if old is not None and old.store is not searcher.store:
            old.store.close()
        if old is not None and old.encoder is not encoder:
            self._retire(old.encoder)
            settle_heap()  # the new model's objects join the frozen heap; the old one's can be freed

    def _retire(self, encoder: Encoder) -> None:
        """Close an old model's batchers later, once the requests in flight on it are answered."""
        embed = self._embeds.pop(id(encoder), None)
        if embed is not None:
            for batcher in (embed.text, embed.image_batcher):
                threading.Timer(60, batcher.close).start()

    def _publish(self) -> None:
        searcher = self._searcher
        if searcher is not None:
            stats = searcher.store.stats()
            self.metrics.set_index(stats["count"], str(stats["generation"]), searcher.model_version)
            self._info = {
                "model": public_model_name(searcher.encoder),
                "model_version": searcher.model_version,
                "generation": stats["generation"],
                "count": stats["count"],
            }

    def refresh(self) -> bool:
        """Pick up index changes now; True when something changed. Never raises (the old state stays)."""
        searcher = self._searcher
        try:
            if searcher is None:
                self.try_open()
                changed = self._searcher is not None
            else:
                changed = searcher.store.refresh()
                if changed:
                    self.images.forget()
                    self._publish()
        except FingerprintMismatch:
            log.info("index now uses another model: loading it")
            self._load_new_model()
            changed = True
        except (VitrineError, OSError) as exc:
            log.warning("index refresh failed (still serving the previous state): %s", exc)
            return False
        if changed:
            self.metrics.refreshes.inc()
        return changed

    def _load_new_model(self) -> None:
        try:
            searcher = open_searcher(self.settings.index, None, self.limits, **self._encoder_kwargs())
        except VitrineError as exc:
            log.error("cannot load the new generation's model (still serving the old one): %s", exc)
            return
        self._install(searcher)

    def start(self) -> None:
        """Start the refresh thread (idempotent)."""
        if self._thread is None and self.settings.refresh_seconds > 0:
            self._thread = threading.Thread(target=self._refresh_loop, name="index-refresh", daemon=True)
            self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.settings.refresh_seconds):
            self.refresh()
            self.verify_snapshot()
            self.drift.poll(self._searcher)

    def verify_snapshot(self) -> None:
        """The loaded FAISS snapshot's whole checksum, once per snapshot, here in the background: opening
        only compared its size and mtime, so that start-up never hashes a multi-GB file."""
        searcher = self._searcher
        if searcher is None:
            return
        try:
            problem = searcher.store.verify_snapshot()
        except (VitrineError, OSError) as exc:
            log.warning("cannot verify the index snapshot (still serving): %s", exc)
            return
        if problem is not None:
            log.error("index snapshot damaged, now served from a rebuild out of meta.sqlite: %s", problem)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._searcher is not None:
            self._searcher.store.close()
        for embed in self._embeds.values():
            embed.text.close()
            embed.image_batcher.close()


def unwrap(answer: Answer) -> Found:
    if isinstance(answer, Exception):
        raise answer
    return answer


def public_model_name(encoder: Encoder) -> str:
    """The model's name as strangers may see it (page, results, /healthz, /metrics): a hub id as it is,
    a local checkpoint by its folder's name only, never the server path it was loaded from."""
    name = str(encoder.fingerprint.get("model") or "")
    local = os.path.isabs(name) or os.path.isdir(name)
    return os.path.basename(os.path.normpath(name)) if local else name
