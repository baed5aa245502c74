"""Retrieval quality of an index generation from its own captions: the sample, the ranks, per slice.

Two callers measure a generation the same way: reindex validation (:mod:`vitrine.build.reindex`:
the live and the new generation on the same sample, overall and per slice) and the app (the live
generation's per-slice recall on the Drift tab and ``/metrics``). The sample is a deterministic
hash-chosen set of captioned items; images are the embeddings the generation stores, captions are
encoded by the generation's model, and every caption ranks all sampled images (text→image R@k).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from vitrine.errors import ReindexError
from vitrine.evaluate import Ranks, retrieval_ranks
from vitrine.index import layout
from vitrine.slices import slice_recall, slice_value

RECALL_K = 10


@dataclass
class CaptionSample:
    """Up to ``size`` captioned items of a generation: their keys, captions and metadata."""

    keys: list[str]
    captions: dict[str, list[str]]
    metadata: dict[str, dict[str, Any]]

    def restrict(self, keys: list[str]) -> CaptionSample:
        return CaptionSample(keys, {k: self.captions[k] for k in keys}, {k: self.metadata[k] for k in keys})

    def texts(self) -> tuple[list[str], list[int]]:
        """All captions of the sample, and the position of each one's item."""
        captions = [c for k in self.keys for c in self.captions[k]]
        owner = [i for i, k in enumerate(self.keys) for _ in self.captions[k]]
        return captions, owner

    def values(self, field: str) -> list[str]:
        return [slice_value(self.metadata[k], field) for k in self.keys]


def caption_sample(store: Any, size: int) -> CaptionSample:
    """Up to ``size`` captioned items, chosen by a hash of the key (deterministic, spread over the whole
    catalog, and the same items for every generation holding them)."""
    if size <= 0:
        return CaptionSample([], {}, {})
    conn = layout.connect(store.root / store.generation / "meta.sqlite", readonly=True)
    try:
        keys = [r[0] for r in conn.execute("SELECT key FROM items WHERE captions NOT IN ('[]', '')")]
        keys = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).digest())[:size]
        query = "SELECT key, captions, metadata FROM items WHERE key IN ({})"
        found = {row[0]: row[1:] for row in layout.select_in(conn, query, keys)}
    finally:
        conn.close()
    return CaptionSample(
        keys,
        {k: json.loads(found[k][0]) for k in keys},
        {k: json.loads(found[k][1] or "{}") for k in keys},
    )


def sample_ranks(store: Any, sample: CaptionSample, texts: np.ndarray, owner: list[int]) -> Ranks:
    """Ranks of the sample's captions (encoded as ``texts``) among the images ``store`` holds."""
    found, images = store.embeddings(sample.keys)
    if found != sample.keys:
        raise ReindexError(
            f"generation {store.generation} lacks {len(sample.keys) - len(found)} sampled items"
        )
    return retrieval_ranks(images, texts, owner)


def t2i_recall(ranks: Ranks, images: Any = None) -> float:
    return float(ranks.recall((RECALL_K,), images)[0][f"R@{RECALL_K}"])


def compare_slices(
    old: Ranks, new: Ranks, values: list[str], *, min_items: int, margin: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per-slice text→image R@10 of two generations on the same sample: one row per slice, and a
    problem for each slice of at least ``min_items`` items whose recall fell by more than ``margin``."""
    rows, problems = [], []
    before = {s.value: s for s in slice_recall(old, values, (RECALL_K,))}
    for s in slice_recall(new, values, (RECALL_K,)):
        was, now = before[s.value].t2i[f"R@{RECALL_K}"], s.t2i[f"R@{RECALL_K}"]
        judged = s.images >= min_items
        rows.append({"value": s.value, "items": s.images, "captions": s.captions, "old": was, "new": now})
        rows[-1]["judged"] = judged
        if judged and now < was - margin:
            problems.append(
                f"slice {s.value!r} ({s.images} items): text->image R@{RECALL_K} {now:.2f} vs {was:.2f}, "
                f"worse by more than the {margin:g}-point margin"
            )
    return rows, problems


def generation_quality(store: Any, encoder: Any, *, size: int, field: str | None) -> dict[str, Any] | None:
    """Text→image R@10 of a generation on its own captions, per ``field`` value too (None when no item
    has a caption): ``{"generation", "items", "captions", "recall", "field", "slices": [...]}``, each
    slice with its count and 95 % Wilson interval."""
    sample = caption_sample(store, size)
    found = store.embeddings(sample.keys)[0]
    if not found:
        return None
    sample = sample.restrict(found)
    captions, owner = sample.texts()
    ranks = sample_ranks(store, sample, encoder.encode_texts(captions), owner)
    slices = [] if field is None else slice_recall(ranks, sample.values(field), (RECALL_K,))
    return {
        "generation": store.generation,
        "items": len(sample.keys),
        "captions": len(captions),
        "recall": t2i_recall(ranks),
        "field": field,
        "slices": [
            {"value": s.value, "items": s.images, "captions": s.captions, "recall": s.t2i[f"R@{RECALL_K}"]}
            | {"interval": s.t2i_ci[f"R@{RECALL_K}"]}
            for s in slices
        ],
    }
