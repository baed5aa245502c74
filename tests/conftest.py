"""Shared fixtures: tiny random checkpoints built offline and saved to disk, so every test loads models
through the same ``from_pretrained`` path users take; real photos from ``../shared`` when present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FLICKR = SHARED / "datasets" / "flickr8k"
DEIT = SHARED / "models" / "deit-tiny-patch16-224"


def require_shared(path: Path) -> Path:
    """Skip (with the reason) where ../shared is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is optional for tests)")
    return path


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def clip_path(models_dir: Path) -> Path:
    from vitrine.checkpoints import make_clip_checkpoint

    return make_clip_checkpoint(models_dir / "clip")


@pytest.fixture(scope="session")
def clip_path_other(models_dir: Path) -> Path:
    """Same architecture, different weights: a different embedding space."""
    from vitrine.checkpoints import make_clip_checkpoint

    return make_clip_checkpoint(models_dir / "clip-other", seed=1)


@pytest.fixture(scope="session")
def siglip_path(models_dir: Path) -> Path:
    from vitrine.checkpoints import make_siglip_checkpoint

    return make_siglip_checkpoint(models_dir / "siglip")


@pytest.fixture(scope="session")
def dual_path(models_dir: Path) -> Path:
    from vitrine.checkpoints import make_dual_checkpoint

    return make_dual_checkpoint(models_dir / "dual")


@pytest.fixture(scope="session")
def clip_encoder(clip_path: Path):
    from vitrine.encoder import Encoder

    return Encoder.from_pretrained(str(clip_path), device="cpu", batch_size=8, bf16=False)


def pattern_image(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """A distinct, structured picture per seed (stripes + blobs), so tiny random models separate them."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = rng.uniform(0, 255, 3)
    freq = rng.uniform(0.05, 0.5, 3)
    img = np.stack(
        [(base[c] + 100 * np.sin(freq[c] * (x + rng.uniform(0, 9) * y))) % 255 for c in range(3)], -1
    )
    return Image.fromarray(img.astype(np.uint8))


@pytest.fixture()
def photo_folder(tmp_path: Path) -> Path:
    """Twelve distinct JPEGs in two sub-folders."""
    root = tmp_path / "photos"
    for i in range(12):
        sub = root / ("red" if i % 2 else "blue")
        sub.mkdir(parents=True, exist_ok=True)
        pattern_image(i).save(sub / f"img_{i:02d}.jpg", quality=92)
    return root
