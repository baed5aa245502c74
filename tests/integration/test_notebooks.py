"""Notebooks are documentation that must run: each is executed top to bottom on a tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import REPO


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
