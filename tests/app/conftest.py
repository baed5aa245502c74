"""Fixtures for the app tests: see tests/app/live.py (shared with the browser test)."""

from tests.app.live import live_server  # noqa: F401
