"""The Drift tab: is the index stale, what happened to it, and (admin) rebuild it.

Drawn over ``service.drift`` (:class:`app.monitor.DriftMonitor`) and ``service.check_drift``. API
endpoints: ``/drift_status`` (status JSON, read-only, public), ``/check_drift`` (run a check now: it writes
a report) and ``/start_reindex``; the two that write need the ``--admin`` setting and a ``write`` token of
the client's rate limit (refused otherwise, nothing done). A timer refreshes the status every
``REFRESH_SECONDS`` so a running reindex and reports from cron jobs show up without reloading.
"""

from __future__ import annotations

import html
import time
from typing import Any

import gradio as gr
import pandas as pd

from app.monitor import JobRefused
from app.service import RequestRefused, SearchService
from vitrine.errors import VitrineError

REFRESH_SECONDS = 10.0
PLOTTED = {"auc": "AUC (0.5 = calm)", "p_value": "p-value", "mean_shift": "mean shift"}
COLOURS = dict(zip(PLOTTED.values(), ("#2563eb", "#f97316", "#16a34a"), strict=True))


def drift_tab(service: SearchService) -> None:
    """Declare the tab's components and events inside the caller's ``gr.Blocks``."""
    with gr.Tab("Drift", id="drift"):
        gr.Markdown(
            "Is the index still right for what comes in and what people ask? Reports compare newly "
            "indexed photos with the generation's reference sample and recent queries with its first "
            "ones (MMD permutation test, domain-classifier AUC, mean shift); a new model is caught "
            "from its fingerprint. Checks run here, from `python -m indexer drift`, or a reindex scheduler. "
            "With captioned items, *Quality* is the live generation's text→image R@10 on its own captions "
            "(per `--quality-slice` value too)."
        )
        status = service.drift.status()
        summary = gr.HTML(_summary(status), elem_id="drift-summary")
        plot = gr.LinePlot(
            _history(status),
            x="time",
            y="value",
            color="metric",
            color_map=COLOURS,
            title="Drift history",
            height=260,
            y_lim=[0, 1],
            elem_id="drift-plot",
        )
        with gr.Row():
            check_btn = gr.Button("Check drift now", interactive=service.drift.admin, elem_id="drift-check")
            reindex_btn = gr.Button(
                "Start reindex", variant="stop", interactive=service.drift.admin, elem_id="drift-reindex"
            )
        note = gr.Markdown("" if service.drift.admin else "_Checks and reindexing need `--admin`._")
        with gr.Accordion("Latest report (JSON)", open=False):
            report = gr.JSON(label="report")
        outputs = [summary, plot, report]

        def refresh() -> tuple:
            status = service.drift.status()
            return _summary(status), _history(status), status["latest"] or {}

        gr.Timer(REFRESH_SECONDS).tick(refresh, outputs=outputs, api_visibility="private")
        check_fn = _writer(service, service.check_drift)
        check = check_btn.click(check_fn, outputs=[report], api_name="check_drift")
        check.then(refresh, outputs=outputs, api_visibility="private")
        start = reindex_btn.click(
            _writer(service, service.drift.start_reindex), outputs=[report], api_name="start_reindex"
        )
        start.then(
            lambda: f"Reindex started at {time.strftime('%H:%M:%S')}.",
            outputs=[note],
            api_visibility="private",
        )
        status_btn = gr.Button("Refresh", size="sm")
        status_btn.click(lambda: service.drift.status(), outputs=[report], api_name="drift_status")
        status_btn.click(refresh, outputs=outputs, api_visibility="private")


def _writer(service: SearchService, method: Any) -> Any:
    """An event that writes: refused unless ``--admin``, then rate-limited per client, then ``method``."""

    def call(request: gr.Request) -> dict:
        try:
            if not service.settings.admin:
                raise JobRefused("this writes to the index directory: start the app with --admin")
            service.limiter.take("write", request.client.host if request.client else "")
            return method()
        except (RequestRefused, VitrineError) as exc:
            raise gr.Error(str(exc), title="Drift", print_exception=False) from None

    return call


def _history(status: dict[str, Any]) -> pd.DataFrame | None:
    rows = [
        {"time": pd.to_datetime(r["time"], unit="s"), "metric": label, "value": float(r[key])}
        for r in status["history"]
        for key, label in PLOTTED.items()
        if r.get(key) is not None
    ]
    if not rows:  # None, not an empty frame: a chart first drawn empty never draws its lines later
        return None
    return pd.DataFrame(rows).astype({"time": "datetime64[ns]", "metric": str, "value": float})


def _quality(q: dict[str, Any]) -> str:
    """The live generation's text→image R@10, and per slice with its interval and item count."""
    head = (
        f"text→image R@10 <b>{q['recall']:.1f}</b> on {q['items']:,} captioned items "
        f"({q['captions']:,} captions) of <code>{html.escape(str(q['generation']))}</code>"
    )
    if not q["slices"]:
        return head
    cells = "".join(
        f"<tr><td>{html.escape(s['value'])}</td><td>{s['recall']:.1f}</td>"
        f"<td>{s['interval'][0]:.1f}–{s['interval'][1]:.1f}</td><td>{s['items']:,}</td></tr>"
        for s in q["slices"]
    )
    return (
        f"{head}; per <code>{html.escape(str(q['field']))}</code>:"
        "<table class='vitrine-table' id='quality-slices'><tr><th>value</th><th>R@10</th>"
        f"<th>95% interval</th><th>items</th></tr>{cells}</table>"
    )


def _summary(status: dict[str, Any]) -> str:
    latest, job, last = status["latest"], status["job"], status["last_reindex"]
    if latest is None:
        verdict = (
            "<b>No drift check yet.</b> Press <i>Check drift now</i> or run "
            "<code>python -m indexer drift</code>."
        )
    else:
        word = "Drift detected" if latest["drifted"] else "No drift"
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(latest.get("time", 0)))
        verdict = (
            f"<b>{word}</b> ({html.escape(str(latest.get('source')))}, generation "
            f"<code>{html.escape(str(latest.get('generation')))}</code>, {when})"
            f"<br>{html.escape(latest['reason'])}"
        )
    rows = [("Status", verdict)]
    ref = status["reference"]
    if ref:
        rows.append(
            (
                "Reference",
                f"{ref['size']:,} of {ref['index_count']:,} items of <code>{ref['generation']}</code>",
            )
        )
    quality = status.get("quality")
    if quality:
        rows.append(("Quality", _quality(quality)))
    if last:
        checks = (last.get("validation") or {}).items()
        numbers = ", ".join(f"{k} {v}" for k, v in checks if v is not None and not isinstance(v, list))
        rows.append(
            (
                "Last reindex",
                f"{html.escape(str(last.get('status')))}: {html.escape(str(last.get('from_generation')))} → "
                f"{html.escape(str(last.get('to_generation')))} ({html.escape(numbers)}) "
                f"{html.escape(str(last.get('reason') or ''))}",
            )
        )
    rows.append(
        (
            "Reindex job",
            html.escape(job["state"]) + (f" (exit {job['returncode']})" if job.get("returncode") else ""),
        )
    )
    rows.append(("Query sampling", "on" if status["recording"] else "off"))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table class='vitrine-table'>{body}</table>"
