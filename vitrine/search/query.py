"""Query: one search, validated once at the edge into a typed value that nothing below checks again.

Clients send loosely typed values (a slider's float for ``k``, filters as an object, a JSON string or
``"k=v"`` pairs, a list where a string belongs). :func:`parse_query` turns them into a :class:`Query` or
raises one :class:`~vitrine.errors.QueryError` whose ``reason`` names the problem (``bad_k``,
``bad_text``, ``empty_query``, ``text_too_long``, ``bad_weight``, ``bad_offset``, ``bad_min_score``,
``unknown_filter``, ``bad_filter``, ``bad_mode``, ``bad_sort``...). Filters are parsed here, once,
against the index's schema (:func:`vitrine.index.filters.parse_filter`); the expression is what the
store and the full-text side search with. The Searcher, the batcher and the web service take a Query as
given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from vitrine.errors import QueryError
from vitrine.index.filters import FilterExpr, parse_filter
from vitrine.index.schema import FieldInfo
from vitrine.search.filters import filter_object, short

MODES = ("vector", "lexical", "hybrid")
EMPTY_TEXT = "the text query is empty: type a description such as 'a red dress'"
EMPTY_ANY = "give a photo, a text, or both"


@dataclass(frozen=True)
class SearchLimits:
    """Guards on query size. ``max_text_chars`` refuses essays (CLIP reads 77 tokens anyway); ``max_k``
    bounds one page; ``max_depth`` bounds how far pages go (``offset + k``); ``max_negative`` bounds the
    texts a query may push away from."""

    max_text_chars: int = 1000
    max_k: int = 1000
    max_depth: int = 1000
    max_negative: int = 16


@dataclass(frozen=True)
class Query:
    """One validated search. Sources: ``text``, ``image`` (decoded) and ``key`` (an indexed item); at
    least one is set, ``image`` and ``key`` not both. ``weight`` is the text's share against the photo
    or item; ``negative`` texts are pushed away from with ``negative_weight``. The result is the page
    ``[offset, offset + k)`` of hits scoring at least ``min_score`` and matching ``filters`` (a parsed
    expression), ranked by ``mode`` and ordered by score or by ``sort`` (a metadata field, ``-field``
    descending)."""

    text: str | None = None
    image: Image.Image | None = field(default=None, compare=False)
    key: str | None = None
    negative: tuple[str, ...] = ()
    weight: float = 0.5
    negative_weight: float = 0.5
    k: int = 10
    offset: int = 0
    filters: FilterExpr | None = None
    min_score: float | None = None
    mode: str = "vector"
    sort: str | None = None

    @property
    def texts_only(self) -> bool:
        """Answerable from text embeddings alone (the text batcher answers it whole)."""
        return self.image is None and self.key is None and self.text is not None and self.mode == "vector"

    @property
    def page(self) -> tuple:
        """What queries must share to be searched in one store call."""
        return (self.k, self.offset, self.min_score, repr(self.filters), self.sort, self.mode)

    @property
    def kind(self) -> str:
        """``text``, ``image`` (a photo or an item) or ``both``: the drift journal's query mode."""
        base = self.image is not None or self.key is not None
        return "both" if base and self.text else ("image" if base else "text")


def parse_query(
    limits: SearchLimits,
    *,
    text: Any = None,
    image: Image.Image | None = None,
    key: Any = None,
    negative: Any = None,
    weight: Any = 0.5,
    negative_weight: Any = 0.5,
    k: Any = 10,
    offset: Any = 0,
    filters: Any = None,
    min_score: Any = None,
    mode: Any = "vector",
    sort: Any = None,
    schema: Callable[[], Mapping[str, FieldInfo]] | None = None,
    empty: str | None = EMPTY_ANY,
) -> Query:
    """The one place client values are checked. ``schema`` (called only when there are filters or a
    sort) gives the index's metadata fields and types; ``empty`` is the message when no source is given
    (None: a photo may still follow, added by :func:`with_image`, so that a photo is decoded only for a
    valid query)."""
    kk = number(k, "k", int)
    check_k(kk, limits)
    words = clean_text(optional_text(text), limits)
    w, nw = number(weight, "weight", float), number(negative_weight, "negative_weight", float)
    check_weight(w, "weight")
    check_weight(nw, "negative_weight")
    how = _mode(mode)
    query = Query(
        text=words,
        image=image,
        key=_key(key),
        negative=_negative(negative, limits),
        weight=w,
        negative_weight=nw,
        k=kk,
        offset=_offset(offset, kk, limits),
        filters=_filters(filters, schema),
        min_score=_min_score(min_score, how),
        mode=how,
        sort=_sort(sort, schema),
    )
    if how != "vector" and query.text is None:
        raise QueryError(f"mode {how!r} ranks by the words of a text: give a text", "bad_mode")
    return query if empty is None else require_source(query, empty)


