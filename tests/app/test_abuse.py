"""Abuse of a live server: anonymous or hostile indexing, writing endpoints, rates, memory, upload cache.

Two real ``python -m app`` servers: a public one (no ``--admin``) over a built index, and an admin one
behind a login over an empty index. Page events are called the way the browser calls them (upload, then
``/gradio_api/queue/join`` with the event's ``fn_index`` and the component values), so private events
are exercised too. Memory is read from ``/proc/<pid>/status`` of the server process.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file

from app.upload_gate import REFUSED
from tests.app.live import build_index, make_catalog, start_server, stop
from tests.conftest import pattern_image

USER = ("ops", "s3cret-pass")


class Server:
    def __init__(self, url: str, proc, log: Path) -> None:  # type: ignore[no-untyped-def]
        self.url, self.proc, self.log = url, proc, log
        self.http = httpx.Client(base_url=url, timeout=60)

    def login(self, user: tuple[str, str]) -> httpx.Response:
        return self.http.post("/login", data={"username": user[0], "password": user[1]})

    def upload(self, *paths: Path) -> httpx.Response:
        files = [("files", (p.name, p.read_bytes())) for p in paths]
        return self.http.post("/gradio_api/upload", files=files)

    def fn_index(self, label: str) -> int:
        """The event triggered by clicking the button labelled ``label``."""
        config = self.http.get("/config").json()
        ids = {c["id"] for c in config["components"] if c.get("props", {}).get("value") == label}
        for i, dep in enumerate(config["dependencies"]):
            if any(target[0] in ids for target in dep["targets"]):
                return dep.get("id", i)
        raise AssertionError(f"no event for {label!r}")

    def call(self, fn_index: int, data: list, session: str = "abuse") -> dict:
        """Run one event as the browser does; the ``process_completed`` message (``success``, ``output``)."""
        joined = self.http.post(
            "/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session}
        )
        if joined.status_code != 200:
            return {"success": False, "status": joined.status_code, "output": {"error": joined.text}}
        with self.http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    message = json.loads(line[5:])
                    if message.get("msg") == "process_completed":
                        return message
        raise AssertionError("the event stream ended without a result")

    def memory(self) -> dict[str, int]:
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
        return fields


def file_data(path: str) -> dict:
    return {"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": os.path.basename(path)}


def error_of(result: dict) -> str:
    assert not result.get("success"), result
    return str((result.get("output") or {}).get("error"))


@pytest.fixture(scope="module")
def public(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Iterator[Server]:
    """No --admin; 1 MB upload cap (the issue's setting), uploads not rate-limited (the burst below)."""
    root = tmp_path_factory.mktemp("public")
    build_index(make_catalog(root / "catalog"), root / "index", clip_path)
    url, proc = start_server(
        root / "index", root / "server.log", "--max-upload-mb", "1", "--rate-uploads", "0"
    )
    try:
        yield Server(url, proc, root / "server.log")
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def admin(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Iterator[Server]:
    """--admin behind a login, over no index yet, with small caps and rates so each is reached."""
    root = tmp_path_factory.mktemp("admin")
    flags = ["--admin", "--auth", ":".join(USER), "--model", str(clip_path), "--max-index-files", "3"]
    flags += ["--max-index-mb", "0.05", "--rate-writes", "5", "--rate-logins", "4"]
    url, proc = start_server(root / "index", root / "server.log", *flags)
    try:
        yield Server(url, proc, root / "server.log")
    finally:
        stop(proc)


def photos(folder: Path, count: int, size: tuple[int, int] = (96, 72)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        pattern_image(100 + i, size).save(folder / f"new{i}.png")
        out.append(folder / f"new{i}.png")
    return out


def test_anonymous_indexing_and_writing_endpoints_are_refused(public: Server, tmp_path: Path) -> None:
    index_event = public.fn_index("Index these photos")
    uploaded = public.upload(*photos(tmp_path, 1)).json()
    result = public.call(index_event, [[file_data(uploaded[0])], None])
    assert "indexing from the page is disabled: start the app with --admin" in error_of(result)
    # a server path never reaches the event: the upload gate refuses it first (test_query_files.py)
    assert REFUSED in error_of(public.call(index_event, [[file_data("/etc/passwd")], None]))
    client = Client(public.url, verbose=False, download_files=False)
    for endpoint in ("/check_drift", "/start_reindex"):
        with pytest.raises(Exception, match="start the app with --admin"):
            client.predict(api_name=endpoint)
    assert client.predict(api_name="/drift_status")["latest"] is None  # reading stays public; nothing written


def test_admin_indexing_takes_only_real_uploads_within_caps_at_a_limited_rate(
    admin: Server, tmp_path: Path
) -> None:
    anonymous = httpx.post(f"{admin.url}/gradio_api/upload", files=[("files", ("a.png", b"x"))])
    assert anonymous.status_code == 401  # --auth: nothing without the login
    assert admin.login(USER).status_code == 200
    index_event, start = admin.fn_index("Index these photos"), time.monotonic()
    small = [admin.upload(p).json()[0] for p in photos(tmp_path / "small", 4)]
    big = admin.upload(photos(tmp_path / "big", 1, (600, 400))[0]).json()[0]  # ~0.3 MB > 0.05 MB in all

    outside = error_of(admin.call(index_event, [[file_data("/etc/passwd")], None]))
    assert REFUSED in outside
    assert "index at most 3 at once" in error_of(
        admin.call(index_event, [[file_data(p) for p in small], None])
    )
    assert "exceed 0.05 MB in all" in error_of(admin.call(index_event, [[file_data(big)], None]))
    done = admin.call(index_event, [[file_data(p) for p in small[:2]], None])
    assert done.get("success"), done
    assert "Indexed **2** new photos" in json.dumps(done["output"])
    client = Client(admin.url, auth=USER, verbose=False, download_files=False)
    assert client.predict(api_name="/check_drift")["generation"]  # the fifth write of this minute
    extra = 0  # 5 a minute: one token back every 12 s, so only the ones refilled meanwhile pass
    while True:
        try:
            client.predict(api_name="/check_drift")
        except Exception as exc:
            assert "too many write requests from this client: try again in" in str(exc)
            break
        extra += 1
        assert extra <= (time.monotonic() - start) / 12 + 1, "writes were not rate-limited"


def test_logins_are_rate_limited_with_a_json_429(admin: Server) -> None:
    start, answers = time.monotonic(), []
    for _ in range(12):  # 4 a minute: the first failures are 400s, then 429 (even for the right password)
        answers.append(httpx.post(f"{admin.url}/login", data={"username": "ops", "password": "guess"}))
        if answers[-1].status_code == 429:
            break
    allowed = 4 + int((time.monotonic() - start) / 15) + 1  # tokens refilled while this ran
    assert answers[-1].status_code == 429 and len(answers) <= allowed, [a.status_code for a in answers]
    body = answers[-1].json()
    assert "too many login requests" in body["error"] and body["retry_after"] >= 1
    assert int(answers[-1].headers["retry-after"]) == body["retry_after"]
    denied = httpx.post(f"{admin.url}/login", data={"username": USER[0], "password": USER[1]})
    assert denied.status_code == 429


def _png_header_and_rows(width: int, height: int) -> bytes:
    """A valid RGB PNG of one colour: width*height pixels in a few hundred KB."""
    compressor, rows = zlib.compressobj(9), []
    row = b"\x00" + b"\x00" * (3 * width)
    chunk = row * 64
    for _ in range(height // 64):
        rows.append(compressor.compress(chunk))
    rows.append(compressor.compress(row * (height % 64)) + compressor.flush())
    idat = b"".join(rows)

    def block(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload)
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + block(b"IHDR", header) + block(b"IDAT", idat) + block(b"IEND", b"")


def test_a_burst_of_large_pixel_uploads_keeps_memory_bounded(public: Server, tmp_path: Path) -> None:
    huge, large = tmp_path / "huge.png", tmp_path / "large.png"
    huge.write_bytes(_png_header_and_rows(9950, 9950))  # 99 MP, ~300 KB: under the 1 MB cap
    large.write_bytes(_png_header_and_rows(7200, 5400))  # 38.9 MP: under the query pixel limit
    assert huge.stat().st_size < 1_000_000 and large.stat().st_size < 1_000_000
    client = Client(public.url, verbose=False, download_files=False)
    client.predict("warm up", 2, {}, api_name="/search_text")
    before = public.memory()
    peak, stop_sampling = [before["VmRSS"]], threading.Event()

    def sample() -> None:
        while not stop_sampling.is_set():
            peak.append(public.memory()["VmRSS"])
            stop_sampling.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    jobs = [client.submit(handle_file(str(p)), 3, {}, api_name="/search_image") for p in [huge, large] * 6]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(len(job.result(timeout=300)["hits"]))
        except Exception as exc:
            outcomes.append(str(exc))
    stop_sampling.set()
    sampler.join()
    after_burst = public.memory()
    grown = max(max(peak), after_burst["VmHWM"] if after_burst["VmHWM"] > before["VmHWM"] else 0)
    assert outcomes.count(3) == 6, outcomes  # every 38.9 MP photo was searched
    refused = [o for o in outcomes if o != 3]
    assert all("too many pixels: 9950x9950 (99 MP) exceeds the limit of 40 MP" in o for o in refused), refused
    assert grown - before["VmRSS"] < 600 * 2**20, (before, grown)
    deadline, rss = time.monotonic() + 60, after_burst["VmRSS"]
    while rss - before["VmRSS"] > 150 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.5)
        rss = public.memory()["VmRSS"]
    assert rss - before["VmRSS"] < 150 * 2**20, (before, rss)
