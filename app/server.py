"""The HTTP server: FastAPI with ``/healthz`` and ``/metrics``, and the Gradio page mounted at ``/``.

Gradio owns ``/`` and ``/gradio_api/*`` (page, uploads, queue, API); the two operations routes live on the
parent FastAPI app so they answer even while the queue is busy, and stay open when the page has a login
(probes and Prometheus scrapers do not log in). The REST API (``app.rest``) is a FastAPI app mounted at
``/api/v1`` (search, items, an indexed item's thumbnail: the ``url`` of every hit). Uploads larger than
``max_upload_mb`` are refused by Gradio before they reach disk (413); an upload request larger than one file
(or, with ``--admin``, than one "Index photos" batch) or without a ``Content-Length`` is refused before
Gradio reads it (413/411). Refusals are counted under ``errors_total`` with reason ``upload_too_large``.
Uploads and logins are rate-limited per client (:mod:`app.ratelimit`, 429), and Gradio deletes uploads from
its cache once they are ``upload_ttl_minutes`` old (its ``delete_cache``, which also works mounted: the
mounted app's lifespan runs it).

Queueing: Gradio runs at most ``concurrency`` requests at once (default: two model batches' worth) and
holds the rest in its queue (``max_queue`` long, then refused). Running requests do not compete for the
CPU one forward each: their model calls are micro-batched (``app.batcher``), one batch at a time per
modality, each batch using all cores; decoding uploads is limited to one per core. So the concurrency
limit sets how full a batch can get and how much memory requests may hold, while CPU use matches the
machine by construction.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import gradio as gr
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from gradio.utils import get_upload_folder

from app.live_index import settle_heap
from app.metrics import Metrics
from app.ratelimit import RateLimits, refuse
from app.rest.api import RestSettings, create_rest_app
from app.rest.auth import Access, gradio_page
from app.rest.fetch import FetchPolicy
from app.service import SearchService
from app.ui import CSS, build_demo

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Gradio summarises its last 10,000 events with pandas after *every* event by default (for the API
#: page's timings): a per-request cost that grows with uptime until it rivals a search itself
#: (bench/RESULTS.md, Load). Recompute every 1,000 events over the last 2,000 instead (an explicit
#: environment setting still wins).
GRADIO_ANALYTICS = {"GRADIO_ANALYTICS_CACHE_FREQUENCY": "1000", "GRADIO_ANALYTICS_MAX_EVENTS": "2000"}


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 0  # 0: os.cpu_count()
    max_queue: int = 256
    max_upload_mb: float = 20.0
    auth: tuple[str, str] | None = None
    switch_interval_ms: float = 1.0
    upload_ttl_minutes: float = 10.0
    api_keys: tuple[bytes, ...] = ()  # accepted as Authorization: Bearer on /api/v1
    allow_url_fetch: tuple[str, ...] = ()  # hosts query images may be fetched from (none: no URLs)


def create_app(service: SearchService, settings: ServerSettings) -> FastAPI:
    """The ASGI app; the service's refresh thread starts with it."""
    app = FastAPI(title="Vitrine", docs_url=None, redoc_url=None)

    @app.get("/healthz")
    def healthz() -> JSONResponse:
        body = service.health()
        return JSONResponse(body, status_code=200 if body["ok"] else 503)

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    concurrency = settings.concurrency or 2 * service.settings.max_batch
    app.mount("/api/v1", create_rest_app(service, rest_settings(service, settings, concurrency, app)))
    app.add_middleware(RefusedUploads, metrics=service.metrics, limit=_upload_request_limit(service))
    app.add_middleware(RateLimits, limiter=service.limiter)
    for name, value in GRADIO_ANALYTICS.items():
        os.environ.setdefault(name, value)
    demo = build_demo(service)
    ttl = max(1, int(settings.upload_ttl_minutes * 60))
    demo.delete_cache = (min(60, ttl), ttl)  # every minute, uploads older than the TTL are deleted
    service.uploads.attach(demo.upload_file_set, get_upload_folder())
    demo.queue(default_concurrency_limit=concurrency, max_size=settings.max_queue)
    service.start()
    mounted = gr.mount_gradio_app(
        app,
        demo,
        path="/",
        server_name=settings.host,
        server_port=settings.port,
        auth=settings.auth,
        max_file_size=int(settings.max_upload_mb * 1024 * 1024),
        ssr_mode=False,
        theme=gr.themes.Soft(primary_hue="indigo"),
        css=CSS,
        footer_links=["api"],
        show_error=True,
        allowed_paths=[],
        run_history=False,
        enable_monitoring=False,
    )
    # Gradio imports pandas on the 1,000th event (its analytics summary): under load that import holds
    # the GIL long enough to stall every request in flight. Import it now, before the heap is frozen.
    importlib.import_module("pandas")
    settle_heap()
    return mounted


def rest_settings(
    service: SearchService, settings: ServerSettings, concurrency: int, app: FastAPI
) -> RestSettings:
    """The REST API's door: the page's login or an API key; a body holds one upload as base64; as many
    requests inside at once as Gradio's queue holds (running plus waiting)."""
    upload = int(service.settings.max_upload_mb * 1024 * 1024)
    return RestSettings(
        access=Access(basic=settings.auth, keys=settings.api_keys, page=gradio_page(app)),
        fetch=FetchPolicy(hosts=frozenset(h.lower() for h in settings.allow_url_fetch), max_bytes=upload),
        max_body=upload * 4 // 3 + 1024 * 1024,
        max_in_flight=concurrency + settings.max_queue,
    )


def _upload_request_limit(service: SearchService) -> int:
    """Largest upload request body: one file plus multipart framing, or an admin's indexing batch."""
    mb = service.settings.max_upload_mb
    if service.settings.admin:
        mb = max(mb, service.settings.index_limits.max_total_mb)
    return int(mb * 1024 * 1024) + 1024 * 1024


class RefusedUploads:
    """Refuses upload requests over ``limit`` bytes (by ``Content-Length``, required) and counts them,
    with the uploads Gradio refused as too large (413), under ``errors_total{reason="upload_too_large"}``.

    A plain ASGI wrapper that only looks at each response's start message: Starlette's
    ``@app.middleware("http")`` would re-stream every server-sent event of the queue through an extra
    task and memory stream, which cost a measurable share of the server's CPU under load.
    """

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics, limit: int) -> None:
        self.app, self.metrics, self.limit = app, metrics, limit

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope.get("path", "").endswith("/upload"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if scope.get("method") == "POST" and (not length.isdigit() or int(length) > self.limit):
            self.metrics.observe("upload", 0.0, "upload_too_large")
            if length.isdigit():
                await refuse(send, 413, f"upload request over the {self.limit / 1e6:.0f} MB limit")
            else:
                await refuse(send, 411, "an upload needs a Content-Length header")
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 413:
                self.metrics.observe("upload", 0.0, "upload_too_large")
            await send(message)

        await self.app(scope, receive, watch)


def serve(service: SearchService, settings: ServerSettings) -> None:
    """Run until interrupted (uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    # A thread that wants the GIL back waits for the holder to yield, at most the switch interval (5 ms
    # by default). Model calls and SQLite release and retake the GIL many times per request while the
    # event loop runs Python, so every retake could cost up to that; a shorter interval raised
    # text-search throughput under load (bench/RESULTS.md, Load).
    sys.setswitchinterval(settings.switch_interval_ms / 1000)
    app = create_app(service, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
