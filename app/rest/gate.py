"""The REST API's door, a plain ASGI wrapper that answers before any body is read: login or API key
(401), body size (``Content-Length`` required on POST, 411, and capped, 413, so a huge body is never
read), per-client upload rate for image searches (429), and how many REST requests may be in the
server at once (503, like a full Gradio queue). Refusals are counted in ``errors_total`` under the
endpoint's label, and are JSON ``{"error": {"reason", "message"}}``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Any

from app.metrics import Metrics
from app.ratelimit import RateLimited, RateLimiter
from app.rest.auth import Access

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/openapi.json", "/docs", "/docs/oauth2-redirect")


def endpoint_label(path: str) -> str:
    """The metrics label of a REST path (inside the /api/v1 mount)."""
    if path.rstrip("/") == "/search/image":
        return "rest_search_image"
    if path.rstrip("/") == "/search":
        return "rest_search"
    if path.startswith("/items/"):
        return "rest_item_image" if path.endswith("/image") else "rest_item"
    return "rest_other"


@dataclass
class Limits:
    max_body: int
    max_in_flight: int


class Gate:
    """See the module docstring; ``limits.max_in_flight`` counts requests inside, queued or running."""

    def __init__(self, app: ASGIApp, access: Access, limits: Limits, metrics: Metrics, limiter: RateLimiter):
        self.app, self.access, self.limits, self.metrics, self.limiter = app, access, limits, metrics, limiter
        self.in_flight = 0

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _inner(scope) in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, reason, message, headers = refusal
            self.metrics.observe(endpoint_label(_inner(scope)), 0.0, reason)
            await answer(send, status, reason, message, headers, legacy=_inner(scope).endswith("/image"))
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    def _refusal(self, scope: Message) -> tuple[int, str, str, dict[str, str]] | None:
        headers = dict(scope.get("headers") or [])
        if not self.access.allows(headers, _cookies(headers)):
            return (
                401,
                "unauthorized",
                "login required: HTTP Basic or Authorization: Bearer KEY",
                {"www-authenticate": 'Basic realm="vitrine", Bearer'},
            )
        if scope["method"] == "POST":
            length = headers.get(b"content-length", b"")
            if not length.isdigit():
                return 411, "length_required", "a request body needs a Content-Length header", {}
            if int(length) > self.limits.max_body:
                mb = self.limits.max_body / 1e6
                return 413, "upload_too_large", f"the request body is over the {mb:.0f} MB limit", {}
            if _inner(scope).rstrip("/") == "/search/image":
                try:
                    self.limiter.take("upload", (scope.get("client") or ("unknown", 0))[0])
                except RateLimited as exc:
                    return 429, "rate_limited", str(exc), {"retry-after": str(math.ceil(exc.retry_after))}
        if self.in_flight >= self.limits.max_in_flight:
            return 503, "queue_full", "the server is busy: try again shortly", {"retry-after": "1"}
        return None


def _inner(scope: Message) -> str:
    """The path inside the mount (Starlette keeps the full path and sets root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(headers.get(b"cookie", b"").decode("latin-1"))
    except Exception:  # a malformed cookie header is no login, not an error
        return {}
    return {name: morsel.value for name, morsel in jar.items()}


async def answer(
    send: Send, status: int, reason: str, message: str, headers: dict[str, str], legacy: bool = False
) -> None:
    """A JSON error response; ``legacy``: the item image route's ``{"error": message}`` body."""
    body = {"error": message} if legacy else {"error": {"reason": reason, "message": message}}
    raw = json.dumps(body).encode()
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    pairs += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": raw})
