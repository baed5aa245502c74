"""Lexical and hybrid search end to end with a real tiny model: a catalog built by the Ingestor, a
product code found by typing it although the (random) vectors rank it low, and the full-text index
kept in step by a takedown, a restore + rebuild and a reindex into a new generation."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from indexer.cli import main
from tests.conftest import pattern_image
from vitrine.build.ingest import Ingestor
from vitrine.build.reindex import Reindexer
from vitrine.catalog.readers import open_catalog
from vitrine.index.store import IndexStore
from vitrine.model.encoder import Encoder
from vitrine.open_index import open_for_build
from vitrine.search import hybrid

N = 12


def code(i: int) -> str:
    return f"SKU-{4400 + i}-B"


def catalog(folder: Path) -> Path:
    """Twelve photos with a caption each and a product code in a metadata column."""
    folder.mkdir(parents=True)
    with open(folder / "catalog.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "sku"])
        for i in range(N):
            pattern_image(i).save(folder / f"item_{i:02d}.jpg", quality=90)
            writer.writerow([f"item_{i:02d}.jpg", f"striped pattern number {i}", code(i)])
    return folder / "catalog.csv"


def build(index: Path, manifest: Path, encoder: Encoder) -> None:
    store = open_for_build(index, encoder)
    try:
        Ingestor(store, encoder).run(open_catalog(manifest))
    finally:
        store.close()


def worst_ranked_code(store: IndexStore, encoder: Encoder) -> tuple[str, str, int]:
    """(key, its code, its rank by vector search for that code): the item the vectors miss most."""
    worst = ("", "", -1)
    for key in sorted(store.keys()):
        text = code(int(Path(key).stem.split("_")[1]))
        ranking = [h.key for h in store.search(encoder.encode_texts([text]), k=N)[0]]
        if ranking.index(key) > worst[2]:
            worst = (key, text, ranking.index(key))
    return worst


def test_a_product_code_is_found_by_lexical_and_hybrid_though_vectors_rank_it_low(clip_encoder, tmp_path):
    index = tmp_path / "index"
    build(index, catalog(tmp_path / "photos"), clip_encoder)
    with IndexStore.open(index) as store:
        key, text, vector_rank = worst_ranked_code(store, clip_encoder)
        assert vector_rank >= 3, "the random model should rank some code's item low"
        query = clip_encoder.encode_texts([text])[0]
        lexical = hybrid.lexical(store, text, k=5)
        assert [h.key for h in lexical] == [key] and lexical[0].metadata == {"sku": text}
        fused = hybrid.search(store, query, text, k=5)
        assert fused[0].key == key
        assert fused[0].lexical_score == lexical[0].lexical_score and fused[0].vector_score is not None
        assert fused[0].score == pytest.approx(1 / 61 + 1 / (61 + vector_rank))
        assert all(h.lexical_score is None for h in fused[1:])
        partial = hybrid.lexical(store, text[:7], k=N)  # "SKU-440": the codes 4400-4409
        assert sorted(h.metadata["sku"] for h in partial) == [code(i) for i in range(10)]


def test_takedown_restore_and_reindex_keep_the_full_text_index_in_step(clip_encoder, tmp_path, capsys):
    index, manifest = tmp_path / "index", catalog(tmp_path / "photos")
    build(index, manifest, clip_encoder)
    target = tmp_path / "photos" / "item_07.jpg"
    reader = IndexStore.open(index)
    assert [h.key for h in hybrid.lexical(reader, code(7))] == [str(target.resolve())]

    assert main(["remove", str(target), "--index", str(index)]) == 0  # a takedown
    assert reader.refresh()
    assert hybrid.lexical(reader, code(7)) == [] and hybrid.lexical(reader, "number 7") != []
    assert all("item_07" not in h.key for h in hybrid.lexical(reader, "number 7 striped", k=N))
    vector = clip_encoder.encode_texts([code(7)])[0]
    assert all("item_07" not in h.key for h in hybrid.search(reader, vector, code(7), k=N))

    assert main(["restore", str(target), "--index", str(index)]) == 0
    build(index, manifest, clip_encoder)  # the next build indexes it again
    assert reader.refresh() and [h.key for h in hybrid.lexical(reader, code(7))] == [str(target.resolve())]
    capsys.readouterr()

    assert Reindexer(index, clip_encoder).run().status == "published"  # a copy into a new generation
    assert reader.refresh() and reader.generation == "gen-000002"
    assert [h.key for h in hybrid.lexical(reader, code(7))] == [str(target.resolve())]
    assert len(hybrid.lexical(reader, "striped", k=N)) == N
    reader.close()
