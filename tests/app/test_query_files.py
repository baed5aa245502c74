"""The server reads no file a client names: query images are uploads only, pictures are indexed items only.

One server of its own (``--auth``, a private ``GRADIO_TEMP_DIR`` so its upload cache can be inspected)
over a manifest catalog with one absolute row outside the catalog folder, beside a secret JPEG that is
not indexed: under the old "allowed roots" rule that row widened the servable roots to their common
parent, which holds the secret. Everything is spoken over raw HTTP (tests/app/raw.py), as an attacker
would, after logging in.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from app.upload_gate import REFUSED
from tests.app.live import build_index, make_catalog, start_server, stop
from tests.app.raw import call_api, dependencies, join_queue

AUTH = ("tester", "s3cret-pass")


@dataclass
class Server:
    root: Path
    url: str
    process: subprocess.Popen
    uploads: Path  # the server's GRADIO_TEMP_DIR: its upload cache
    secret: Path  # a JPEG that is not indexed
    outside: Path  # the manifest's absolute row, outside the catalog folder

    def cached(self) -> list[str]:
        return sorted(str(p.relative_to(self.uploads)) for p in self.uploads.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("files")
    manifest = make_catalog(root / "shop" / "catalog", count=6)
    outside, secret = root / "elsewhere" / "outside.jpg", root / "secret.jpg"
    outside.parent.mkdir()
    Image.new("RGB", (64, 48), (10, 200, 10)).save(outside)
    Image.new("RGB", (64, 48), (250, 0, 250)).save(secret)
    with manifest.open("a", newline="") as f:  # one absolute row elsewhere: the old guard's roots → root
        csv.writer(f).writerow([str(outside), "an outside row", "red", "shop0"])
    build_index(manifest, root / "index", clip_path)
    uploads = root / "uploads"
    uploads.mkdir()
    os.mkfifo(root / "fifo.jpg")
    url, proc = start_server(
        root / "index", root / "server.log", "--auth", ":".join(AUTH), env={"GRADIO_TEMP_DIR": str(uploads)}
    )
    try:
        yield Server(root, url, proc, uploads, secret, outside)
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        response = client.post(f"{server.url}/login", data={"username": AUTH[0], "password": AUTH[1]})
        assert response.status_code == 200, response.text
        yield client


def healthy_within(url: str, seconds: float) -> bool:
    """/healthz answers 200 before the deadline (each try has its own short timeout)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
    return False


def file_data(path: str, marked: bool) -> dict:
    meta = {"meta": {"_type": "gradio.FileData"}} if marked else {}
    return {"path": path, **meta}


def hostile_paths(server: Server) -> list[str]:
    catalog_photo = server.root / "shop" / "catalog" / "images" / "p001.jpg"
    return [
        "/etc/passwd",
        "/nonexistent/x.jpg",
        str(catalog_photo),
        str(server.secret),
        str(server.root),
        f"{server.uploads}/../secret.jpg",
        "http://127.0.0.1:9/x.jpg",
        "",
    ]


@pytest.mark.parametrize("marked", [True, False], ids=["filedata", "no-meta"])
@pytest.mark.parametrize("api", ["search_image", "search"])
def test_server_paths_are_refused_with_one_message_and_nothing_is_cached(
    server: Server, http: httpx.Client, api: str, marked: bool
) -> None:
    before = server.cached()
    for path in hostile_paths(server):
        image = file_data(path, marked)
        data = [image, 3, {}] if api == "search_image" else [image, "pattern", 0.5, 3, {}]
        outcome = call_api(http, server.url, api, data)
        assert not outcome.ok and outcome.error == REFUSED, (path, outcome)
    assert server.cached() == before


@pytest.mark.parametrize("special", ["/dev/zero", "fifo.jpg"])
def test_devices_and_fifos_are_refused_without_reading_and_the_server_keeps_answering(
    server: Server, http: httpx.Client, special: str
) -> None:
    path = special if special.startswith("/") else str(server.root / special)
    before = server.cached()
    outcomes: list = []
    posting = threading.Thread(
        target=lambda: outcomes.append(
            call_api(http, server.url, "search_image", [file_data(path, True), 3, {}])
        )
    )
    posting.start()
    assert healthy_within(server.url, 10), "the server stopped answering /healthz"
    posting.join(timeout=30)
    assert outcomes and outcomes[0].error == REFUSED, outcomes
    assert healthy_within(server.url, 5)
    assert server.cached() == before


