"""The page's REST-strength query controls: "not" terms, relevance cutoff, mode, range filters, sort,
"load more" paging, and the ``curl`` line that gives the same result.

The controls compose one REST body (the fields of ``POST /api/v1/search``, :class:`app.rest.models.
SearchRequest`); the named ``/query(body, image)`` endpoint answers it through the same service method
and with the same JSON as the REST API, so the page, a Gradio client and ``curl`` see one answer. The
body comes back from the browser like any input: pydantic checks its shape here and the service checks
its values (:func:`vitrine.search.query.parse_query`), exactly as for REST.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import gradio as gr
from pydantic import ValidationError

from app.rest.api import RestPhoto, result
from app.rest.fetch import FetchPolicy
from app.rest.models import SearchRequest
from app.service import Photo, RequestRefused, SearchService
from vitrine.search.query import EMPTY_ANY

RANGE_SLOTS = 2
MODES = ("vector", "lexical", "hybrid")
DIRECTIONS = ("descending", "ascending")
_RANGED = ("number", "date")
_SORTABLE = ("number", "date", "string", "boolean")
_HOST = re.compile(r"[A-Za-z0-9.\-:\[\]]{1,255}")


@dataclass
class QueryControls:
    """The components :func:`query_controls` declares, for :mod:`app.ui` to wire."""

    negative: gr.Textbox
    min_score: gr.Textbox
    mode: gr.Radio
    ranges: list[tuple[gr.Dropdown, gr.Textbox, gr.Textbox]]
    sort_field: gr.Dropdown
    sort_dir: gr.Radio


def query_controls(unchecked: Any) -> QueryControls:
    """The controls under the description; ``unchecked`` passes values to the service as sent."""
    negative = unchecked(
        gr.Textbox(
            label="Not (comma-separated)",
            placeholder="e.g. people, text",
            lines=1,
            max_lines=1,
            elem_id="query-negative",
        )
    )
    with gr.Row():
        # a Textbox, not a gr.Number: an untouched Number sends 0, and a cutoff of 0 is not "off"
        min_score = unchecked(
            gr.Textbox(
                label="Relevance cutoff (empty = off)",
                placeholder="e.g. 0.2",
                lines=1,
                max_lines=1,
                elem_id="query-min-score",
            )
        )
        mode = unchecked(gr.Radio(list(MODES), value="vector", label="Mode", elem_id="query-mode"))
    with gr.Accordion("Ranges and sort", open=False, elem_id="query-ranges"):
        ranges = [_range_slot(i) for i in range(RANGE_SLOTS)]
        with gr.Row():
            sort_field = gr.Dropdown(
                label="Sort by", choices=["score"], value="score", interactive=True, elem_id="query-sort"
            )
            sort_dir = unchecked(gr.Radio(list(DIRECTIONS), value="descending", label="Direction"))
    return QueryControls(negative, min_score, mode, ranges, sort_field, sort_dir)


def _range_slot(i: int) -> tuple[gr.Dropdown, gr.Textbox, gr.Textbox]:
    """One "field between from and to" range; the fields (numbers and dates) are filled on page load."""
    with gr.Row():
        field = gr.Dropdown(
            label=f"Range {i + 1}", choices=[], value=None, interactive=True, elem_id=f"range-{i}-field"
        )
        low = gr.Textbox(label="from", lines=1, max_lines=1, elem_id=f"range-{i}-from")
        high = gr.Textbox(label="to", lines=1, max_lines=1, elem_id=f"range-{i}-to")
    return field, low, high


# ---------------------------------------------------------------------------------------------- schema
def schema(service: SearchService) -> dict[str, Any]:
    """field -> FieldInfo of the live index's metadata ({} while no index is loaded)."""
    searcher = service.searcher
    return searcher.store.schema() if searcher is not None else {}


def range_fields(service: SearchService) -> list[str]:
    return sorted(f for f, info in schema(service).items() if info.type in _RANGED)


