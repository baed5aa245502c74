"""A suggested relevance cutoff (``min_score``) for an index, from the scores of its own captions.

Where items have captions, a caption is a query whose right answer is known: its own image. On a sample
of captioned items, the score of each item's first caption against its own image is a *matching* score,
and against the other sampled images a *non-matching* one. The suggestion is the ``percentile``-th
percentile of the matching scores, so about ``100 - percentile`` % of true caption→image matches score
above it; the report also says which share of non-matching pairs would pass, so the trade-off is visible.

Computed on demand (``indexer status --suggest-cutoff``), not stored in the manifest: it needs the text
tower (seconds to load, which plain ``status``, a health check, must not pay), and it depends on the
catalog as it is now, so a stored value would go stale with every build and need the writer lock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from vitrine.index.reader import IndexReader

DEFAULT_SAMPLE = 256
DEFAULT_PERCENTILE = 10.0


def suggest_min_score(
    reader: IndexReader,
    encode_texts: Callable[[Sequence[str]], np.ndarray],
    sample: int = DEFAULT_SAMPLE,
    percentile: float = DEFAULT_PERCENTILE,
    seed: int = 0,
) -> dict:
    """The suggestion and how it was derived; ``min_score`` is None when fewer than 2 items have captions."""
    pairs = reader.first_captions()
    rng = np.random.default_rng(seed)
    if len(pairs) > sample:
        pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), size=sample, replace=False))]
    how = {
        "method": "percentile of caption→own-image scores on a sample of captioned items",
        "sample": len(pairs),
        "percentile": percentile,
        "seed": seed,
    }
    if len(pairs) < 2:
        return {"min_score": None, **how, "reason": "fewer than 2 captioned items"}
    keys, vectors = reader.embeddings([key for key, _ in pairs])
    captions = dict(pairs)
    scores = encode_texts([captions[k] for k in keys]) @ vectors.T
    matching = np.diag(scores)
    others = scores[~np.eye(len(keys), dtype=bool)]
    cut = float(np.percentile(matching, percentile, method="lower"))  # keeps >= 100 - p %
    return {
        "min_score": round(cut, 4),
        **how,
        "matching": _quantiles(matching),
        "non_matching": _quantiles(others),
        "matching_kept": round(float((matching >= cut).mean()), 4),
        "non_matching_passing": round(float((others >= cut).mean()), 4),
    }


def _quantiles(values: np.ndarray) -> dict[str, float]:
    points = np.percentile(values, [10, 50, 90])
    return {name: round(float(v), 4) for name, v in zip(("p10", "p50", "p90"), points, strict=True)}
