"""Drift detection end to end: a real tiny model, real images, the indexer's own commands.

A planted shift (colour cast, brightness, a new category) must be flagged, an unshifted batch must not,
and a model change must be reported from the fingerprint alone. Real photos from ../shared are used
where present, generated pictures otherwise.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.cli import main
from tests.conftest import FLICKR, pattern_image
from vitrine.drift import reference
from vitrine.drift.assess import DriftSettings, assess
from vitrine.drift.journal import Entry, Journal, QueryRecorder
from vitrine.index.store import IndexStore

KEYS = {"drifted", "p_value", "auc", "mean_shift", "slices", "reason"}


def run(capsys: pytest.CaptureFixture, *args: str) -> dict:
    capsys.readouterr()
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def build(capsys: pytest.CaptureFixture, catalog: Path, index: Path, model: Path) -> dict:
    return run(
        capsys,
        "build",
        str(catalog),
        "--index",
        str(index),
        "--model",
        str(model),
        "--batch-size",
        "16",
        "--no-progress",
        "--json",
    )


def cast(image: Image.Image, gains: tuple[float, float, float]) -> Image.Image:
    """A camera colour cast (per-channel gain); equal gains change brightness only."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) * np.array(gains, dtype=np.float32)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write(
    folder: Path, images: list[Image.Image], gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        cast(image, gains).save(folder / f"{i:04d}.jpg", quality=92)
    return folder


@pytest.fixture()
def pictures() -> list[Image.Image]:
    """Real photos from ../shared (resized, to keep the test quick) where present, else generated ones."""
    photos = sorted((FLICKR / "dev" / "images").glob("*.jpg"))[:240] if FLICKR.exists() else []
    if photos:
        return [Image.open(p).convert("RGB").resize((112, 84)) for p in photos]
    return [pattern_image(seed) for seed in range(240)]


@pytest.fixture()
def indexed(capsys, clip_path, pictures, tmp_path) -> Path:
    index = tmp_path / "index"
    report = build(capsys, write(tmp_path / "base", pictures[:160]), index, clip_path)
    assert report["count"] == 160
    return index


def test_first_build_stores_the_reference_sample(indexed):
    ref = reference.load(indexed)
    assert ref is not None and len(ref.sample) == 160 and ref.index_count == 160
    with IndexStore.open(indexed) as store:
        assert ref.generation == store.generation and ref.model == store.fingerprint["id"]
        _, stored = store.embeddings()
    assert np.allclose(np.sort(ref.sample.embeddings, axis=0), np.sort(stored, axis=0), atol=1e-6)
    assert ref.summary()["size"] == 160


def test_batches_from_the_same_distribution_are_not_flagged(capsys, indexed, pictures, tmp_path):
    same = write(tmp_path / "same", pictures[160:])
    report = run(capsys, "drift", "--index", str(indexed), "--sample", str(same), "--json")
    assert set(report) >= KEYS
    assert report["drifted"] is False, report["reason"]
    assert report["p_value"] >= 0.01 and report["source"] == "sample"
    assert report["reason"].startswith("no drift")


@pytest.mark.parametrize(
    ("name", "gains"), [("colour cast", (1.35, 1.0, 0.6)), ("brightness", (0.55, 0.55, 0.55))]
)
def test_a_colour_cast_or_brightness_change_is_flagged(capsys, indexed, pictures, tmp_path, name, gains):
    shifted = write(tmp_path / "shifted", pictures[160:], gains)
    report = run(capsys, "drift", "--index", str(indexed), "--sample", str(shifted), "--json")
    assert report["drifted"] is True, f"{name}: {report['reason']}"
    assert report["p_value"] < 0.01 and report["auc"] > 0.7 and report["mean_shift"] > 0
    assert report["reason"].startswith("drift detected")


def test_ingested_new_category_is_flagged_with_its_slice(capsys, indexed, pictures, tmp_path, clip_path):
    """New batches go through ingest sampling: more of the same is fine, a new category is flagged."""
    batch = tmp_path / "batch"
    write(batch / "old", pictures[160:200])
    flat = [Image.new("RGB", (112, 84), (int(c), 40, 200 - int(c))) for c in np.linspace(0, 200, 40)]
    write(batch / "new", flat)
    build(capsys, batch, indexed, clip_path)
    journal = Journal(indexed)
    with IndexStore.open(indexed) as store:
        assert journal.count("ingest", store.generation, store.fingerprint["id"]) == 80
    report = run(capsys, "drift", "--index", str(indexed), "--slice", "folder", "--json")
    assert report["drifted"] is True and report["source"] == "ingest", report["reason"]
    new = report["slices"]["new"]
    assert new["drifted"] and new["new"] and new["auc"] > 0.9
    assert report["slices"]["old"]["drifted"] is False
    assert "new folder values: new" in report["reason"]
    history = journal.reports()
    assert history[-1]["drifted"] is True and history[-1]["generation"] == report["generation"]


def test_a_model_change_is_reported_from_the_fingerprint(capsys, indexed, clip_path_other):
    report = run(capsys, "drift", "--index", str(indexed), "--model", str(clip_path_other), "--json")
    assert report["drifted"] is True and report["source"] == "fingerprint"
    assert report["p_value"] == 0.0 and report["auc"] == 1.0 and report["mean_shift"] is None
    assert "model changed" in report["reason"] and str(clip_path_other.resolve()) in report["reason"]


def test_no_live_samples_means_no_verdict(capsys, indexed):
    report = run(capsys, "drift", "--index", str(indexed), "--json")
    assert report["drifted"] is False and "not enough live samples" in report["reason"]


def test_query_stream_drift_against_the_generations_query_baseline(indexed, clip_encoder):
    """Queries are compared with the generation's first queries, never with images."""
    with IndexStore.open(indexed) as store:
        generation, model = store.generation, store.fingerprint["id"]
    journal = Journal(indexed, baseline_size=60)
    recorder = QueryRecorder(journal, per_flush=1000)

    def topics(parity: int) -> list[str]:
        return [f"a photo of a {w} number {i}" for i in range(parity, 60, 2) for w in ("dog", "cat")]

    for vec in clip_encoder.encode_texts(topics(0)):  # the first 60 queries form the baseline
        recorder.add(generation, model, Entry(vec, {"mode": "text"}, 0.5, "secret text"))
    for vec in clip_encoder.encode_texts(topics(1)):  # later ones: other numbers, same distribution
        recorder.add(generation, model, Entry(vec, {"mode": "text"}))
    recorder.flush()
    assert journal.count("query_baseline", generation, model) == 60
    assert journal.count("query", generation, model) == 60
    settings = DriftSettings(min_samples=30)
    calm = assess(indexed, journal=journal, settings=settings)
    assert calm.source == "queries" and not calm.drifted, calm.reason

    images = clip_encoder.encode_images([pattern_image(s) for s in range(500, 560)])
    for vec in images:
        recorder.add(generation, model, Entry(vec, {"mode": "image"}))
    recorder.flush()
    moved = assess(indexed, journal=journal, settings=settings)
    assert moved.drifted and moved.source == "queries" and moved.slice_field == "mode", moved.reason
    assert moved.slices["image"]["new"] is True
    with closing(sqlite3.connect(f"file:{journal.path}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM samples WHERE text IS NOT NULL").fetchone()[0]
    assert rows == 0, "query texts are not stored unless the recorder is told to"
