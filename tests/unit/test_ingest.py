"""Ingest edge cases around identical content, in-process with a real tiny model and a real store."""

from __future__ import annotations

import shutil

from tests.conftest import pattern_image
from vitrine.build.ingest import Ingestor
from vitrine.catalog.readers import open_catalog
from vitrine.open_index import open_for_build


def test_duplicates_in_one_run_and_identical_bad_files(clip_encoder, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    pattern_image(1).save(folder / "a.jpg")
    for name in ("b.jpg", "c.jpg"):
        shutil.copy(folder / "a.jpg", folder / name)
    for name in ("empty1.jpg", "empty2.jpg", "empty3.jpg"):
        (folder / name).write_bytes(b"")
    store = open_for_build(tmp_path / "index", clip_encoder)
    report = Ingestor(store, clip_encoder, commit_every=2).run(open_catalog(folder))
    assert report.added == 3 and report.failed == 3 and len(store) == 3
    assert store.stats()["vectors"] == 1  # identical content stored once
    hits = store.search(clip_encoder.encode_images([folder / "a.jpg"]), k=3)[0]
    assert len(hits) == 1 and sorted([hits[0].key, *hits[0].duplicates]) == sorted(
        str((folder / n).resolve()) for n in ("a.jpg", "b.jpg", "c.jpg")
    )
    assert {f["reason"] for f in store.failures()} == {"empty file"}


def test_content_moving_between_keys_across_commits(clip_encoder, tmp_path):
    """a's old content reappears under a new key after a's vector was orphaned by an earlier commit."""
    folder = tmp_path / "photos"
    folder.mkdir()
    pattern_image(1).save(folder / "a.jpg")
    store = open_for_build(tmp_path / "index", clip_encoder)
    Ingestor(store, clip_encoder).run(open_catalog(folder))
    old = (folder / "a.jpg").read_bytes()
    pattern_image(2).save(folder / "a.jpg")
    (folder / "z.jpg").write_bytes(old)
    report = Ingestor(store, clip_encoder, commit_every=1).run(open_catalog(folder))
    assert report.failed == 0 and len(store) == 2
    top = store.search(clip_encoder.encode_images([folder / "z.jpg"]), k=1)[0][0]
    assert top.key == str((folder / "z.jpg").resolve()) and top.score > 0.999
