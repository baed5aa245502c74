"""The Gradio API through ``gradio_client`` against a live ``python -m app`` over a tiny real index.

Covers the named endpoints and their JSON hits, filters, more-like-this, bad input as normal traffic
(each refusal is a clear client error, counted by reason in /metrics, and the server keeps answering),
the upload cap, /healthz and /metrics, concurrent mixed traffic, and that Gradio serves no catalog or
system file by path.
"""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.app.live import LiveServer
from tests.hostile import make_hostile_folder

HIT_KEYS = {"key", "file", "url", "score", "captions", "metadata", "model", "generation"}


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Client:
    return Client(live_server.url, verbose=False)  # the default client: results hold no file to download


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def health(server: LiveServer) -> dict:
    return json.loads(get(server.url + "/healthz")[1])


def metric(server: LiveServer, name: str, **labels: str) -> float:
    text = get(server.url + "/metrics")[1].decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_text_search_returns_json_hits_with_versions(client: Client, live_server: LiveServer) -> None:
    result = client.predict("pattern number 5", 5, {}, api_name="/search_text")
    assert len(result["hits"]) == 5
    assert set(result["hits"][0]) >= HIT_KEYS and "path" not in result["hits"][0]
    scores = [h["score"] for h in result["hits"]]
    assert scores == sorted(scores, reverse=True)
    h = health(live_server)
    assert result["model_version"] == h["model_version"] == result["hits"][0]["model"]
    assert result["generation"] == h["generation"] and result["count"] == 24


def test_image_search_finds_the_same_photo_first(client: Client, live_server: LiveServer) -> None:
    photo = live_server.catalog / "images" / "p007.jpg"
    result = client.predict(handle_file(str(photo)), 3, None, api_name="/search_image")
    assert result["hits"][0]["key"] == str(photo.resolve())
    assert result["hits"][0]["file"] == "images/p007.jpg"  # relative to the catalog, not the server's path
    assert result["hits"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert result["hits"][0]["captions"] == ["pattern number 7"]


def test_combined_search_weight_moves_between_photo_and_text(client: Client, live_server: LiveServer) -> None:
    photo = handle_file(str(live_server.catalog / "images" / "p007.jpg"))
    image_only = client.predict(photo, "pattern number 11", 0.0, 5, {}, api_name="/search")
    text_only = client.predict(photo, "pattern number 11", 1.0, 5, {}, api_name="/search")
    text = client.predict("pattern number 11", 5, {}, api_name="/search_text")
    assert image_only["hits"][0]["captions"] == ["pattern number 7"]
    assert [h["key"] for h in text_only["hits"]] == [h["key"] for h in text["hits"]]


def test_filters_and_more_like_this(client: Client) -> None:
    red = client.predict("pattern", 24, {"color": "red"}, api_name="/search_text")
    assert len(red["hits"]) == 8 and {h["metadata"]["color"] for h in red["hits"]} == {"red"}
    both = client.predict("pattern", 24, "color=red, shop=shop1", api_name="/search_text")
    assert {(h["metadata"]["color"], h["metadata"]["shop"]) for h in both["hits"]} == {("red", "shop1")}
    key = red["hits"][3]["key"]
    similar = client.predict(key, 4, {"color": "red"}, api_name="/more_like")
    assert similar["hits"][0]["key"] == key and len(similar["hits"]) == 4


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


BAD_TEXT = [
    ("", 5, {}, "empty_query", "text query is empty"),
    ("   ", 5, {}, "empty_query", "text query is empty"),
    ("x" * 10_000, 5, {}, "text_too_long", "10000 characters"),
    ("red", 5, {"brand": "acme"}, "unknown_filter", "filter field(s) brand; known fields: color"),
    ("red", 0, {}, "bad_k", "k must be between 1 and 100"),
    ("red", 5000, {}, "bad_k", "k must be between 1 and 100"),
    ("red", 5, "{not json", "bad_filter", "not valid JSON"),
    (["red"], 5, {}, "bad_text", "the text query must be a string, got list"),
]


@pytest.mark.parametrize(
    ("text", "k", "filters", "reason", "message"), BAD_TEXT, ids=[str(i) for i in range(len(BAD_TEXT))]
)
def test_bad_text_requests_get_clear_errors(
    client: Client, live_server: LiveServer, text: str, k: int, filters: object, reason: str, message: str
) -> None:
    before = metric(live_server, "vitrine_errors_total", endpoint="search_text", reason=reason)
    with pytest.raises(Exception) as info:
        client.predict(text, k, filters, api_name="/search_text")
    assert message in str(info.value)
    assert metric(live_server, "vitrine_errors_total", endpoint="search_text", reason=reason) == before + 1
    assert health(live_server)["ok"]


HOSTILE = {
    "not_really.png": "not an image",
    "truncated.jpg": "truncated or corrupt",
    "bomb_30000x30000.png": "too many pixels",
    "empty.jpg": "empty file",
    "drawing.svg": "unsupported format: SVG",
}


def test_hostile_uploads_are_refused_and_the_server_keeps_answering(
    client: Client, live_server: LiveServer, tmp_path: Path
) -> None:
    make_hostile_folder(tmp_path)
    before = metric(live_server, "vitrine_errors_total", endpoint="search_image", reason="bad_image")
    for name, message in HOSTILE.items():
        with pytest.raises(Exception) as info:
            client.predict(handle_file(str(tmp_path / name)), 3, {}, api_name="/search_image")
        assert message in str(info.value), name
        assert "cannot read the uploaded image" in str(info.value)
    assert (
        metric(live_server, "vitrine_errors_total", endpoint="search_image", reason="bad_image") == before + 5
    )
    assert client.predict("pattern number 1", 2, {}, api_name="/search_text")["hits"]
    # hostile but valid files are answered
    ok = client.predict(handle_file(str(tmp_path / "cmyk.jpg")), 2, {}, api_name="/search_image")
    assert len(ok["hits"]) == 2


def test_fifty_megapixel_photo_is_searched(client: Client, tmp_path: Path) -> None:
    w, h = 8660, 5774  # 50.0 MP: a camera photo, not a bomb
    gradient = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]
    photo = tmp_path / "camera.jpg"
    Image.fromarray(np.broadcast_to(gradient, (h, w, 3)).copy()).save(photo, quality=70)
    result = client.predict(handle_file(str(photo)), 3, {}, api_name="/search_image")
    assert len(result["hits"]) == 3


