"""Image–caption pairs: reading a catalog, sampling a caption per image per epoch, decoding in workers.

Every random choice of the data pipeline is a pure function of ``(seed, epoch, item)`` -- the shuffle
order, which caption an image gets, the augmentation crop -- never of a global RNG. That is what makes
``--resume`` continue exactly where it stopped (skipping the batches already seen in the epoch gives
the very same remaining batches), and makes N processes see the same global batches as one process
with an N-times larger batch.

Images are decoded and preprocessed in DataLoader worker processes (``--num-workers``) with the
checkpoint's own image processor (the one serving uses). A file that fails to decode yields a
``bad`` marker instead of a tensor; the collator drops it and reports its index, so the loop counts
bad files once and never stops on them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vitrine.catalog.readers import open_catalog, read_source
from vitrine.errors import CatalogError, ImageDecodeError
from vitrine.images import decode_image
from vitrine.model import embedding


@dataclass
class Pairs:
    """Captioned images of a catalog: ``paths[i]`` with its captions ``captions[i]`` (one or more)."""

    paths: list[str]
    captions: list[tuple[str, ...]]
    source: str = ""

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def n_captions(self) -> int:
        return sum(len(c) for c in self.captions)


def load_pairs(path: str, image_column: str | None = None, caption_column: str | None = None) -> Pairs:
    """The captioned records of a catalog. Raises :class:`CatalogError` when none has a caption."""
    catalog = open_catalog(path, image_column=image_column, caption_column=caption_column)
    records = [r for r in catalog if r.captions]
    if not records:
        raise CatalogError(f"{path}: no image has a caption; contrastive training needs image–caption pairs")
    return Pairs([r.path for r in records], [tuple(r.captions) for r in records], source=str(path))


def item_rng(seed: int, epoch: int, item: int) -> np.random.Generator:
    """A generator that depends on nothing but ``(seed, epoch, item)``."""
    return np.random.default_rng([seed, epoch, item])


def caption_choice(seed: int, epoch: int, item: int, count: int) -> int:
    """Which of an image's ``count`` captions it is paired with in ``epoch``."""
    return 0 if count == 1 else int(item_rng(seed, epoch, item).integers(count))


def positive_captions(positives: str, seed: int, epoch: int, item: int, count: int) -> list[int]:
    """Which of an image's ``count`` captions are its positives in ``epoch``: one sampled (``one``), or
    every one of them (``all``: a multi-positive target, see :mod:`.loss`)."""
    if positives == "all":
        return list(range(count))
    return [caption_choice(seed, epoch, item, count)]


def owner_rows(counts: Sequence[int]) -> torch.Tensor:
    """Caption → image row links of a batch whose image r has ``counts[r]`` captions."""
    return torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(list(counts), dtype=torch.long))


class EpochSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``; call :meth:`set_epoch` before each epoch."""

    def __init__(self, indices: Sequence[int], seed: int) -> None:
        self.indices = list(indices)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.indices), generator=generator).tolist()
        return iter([self.indices[i] for i in order])


def augment_image(image: Any, rng: np.random.Generator) -> Any:
    """Random resized crop (60–100 % of the area, aspect 3/4–4/3) and a horizontal flip half the time."""
    from PIL import Image

    w, h = image.size
    area = w * h * rng.uniform(0.6, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, round(math.sqrt(area * aspect))), min(h, round(math.sqrt(area / aspect)))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    image = image.crop((x, y, x + cw, y + ch))
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


class ImageCaptionDataset(Dataset):
    """Decodes and preprocesses one image (in a worker) and picks its caption for the current epoch.

    ``caption=False`` returns images only (used when caching); ``augment`` applies
    :func:`augment_image` with a generator seeded by ``(seed, epoch, item)``; ``positives`` is
    ``one`` or ``all`` (:func:`positive_captions`).
    """

    def __init__(
        self,
        pairs: Pairs,
        image_processor: Any,
        *,
        seed: int = 0,
        augment: bool = False,
        caption: bool = True,
        positives: str = "one",
    ) -> None:
        self.pairs = pairs
        self.positives = positives
        self.image_processor = image_processor
        self.seed = seed
        self.augment = augment
        self.caption = caption
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int) -> dict[str, Any]:
        out: dict[str, Any] = {"index": item}
        if self.caption:
            captions = self.pairs.captions[item]
            chosen = positive_captions(self.positives, self.seed, self.epoch, item, len(captions))
            out["captions"] = [captions[c] for c in chosen]
        try:
            image = decode_image(read_source(self.pairs.paths[item]))
            if self.augment:
                image = augment_image(image, item_rng(self.seed + 1, self.epoch, item))
            pixels = self.image_processor(images=[image], return_tensors="np")["pixel_values"][0]
            out["pixel_values"] = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        except ImageDecodeError as exc:
            out["bad"] = exc.reason
        except Exception as exc:  # a processor failure is one bad item too, never a dead epoch
            out["bad"] = f"preprocessing failed: {exc}"
        return out


@dataclass
class PairCollator:
    """Stacks the decodable items of a batch and tokenises their captions (``owner`` links each caption
    to its image row); lists the bad ones."""

    tokenizer: Any = None
    kind: str = "dual"
    limit: int = 64  # vitrine.model.embedding.text_limit(model, tokenizer, --max-length)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        good = [it for it in items if "pixel_values" in it]
        batch: dict[str, Any] = {
            "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
            "bad": {it["index"]: it["bad"] for it in items if "bad" in it},
        }
        if good:
            batch["pixel_values"] = torch.stack([it["pixel_values"] for it in good])
        else:
            batch["pixel_values"] = torch.zeros(0)
        if self.tokenizer is not None and good:
            captions = [c for it in good for c in it["captions"]]
            tokens = embedding.tokenize(self.tokenizer, captions, kind=self.kind, limit=self.limit)
            batch["owner"] = owner_rows([len(it["captions"]) for it in good])
            batch["input_ids"] = tokens["input_ids"]
            batch["attention_mask"] = tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))
        return batch
