"""The gate a quantized (or otherwise approximated) image tower passes before it encodes a catalog.

Two checks on held-out catalog images that calibration never saw, both against the fp32 torch
embeddings of the same pixels:

- cosine: every held-out image's embedding must stay within ``min_cosine`` of its fp32 embedding
  (:data:`MIN_COSINE` by default; ``VITRINE_INT8_MIN_COSINE`` overrides it), so no single image drifts
  away even when the average looks fine;
- recall, where the held-out images have captions: text→image R@10 (:func:`vitrine.evaluate.recall_at_k`,
  the project's one definition) may drop by at most ``max_recall_drop`` points (default 0.5).

The result, passed or not, is a :class:`Validation` whose ``to_dict`` goes into the index manifest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from vitrine.evaluate import recall_at_k

MIN_COSINE = 0.98
MAX_RECALL_DROP = 0.5


@dataclass(frozen=True)
class Gate:
    min_cosine: float = field(
        default_factory=lambda: float(os.environ.get("VITRINE_INT8_MIN_COSINE", MIN_COSINE))
    )
    max_recall_drop: float = MAX_RECALL_DROP


@dataclass
class Validation:
    runtime: str
    precision: str
    passed: bool
    reason: str
    images: int
    cosine_min: float
    cosine_mean: float
    captions: int = 0
    recall_fp32: float | None = None
    recall: float | None = None
    gate: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _normalised(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check(
    runtime: str,
    precision: str,
    candidate: np.ndarray,
    reference: np.ndarray,
    captions: Sequence[Sequence[str]] | None = None,
    texts: tuple[np.ndarray, np.ndarray] | None = None,
    gate: Gate | None = None,
) -> Validation:
    """Compare ``candidate`` image embeddings with the fp32 ``reference`` of the same held-out images.

    ``captions[i]`` are image i's captions and ``texts`` = (fp32 text embeddings, candidate text
    embeddings) of those captions flattened in order; without captions only the cosine is checked.
    """
    gate = gate or Gate()
    cos = np.sum(_normalised(candidate) * _normalised(reference), axis=1)
    result = Validation(
        runtime,
        precision,
        True,
        "",
        len(cos),
        round(float(cos.min()), 5),
        round(float(cos.mean()), 5),
        gate={"min_cosine": gate.min_cosine, "max_recall_drop": gate.max_recall_drop},
    )
    if not np.all(np.isfinite(cos)) or float(cos.min()) < gate.min_cosine:
        result.passed = False
        worst = float(np.nan_to_num(cos.min()))
        result.reason = f"cosine to fp32 {worst:.4f} < {gate.min_cosine} on {len(cos)} held-out images"
        return result
    owner = [i for i, caps in enumerate(captions or ()) for _ in caps]
    if owner and texts is not None:
        result.captions = len(owner)
        result.recall_fp32 = recall_at_k(reference, texts[0], owner, ks=(10,))[0]["R@10"]
        result.recall = recall_at_k(candidate, texts[1], owner, ks=(10,))[0]["R@10"]
        if result.recall < result.recall_fp32 - gate.max_recall_drop:
            result.passed = False
            result.reason = (
                f"text→image R@10 {result.recall:.2f} vs fp32 {result.recall_fp32:.2f} "
                f"on {len(owner)} captions (allowed drop {gate.max_recall_drop} points)"
            )
    return result
