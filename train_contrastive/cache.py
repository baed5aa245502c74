"""Building, saving and reloading the frozen-layer cache of a catalog (see :mod:`.features`).

The cache is keyed by everything that changes its content -- the starting weights, the cut points,
the catalog file, the image processor, the token limit and the storage dtype -- and saved as one
``torch.save`` file under ``--cache-dir`` (default ``OUTPUT/cache``). A rerun or ``--resume`` with the
same key loads it instead of recomputing; any change gives a new key, so a stale cache is never used.

``float16`` storage halves memory and disk at a relative error of about 1e-3 on the activations (fp16's
precision), far below what training itself moves them.

During training only indices travel through the DataLoader (:class:`CachedPairs`); :class:`CachedCollator`
assembles a batch from the cache, with the caption of each image chosen for the current epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from train_contrastive.data import (
    ImageCaptionDataset,
    PairCollator,
    Pairs,
    item_rng,
    owner_rows,
    positive_captions,
)
from train_contrastive.features import (
    FeatureCache,
    TextStates,
    batched,
    frozen_image_states,
    frozen_text_states,
)
from vitrine.model import embedding


def cache_key(identity: dict[str, Any], pairs: Pairs, image_processor: Any) -> str:
    """A short hash of everything the cached activations depend on."""
    source = Path(pairs.source)
    stamp = [source.stat().st_size, source.stat().st_mtime_ns] if source.is_file() else []
    payload = {
        **identity,
        "data": str(source.resolve()) if pairs.source else "",
        "stamp": stamp,
        "n": len(pairs),
        "captions": pairs.n_captions,
        "processor": image_processor.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_cache(
    model: torch.nn.Module,
    pairs: Pairs,
    image_processor: Any,
    tokenizer: Any,
    starts: dict[str, int],
    *,
    batch_size: int,
    num_workers: int,
    limit: int,
    dtype: torch.dtype,
    device: torch.device,
    progress: Any = None,
    mirror: bool = False,
) -> FeatureCache:
    """Run the frozen layers over every image and caption of ``pairs`` once.

    Images that fail to decode get row -1 and their reason in ``failures``. ``progress(n)`` (e.g. a
    tqdm ``update``) is called with the number of images and captions done. ``mirror`` also caches
    every image flipped left to right (the processed pixels flipped: resizing and centre-cropping are
    symmetric, so that is the flipped picture's input).
    """
    model.eval()
    rows = torch.full((len(pairs),), -1, dtype=torch.long)
    image_chunks: list[torch.Tensor] = []
    mirror_chunks: list[torch.Tensor] = []
    failures: dict[str, str] = {}
    loader = DataLoader(
        ImageCaptionDataset(pairs, image_processor, caption=False),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=PairCollator(),
    )
    done = 0
    for batch in loader:
        for index, reason in batch["bad"].items():
            failures[pairs.paths[index]] = reason
        if len(batch["index"]):
            states = frozen_image_states(model, batch["pixel_values"].to(device), starts["vision"])
            image_chunks.append(states.to("cpu", dtype))
            if mirror:
                pixels = batch["pixel_values"].flip(-1).to(device)
                mirror_chunks.append(frozen_image_states(model, pixels, starts["vision"]).to("cpu", dtype))
            rows[batch["index"]] = torch.arange(done, done + len(batch["index"]))
            done += len(batch["index"])
        if progress:
            progress(len(batch["index"]) + len(batch["bad"]))
    images = torch.cat(image_chunks) if image_chunks else torch.zeros(0)
    mirrored = (torch.cat(mirror_chunks) if mirror_chunks else torch.zeros(0)) if mirror else None

    captions = [c for group in pairs.captions for c in group]
    offsets = torch.zeros(len(pairs) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(torch.tensor([len(c) for c in pairs.captions]), 0)
    # Sorting by length keeps padding (wasted compute) small; results are put back in caption order.
    order = sorted(range(len(captions)), key=lambda j: len(captions[j]))
    pieces: list[torch.Tensor | None] = [None] * len(captions)
    kind = "dual"
    for ids in batched(order, batch_size):
        tokens = embedding.tokenize(tokenizer, [captions[j] for j in ids], kind=kind, limit=limit)
        mask = tokens["attention_mask"]
        states = frozen_text_states(model, tokens["input_ids"].to(device), mask.to(device), starts["text"])
        states = states.to("cpu", dtype)
        for row, j in enumerate(ids):
            pieces[j] = states[row, : int(mask[row].sum())].clone()
        if progress:
            progress(len(ids))
    lengths = torch.tensor([p.shape[0] for p in pieces if p is not None] or [0])
    text_offsets = torch.zeros(len(captions) + 1, dtype=torch.long)
    text_offsets[1:] = torch.cumsum(lengths, 0)[: len(captions)]
    flat = torch.cat([p for p in pieces if p is not None]) if captions else torch.zeros(0)
    return FeatureCache(images, rows, TextStates(flat, text_offsets), offsets, failures, mirrored=mirrored)


def load_or_build(path: Path, build: Any) -> FeatureCache:
    """Load the cache saved at ``path``, or call ``build()`` and save its result there atomically."""
    if path.is_file():
        return FeatureCache.from_state(torch.load(path, weights_only=True))
    cache = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(cache.to_state(), tmp)
    os.replace(tmp, path)
    return cache


class CachedPairs(Dataset):
    """Training items from the frozen-layer cache: only indices travel through the DataLoader."""

    def __len__(self) -> int:  # pragma: no cover - the sampler defines the items
        return 0

    def __getitem__(self, item: int) -> int:
        return item


@dataclass
class CachedCollator:
    """Gathers cached image activations and the epoch's caption activations for a batch (one sampled
    caption per image, or all of them with ``positives="all"``; ``owner`` links captions to images)."""

    cache: FeatureCache
    pairs: Pairs
    seed: int
    epoch: int = 0
    positives: str = "one"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, items: list[int]) -> dict[str, Any]:
        index = torch.tensor(items, dtype=torch.long)
        chosen = [
            positive_captions(self.positives, self.seed, self.epoch, i, len(self.pairs.captions[i]))
            for i in items
        ]
        caption_ids = [
            int(self.cache.caption_offsets[i]) + c for i, cs in zip(items, chosen, strict=True) for c in cs
        ]
        text_states, text_mask = self.cache.texts.batch(caption_ids)
        image_states = self.cache.images[self.cache.image_row[index]].float()
        if self.cache.mirrored is not None:  # --mirror: each image or its mirror, a coin per (epoch, item)
            flip = torch.tensor([item_rng(self.seed + 2, self.epoch, i).random() < 0.5 for i in items])
            mirrored = self.cache.mirrored[self.cache.image_row[index[flip]]].float()
            image_states[flip] = mirrored
        return {
            "index": index,
            "image_states": image_states,
            "text_states": text_states,
            "text_mask": text_mask,
            "owner": owner_rows([len(cs) for cs in chosen]),
        }
