"""Fixtures for the fine-tuning tests: tiny real towers saved with save_pretrained, and a small image–caption
set a tiny model can learn (each caption names the colour and stripe direction of its picture)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 60, 220), "yellow": (230, 220, 40)}
DIRECTIONS = ("horizontal", "vertical")


def striped(colour: tuple[int, int, int], direction: str, seed: int, size: int = 32) -> Image.Image:
    rng = np.random.default_rng(seed)
    stripes = (np.arange(size) // 4 % 2).astype(np.float32)
    mask = stripes[:, None] if direction == "horizontal" else stripes[None, :]
    mask = np.broadcast_to(mask, (size, size))
    pixels = np.array(colour, np.float32)[None, None] * (0.55 + 0.45 * mask[..., None])
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_pairs(root: Path, copies: int = 2, bad: bool = False) -> Path:
    """A Hugging Face imagefolder (metadata.csv) of striped pictures with two captions each."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, (name, rgb) in enumerate(COLOURS.items()):
        for d, direction in enumerate(DIRECTIONS):
            for k in range(copies):
                file = f"{name}_{direction}_{k}.png"
                striped(rgb, direction, seed=100 * c + 10 * d + k).save(root / file)
                rows += [(file, f"{name} {direction}"), (file, f"a {name} picture with {direction} stripes")]
    if bad:
        (root / "broken.jpg").write_bytes(b"this is not a jpeg")
        rows.append(("broken.jpg", "a broken file"))
    with (root / "metadata.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file_name", "caption"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="session")
def towers_dir(models_dir: Path) -> tuple[Path, Path]:
    """(vision, text): a 2-block ViT without pooler weights and a 2-block sentence-transformers BERT."""
    from tests.checkpoints import make_tower_checkpoints

    return make_tower_checkpoints(models_dir / "train-towers")


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("pairs") / "pairs", bad=True)


def tower_flags(towers_dir: tuple[Path, Path]) -> list[str]:
    return [
        "--vision-model",
        str(towers_dir[0]),
        "--text-model",
        str(towers_dir[1]),
        "--projection-dim",
        "32",
    ]


# Fast settings for tiny models: no workers, no bars, larger learning rates than the real recipe.
FAST = ["--num-workers", "0", "--no-progress", "--lr", "1e-3", "--head-lr", "5e-3", "--eval-batch-size", "64"]


def run_module(args: list[str], env: dict[str, str] | None = None, timeout: int = 240) -> str:
    """Run a command with the repository importable; returns stdout, fails the test with stderr."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    proc = subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    return proc.stdout


def accelerate_launch(num_processes: int) -> list[str]:
    """``accelerate launch`` on CPU with gloo, as the issue's two-process test prescribes."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]
