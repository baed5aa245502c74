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


# Test tiers. `make test` runs everything; `make test-fast` (pytest -m "not slow") is the edit loop. What is
# slow is decided here, from what a test drives, so that no test file needs a marker: a browser, a notebook
# kernel, a training run, a Ray cluster, a process killed with -9, a web server or the indexer started as
# subprocesses, or an exhaustive index-structure sweep.
SLOW_PATHS = (
    "tests/e2e/",  # headless Chromium
    "tests/train/",  # fine-tuning runs, some under accelerate launch
    "tests/integration/test_notebooks.py",
    "tests/integration/test_ray.py",
    "tests/integration/test_store_crash.py",  # kill -9 of a writer
    "tests/integration/test_indexer_cli.py",  # the indexer as a subprocess, end to end
    "tests/integration/test_indexer_autotune_cli.py",
    "tests/integration/test_search_cli.py",  # the indexer as a subprocess: typed metadata, filters, pages
    "tests/integration/test_runtimes_cli.py",  # indexer build --runtime onnx --precision int8, subprocesses
    "tests/app/test_refresh.py",  # starts its own server
)
SLOW_FIXTURES = {"live_server"}  # one real server subprocess for the API, README and drift-page tests
SLOW_TESTS = {  # one long scenario each, in files that are otherwise quick
    "test_kill_9_keeps_the_old_generation_serving_and_a_rerun_completes",
    "test_lost_current_is_refused_then_repaired_and_history_survives",  # five indexer subprocesses
    "test_a_model_change_is_reported_from_the_fingerprint",  # encodes the catalog with a second model
    "test_opq_refine_candidate_is_measured_and_can_be_chosen",  # trains and sweeps OPQ on 10k vectors
    "test_refine_structures_sweep_k_factor_with_nprobe",
}


def _is_slow(item: pytest.Item) -> bool:
    path = Path(str(item.path)).resolve().relative_to(REPO).as_posix()
    return (
        path.startswith(SLOW_PATHS)
        or bool(SLOW_FIXTURES & set(getattr(item, "fixturenames", ())))
        or getattr(item, "originalname", item.name) in SLOW_TESTS
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_slow(item):
            item.add_marker(pytest.mark.slow)


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
    from tests.checkpoints import make_clip_checkpoint

    return make_clip_checkpoint(models_dir / "clip")


@pytest.fixture(scope="session")
def clip_path_other(models_dir: Path) -> Path:
    """Same architecture, different weights: a different embedding space."""
    from tests.checkpoints import make_clip_checkpoint

    return make_clip_checkpoint(models_dir / "clip-other", seed=1)


@pytest.fixture(scope="session")
def siglip_path(models_dir: Path) -> Path:
    from tests.checkpoints import make_siglip_checkpoint

    return make_siglip_checkpoint(models_dir / "siglip")


@pytest.fixture(scope="session")
def dual_path(models_dir: Path) -> Path:
    from tests.checkpoints import make_dual_checkpoint

    return make_dual_checkpoint(models_dir / "dual")


@pytest.fixture(scope="session")
def clip_encoder(clip_path: Path):
    from vitrine.model.encoder import Encoder

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
