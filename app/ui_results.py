"""The page's results: gallery items, status line, table and the "load more" state of a search answer.

The answer comes back from the browser like any input, so only its keys and scores are used; every
key is looked up in the index (unknown keys are left out) and the hits shown so far are held by the
server (a ``gr.State``), so "load more" appends to what this session was really shown.
"""

from __future__ import annotations

import html
import json
from typing import Any

import gradio as gr
from PIL import Image

from app import ui_query as uq
from app.service import SearchService

_PLACEHOLDER = (236, 238, 242)


def show(
    service: SearchService, result: Any, body: Any, photo: Any, before: list, request: gr.Request
) -> tuple:
    """Gallery, status, table and hits of a result appended to ``before`` (the hits already shown, held
    by the server), the "load more" button, and the curl line of the same search."""
    shown = [*before, *_known(service, result)][: service.limits.max_depth]
    items = [
        (service.thumbnail(h["key"]) or Image.new("RGB", (320, 240), _PLACEHOLDER), _caption(h))
        for h in shown
    ]
    got = result if isinstance(result, dict) else {}
    status = (
        f"**{len(shown)} matches**{_took(got.get('took_ms'))} · model `{_plain(got.get('model_version'))}` · "
        f"index `{_plain(got.get('generation'))}`"
        if shown
        else "No matches (try removing filters, 'not' terms or the cutoff)."
    )
    more = isinstance(got.get("next_offset"), int) and len(shown) < service.limits.max_depth
    photo_sent = photo is not None and not (isinstance(body, dict) and body.get("key"))
    login = getattr(request, "username", None) is not None
    curl = uq.curl_line(body, photo_sent, request, login)
    return items, status, _table(shown), shown, gr.update(visible=more), curl


def _known(service: SearchService, result: Any) -> list[dict]:
    """The result's hits as indexed items. The result comes back from the client, so only its keys and
    scores are used: each key is looked up in the index, and unknown keys are left out."""
    sent = result.get("hits") if isinstance(result, dict) else None
    shown = []
    for hit in (sent if isinstance(sent, list) else [])[: service.limits.max_k]:
        key = hit.get("key") if isinstance(hit, dict) else None
        item = service.item(key)
        if item is not None:
            shown.append({**item, "key": key, "score": _score(hit.get("score"))})
    return shown


def _score(value: Any) -> float:
    try:
        return float(value) if isinstance(value, int | float) else 0.0
    except OverflowError:  # a client's 400-digit integer
        return 0.0


def _caption(hit: dict) -> str:
    return f"{hit['score']:.3f} · {hit['captions'][0] if hit['captions'] else _file_name(hit)}"


def _file_name(hit: dict) -> str:
    return str(hit["path"]).rsplit("/", 1)[-1]


def _took(took: Any) -> str:
    return f" in {took:.0f} ms" if isinstance(took, int | float) and not isinstance(took, bool) else ""


def _plain(value: Any) -> str:
    """A client-sent label for Markdown: short, no backticks."""
    return str(value)[:40].replace("`", "'")


def _table(hits: list[dict]) -> str:
    if not hits:
        return ""
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{h['score']:.3f}</td><td>{html.escape('; '.join(h['captions'][:2]))}</td>"
        f"<td>{html.escape(json.dumps(h['metadata'], ensure_ascii=False))}</td>"
        f"<td><code>{html.escape(_file_name(h))}</code></td></tr>"
        for i, h in enumerate(hits)
    )
    head = "<tr><th>#</th><th>score</th><th>captions</th><th>metadata</th><th>file</th></tr>"
    return f"<table class='vitrine-table'>{head}{rows}</table>"
