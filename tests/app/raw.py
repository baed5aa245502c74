"""Gradio's wire protocol spoken by hand, as a hostile client (or the browser) would, without gradio_client.

* ``call_api``: the named-endpoint two-step (``POST /gradio_api/call/<api_name>`` → event id, then
  ``GET /gradio_api/call/<api_name>/<event_id>``, a server-sent event stream).
* ``join_queue``: what the page does for every queued event, named or private (``POST
  /gradio_api/queue/join`` with ``fn_index`` and ``session_hash``, then ``GET /gradio_api/queue/data``).
* ``run_direct``: what the page does for ``queue=False`` events (``POST /gradio_api/run/predict``).

Each returns an :class:`Outcome`; deadlines are per call (httpx timeouts), so a server that stops
answering fails the test instead of hanging it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Outcome:
    status: int  # HTTP status of the request that carried the data (join / call / run)
    ok: bool  # the event completed with output
    output: Any = None  # output data when ok
    error: str | None = None  # the message when not ok (None when the server gave none)

    def text(self) -> str:
        return json.dumps(self.output) if self.ok else str(self.error)


def dependencies(http: httpx.Client, url: str) -> tuple[list[dict], dict[int, dict]]:
    """The page's events (``/config`` dependencies, each with ``fn_index``) and components by id."""
    config = http.get(f"{url}/config", timeout=30).json()
    deps = [dict(d, fn_index=i) for i, d in enumerate(config["dependencies"])]
    return deps, {c["id"]: c for c in config["components"]}


def call_api(http: httpx.Client, url: str, api_name: str, data: Any, timeout: float = 30) -> Outcome:
    response = http.post(f"{url}/gradio_api/call/{api_name}", json={"data": data}, timeout=timeout)
    if response.status_code != 200:
        return Outcome(response.status_code, False, error=response.text)
    event_id = response.json()["event_id"]
    kind, payload = "", None
    with http.stream("GET", f"{url}/gradio_api/call/{api_name}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                payload = json.loads(line[5:])
                break
    if kind == "complete":
        return Outcome(200, True, output=payload)
    error = payload.get("error") if isinstance(payload, dict) else payload
    return Outcome(200, False, error=error)


def join_queue(
    http: httpx.Client,
    url: str,
    fn_index: int,
    data: Any,
    event_data: Any = None,
    timeout: float = 60,
    raw_body: bytes | None = None,
) -> Outcome:
    """One queued event; ``raw_body`` replaces the JSON body (for payloads json.dumps cannot write)."""
    session = uuid.uuid4().hex[:12]
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "event_data": event_data}
    content = raw_body.replace(b"@SESSION@", session.encode()) if raw_body is not None else None
    response = http.post(
        f"{url}/gradio_api/queue/join",
        json=None if content is not None else body,
        content=content,
        headers={"content-type": "application/json"},
        timeout=timeout,
    )
    if response.status_code != 200:
        return Outcome(response.status_code, False, error=response.text[:2000])
    with http.stream(
        "GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}, timeout=timeout
    ) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed":
                out = message.get("output") or {}
                if message.get("success"):
                    return Outcome(200, True, output=out.get("data"))
                return Outcome(200, False, error=out.get("error"))
    return Outcome(200, False, error="stream ended without a result")


def run_direct(http: httpx.Client, url: str, fn_index: int, data: Any, event_data: Any = None) -> Outcome:
    body = {
        "data": data,
        "fn_index": fn_index,
        "session_hash": uuid.uuid4().hex[:12],
        "event_data": event_data,
    }
    response = http.post(f"{url}/gradio_api/run/predict", json=body, timeout=30)
    try:
        payload = response.json()
    except ValueError:
        return Outcome(response.status_code, False, error=response.text[:2000])
    if response.status_code == 200 and isinstance(payload, dict) and "data" in payload:
        return Outcome(200, True, output=payload["data"])
    error = payload.get("error") if isinstance(payload, dict) else None
    if error is None and isinstance(payload, dict):
        error = payload.get("detail")
    return Outcome(response.status_code, False, error=None if error is None else str(error))
