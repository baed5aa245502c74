"""Retrieval quality: text→image and image→text recall@k on a captioned catalog.

The standard protocol of image–text retrieval benchmarks (Flickr8k/30k, COCO): every caption ranks all
images and scores a hit at k when its own image is among the top k; every image ranks all captions and
scores a hit when *any* of its own captions is among the top k. Recall is reported in percent.

One implementation serves three callers, so a number printed by training, by
``python -m train_contrastive evaluate`` and by reindex validation always means the same thing:

- :func:`recall_at_k` works on embeddings already computed (training's eval loop feeds it features of
  its cached frozen layers);
- :func:`evaluate_catalog` encodes a catalog with an :class:`~vitrine.model.encoder.Encoder` first.

Ranks are computed by counting strictly higher scores, so a tie counts in the query's favour; with
float embeddings exact ties practically never happen. Similarities are computed in blocks of
``chunk`` queries, so memory stays at ``chunk × n`` scores whatever the catalog size.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitrine.errors import CatalogError, ImageDecodeError
from vitrine.slices import SliceRecall, slice_recall, slice_value

DEFAULT_KS = (1, 5, 10)


@dataclass
class RetrievalReport:
    """Recall in percent per direction, plus what was measured (and what was skipped)."""

    t2i: dict[str, float]
    i2t: dict[str, float]
    images: int
    captions: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    slice_field: str | None = None
    slices: list[SliceRecall] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON contract ``{"t2i": {"R@1",…}, "i2t": {…}, "images": n, "captions": m}``, plus
        ``skipped`` (how many images failed to decode) and, when sliced, ``slice_field`` and ``slices``
        (one :class:`~vitrine.slices.SliceRecall` per value, largest first)."""
        out: dict[str, Any] = {
            "t2i": self.t2i,
            "i2t": self.i2t,
            "images": self.images,
            "captions": self.captions,
            "skipped": len(self.skipped),
        }
        if self.slice_field is not None:
            out["slice_field"] = self.slice_field
            out["slices"] = [s.to_dict() for s in self.slices]
        return out


def _as_tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().float().cpu()


@dataclass
class Ranks:
    """Per-query ranks (0 = first): ``t2i[j]`` of caption j's own image, ``i2t[i]`` of image i's best
    own caption; ``owner[j]`` is caption j's image row, ``captioned[i]`` whether image i has captions."""

    t2i: torch.Tensor
    i2t: torch.Tensor
    owner: torch.Tensor
    captioned: torch.Tensor

    def recall(self, ks: Iterable[int], images: torch.Tensor | None = None) -> tuple[dict, dict]:
        """``(t2i, i2t)`` recall@k in percent, over all queries or those of the ``images`` mask (a
        caption belongs to its image's slice; every query still ranks *all* candidates)."""
        images = torch.ones_like(self.captioned) if images is None else images
        return _recall(self.t2i[images[self.owner]], ks), _recall(self.i2t[images & self.captioned], ks)


def _recall(rank: torch.Tensor, ks: Iterable[int]) -> dict[str, float]:
    n = max(1, rank.shape[0])
    return {f"R@{k}": round(100.0 * float((rank < k).sum()) / n, 2) for k in sorted(set(int(k) for k in ks))}


