"""Searcher: a :class:`~vitrine.search.query.Query` → its query vector → a page of hits.

``mode`` says how hits are ranked: ``vector`` (cosine, in the store), ``lexical`` (BM25 over the
full-text index) or ``hybrid`` (both fused by reciprocal rank fusion, :mod:`vitrine.search.hybrid`).
Every hit is a :class:`~vitrine.search.hybrid.RankedHit` carrying ``vector_score`` and
``lexical_score`` (None where that side did not rank it). Filters, pages, ``min_score`` and ``sort``
are applied inside the store's search (or the lexical/hybrid ranking), never by slicing here.

The Searcher is given its encoder and store (so tests and the app pass in real tiny parts). It takes a
Query as already validated (:func:`vitrine.search.query.parse_query` is the one place that checks client
values); the convenience methods (``search_text``, ``search``...) are the library's own edge and parse
their arguments first. How a query's parts become one vector is :mod:`vitrine.search.vectors`; how
embeddings are computed is an :class:`Embed` (the encoder directly, or a server's batched model calls).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from PIL import Image

from vitrine.errors import FingerprintMismatch, QueryError
from vitrine.index.store import IndexStore
from vitrine.model.encoder import Encoder
from vitrine.search import hybrid
from vitrine.search.hybrid import RankedHit, ranked
from vitrine.search.query import EMPTY_TEXT, Query, SearchLimits, parse_query
from vitrine.search.vectors import mix, push_away

ImageInput = str | os.PathLike | bytes | Image.Image
__all__ = ["Embed", "ImageInput", "Page", "SearchLimits", "Searcher"]


class Embed(Protocol):
    """Where query embeddings come from (normalised float32 rows)."""

    def texts(self, texts: list[str]) -> np.ndarray: ...

    def image(self, image: Image.Image) -> np.ndarray: ...


@dataclass(frozen=True)
class Page:
    """One page of hits; ``next_offset`` is where the next page starts, None when there is none."""

    hits: list[RankedHit]
    next_offset: int | None


class DirectEmbed:
    """The encoder called directly, one request at a time (library use, the CLI)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder

    def texts(self, texts: list[str]) -> np.ndarray:
        return self.encoder.encode_texts(texts)

    def image(self, image: Image.Image) -> np.ndarray:
        return self.encoder.encode_images([image])[0]


class Searcher:
    """Text, image, combined, "more like this" and negative-term search with metadata filters and pages;
    every hit carries the model version."""

    def __init__(self, encoder: Encoder, store: IndexStore, limits: SearchLimits | None = None) -> None:
        if encoder.fingerprint["id"] != store.fingerprint["id"]:
            raise FingerprintMismatch(store.fingerprint, encoder.fingerprint)
        self.encoder = encoder
        self.store = store
        self.limits = limits or SearchLimits()
        self.direct = DirectEmbed(encoder)

    @property
    def model_version(self) -> str:
        """The embedding-space id (the encoder's fingerprint id) that every hit's scores belong to."""
        return self.encoder.version

    # ------------------------------------------------------------------ validated queries
    def parse(self, **fields: Any) -> Query:
        """A client's fields → Query, filters and sort checked against this index's metadata schema."""
        return parse_query(self.limits, schema=self.store.schema, **fields)

    def vector(self, query: Query, embed: Embed | None = None) -> np.ndarray:
        """The query's one unit vector: text and photo (or item) mixed by ``weight``, negatives pushed
        away. All of its texts are embedded in one call."""
        texts = ([query.text] if query.text else []) + list(query.negative)
        rows = (embed or self.direct).texts(texts) if texts else np.zeros((0, self.store.dim), np.float32)
        text_vec = rows[0] if query.text else None
        negatives = rows[1:] if query.text else rows
        base = None
        if query.image is not None:
            base = (embed or self.direct).image(query.image)
        elif query.key is not None:
            base = self.item_vector(query.key)
        return push_away(mix(text_vec, base, query.weight), negatives, query.negative_weight)

    def item_vector(self, key: str) -> np.ndarray:
        """An indexed item's stored embedding (no re-encoding)."""
        keys, vectors = self.store.embeddings([key])
        if not keys:
            raise QueryError(f"no indexed item with key {key!r}"[:300], "unknown_key")
        return vectors[0]

    def run(self, query: Query, embed: Embed | None = None) -> Page:
        return self.answer(query, None if query.mode == "lexical" else self.vector(query, embed))

    def answer(self, query: Query, vector: np.ndarray | None) -> Page:
        """The page of ``query`` ranked by its mode; ``vector`` is its query vector (None in lexical
        mode). One hit past the page says whether another page follows."""
        if query.mode == "vector":
            assert vector is not None
            return self.pages(vector[None, :], query)[0]
        assert query.text is not None  # parse_query refuses lexical/hybrid without a text
        opts = dict(filters=query.filters, min_score=query.min_score, sort=query.sort)
        if query.mode == "lexical":
            hits = hybrid.lexical(self.store, query.text, query.k + 1, query.offset, **opts)
        else:
            assert vector is not None
            hits = hybrid.search(self.store, vector, query.text, query.k + 1, query.offset, **opts)
        return self._page(hits, query)

    def pages(self, vectors: np.ndarray, query: Query) -> list[Page]:
        """Vector-mode queries sharing ``query.page`` in one store call (a server's batch): the store
        applies the filter, ``min_score``, ``sort`` and the page."""
        found = self.store.search(
            vectors,
            query.k + 1,
            query.filters,
            offset=query.offset,
            min_score=query.min_score,
            sort=query.sort,
            max_depth=self.limits.max_depth + 1,  # the one hit past the deepest page
        )
        return [self._page([ranked(h, vector_score=h.score) for h in hits], query) for hits in found]

    def _page(self, hits: list[RankedHit], query: Query) -> Page:
        end = query.offset + query.k
        more = len(hits) > query.k and end < self.limits.max_depth
        return Page(hits[: query.k], end if more else None)

    # ------------------------------------------------------------------ the library's own edge
    def text_vector(self, text: str) -> np.ndarray:
        """Normalised query embedding for a text (validated)."""
        return self.vector(self.parse(text=text, empty=EMPTY_TEXT))

    def image_vector(self, image: ImageInput) -> np.ndarray:
        """Normalised query embedding for an image; undecodable input raises ImageDecodeError."""
        return self.direct.image(self.encoder.load_image(image))

    def search_text(self, text: str, k: int = 10, filters: Any = None) -> list[RankedHit]:
        return self.run(self.parse(text=text, k=k, filters=filters, empty=EMPTY_TEXT)).hits

    def search_image(self, image: ImageInput, k: int = 10, filters: Any = None) -> list[RankedHit]:
        return self.run(self.parse(image=self.encoder.load_image(image), k=k, filters=filters)).hits

    def search(
        self,
        image: ImageInput | None = None,
        text: str | None = None,
        weight: float = 0.5,
        k: int = 10,
        filters: Any = None,
    ) -> list[RankedHit]:
        """Photo, text, or both ("this dress but in red")."""
        photo = None if image is None else self.encoder.load_image(image)
        return self.run(self.parse(image=photo, text=text, weight=weight, k=k, filters=filters)).hits

    def more_like(self, key: str, k: int = 10, filters: Any = None) -> list[RankedHit]:
        """Neighbours of an indexed item, from its stored embedding (no re-encoding)."""
        return self.run(self.parse(key=key, k=k, filters=filters)).hits
