"""The indexer command line as scripts use it: real processes, a real tiny model, real files, real FAISS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, pattern_image
from tests.hostile import make_hostile_folder


def indexer(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = subprocess.run(
        [sys.executable, "-m", "indexer", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=full_env,
        timeout=300,
    )
    if check and out.returncode != 0:
        raise AssertionError(f"indexer {args} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
    return out


def as_json(out: subprocess.CompletedProcess) -> dict:
    return json.loads(out.stdout)


def test_build_status_search_remove_contract(clip_path, photo_folder, tmp_path):
    index = str(tmp_path / "index")
    report = as_json(
        indexer(
            "build",
            str(photo_folder),
            "--index",
            index,
            "--model",
            str(clip_path),
            "--batch-size",
            "4",
            "--no-progress",
            "--json",
        )
    )
    assert report["added"] == 12 and report["failed"] == 0 and report["count"] == 12

    status = as_json(indexer("status", "--index", index, "--json"))
    assert status["count"] == 12 and status["failed"] == []
    assert status["model"]["model"] == str(clip_path.resolve())
    assert {"model", "revision", "processor_hash", "dim", "id"} <= set(status["model"])

    query = photo_folder / "red" / "img_03.jpg"  # the index remembers its model: no --model needed
    hits = as_json(indexer("search", "--index", index, "--image", str(query), "-k", "3", "--json"))["hits"]
    assert hits[0]["path"] == str(query.resolve()) and hits[0]["score"] > 0.999
    assert {"key", "path", "score", "captions", "metadata"} <= set(hits[0])
    assert len(hits) == 3 and hits[0]["model"] == status["model"]["id"]

    filtered = as_json(
        indexer(
            "search", "--index", index, "--text", "stripes", "-k", "20", "--filter", "folder=blue", "--json"
        )
    )["hits"]
    assert len(filtered) == 6 and all(h["metadata"]["folder"] == "blue" for h in filtered)

    both = as_json(
        indexer(
            "search",
            "--index",
            index,
            "--text",
            "stripes",
            "--image",
            str(query),
            "--weight",
            "0.2",
            "--json",
        )
    )["hits"]
    assert both[0]["path"] == str(query.resolve())

    indexer("remove", "--index", index, str(photo_folder / "red"))
    assert as_json(indexer("status", "--index", index, "--json"))["count"] == 6


def test_rerun_changes_nothing_and_picks_up_changes(clip_path, photo_folder, tmp_path):
    index = str(tmp_path / "index")
    args = (
        "build",
        str(photo_folder),
        "--index",
        index,
        "--model",
        str(clip_path),
        "--no-progress",
        "--json",
    )
    as_json(indexer(*args))
    again = as_json(indexer(*args))
    assert (again["added"], again["updated"], again["unchanged"], again["count"]) == (0, 0, 12, 12)

    pattern_image(99).save(photo_folder / "blue" / "img_00.jpg")  # changed content
    pattern_image(100).save(photo_folder / "new.png")  # new file
    (photo_folder / "red" / "img_01.jpg").unlink()  # deleted file
    changed = as_json(indexer(*args))
    assert (changed["added"], changed["updated"], changed["removed"], changed["count"]) == (1, 1, 1, 12)


def test_hostile_folder_indexes_valid_files_and_lists_the_rest(clip_path, tmp_path):
    folder = tmp_path / "hostile"
    expected = make_hostile_folder(folder)
    index = str(tmp_path / "index")
    report = as_json(
        indexer("build", str(folder), "--index", index, "--model", str(clip_path), "--no-progress", "--json")
    )
    status = as_json(indexer("status", "--index", index, "--json"))
    failed = {Path(f["path"]).name: f["reason"] for f in status["failed"]}
    good = {n for n, ok in expected.items() if ok}
    assert set(failed) == set(expected) - good, failed
    assert all(reason for reason in failed.values())
    assert status["count"] == len(good) and report["failed"] == len(failed)


def test_wrong_model_is_refused_naming_both_fingerprints(clip_path, clip_path_other, photo_folder, tmp_path):
    index = str(tmp_path / "index")
    indexer("build", str(photo_folder), "--index", index, "--model", str(clip_path), "--no-progress")
    out = indexer(
        "build",
        str(photo_folder),
        "--index",
        index,
        "--model",
        str(clip_path_other),
        "--no-progress",
        check=False,
    )
    assert out.returncode == 1
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and "different model" in line
    ids = [
        json.loads(Path(index, g, "manifest.json").read_text())["fingerprint"]["id"]
        for g in [Path(index, "CURRENT").read_text().strip()]
    ]
    assert ids[0] in line
    searched = indexer(
        "search", "--index", index, "--text", "x", "--model", str(clip_path_other), check=False
    )
    assert searched.returncode == 1 and "different model" in searched.stderr


def test_offline_default_model_gives_one_clear_line(photo_folder, tmp_path):
    out = indexer(
        "build",
        str(photo_folder),
        "--index",
        str(tmp_path / "index"),
        "--no-progress",
        env={"HF_HUB_OFFLINE": "1", "VITRINE_MODEL": ""},
        check=False,
    )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "openai/clip-vit-base-patch32" in lines[0] and "VITRINE_MODEL" in lines[0]


def test_unwritable_index_directory_is_fatal(clip_path, photo_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = indexer(
        "build",
        str(photo_folder),
        "--index",
        str(blocker / "index"),
        "--model",
        str(clip_path),
        "--no-progress",
        check=False,
    )
    assert out.returncode == 1 and out.stderr.startswith("error:")


@pytest.mark.slow
def test_kill_during_build_then_rerun_gives_exactly_the_catalog(clip_path, tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(160):
        pattern_image(i, (64, 48)).save(folder / f"p{i:03d}.png")
    index = str(tmp_path / "index")
    cmd = [
        sys.executable,
        "-m",
        "indexer",
        "build",
        str(folder),
        "--index",
        index,
        "--model",
        str(clip_path),
        "--batch-size",
        "4",
        "--commit-every",
        "8",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    counts = []
    for delay in (0.0, 0.7, 1.5):
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda p=proc: Path(index, "CURRENT").exists() or p.poll() is not None)
        time.sleep(delay)  # kill while batches are being committed
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        counts.append(
            as_json(indexer("status", "--index", index, "--json"))["count"]
        )  # opens after every kill
    assert all(0 <= c <= 160 for c in counts) and counts == sorted(counts)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True, timeout=300)
    status = as_json(indexer("status", "--index", index, "--json"))
    assert status["count"] == 160 and status["failed"] == []
    hit = as_json(
        indexer("search", "--index", index, "--image", str(folder / "p077.png"), "-k", "1", "--json")
    )
    assert hit["hits"][0]["path"] == str((folder / "p077.png").resolve())
    again = as_json(indexer("build", str(folder), "--index", index, "--no-progress", "--json"))
    assert again["added"] == 0 and again["unchanged"] == 160


def _wait_for(condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
