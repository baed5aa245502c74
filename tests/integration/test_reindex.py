"""Reindex jobs with real tiny models, real FAISS and SQLite: zero-downtime swaps, kill -9 resumption,
validation, rollback, pruning, --if-drifted and the --every scheduler."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from indexer.cli import main
from tests.conftest import REPO, pattern_image
from vitrine.build.ingest import Ingestor
from vitrine.build.reindex import (
    JOB_FILE,
    Reindexer,
    ReindexSettings,
    read_job,
    read_log,
    rollback,
    run_every,
)
from vitrine.catalog.readers import open_catalog
from vitrine.errors import FingerprintMismatch, ReindexError, ValidationFailed
from vitrine.evaluate import evaluate_catalog
from vitrine.index.store import IndexStore
from vitrine.model.encoder import Encoder
from vitrine.open_index import encoder_fingerprint, load_encoder, open_for_build


@pytest.fixture(scope="module")
def other_encoder(clip_path_other: Path) -> Encoder:
    return Encoder.from_pretrained(str(clip_path_other), device="cpu", batch_size=8, bf16=False)


def image_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pattern_image(i).save(folder / f"img_{i:03d}.jpg", quality=90)
    return folder


def captioned_manifest(folder: Path, n: int) -> Path:
    image_folder(folder, n)
    with open(folder / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        for i in range(n):
            writer.writerows(
                [[f"img_{i:03d}.jpg", f"pattern {i}"], [f"img_{i:03d}.jpg", f"stripes no {i * 7}"]]
            )
    return folder / "captions.csv"


def build(index: Path, catalog: Path, encoder: Encoder, factory: str | None = None) -> None:
    store = open_for_build(index, encoder, factory=factory)
    try:
        Ingestor(store, encoder).run(open_catalog(catalog))
    finally:
        store.close()


def current(index: Path) -> str:
    return (index / "CURRENT").read_text().strip()


def exact_top(store: IndexStore, query: np.ndarray) -> tuple[str, float]:
    keys, embeddings = store.embeddings()
    scores = embeddings @ query
    return keys[int(np.argmax(scores))], float(scores.max())


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["reindex", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- zero downtime
def test_searches_during_a_swap_to_another_model_never_fail_or_mix_spaces(
    clip_encoder, other_encoder, tmp_path
):
    index = tmp_path / "index"
    build(index, image_folder(tmp_path / "photos", 30), clip_encoder)
    texts = ["red stripes", "blue blobs", "a pattern"]
    queries = {e.version: e.encode_texts(texts) for e in (clip_encoder, other_encoder)}
    answers: list[tuple[str, str, int, str, float]] = []  # (model asked, generation, query, top key, score)
    errors: list[BaseException] = []
    published = threading.Event()

    def reader(app_like: bool) -> None:
        """Refresh between queries like the app; app-like readers pin the model and reopen on a change."""
        store = IndexStore.open(index, expected_fingerprint=clip_encoder.fingerprint if app_like else None)
        seen_new = 0
        try:
            for i in range(100_000):
                try:
                    store.refresh()
                except FingerprintMismatch:
                    store.close()
                    store = IndexStore.open(index, expected_fingerprint=other_encoder.fingerprint)
                model = store.fingerprint["id"]
                hits = store.search(queries[model][i % 3], k=5)[0]
                assert hits and {(h.generation, h.model) for h in hits} == {(hits[0].generation, model)}
                answers.append((model, hits[0].generation, i % 3, hits[0].key, hits[0].score))
                seen_new += published.is_set() and hits[0].generation != "gen-000001"
                if seen_new >= 20:
                    return
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            store.close()

    old = IndexStore.open(index)
    expected = {("gen-000001", q): exact_top(old, queries[clip_encoder.version][q]) for q in range(3)}
    old.close()
    threads = [threading.Thread(target=reader, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    report = Reindexer(index, other_encoder, settings=ReindexSettings(commit_every=2)).run()
    published.set()
    for t in threads:
        t.join(60)
    assert errors == [] and report.status == "published" and report.to_generation == "gen-000002"
    with IndexStore.open(index) as new:
        expected.update(
            {("gen-000002", q): exact_top(new, queries[other_encoder.version][q]) for q in range(3)}
        )
    generation_of = {clip_encoder.version: "gen-000001", other_encoder.version: "gen-000002"}
    for model, generation, q, key, score in answers:
        assert generation == generation_of[model]  # the query vector came from that generation's model
        assert key == expected[generation, q][0] and score == pytest.approx(
            expected[generation, q][1], abs=1e-5
        )
    assert {a[1] for a in answers} == {"gen-000001", "gen-000002"}


# --------------------------------------------------------------------------- kill -9
def _reindex_cmd(index: Path, model: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "indexer",
        "reindex",
        "--index",
        str(index),
        "--model",
        str(model),
        "--batch-size",
        "1",
        "--num-workers",
        "1",
        "--commit-every",
        "2",
        "--json",
    ]


def _kill_during_job(index: Path, model: Path, delay: float) -> int | None:
    """Start the CLI, wait until it has (re)written its job file, i.e. its build is under way, and kill -9
    it ``delay`` later; the exit code if it finished first."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    before = _job_files(index)
    proc = subprocess.Popen(
        _reindex_cmd(index, model), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and _job_files(index) == before and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    if proc.poll() is not None:
        return proc.returncode
    proc.kill()
    proc.wait()
    return None


def _job_files(index: Path) -> set[tuple[str, int]]:
    """Job files by (path, inode): a job rewrites its file atomically (a new inode) when it starts."""
    found = set()
    for path in index.glob(f"gen-*/{JOB_FILE}"):
        with contextlib.suppress(FileNotFoundError):
            found.add((str(path), path.stat().st_ino))
    return found


def _items(generation: Path) -> int:
    conn = sqlite3.connect(f"file:{generation / 'meta.sqlite'}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    finally:
        conn.close()


def test_kill_9_keeps_the_old_generation_serving_and_a_rerun_completes(
    clip_encoder, clip_path_other, tmp_path
):
    index, clean = tmp_path / "index", tmp_path / "clean"
    build(index, image_folder(tmp_path / "photos", 240), clip_encoder)
    shutil.copytree(index, clean)
    with IndexStore.open(index) as live:
        keys, old_embeddings = live.embeddings()
    seed = int(time.time())
    rng = random.Random(seed)
    committed: list[int] = []  # items in the generation being built, after each kill
    for trial in range(2):  # each trial pays ~5 s of interpreter and model start-up
        finished = _kill_during_job(index, clip_path_other, rng.uniform(0.0, 1.5))
        context = f"seed {seed}, trial {trial}, committed before: {committed}"
        if finished is not None or current(index) != "gen-000001":  # done, or killed after the swap
            assert finished in (0, None), context
            committed = []
            break
        committed.append(_items(index / "gen-000002"))
        with IndexStore.open(index) as live:
            assert live.generation == "gen-000001" and len(live) == 240, context
            names, vectors = live.embeddings(keys[::40])
            assert [h[0].key for h in live.search(vectors, k=1)] == names, context
            assert np.array_equal(live.embeddings()[1], old_embeddings), context
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rerun = subprocess.run(
        _reindex_cmd(index, clip_path_other), cwd=REPO, env=env, capture_output=True, text=True
    )
    assert rerun.returncode == 0, rerun.stderr
    record = json.loads(rerun.stdout)
    assert record["build"]["resumed"] == int(bool(committed)), f"seed {seed}: {committed}"  # continued
    # the same job cleanly, with the encoder settings the CLI uses (batch 1: no batch-size noise)
    encoder = load_encoder(clean, str(clip_path_other), batch_size=1, num_workers=1)
    assert Reindexer(clean, encoder).run().status == "published"
    with IndexStore.open(index) as resumed, IndexStore.open(clean) as reference:
        assert resumed.fingerprint["id"] == reference.fingerprint["id"] == encoder.version
        got, want = resumed.embeddings(), reference.embeddings()
        assert got[0] == want[0] == keys
        assert np.abs(got[1] - want[1]).max() < 1e-5, f"seed {seed}"
        assert resumed.stats()["indexed"] == 240


def test_an_interrupted_job_resumes_and_another_job_discards_it(clip_encoder, other_encoder, tmp_path):
    index = tmp_path / "index"
    build(index, image_folder(tmp_path / "photos", 20), clip_encoder)

    def stop_after(n: int):
        seen = [0]

        def progress(k: int) -> None:
            seen[0] += k
            if seen[0] >= n:
                raise KeyboardInterrupt

        return progress

    with pytest.raises(KeyboardInterrupt):
        Reindexer(
            index, other_encoder, settings=ReindexSettings(commit_every=2), progress=stop_after(9)
        ).run()
    assert current(index) == "gen-000001" and read_job(index / "gen-000002")["state"] == "building"
    report = Reindexer(index, other_encoder, settings=ReindexSettings(commit_every=2)).run()
    assert report.to_generation == "gen-000002" and report.build["resumed"] == 1
    assert report.build["unchanged"] >= 8 and report.build["count"] == 20  # committed items were skipped
    with pytest.raises(KeyboardInterrupt):
        Reindexer(index, clip_encoder, progress=stop_after(5)).run()  # back to the first model
    assert read_job(index / "gen-000003")["model"] == clip_encoder.version
    report = Reindexer(index, other_encoder, settings=ReindexSettings(retrain_ivf=True)).run()
    assert report.build["resumed"] == 0 and report.to_generation == "gen-000003"  # the stale one went
    assert read_log(index)[-1]["status"] == "published" and read_log(index)[-2]["status"] == "failed"


def test_ingestor_takes_vectors_from_a_donor_and_reports_each_commit(clip_encoder, tmp_path):
    index, photos = tmp_path / "index", image_folder(tmp_path / "photos", 6)
    build(index, photos, clip_encoder)
    batches: list[list[str]] = []
    with IndexStore.open(index) as live:
        new = IndexStore.create_generation(index, encoder_fingerprint(clip_encoder))

        def record(items: list) -> None:
            batches.append([i.key for i in items])

        report = Ingestor(new, clip_encoder, commit_every=4, donor=live, on_commit=record).run(
            open_catalog(photos)
        )
        assert report.donor_reused == report.reused == report.added == 6
        assert [len(b) for b in batches] == [4, 2] and sorted(k for b in batches for k in b) == sorted(
            new.keys()
        )
        assert np.array_equal(new.embeddings()[1], live.embeddings()[1])
        other = IndexStore.create(tmp_path / "other", {"id": "another-model", "dim": clip_encoder.dim})
        with pytest.raises(FingerprintMismatch):
            Ingestor(new, clip_encoder, donor=other)
        other.close()
        new.close()


# --------------------------------------------------------------------------- validation
def test_a_new_failure_refuses_the_swap_and_the_next_job_discards_the_build(
    clip_encoder, clip_path_other, tmp_path, capsys
):
    index, photos = tmp_path / "index", image_folder(tmp_path / "photos", 20)
    build(index, photos, clip_encoder)
    good = (photos / "img_007.jpg").read_bytes()
    (photos / "img_007.jpg").write_bytes(b"not a jpeg at all")
    code, out, err = cli(capsys, "--index", str(index), "--model", str(clip_path_other), "--json")
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: validation failed")
    assert "1 new failure(s)" in err and "img_007.jpg" in err and "gen-000001 stays live" in err
    record = json.loads(out)
    assert record["status"] == "rejected" and record["validation"]["new_failures"] == 1
    assert record["validation"]["count"] == record["validation"]["expected"] == 19
    assert current(index) == "gen-000001" and read_log(index)[-1] == record
    with IndexStore.open(index) as live:
        assert len(live) == 20 and live.failures() == []
    assert read_job(index / "gen-000002")["state"] == "rejected"  # kept for inspection
    (photos / "img_007.jpg").write_bytes(good)
    code, out, err = cli(capsys, "--index", str(index), "--model", str(clip_path_other))
    assert code == 0 and out.startswith("published gen-000002 (was gen-000001)"), err  # a fresh build
    assert read_job(index / "gen-000002")["state"] == "published" and current(index) == "gen-000002"


def test_retrain_ivf_copies_every_vector_without_encoding(clip_encoder, tmp_path, monkeypatch):
    index = tmp_path / "index"
    build(index, image_folder(tmp_path / "photos", 80), clip_encoder, factory="IVF2,Flat")
    with IndexStore.open(index) as live:
        before = live.embeddings()
    calls: list[int] = []
    forward = clip_encoder.encode_pixels
    monkeypatch.setattr(clip_encoder, "encode_pixels", lambda px: calls.append(len(px)) or forward(px))
    report = Reindexer(index, clip_encoder, settings=ReindexSettings(retrain_ivf=True)).run()
    assert report.status == "published" and calls == []
    assert report.build["donor_reused"] == report.build["added"] == 80
    with IndexStore.open(index) as new:
        assert new.generation == "gen-000002" and new.stats()["effective_factory"] == "IVF2,Flat"
        after = new.embeddings()
        assert after[0] == before[0] and np.abs(after[1] - before[1]).max() < 1e-6
        names, vectors = new.embeddings(after[0][::10])
        assert [h[0].key for h in new.search(vectors, k=1)] == names


def test_the_recall_check_refuses_a_worse_model(clip_encoder, other_encoder, tmp_path):
    manifest = captioned_manifest(tmp_path / "photos", 40)
    recall = {
        e: evaluate_catalog(e, open_catalog(manifest), ks=(10,)).t2i["R@10"]
        for e in (clip_encoder, other_encoder)
    }
    if recall[clip_encoder] == recall[other_encoder]:
        pytest.skip(f"both random models score R@10 {recall[clip_encoder]}: nothing to tell apart")
    better, worse = sorted(recall, key=recall.get, reverse=True)
    index = tmp_path / "index"
    build(index, manifest, better)
    gap = recall[better] - recall[worse]
    with pytest.raises(ValidationFailed, match=r"R@10 .* worse by more than") as failed:
        Reindexer(
            index, worse, old_encoder=lambda: better, settings=ReindexSettings(recall_margin=gap / 2)
        ).run()
    numbers = failed.value.report.validation
    assert numbers["recall_old"] == pytest.approx(recall[better], abs=0.01)
    assert numbers["recall_new"] == pytest.approx(recall[worse], abs=0.01) and current(index) == "gen-000001"
    report = Reindexer(
        index, worse, old_encoder=lambda: better, settings=ReindexSettings(recall_margin=gap + 1)
    ).run()
    assert report.status == "published" and report.validation["recall_new"] == numbers["recall_new"]
    report = Reindexer(index, worse, settings=ReindexSettings(retrain_ivf=True, recall_margin=0)).run()
    assert report.validation["recall_old"] == report.validation["recall_new"]  # same model, same vectors


# --------------------------------------------------------------------------- generations
def test_rollback_keep_n_and_readers_follow(clip_encoder, tmp_path, capsys):
    index = tmp_path / "index"
    build(index, image_folder(tmp_path / "photos", 12), clip_encoder)
    reader = IndexStore.open(index)
    for _ in range(3):
        assert Reindexer(index, clip_encoder, settings=ReindexSettings(keep=3)).run().status == "published"
        assert reader.refresh() and reader.generation == current(index)
    assert sorted(p.name for p in index.glob("gen-*")) == ["gen-000002", "gen-000003", "gen-000004"]
    code, out, _ = cli(capsys, "--index", str(index), "--rollback", "--json")
    assert code == 0 and json.loads(out)["to_generation"] == "gen-000003" and current(index) == "gen-000003"
    assert reader.refresh() and reader.generation == "gen-000003" and len(reader) == 12
    assert rollback(index).to_generation == "gen-000002"  # a rollback of a rollback steps further back
    with pytest.raises(ReindexError, match="nothing to roll back to"):
        rollback(index)
    code, _, err = cli(capsys, "--index", str(index), "--rollback")
    assert code == 1 and err.startswith("error: nothing to roll back to")
    assert (
        Reindexer(index, clip_encoder, settings=ReindexSettings(keep=2)).run().to_generation == "gen-000005"
    )
    assert sorted(p.name for p in index.glob("gen-*")) == ["gen-000002", "gen-000005"]
    assert (index / "HISTORY").read_text().split() == ["gen-000002", "gen-000005"]
    assert reader.refresh() and reader.generation == "gen-000005"
    reader.close()
    assert [r["status"] for r in read_log(index)][-4:] == [
        "published",
        "rolled_back",
        "rolled_back",
        "published",
    ]


def test_if_drifted_runs_for_a_new_model_and_skips_without_drift(
    clip_encoder, clip_path_other, tmp_path, capsys
):
    index = tmp_path / "index"
    build(index, image_folder(tmp_path / "photos", 12), clip_encoder)
    code, out, err = cli(capsys, "--index", str(index), "--if-drifted", "--json")
    record = json.loads(out)
    assert code == 0 and record["status"] == "skipped" and "not enough live samples" in record["reason"], err
    assert record["drift"]["drifted"] is False and sorted(p.name for p in index.glob("gen-*")) == [
        "gen-000001"
    ]
    code, out, err = cli(
        capsys, "--index", str(index), "--if-drifted", "--model", str(clip_path_other), "--json"
    )
    record = json.loads(out)
    assert code == 0 and record["status"] == "published" and record["reason"].startswith("model changed"), err
    assert [r["status"] for r in read_log(index)] == ["skipped", "published"]


# --------------------------------------------------------------------------- scheduler
def test_every_runs_repeatedly_and_stops_cleanly_on_sigterm(clip_encoder, tmp_path):
    index = tmp_path / "index"
    build(index, image_folder(tmp_path / "photos", 8), clip_encoder)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "indexer", "reindex", "--index", str(index), "--every", "1s", "--json"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = []
    watchdog = threading.Timer(180, proc.kill)  # a hung scheduler fails the test instead of hanging it
    watchdog.start()
    try:
        while len(records) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            records.append(json.loads(line))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        watchdog.cancel()
    assert proc.returncode == 0 and "stopped after" in err
    assert [r["status"] for r in records] == ["published", "published"]
    assert records[1]["from_generation"] == records[0]["to_generation"]


def test_run_every_logs_a_failed_run_and_goes_on():
    stop, runs, errors = threading.Event(), [], []

    def job() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise ValueError("first run fails")
        if len(runs) == 3:
            stop.set()

    assert run_every(0.01, job, on_error=errors.append, stop=stop) == 3
    assert [str(e) for e in errors] == ["first run fails"]
