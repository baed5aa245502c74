"""``--queue-size``: a memory bank of earlier steps' embeddings used as extra negatives.

A batch of 64 gives each query 63 negatives; on two CPU cores a larger batch costs proportionally more
per step. Keeping the (detached, L2-normalised) image and caption embeddings of the last N pairs and
ranking every query against them as well widens the set of negatives at the cost of one matrix product,
as MoCo's queue does (without its momentum encoder: the queued embeddings come from the model a few
steps ago, a staleness that a short queue keeps small).

Every process sees the same global batch (:mod:`.loss` gathers it), so every process's queue holds the
same entries. Each entry keeps the catalog index of the image it shows; the loss masks entries of a
query's own image, so a positive is never used as a negative. The queue is registered with
``accelerator.save_state``, so ``--resume`` continues with the same negatives.
"""

from __future__ import annotations

from typing import Any

import torch

from train_contrastive.loss import GlobalBatch, Negatives


class NegativeQueue:
    """The newest ``size`` image embeddings and ``size`` caption embeddings (0 = no queue)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images = torch.zeros(0)
        self.image_ids = torch.zeros(0, dtype=torch.long)
        self.texts = torch.zeros(0)
        self.text_ids = torch.zeros(0, dtype=torch.long)

    def negatives(self) -> Negatives | None:
        """What the next loss ranks queries against besides the batch (None when empty or off)."""
        if self.size <= 0 or len(self.images) == 0:
            return None
        return Negatives(self.images, self.image_ids, self.texts, self.text_ids)

    def push(self, batch: GlobalBatch) -> None:
        """Add a step's global batch, dropping the oldest entries beyond ``size``."""
        if self.size <= 0:
            return
        self.images = self._newest(batch.images.detach(), self.images)
        self.image_ids = self._newest(batch.ids, self.image_ids)
        self.texts = self._newest(batch.texts.detach(), self.texts)
        self.text_ids = self._newest(batch.ids[batch.owner], self.text_ids)

    def _newest(self, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        return new[: self.size] if old.numel() == 0 else torch.cat([new, old.to(new)])[: self.size]

    def state_dict(self) -> dict[str, Any]:
        return {
            "images": self.images.cpu(),
            "image_ids": self.image_ids.cpu(),
            "texts": self.texts.cpu(),
            "text_ids": self.text_ids.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
