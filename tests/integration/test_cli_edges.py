"""Small CLI contract edges of issue 11 (item 14): closed pipes, a photo folder as ``--index``,
filter keys containing ``=``, and one file listed by two catalogs."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, pattern_image
from tests.integration.test_indexer_cli import indexer


@pytest.fixture(scope="module")
def small_index(tmp_path_factory: pytest.TempPathFactory, clip_path: Path) -> Path:
    root = tmp_path_factory.mktemp("edges")
    (root / "photos").mkdir()
    rows = []
    for i in range(4):
        pattern_image(i).save(root / "photos" / f"p{i}.jpg")
        rows.append({"image": f"photos/p{i}.jpg", "caption": f"pattern {i}", "a=b": "x" if i % 2 else "y"})
    with (root / "list.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    model = ["--model", str(clip_path), "--no-progress"]
    indexer("build", str(root / "list.csv"), "--index", str(root / "index"), *model)
    return root / "index"


def test_status_into_a_closed_pipe_exits_quietly(small_index: Path) -> None:
    """``status --json | head -c 10``: the reader is gone before the output is written."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "indexer", "status", "--index", str(small_index), "--json"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env)
    proc.stdout.close()  # no reader left: the first write fails with EPIPE, deterministically
    _, err = proc.communicate(timeout=120)
    assert err.decode() == "" and proc.returncode == 1


def test_photo_folder_given_as_index_is_refused_untouched(clip_path: Path, photo_folder: Path) -> None:
    target = photo_folder / "red"
    before = sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir())
    args = ["--index", str(target), "--model", str(clip_path)]
    out = indexer("build", str(photo_folder / "blue"), *args, check=False)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"error: --index {target} is an existing folder that is not a Vitrine index "
        "(it holds img_01.jpg, img_03.jpg, img_05.jpg, ...); give a new or empty folder"
    ]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in target.iterdir()) == before


def test_filter_on_a_key_containing_equals_as_json(small_index: Path) -> None:
    def search(*filters: str) -> list[dict]:
        args = ["--text", "pattern", "-k", "10", "--json", "--filter", *filters]
        return json.loads(indexer("search", "--index", str(small_index), *args).stdout)["hits"]

    hits = search('{"a=b": "x"}')
    assert len(hits) == 2 and all(h["metadata"]["a=b"] == "x" for h in hits)
    assert {h["metadata"]["a=b"] for h in search('{"a=b": "y"}')} == {"y"}
    out = indexer(
        "search", "--index", str(small_index), "--text", "p", "--filter", '{"a=b": [1]}', check=False
    )
    assert out.returncode == 1 and "must have a single text, number or boolean value" in out.stderr
