"""The Gradio page and its named API endpoints, drawn over a :class:`~app.service.SearchService`.

``build_demo(service)`` only declares components and events; nothing is loaded at import or build time
beyond asking the service what it already holds.

Every search is one named, public endpoint that returns the JSON result (``/search_text``,
``/search_image``, ``/search``, ``/more_like``); the page shows that same JSON in "API response" and a
private follow-up step turns it into the gallery, so API clients pay for no thumbnails. Filters travel as
one JSON object (``{"folder": "red"}``), which the page composes from dropdowns built from the index's
metadata columns. Refusals become ``gr.Error`` with the service's message: a toast on the page, an
exception carrying the message in ``gradio_client``.
"""

from __future__ import annotations

import base64
import functools
import html
import json
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData
from PIL import Image

from app.drift_tab import drift_tab
from app.service import RequestRefused, SearchService
from app.upload_gate import REFUSED, is_upload, only_uploads

FILTER_SLOTS = 2
DEFAULT_K = 12
_PLACEHOLDER = (236, 238, 242)

CSS = """
#vitrine-header {padding: 4px 0 0 0;}
#vitrine-header h1 {font-size: 1.9rem; margin: 0; letter-spacing: -0.02em;}
#vitrine-header p {margin: 2px 0 0 0; color: var(--body-text-color-subdued);}
.vitrine-badges {display: flex; gap: 6px; flex-wrap: wrap; margin-top: 8px;}
.vitrine-badge {font-size: 0.78rem; padding: 2px 10px; border-radius: 999px;
  background: var(--background-fill-secondary); border: 1px solid var(--border-color-primary);}
.vitrine-empty {padding: 18px 20px; border-radius: 12px; border: 1px dashed var(--border-color-primary);
  background: var(--background-fill-secondary);}
.vitrine-empty code {font-size: 0.85rem;}
#vitrine-status {min-height: 1.5em;}
.vitrine-table {width: 100%; font-size: 0.85rem; border-collapse: collapse;}
.vitrine-table td, .vitrine-table th {padding: 4px 8px; border-bottom: 1px solid var(--border-color-primary);
  text-align: left; vertical-align: top;}
"""


def _upload_path(payload: ImageData | None, blocks: gr.Blocks) -> Any:
    """Replacement ``preprocess`` for the query image: the upload's path (or data-URL bytes), undecoded.

    The stock ``gr.Image`` opens every upload with PIL before our code runs, so a bomb or a text file would
    fail inside Gradio with a generic error; decoding is the service's job (limits, clear reasons).
    """
    if payload is None:
        return None
    if payload.path:  # only_uploads already refused anything else; this keeps the rule local too
        if not is_upload(blocks, payload.path):
            raise gr.Error(REFUSED, title="Refused", print_exception=False)
        return str(payload.path)
    if payload.url and payload.url.startswith("data:"):
        try:
            return base64.b64decode(payload.url.split(",", 1)[1])
        except (ValueError, IndexError):
            return b""
    return None


def _unchecked(component: gr.components.Component, preprocess: Any = lambda payload: payload) -> Any:
    """Swap one component's ``preprocess`` so values reach the service as sent (an out-of-range ``k``
    then gets the service's message and is counted under ``errors_total`` like every other refusal).

    Done per instance on purpose: subclassing a Gradio component makes Gradio write a ``.pyi`` stub
    beside this module at import time.
    """
    component.preprocess = preprocess  # type: ignore[method-assign]
    return component


