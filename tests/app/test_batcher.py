"""MicroBatcher: concurrent submissions share calls, answers go to the right caller, failures stay local."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from app.batcher import MicroBatcher


def test_concurrent_items_are_batched_and_answered_in_order() -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def square(items: list[int]) -> list[int]:
        gate.wait(5)  # hold the first call so the others queue up behind it
        calls.append(items)
        return [x * x for x in items]

    batcher = MicroBatcher(square, max_batch=8, max_wait_ms=20)
    try:
        futures = [batcher.submit(i) for i in range(20)]
        gate.set()
        assert [f.result(timeout=5) for f in futures] == [i * i for i in range(20)]
        assert len(calls) < 20 and max(len(c) for c in calls) <= 8
        assert batcher.items == 20 and batcher.batches == len(calls)
    finally:
        batcher.close()


def test_one_bad_item_fails_alone() -> None:
    def invert(items: list[int]) -> list[float]:
        return [1 / x for x in items]

    batcher = MicroBatcher(invert, max_batch=16, max_wait_ms=20)
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(batcher, x) for x in (1, 2, 0, 4, 5, 8)]
            results = []
            for f in futures:
                try:
                    results.append(f.result(timeout=5))
                except ZeroDivisionError:
                    results.append("error")
        assert results == [1.0, 0.5, "error", 0.25, 0.2, 0.125]
    finally:
        batcher.close()


def test_build_demo_does_no_work_and_writes_no_stub_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    gr = pytest.importorskip("gradio")
    from app.service import SearchService, ServiceSettings
    from app.ui import build_demo
    from tests.conftest import REPO

    service = SearchService(ServiceSettings(index=str(tmp_path / "none"), refresh_seconds=0))
    demo = build_demo(service)
    assert isinstance(demo, gr.Blocks)
    names = {d.api_name for d in demo.fns.values() if d.api_visibility == "public"}
    assert names == {
        "search_text",
        "search_image",
        "search",
        "more_like",
        "query",  # the page's controls: the REST body in, the REST answer out (docs/web.md)
        "check_drift",
        "drift_status",
        "start_reindex",
    }
    assert not list((REPO / "app").glob("*.pyi"))
