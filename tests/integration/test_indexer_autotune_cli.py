"""``indexer build --memory-budget --target-recall`` end to end: real processes, the tiny CLIP model, real
FAISS; the manifest records the measured choice and ``status`` shows it within the budget."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import pattern_image
from tests.integration.test_indexer_cli import as_json, indexer
from vitrine.index.autotune import bytes_per_vector

N = 400  # auto-tuning holds out 200 queries and needs >= 300 vectors


def test_build_with_memory_budget_records_the_choice_and_fits(clip_path: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(N):
        pattern_image(i, (40, 32)).save(folder / f"p{i:03d}.png")
    dim = 32  # the tiny CLIP's projection
    # room for 8-bit codes (SQ8), not for float vectors (Flat, HNSW): the budget must steer the choice
    budget = int(N * bytes_per_vector("IVF8,SQ8", dim) * 1.5)
    assert budget < N * bytes_per_vector("Flat", dim)
    index = tmp_path / "index"
    args = [
        "build",
        str(folder),
        "--index",
        str(index),
        "--model",
        str(clip_path),
        "--batch-size",
        "32",
        "--memory-budget",
        str(budget),
        "--target-recall",
        "0.9",
        "--no-progress",
        "--json",
    ]
    report = as_json(indexer(*args))
    assert report["added"] == N and report["failed"] == 0
    tuning = report["tuning"]
    assert tuning["met"], tuning["reason"]
    assert "SQ8" in tuning["factory"] or "PQ" in tuning["factory"], tuning
    chosen = next(c for c in tuning["candidates"] if c["factory"] == tuning["factory"])
    assert chosen["recall"] >= 0.9 and chosen["estimated_bytes"] <= budget
    assert {c["factory"] for c in tuning["candidates"]} >= {"Flat", "HNSW32"}  # measured, then too big

    generation = (index / "CURRENT").read_text().strip()
    manifest = json.loads((index / generation / "manifest.json").read_text())
    assert manifest["factory"] == tuning["factory"] and manifest["search_params"] == tuning["search_params"]
    assert manifest["autotune"]["factory"] == tuning["factory"] and manifest["autotune"]["met"]

    status = as_json(indexer("status", "--index", str(index), "--json"))
    assert status["effective_factory"] == tuning["factory"] and status["indexed"] == N
    assert 0 < status["bytes_per_vector"] * N <= budget, status
    hits = as_json(indexer("search", "--index", str(index), "--image", str(folder / "p123.png"), "--json"))
    assert hits["hits"][0]["path"] == str((folder / "p123.png").resolve())
