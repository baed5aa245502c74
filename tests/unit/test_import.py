"""``indexer import`` (vitrine/build/imports.py) with a real tiny CLIP, real files, real SQLite + FAISS:
clip-retrieval output and Vitrine shards are imported when their vectors are the declared model's, refused
(naming the measured cosine and the threshold) when another preprocessing made them, and hostile paths
are refused item by item."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vitrine.build.imports import Importer, ImportSettings
from vitrine.build.reindex import Reindexer
from vitrine.build.shards import write_shard
from vitrine.errors import ImportRefused
from vitrine.index.store import IndexStore
from vitrine.model import embedding
from vitrine.open_index import open_for_build


def clip_retrieval_output(folder: Path, rows: list[dict], vectors: np.ndarray, parts: int = 2) -> Path:
    """img_emb/img_emb_N.npy + metadata/metadata_N.parquet, as clip-retrieval writes them."""
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for n, chunk in enumerate(np.array_split(np.arange(len(rows)), parts)):
        np.save(folder / "img_emb" / f"img_emb_{n}.npy", vectors[chunk].astype(np.float16))
        pq.write_table(
            pa.Table.from_pylist([rows[i] for i in chunk]), folder / "metadata" / f"metadata_{n}.parquet"
        )
    return folder


def photos(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.jpg"))


def rows_for(files: list[Path], root: Path) -> list[dict]:
    return [
        {"image_path": str(p.relative_to(root)), "caption": f"photo {i}", "width": 96, "url": f"http://x/{i}"}
        for i, p in enumerate(files)
    ]


def settings(root: Path, **kw: object) -> ImportSettings:
    return ImportSettings(images_root=str(root), **{"sample": 8, **kw})


def test_an_import_of_the_models_own_embeddings_passes_and_reruns_skip(
    clip_encoder, photo_folder: Path, tmp_path: Path
) -> None:
    files = photos(photo_folder)
    out = clip_retrieval_output(
        tmp_path / "emb", rows_for(files, photo_folder), clip_encoder.encode_images(files)
    )
    with open_for_build(tmp_path / "index", clip_encoder) as store:
        report = Importer(clip_encoder, settings(photo_folder)).run(store, out)
        assert report.format == "clip-retrieval" and report.added == len(files) == report.count == len(store)
        assert report.failed == 0 and report.verification["sampled"] == 8
        assert report.verification["median_cosine"] > 0.999 and report.verification["threshold"] == 0.95
        item = store.get(str(files[3].resolve()))
        assert item["sha256"] == hashlib.sha256(files[3].read_bytes()).hexdigest()
        assert item["captions"] == ["photo 3"] and item["metadata"] == {"url": "http://x/3", "width": 96}
        assert item["size"] == files[3].stat().st_size
        ((source, spec),) = store.catalogs().items()  # the import is a catalog: a JSONL manifest in the index
        assert item["source"] == source == spec["path"] and source.startswith(
            str((tmp_path / "index").resolve())
        )
        hit = store.search(clip_encoder.encode_images([files[5]]), k=1)[0][0]
        assert hit.key == str(files[5].resolve()) and hit.score > 0.99
        again = Importer(clip_encoder, settings(photo_folder)).run(store, out)
        assert again.unchanged == len(files) and again.added == again.updated == 0


def test_a_reindex_keeps_imported_items(clip_encoder, photo_folder: Path, tmp_path: Path) -> None:
    """The import records a catalog (a manifest of what it wrote), so a reindex rebuilds those items
    instead of leaving them out; with the same model their vectors are copied, never re-encoded."""
    files = photos(photo_folder)
    out = clip_retrieval_output(
        tmp_path / "emb", rows_for(files, photo_folder), clip_encoder.encode_images(files)
    )
    with open_for_build(tmp_path / "index", clip_encoder) as store:
        Importer(clip_encoder, settings(photo_folder)).run(store, out)
        before = store.embeddings()
    report = Reindexer(tmp_path / "index", clip_encoder).run()
    assert (
        report.status == "published" and report.build["count"] == len(files) == report.build["donor_reused"]
    )
    with IndexStore.open(tmp_path / "index") as live:
        assert live.generation == "gen-000002" and live.embeddings()[0] == before[0]
        assert np.array_equal(live.embeddings()[1], before[1])
        assert live.get(str(files[4].resolve()))["metadata"] == {"url": "http://x/4", "width": 96}


@pytest.mark.parametrize("mistake", ["no mean/std normalisation", "raw 0-255 pixels", "another model"])
def test_an_import_made_by_another_preprocessing_is_refused(
    clip_encoder, clip_path_other: Path, photo_folder: Path, tmp_path: Path, mistake: str
) -> None:
    files = photos(photo_folder)
    images = [clip_encoder.load_image(str(p)) for p in files]
    pixels = clip_encoder.preprocess(images)
    proc = clip_encoder.image_processor
    unnormalised = pixels * torch.tensor(proc.image_std).view(1, 3, 1, 1) + torch.tensor(
        proc.image_mean
    ).view(1, 3, 1, 1)
    if mistake == "another model":
        from vitrine.model.encoder import Encoder

        vectors = Encoder.from_pretrained(str(clip_path_other), device="cpu", bf16=False).encode_images(
            images
        )
    elif mistake == "raw 0-255 pixels":
        with torch.inference_mode():
            vectors = embedding.image_features(clip_encoder.model, unnormalised * 255).numpy()
    else:
        vectors = clip_encoder.encode_pixels(unnormalised)
    out = clip_retrieval_output(tmp_path / "emb", rows_for(files, photo_folder), vectors)
    with open_for_build(tmp_path / "index", clip_encoder) as store:
        with pytest.raises(
            ImportRefused, match=r"median cosine 0\.\d{4} .*is below the threshold 0\.95"
        ) as caught:
            Importer(clip_encoder, settings(photo_folder)).run(store, out)
        assert caught.value.cosine < 0.95 and caught.value.threshold == 0.95
        assert len(store) == 0 and store.failures() == []  # nothing written


def test_hostile_paths_are_refused_item_by_item(clip_encoder, photo_folder: Path, tmp_path: Path) -> None:
    files = photos(photo_folder)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(files[0].read_bytes())
    (photo_folder / "link.jpg").symlink_to(outside)
    os.mkfifo(photo_folder / "fifo.jpg")
    (photo_folder / "folder.jpg").mkdir()
    escape = f"resolves outside --images-root {photo_folder.resolve()}"
    hostile = {
        "../secret.jpg": escape,
        str(outside): escape,
        "link.jpg": escape,
        "fifo.jpg": "not a regular file (a FIFO)",
        "folder.jpg": "not a regular file (a directory)",
        "missing.jpg": "file not found",
        "": "no usable image path in the metadata",
    }
    rows = rows_for(files, photo_folder) + [
        {"image_path": v, "caption": "x", "width": 1, "url": ""} for v in hostile
    ]
    good = clip_encoder.encode_images(files)
    vectors = np.concatenate([good, np.repeat(good[:1], len(hostile), axis=0)])
    out = clip_retrieval_output(tmp_path / "emb", rows, vectors, parts=1)
    with open_for_build(tmp_path / "index", clip_encoder) as store:
        report = Importer(clip_encoder, settings(photo_folder, sample=40)).run(store, out)
        assert report.added == len(files) == len(store) and report.failed == len(hostile)
        reasons = {f["path"]: f["reason"] for f in report.failures}
        assert reasons == hostile
        assert {f["path"] for f in store.failures()} == set(hostile)
        inside = str(photo_folder.resolve()) + "/"
        assert all(key.startswith(inside) for key in sorted(store.keys()))


def test_vitrine_shards_import_and_a_wrong_dimension_is_refused(
    clip_encoder, photo_folder: Path, tmp_path: Path
) -> None:
    files = photos(photo_folder)
    vectors = clip_encoder.encode_images(files)
    rows = [
        {
            "key": str(p),
            "path": str(p),
            "sha256": "not trusted",
            "size": 0,
            "mtime_ns": 0,
            "captions": '["a photo"]',
            "metadata": '{"n": 1}',
            "reason": None,
            "embedding": v.tolist(),
        }
        for p, v in zip(files, vectors, strict=True)
    ]
    rows[0] = {**rows[0], "reason": "truncated or corrupt image data", "embedding": None}
    write_shard(tmp_path / "shards", "shard-000000-abc", rows)
    with open_for_build(tmp_path / "index", clip_encoder) as store:
        report = Importer(clip_encoder, settings(photo_folder)).run(store, tmp_path / "shards")
        assert report.format == "vitrine-shards" and report.added == len(files) - 1
        assert report.failures == [{"path": str(files[0]), "reason": "truncated or corrupt image data"}]
        assert store.get(str(files[1]))["sha256"] == hashlib.sha256(files[1].read_bytes()).hexdigest()
        wrong = clip_retrieval_output(
            tmp_path / "wrong", rows_for(files, photo_folder), np.ones((len(files), 3))
        )
        with pytest.raises(ImportRefused, match=r"img_emb_0.npy holds vectors of shape \(6, 3\); .* dim 32"):
            Importer(clip_encoder, settings(photo_folder)).run(store, wrong)
        with pytest.raises(ImportRefused, match="neither clip-retrieval output"):
            Importer(clip_encoder, settings(photo_folder)).run(store, photo_folder)
