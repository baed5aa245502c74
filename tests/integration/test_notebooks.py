"""Notebooks are documentation that must run: each is executed top to bottom on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO, pattern_image


def run_notebook(name: str, env: dict[str, str], workdir: Path) -> nbformat.NotebookNode:
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    try:
        NotebookClient(
            notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
        ).execute()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return notebook


@pytest.mark.slow
def test_quickstart_notebook_runs(clip_path, photo_folder, tmp_path):
    notebook = run_notebook(
        "quickstart.ipynb",
        {
            "VITRINE_MODEL": str(clip_path),
            "VITRINE_CATALOG": str(photo_folder),
            "VITRINE_INDEX": str(tmp_path / "index"),
        },
        tmp_path,
    )
    images = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 2  # text and image results were drawn


@pytest.mark.slow
def test_drift_notebook_runs(clip_path, tmp_path):
    """Colour-cast days push the scores up, the scheduled check flags the uploads, reindex publishes a
    new generation whose reference holds them; the numbers come from the summary the notebook saves."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for seed in range(400):
        pattern_image(seed).save(photos / f"{seed:04d}.jpg", quality=92)
    env = {
        "VITRINE_MODEL": str(clip_path),
        "VITRINE_CATALOG": str(photos),
        "VITRINE_INDEX": str(tmp_path / "index"),
    }
    notebook = run_notebook("drift.ipynb", env, tmp_path)
    summary = json.loads((tmp_path / "drift-summary.json").read_text())
    days = summary["days"]
    assert [d["cast"] for d in days] == [0.0, 0.05, 0.1, 0.2, 0.3]
    assert days[0]["drifted"] is False and days[-1]["drifted"] is True
    assert days[-1]["auc"] > days[0]["auc"] + 0.3 and days[-1]["mean_shift"] > days[0]["mean_shift"]
    assert summary["scheduled"]["drifted"] is True and summary["scheduled"]["source"] == "ingest"
    job = summary["reindex"]
    assert job["status"] == "published" and job["to_generation"] != job["from_generation"]
    assert summary["calm"]["drifted"] is False
    assert summary["after"]["tomorrow"]["generation"] == job["to_generation"]
    assert summary["after"]["tomorrow"]["auc"] < summary["before"]["tomorrow"]["auc"]
    assert summary["reference"]["after"]["size"] > summary["reference"]["before"]["size"]
    plots = [
        o
        for c in notebook.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(plots) >= 3  # the camera's casts, the rising scores, before/after
