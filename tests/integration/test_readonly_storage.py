"""An index on read-only storage is served, and a build on a full disk fails cleanly (issue 11, item 12).

Real mounts, because the tests run as root and ``chmod`` alone stops no root process: a small tmpfs is
mounted, an index built into it, then the mount is remounted read-only (or filled up). Where mounting is
not permitted (no root, a restricted container), the tests skip and say why.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.app.live import build_index, make_catalog, start_server, stop
from tests.conftest import pattern_image
from tests.integration.test_indexer_cli import indexer


class Mount:
    """A tmpfs mounted at ``path``; ``remount("ro")`` makes it read-only for root too."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]
        out = subprocess.run(command, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.strip() or out.returncode}): needs root")

    def remount(self, mode: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True, timeout=30)

    def fill(self) -> None:
        """Use up every free block, so the next write fails with ENOSPC."""
        with contextlib.suppress(OSError), open(self.path / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * (1 << 16))
        with contextlib.suppress(OSError), open(self.path / "filler-tail", "wb") as fh:
            while True:
                fh.write(b"\0" * 512)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], capture_output=True, timeout=30)


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Callable]:
    mounts: list[Mount] = []

    def make(size: str = "64m") -> Mount:
        mounts.append(Mount(tmp_path / f"mnt{len(mounts)}", size))
        return mounts[-1]

    yield make
    for m in mounts:
        m.unmount()


def _assert_readable(index: Path) -> None:
    status = json.loads(indexer("status", "--index", str(index), "--json").stdout)
    assert status["count"] == 24 and status["failed"] == []
    hits = json.loads(
        indexer("search", "--index", str(index), "--text", "pattern", "-k", "3", "--json").stdout
    )
    assert len(hits["hits"]) == 3


def test_status_search_and_the_app_work_on_a_readonly_mount(tmpfs, clip_path: Path, tmp_path: Path) -> None:
    mount = tmpfs()
    manifest = make_catalog(tmp_path / "catalog")
    build_index(manifest, mount.path / "index", clip_path)
    mount.remount("ro")
    assert subprocess.run(["touch", str(mount.path / "probe")], capture_output=True).returncode != 0

    _assert_readable(mount.path / "index")
    url, proc = start_server(mount.path / "index", tmp_path / "server.log")
    try:
        from gradio_client import Client

        result = Client(url, verbose=False, download_files=False).predict(
            "pattern number 5", 5, {}, api_name="/search_text"
        )
        assert len(result["hits"]) == 5
    finally:
        stop(proc)


def test_readonly_mount_with_commits_left_in_the_wal_is_read_or_refused(
    tmpfs, clip_path: Path, tmp_path: Path
) -> None:
    """A writer killed before its checkpoint leaves commits in ``-wal``: with ``-shm`` beside it they are
    read (mode=ro); without it, the reader refuses with a reason instead of serving an older database."""
    import sqlite3

    from vitrine.errors import StoreError
    from vitrine.index.layout import connect

    mount = tmpfs("8m")
    db = mount.path / "meta.sqlite"
    code = (
        "import os, sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('PRAGMA journal_mode=WAL'); c.execute('PRAGMA wal_autocheckpoint=0'); "
        "c.execute('CREATE TABLE t(x)'); c.execute('INSERT INTO t VALUES (1)'); os._exit(0)"
    )
    subprocess.run(["python3", "-c", code, str(db)], check=True, timeout=60)
    assert Path(f"{db}-wal").stat().st_size > 0
    mount.remount("ro")
    conn = connect(db, readonly=True)
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    conn.close()  # an open file keeps the mount busy

    mount.remount("rw")
    Path(f"{db}-shm").unlink()
    mount.remount("ro")
    with pytest.raises(StoreError, match=r"write-ahead log meta\.sqlite-wal holds commits"):
        connect(db, readonly=True)
    with pytest.raises(sqlite3.Error):  # what immutable=1 alone would have served: no table at all
        sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True).execute("SELECT x FROM t")


def test_build_on_a_full_disk_fails_with_one_line_and_the_index_stays_readable(
    tmpfs, clip_path: Path, tmp_path: Path
) -> None:
    mount = tmpfs("64m")
    index = mount.path / "index"
    build_index(make_catalog(tmp_path / "catalog"), index, clip_path)
    more = tmp_path / "more"
    more.mkdir()
    for i in range(100, 140):
        pattern_image(i, (640, 480)).save(more / f"m{i}.png")
    mount.fill()

    out = indexer("build", str(more), "--index", str(index), "--no-progress", check=False)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1, out.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr
    assert "no space left on device" in lines[0], lines[0]
    _assert_readable(index)
