"""TextQuery: a text search answered entirely by the text batcher's thread.

Why: with Gradio's queue, a synchronous endpoint occupies a worker thread per request, and that thread
then hands the text to the model thread and waits. Measured with a function that does no work at
all, that hop alone cost 0.8 ms of CPU per request and moved p99 from 164 to 208 ms under 16 clients
on 2 cores (bench/RESULTS.md): most of a 250 ms budget. So ``search_text`` is a coroutine that puts a
:class:`TextQuery` on the text batcher and awaits it. The batcher's thread encodes every text that
arrived together in one forward (plain strings, from combined searches, share it) and answers each
query's search there, where FAISS and SQLite release the GIL without a request thread competing.

A query's own failure (an unknown filter, a store error) is returned as its answer, so it cannot fail
the queries batched with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitrine.index.store import Hit
from vitrine.model.encoder import Encoder
from vitrine.search.searcher import Searcher


@dataclass(frozen=True)
class TextQuery:
    """One validated text search: ``filters`` are still the client's (parsed in the batcher thread,
    where reading the index's metadata fields may touch SQLite)."""

    searcher: Searcher
    text: str
    k: int
    filters: Any


Answer = list[Hit] | Exception


def encode_or_search(
    encoder: Encoder,
    answer: Callable[[list[TextQuery], np.ndarray], list[Answer]],
    items: Sequence[str | TextQuery],
) -> list[Any]:
    """The text batcher's function: a plain string gets its embedding, a TextQuery its answer.

    Queries with the same searcher, k and filters are answered together (one FAISS call, one
    metadata lookup for all of them).
    """
    vectors = encoder.encode_texts([i if isinstance(i, str) else i.text for i in items])
    out: list[Any] = list(vectors)
    groups: dict[tuple, list[int]] = {}
    for j, item in enumerate(items):
        if isinstance(item, TextQuery):
            key = (id(item.searcher), item.k, json.dumps(item.filters, sort_keys=True, default=str))
            groups.setdefault(key, []).append(j)
    for rows in groups.values():
        for j, result in zip(rows, answer([items[j] for j in rows], vectors[rows]), strict=True):  # type: ignore[misc]
            out[j] = result
    return out
