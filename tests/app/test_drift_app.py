"""The app's side of drift: queries are sampled, checks are recorded and exported, the Drift tab's API
answers, and an admin-started reindex is picked up by the running service."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from prometheus_client.parser import text_string_to_metric_families

from app.monitor import JobRefused
from app.service import SearchService, ServiceSettings
from tests.app.live import LiveServer, build_index, make_catalog
from vitrine.drift import reference
from vitrine.drift.assess import assess
from vitrine.drift.journal import Journal


def gauges(service: SearchService) -> dict[tuple[str, tuple], float]:
    body = service.metrics.render()[0].decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


@pytest.fixture()
def service(tmp_path: Path, clip_path: Path):
    build_index(make_catalog(tmp_path / "catalog"), tmp_path / "index", clip_path)
    svc = SearchService(
        ServiceSettings(index=str(tmp_path / "index"), encoder_kwargs={"device": "cpu"}, refresh_seconds=0)
    )
    yield svc
    svc.close()


def test_answered_queries_are_sampled_by_mode_without_their_text(service: SearchService, tmp_path: Path):
    assert reference.load(service.settings.index) is not None, "the first build stores the reference"
    for i in range(12):
        service.search_text(f"pattern number {i}")
    service.search(str(tmp_path / "catalog" / "images" / "p001.jpg"), "a pattern", 0.5)
    assert service.drift.recorder is not None
    assert service.drift.recorder.flush() == 13
    journal = Journal(service.settings.index)
    info = service.info()
    sample = journal.sample("query_baseline", info["generation"], info["model_version"])
    assert sorted(m["mode"] for m in sample.metadata) == ["both"] + ["text"] * 12
    with contextlib.closing(sqlite3.connect(f"file:{journal.path}?mode=ro", uri=True)) as conn:
        stored = conn.execute("SELECT COUNT(*) FROM samples WHERE text IS NOT NULL").fetchone()[0]
    assert stored == 0


def test_a_check_is_recorded_and_exported_to_metrics(service: SearchService):
    report = service.check_drift()
    assert {"drifted", "p_value", "auc", "mean_shift", "slices", "reason"} <= set(report)
    assert report["drifted"] is False and "not enough live samples" in report["reason"]
    status = service.drift.status()
    assert status["latest"]["time"] == report["time"] and len(status["history"]) == 1
    assert status["reference"]["size"] == 24 and status["job"] == {"state": "idle"}
    values = gauges(service)
    assert values[("vitrine_index_generation", ())] == 1
    assert values[("vitrine_drift_detected", (("source", "none"),))] == 0
    assert values[("vitrine_drift_score", (("source", "none"),))] == 0.5


def test_reindex_from_the_page_needs_admin(service: SearchService):
    with pytest.raises(JobRefused, match="--admin"):
        service.drift.start_reindex()


@pytest.mark.slow
def test_admin_reindex_runs_as_a_job_and_the_service_moves_to_the_new_generation(tmp_path: Path, clip_path):
    build_index(make_catalog(tmp_path / "catalog"), tmp_path / "index", clip_path)
    settings = ServiceSettings(
        index=str(tmp_path / "index"),
        encoder_kwargs={"device": "cpu"},
        refresh_seconds=0,
        admin=True,
        reindex_args=["--retrain-ivf"],
    )
    service = SearchService(settings)
    try:
        before = service.search_text("pattern number 3")
        assert before["generation"] == "gen-000001"
        assert service.drift.start_reindex()["state"] == "running"
        with pytest.raises(JobRefused, match="already running"):
            service.drift.start_reindex()
        deadline = time.monotonic() + 180
        while service.drift.job_state()["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        job = service.drift.job_state()
        assert job["state"] == "finished", Path(job["log"]).read_text()[-2000:]
        assert service.refresh()
        after = service.search_text("pattern number 3")
        assert after["generation"] == "gen-000002"
        assert [h["key"] for h in after["hits"]] == [h["key"] for h in before["hits"]]  # same model
        last = service.drift.status()["last_reindex"]
        assert last["status"] == "published" and last["to_generation"] == "gen-000002"
        assert gauges(service)[("vitrine_index_generation", ())] == 2
    finally:
        service.close()


def test_drift_api_endpoints_on_the_live_server(live_server: LiveServer):
    client = Client(live_server.url, verbose=False, download_files=False)
    for endpoint in ("/check_drift", "/start_reindex"):  # they write: refused without --admin
        with pytest.raises(AppError, match="start the app with --admin"):
            client.predict(api_name=endpoint)
    journal = Journal(live_server.index)  # a report as `python -m indexer drift` or cron would write it
    report = assess(live_server.index, journal=journal).to_dict()
    journal.add_report(report)
    status = client.predict(api_name="/drift_status")
    assert status["latest"]["time"] == report["time"] and status["admin"] is False
    assert json.dumps(status["latest"], sort_keys=True) == json.dumps(report, sort_keys=True)
    deadline = time.monotonic() + 30  # the server publishes the newest report on its refresh loop
    while "vitrine_drift_score" not in live_server_metrics(live_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    body = live_server_metrics(live_server)
    assert "vitrine_drift_score" in body and "vitrine_index_generation 1.0" in body


def live_server_metrics(server: LiveServer) -> str:
    import urllib.request

    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        return r.read().decode()
