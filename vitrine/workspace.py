"""Open an index together with the encoder that matches it.

An index remembers the model (and decode settings) that built it, so later commands need not repeat
``--model``; naming a different model is refused by the fingerprint check rather than silently
mixing embedding spaces.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vitrine.encoder import DEFAULT_MODEL, Encoder
from vitrine.errors import StoreError
from vitrine.search import Searcher, SearchLimits
from vitrine.store import IndexStore


def index_model(index: str | Path) -> tuple[str, dict[str, Any]] | None:
    """(model name, encoder kwargs) recorded by an existing index, or None if there is no index."""
    if not IndexStore.exists(index):
        return None
    fp = IndexStore.read_manifest(index)["fingerprint"]
    return fp["model"], {"draft_size": (fp.get("decode") or {}).get("draft")}


def load_encoder(index: str | Path, model: str | None, **encoder_kwargs: Any) -> Encoder:
    """The encoder for ``index``: ``model`` if given, else the index's own, else $VITRINE_MODEL/default."""
    recorded = index_model(index)
    if recorded is not None:
        name, recorded_kwargs = recorded
        encoder_kwargs = {**recorded_kwargs, **encoder_kwargs}
        return Encoder.from_pretrained(model or name, **encoder_kwargs)
    return Encoder.from_pretrained(
        model or os.environ.get("VITRINE_MODEL") or DEFAULT_MODEL, **encoder_kwargs
    )


def encoder_fingerprint(encoder: Encoder) -> dict[str, Any]:
    """The fingerprint stored in a manifest: the encoder's, plus what reopening it needs."""
    return {**encoder.fingerprint, "decode": {"draft": encoder.draft_size}}


def open_for_build(index: str | Path, encoder: Encoder, *, factory: str | None = None) -> IndexStore:
    """Writable store for ``encoder``: created on first use, fingerprint-checked afterwards."""
    if IndexStore.exists(index):
        return IndexStore.open(index, expected_fingerprint=encoder.fingerprint, writable=True)
    try:
        return IndexStore.create(index, encoder_fingerprint(encoder), factory=factory)
    except OSError as exc:
        raise StoreError(f"cannot create index directory {str(index)!r}: {exc.strerror or exc}") from exc


def open_searcher(
    index: str | Path, model: str | None = None, limits: SearchLimits | None = None, **encoder_kwargs: Any
) -> Searcher:
    """Read-only Searcher over an existing index with its own model."""
    if not IndexStore.exists(index):
        raise StoreError(
            f"no index at {str(index)!r}: create one with `python -m indexer build CATALOG --index DIR`"
        )
    encoder = load_encoder(index, model, **encoder_kwargs)
    store = IndexStore.open(index, expected_fingerprint=encoder.fingerprint)
    return Searcher(encoder, store, limits)
