"""Catalog files that are not regular files, or are too large, are refused before any read (item 8).

Each case runs ``read_source`` in a child process with a deadline and a 2 GB address-space cap: the old
code blocked forever on a FIFO and read ``/dev/zero`` until memory ran out, so a regression fails here by
timeout or MemoryError instead of hanging or starving the test run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO
from tests.hostile import jpeg_bytes, pattern
from vitrine.catalog.readers import open_catalog

DEADLINE_S = 60
_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from vitrine.catalog.readers import read_source
from vitrine.errors import ImageDecodeError
try:
    data = read_source(sys.argv[1], int(sys.argv[2]))
    print(json.dumps({"bytes": len(data)}))
except ImageDecodeError as exc:
    print(json.dumps({"reason": exc.reason}))
"""


def read_in_child(path: Path | str, max_bytes: int = 1 << 20) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path), str(max_bytes)],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


@pytest.fixture()
def specials(tmp_path: Path) -> dict[str, Path]:
    fifo = tmp_path / "waiting.jpg"
    os.mkfifo(fifo)
    link = tmp_path / "zeros.jpg"
    link.symlink_to("/dev/zero")
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    return {"fifo": fifo, "dev_zero": Path("/dev/zero"), "link": link, "folder": folder}


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("fifo", "not a regular file (a FIFO)"),
        ("dev_zero", "not a regular file (a character device)"),
        ("link", "not a regular file (a character device)"),
        ("folder", "not a regular file (a directory)"),
    ],
)
def test_special_files_are_refused_without_reading(specials: dict[str, Path], name: str, reason: str) -> None:
    assert read_in_child(specials[name]) == {"reason": reason}


def test_unix_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.jpg"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert read_in_child(path) == {"reason": "not a regular file (a socket)"}


def test_file_over_the_size_limit_is_refused_and_under_it_is_read(tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(jpeg_bytes(Image.fromarray(pattern(64, 48, 1))))
    size = photo.stat().st_size
    assert read_in_child(photo, size) == {"bytes": size}
    reason = read_in_child(photo, size - 1)["reason"]
    assert reason.startswith("file too large") and "max-file-mb" in reason


def test_a_fifo_given_as_manifest_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "list.csv"
    os.mkfifo(fifo)
    code = "import sys; from vitrine.catalog.readers import open_catalog; open_catalog(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=DEADLINE_S, env=env
    )
    assert "is neither a folder nor a regular file" in out.stderr


def test_folder_catalog_lists_a_fifo_so_the_build_records_it(specials: dict[str, Path]) -> None:
    keys = {r.key for r in open_catalog(specials["fifo"].parent)}
    # attempted, then recorded as failures with a reason; a symlink's key is its resolved target
    assert {str(specials["fifo"].resolve()), "/dev/zero"} <= keys


def test_ray_read_stage_refuses_special_files_too(specials: dict[str, Path]) -> None:
    """The distributed build's read stage (``PixelPrep.one``, run inside Ray workers) shares the rule."""
    code = (
        "import json, resource, sys; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); "
        "from vitrine.build.shards import PixelPrep; "
        "print(json.dumps([PixelPrep(None, None, None).one(p, 0)['reason'] for p in sys.argv[1:]]))"
    )
    paths = [str(specials[name]) for name in ("fifo", "link")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=DEADLINE_S, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == [
        "not a regular file (a FIFO)",
        "not a regular file (a character device)",
    ]
