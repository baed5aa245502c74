"""A server started before its index exists: it says how to build one, then picks up builds made by a
separate ``python -m indexer build`` process, without a restart and without failing requests in flight.
The same server runs with ``--auth`` to show the API needs the login while /healthz stays open."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError, AuthenticationError

from tests.app.live import make_catalog, start_server, stop
from tests.conftest import REPO

AUTH = ("curator", "s3cret-pass")


def healthz(url: str) -> dict:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        assert exc.code == 503
        return json.loads(exc.read())


def indexer_build(manifest: Path, index: Path, model: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        str(manifest),
        "--index",
        str(index),
        "--model",
        str(model),
        "--no-progress",
        "--device",
        "cpu",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, timeout=120)


def wait_for(condition, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.25)


def test_index_appears_and_grows_without_restart(tmp_path: Path, clip_path: Path) -> None:
    index = tmp_path / "index"
    url, proc = start_server(index, tmp_path / "server.log", "--auth", ":".join(AUTH))
    try:
        body = healthz(url)
        assert not body["ok"] and "python -m indexer build" in body["reason"]
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            Client(url, verbose=False).predict("x", 3, {}, api_name="/search_text")
        client = Client(url, auth=AUTH, verbose=False, download_files=False)
        with pytest.raises(AppError, match="no index at"):
            client.predict("a red pattern", 3, {}, api_name="/search_text")

        indexer_build(make_catalog(tmp_path / "first", count=12), index, clip_path)
        wait_for(lambda: healthz(url).get("count") == 12)
        assert len(client.predict("pattern", 20, {}, api_name="/search_text")["hits"]) == 12

        failures: list[str] = []
        answered = [0]
        stop_flag = threading.Event()

        def traffic() -> None:
            c = Client(url, auth=AUTH, verbose=False, download_files=False)
            while not stop_flag.is_set():
                try:
                    c.predict("pattern number 3", 5, {"color": "red"}, api_name="/search_text")
                    answered[0] += 1
                except Exception as exc:
                    failures.append(str(exc))

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            second = make_catalog(tmp_path / "second", count=12, start=100)
            indexer_build(second, index, clip_path)
            wait_for(lambda: healthz(url).get("count") == 24)
        finally:
            stop_flag.set()
            worker.join(timeout=30)
        assert failures == [] and answered[0] > 0
        hits = client.predict("pattern", 24, {}, api_name="/search_text")["hits"]
        assert sum(str((tmp_path / "second").resolve()) in h["key"] for h in hits) == 12
        metrics = httpx.get(url + "/metrics").text  # open without the login, like /healthz
        refreshes = re.search(r"^vitrine_index_refreshes_total (\S+)$", metrics, flags=re.M)
        assert refreshes and float(refreshes.group(1)) >= 2
    finally:
        stop(proc)
