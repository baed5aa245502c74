"""Without Ray installed, ``--engine ray`` fails with one ``error:`` line naming what to install."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from indexer.cli import main


def test_engine_ray_without_ray_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    monkeypatch.setitem(sys.modules, "ray.data", None)
    code = main(["build", str(tmp_path), "--index", str(tmp_path / "idx"), "--engine", "ray"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: --engine ray needs Ray Data") and "ray[data]" in err[0]
    assert not (tmp_path / "idx").exists()  # refused before anything was created
