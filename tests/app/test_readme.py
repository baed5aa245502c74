"""The documented examples (README's Python API, docs/web.md's Gradio client) run unchanged but for the
URL, index and photo."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.app.live import LiveServer
from tests.conftest import REPO


def readme_api_example() -> str:
    text = (REPO / "docs" / "web.md").read_text()
    region = text[text.index("<!-- api:start -->") : text.index("<!-- api:end -->")]
    blocks = re.findall(r"```python\n(.*?)```", region, flags=re.S)
    assert blocks, "the api region of docs/web.md has no python example"
    return blocks[0]


def test_readme_example_runs_against_a_live_server(live_server: LiveServer, tmp_path: Path) -> None:
    code = readme_api_example()
    assert "http://127.0.0.1:7860/" in code
    script = tmp_path / "example.py"
    script.write_text(code.replace("http://127.0.0.1:7860/", live_server.url + "/"))
    shutil.copy(live_server.catalog / "images" / "p005.jpg", tmp_path / "query.jpg")
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.strip().splitlines() if not line.startswith("Loaded as API")]
    assert lines[0].split()[-1] == "gen-000001"  # model, version, generation
    assert len(lines) == 1 + 5 + 1 and all(" images/p0" in line for line in lines[1:6])  # file, not path
    assert str(live_server.catalog.resolve()) not in out.stdout
    assert "p005.jpg" in lines[-1]  # the photo weighs most at weight 0.3, so its neighbours start with it


def test_readme_python_api_example_runs(live_server: LiveServer, tmp_path: Path) -> None:
    """The "Python API" snippet, over the live server's index (read-only use, so sharing it is safe)."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Python API") :]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    assert '"vitrine-data/index"' in code
    script = tmp_path / "api.py"
    script.write_text(code.replace('"vitrine-data/index"', repr(str(live_server.index))))
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # as from a checkout (or after `pip install .`)
    out = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5 and all("/images/p0" in line for line in lines)
