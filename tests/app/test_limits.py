"""The server's limits in-process: rate buckets, the pixel budget, received-upload checks, and the mounted
app's upload handling (429 / 411 / 413 before Gradio reads a byte; uploads deleted once their TTL passes).

The ASGI app is the real one (``create_app`` over a service with no index, no model needed), driven by
Starlette's TestClient, which runs its lifespan (and so Gradio's cache cleaning) as uvicorn would.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.memory import PixelBudget, trim
from app.ratelimit import RateLimited, RateLimiter, Rates
from app.server import ServerSettings, create_app
from app.service import SearchService, ServiceSettings
from app.uploads import UploadRefused, received_upload


def test_token_bucket_allows_a_minutes_worth_then_refills_per_client() -> None:
    now = [1000.0]
    limiter = RateLimiter(Rates(upload=3, login=0, write=6), clock=lambda: now[0])
    for _ in range(3):
        limiter.take("upload", "10.0.0.1")
    with pytest.raises(RateLimited, match="too many upload requests from this client: try again in 20 s"):
        limiter.take("upload", "10.0.0.1")
    limiter.take("upload", "10.0.0.2")  # another client has its own bucket
    for _ in range(50):
        limiter.take("login", "10.0.0.1")  # 0: unlimited
    now[0] += 20.0  # 3 per minute: one token back every 20 s
    limiter.take("upload", "10.0.0.1")
    with pytest.raises(RateLimited) as info:
        limiter.take("upload", "10.0.0.1")
    assert info.value.reason == "rate_limited" and info.value.retry_after == pytest.approx(20.0)


def test_pixel_budget_runs_small_decodes_together_and_a_large_one_alone() -> None:
    budget, inside, most, lock = PixelBudget(10, trim_pixels=10**9), [0], [0], threading.Lock()

    def work(pixels: int) -> None:
        with budget.hold(pixels):
            with lock:
                inside[0] += pixels
                most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= pixels

    threads = [threading.Thread(target=work, args=(p,)) for p in [3, 3, 3, 9, 9, 50, 2, 2]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert most[0] <= 50 and budget.in_use == 0  # 50 > total: it ran, alone
    assert isinstance(trim(), bool)


def test_only_regular_files_the_server_received_are_uploads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "abc").mkdir(parents=True)
    real = cache / "abc" / "photo.jpg"
    real.write_bytes(b"x")
    link = cache / "abc" / "link.jpg"
    link.symlink_to("/etc/passwd")
    fifo = cache / "abc" / "pipe.jpg"
    os.mkfifo(fifo)
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(b"x")
    received = {str(real), str(link), str(fifo), str(outside)}
    assert received_upload(str(real), received, str(cache)) == str(real)
    refusals = {
        "/etc/passwd": "not a file uploaded to this server",
        str(link): "not a regular file",
        str(fifo): "not a regular file",  # never opened: lstat only
        str(outside): "outside the upload folder",
        str(cache / "abc" / "gone.jpg"): "not a file uploaded",
    }
    for path, reason in refusals.items():
        with pytest.raises(UploadRefused, match=reason):
            received_upload(path, received, str(cache))
    with pytest.raises(UploadRefused, match="expected an uploaded file, got dict"):
        received_upload({"path": str(real)}, received, str(cache))
    real.unlink()
    with pytest.raises(UploadRefused, match="the upload is gone"):
        received_upload(str(real), received, str(cache))


@pytest.fixture()
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, SearchService]]:
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    settings = ServiceSettings(
        index=str(tmp_path / "none"), refresh_seconds=0, max_upload_mb=0.01, rates=Rates(upload=4)
    )
    service = SearchService(settings)
    app = create_app(service, ServerSettings(upload_ttl_minutes=1 / 60))  # deleted after ~1 s
    try:
        with TestClient(app) as client:
            yield client, service
    finally:
        service.close()


def test_uploads_are_capped_rate_limited_and_deleted_after_their_ttl(
    server: tuple[TestClient, SearchService],
) -> None:
    client, service = server
    first = client.post("/gradio_api/upload", files=[("files", ("a.jpg", b"photo bytes"))])
    assert first.status_code == 200
    path = first.json()[0]
    assert service.uploads.check(path) == path and Path(path).read_bytes() == b"photo bytes"

    chunked = client.post("/gradio_api/upload", content=iter([b"--x\r\n"]), headers={"content-type": "x"})
    assert chunked.status_code == 411 and "Content-Length" in chunked.json()["error"]
    huge = client.post("/gradio_api/upload", files=[("files", ("b.jpg", b"0" * (1100 * 1024)))])
    assert huge.status_code == 413 and "upload request over the" in huge.json()["error"]
    assert client.post("/gradio_api/upload", files=[("files", ("c.jpg", b"c"))]).status_code == 200
    limited = client.post("/gradio_api/upload", files=[("files", ("d.jpg", b"d"))])
    assert limited.status_code == 429  # 4 a minute: the next token comes within 15 s
    wait = limited.json()["retry_after"]
    assert 1 <= wait <= 15 and limited.headers["retry-after"] == str(wait)
    assert limited.json()["error"] == f"too many upload requests from this client: try again in {wait} s"

    deadline = time.monotonic() + 30
    while Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(path).exists(), "the upload outlived its TTL"
    with pytest.raises(UploadRefused, match="not a file uploaded to this server"):
        service.uploads.check(path)
