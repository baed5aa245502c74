"""``--help`` of every entry point answers without loading the heavy libraries (torch, transformers, faiss,
gradio): a user asking for the options should not wait for a model stack to import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from indexer.cli import COMMANDS
from tests.conftest import REPO

HEAVY = ("torch", "transformers", "faiss", "gradio", "accelerate")

# Runs the module as `python -m` would, then reports which heavy libraries the run imported.
WRAPPER = """
import contextlib, io, json, runpy, sys
module, sys.argv = sys.argv[1], [sys.argv[1]] + sys.argv[2:]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        code = exit.code
loaded = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv.pop())))
print(json.dumps({"code": code, "help": out.getvalue(), "loaded": loaded}))
"""

ENTRY_POINTS = [
    ["indexer", "--help"],
    *(["indexer", command, "--help"] for command in COMMANDS),
    ["app", "--help"],
    ["train_contrastive", "--help"],
    ["train_contrastive", "train", "--help"],
    ["train_contrastive", "evaluate", "--help"],
]


def _help(argv: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, *argv, json.dumps(HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", ENTRY_POINTS, ids=" ".join)
def test_help_answers_without_importing_heavy_libraries(argv):
    result = _help(argv)
    assert result["code"] in (0, None)
    assert "usage" in result["help"].lower()
    assert result["loaded"] == []
