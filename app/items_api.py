"""``GET /api/v1/items/{key}/image?size=N``: a JPEG thumbnail of one indexed item, looked up by key.

This is the ``url`` every hit carries, so API clients (and ``gradio_client``'s default settings) get
pictures without the server ever disclosing or accepting a filesystem path. Unknown keys answer 404 with
a JSON body; ``size`` is clamped to 16..1024 pixels (default 320). With ``--auth`` the route asks for
the same login as the page: HTTP Basic credentials, or the session cookie of a login on the page.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import secrets
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from gradio.routes import App as GradioApp

from app.sources import clamp_size, jpeg

if TYPE_CHECKING:
    from app.service import SearchService


def add_item_routes(app: FastAPI, service: SearchService, auth: tuple[str, str] | None) -> None:
    """Register the route on ``app`` (before Gradio is mounted at ``/``, which would shadow it)."""

    @app.get("/api/v1/items/{key:path}/image", response_model=None)
    async def item_image(key: str, request: Request, size: str | None = None) -> Response:
        if auth is not None and not _logged_in(request, app, auth):
            return JSONResponse(
                {"error": "login required"}, status_code=401, headers={"WWW-Authenticate": "Basic"}
            )
        # reading and shrinking a file is blocking work: keep it off the event loop
        image = await asyncio.to_thread(service.thumbnail, key, clamp_size(size))
        if image is None:
            return JSONResponse({"error": "no such item", "key": key[:200]}, status_code=404)
        body = await asyncio.to_thread(jpeg, image)
        return Response(body, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})


def _logged_in(request: Request, app: FastAPI, auth: tuple[str, str]) -> bool:
    """HTTP Basic credentials equal to ``auth``, or a Gradio login session cookie of the mounted page."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            user, _, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return secrets.compare_digest(user.encode(), auth[0].encode()) & secrets.compare_digest(
            password.encode(), auth[1].encode()
        )
    page = next((r.app for r in app.routes if isinstance(getattr(r, "app", None), GradioApp)), None)
    if page is None:
        return False
    token = request.cookies.get(f"access-token-{page.cookie_id}") or request.cookies.get(
        f"access-token-unsecure-{page.cookie_id}"
    )
    return token is not None and page.tokens.get(token) is not None
