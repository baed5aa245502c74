"""notebooks/finetune.ipynb runs top to bottom on tiny towers and shows that recall improved."""

from __future__ import annotations

import pytest

from tests.integration.test_notebooks import run_notebook


@pytest.mark.slow
def test_finetune_notebook_runs(towers_dir, tmp_path) -> None:
    from tests.train.conftest import write_pairs

    data = write_pairs(tmp_path / "pairs")
    env = {
        "FINETUNE_VISION": str(towers_dir[0]),
        "FINETUNE_TEXT": str(towers_dir[1]),
        "FINETUNE_TRAIN": str(data),
        "FINETUNE_EVAL": str(data),
        "FINETUNE_OUT": str(tmp_path / "out"),
        "FINETUNE_ARGS": "--epochs 12 --batch-size 8 --unfreeze-last-n 1 --num-workers 0 "
        "--lr 1e-3 --head-lr 5e-3 --projection-dim 32",
    }
    notebook = run_notebook("finetune.ipynb", env, tmp_path)
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "the curves were not plotted"
    text = "".join(o.get("text", "") for o in outputs)
    change = float(text.split("text→image R@5 changed by ")[1].split()[0])
    assert change > 10, text
    assert "recipes: all-captions" in text and "positives per image: one" in text  # a recipe compared
    assert (tmp_path / "out" / "model.safetensors").is_file()