def build_demo(service: SearchService) -> gr.Blocks:
    """The page: query panel, gallery, result table, filters, upload-to-index; see the module docstring."""
    max_k = service.limits.max_k
    with gr.Blocks(title="Vitrine — image search") as demo:
        header = gr.HTML(_header(service), elem_id="vitrine-header")
        empty = gr.HTML(_empty_state(service), visible=not service.ready)
        with gr.Tabs():
            with gr.Tab("Search", id="search"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=300):
                        image = _unchecked(
                            gr.Image(
                                label="Photo",
                                type="filepath",
                                sources=["upload", "clipboard"],
                                height=240,
                                elem_id="query-image",
                            ),
                            lambda payload: _upload_path(payload, demo),
                        )
                        text = _unchecked(
                            gr.Textbox(  # a list must be refused, not stringified
                                label="Description",
                                placeholder="a dog running on the beach — or, with a photo: 'but in red'",
                                lines=1,
                                max_lines=3,
                                elem_id="query-text",
                            )
                        )
                        weight = _unchecked(
                            gr.Slider(0, 1, value=0.5, step=0.05, label="Text weight (photo + text)")
                        )
                        k = _unchecked(
                            gr.Slider(1, max_k, value=min(DEFAULT_K, max_k), step=1, label="Results (top-k)")
                        )
                        with gr.Accordion("Filters", open=False):
                            slots = [_filter_slot(i) for i in range(FILTER_SLOTS)]
                            filters = gr.JSON(value={}, label="Filters sent with each search")
                        with gr.Row():
                            search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                            clear_btn = gr.ClearButton([image, text], value="Clear")
                    with gr.Column(scale=3):
                        status = gr.Markdown("", elem_id="vitrine-status")
                        gallery = gr.Gallery(
                            label="Matches — click one for more like it",
                            columns=4,
                            height=560,
                            object_fit="cover",
                            allow_preview=False,
                            elem_id="results",
                        )
                        table = gr.HTML("")
                        with gr.Accordion("API response (JSON)", open=False):
                            result = gr.JSON(label="result")
                with gr.Accordion("Index photos", open=not service.ready, visible=service.settings.admin):
                    gr.Markdown(
                        "Add photos to the index (it is created on first use); a search sees them at once."
                    )
                    with gr.Row():
                        files = gr.File(label="Photos", file_count="multiple")
                        folder = gr.File(label="…or a folder", file_count="directory")
                    index_btn = gr.Button(
                        "Index these photos", variant="primary" if not service.ready else "secondary"
                    )
                    index_status = gr.Markdown("")
            drift_tab(service)
        hits = gr.State([])
        key = gr.Textbox(visible=False)

        private: dict[str, Any] = {"api_visibility": "private"}
        show = {
            "fn": lambda r: _render(service, r),
            "inputs": [result],
            "outputs": [gallery, status, table, hits],
        }
        refresh_page = {"fn": lambda: _page(service), "outputs": [header, empty, *[s[0] for s in slots]]}

        def endpoint(name: str, fn: Any, inputs: list) -> Any:
            return {"fn": fn, "inputs": inputs, "outputs": [result], "api_name": name}

        by_text = _api_async(service.search_text_async)
        text_ev = text.submit(**endpoint("search_text", by_text, [text, k, filters]))
        text_ev.success(**show, **private)
        image_ev = image.upload(**endpoint("search_image", _api(service.search_image), [image, k, filters]))
        image_ev.success(**show, **private)
        both = search_btn.click(**endpoint("search", _api(service.search), [image, text, weight, k, filters]))
        both.success(**show, **private)
        pick = gallery.select(_picked, inputs=[hits], outputs=[key], queue=False, **private)
        pick.success(**endpoint("more_like", _api(service.more_like), [key, k, filters])).success(
            **show, **private
        )
        clear_btn.click(lambda: ([], "", "", []), outputs=[gallery, status, table, hits], **private)

        for field, value in slots:
            field.change(lambda f: _values(service, f), inputs=[field], outputs=[value], **private)
        filter_inputs = [c for pair in slots for c in pair]
        for comp in filter_inputs:
            comp.change(_compose, inputs=filter_inputs, outputs=[filters], queue=False, **private)

        def index(a: Any, b: Any, request: gr.Request, progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008
            sent = [*(a if isinstance(a, list) else [a]), *(b if isinstance(b, list) else [b])]
            return _index(service, [f for f in sent if f is not None], progress, request)

        index_ev = index_btn.click(index, inputs=[files, folder], outputs=[index_status], **private)
        index_ev.then(**refresh_page, **private)
        demo.load(**refresh_page, **private)
    only_uploads(demo)
    return demo


def _filter_slot(i: int) -> tuple[gr.Dropdown, gr.Dropdown]:
    """One "field equals value" pair; the choices are filled from the index's metadata on page load."""
    field = gr.Dropdown(label=f"Field {i + 1}", choices=[], value=None, interactive=True)
    value = gr.Dropdown(label="equals", choices=[], value=None, allow_custom_value=True, interactive=True)
    return field, value


def _api(method: Any) -> Any:
    """Wrap a service method: RequestRefused → gr.Error with the same message (the metric is recorded)."""

    @functools.wraps(method)  # keeps the parameter names, which name the API's parameters
    def call(*args: Any) -> dict:
        try:
            return method(*args)
        except RequestRefused as exc:
            raise gr.Error(str(exc), title="Cannot search", print_exception=False) from None

    return call


def _api_async(method: Any) -> Any:
    """:func:`_api` for a coroutine method (Gradio awaits it on the event loop, no worker thread)."""

    @functools.wraps(method)
    async def call(*args: Any) -> dict:
        try:
            return await method(*args)
        except RequestRefused as exc:
            raise gr.Error(str(exc), title="Cannot search", print_exception=False) from None

    return call


def _picked(hits: list[dict], evt: gr.EventData) -> str:
    """The key of the clicked result. The event's data is read raw (``gr.SelectData`` would fail inside
    Gradio on a client that sends none) and the index must name one of this session's results."""
    data = getattr(evt, "_data", None)
    index = data.get("index") if isinstance(data, dict) else None
    index = index[0] if isinstance(index, list) and index else index
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(hits or []):
        raise gr.Error("choose one of the results shown to search for more like it", print_exception=False)
    return hits[index]["key"]


def _render(service: SearchService, result: Any) -> tuple[list, str, str, list]:
    """Gallery, status and table of a result. The result comes back from the client, so only its keys
    and scores are used: each key is looked up in the index, and unknown keys are left out."""
    sent = result.get("hits") if isinstance(result, dict) else None
    shown = []
    for hit in (sent if isinstance(sent, list) else [])[: service.limits.max_k]:
        key = hit.get("key") if isinstance(hit, dict) else None
        item = service.item(key)
        if item is not None:
            shown.append({**item, "score": _score(hit.get("score"))})
    items = [
        (service.thumbnail(h["key"]) or Image.new("RGB", (320, 240), _PLACEHOLDER), _caption(h))
        for h in shown
    ]
    took = result.get("took_ms") if isinstance(result, dict) else None
    status = (
        f"**{len(shown)} matches**{_took(took)} · model `{_plain(result.get('model_version'))}` · "
        f"index `{_plain(result.get('generation'))}`"
        if shown
        else "No matches (try removing filters)."
    )
    return items, status, _table(shown), [{"key": h["key"]} for h in shown]


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


def _header(service: SearchService) -> str:
    info = service.info()
    if service.ready:
        badges = [
            f"model {info['model']}",
            f"version {info['model_version']}",
            f"index {info['generation']}",
            f"{info['count']:,} images",
        ]
    else:
        badges = ["no index loaded"]
    spans = "".join(f"<span class='vitrine-badge'>{html.escape(str(b))}</span>" for b in badges)
    return (
        "<h1>Vitrine</h1><p>Search your catalog by photo, by description, or both.</p>"
        f"<div class='vitrine-badges' id='vitrine-version'>{spans}</div>"
    )


def _empty_state(service: SearchService) -> str:
    index = html.escape(service.settings.index)
    if service.load_error:
        title, body = "The index could not be loaded", html.escape(service.empty_message())
    else:
        title, body = "No index yet", f"There is nothing to search in <code>{index}</code> yet."
    return (
        f"<div class='vitrine-empty'><h3>{title}</h3><p>{body}</p>"
        f"<p>Build it from a terminal: <code>python -m indexer build path/to/photos --index {index}</code> — "
        "this page picks it up within seconds, no restart needed."
        + (" Or upload photos under <b>Index photos</b> below." if service.settings.admin else "")
        + "</p></div>"
    )


def _page(service: SearchService) -> tuple:
    fields = sorted(service.metadata_fields())
    updates = [gr.update(choices=fields) for _ in range(FILTER_SLOTS)]
    return (_header(service), gr.update(value=_empty_state(service), visible=not service.ready), *updates)


def _values(service: SearchService, field: str | None) -> Any:
    values = service.metadata_fields().get(field or "", [])
    return gr.update(choices=values, value=None)


def _compose(*pairs: Any) -> dict[str, str]:
    out: dict[str, str] = {}
    for field, value in zip(pairs[::2], pairs[1::2], strict=True):
        if field and value not in (None, ""):
            out[str(field)] = str(value)
    return out


def _index(service: SearchService, files: list, progress: gr.Progress, request: gr.Request) -> str:
    client = request.client.host if request.client else ""
    try:
        step = lambda done, total: progress((done, total), desc="indexing")  # noqa: E731
        report = service.build_index(files, step, client)
    except RequestRefused as exc:
        raise gr.Error(str(exc), title="Cannot index", print_exception=False) from None
    failed = "".join(f"\n- {f['path'].rsplit('/', 1)[-1]}: {f['reason']}" for f in report["failures"][:10])
    return (
        f"Indexed **{report['added']}** new photos ({report['count']} in the index), "
        f"{report['failed']} failed.{failed}"
    )
