"""``python -m app``: serve the search page and API over one index.

    python -m app [--index DIR] [--host 127.0.0.1] [--port 7860] [--auth USER:PASSWORD] ...

Every flag has a ``VITRINE_*`` environment default (``VITRINE_INDEX``, ``VITRINE_PORT``, ``VITRINE_AUTH``…).
A missing index is not an error: the page explains how to build one and offers to index uploads, and the
server picks the index up as soon as it appears. Exit status 1 with one ``error: ...`` line for fatal
problems (port in use, bad setting).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from vitrine.config import DEFAULT_INDEX, EncoderSettings, arg, parse_args, quiet_libraries
from vitrine.errors import VitrineError


@dataclass(kw_only=True)
class AppArgs(EncoderSettings):
    """Serve the Vitrine search page, its Gradio API, /healthz and /metrics."""

    index: str = arg(
        DEFAULT_INDEX, f"index directory (default: $VITRINE_INDEX or {DEFAULT_INDEX})", env="INDEX"
    )
    host: str = arg("127.0.0.1", "interface to listen on (0.0.0.0 for all)", env="HOST")
    port: int = arg(7860, "TCP port", env="PORT")
    concurrency: int = arg(
        0, "requests handled at once, more wait in the queue (0: twice --max-batch)", env="CONCURRENCY"
    )
    max_batch: int = arg(16, "queries encoded together in one model call under load", env="MAX_BATCH")
    batch_wait_ms: float = arg(
        2.0, "how long a model call waits for more queries to batch with", env="BATCH_WAIT_MS"
    )
    switch_interval_ms: float = arg(
        1.0,
        "how long a thread may hold the GIL while others wait for it (Python's default is 5)",
        env="SWITCH_INTERVAL_MS",
    )
    max_queue: int = arg(256, "queued requests beyond which new ones are refused", env="MAX_QUEUE")
    max_upload_mb: float = arg(20.0, "largest accepted upload in MB", env="MAX_UPLOAD_MB")
    max_pixels: int = arg(
        100_000_000,
        "largest image (width*height) decoded; bigger ones are refused as bombs",
        env="MAX_PIXELS",
    )
    max_query_pixels: int = arg(
        40_000_000,
        "largest query image decoded at full size (width*height; JPEGs count after their reduced-scale "
        "decode); decodes in flight share this many pixels",
        env="MAX_QUERY_PIXELS",
    )
    max_text_chars: int = arg(1000, "longest accepted text query", env="MAX_TEXT_CHARS")
    max_k: int = arg(100, "largest top-k a request may ask for", env="MAX_K")
    max_depth: int = arg(1000, "how deep pages go: offset + k at most this", env="MAX_DEPTH")
    torch_threads: int = arg(
        0,
        "CPU threads per model call; text and image batches run side by side, so 0 means half the cores "
        "(at least 1): more threads than cores makes torch spin and slows every request",
        env="TORCH_THREADS",
    )
    torchscript: bool = arg(
        True,
        "run the towers as TorchScript graphs (same outputs, checked at start-up; the request threads "
        "then cannot stall model calls on the GIL)",
        env="TORCHSCRIPT",
        old_flag="--trace",
        old_env="TRACE",
    )
    refresh_seconds: float = arg(
        2.0, "how often to look for index changes (builds, reindex swaps); 0 disables", env="REFRESH_SECONDS"
    )
    auth: str | None = arg(None, "require a login USER:PASSWORD for the page and API", env="AUTH")
    api_key: str | None = arg(None, "an API key for /api/v1 (Authorization: Bearer KEY), 16+ characters")
    api_keys_file: str | None = arg(
        None, "file of API keys for /api/v1, one a line (VITRINE_API_KEYS)", env="API_KEYS"
    )
    allow_url_fetch: str = arg(
        "",
        "HOST[,HOST]: query images may be fetched by URL from these hosts (public addresses only)",
        env="ALLOW_URL_FETCH",
    )
    record_queries: bool = arg(
        True, "sample query embeddings into INDEX/drift.sqlite for drift checks", env="RECORD_QUERIES"
    )
    store_query_text: bool = arg(
        False,
        "keep query texts with the samples (off: embeddings only; images are never kept)",
        env="STORE_QUERY_TEXT",
    )
    admin: bool = arg(
        False,
        "allow the page and API to write: index uploaded photos, run drift checks, start reindex jobs",
        env="ADMIN",
    )
    max_index_files: int = arg(
        1000, "most photos indexed by one 'Index photos' request", env="MAX_INDEX_FILES"
    )
    max_index_mb: float = arg(2000.0, "most MB indexed by one 'Index photos' request", env="MAX_INDEX_MB")
    rate_uploads: float = arg(120.0, "uploads per minute per client (0: unlimited)", env="RATE_UPLOADS")
    rate_logins: float = arg(10.0, "login attempts per minute per client (0: unlimited)", env="RATE_LOGINS")
    rate_writes: float = arg(
        10.0,
        "indexing, drift checks and reindex starts per minute per client (0: unlimited)",
        env="RATE_WRITES",
    )
    upload_ttl_minutes: float = arg(
        10.0, "uploads are deleted from the server's cache once this old", env="UPLOAD_TTL_MINUTES"
    )
    reindex_flags: str = arg(
        "", "extra flags for reindex jobs started from the page, e.g. '--model M'", env="REINDEX_FLAGS"
    )
    quality_slice: str | None = arg(
        None,
        "Drift tab and /metrics: the live generation's recall per value of this metadata field",
        env="QUALITY_SLICE",
    )
    quality_size: int = arg(
        500, "captioned items sampled to measure the live generation's recall (0: off)", env="QUALITY_SIZE"
    )
    log_level: str = arg("INFO", "logging level; INFO logs one line per request", env="LOG_LEVEL")


def make_service(a: AppArgs):  # type: ignore[no-untyped-def]
    from app.indexing import IndexLimits
    from app.ratelimit import Rates
    from app.service import SearchService, ServiceSettings

    return SearchService(
        ServiceSettings(
            index=a.index,
            model=a.model,
            encoder_kwargs=a.encoder_kwargs(),
            max_text_chars=a.max_text_chars,
            max_k=a.max_k,
            max_depth=a.max_depth,
            max_upload_mb=a.max_upload_mb,
            max_pixels=a.max_pixels,
            max_query_pixels=a.max_query_pixels,
            rates=Rates(upload=a.rate_uploads, login=a.rate_logins, write=a.rate_writes),
            index_limits=IndexLimits(max_files=a.max_index_files, max_total_mb=a.max_index_mb),
            refresh_seconds=a.refresh_seconds,
            max_batch=a.max_batch,
            batch_wait_ms=a.batch_wait_ms,
            trace=a.torchscript,
            record_queries=a.record_queries,
            store_query_text=a.store_query_text,
            admin=a.admin,
            reindex_args=shlex.split(a.reindex_flags),
            quality_slice=a.quality_slice,
            quality_size=a.quality_size,
        )
    )


def server_settings(a: AppArgs):  # type: ignore[no-untyped-def]
    from app.rest.auth import load_keys
    from app.server import ServerSettings

    auth = None
    if a.auth:
        user, sep, password = a.auth.partition(":")
        if not sep or not user or not password:
            raise VitrineError("--auth must be USER:PASSWORD")
        auth = (user, password)
    return ServerSettings(
        host=a.host,
        port=a.port,
        concurrency=a.concurrency,
        max_queue=a.max_queue,
        max_upload_mb=a.max_upload_mb,
        auth=auth,
        switch_interval_ms=a.switch_interval_ms,
        upload_ttl_minutes=a.upload_ttl_minutes,
        api_keys=load_keys([a.api_key] if a.api_key else [], a.api_keys_file),
        allow_url_fetch=tuple(h.strip() for h in a.allow_url_fetch.split(",") if h.strip()),
    )


def torch_threads(requested: int) -> int:
    """Threads for torch: ``requested``, or half the usable cores (at least 1)."""
    return requested if requested > 0 else max(1, len(os.sched_getaffinity(0)) // 2)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(AppArgs, argv, prog="python -m app")
    # A crash in native code (torch, FAISS, PIL, the interpreter) kills the server without a Python
    # traceback; this prints every thread's Python stack to stderr first, the operator's only clue.
    faulthandler.enable(all_threads=True)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    quiet_libraries()
    import torch

    torch.set_num_threads(torch_threads(args.torch_threads))
    for noisy in ("faiss.loader", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from app.server import serve

        settings = server_settings(args)
        service = make_service(args)
        if service.ready:
            info = service.info()
            logging.getLogger("vitrine.app").info(
                "serving %s items (model %s, version %s) on http://%s:%d",
                info["count"],
                info["model"],
                info["model_version"],
                args.host,
                args.port,
            )
        else:
            logging.getLogger("vitrine.app").warning("%s", service.empty_message())
        serve(service, settings)
    except VitrineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot serve on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