def retrieval_ranks(
    image_embeddings: np.ndarray | torch.Tensor,
    text_embeddings: np.ndarray | torch.Tensor,
    caption_image: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    normalise: bool = True,
    chunk: int = 1024,
) -> Ranks:
    """The rank of every query's answer, both directions (see :func:`recall_at_k`)."""
    images, texts = _as_tensor(image_embeddings), _as_tensor(text_embeddings)
    owner = torch.as_tensor(np.asarray(caption_image), dtype=torch.long)
    if images.shape[0] == 0 or texts.shape[0] == 0:
        raise ValueError("recall needs at least one image and one caption")
    if owner.shape[0] != texts.shape[0]:
        raise ValueError(f"{texts.shape[0]} captions but {owner.shape[0]} caption→image links")
    if int(owner.min()) < 0 or int(owner.max()) >= images.shape[0]:
        raise ValueError("a caption points to an image row that does not exist")
    if normalise:
        images = torch.nn.functional.normalize(images, dim=-1)
        texts = torch.nn.functional.normalize(texts, dim=-1)

    # text → image: rank of the caption's own image among all images.
    t2i_rank = torch.empty(texts.shape[0], dtype=torch.long)
    for start in range(0, texts.shape[0], chunk):
        scores = texts[start : start + chunk] @ images.T  # (c, n_images)
        own = scores.gather(1, owner[start : start + chunk, None])
        t2i_rank[start : start + chunk] = (scores > own).sum(1)

    # image → text: rank of the best-ranked of the image's own captions among all captions.
    i2t_rank = torch.full((images.shape[0],), texts.shape[0], dtype=torch.long)
    for start in range(0, images.shape[0], chunk):
        scores = images[start : start + chunk] @ texts.T  # (c, n_captions)
        rows = torch.arange(start, start + scores.shape[0])
        is_own = owner[None, :] == rows[:, None]
        best_own = scores.masked_fill(~is_own, float("-inf")).max(1, keepdim=True).values
        rank = (scores > best_own).sum(1)
        has_caption = is_own.any(1)
        i2t_rank[start : start + scores.shape[0]] = torch.where(has_caption, rank, texts.shape[0])
    captioned = torch.zeros(images.shape[0], dtype=torch.bool)
    captioned[owner] = True  # images without captions cannot be scored image→text
    return Ranks(t2i_rank, i2t_rank, owner, captioned)


def recall_at_k(
    image_embeddings: np.ndarray | torch.Tensor,
    text_embeddings: np.ndarray | torch.Tensor,
    caption_image: Sequence[int] | np.ndarray | torch.Tensor,
    ks: Iterable[int] = DEFAULT_KS,
    *,
    normalise: bool = True,
    chunk: int = 1024,
) -> tuple[dict[str, float], dict[str, float]]:
    """``(t2i, i2t)`` recall@k in percent.

    ``caption_image[j]`` is the row of ``image_embeddings`` that caption ``j`` describes. Embeddings
    are L2-normalised here unless ``normalise=False`` (then scores are plain dot products).
    Raises ``ValueError`` on empty inputs or captions pointing outside the image rows.
    """
    ranks = retrieval_ranks(
        image_embeddings, text_embeddings, caption_image, normalise=normalise, chunk=chunk
    )
    return ranks.recall(ks)


def evaluate_catalog(
    encoder: Any, catalog: Iterable[Any], ks: Iterable[int] = DEFAULT_KS, slice_field: str | None = None
) -> RetrievalReport:
    """Encode a captioned catalog with ``encoder`` and measure recall both ways (and per value of the
    metadata field ``slice_field``, when given: :mod:`vitrine.slices`).

    Records without captions are ignored; images that fail to decode are skipped (listed in
    ``skipped`` as ``(path, reason)``) together with their captions, never fatal. Raises
    :class:`CatalogError` when nothing captioned is left to evaluate.
    """
    from vitrine.catalog.readers import read_source

    records = [r for r in catalog if r.captions]
    if not records:
        raise CatalogError("the catalog has no captions: recall needs image–caption pairs")
    image_rows: list[np.ndarray] = []
    kept: list[Any] = []
    skipped: list[tuple[str, str]] = []
    for record, result in encoder.encode_stream(records, lambda r: encoder.load_image(read_source(r.path))):
        if isinstance(result, ImageDecodeError):
            skipped.append((record.path, result.reason))
        else:
            image_rows.append(result)
            kept.append(record)
    if not kept:
        raise CatalogError("no image of the catalog could be decoded")
    captions = [c for r in kept for c in r.captions]
    owner = [i for i, r in enumerate(kept) for _ in r.captions]
    texts = encoder.encode_texts(captions)
    ks = list(ks)
    ranks = retrieval_ranks(np.stack(image_rows), texts, owner)
    t2i, i2t = ranks.recall(ks)
    report = RetrievalReport(t2i=t2i, i2t=i2t, images=len(kept), captions=len(captions), skipped=skipped)
    if slice_field is not None:
        values = [slice_value(r.metadata, slice_field) for r in kept]
        report.slice_field, report.slices = slice_field, slice_recall(ranks, values, ks)
    return report
