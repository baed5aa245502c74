"""The REST door (app.rest.gate.Gate) in front of a real ASGI app: what is refused before a body is read
(login, Content-Length, size, upload rate, a full server), as JSON errors counted in /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from app.metrics import Metrics
from app.ratelimit import RateLimiter, Rates
from app.rest.auth import Access
from app.rest.gate import Gate, Limits

KEY = b"a-key-of-sixteen-or-more"


OPEN = Access()


def gated(access: Access = OPEN, max_body: int = 1000, max_in_flight: int = 4, uploads: float = 0) -> tuple:
    read: list[int] = []

    async def echo(request: Request) -> JSONResponse:
        read.append(len(await request.body()))
        await asyncio.sleep(0)
        return JSONResponse({"ok": True})

    routes = [Route("/search", echo, methods=["POST"]), Route("/search/image", echo, methods=["POST"])]
    inner = Starlette(routes=routes)
    metrics = Metrics()
    gate = Gate(inner, access, Limits(max_body, max_in_flight), metrics, RateLimiter(Rates(upload=uploads)))
    return gate, metrics, read


def call(gate: Gate, path: str = "/search", **kw: object) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://t") as client:
            return await client.post(path, **kw)  # type: ignore[arg-type]

    return asyncio.run(go())


def test_login_is_checked_before_the_body_is_read() -> None:
    gate, metrics, read = gated(Access(basic=("ann", "pw"), keys=(KEY,)))
    refused = call(gate, content=b"{}")
    assert refused.status_code == 401 and refused.json()["error"]["reason"] == "unauthorized" and read == []
    assert call(gate, content=b"{}", headers={"Authorization": "Bearer " + KEY.decode()}).status_code == 200
    assert call(gate, content=b"{}", auth=("ann", "pw")).status_code == 200
    assert call(gate, content=b"{}", auth=("ann", "nope")).status_code == 401
    assert b'vitrine_errors_total{endpoint="rest_search",reason="unauthorized"} 2.0' in metrics.render()[0]


def test_body_needs_a_length_within_the_cap() -> None:
    gate, _, read = gated(max_body=100)
    too_big = call(gate, content=b"x" * 101)
    assert too_big.status_code == 413 and too_big.json()["error"]["reason"] == "upload_too_large"

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}"

    unknown = call(gate, content=chunks())
    assert unknown.status_code == 411 and read == []
    assert call(gate, content=b"x" * 100).status_code == 200 and read == [100]


def test_image_uploads_are_rate_limited_and_a_full_server_says_so() -> None:
    gate, _, _ = gated(uploads=2)
    codes = [call(gate, "/search/image", content=b"{}").status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    assert call(gate, "/search", content=b"{}").status_code == 200  # text searches are not uploads
    full, _, _ = gated(max_in_flight=0)
    busy = call(full, content=b"{}")
    assert busy.status_code == 503 and busy.json()["error"]["reason"] == "queue_full"
