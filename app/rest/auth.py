"""Who may call ``/api/v1``: the page's login (``--auth``: HTTP Basic, or the page's session cookie) and
API keys (``--api-key``, ``VITRINE_API_KEYS``: a file of keys, one per line) as ``Authorization: Bearer``.

With neither set the API is open, like the page. Every comparison is constant-time
(:func:`secrets.compare_digest`), and every key is compared, so timing says nothing about which matched.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradio.routes import App as GradioApp

from vitrine.errors import VitrineError


@dataclass(frozen=True)
class Access:
    """The credentials a request may present; ``page`` finds the mounted Gradio app (its login cookies)."""

    basic: tuple[str, str] | None = None
    keys: tuple[bytes, ...] = ()
    page: Callable[[], GradioApp | None] = lambda: None

    @property
    def open(self) -> bool:
        return self.basic is None and not self.keys

    def allows(self, headers: dict[bytes, bytes], cookies: dict[str, str]) -> bool:
        if self.open:
            return True
        header = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return self._key(value.strip().encode("latin-1"))
        if scheme.lower() == "basic" and self.basic is not None:
            return self._basic(value.strip())
        return self.basic is not None and self._session(cookies)

    def _key(self, given: bytes) -> bool:
        matched = False
        for key in self.keys:  # no early exit: the time taken does not say which key (or none) matched
            matched |= secrets.compare_digest(given, key)
        return matched

    def _basic(self, value: str) -> bool:
        assert self.basic is not None
        try:
            user, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user.encode(), self.basic[0].encode()) & secrets.compare_digest(
            password.encode(), self.basic[1].encode()
        )

    def _session(self, cookies: dict[str, str]) -> bool:
        page = self.page()
        if page is None:
            return False
        token = cookies.get(f"access-token-{page.cookie_id}") or cookies.get(
            f"access-token-unsecure-{page.cookie_id}"
        )
        return token is not None and page.tokens.get(token) is not None


def gradio_page(app: Any) -> Callable[[], GradioApp | None]:
    """A finder for the Gradio app mounted on ``app`` (mounted after the API, so looked up per call)."""
    return lambda: next((r.app for r in app.routes if isinstance(getattr(r, "app", None), GradioApp)), None)


def load_keys(given: Iterable[str], path: str | None) -> tuple[bytes, ...]:
    """API keys from flags and from the file at ``path`` (one a line; blank lines and # comments skipped)."""
    keys = [k.strip() for k in given if k.strip()]
    if path:
        try:
            lines = Path(path).read_text().splitlines()
        except OSError as exc:
            raise VitrineError(f"cannot read the API keys file {path!r}: {exc.strerror or exc}") from None
        keys += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if any(len(k) < 16 for k in keys):
        raise VitrineError("API keys must be at least 16 characters long")
    return tuple(k.encode() for k in keys)
