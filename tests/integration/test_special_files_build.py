"""Builds over catalogs naming special files finish, recording each as a failure with its reason (item 8).

The build runs as a real ``python -m indexer`` process with a deadline: before the fix a FIFO named
``*.jpg`` blocked it forever and ``/dev/zero`` was read until the kernel killed it, so a regression
fails by timeout here instead of hanging the suite.
"""

from __future__ import annotations

import csv
import json
import os
import socket
from pathlib import Path

from tests.conftest import pattern_image
from tests.integration.test_indexer_cli import indexer


def _build(catalog: Path, index: Path, model: Path, *extra: str) -> dict:
    args = ["--index", str(index), "--model", str(model), "--no-progress", "--json", *extra]
    out = indexer("build", str(catalog), *args)
    return json.loads(out.stdout)


def _failed(index: Path) -> dict[str, str]:
    status = json.loads(indexer("status", "--index", str(index), "--json").stdout)
    return {f["path"]: f["reason"] for f in status["failed"]}


def test_folder_with_a_fifo_and_device_links_is_indexed(clip_path: Path, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        pattern_image(i).save(photos / f"p{i}.jpg")
    os.mkfifo(photos / "waiting.jpg")
    (photos / "zeros.jpg").symlink_to("/dev/zero")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(photos / "sock.png"))
    try:
        report = _build(photos, tmp_path / "index", clip_path)
    finally:
        sock.close()
    assert report["added"] == 3 and report["failed"] == 3
    assert _failed(tmp_path / "index") == {
        str(photos / "waiting.jpg"): "not a regular file (a FIFO)",
        "/dev/zero": "not a regular file (a character device)",
        str(photos / "sock.png"): "not a regular file (a socket)",
    }


def test_manifest_rows_naming_devices_and_big_files_are_failures(clip_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "catalog"
    root.mkdir()
    pattern_image(1).save(root / "ok.jpg")
    pattern_image(2, (1200, 900)).save(root / "big.png")  # over the 0.1 MB limit given below
    os.mkfifo(root / "pipe.jpg")
    with (root / "list.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for name in ("ok.jpg", "big.png", "pipe.jpg", "/dev/zero", "/dev/urandom", str(root)):
            writer.writerow([name, f"row {name}"])
    report = _build(root / "list.csv", tmp_path / "index", clip_path, "--max-file-mb", "0.1")
    assert report["added"] == 1 and report["failed"] == 5
    failed = _failed(tmp_path / "index")
    assert failed[str(root / "pipe.jpg")] == "not a regular file (a FIFO)"
    assert failed["/dev/zero"] == failed["/dev/urandom"] == "not a regular file (a character device)"
    assert failed[str(root)] == "not a regular file (a directory)"
    assert failed[str(root / "big.png")].startswith("file too large: ")
