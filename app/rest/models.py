"""The REST API's request and response bodies (pydantic): they are its OpenAPI schema and its docs.

Pydantic checks shapes and types (a number where a number belongs); ranges, limits and the index's own
fields are checked once, by :func:`vitrine.search.query.parse_query`, for REST and Gradio alike.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ImageRef(BaseModel):
    """A query photo: its bytes as base64, or (only where the server allows the host) a URL to fetch."""

    model_config = ConfigDict(extra="forbid")

    base64: str | None = Field(None, description="The image file's bytes, base64-encoded (no data: prefix).")
    url: str | None = Field(
        None,
        description="http(s) URL of the image; only hosts listed by --allow-url-fetch, never private "
        "addresses, no redirects to other hosts, size and time limited.",
    )


class SearchRequest(BaseModel):
    """One search. Give at least one of ``text``, ``image`` or ``key`` (``image`` and ``key`` not both)."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="What to find, in words (or, with a photo: 'but in red').")
    image: ImageRef | None = Field(None, description="Search by a photo.")
    key: str | None = Field(None, description="Search for items like this indexed item (its key).")
    negative: list[str] = Field(
        default_factory=list, description="Texts to push away from (rclip's '-' terms): 'not this'."
    )
    weight: float = Field(
        0.5, description="The text's share against the photo or item: 0 = photo only, 1 = text only."
    )
    negative_weight: float = Field(0.5, description="How hard the negative texts push (0 to 1).")
    k: int = Field(10, description="Hits per page (1 to the server's --max-k).")
    offset: int = Field(0, description="Where the page starts; offset + k is at most --max-depth.")
    filters: dict[str, Any] | None = Field(
        None,
        description='Metadata filter (Mongo style): {"color": "red"}, {"price": {"$lt": 50}}, '
        '{"$or": [{"color": {"$in": ["red", "blue"]}}, {"added": {"$gte": "2024-01-01"}}]}; operators '
        "$eq $ne $gt $gte $lt $lte $in $nin $exists. Unknown fields are refused, naming the known ones.",
    )
    min_score: float | None = Field(
        None,
        description="Relevance cutoff: no hit scores below it. vector: a cosine (-1..1); lexical: a BM25 "
        "score; hybrid: a reciprocal-rank-fusion value (at most about 0.033).",
    )
    mode: str = Field(
        "vector",
        description="vector (embeddings), lexical (BM25 over captions, metadata and file names) or "
        "hybrid (both fused by reciprocal rank fusion); lexical and hybrid need a text.",
    )
    sort: str | None = Field(
        None, description="By score (default), or a metadata field: 'price', '-added' for descending."
    )


class Hit(BaseModel):
    key: str = Field(description="The item's key in the index (GET /api/v1/items/{key}).")
    file: str = Field(description="The item's file name relative to its catalog (never a server path).")
    url: str = Field(description="A thumbnail of the item: GET this (relative to the server).")
    score: float = Field(description="The rank score of the mode: cosine, BM25 or RRF (higher is closer).")
    vector_score: float | None = Field(None, description="Cosine similarity; null if not vector-ranked.")
    lexical_score: float | None = Field(None, description="BM25 score (-bm25); null if no word matched.")
    captions: list[str]
    metadata: dict[str, Any]
    model: str | None = Field(description="Display name of the model that embedded the item.")
    model_version: str = Field(description="The embedding-space id (encoder fingerprint id).")
    generation: str = Field(description="The index generation the hit comes from.")
    duplicates: list[str] = Field(description="Other keys with identical content.")


class SearchResponse(BaseModel):
    hits: list[Hit]
    offset: int
    next_offset: int | None = Field(description="The offset of the next page; null at the end.")
    mode: str = Field(description="How the hits were ranked: vector, lexical or hybrid.")
    model: str | None = Field(description="Display name of the model (checkpoint).")
    model_version: str = Field(description="The embedding-space id; scores from two versions don't compare.")
    generation: str | None
    took_ms: float


class Item(BaseModel):
    key: str
    file: str
    url: str
    captions: list[str]
    metadata: dict[str, Any]


class ErrorDetail(BaseModel):
    reason: str = Field(description="Short stable label (also the errors_total metric label).")
    message: str = Field(description="What to change, for a person.")


class ErrorBody(BaseModel):
    error: ErrorDetail
