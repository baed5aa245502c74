"""The HTTP server: FastAPI with ``/healthz`` and ``/metrics``, and the Gradio page mounted at ``/``.

Gradio owns ``/`` and ``/gradio_api/*`` (page, uploads, queue, API); the two operations routes live on
the parent FastAPI app so they answer even while the queue is busy, and stay open when the page has a
login (probes and Prometheus scrapers do not log in). Uploads larger than ``max_upload_mb`` are refused
by Gradio before they reach disk (413), and such refusals are counted under ``errors_total`` with reason
``upload_too_large``.

Queueing: Gradio runs at most ``concurrency`` requests at once (default: two model batches' worth) and
holds the rest in its queue (``max_queue`` long, then refused). Running requests do not compete for the
CPU one forward each: their model calls are micro-batched (``app.batcher``), one batch at a time per
modality, each batch using all cores; decoding uploads is limited to one per core. So the concurrency
limit sets how full a batch can get and how much memory requests may hold, while CPU use matches the
machine by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse

from app.service import SearchService
from app.ui import CSS, build_demo


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 7860
    concurrency: int = 0  # 0: os.cpu_count()
    max_queue: int = 256
    max_upload_mb: float = 20.0
    auth: tuple[str, str] | None = None


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

    @app.middleware("http")
    async def count_refused_uploads(request: Request, call_next):  # type: ignore[no-untyped-def]
        response = await call_next(request)
        if response.status_code == 413 and request.url.path.endswith("/upload"):
            service.metrics.observe("upload", 0.0, "upload_too_large")
        return response

    concurrency = settings.concurrency or 2 * service.settings.max_batch
    demo = build_demo(service)
    demo.queue(default_concurrency_limit=concurrency, max_size=settings.max_queue)
    service.start()
    return gr.mount_gradio_app(
        app, demo, path="/", server_name=settings.host, server_port=settings.port,
        auth=settings.auth, max_file_size=int(settings.max_upload_mb * 1024 * 1024), ssr_mode=False,
        theme=gr.themes.Soft(primary_hue="indigo"), css=CSS, footer_links=["api"],
        show_error=True, allowed_paths=[], run_history=False, enable_monitoring=False,
    )  # fmt: skip


def serve(service: SearchService, settings: ServerSettings) -> None:
    """Run until interrupted (uvicorn handles SIGINT/SIGTERM)."""
    import uvicorn

    app = create_app(service, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning", access_log=False)
