"""Per-slice retrieval quality: recall@k per value of a metadata field, with counts and intervals.

An aggregate recall can hide a slice that got worse (a new model better on most photos and much worse
on, say, night scenes or one photographer's work), so quality is also reported per value of one
metadata field. Every query still ranks *all* candidates; a slice only chooses which queries are
counted: the captions of its images (text→image) and its images (image→text).

A slice of 30 captions has a wide margin of error, so each recall comes with its Wilson score interval
(95 %), which unlike the normal approximation stays inside [0, 100] and behaves at 0 and 100 %; the
reindex gate only judges slices with enough items (``--slice-min-items``).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

MISSING = "(missing)"
Z95 = 1.959964


def slice_value(metadata: Mapping[str, Any] | None, field: str) -> str:
    """The slice an item belongs to: its ``field`` value as text (``(missing)`` when absent/null)."""
    value = (metadata or {}).get(field)
    if value is None:
        return MISSING
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``hits`` successes in ``n`` trials, in percent."""
    if n <= 0:
        return 0.0, 100.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2)


def _with_interval(rank: torch.Tensor, ks: Iterable[int]) -> tuple[dict[str, float], dict[str, list[float]]]:
    n = int(rank.shape[0])
    recall, interval = {}, {}
    for k in sorted(set(int(k) for k in ks)):
        hits = int((rank < k).sum())
        recall[f"R@{k}"] = round(100.0 * hits / n, 2) if n else 0.0
        interval[f"R@{k}"] = list(wilson(hits, n))
    return recall, interval


@dataclass
class SliceRecall:
    """Recall of one slice: its value, how many images and captions it has, R@k both ways with the
    95 % Wilson interval of each."""

    value: str
    images: int
    captions: int
    t2i: dict[str, float]
    t2i_ci: dict[str, list[float]]
    i2t: dict[str, float]
    i2t_ci: dict[str, list[float]]

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def slice_recall(ranks: Any, values: Sequence[str], ks: Iterable[int]) -> list[SliceRecall]:
    """Per-slice recall from :class:`vitrine.evaluate.Ranks`; ``values[i]`` is image row i's slice.
    Largest slices first."""
    ks = list(ks)
    codes = {value: code for code, value in enumerate(Counter(values))}
    labels = torch.tensor([codes[v] for v in values], dtype=torch.long)
    out = []
    for value, code in codes.items():
        images = labels == code
        t2i_rank = ranks.t2i[images[ranks.owner]]
        i2t_rank = ranks.i2t[images & ranks.captioned]
        t2i, t2i_ci = _with_interval(t2i_rank, ks)
        i2t, i2t_ci = _with_interval(i2t_rank, ks)
        out.append(SliceRecall(value, int(images.sum()), int(t2i_rank.shape[0]), t2i, t2i_ci, i2t, i2t_ci))
    return sorted(out, key=lambda s: (-s.images, s.value))
