"""The REST API (/api/v1) against a live ``python -m app``: search by base64 and multipart photos, key,
text with negative terms and pages; 4xx JSON errors for bad input; auth by Basic and Bearer; URL fetch
refused when not allowed and for private addresses; OpenAPI; /metrics counting REST calls."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.rest.fetch import FetchPolicy, FetchRefused, fetch_image, public_address
from tests.app.live import LiveServer, start_server, stop
from tests.app.test_api import metric
from tests.conftest import REPO

KEY = "k" * 12 + "-secret-api-key"
USER = ("ann", "pw-for-ann")


def post(server_url: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{server_url}/api/v1/search", json=body, timeout=60, **kw)  # type: ignore[arg-type]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_base64_and_multipart_photo_search_return_the_photo_first(live_server: LiveServer) -> None:
    photo = live_server.catalog / "images" / "p007.jpg"
    by_json = post(live_server.url, {"image": {"base64": b64(photo)}, "k": 3})
    assert by_json.status_code == 200, by_json.text
    body = by_json.json()
    assert body["hits"][0]["key"] == str(photo.resolve()) and body["hits"][0]["score"] == pytest.approx(
        1, abs=1e-3
    )
    assert set(body) == {"hits", "offset", "next_offset", "model", "model_version", "generation", "took_ms"}
    hit = body["hits"][0]
    assert hit["model_version"] == body["model_version"] and hit["model"] == body["model"]
    assert hit["file"] == "images/p007.jpg" and "path" not in hit and body["next_offset"] == 3
    with photo.open("rb") as f:
        multipart = httpx.post(
            f"{live_server.url}/api/v1/search/image", files={"image": f}, data={"k": "5"}, timeout=60
        )
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["hits"][0]["key"] == str(photo.resolve()) and len(multipart.json()["hits"]) == 5


def test_key_search_text_pages_and_item(live_server: LiveServer) -> None:
    key = str((live_server.catalog / "images" / "p004.jpg").resolve())
    similar = post(live_server.url, {"key": key, "k": 4, "filters": {"shop": "shop0"}}).json()
    assert similar["hits"][0]["key"] == key and {h["metadata"]["shop"] for h in similar["hits"]} == {"shop0"}
    top = post(live_server.url, {"text": "pattern", "k": 24}).json()["hits"]
    pages, offset = [], 0
    while offset is not None:
        page = post(live_server.url, {"text": "pattern", "k": 10, "offset": offset}).json()
        pages += page["hits"]
        offset = page["next_offset"]
    assert [h["key"] for h in pages] == [h["key"] for h in top]
    item = httpx.get(f"{live_server.url}/api/v1/items/{key}", timeout=10).json()
    assert (
        item["key"] == key and item["file"] == "images/p004.jpg" and item["captions"] == ["pattern number 4"]
    )
    assert httpx.get(live_server.url + item["url"], timeout=10).headers["content-type"] == "image/jpeg"


def test_negative_terms_push_their_neighbours_down(live_server: LiveServer) -> None:
    """The item most like the negative text can only lose ranks (scores are (a - w·b)·x, renormalised)."""
    plain = [h["key"] for h in post(live_server.url, {"text": "pattern number 3", "k": 24}).json()["hits"]]
    unwanted = post(live_server.url, {"text": "pattern number 11", "k": 1}).json()["hits"][0]["key"]
    body = {"text": "pattern number 3", "negative": ["pattern number 11"], "negative_weight": 1, "k": 24}
    pushed = [h["key"] for h in post(live_server.url, body).json()["hits"]]
    assert pushed != plain and sorted(pushed) == sorted(plain)
    assert pushed.index(unwanted) >= plain.index(unwanted)
    cancelled = post(live_server.url, {"text": "pattern", "negative": ["pattern"], "negative_weight": 1})
    assert cancelled.status_code == 400 and cancelled.json()["error"]["reason"] == "bad_negative"


BAD = [
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "bad_request"),
    ({"json": {"text": "x", "k": "many"}}, 400, "bad_request"),
    ({"json": {"text": ["x"]}}, 400, "bad_request"),
    ({"json": {"text": "x", "k": 0}}, 400, "bad_k"),
    ({"json": {"text": "x", "k": 101}}, 400, "bad_k"),
    ({"json": {"text": "x", "surprise": 1}}, 400, "bad_request"),
    ({"json": {"text": "x", "filters": {"brand": "a"}}}, 400, "unknown_filter"),
    ({"json": {"text": "x", "mode": "hybrid"}}, 400, "unsupported"),
    ({"json": {}}, 400, "empty_query"),
    ({"json": {"key": "no-such-key"}}, 404, "unknown_key"),
    ({"json": {"image": {"base64": "###"}}}, 400, "bad_image"),
    ({"json": {"image": {"base64": base64.b64encode(b"not an image").decode()}}}, 400, "bad_image"),
    ({"json": {"image": {"url": "http://example.com/a.jpg"}}}, 400, "url_fetch_disabled"),
    ({"content": b"x" * (40 * 1024 * 1024), "headers": {"content-type": "application/json"}}, 413, None),
]


@pytest.mark.parametrize(("request_kw", "status", "reason"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_are_4xx_json(
    live_server: LiveServer, request_kw: dict, status: int, reason: str
) -> None:
    response = httpx.post(f"{live_server.url}/api/v1/search", timeout=60, **request_kw)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["reason"] == (reason or "upload_too_large") and error["message"]


def test_unknown_item_is_404_and_metrics_count_rest_calls(live_server: LiveServer) -> None:
    before = metric(live_server, "vitrine_requests_total", endpoint="rest_search", outcome="ok")
    assert post(live_server.url, {"text": "pattern", "k": 2}).status_code == 200
    assert metric(live_server, "vitrine_requests_total", endpoint="rest_search", outcome="ok") == before + 1
    missing = httpx.get(f"{live_server.url}/api/v1/items/no-such-key", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["reason"] == "unknown_key"
    assert metric(live_server, "vitrine_errors_total", endpoint="rest_item", reason="unknown_key") >= 1


def test_openapi_lists_the_endpoints_and_docs_are_served(live_server: LiveServer) -> None:
    spec = httpx.get(f"{live_server.url}/api/v1/openapi.json", timeout=10).json()
    assert {"/search", "/search/image", "/items/{key}", "/items/{key}/image"} <= set(spec["paths"])
    assert "SearchRequest" in spec["components"]["schemas"]
    docs = httpx.get(f"{live_server.url}/api/v1/docs", timeout=10)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()


@pytest.fixture(scope="module")
def guarded(live_server: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A second server over the same index with a login, an API key, and URL fetch from local names."""
    root = tmp_path_factory.mktemp("guarded")
    flags = ["--auth", ":".join(USER), "--api-key", KEY, "--allow-url-fetch", "127.0.0.1,localhost"]
    url, proc = start_server(live_server.index, root / "server.log", *flags)
    try:
        yield url
    finally:
        stop(proc)


