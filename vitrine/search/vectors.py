"""Query vectors from a query's parts: photo + text mixing and negative terms, in one place.

Every embedding is a unit vector compared by cosine, so each combination is re-normalised.
"""

from __future__ import annotations

import numpy as np

from vitrine.errors import QueryError


def mix(text_vec: np.ndarray | None, image_vec: np.ndarray | None, weight: float) -> np.ndarray:
    """``weight`` is the text's share: both are unit vectors, so the weighted sum is re-normalised to
    compare by cosine. Either may be missing (then the other is the query)."""
    if text_vec is None or image_vec is None:
        vec = text_vec if image_vec is None else image_vec
        if vec is None:
            raise ValueError("mix needs at least one vector")
        return vec
    return _unit(weight * text_vec + (1.0 - weight) * image_vec)


def push_away(vec: np.ndarray, negatives: np.ndarray | None, weight: float) -> np.ndarray:
    """rclip's ``-`` terms: subtract ``weight`` times the mean of the negative embeddings, then
    re-normalise, so items close to what the client does not want rank lower."""
    if negatives is None or len(negatives) == 0 or weight == 0:
        return vec
    pushed = vec - weight * np.asarray(negatives, dtype=np.float32).mean(axis=0)
    if float(np.linalg.norm(pushed)) < 1e-4:  # nothing is left to search for
        raise QueryError(
            "the negative texts cancel the query: use other words or a lower weight", "bad_negative"
        )
    return _unit(pushed)


def _unit(vec: np.ndarray) -> np.ndarray:
    return (vec / max(float(np.linalg.norm(vec)), 1e-12)).astype(np.float32)
