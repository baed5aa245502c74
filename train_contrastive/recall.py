"""Recall of the model being trained on the evaluation catalog, via :mod:`vitrine.evaluate`.

With the cache, the frozen activations of the evaluation images and captions are replayed through the
current top blocks; without it, the model is wrapped in a :class:`vitrine.model.encoder.Encoder` -- exactly
the serving path. Either way the numbers come from :func:`vitrine.evaluate.recall_at_k`, the function
behind ``python -m train_contrastive evaluate``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from train_contrastive.data import Pairs
from train_contrastive.features import (
    FeatureCache,
    batched,
    replay_cached_images,
    replay_image_features,
    replay_text_features,
)
from vitrine.catalog.readers import Record
from vitrine.evaluate import evaluate_catalog, recall_at_k


@torch.inference_mode()
def cached_recall(
    model: nn.Module, cache: FeatureCache, starts: dict[str, int], device: torch.device, batch_size: int
) -> dict[str, Any]:
    """Recall from cached frozen activations (images that failed to decode are left out)."""
    model.eval()
    usable = cache.usable()
    images = replay_cached_images(replay_image_features, model, cache, usable, starts["vision"], batch_size)
    caption_ids, owner = [], []
    for position, i in enumerate(usable):
        for j in range(int(cache.caption_offsets[i]), int(cache.caption_offsets[i + 1])):
            caption_ids.append(j)
            owner.append(position)
    text_feats = []
    for chunk in batched(caption_ids, batch_size):
        states, mask = cache.texts.batch(chunk)
        feats = replay_text_features(model, states.to(device), mask.to(device), starts["text"])
        text_feats.append(feats.float().cpu())
    t2i, i2t = recall_at_k(images, torch.cat(text_feats), owner)
    return {"t2i": t2i, "i2t": i2t, "images": len(usable), "captions": len(caption_ids)}


def served_recall(
    model: nn.Module,
    image_processor: Any,
    tokenizer: Any,
    pairs: Pairs,
    device: torch.device,
    batch_size: int,
) -> dict[str, Any]:
    """Recall through the serving encoder (used when nothing is cached)."""
    from vitrine.model.encoder import Encoder

    encoder = Encoder(
        model,
        image_processor,
        tokenizer,
        model_id="(training)",
        device=str(device),
        batch_size=batch_size,
        fp16=False,
    )
    records = [Record(key=p, path=p, captions=c) for p, c in zip(pairs.paths, pairs.captions, strict=True)]
    return evaluate_catalog(encoder, records).to_dict()
