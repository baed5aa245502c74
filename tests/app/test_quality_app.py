"""The live generation's per-slice recall (issue 15): measured in the background from the index's own
captions, shown in the Drift tab's status and exported on /metrics; real tiny CLIP, FAISS, SQLite, and
a real server over HTTP."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client

from app.service import SearchService, ServiceSettings
from tests.app.live import build_index, make_catalog, start_server, stop
from vitrine.catalog.readers import open_catalog
from vitrine.evaluate import evaluate_catalog


def test_live_quality_per_slice_matches_evaluate_and_reaches_metrics(tmp_path: Path, clip_path: Path) -> None:
    from app.drift_tab import _summary

    manifest = make_catalog(tmp_path / "catalog")
    build_index(manifest, tmp_path / "index", clip_path)
    settings = ServiceSettings(
        index=str(tmp_path / "index"),
        encoder_kwargs={"device": "cpu"},
        refresh_seconds=0,
        quality_slice="color",
    )
    service = SearchService(settings)
    try:
        assert service.searcher is not None and service.drift.status()["quality"] is None
        service.drift.poll(service.searcher)
        service.drift.quality.wait(120)
        quality = service.drift.status()["quality"]
        expected = evaluate_catalog(
            service.searcher.encoder, open_catalog(manifest), (10,), slice_field="color"
        )
        assert quality["items"] == 24 and quality["captions"] == 24 and quality["field"] == "color"
        assert quality["recall"] == pytest.approx(expected.t2i["R@10"], abs=0.01)
        by_value = {s["value"]: s for s in quality["slices"]}
        assert set(by_value) == {"red", "blue", "green"}
        for s in expected.slices:
            assert by_value[s.value]["items"] == s.images == 8
            assert by_value[s.value]["recall"] == pytest.approx(s.t2i["R@10"], abs=0.01)
            assert by_value[s.value]["interval"] == s.t2i_ci["R@10"]
        body = service.metrics.render()[0].decode()
        assert f'vitrine_quality_recall{{slice="(all)"}} {float(quality["recall"])}' in body
        assert 'vitrine_quality_items{slice="red"} 8.0' in body
        html = _summary(service.drift.status())
        assert "id='quality-slices'" in html and "<td>green</td>" in html
        service.drift.poll(service.searcher)  # measured already: no second run for the same state
        assert service.drift.quality._thread is not None and not service.drift.quality._thread.is_alive()
    finally:
        service.close()


def test_the_live_server_exports_slice_recall(tmp_path: Path, clip_path: Path) -> None:
    build_index(make_catalog(tmp_path / "catalog"), tmp_path / "index", clip_path)
    url, proc = start_server(tmp_path / "index", tmp_path / "server.log", "--quality-slice", "shop")
    try:
        deadline, body = time.monotonic() + 60, ""
        while 'slice="shop1"' not in body and time.monotonic() < deadline:
            with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
                body = r.read().decode()
            time.sleep(0.3)
        assert 'vitrine_quality_items{slice="shop0"} 12.0' in body and 'slice="(all)"' in body, body[-2000:]
        status = Client(url, verbose=False, download_files=False).predict(api_name="/drift_status")
        assert {s["value"] for s in status["quality"]["slices"]} == {"shop0", "shop1"}
    finally:
        stop(proc)
