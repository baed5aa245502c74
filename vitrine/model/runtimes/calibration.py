"""Images for int8: drawn at random from the catalog being indexed (or another one given), split into
images to calibrate on and held-out images (with their captions) that the gate validates on.

Decoded and preprocessed by the encoder's own ``load_image`` / ``preprocess``, so the quantizer sees
exactly the pixels the index will see. Unreadable images are skipped, as a build skips them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from vitrine.errors import ImageDecodeError

CALIBRATION_IMAGES = 64
# Enough captions for R@10 to resolve half a point; without captions only the per-image cosine is checked,
# for which fewer images do (each costs an fp32 forward at start-up).
HELD_OUT_IMAGES = 256
HELD_OUT_UNCAPTIONED = 64


@dataclass
class Calibration:
    """Preprocessed pixels to calibrate on, and held-out pixels (with their captions) to validate on."""

    pixels: np.ndarray
    holdout: np.ndarray
    captions: list[tuple[str, ...]] = field(default_factory=list)


@dataclass
class Sample:
    """Catalog records drawn for calibration, not yet decoded (the encoder decodes them its own way).

    ``sources[i]`` is anything :func:`read` accepts (a record path) and ``captions[i]`` its captions."""

    sources: list[str]
    captions: list[tuple[str, ...]]
    calibrate: int

    def prepare(
        self,
        load: Callable[[Any], Any],
        preprocess: Callable[[list], torch.Tensor],
        read: Callable[[str], Any],
    ) -> Calibration:
        pixels, captions = [], []
        for source, caps in zip(self.sources, self.captions, strict=True):
            try:
                pixels.append(preprocess([load(read(source))])[0].numpy())
            except (ImageDecodeError, OSError, ValueError):
                continue
            captions.append(caps)
        # A small catalog (fewer than twice the calibration size) calibrates on a third of its images.
        split = self.calibrate if len(pixels) >= 2 * self.calibrate else max(1, len(pixels) // 3)
        stacked = np.stack(pixels) if pixels else np.zeros((0, 3, 1, 1), np.float32)
        return Calibration(stacked[:split], stacked[split:], captions[split:])


def draw(
    records: Sequence[Any],
    calibrate: int = CALIBRATION_IMAGES,
    held_out: int = HELD_OUT_IMAGES,
    seed: int = 0,
) -> Sample:
    """A seeded random sample of catalog ``records`` (``path`` and ``captions`` attributes): the first
    ``calibrate`` calibrate, the rest are held out (a third calibrates when the catalog is small); at
    most :data:`HELD_OUT_UNCAPTIONED` are held out when none of the drawn records has a caption."""
    picked = random.Random(seed).sample(list(records), min(len(records), calibrate + held_out))
    if not any(r.captions for r in picked):
        picked = picked[: calibrate + min(held_out, HELD_OUT_UNCAPTIONED)]
    return Sample([r.path for r in picked], [tuple(r.captions) for r in picked], calibrate)
