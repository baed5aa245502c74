"""The REST API: a FastAPI app mounted at ``/api/v1`` beside the page, over the same SearchService.

``POST /search`` (JSON), ``POST /search/image`` (multipart), ``GET /items/{key}`` and
``GET /items/{key}/image``; OpenAPI at ``/api/v1/openapi.json``, interactive docs at ``/api/v1/docs``.
Requests pass :class:`app.rest.gate.Gate` first (login or key, body size, rate, load), then the service
validates them exactly as the Gradio endpoints (:func:`vitrine.search.query.parse_query`), so both
answer a bad query with the same reason. Every error is ``{"error": {"reason", "message"}}`` with a 4xx
status (503 while no index is loaded or the server is full); bad input never gets a 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.exceptions import HTTPException

from app.rest.auth import Access
from app.rest.fetch import FetchPolicy, FetchRefused, fetch_image
from app.rest.gate import Gate, Limits
from app.rest.models import ErrorBody, ImageRef, Item, SearchRequest, SearchResponse
from app.service import Answered, RequestRefused, SearchService
from app.sources import clamp_size, display_name, item_url, jpeg
from vitrine.search.query import EMPTY_ANY
from vitrine.search.searcher import Searcher

STATUS = {
    "unauthorized": 401,
    "unknown_key": 404,
    "upload_too_large": 413,
    "rate_limited": 429,
    "no_index": 503,
    "queue_full": 503,
    "index_unavailable": 503,
    "internal": 500,
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Bad query (reason says what)",
        401: "Login or API key required",
        404: "Unknown item",
        413: "Body or image too large",
        429: "Rate limited",
        503: "No index yet, or the server is full",
    }.items()
}


@dataclass(frozen=True)
class RestSettings:
    access: Access
    fetch: FetchPolicy
    max_body: int
    max_in_flight: int


class RestPhoto:
    """A REST query photo (bytes, base64 or a URL), turned into bytes and decoded inside the request's
    own timing and error handling, so a bad one is counted like any bad query."""

    def __init__(self, service: SearchService, fetch: FetchPolicy, raw: bytes | None, ref: ImageRef | None):
        self.service, self.fetch, self.raw, self.ref = service, fetch, raw, ref

    def decode(self, searcher: Searcher) -> Image.Image | None:
        return self.service.decode(searcher, self._bytes(), required=True)

    def _bytes(self) -> bytes:
        if self.raw is not None:
            return self.raw
        ref = self.ref
        if ref is None or (ref.base64 is None) == (ref.url is None):
            raise RequestRefused("bad_image", 'image must be {"base64": "..."} or {"url": "..."}')
        if ref.base64 is not None:
            try:
                return base64.b64decode(ref.base64, validate=True)
            except (binascii.Error, ValueError):
                raise RequestRefused("bad_image", "image.base64 is not valid base64") from None
        if not self.fetch.hosts:
            raise RequestRefused("url_fetch_disabled", "this server does not fetch image URLs")
        try:
            return fetch_image(str(ref.url), self.fetch)
        except FetchRefused as exc:
            raise RequestRefused(exc.reason, str(exc)) from None


def create_rest_app(service: SearchService, settings: RestSettings) -> FastAPI:
    api = FastAPI(
        title="Vitrine REST API",
        version="1",
        description="Search an image catalog by text, photo, item or all of them; see the README.",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    _errors(api)
    _search_routes(api, service, settings)
    _item_routes(api, service)
    limits = Limits(max_body=settings.max_body, max_in_flight=settings.max_in_flight)
    api.add_middleware(
        Gate, access=settings.access, limits=limits, metrics=service.metrics, limiter=service.limiter
    )
    return api


def _search_routes(api: FastAPI, service: SearchService, settings: RestSettings) -> None:
    @api.post("/search", response_model=SearchResponse, responses=ERRORS)
    async def search(body: SearchRequest) -> dict:
        """Search by text, photo (``image``), item (``key``) or a mix; negative texts push away."""
        fields = body.model_dump(exclude={"image"})
        if body.image is None:
            return result(service, await service.answer_async("rest_search", fields, EMPTY_ANY))
        photo = RestPhoto(service, settings.fetch, None, body.image)
        answered = await asyncio.to_thread(service.answer, "rest_search", fields, EMPTY_ANY, photo)
        return result(service, answered)

    @api.post("/search/image", response_model=SearchResponse, responses=ERRORS)
    async def search_image(
        image: Annotated[UploadFile, File(description="The query photo.")],
        text: Annotated[str | None, Form(description="Optional text mixed in by weight.")] = None,
        weight: Annotated[float, Form()] = 0.5,
        k: Annotated[int, Form()] = 10,
        offset: Annotated[int, Form()] = 0,
        filters: Annotated[str | None, Form(description='JSON object or "k=v, k2=v2".')] = None,
        min_score: Annotated[float | None, Form()] = None,
        negative: Annotated[list[str] | None, Form(description="Repeat for several.")] = None,
        mode: Annotated[str, Form(description="vector, lexical or hybrid (a text is needed)")] = "vector",
        sort: Annotated[str | None, Form(description="A metadata field, -field descending.")] = None,
    ) -> dict:
        """The same search with the photo as a multipart upload (``curl -F image=@photo.jpg -F k=5``)."""
        fields = {"text": text, "weight": weight, "k": k, "offset": offset, "filters": filters}
        fields |= {"min_score": min_score, "negative": negative, "mode": mode, "sort": sort}
        photo = RestPhoto(service, settings.fetch, await image.read(), None)
        answered = await asyncio.to_thread(service.answer, "rest_search_image", fields, EMPTY_ANY, photo)
        return result(service, answered)


def _item_routes(api: FastAPI, service: SearchService) -> None:
    # the image route first: a key may contain '/', so /items/{key:path} would also match .../image
    @api.get("/items/{key:path}/image", response_model=None, responses={404: {"description": "Unknown"}})
    async def item_image(key: str, size: str | None = None) -> Response:
        """A JPEG thumbnail of an indexed item (``size`` clamped to 16..1024, default 320): every hit's
        ``url``. Errors here keep this route's original body, ``{"error": message}``."""
        with service.metrics.track("rest_item_image"):
            # reading and shrinking a file is blocking work: keep it off the event loop
            image = await asyncio.to_thread(service.thumbnail, key, clamp_size(size))
        if image is None:
            return JSONResponse({"error": "no such item", "key": key[:200]}, status_code=404)
        body = await asyncio.to_thread(jpeg, image)
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    @api.get("/items/{key:path}", response_model=Item, responses=ERRORS)
    async def item(key: str) -> dict:
        """An indexed item: key, file name, image url, captions, metadata."""
        with service.metrics.track("rest_item"):
            found = await asyncio.to_thread(service.item, key)
            if found is None:
                raise RequestRefused("unknown_key", f"no indexed item with key {key[:200]!r}")
        searcher = service.searcher
        folders = service.images.folders(searcher.store) if searcher is not None else []
        return {
            "key": key,
            "file": display_name(found["path"], folders),
            "url": item_url(key),
            "captions": found.get("captions") or [],
            "metadata": found.get("metadata") or {},
        }


def result(service: SearchService, answered: Answered) -> dict[str, Any]:
    """The REST answer (:meth:`SearchService.page_result`)."""
    return service.page_result(answered)


def error(status: int, reason: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"reason": reason, "message": message}}, status_code=status)


def _errors(api: FastAPI) -> None:
    @api.exception_handler(RequestRefused)
    async def refused(request: Request, exc: RequestRefused) -> JSONResponse:
        return error(STATUS.get(exc.reason, 400), exc.reason, str(exc))

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """Pydantic's 422 becomes a 400 naming the first bad field (bad JSON included)."""
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
        return error(400, "bad_request", json.dumps(message)[1:-1][:300])

    @api.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error(exc.status_code, reason, str(exc.detail))
