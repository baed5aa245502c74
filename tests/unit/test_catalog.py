"""Catalogs on real files: folders, manifests in every format, HF image folders and saved datasets."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.hostile import jpeg_bytes, make_hostile_folder, pattern
from vitrine.catalog.readers import Catalog, Record, open_catalog, read_source
from vitrine.errors import CatalogError, ImageDecodeError
from vitrine.images import decode_image

FLICKR_DEV = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "flickr8k" / "dev" / "captions.csv"
CAPTIONS = [f"caption {i} of the photo" for i in range(5)]


def _jpeg(path: Path, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(Image.fromarray(pattern(32, 24, seed=seed))))
    return path


def _check_common(catalog: Catalog) -> list[Record]:
    """Invariants every catalog keeps: sorted unique keys, JSON-able metadata and spec, reopenable."""
    records = list(catalog)
    assert len(records) == len(catalog)
    keys = [r.key for r in records]
    assert len(set(keys)) == len(keys)
    json.dumps([r.metadata for r in records], allow_nan=False)
    json.dumps(catalog.spec)
    reopened = open_catalog(**catalog.spec)
    assert [r.key for r in reopened] == keys and reopened.kind == catalog.kind
    return records


@pytest.fixture
def captioned(tmp_path: Path) -> Path:
    """A Flickr-style layout: manifest rows refer to files that live in ``images/``."""
    for i, name in enumerate(["0001.jpg", "b.jpg"]):
        _jpeg(tmp_path / "images" / name, seed=i)
    return tmp_path


def _manifest_rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for name, year in (("0001.jpg", 2019), ("b.jpg", 2021)):
        rows += [{"image": name, "caption": c, "year": year, "license": "cc-by"} for c in CAPTIONS]
    rows.append({"image": "missing.jpg", "caption": "gone", "year": 2020, "license": None})
    return rows


def _check_captioned(catalog: Catalog, root: Path) -> None:
    records = {Path(r.key).name: r for r in _check_common(catalog)}
    assert set(records) == {"0001.jpg", "b.jpg", "missing.jpg"}  # zero-padded name kept as text
    first = records["0001.jpg"]
    assert first.key == first.path == (root / "images" / "0001.jpg").resolve().as_posix()
    assert first.captions == tuple(CAPTIONS)
    assert first.metadata == {"year": 2019, "license": "cc-by"}
    assert records["missing.jpg"].metadata == {"year": 2020, "license": None}
    assert catalog.kind == "manifest" and catalog.spec["image_column"] == "image"
    assert decode_image(read_source(first.path)).size == (32, 24)
    with pytest.raises(ImageDecodeError, match="file not found"):
        read_source(records["missing.jpg"].path)


def test_folder_walk(tmp_path: Path) -> None:
    for rel in ["a.jpg", "sub/B.JPG", "sub/deeper/c.png", ".hidden/x.jpg", "sub/.dot.jpg"]:
        _jpeg(tmp_path / rel, seed=len(rel))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub" / "loop").symlink_to(tmp_path, target_is_directory=True)  # a link back up: a loop
    catalog = open_catalog(tmp_path)
    records = _check_common(catalog)
    assert catalog.kind == "folder" and catalog.root == tmp_path.resolve()
    assert [r.metadata for r in records] == [
        {"folder": "", "filename": "a.jpg"},
        {"folder": "sub", "filename": "B.JPG"},
        {"folder": "sub/deeper", "filename": "c.png"},
    ]
    assert all(r.captions == () and r.key == r.path and os.path.isabs(r.key) for r in records)
    assert [r.key for r in records] == sorted(r.key for r in records)


def test_folder_attempts_every_hostile_file(tmp_path: Path) -> None:
    expected = make_hostile_folder(tmp_path)
    names = {Path(r.key).name for r in open_catalog(tmp_path)}
    assert names == set(expected)  # .svg and .heic included, so their failures get reported


def test_bad_paths_are_catalog_errors(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="not found"):
        open_catalog(tmp_path / "nowhere")
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(CatalogError, match="unsupported catalog file"):
        open_catalog(tmp_path / "list.txt")
    with pytest.raises(CatalogError, match="plain folder"):
        open_catalog(tmp_path, image_column="image")


def test_csv_manifest_collapses_captions_and_resolves_images_subfolder(captioned: Path) -> None:
    rows = _manifest_rows()
    with open(captioned / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    catalog = open_catalog(captioned / "captions.csv")
    _check_captioned(catalog, captioned)
    assert catalog.root == captioned.resolve()


def test_tsv_jsonl_json_and_parquet_manifests(captioned: Path) -> None:
    import pandas as pd

    rows = _manifest_rows()
    frame = pd.DataFrame(rows)
    frame.to_csv(captioned / "m.tsv", sep="\t", index=False)
    (captioned / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    (captioned / "m.json").write_text(json.dumps(rows), encoding="utf-8")
    frame.to_parquet(captioned / "m.parquet")
    for name in ("m.tsv", "m.jsonl", "m.json", "m.parquet"):
        _check_captioned(open_catalog(captioned / name), captioned)


def test_caption_lists_and_absolute_paths(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    elsewhere = _jpeg(tmp_path / "elsewhere" / "abs.jpg", seed=3)
    table = pa.table({"file_name": [str(elsewhere)], "captions": [["one", "two", "one"]], "n": [np.int64(4)]})
    (tmp_path / "list").mkdir()
    pq.write_table(table, tmp_path / "list" / "m.parquet")
    (record,) = _check_common(open_catalog(tmp_path / "list" / "m.parquet"))
    assert record.key == elsewhere.resolve().as_posix()
    assert record.captions == ("one", "two") and record.metadata == {"n": 4}


def test_explicit_columns_and_missing_column_errors(tmp_path: Path) -> None:
    _jpeg(tmp_path / "x.jpg", seed=1)
    (tmp_path / "m.csv").write_text("img,desc,title\nx.jpg,a red thing,ignored\n", encoding="utf-8")
    with pytest.raises(CatalogError, match=r"no image column.*available columns: img, desc, title"):
        open_catalog(tmp_path / "m.csv")
    auto = list(open_catalog(tmp_path / "m.csv", image_column="img"))
    assert auto[0].captions == ("ignored",)  # "title" is a caption candidate
    catalog = open_catalog(tmp_path / "m.csv", image_column="img", caption_column="desc")
    (record,) = _check_common(catalog)
    assert record.captions == ("a red thing",) and record.metadata == {"title": "ignored"}
    assert catalog.spec["caption_column"] == "desc"
    for kwargs in ({"image_column": "picture"}, {"image_column": "img", "caption_column": "alt"}):
        with pytest.raises(CatalogError, match=r"not found in .*available columns: img, desc, title"):
            open_catalog(tmp_path / "m.csv", **kwargs)


def test_imagefolder_with_metadata_jsonl(tmp_path: Path) -> None:
    for i, name in enumerate(["a.jpg", "sub/b.jpg", "unlisted.jpg"]):
        _jpeg(tmp_path / name, seed=i)
    lines = [{"file_name": "a.jpg", "text": "an a", "label": 1}, {"file_name": "sub/b.jpg", "text": "a b"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines), encoding="utf-8")
    catalog = open_catalog(tmp_path)
    records = _check_common(catalog)
    assert catalog.kind == "imagefolder" and catalog.spec["path"] == tmp_path.resolve().as_posix()
    assert [Path(r.key).name for r in records] == ["a.jpg", "b.jpg"]
    assert records[0].captions == ("an a",) and records[0].metadata == {"label": 1}
    assert records[1].metadata == {"label": None}


def _png_bytes(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), colour).save(buf, "PNG")
    return buf.getvalue()


def test_saved_dataset_read_back_through_read_source(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    on_disk = _jpeg(tmp_path / "by_path.jpg", seed=9)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "thumb": datasets.Image(),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["red", "green", "blue"]),
            "score": datasets.Value("float64"),
        }
    )
    data = {
        "image": [{"bytes": _png_bytes(c), "path": None} for c in colours],
        "thumb": [{"bytes": None, "path": str(on_disk)}] * 3,
        "text": ["a red square", "a green square", None],
        "label": [0, 1, 2],
        "score": [0.5, float("nan"), 1.0],
    }
    dataset = datasets.Dataset.from_dict(data, features=features)
    dataset.save_to_disk(str(tmp_path / "ds"))
    catalog = open_catalog(tmp_path / "ds")
    records = _check_common(catalog)
    root = (tmp_path / "ds").resolve().as_posix()
    assert catalog.kind == "dataset" and len(catalog) == 3 and catalog.root == Path(root)
    assert [r.key for r in records] == [f"{root}#{i}" for i in range(3)]
    assert records[0].captions == ("a red square",) and records[2].captions == ()
    assert records[1].metadata == {"label": "green", "score": None}
    for record, colour in zip(records, colours, strict=True):
        assert decode_image(read_source(record.path)).getpixel((0, 0)) == colour
    thumbs = list(open_catalog(tmp_path / "ds", image_column="thumb"))
    assert thumbs[0].key == records[0].key and thumbs[0].path == f"{root}#0#thumb"
    assert read_source(thumbs[0].path) == on_disk.read_bytes()
    with pytest.raises(ImageDecodeError, match="row 7 not in dataset"):
        read_source(f"{root}#7")
    with pytest.raises(CatalogError, match="not an Image feature"):
        open_catalog(tmp_path / "ds", image_column="text")

    datasets.DatasetDict({"test": dataset.select([0]), "train": dataset}).save_to_disk(str(tmp_path / "dd"))
    split = list(open_catalog(tmp_path / "dd"))
    assert len(split) == 3 and split[2].key == f"{(tmp_path / 'dd').resolve().as_posix()}/train#2"
    assert decode_image(read_source(split[2].path)).getpixel((0, 0)) == colours[2]


def test_flickr8k_dev_manifest() -> None:
    if not FLICKR_DEV.exists():
        pytest.skip(f"{FLICKR_DEV} not present (../shared is optional)")
    catalog = open_catalog(FLICKR_DEV)
    records = list(catalog)
    assert len(catalog) == len(records) == 1000
    assert all(len(r.captions) == 5 for r in records)
    assert all(Path(r.key).parent.name == "images" for r in records)
    assert os.path.isfile(records[0].path) and catalog.root == FLICKR_DEV.parent.resolve()
