"""Typed catalog metadata through the indexer CLI: a CSV with numbers, booleans and dates, the schema and
the suggested cutoff in `status --json`, `search` with the filter language, pages and `--min-score`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import pattern_image
from tests.integration.test_indexer_cli import as_json, indexer
from vitrine.catalog.readers import open_catalog

ROWS = 24


def write_catalog(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    lines = ["image,caption,price,stock,on_sale,added,color"]
    for i in range(ROWS):
        pattern_image(i).save(folder / "images" / f"p{i:02d}.jpg", quality=92)
        stock = "" if i % 7 == 3 else str(i % 5)  # blanks: pandas reads floats, stored back as integers
        sale = "true" if i % 3 == 0 else "False"
        added = f"2024-{1 + i % 12:02d}-15" + ("T09:30:00+02:00" if i % 4 == 0 else "")
        lines.append(
            f"p{i:02d}.jpg,product number {i},{i * 2.5},{stock},{sale},{added},{('red', 'blue')[i % 2]}"
        )
    (folder / "catalog.csv").write_text("\n".join(lines) + "\n")
    return folder / "catalog.csv"


@pytest.fixture()
def typed_index(clip_path: Path, tmp_path: Path) -> str:
    index = str(tmp_path / "index")
    catalog = write_catalog(tmp_path / "shop")
    indexer("build", str(catalog), "--index", index, "--model", str(clip_path), "--no-progress", "--json")
    return index


def test_csv_columns_are_stored_typed(tmp_path: Path) -> None:
    records = {Path(r.key).name: r.metadata for r in open_catalog(write_catalog(tmp_path / "shop"))}
    assert records["p00.jpg"] == {
        "price": 0.0,
        "stock": 0,
        "on_sale": True,
        "added": "2024-01-15T09:30:00+02:00",
        "color": "red",
    }
    assert records["p03.jpg"]["stock"] is None and records["p04.jpg"]["stock"] == 4
    assert records["p01.jpg"]["on_sale"] is False and isinstance(records["p01.jpg"]["price"], float)


def test_status_reports_the_schema_and_a_suggested_cutoff(typed_index: str) -> None:
    status = as_json(indexer("status", "--index", typed_index, "--json"))
    assert status["schema"] == {
        "added": {
            "type": "date",
            "count": ROWS,
            "min": "2024-01-15T07:30:00+00:00",
            "max": "2024-12-15T00:00:00+00:00",
        },
        "color": {"type": "string", "count": ROWS},
        "on_sale": {"type": "boolean", "count": ROWS},
        "price": {"type": "number", "count": ROWS, "min": 0.0, "max": 57.5},
        "stock": {"type": "number", "count": ROWS - 3, "min": 0, "max": 4},
    }
    assert "suggested_min_score" not in status  # plain status loads no model
    cut = as_json(indexer("status", "--index", typed_index, "--json", "--suggest-cutoff"))[
        "suggested_min_score"
    ]
    assert cut["sample"] == ROWS and cut["percentile"] == 10.0 and "caption" in cut["method"]
    assert -1.0 <= cut["min_score"] <= 1.0 and cut["matching_kept"] >= 0.9
    assert set(cut["matching"]) == {"p10", "p50", "p90"} and 0.0 <= cut["non_matching_passing"] <= 1.0


def search(index: str, *args: str) -> list[dict]:
    out = indexer("search", "--index", index, "--text", "product", "--json", "-k", "30", *args)
    return as_json(out)["hits"]


def test_search_filters_pages_and_cutoff(typed_index: str) -> None:
    def names(hits: list[dict]) -> set[str]:
        return {Path(h["key"]).name for h in hits}

    cheap = search(typed_index, "--filter", '{"price": {"$lt": 10}}')
    assert names(cheap) == {f"p{i:02d}.jpg" for i in range(4)}
    spring = search(typed_index, "--filter", '{"added": {"$gte": "2024-03-01", "$lt": "2024-06-01"}}')
    assert names(spring) == {f"p{i:02d}.jpg" for i in range(ROWS) if 2 <= i % 12 <= 4}
    either = '{"$or": [{"on_sale": true}, {"stock": {"$in": [4]}}]}'
    expected = {f"p{i:02d}.jpg" for i in range(ROWS) if i % 3 == 0 or (i % 7 != 3 and i % 5 == 4)}
    assert names(search(typed_index, "--filter", either)) == expected
    no_stock = '{"stock": {"$exists": false}}'
    assert names(search(typed_index, "--filter", "color=red", no_stock)) == {"p10.jpg"}
    every = search(typed_index)
    pages = [search(typed_index, "-k", "5", "--offset", str(o)) for o in range(0, ROWS, 5)]
    assert [h["key"] for page in pages for h in page] == [h["key"] for h in every]
    cut = every[9]["score"]
    assert [h["key"] for h in search(typed_index, f"--min-score={cut}")] == [h["key"] for h in every[:10]]
    dated = search(typed_index, "--sort=-price")
    assert [h["metadata"]["price"] for h in dated] == sorted(
        (h["metadata"]["price"] for h in every), reverse=True
    )


def test_bad_filters_are_one_line_errors_naming_the_fields(typed_index: str) -> None:
    for bad, reason in [
        ('{"size": "M"}', "unknown filter field(s) size; known fields: added (date), color (string)"),
        ('{"price": {"$lt": "cheap"}}', "'price' holds number values"),
        ("{not json", "is not valid JSON"),
    ]:
        out = indexer("search", "--index", typed_index, "--text", "x", "--filter", bad, check=False)
        assert out.returncode == 1 and reason in out.stderr, out.stderr
    out = indexer("search", "--index", typed_index, "--text", "x", "--offset", "995", check=False)
    assert out.returncode == 1 and "offset + k at most 1000" in out.stderr  # the edge refuses it
    assert (
        json.loads(indexer("search", "--index", typed_index, "--text", "x", "--json").stdout)["offset"] == 0
    )
