"""Headless Debian Chromium for the browser tests (never `playwright install`: no downloads here)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def open_tab(url: str, height: int = 1000) -> Iterator[Any]:
    """A Playwright page at ``url`` once the page has drawn its header; skips without Chromium/Playwright.
    Use as the body of a fixture: ``yield from open_tab(url)``."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium not installed (apt-get install chromium, or `make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        tab = browser.new_page(viewport={"width": 1400, "height": height})
        tab.set_default_timeout(30_000)
        tab.goto(url)
        tab.wait_for_selector("#vitrine-version")
        yield tab
        browser.close()
