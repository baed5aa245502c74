"""recall@k: a hand-computed case, the catalog path through a real encoder, and the CLI contract."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.train.conftest import run_module
from vitrine.evaluate import evaluate_catalog, recall_at_k


def test_recall_matches_hand_computed_ranks() -> None:
    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.6, 0.8, 0.1], [0, 0, 1]], np.float32)
    owner = [0, 1, 2, 2]
    # caption ranks of their own image: c0 → 0, c1 → 1 (image 0 scores higher), c2 → 2, c3 → 0.
    # image ranks of their best own caption: i0 → 0; i1 → 1 (c2 outscores c1); i2 → 0 (c3).
    t2i, i2t = recall_at_k(images, texts, owner, ks=(1, 2, 3))
    assert t2i == {"R@1": 50.0, "R@2": 75.0, "R@3": 100.0}
    assert i2t == {"R@1": 66.67, "R@2": 100.0, "R@3": 100.0}


def test_recall_is_chunk_independent_and_validates() -> None:
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(20, 8)), rng.normal(size=(60, 8))
    owner = np.repeat(np.arange(20), 3)
    assert recall_at_k(images, texts, owner, chunk=7) == recall_at_k(images, texts, owner, chunk=1000)
    with pytest.raises(ValueError, match="does not exist"):
        recall_at_k(images, texts, owner + 1)


def test_catalog_recall_skips_bad_files(clip_encoder, pairs_dir) -> None:
    from vitrine.catalog.readers import open_catalog

    report = evaluate_catalog(clip_encoder, open_catalog(pairs_dir))
    assert (report.images, report.captions, len(report.skipped)) == (16, 32, 1)
    assert report.skipped[0][0].endswith("broken.jpg")
    for direction in (report.t2i, report.i2t):
        assert set(direction) == {"R@1", "R@5", "R@10"}
        assert direction["R@1"] <= direction["R@5"] <= direction["R@10"] <= 100.0


def test_evaluate_cli_json(clip_path, pairs_dir) -> None:
    cmd = [sys.executable, "-m", "train_contrastive", "evaluate", "--model", str(clip_path)]
    out = run_module([*cmd, "--data", str(pairs_dir), "--json", "--device", "cpu"])
    payload = json.loads(out)
    assert set(payload) >= {"t2i", "i2t", "images", "captions"}
    assert set(payload["t2i"]) == {"R@1", "R@5", "R@10"} and payload["images"] == 16