def test_upload_over_the_cap_is_refused(client: Client, live_server: LiveServer, tmp_path: Path) -> None:
    big = tmp_path / "huge.jpg"
    big.write_bytes(b"\xff\xd8" + b"\0" * (21 * 1024 * 1024))  # the server's cap is 20 MB
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # the client checks first
        client.predict(handle_file(str(big)), 3, {}, api_name="/search_image")
    with big.open("rb") as f:  # a raw upload is refused by the server before it reaches disk
        response = httpx.post(f"{live_server.url}/gradio_api/upload", files={"files": f}, timeout=30)
    assert response.status_code == 413
    assert metric(live_server, "vitrine_errors_total", reason="upload_too_large") == 1
    assert health(live_server)["ok"]


def test_healthz_and_metrics(client: Client, live_server: LiveServer) -> None:
    client.predict("pattern number 2", 3, {}, api_name="/search_text")
    body = health(live_server)
    assert body["ok"] and body["index_loaded"] and body["model_loaded"] and body["count"] == 24
    assert "index" not in body and str(live_server.index) not in json.dumps(body)
    assert body["model"] == live_server.model.name  # a local checkpoint by its folder's name, not its path
    assert str(live_server.model).encode() not in get(live_server.url + "/metrics")[1]
    assert body["forwards"] == {"text": "traced", "image": "traced"}  # the server's default
    status, _ = get(live_server.url + "/metrics")
    assert status == 200
    assert metric(live_server, "vitrine_requests_total", endpoint="search_text", outcome="ok") >= 1
    assert metric(live_server, "vitrine_request_seconds_count", endpoint="search_text") >= 1
    assert metric(live_server, "vitrine_index_items") == 24
    assert metric(live_server, "vitrine_model_info", version=body["model_version"]) == 1
    assert "search_text ok" in live_server.log_text()  # one log line per request, with latency
    assert "ms k=3" in live_server.log_text()


def test_concurrent_mixed_traffic_is_all_answered(live_server: LiveServer) -> None:
    def one(i: int) -> str:
        c = Client(live_server.url, verbose=False)
        text = "" if i % 3 == 0 else f"pattern number {i}"
        try:
            return str(len(c.predict(text, 4, {}, api_name="/search_text")["hits"]))
        except Exception as exc:
            return "empty" if "empty" in str(exc) else f"unexpected: {exc}"

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    assert answers.count("empty") == 6 and answers.count("4") == 10, answers


def test_hits_carry_the_url_of_their_item_image(client: Client, live_server: LiveServer) -> None:
    hits = client.predict(text="pattern number 4", k=3, filters={}, api_name="/search_text")["hits"]
    assert all("path" not in h and str(live_server.catalog) not in h["file"] for h in hits)
    response = httpx.get(live_server.url + hits[0]["url"] + "?size=48", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(response.content)).size) == 48
    missing = httpx.get(f"{live_server.url}/api/v1/items/no-such-key/image", timeout=10)
    assert missing.status_code == 404 and missing.json() == {"error": "no such item", "key": "no-such-key"}


@pytest.mark.parametrize("target", ["/etc/passwd", "{catalog}/images/p001.jpg", "{catalog}/../../etc/passwd"])
def test_gradio_serves_no_file_by_path(live_server: LiveServer, target: str) -> None:
    path = target.format(catalog=live_server.catalog)
    status, body = get(f"{live_server.url}/gradio_api/file={path}")
    assert status in (403, 404) and b"root:" not in body
