"""``python -m indexer import`` as scripts use it: a real process, a real tiny model, real files and index.
A refused import exits 1 with one error line naming the measured cosine and the threshold, and creates no
index; an accepted one prints its report and the index answers searches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.integration.test_indexer_cli import indexer


def write_output(folder: Path, photos: Path, vectors: np.ndarray) -> Path:
    files = sorted(photos.rglob("*.jpg"))
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    np.save(folder / "img_emb" / "img_emb_0.npy", vectors.astype(np.float16))
    rows = [{"image_path": str(p.relative_to(photos)), "caption": f"photo {i}"} for i, p in enumerate(files)]
    pq.write_table(pa.Table.from_pylist(rows), folder / "metadata" / "metadata_0.parquet")
    return folder


def test_import_refuses_foreign_vectors_then_accepts_the_models_own(
    clip_path, clip_encoder, photo_folder: Path, tmp_path: Path
) -> None:
    files = sorted(photo_folder.rglob("*.jpg"))
    index = tmp_path / "index"
    base = ["import", "--images-root", str(photo_folder), "--index", str(index), "--model", str(clip_path)]
    base += ["--sample", "6", "--no-progress", "--device", "cpu"]
    wrong = np.random.default_rng(0).standard_normal((len(files), clip_encoder.dim))
    out = indexer(*base, str(write_output(tmp_path / "wrong", photo_folder, wrong)), check=False)
    assert out.returncode == 1 and out.stdout == ""
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: import refused:") and "below the threshold 0.95" in line, out.stderr
    assert "median cosine " in line and not index.exists()
    good = write_output(tmp_path / "good", photo_folder, clip_encoder.encode_images(files))
    report = json.loads(indexer(*base, "--json", str(good)).stdout)
    assert report["added"] == len(files) == report["count"] and report["failed"] == 0
    assert report["verification"]["median_cosine"] > 0.99 and report["verification"]["sampled"] == 6
    hits = json.loads(indexer("search", "--index", str(index), "--image", str(files[2]), "--json").stdout)
    assert hits["hits"][0]["path"] == str(files[2].resolve())
