"""Every event of the page, called the way the browser calls it, with hostile values.

The events are enumerated from the live server's ``/config`` (named endpoints and private steps alike:
render, filter dropdowns, gallery select, clear, index button, drift tab, page load), so an event added
later is fuzzed too. Each is called through the route the page uses for it (``queue/join`` for queued
events, ``run/predict`` for ``queue=False`` ones) with server-side paths (as strings and as FileData,
with and without ``meta``), wrong types, huge values, deeply nested JSON, wrong arity and hostile event
data. Every call must end in a clear error or a harmless result: no 5xx but Gradio's own convention for
refusing a direct call (500 with the message), no internal exception text, no traceback from our code
in the server log, nothing read from outside the index, nothing copied into the upload cache; and the
server answers normally afterwards.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.app.live import LiveServer
from tests.app.raw import Outcome, dependencies, join_queue, run_direct

FD = {"_type": "gradio.FileData"}
MB = "x" * 1_000_000
HOSTILE: dict[str, Any] = {
    "path-string": "/etc/passwd",
    "filedata": {"path": "/etc/passwd", "meta": FD},
    "filedata-device": {"path": "/dev/zero", "meta": FD},
    "filedata-no-meta": {"path": "/etc/passwd"},
    "filedata-list": [{"path": "/etc/passwd", "meta": FD}, {"path": "/dev/zero"}],
    "url": {"path": "http://127.0.0.1:9/x.jpg", "meta": FD, "url": "http://127.0.0.1:9/x.jpg"},
    "null": None,
    "huge-int": 10**12,
    "bigger-than-float": 10**400,
    "negative-float": -1.5,
    "bool": True,
    "list": ["a", 1, None],
    "dict": {"a": {"b": [1, 2]}},
    "forged-result": {"hits": [{"key": "/etc/passwd", "path": "/etc/passwd", "score": "x"}, 7, None]},
    "megabyte-string": MB,
    "megabyte-key": {MB: MB},
    "nested-500": functools.reduce(lambda inner, _: [inner], range(500), []),
}
EVENT_DATA = {
    "none": None,
    "index-huge": {"index": 10**12, "value": None},
    "index-negative": {"index": -1},
    "index-string": {"index": "0"},
    "index-list": {"index": [10**9, 0]},
    "not-an-object": "garbage",
    "filedata": {"index": 0, "value": {"path": "/etc/passwd", "meta": FD}},
}
DEPTH = 100_000
#: Messages that are Python's, not ours: an exception escaped somewhere and its text reached the client.
INTERNAL = re.compile(
    r"object is not|has no attribute|unhashable|positional argument|NoneType|invalid literal|list index|"
    r"not subscriptable|unexpected keyword|recursion|Traceback|KeyError|IndexError|TypeError|Overflow|"
    r"search failed"  # the service's own word for an unexpected exception
)


@pytest.fixture(scope="module")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client() as client:
        yield client


def backend_events(http: httpx.Client, url: str) -> list[dict]:
    deps, _ = dependencies(http, url)
    events = [d for d in deps if d.get("backend_fn")]
    assert len(events) >= 20, "the page should have at least 20 server-side events"
    return events


def call(http: httpx.Client, url: str, dep: dict, data: Any, event_data: Any = None, **kw: Any) -> Outcome:
    """The route the page uses for this event."""
    if dep["queue"] is False:
        return run_direct(http, url, dep["fn_index"], data, event_data)
    return join_queue(http, url, dep["fn_index"], data, event_data, **kw)


def judge(dep: dict, case: str, outcome: Outcome) -> str | None:
    """Why this outcome is unacceptable, or None."""
    where = f"{dep.get('api_name')} (fn {dep['fn_index']}) with {case}"
    if outcome.ok:
        return f"{where}: served /etc/passwd" if "root:x:0:0" in outcome.text() else None
    if not isinstance(outcome.error, str) or not outcome.error.strip():
        return f"{where}: HTTP {outcome.status} without a message"
    if INTERNAL.search(outcome.error[:2000]):
        return f"{where}: internal error text reached the client: {outcome.error[:300]}"
    if outcome.status >= 500 and not (outcome.status == 500 and dep["queue"] is False):
        return f"{where}: HTTP {outcome.status}: {outcome.error[:300]}"
    return None


def our_tracebacks(log: str) -> list[str]:
    """Tracebacks in the server log that pass through the app or the core (Gradio's own are its business)."""
    blocks = [re.split(r"\n\d{4}-\d\d-\d\d ", b)[0] for b in log.split("Traceback (most recent call last):")]
    return [b[:1500] for b in blocks[1:] if re.search(r'File "[^"]*/(app|vitrine)/', b)]


def test_every_event_survives_hostile_values(http: httpx.Client, live_server: LiveServer) -> None:
    url, log_start = live_server.url, len(live_server.log_text())
    cached = sorted(p.name for p in live_server.uploads.rglob("*") if p.is_file())
    problems: list[str] = []
    events = backend_events(http, url)
    for dep in events:
        n = len(dep["inputs"])
        for case, value in HOSTILE.items():
            problems.append(judge(dep, case, call(http, url, dep, [value] * max(n, 1))))
        for wrong in ([], [None] * (n + 2)):
            problems.append(judge(dep, f"{len(wrong)} inputs", call(http, url, dep, wrong)))
        if dep.get("collects_event_data"):
            for case, event in EVENT_DATA.items():
                problems.append(judge(dep, f"event data {case}", call(http, url, dep, [None] * n, event)))
    assert [p for p in problems if p] == [], "\n".join(p for p in problems if p)
    assert our_tracebacks(live_server.log_text()[log_start:]) == []
    after = sorted(p.name for p in live_server.uploads.rglob("*") if p.is_file())
    assert not {"passwd", "zero"} & set(after), sorted(set(after) - set(cached))
    assert_healthy(http, live_server)


def test_deeply_nested_json_is_refused_cleanly(http: httpx.Client, live_server: LiveServer) -> None:
    deep = b"[" * DEPTH + b"]" * DEPTH
    for dep in backend_events(http, live_server.url):
        if dep["queue"] is False or not dep["inputs"]:
            continue
        data = b",".join([deep] * len(dep["inputs"]))
        body = b'{"fn_index": %d, "session_hash": "@SESSION@", "data": [%s]}' % (dep["fn_index"], data)
        outcome = join_queue(http, live_server.url, dep["fn_index"], None, raw_body=body)
        assert judge(dep, "deep nesting", outcome) is None, outcome
    assert_healthy(http, live_server)


def assert_healthy(http: httpx.Client, server: LiveServer, seconds: float = 20) -> None:
    """/healthz is 200 and a normal search is answered, within the deadline."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if http.get(f"{server.url}/healthz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            continue
    else:
        raise AssertionError("the server stopped answering /healthz")
    deps, _ = dependencies(http, server.url)
    search = next(d for d in deps if d.get("api_name") == "search_text")
    outcome = join_queue(http, server.url, search["fn_index"], ["pattern number 3", 3, {}])
    assert outcome.ok and len(outcome.output[0]["hits"]) == 3, outcome
