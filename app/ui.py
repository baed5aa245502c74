"""The Gradio page and its named API endpoints, drawn over a :class:`~app.service.SearchService`.

``build_demo(service)`` only declares components and events; nothing is loaded at import or build time
beyond asking the service what it already holds.

Every search is one named, public endpoint that returns the JSON result (``/search_text``,
``/search_image``, ``/search``, ``/more_like``); the page shows that same JSON in "API response" and a
private follow-up step turns it into the gallery, so API clients pay for no thumbnails. Filters travel as
one JSON object (``{"folder": "red"}``), which the page composes, when a search starts, from controls
built from the index's metadata columns. Refusals become ``gr.Error`` with the service's message: a toast
on the page, an exception carrying the message in ``gradio_client``.
"""

from __future__ import annotations

import base64
import functools
import html
from typing import Any

import gradio as gr
from gradio.data_classes import ImageData

from app import ui_query as uq
from app.drift_tab import drift_tab
from app.service import RequestRefused, SearchService
from app.ui_results import show as show_results
from app.upload_gate import REFUSED, is_upload, only_uploads

FILTER_SLOTS = 2
DEFAULT_K = 12

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
                        controls = uq.query_controls(_unchecked)
                        k = _unchecked(
                            gr.Slider(
                                1,
                                max_k,
                                value=min(DEFAULT_K, max_k),
                                step=1,
                                label="Results per page",
                                elem_id="query-k",
                            )
                        )
                        with gr.Accordion("Filters", open=False, elem_id="filters"):
                            slots = [_filter_slot(i) for i in range(FILTER_SLOTS)]
                            filters = gr.JSON(
                                value={}, label="Filters sent with the last search", elem_id="filters-sent"
                            )
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
                        more_btn = gr.Button("Load more", visible=False, elem_id="load-more")
                        table = gr.HTML("")
                        with gr.Accordion("API response (JSON)", open=False, elem_id="api-response"):
                            curl = gr.Code(
                                label="The same search over REST", language="shell", elem_id="curl-line"
                            )
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
        body = _unchecked(gr.JSON(value={}, visible=False))  # the REST body the controls compose
        api_only = gr.Button(visible=False)  # the original endpoints, kept for API clients

        private: dict[str, Any] = {"api_visibility": "private"}
        shown = [gallery, status, table, hits, more_btn, curl]

        def show(append: bool) -> dict:
            def fn(r: Any, b: Any, photo: Any, before: list, request: gr.Request) -> tuple:
                return show_results(service, r, b, photo, before if append else [], request)

            return {"fn": fn, "inputs": [result, body, image, hits], "outputs": shown, **private}

        refresh_page = {
            "fn": lambda: _page(service),
            "outputs": [
                header,
                empty,
                *[s[0] for s in slots],
                *[r[0] for r in controls.ranges],
                controls.sort_field,
            ],
        }

        async def query(body: Any, image: Any) -> dict:
            """Search with the REST API's body (its fields and JSON answer); ``image``: an optional upload."""
            return await _refused_as_error(uq.run_query(service, body, image))

        async def page_query(b: Any, photo: Any) -> dict:  # "more like" and "load more": a key wins
            return await query(b, None if isinstance(b, dict) and b.get("key") else photo)

        filter_inputs = [c for pair in slots for c in pair] + [c for r in controls.ranges for c in r]
        compose_inputs = [text, controls.negative, weight, k, controls.min_score, controls.mode]
        compose_inputs += [controls.sort_field, controls.sort_dir, *filter_inputs]
        compose = {"fn": _compose(service), "inputs": compose_inputs, "outputs": [body, filters], **private}
        named = {"fn": query, "inputs": [body, image], "outputs": [result]}
        for i, trigger in enumerate([text.submit, search_btn.click, image.upload]):
            visible = {"api_name": "query"} if i == 0 else private  # one named endpoint, three triggers
            ev = trigger(**compose, queue=False).success(**named, **visible)
            ev.success(**show(append=False))
        again = {"fn": page_query, "inputs": [body, image], "outputs": [result], **private}
        more = more_btn.click(uq.next_body, inputs=[body, result], outputs=[body], queue=False, **private)
        more.success(**again).success(**show(append=True))
        pick = gallery.select(_picked, inputs=[hits], outputs=[key], queue=False, **private)
        like = pick.success(uq.like_body, inputs=[body, key], outputs=[body], queue=False, **private)
        like.success(**again).success(**show(append=False))
        cleared = ([], "", "", [], gr.update(visible=False), "")
        clear_btn.click(lambda: cleared, outputs=shown, **private)
        _legacy_endpoints(service, api_only, result, image, text, weight, k, filters, key)

        for field, value in slots:
            field.change(lambda f: _values(service, f), inputs=[field], outputs=[value], **private)
        for field, low, high in controls.ranges:
            hint = {"inputs": [field], "outputs": [low, high], "queue": False, **private}
            field.change(lambda f: uq.range_hint(service, f), **hint)

        def index(a: Any, b: Any, request: gr.Request, progress: gr.Progress = gr.Progress()) -> str:  # noqa: B008
            sent = [*(a if isinstance(a, list) else [a]), *(b if isinstance(b, list) else [b])]
            return _index(service, [f for f in sent if f is not None], progress, request)

        index_ev = index_btn.click(index, inputs=[files, folder], outputs=[index_status], **private)
        index_ev.then(**refresh_page, **private)
        demo.load(**refresh_page, **private)
    only_uploads(demo)
    return demo


def _legacy_endpoints(service: SearchService, trigger: gr.Button, result: gr.JSON, *inputs: Any) -> None:
    """``/search_text``, ``/search_image``, ``/search`` and ``/more_like`` with their original
    parameters and JSON, for API clients (the page itself searches through ``/query``)."""
    image, text, weight, k, filters, key = inputs

    def endpoint(name: str, fn: Any, args: list) -> None:
        trigger.click(fn, inputs=args, outputs=[result], api_name=name)

    endpoint("search_text", _api_async(service.search_text_async), [text, k, filters])
    endpoint("search_image", _api_async(service.search_image_async), [image, k, filters])
    endpoint("search", _api(service.search), [image, text, weight, k, filters])
    endpoint("more_like", _api(service.more_like), [key, k, filters])


async def _refused_as_error(answer: Any) -> dict:
    try:
        return await answer
    except RequestRefused as exc:
        raise gr.Error(str(exc), title="Cannot search", print_exception=False) from None


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
    ranged = [gr.update(choices=uq.range_fields(service)) for _ in range(uq.RANGE_SLOTS)]
    sort = gr.update(choices=uq.sort_fields(service))
    empty = gr.update(value=_empty_state(service), visible=not service.ready)
    return (_header(service), empty, *updates, *ranged, sort)


def _values(service: SearchService, field: str | None) -> Any:
    values = service.metadata_fields().get(field or "", [])
    return gr.update(choices=values, value=None)


def _compose(service: SearchService) -> Any:
    """The REST body and filters of the page's controls at the moment of the search
    (:func:`app.ui_query.compose_page`)."""
    return lambda *values: uq.compose_page(service, FILTER_SLOTS, *values)


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
