"""One file listed by two catalogs of an index: the first catalog keeps it (issue 11, item 14)."""

from __future__ import annotations

import csv
from pathlib import Path

from tests.conftest import pattern_image
from vitrine.build.ingest import Ingestor, catalog_source
from vitrine.build.reindex import Reindexer
from vitrine.catalog.readers import open_catalog
from vitrine.index.store import IndexStore
from vitrine.open_index import open_for_build


def _manifest(path: Path, images: list[Path], shop: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption", "shop"])
        writer.writerows([str(image), f"{shop} {image.name}", shop] for image in images)
    return path


def test_a_file_in_two_catalogs_keeps_its_first_catalogs_metadata(clip_encoder, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    shared, own_a, own_b = (photos / f"{n}.jpg" for n in ("shared", "a", "b"))
    for seed, path in enumerate((shared, own_a, own_b)):
        pattern_image(seed).save(path)
    a = open_catalog(_manifest(tmp_path / "a" / "list.csv", [shared, own_a], "alpha"))
    b = open_catalog(_manifest(tmp_path / "b" / "list.csv", [shared, own_b], "beta"))
    store = open_for_build(tmp_path / "index", clip_encoder)
    key = str(shared.resolve())

    Ingestor(store, clip_encoder).run(a)
    report_b = Ingestor(store, clip_encoder).run(b)
    assert report_b.added == 1 and report_b.conflicted == 1
    assert report_b.conflicts == [{"path": key, "catalog": catalog_source(a)}]
    item = store.get(key)
    assert item["metadata"] == {"shop": "alpha"} and item["captions"] == ["alpha shared.jpg"]
    assert item["source"] == catalog_source(a)

    again_a = Ingestor(store, clip_encoder).run(a)  # no flip-flop: A finds its item unchanged
    assert again_a.unchanged == 2 and again_a.added == again_a.updated == again_a.conflicted == 0
    assert Ingestor(store, clip_encoder).run(b).conflicted == 1 and len(store) == 3

    a_without = open_catalog(_manifest(tmp_path / "a" / "list.csv", [own_a], "alpha"))
    assert Ingestor(store, clip_encoder).run(a_without).removed == 1  # the owner lets go of the file
    taken = Ingestor(store, clip_encoder).run(b)
    assert taken.added == 1 and taken.conflicted == 0
    assert store.get(key)["metadata"] == {"shop": "beta"} and store.get(key)["source"] == catalog_source(b)
    store.close()


def test_a_reindex_keeps_each_file_with_the_catalog_that_indexed_it_first(
    clip_encoder, tmp_path: Path
) -> None:
    """Catalogs are replayed in the order they were first indexed, not by name: "zeta" came first."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shared, own = photos / "shared.jpg", photos / "own.jpg"
    pattern_image(0).save(shared)
    pattern_image(1).save(own)
    zeta = open_catalog(_manifest(tmp_path / "zeta" / "list.csv", [shared], "zeta"))
    alpha = open_catalog(_manifest(tmp_path / "alpha" / "list.csv", [shared, own], "alpha"))
    index = tmp_path / "index"
    store = open_for_build(index, clip_encoder)
    Ingestor(store, clip_encoder).run(zeta)
    Ingestor(store, clip_encoder).run(alpha)
    Ingestor(store, clip_encoder).run(zeta)  # re-registering a catalog keeps its place
    store.close()

    assert Reindexer(index, clip_encoder).run().status == "published"
    with IndexStore.open(index) as new:
        item = new.get(str(shared.resolve()))
        assert item["source"] == catalog_source(zeta) and item["metadata"] == {"shop": "zeta"}
        assert list(new.catalogs()) == [catalog_source(zeta), catalog_source(alpha)]