def sort_fields(service: SearchService) -> list[str]:
    return ["score", *sorted(f for f, info in schema(service).items() if info.type in _SORTABLE)]


def range_hint(service: SearchService, field: Any) -> tuple[Any, Any]:
    """The from/to boxes for ``field``: its smallest and largest value as placeholders. The values are
    left alone: this answer can arrive after a person (or a test) has already typed the bounds."""
    info = schema(service).get(field) if isinstance(field, str) else None
    low = "" if info is None or info.min is None else f"min {info.min}"
    high = "" if info is None or info.max is None else f"max {info.max}"
    return gr.update(placeholder=low), gr.update(placeholder=high)


# ---------------------------------------------------------------------------------------------- composing
def compose_filters(service: SearchService, equal_slots: int, *values: Any) -> dict[str, Any]:
    """The filter object of the page's filter controls: ``equal_slots`` (field, value) pairs, then
    (field, from, to) ranges. Fields named twice are combined with ``$and``."""
    pairs, ranges = values[: 2 * equal_slots], values[2 * equal_slots :]
    clauses = [(f, str(v)) for f, v in zip(pairs[::2], pairs[1::2], strict=False) if _named(f) and _set(v)]
    types = {f: info.type for f, info in schema(service).items()}
    for field, low, high in zip(ranges[::3], ranges[1::3], ranges[2::3], strict=False):
        if not _named(field):
            continue
        bounds = {op: _bound(v, types.get(field)) for op, v in (("$gte", low), ("$lte", high)) if _set(v)}
        if bounds:
            clauses.append((field, bounds))
    if len({f for f, _ in clauses}) == len(clauses):
        return dict(clauses)
    return {"$and": [{f: c} for f, c in clauses]}


def _named(field: Any) -> bool:
    return isinstance(field, str) and bool(field)


def _set(value: Any) -> bool:
    return value is not None and not (isinstance(value, str) and not value.strip())


def _bound(value: Any, kind: str | None) -> Any:
    """A range bound as typed: numbers for number fields (a non-number is left for the service to
    refuse by name), text for dates."""
    text = str(value).strip()
    if kind == "number":
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() and abs(number) < 2**53 else number
    return text


def compose_body(
    text: Any,
    negative: Any,
    weight: Any,
    k: Any,
    min_score: Any,
    mode: Any,
    sort: Any,
    way: Any,
    filters: Any,
) -> dict[str, Any]:
    """The REST body of the page's controls: only fields that differ from the defaults, so the curl line
    stays short. Values are passed as sent; the endpoint validates them."""
    body: dict[str, Any] = {"text": text, "k": k}
    if isinstance(negative, str):
        negative = [t.strip() for t in negative.split(",") if t.strip()]
    optional = {
        "negative": negative or None,
        "weight": None if weight == 0.5 else weight,
        "filters": filters or None,
        "min_score": _cutoff(min_score),
        "mode": None if mode in ("", "vector") else mode,
        "sort": _sort(sort, way),
    }
    return body | {name: value for name, value in optional.items() if value is not None}


def _cutoff(value: Any) -> Any:
    """The cutoff box's text as a number (None when empty: off); other text is left for the endpoint
    to refuse with its reason."""
    if not isinstance(value, str):
        return value
    if not value.strip():
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _sort(field: Any, way: Any) -> Any:
    if field in (None, "", "score"):
        return None
    if not isinstance(field, str):
        return field  # refused by the endpoint, with its reason
    return field if way == "ascending" else f"-{field}"


def compose_page(service: SearchService, equal_slots: int, *values: Any) -> tuple[dict, dict]:
    """The REST body and its filters from all the page's controls, read when the search starts: the
    eight :func:`compose_body` controls, then the filter controls of :func:`compose_filters`.

    Composed in one step on purpose: a filters object kept up to date by per-box events goes stale,
    because gradio's Textbox fires ``.input`` from ``keypress`` only (not on paste, Backspace, autofill).
    """
    filters = compose_filters(service, equal_slots, *values[8:])
    return compose_body(*values[:8], filters), filters