def test_auth_by_basic_or_bearer(guarded: str) -> None:
    body = {"text": "pattern", "k": 2}
    assert post(guarded, body).status_code == 401
    assert (
        post(guarded, body, headers={"Authorization": "Bearer wrong-key-of-some-length"}).status_code == 401
    )
    assert post(guarded, body, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert post(guarded, body, auth=USER).status_code == 200
    assert httpx.get(f"{guarded}/api/v1/openapi.json", timeout=10).status_code == 200


def test_url_fetch_refuses_private_addresses(guarded: str) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    for url in (f"{guarded}/healthz", "http://localhost:9/a.jpg"):
        response = post(guarded, {"image": {"url": url}}, headers=auth)
        assert response.status_code == 400 and response.json()["error"]["reason"] == "url_not_allowed"
    other = post(guarded, {"image": {"url": "http://example.com/a.jpg"}}, headers=auth)
    assert "does not fetch images from 'example.com'" in other.json()["error"]["message"]


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
    ],
)
def test_address_check(ip: str, public: bool) -> None:
    assert public_address(ip) is public


def test_fetch_refuses_unlisted_hosts_odd_schemes_and_local_names() -> None:
    policy = FetchPolicy(hosts=frozenset({"localhost"}))
    cases = {
        "http://example.com/a.jpg": "url_not_allowed",
        "file:///etc/passwd": "bad_image",
        "http://user:pw@localhost/a.jpg": "bad_image",
        "http://localhost/a.jpg": "url_not_allowed",  # listed, but resolves to loopback
    }
    for url, reason in cases.items():
        with pytest.raises(FetchRefused) as info:
            fetch_image(url, policy)
        assert info.value.reason == reason, url


def test_readme_rest_quick_start_runs_against_a_live_server(live_server: LiveServer, tmp_path: Path) -> None:
    """The REST doc's examples (curl and httpx), unchanged but for the address, run and answer."""
    text = (REPO / "docs" / "rest.md").read_text()
    region = text[text.index("<!-- rest:start -->") : text.index("<!-- rest:end -->")]
    shell = re.findall(r"```bash\n(.*?)```", region, flags=re.S)[0]
    code = re.findall(r"```python\n(.*?)```", region, flags=re.S)[0]
    shutil.copy(live_server.catalog / "images" / "p005.jpg", tmp_path / "photo.jpg")
    here = live_server.url
    run = {"cwd": tmp_path, "capture_output": True, "text": True, "timeout": 120, "check": False}
    curl = subprocess.run(["bash", "-c", shell.replace("http://127.0.0.1:7860", here)], **run)
    answers, rest, decoder = [], curl.stdout.strip(), json.JSONDecoder()
    while rest:  # curl prints each answer without a newline after it
        answer, end = decoder.raw_decode(rest)
        answers.append(answer)
        rest = rest[end:].strip()
    assert curl.returncode == 0 and [len(a["hits"]) for a in answers[:2]] == [5, 5], curl.stdout[-2000:]
    assert answers[1]["hits"][0]["file"] == "images/p005.jpg"
    assert answers[2]["offset"] == 5 and all(h["score"] >= 0.1 for h in answers[2]["hits"])
    (tmp_path / "rest.py").write_text(code.replace("http://127.0.0.1:7860", here))
    out = subprocess.run([sys.executable, "rest.py"], **run)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].split()[-2:] == ["gen-000001", "5"] and len(lines) == 1 + 5 + 1
    assert all(" images/p0" in line and "/api/v1/items/" in line for line in lines[1:6])
    assert lines[-1] == "images/p005.jpg ['pattern number 5']"
