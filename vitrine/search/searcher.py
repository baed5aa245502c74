"""Searcher: queries by text, by image, or both, against an index built by the same encoder.

The Searcher is given its encoder and store (so tests and the app pass in real tiny parts) and
validates every query before any model work: bad input is normal traffic and gets a
:class:`~vitrine.errors.QueryError` with a message a person can act on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vitrine.errors import FingerprintMismatch, QueryError
from vitrine.index.store import Hit, IndexStore
from vitrine.model.encoder import Encoder

ImageInput = str | os.PathLike | bytes | Image.Image


@dataclass(frozen=True)
class SearchLimits:
    """Guards on query size. ``max_text_chars`` refuses essays (CLIP reads 77 tokens anyway);
    ``max_k`` bounds result size."""

    max_text_chars: int = 1000
    max_k: int = 1000


class Searcher:
    """Text, image and combined search with metadata filters; every hit carries the model version."""

    def __init__(self, encoder: Encoder, store: IndexStore, limits: SearchLimits | None = None) -> None:
        if encoder.fingerprint["id"] != store.fingerprint["id"]:
            raise FingerprintMismatch(store.fingerprint, encoder.fingerprint)
        self.encoder = encoder
        self.store = store
        self.limits = limits or SearchLimits()

    @property
    def model_version(self) -> str:
        return self.encoder.version

    def text_vector(self, text: str) -> np.ndarray:
        """Normalised query embedding for a text (validated)."""
        return self.encoder.encode_texts([check_text(text, self.limits)])[0]

    def image_vector(self, image: ImageInput) -> np.ndarray:
        """Normalised query embedding for an image; undecodable input raises ImageDecodeError."""
        return self.encoder.encode_images([self.encoder.load_image(image)])[0]

    def combined_vector(self, image: ImageInput | None, text: str | None, weight: float = 0.5) -> np.ndarray:
        """``weight`` is the share of the text: 0 = photo only, 1 = text only, 0.5 = both equally.

        Both embeddings are unit vectors, so the weighted sum is re-normalised to compare by cosine.
        """
        check_weight(weight)
        has_text = bool(text and text.strip())
        if image is None and not has_text:
            raise QueryError("give a photo, a text, or both", "empty_query")
        text_vec = self.text_vector(text or "") if has_text else None
        return mix(text_vec, None if image is None else self.image_vector(image), weight)

    def by_vector(self, vector: np.ndarray, k: int = 10, filters: dict[str, str] | None = None) -> list[Hit]:
        return self.by_vectors(vector[None, :], k, filters)[0]

    def by_vectors(
        self, vectors: np.ndarray, k: int = 10, filters: dict[str, str] | None = None
    ) -> list[list[Hit]]:
        """Several queries in one FAISS call and one metadata lookup (a server's batch of queries)."""
        self._check_k(k)
        return self.store.search(vectors, k=k, filters=filters or None)

    def search_text(self, text: str, k: int = 10, filters: dict[str, str] | None = None) -> list[Hit]:
        self._check_k(k)
        return self.by_vector(self.text_vector(text), k, filters)

    def search_image(
        self, image: ImageInput, k: int = 10, filters: dict[str, str] | None = None
    ) -> list[Hit]:
        self._check_k(k)
        return self.by_vector(self.image_vector(image), k, filters)

    def search(
        self,
        image: ImageInput | None = None,
        text: str | None = None,
        weight: float = 0.5,
        k: int = 10,
        filters: dict[str, str] | None = None,
    ) -> list[Hit]:
        """Photo, text, or both ("this dress but in red")."""
        self._check_k(k)
        return self.by_vector(self.combined_vector(image, text, weight), k, filters)

    def more_like(self, key: str, k: int = 10, filters: dict[str, str] | None = None) -> list[Hit]:
        """Neighbours of an indexed item, from its stored embedding (no re-encoding)."""
        keys, vectors = self.store.embeddings([key])
        if not keys:
            raise QueryError(f"no indexed item with key {key!r}")
        return self.by_vector(vectors[0], k, filters)

    def _check_k(self, k: Any) -> None:
        check_k(k, self.limits)


def check_text(text: str | None, limits: SearchLimits) -> str:
    """The stripped query text, or QueryError: the rule every caller (Searcher, web service) applies."""
    text = (text or "").strip()
    if not text:
        raise QueryError("the text query is empty: type a description such as 'a red dress'", "empty_query")
    if len(text) > limits.max_text_chars:
        raise QueryError(
            f"the text query is {len(text)} characters long; the limit is {limits.max_text_chars}",
            "text_too_long",
        )
    return text


def check_k(k: Any, limits: SearchLimits) -> None:
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= int(k) <= limits.max_k:
        raise QueryError(f"k must be between 1 and {limits.max_k}, got {k!r}", "bad_k")


def check_weight(weight: float) -> None:
    if not 0.0 <= weight <= 1.0:
        raise QueryError(f"weight must be between 0 and 1, got {weight}", "bad_weight")


def mix(text_vec: np.ndarray | None, image_vec: np.ndarray | None, weight: float) -> np.ndarray:
    """``weight`` is the text's share: both are unit vectors, so the weighted sum is re-normalised to
    compare by cosine. Either may be missing (then the other is the query)."""
    if text_vec is None or image_vec is None:
        vec = text_vec if image_vec is None else image_vec
        assert vec is not None, "mix needs at least one vector"
        return vec
    mixed = weight * text_vec + (1.0 - weight) * image_vec
    return (mixed / max(float(np.linalg.norm(mixed)), 1e-12)).astype(np.float32)


def parse_filters(pairs: list[str] | None) -> dict[str, str]:
    """``["color=red", "size=M"]`` → ``{"color": "red", "size": "M"}`` (values may contain '=').

    An item that starts with ``{`` is a JSON object of fields and values, the form for keys that contain
    ``=`` (``{"a=b": "c"}``); it is also the form a richer filter language would extend.
    """
    filters: dict[str, str] = {}
    for pair in pairs or []:
        if pair.lstrip().startswith("{"):
            filters.update(filter_object(pair))
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise QueryError(f'filter {pair!r} is not of the form key=value or {{"key": "value"}}')
        filters[key.strip()] = value
    return filters


def filter_object(text: str) -> dict[str, str]:
    """A JSON object of field -> scalar value, as the strings filters compare (booleans as true/false)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(f"filter {text!r} is not valid JSON: {exc.msg}") from None
    if not isinstance(obj, dict):
        raise QueryError(f'filter {text!r} must be a JSON object such as {{"color": "red"}}')
    out: dict[str, str] = {}
    for key, value in obj.items():
        if isinstance(value, dict | list) or value is None:
            raise QueryError(f"filter field {key!r} must have a single text, number or boolean value")
        out[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return out