def like_body(body: Any, key: Any) -> dict[str, Any]:
    """The last body, searching for items like ``key`` instead (its text, photo and page dropped)."""
    base = body if isinstance(body, dict) else {}
    return {n: v for n, v in base.items() if n not in ("text", "offset", "image", "weight")} | {"key": key}


def next_body(body: Any, answer: Any) -> dict[str, Any]:
    """The last body at the next page's offset (None at the end: the endpoint refuses it)."""
    base = body if isinstance(body, dict) else {}
    offset = answer.get("next_offset") if isinstance(answer, dict) else None
    return base | {"offset": offset}


# ---------------------------------------------------------------------------------------------- answering
async def run_query(service: SearchService, body: Any, image: Any) -> dict[str, Any]:
    """The REST answer to ``body`` (REST's search fields) with an optional page upload as the photo."""
    request = _request(body)
    fields = request.model_dump(exclude={"image"})
    if request.image is not None and image is not None:
        raise RequestRefused("bad_query", "give the photo as an upload or as image.base64, not both")
    if request.image is not None:
        photo: Any = RestPhoto(service, FetchPolicy(), None, request.image)
    elif image is not None:
        photo = Photo(service, image, required=False)
    else:
        return result(service, await service.answer_async("query", fields, EMPTY_ANY))
    return result(service, await asyncio.to_thread(service.answer, "query", fields, EMPTY_ANY, photo))


def _request(body: Any) -> SearchRequest:
    """The body's shape, checked as the REST API checks it (pydantic), with the same message."""
    if not isinstance(body, dict):
        raise RequestRefused("bad_request", "body must be a JSON object of the REST search fields")
    try:
        return SearchRequest.model_validate(body)
    except (ValidationError, RecursionError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) and exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        message = f"{where}: {first.get('msg', 'invalid request')}"
        raise RequestRefused("bad_request", json.dumps(message)[1:-1][:300]) from None


# ---------------------------------------------------------------------------------------------- curl
def curl_line(body: Any, photo: bool, request: gr.Request | None, login: bool) -> str:
    """The REST call that gives the same result: JSON for a text or item search, multipart with the
    photo. ``login`` adds a ``-u USER:PASS`` placeholder (never the real password)."""
    if not isinstance(body, dict):
        return ""
    base = _server_url(request)
    auth = " -u USER:PASS" if login else ""
    if photo:
        return f"curl{auth} {base}/api/v1/search/image -F image=@photo.jpg" + "".join(
            f" -F {shlex.quote(f'{name}={value}')}" for name, value in _form_fields(body)
        )
    data = json.dumps(body, ensure_ascii=False)
    return (
        f"curl{auth} -X POST {base}/api/v1/search -H 'Content-Type: application/json' -d {shlex.quote(data)}"
    )


def _form_fields(body: dict) -> list[tuple[str, str]]:
    """The body as multipart form fields (the image route's: no mode or sort; filters as JSON)."""
    out: list[tuple[str, str]] = []
    for name in ("text", "weight", "k", "offset", "min_score"):
        if body.get(name) not in (None, ""):
            out.append((name, str(body[name])))
    if body.get("filters"):
        out.append(("filters", json.dumps(body["filters"], ensure_ascii=False)))
    negative = body.get("negative")
    out += [("negative", str(t)) for t in (negative if isinstance(negative, list) else [])]
    return out


def _server_url(request: gr.Request | None) -> str:
    """This server's own URL as the browser reached it; the Host header is checked, not trusted."""
    try:
        url = urlsplit(str(request.url)) if request is not None else None
    except (AttributeError, ValueError):
        url = None
    scheme = url.scheme if url is not None and url.scheme in ("http", "https") else "http"
    host = (request.headers.get("host") if request is not None else None) or (url.netloc if url else "")
    if not isinstance(host, str) or not _HOST.fullmatch(host):
        host = "localhost:7860"
    return f"{scheme}://{host}"
