"""Issue 13 over a live server and a typed CSV catalog: numbers, booleans and ISO dates are filtered as
such (not as text), `$in`/`$or` combine them, and an exact product code typed by a person is found first by
the lexical and hybrid modes although the (tiny, random) embedding ranks it anywhere."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.app.live import build_index, start_server, stop
from tests.conftest import pattern_image

pytestmark = pytest.mark.slow  # a server subprocess of its own

N = 30
CODE = "SKU-4471-B"


def _row(i: int) -> dict:
    caption = f"a patterned print number {i}" + (f", product code {CODE}" if i == 11 else "")
    return {
        "image": f"images/t{i:02d}.jpg",
        "caption": caption,
        "price": f"{5 + 3 * i}",  # 5, 8, ..., 92
        "in_stock": "true" if i % 2 == 0 else "false",
        "added": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}",
    }


@pytest.fixture(scope="module")
def typed_server(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Iterator[str]:
    root = tmp_path_factory.mktemp("typed")
    (root / "catalog" / "images").mkdir(parents=True)
    rows = [_row(i) for i in range(N)]
    for i in range(N):
        pattern_image(200 + i).save(root / "catalog" / "images" / f"t{i:02d}.jpg", quality=90)
    manifest = root / "catalog" / "items.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    build_index(manifest, root / "index", clip_path)
    url, proc = start_server(root / "index", root / "server.log")
    try:
        yield url
    finally:
        stop(proc)


def search(url: str, body: dict) -> dict:
    answer = httpx.post(f"{url}/api/v1/search", json={"k": N, **body}, timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()


def numbers(hits: list[dict]) -> set[int]:
    return {int(h["file"][len("images/t") : -len(".jpg")]) for h in hits}


def test_numbers_booleans_and_dates_filter_by_type(typed_server: str) -> None:
    cheap = search(typed_server, {"text": "a print", "filters": {"price": {"$lt": 50}}})["hits"]
    assert numbers(cheap) == {i for i in range(N) if 5 + 3 * i < 50}  # 5..47: as text "8" > "50"
    assert all(isinstance(h["metadata"]["price"], int | float) for h in cheap)
    stocked = search(typed_server, {"text": "a print", "filters": {"in_stock": True}})["hits"]
    assert numbers(stocked) == set(range(0, N, 2))
    spring = {"added": {"$gte": "2024-03-01", "$lt": "2024-06-01"}}
    got = numbers(search(typed_server, {"text": "a print", "filters": spring})["hits"])
    assert got == {i for i in range(N) if 3 <= 1 + i % 12 <= 5}
    either = {"$or": [{"price": {"$gte": 80}}, {"added": {"$in": ["2024-01-01", "2024-02-02"]}}]}
    got = numbers(search(typed_server, {"text": "a print", "filters": either})["hits"])
    assert got == {i for i in range(N) if 5 + 3 * i >= 80} | {0, 1}


def test_a_type_mismatch_or_unknown_field_is_a_400_naming_the_fields(typed_server: str) -> None:
    cases = [({"price": {"$lt": "cheap"}}, "bad_filter"), ({"colour": "red"}, "unknown_filter")]
    for filters, reason in cases:
        body = {"text": "x", "filters": filters}
        answer = httpx.post(f"{typed_server}/api/v1/search", json=body, timeout=30)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["reason"] == reason and "price" in error["message"] and "added" in error["message"]


def test_an_exact_product_code_is_found_first_by_lexical_and_hybrid(typed_server: str) -> None:
    for mode in ("lexical", "hybrid"):
        hits = search(typed_server, {"text": CODE, "mode": mode, "k": 3})["hits"]
        assert hits and hits[0]["file"] == "images/t11.jpg", (mode, [h["file"] for h in hits])
        assert hits[0]["lexical_score"] is not None