def test_a_real_upload_is_searched(server: Server, http: httpx.Client) -> None:
    photo = server.root / "shop" / "catalog" / "images" / "p002.jpg"
    with photo.open("rb") as f:
        response = http.post(f"{server.url}/gradio_api/upload", files={"files": f}, timeout=30)
    uploaded = response.json()[0]
    outcome = call_api(http, server.url, "search_image", [file_data(uploaded, True), 3, {}])
    assert outcome.ok and outcome.output[0]["hits"][0]["captions"] == ["pattern number 2"], outcome


def render_fn(http: httpx.Client, url: str) -> int:
    """The private event that draws a result: the JSON result (then the query body, the photo and the
    hits already shown) in, the gallery (and more) out."""
    deps, comps = dependencies(http, url)
    for dep in deps:
        types = [comps[i]["type"] for i in dep["outputs"]]
        if [comps[i]["type"] for i in dep["inputs"]][:1] == ["json"] and types[:1] == ["gallery"]:
            return dep["fn_index"]
    raise AssertionError("no render event in /config")


def test_render_event_shows_indexed_items_by_key_only(server: Server, http: httpx.Client) -> None:
    indexed = str(server.outside.resolve())  # the absolute row: served, but it opens nothing else
    forged = {
        "hits": [
            {"key": "/etc/passwd", "path": "/etc/passwd", "score": 1.0, "captions": ["x"], "metadata": {}},
            {
                "key": str(server.secret),
                "path": str(server.secret),
                "score": 0.9,
                "captions": [],
                "metadata": {},
            },
            {"key": indexed, "path": str(server.secret), "score": 0.5, "captions": [], "metadata": {}},
        ],
        "took_ms": 1.0,
        "model_version": "m",
        "generation": "g",
    }
    outcome = join_queue(http, server.url, render_fn(http, server.url), [forged, {}, None, []])
    assert outcome.ok, outcome
    gallery, status, table = outcome.output[:3]
    assert len(gallery) == 1 and gallery[0]["caption"] == "0.500 · an outside row", gallery
    assert "1 matches" in status and "passwd" not in table and "secret" not in table
    picture = http.get(f"{server.url}/gradio_api/file={gallery[0]['image']['path']}")
    assert Image.open(io.BytesIO(picture.content)).convert("RGB").getpixel((8, 8))[1] > 150


def test_item_images_are_exactly_the_indexed_items(server: Server, http: httpx.Client) -> None:
    def image(key: str, **params: str) -> httpx.Response:
        return http.get(f"{server.url}/api/v1/items/{key.replace('/', '%2F')}/image", params=params)

    assert image(str(server.outside.resolve())).headers["content-type"] == "image/jpeg"
    for key in (str(server.secret), "/etc/passwd", str(server.root / "shop"), "../../etc/passwd"):
        response = image(key)
        assert response.status_code == 404 and response.json()["error"] == "no such item", key
    photo = str((server.root / "shop" / "catalog" / "images" / "p003.jpg").resolve())
    assert Image.open(io.BytesIO(image(photo, size="5000").content)).size[0] <= 1024
    assert Image.open(io.BytesIO(image(photo, size="1").content)).size[0] == 16


def test_item_images_need_the_login_when_auth_is_set(server: Server) -> None:
    url = f"{server.url}/api/v1/items/{str(server.outside.resolve()).replace('/', '%2F')}/image"
    assert httpx.get(url).status_code == 401
    wrong = base64.b64encode(b"tester:nope").decode()
    assert httpx.get(url, headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    right = base64.b64encode(":".join(AUTH).encode()).decode()
    assert httpx.get(url, headers={"Authorization": f"Basic {right}"}).status_code == 200
