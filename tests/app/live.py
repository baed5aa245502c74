"""Live-server fixtures shared by the API tests and the browser test.

A small real catalog (24 pattern JPEGs with captions and ``color``/``shop`` metadata in a CSV manifest)
is indexed with the tiny random CLIP checkpoint, then ``python -m app`` is started as a real subprocess
on a free port, exactly as a user would, and torn down after the session. Server logs go to a file whose
tail is shown when startup fails.
"""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, pattern_image

COLORS = ("red", "blue", "green")


@dataclass
class LiveServer:
    url: str
    index: Path
    catalog: Path
    model: Path
    log: Path
    process: subprocess.Popen
    uploads: Path  # the server's own GRADIO_TEMP_DIR: its upload cache, for tests to inspect

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_catalog(root: Path, count: int = 24, start: int = 0) -> Path:
    """A CSV manifest catalog: ``images/pNN.jpg`` with a caption, ``color`` and ``shop`` per row."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(start, start + count):
        pattern_image(i).save(root / "images" / f"p{i:03d}.jpg", quality=90)
        rows.append(
            {
                "image": f"images/p{i:03d}.jpg",
                "caption": f"pattern number {i}",
                "color": COLORS[i % 3],
                "shop": f"shop{i % 2}",
            }
        )
    manifest = root / "captions.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def build_index(manifest: Path, index: Path, model: Path) -> None:
    """In-process build the way the indexer builds (reference sample included)."""
    from vitrine.catalog.readers import open_catalog
    from vitrine.open_index import load_encoder, open_for_build, run_build

    encoder = load_encoder(index, str(model), device="cpu", batch_size=16)
    store = open_for_build(index, encoder)
    try:
        run_build(store, encoder, open_catalog(manifest))
    finally:
        store.close()


def start_server(
    index: Path, log: Path, *extra: str, timeout: float = 90.0, env: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen]:
    """``python -m app`` on a free port; returns once ``/healthz`` answers (200 or 503). ``env`` adds
    environment variables (``GRADIO_TEMP_DIR``: a private upload folder a test can inspect)."""
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GRADIO_ANALYTICS_ENABLED": "False",
        **(env or {}),
    }
    cmd = [
        sys.executable,
        "-m",
        "app",
        "--index",
        str(index),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--refresh-seconds",
        "0.5",
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2)
            return url, proc
        except urllib.error.HTTPError:
            return url, proc  # 503: up, but no index yet
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start in {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Iterator[LiveServer]:
    """One server over a 24-item index for the whole session (model and index load once)."""
    root = tmp_path_factory.mktemp("live")
    manifest = make_catalog(root / "catalog")
    build_index(manifest, root / "index", clip_path)
    log, uploads = root / "server.log", root / "uploads"
    uploads.mkdir()
    # Many tests share this server from one address: its upload rate is not limited (test_abuse.py and
    # test_limits.py check the limits on their own servers).
    env = {"GRADIO_TEMP_DIR": str(uploads)}
    url, proc = start_server(root / "index", log, "--rate-uploads", "0", env=env)
    try:
        yield LiveServer(url, root / "index", root / "catalog", clip_path, log, proc, uploads)
    finally:
        stop(proc)
