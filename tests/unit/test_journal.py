"""The drift journal: bounded, uniform sampling of live traffic that never gets in a search's way."""

from __future__ import annotations

import sqlite3
from contextlib import closing

import numpy as np

from vitrine.drift.journal import Entry, Journal, QueryRecorder, Reservoir


def _entry(i: int, dim: int = 4) -> Entry:
    vec = np.zeros(dim, dtype=np.float32)
    vec[i % dim] = 1.0
    return Entry(vec, {"i": i}, score=float(i), text=f"query {i}")


def _on_disk(journal: Journal, sql: str) -> object:
    """The first value ``sql`` reads from the journal's file, through a connection of our own."""
    with closing(sqlite3.connect(f"file:{journal.path}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchone()[0]


def test_reservoir_keeps_a_uniform_bounded_sample():
    """Each of 1,000 offers is kept with chance 50/1000: the mean kept position sits near the middle."""
    means = []
    for seed in range(40):
        reservoir = Reservoir(50, seed=seed)
        for i in range(1000):
            reservoir.offer(_entry(i))
        assert len(reservoir.items) == 50 and reservoir.seen == 1000
        means.append(np.mean([e.meta["i"] for e in reservoir.items]))
    assert abs(np.mean(means) - 499.5) < 25  # a recency-biased sample would sit far above


def test_recorder_fills_the_baseline_first_then_the_live_window(tmp_path):
    journal = Journal(tmp_path, baseline_size=30)
    recorder = QueryRecorder(journal, per_flush=20)
    for i in range(500):  # one busy period: only per_flush are written
        recorder.add("gen-000001", "m1", _entry(i))
    assert recorder.flush() == 20
    for i in range(15):
        recorder.add("gen-000001", "m1", _entry(i))
        recorder.add("gen-000002", "m2", _entry(i))
    recorder.flush()
    assert journal.count("query_baseline", "gen-000001", "m1") == 30
    assert journal.count("query", "gen-000001", "m1") == 5
    assert journal.count("query_baseline", "gen-000002", "m2") == 15
    assert journal.sample("query", "gen-000001", "m1").embeddings.shape == (5, 4)
    assert _on_disk(journal, "SELECT COUNT(*) FROM samples WHERE text IS NOT NULL") == 0


def test_texts_are_kept_only_when_allowed(tmp_path):
    journal = Journal(tmp_path)
    recorder = QueryRecorder(journal, store_text=True)
    recorder.add("g", "m", _entry(1))
    recorder.flush()
    assert _on_disk(journal, "SELECT text FROM samples") == "query 1"


def test_live_kinds_are_capped_oldest_first_and_windows_filter_by_time(tmp_path):
    journal = Journal(tmp_path, max_rows=10)
    journal.add("ingest", "g", "m", [_entry(i) for i in range(8)], when=100.0)
    journal.add("ingest", "g", "m", [_entry(i) for i in range(8, 14)], when=200.0)
    assert journal.count("ingest", "g", "m") == 10
    kept = sorted(m["i"] for m in journal.sample("ingest", "g", "m").metadata)
    assert kept == list(range(4, 14))
    assert len(journal.sample("ingest", "g", "m", since=150.0)) == 6
    assert journal.last_time("ingest", "g", "m") == 200.0


def test_reports_come_back_oldest_first(tmp_path):
    journal = Journal(tmp_path)
    assert journal.reports() == []
    for i in range(3):
        journal.add_report({"time": float(i), "drifted": i == 2, "p_value": 0.5, "generation": "g"})
    history = journal.reports(limit=2)
    assert [r["time"] for r in history] == [1.0, 2.0] and history[-1]["drifted"] is True


def test_an_unwritable_journal_never_breaks_searching(tmp_path):
    """The folder cannot hold the journal (here it does not exist; read-only mounts act alike)."""
    recorder = QueryRecorder(Journal(tmp_path / "missing" / "index"))
    recorder.add("g", "m", _entry(1))
    assert recorder.flush() == 0 and recorder.errors == 1
