"""Per-client rate limits: a token bucket per (kind, client address).

Kinds: ``upload`` (``POST .../gradio_api/upload``), ``login`` (``POST .../login``) and ``write`` (events
that change state: indexing from the page, ``/check_drift``, ``/start_reindex``). A limit of ``N`` per
minute is a bucket of ``N`` tokens refilled at ``N`` per minute, so a client may spend a minute's worth at
once and then ``N`` per minute; ``0`` turns a kind off. The client is the TCP peer address: headers such
as ``X-Forwarded-For`` are the client's own words and are ignored (behind a proxy every client shares
the proxy's bucket, so raise the limits there or limit at the proxy).

Uploads and logins are refused by :class:`RateLimits`, a plain ASGI wrapper, with ``429`` and a JSON body
``{"error": ..., "retry_after": seconds}`` (and a ``Retry-After`` header) before Gradio reads the
request; writes are refused inside their events (:meth:`RateLimiter.take` raises :class:`RateLimited`).
The table of buckets is bounded (least recently used clients are forgotten first).
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from vitrine.errors import VitrineError

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_CLIENTS = 10_000


class RateLimited(VitrineError):
    """Too many requests of one kind from one client; ``retry_after`` is in seconds."""

    reason = "rate_limited"

    def __init__(self, kind: str, retry_after: float) -> None:
        self.kind, self.retry_after = kind, retry_after
        wait = math.ceil(retry_after)
        super().__init__(f"too many {kind} requests from this client: try again in {wait} s")


@dataclass(frozen=True)
class Rates:
    """Requests per minute per client for each kind (0: unlimited)."""

    upload: float = 120.0
    login: float = 10.0
    write: float = 10.0


class RateLimiter:
    """Token buckets keyed by (kind, client); thread-safe; see the module docstring."""

    def __init__(self, rates: Rates, clock: Callable[[], float] = time.monotonic) -> None:
        self.rates, self.clock = rates, clock
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, kind: str, client: str | None) -> None:
        """Spend one token of ``kind`` for ``client``, or raise RateLimited (nothing spent)."""
        per_minute = float(getattr(self.rates, kind))
        if per_minute <= 0:
            return
        key, now, rate = (kind, client or "unknown"), self.clock(), per_minute / 60.0
        with self._lock:
            tokens, then = self._buckets.pop(key, (per_minute, now))
            tokens = min(per_minute, tokens + (now - then) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                raise RateLimited(kind, (1.0 - tokens) / rate)
            self._buckets[key] = (tokens - 1.0, now)
            while len(self._buckets) > MAX_CLIENTS:
                self._buckets.popitem(last=False)


def request_kind(scope: Message) -> str | None:
    """The rate-limited kind of an HTTP request, from its method and path alone."""
    if scope["type"] != "http" or scope.get("method") != "POST":
        return None
    path = scope.get("path", "").rstrip("/")
    if path.endswith("/gradio_api/upload"):
        return "upload"
    if path.endswith("/login"):
        return "login"
    return None


class RateLimits:
    """ASGI wrapper refusing uploads and logins over their rate with 429 (see the module docstring).

    A plain ASGI wrapper (not Starlette's ``@app.middleware``) so other requests pass through untouched.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], limiter: RateLimiter) -> None:
        self.app, self.limiter = app, limiter

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        kind = request_kind(scope)
        if kind is not None:
            client = (scope.get("client") or ("unknown", 0))[0]
            try:
                self.limiter.take(kind, client)
            except RateLimited as exc:
                await refuse(send, 429, str(exc), {"retry-after": str(math.ceil(exc.retry_after))})
                return
        await self.app(scope, receive, send)


async def refuse(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Answer with ``{"error": message}`` as JSON (and ``retry_after`` when the header is given)."""
    body: dict[str, Any] = {"error": message}
    if headers and "retry-after" in headers:
        body["retry_after"] = int(headers["retry-after"])
    raw = json.dumps(body).encode()
    pairs = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    pairs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": pairs})
    await send({"type": "http.response.body", "body": raw})
