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


def test_slice_recall_matches_hand_computed_ranks_with_wilson_intervals() -> None:
    from vitrine.evaluate import retrieval_ranks
    from vitrine.slices import MISSING, slice_recall, slice_value, wilson

    images = np.eye(3, dtype=np.float32)
    texts = np.array([[1, 0, 0], [0.8, 0.6, 0], [0.6, 0.8, 0.1], [0, 0, 1]], np.float32)
    ranks = retrieval_ranks(images, texts, [0, 1, 2, 2])  # t2i ranks 0, 1, 2, 0; i2t ranks 0, 1, 0
    values = [slice_value({"place": "beach"}, "place"), slice_value({"place": "city"}, "place")]
    values.append(slice_value({}, "place"))
    by_value = {s.value: s for s in slice_recall(ranks, values[:1] * 2 + values[2:], (1, 2))}
    assert set(by_value) == {"beach", MISSING}
    beach, missing = by_value["beach"], by_value[MISSING]
    # beach: images 0 and 1, captions c0 (rank 0) and c1 (rank 1); image ranks 0 and 1
    assert (beach.images, beach.captions) == (2, 2)
    assert beach.t2i == {"R@1": 50.0, "R@2": 100.0} and beach.i2t == {"R@1": 50.0, "R@2": 100.0}
    assert beach.t2i_ci["R@1"] == list(wilson(1, 2)) and beach.t2i_ci["R@2"] == list(wilson(2, 2))
    # the unlabelled image 2 with its captions c2 (rank 2) and c3 (rank 0)
    assert (missing.images, missing.captions, missing.t2i["R@1"], missing.i2t["R@1"]) == (1, 2, 50.0, 100.0)
    # Wilson 95 % intervals, known values: 5/10 -> [23.66, 76.34], 0/10 -> [0, 27.75]
    assert wilson(5, 10) == (23.66, 76.34) and wilson(0, 10) == (0.0, 27.75) and wilson(10, 10)[1] == 100.0
    assert slice_value({"year": 2020}, "year") == "2020" and slice_value({"k": None}, "k") == MISSING


def test_evaluate_cli_slices_by_a_manifest_column(clip_path, pairs_dir, tmp_path) -> None:
    import csv

    manifest = tmp_path / "sliced.csv"
    with (pairs_dir / "metadata.csv").open() as src, manifest.open("w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["image", "caption", "colour"])
        for row in csv.DictReader(src):
            colour = row["file_name"].split("_")[0] if "_" in row["file_name"] else ""
            writer.writerow([str(pairs_dir / row["file_name"]), row["caption"], colour])
    cmd = [
        sys.executable,
        "-m",
        "train_contrastive",
        "evaluate",
        "--model",
        str(clip_path),
        "--device",
        "cpu",
    ]
    payload = json.loads(run_module([*cmd, "--data", str(manifest), "--slice", "colour", "--json"]))
    slices = {s["value"]: s for s in payload["slices"]}
    assert payload["slice_field"] == "colour" and set(slices) == {"red", "green", "blue", "yellow"}
    assert all(s["images"] == 4 and s["captions"] == 8 for s in slices.values())  # broken.jpg skipped
    for s in slices.values():
        low, high = s["t2i_ci"]["R@1"]
        assert low <= s["t2i"]["R@1"] <= high and set(s["i2t"]) == {"R@1", "R@5", "R@10"}
    text = run_module([*cmd, "--data", str(manifest), "--slice", "colour"])
    assert "per colour:" in text and "'red' (4 images, 8 captions): t2i R@1=" in text