def with_image(query: Query, image: Image.Image | None, empty: str = EMPTY_ANY) -> Query:
    """``query`` with its decoded photo, checked for a source."""
    return require_source(query if image is None else replace(query, image=image), empty)


def require_source(query: Query, empty: str) -> Query:
    """A query searches from a text, a photo or an item key (not a photo and a key)."""
    if query.text is None and query.image is None and query.key is None:
        raise QueryError(empty, "empty_query")
    if query.image is not None and query.key is not None:
        raise QueryError("give a photo or an item key to search from, not both", "bad_query")
    return query


def number(value: Any, name: str, kind: type) -> Any:
    """``value`` as an int or float; refuses booleans, non-numbers, infinities as ints, and fractions."""
    if isinstance(value, bool):
        raise QueryError(f"{name} must be a number, got {short(value)}", f"bad_{name}")
    try:
        out = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity as an int
        raise QueryError(f"{name} must be a number, got {short(value)}", f"bad_{name}") from None
    if kind is int and isinstance(value, float) and value != out:  # never float() a 400-digit int
        raise QueryError(f"{name} must be a whole number, got {short(value)}", f"bad_{name}")
    if kind is float and not math.isfinite(out):
        raise QueryError(f"{name} must be a finite number, got {short(value)}", f"bad_{name}")
    return out


def optional_text(text: Any) -> str | None:
    """The text of a query as sent, refused unless it is a string (a list is not stringified)."""
    if text is None or isinstance(text, str):
        return text
    raise QueryError(f"the text query must be a string, got {type(text).__name__}", "bad_text")


def clean_text(text: str | None, limits: SearchLimits) -> str | None:
    """The stripped text, None when blank; refuses essays."""
    text = (text or "").strip()
    if len(text) > limits.max_text_chars:
        raise QueryError(
            f"the text query is {len(text)} characters long; the limit is {limits.max_text_chars}",
            "text_too_long",
        )
    return text or None


def check_k(k: int, limits: SearchLimits) -> None:
    if not 1 <= k <= limits.max_k:
        raise QueryError(f"k must be between 1 and {limits.max_k}, got {k!r}", "bad_k")


def check_weight(weight: float, name: str = "weight") -> None:
    if not 0.0 <= weight <= 1.0:
        raise QueryError(f"{name} must be between 0 and 1, got {weight}", f"bad_{name}")


def _key(key: Any) -> str | None:
    if key is None or key == "":
        return None
    if not isinstance(key, str):
        raise QueryError(f"key must be a string, got {type(key).__name__}", "bad_key")
    return key


def _negative(negative: Any, limits: SearchLimits) -> tuple[str, ...]:
    if negative is None or negative == "":
        return ()
    items = [negative] if isinstance(negative, str) else negative
    if not isinstance(items, list | tuple) or not all(isinstance(t, str) for t in items):
        raise QueryError("negative must be a list of texts", "bad_negative")
    texts = tuple(t for t in (clean_text(t, limits) for t in items) if t)
    if len(texts) > limits.max_negative:
        raise QueryError(f"at most {limits.max_negative} negative texts, got {len(texts)}", "bad_negative")
    return texts


def _offset(offset: Any, k: int, limits: SearchLimits) -> int:
    value = number(offset, "offset", int)
    if value < 0 or value + k > limits.max_depth:
        raise QueryError(
            f"offset must be at least 0 and offset + k at most {limits.max_depth}, got offset {value}",
            "bad_offset",
        )
    return value


def _filters(filters: Any, schema: Callable[[], Mapping[str, FieldInfo]] | None) -> FilterExpr | None:
    obj = filter_object(filters)
    return parse_filter(obj, schema() if schema is not None else {}) if obj else None


def _min_score(min_score: Any, mode: str) -> float | None:
    """A cosine in vector mode; in lexical mode a BM25 score and in hybrid an RRF value (any number)."""
    if min_score is None or min_score == "":
        return None
    value = number(min_score, "min_score", float)
    if mode == "vector" and not -1.0 <= value <= 1.0:
        raise QueryError(f"min_score must be between -1 and 1 (a cosine), got {value}", "bad_min_score")
    return value


def _mode(mode: Any) -> str:
    if mode is None or mode == "":
        return "vector"
    if mode not in MODES:
        raise QueryError(f"mode must be one of {', '.join(MODES)}, got {short(mode)}", "bad_mode")
    return mode


def _sort(sort: Any, schema: Callable[[], Mapping[str, FieldInfo]] | None) -> str | None:
    if sort is None or sort == "" or sort == "score":
        return None
    if not isinstance(sort, str):
        raise QueryError("sort must be a metadata field name (or -field)", "bad_sort")
    fields = schema() if schema is not None else {}
    if sort.removeprefix("-") not in fields:
        known = ", ".join(f"{n} ({f.type})" for n, f in sorted(fields.items())) or "none"
        raise QueryError(f"cannot sort by unknown field {short(sort)}; known fields: {known}", "bad_sort")
    return sort
