"""Searches answered as a batch: one model forward for every text (or photo), one store call per page shape.

A server collects the text requests that arrive together (``app.batcher.MicroBatcher``) and hands them
here in one list. Plain strings are embedding requests (the text part of a combined search) and get
their vector back; a :class:`TextSearch` gets its answer, a :class:`Found` or the exception that is its
answer alone, so one query's failure (a store error) cannot fail the queries batched with it. Photo
queries go the same way (:func:`search_photos`): preprocessed pixels are embedding requests, a
:class:`PhotoSearch` (a photo-only query) gets its answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vitrine.errors import QueryError
from vitrine.model.encoder import Encoder
from vitrine.search.query import Query
from vitrine.search.searcher import Page, Searcher
from vitrine.search.vectors import push_away


@dataclass(frozen=True)
class TextSearch:
    """A text-only query and the searcher (index and model) it was validated for."""

    searcher: Searcher
    query: Query


@dataclass(frozen=True)
class Found:
    """A query's page and the vector it was searched with (a server samples it for drift checks)."""

    page: Page
    vector: np.ndarray


Answer = Found | Exception


@dataclass(frozen=True)
class PhotoSearch:
    """A photo-only query (:func:`photo_only`), its preprocessed photo, and the searcher it was parsed for."""

    searcher: Searcher
    query: Query
    pixels: torch.Tensor


def photo_only(query: Query) -> bool:
    """Answerable from the photo's embedding alone: no text, negatives or item, vector mode."""
    plain = query.text is None and not query.negative and query.key is None
    return query.image is not None and plain and query.mode == "vector"


def search_photos(encoder: Encoder, items: Sequence[torch.Tensor | PhotoSearch]) -> list[np.ndarray | Answer]:
    """Each pixel tensor's embedding and each PhotoSearch's answer, in ``items``' order: one forward for
    every photo, one store call per searcher and page shape (as :func:`search_texts`)."""
    pixels = [item.pixels if isinstance(item, PhotoSearch) else item for item in items]
    out: list[np.ndarray | Answer] = list(encoder.encode_pixels(torch.cat(pixels)))
    groups: dict[tuple, list[int]] = {}
    for j, item in enumerate(items):
        if isinstance(item, PhotoSearch):
            groups.setdefault((id(item.searcher), item.query.page), []).append(j)
    for members in groups.values():
        _answer(items, out, members)
    return out


def search_texts(encoder: Encoder, items: Sequence[str | TextSearch]) -> list[np.ndarray | Answer]:
    """Each string's embedding and each TextSearch's answer (negatives included), in ``items``' order.

    Every text goes through ``encoder`` in one forward (the searches' own encoder: a server batches per
    model); searches sharing a searcher and a page shape (k, offset, min_score, filters) share one
    store call.
    """
    texts: list[str] = []
    spans: list[tuple[int, int]] = []
    for item in items:
        own = [item] if isinstance(item, str) else [item.query.text or "", *item.query.negative]
        spans.append((len(texts), len(own)))
        texts.extend(own)
    rows = encoder.encode_texts(texts)
    out: list[np.ndarray | Answer] = []
    groups: dict[tuple, list[int]] = {}
    for j, (item, (start, n)) in enumerate(zip(items, spans, strict=True)):
        if isinstance(item, str):
            out.append(rows[start])
            continue
        try:
            out.append(push_away(rows[start], rows[start + 1 : start + n], item.query.negative_weight))
        except QueryError as exc:  # this query's answer alone
            out.append(exc)
            continue
        groups.setdefault((id(item.searcher), item.query.page), []).append(j)
    for members in groups.values():
        _answer(items, out, members)
    return out


def _answer(items: Sequence[object], out: list, members: list[int]) -> None:
    """Replace the vectors of ``members`` (searches sharing a store call) in ``out`` by their answers."""
    first = items[members[0]]
    assert isinstance(first, TextSearch | PhotoSearch)
    vectors = [out[j] for j in members]
    try:
        pages = first.searcher.pages(np.stack(vectors), first.query)
    except Exception as exc:  # reported to these searches alone
        for j in members:
            out[j] = exc
        return
    for j, vector, page in zip(members, vectors, pages, strict=True):
        out[j] = Found(page, vector)
