"""The page's query composition, in-process: the filters and REST body its controls make, and the
``curl`` line it shows (server URL from a checked Host header, a login placeholder, never a password)."""

from __future__ import annotations

import csv
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
import pytest
from starlette.requests import Request

from app import ui_query as uq
from app.service import SearchService, ServiceSettings
from tests.app.live import build_index
from tests.conftest import pattern_image


@pytest.fixture(scope="module")
def typed(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Iterator[SearchService]:
    """A service over a catalog with a number (price) and a date (added) column."""
    root = tmp_path_factory.mktemp("typed")
    (root / "images").mkdir()
    with (root / "captions.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "price", "added", "color"])
        for i in range(4):
            pattern_image(i).save(root / "images" / f"p{i}.jpg")
            writer.writerow([f"images/p{i}.jpg", f"pattern {i}", f"{i * 2.5}", f"2024-01-0{i + 1}", "red"])
    build_index(root / "captions.csv", root / "index", clip_path)
    yield SearchService(ServiceSettings(index=str(root / "index"), refresh_seconds=0))


@pytest.fixture
def bare(tmp_path: Path) -> SearchService:
    return SearchService(ServiceSettings(index=str(tmp_path / "none"), refresh_seconds=0))


def test_ranges_are_typed_from_the_index_schema(typed: SearchService) -> None:
    assert uq.range_fields(typed) == ["added", "price"]
    assert uq.sort_fields(typed)[0] == "score" and "color" in uq.sort_fields(typed)
    pairs = ["color", "red", None, None]
    ranges = ["price", "10", " 2.5 ", "added", "2024-01-02", "", None, "1", "2"]
    assert uq.compose_filters(typed, 2, *pairs, *ranges) == {
        "color": "red",
        "price": {"$gte": 10, "$lte": 2.5},
        "added": {"$gte": "2024-01-02"},
    }
    # text in a number box is left for the service to refuse by name
    assert uq.compose_filters(typed, 0, "price", "ten", "") == {"price": {"$gte": "ten"}}


def test_a_field_named_twice_is_combined_with_and(bare: SearchService) -> None:
    assert uq.compose_filters(bare, 2, "c", "red", "c", "blue") == {"$and": [{"c": "red"}, {"c": "blue"}]}
    assert uq.compose_filters(bare, 1, None, "x", "", "1", "2") == {}, "unnamed fields add nothing"


def test_the_body_holds_only_what_differs_from_the_defaults() -> None:
    plain = uq.compose_body("red dress", "", 0.5, 12, "", "vector", "score", "descending", {})
    assert plain == {"text": "red dress", "k": 12}
    controls = ("dress", "people, ,text ", 0.25, 5, " 0.3 ", "hybrid", "price", "ascending")
    body = uq.compose_body(*controls, {"c": 1})
    assert body == {
        "text": "dress",
        "k": 5,
        "negative": ["people", "text"],
        "weight": 0.25,
        "filters": {"c": 1},
        "min_score": 0.3,
        "mode": "hybrid",
        "sort": "price",
    }
    assert uq.compose_body("a", "", 0.5, 3, "0", "vector", "added", "descending", {}) == {
        "text": "a",
        "k": 3,
        "min_score": 0.0,  # a cutoff of 0 is a cutoff: only an empty box is "off"
        "sort": "-added",
    }
    assert uq.compose_body("a", "", 0.5, 3, "high", "vector", "score", "", {})["min_score"] == "high"


def test_the_page_composes_body_and_filters_in_one_step(bare: SearchService) -> None:
    controls = ["a", "", 0.5, 3, "", "vector", "score", "descending"]
    body, filters = uq.compose_page(bare, 1, *controls, "color", "red", "price", "1", "")
    assert filters == {"color": "red", "price": {"$gte": "1"}} and body["filters"] == filters


def _request(host: bytes, scheme: str = "http") -> gr.Request:
    scope = {
        "type": "http",
        "method": "POST",
        "scheme": scheme,
        "path": "/gradio_api/queue/join",
        "query_string": b"",
        "server": ("127.0.0.1", 7860),
        "headers": [(b"host", host)],
    }
    return gr.Request(request=Request(scope))


def test_the_curl_line_posts_the_body_to_this_server() -> None:
    body = {"text": "it's red", "k": 5, "filters": {"price": {"$lt": 50}}}
    line = uq.curl_line(body, False, _request(b"shop.example:8443", "https"), login=False)
    argv = shlex.split(line)
    assert argv[:4] == ["curl", "-X", "POST", "https://shop.example:8443/api/v1/search"]
    assert json.loads(argv[argv.index("-d") + 1]) == body and "-u" not in argv
    assert uq.curl_line("not a body", False, None, login=False) == ""


def test_with_a_login_the_curl_line_has_a_placeholder_never_a_password() -> None:
    line = uq.curl_line({"text": "a", "k": 1}, False, _request(b"localhost:7860"), login=True)
    argv = shlex.split(line)
    assert argv[1:3] == ["-u", "USER:PASS"]


@pytest.mark.parametrize("host", [b"evil.example/x?y=1", b"a b", b"$(reboot)", b"x" * 300])
def test_a_hostile_host_header_does_not_reach_the_line(host: bytes) -> None:
    line = uq.curl_line({"text": "a", "k": 1}, False, _request(host), login=False)
    assert shlex.split(line)[3] == "http://localhost:7860/api/v1/search"
    no_host = uq.curl_line({"text": "a", "k": 1}, False, _request(b""), login=False)
    assert shlex.split(no_host)[3] == "http://127.0.0.1:7860/api/v1/search", "the server's own address"


def test_a_photo_search_is_a_multipart_line() -> None:
    body = {"text": "but red", "k": 4, "negative": ["people"], "filters": {"c": "x y"}, "mode": "hybrid"}
    argv = shlex.split(uq.curl_line(body, True, _request(b"127.0.0.1:7860"), login=False))
    assert argv[:5] == ["curl", "http://127.0.0.1:7860/api/v1/search/image", "-F", "image=@photo.jpg", "-F"]
    fields = [argv[i + 1] for i, a in enumerate(argv) if a == "-F"][1:]
    assert fields == ["text=but red", "k=4", 'filters={"c": "x y"}', "negative=people"]
