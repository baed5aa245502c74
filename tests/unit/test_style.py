"""House rules that review alone would let slip: ruff-clean code and files short enough to read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("vitrine", "indexer", "app", "train_contrastive", "bench", "tests")
MAX_LINES = 500


def _ruff() -> list[str]:
    local = Path(sys.executable).with_name("ruff")
    if local.exists():
        return [str(local)]
    if shutil.which("ruff"):
        return ["ruff"]
    pytest.skip("ruff is not installed (it is in requirements-dev.txt)")


def test_ruff_check_is_clean():
    targets = [p for p in PACKAGES if (REPO / p).exists()]
    out = subprocess.run(
        [*_ruff(), "check", "--no-cache", *targets], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:]


def test_source_files_stay_readable():
    long_files = {
        str(p.relative_to(REPO)): n
        for package in PACKAGES
        for p in (REPO / package).rglob("*.py")
        if (n := len(p.read_text().splitlines())) >= MAX_LINES
    }
    assert long_files == {}
