"""``--engine ray`` on a local Ray cluster gives the index the single-process build gives, and resumes.

One Ray cluster (num_cpus=2) serves the whole module: starting one costs ~10-30 s on this machine.
The encoder runs in fp32 (bf16=False) on both paths, so batch composition cannot move embeddings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, pattern_image
from tests.hostile import make_hostile_folder

ray = pytest.importorskip("ray", reason="Ray is an optional extra (requirements-dev.txt installs it)")

from indexer.ray_engine import RayOptions, build_with_ray  # noqa: E402
from vitrine.catalog.readers import open_catalog  # noqa: E402
from vitrine.index.store import IndexStore  # noqa: E402
from vitrine.model.encoder import Encoder  # noqa: E402
from vitrine.open_index import encoder_fingerprint, run_build  # noqa: E402

ENCODER = {"device": "cpu", "batch_size": 4, "bf16": False}
N_KILL = 120  # images in the kill test (60 shards of 2): enough that a kill lands mid-way


@pytest.fixture(scope="module")
def cluster() -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
    )
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def encoder(clip_path: Path) -> Encoder:
    return Encoder.from_pretrained(str(clip_path), **ENCODER)


def _catalog_folder(root: Path, n: int = 10) -> tuple[Path, int]:
    """n pattern JPEGs plus the hostile set (less the slowest to reject); returns (folder, bad files)."""
    root.mkdir(exist_ok=True)
    for i in range(n):
        pattern_image(i).save(root / f"img_{i:02d}.jpg", quality=92)
    hostile = make_hostile_folder(root / "hostile")
    for name in ("bomb_30000x30000.png", "drawing.svg", "iphone.heic"):
        (root / "hostile" / name).unlink()
        hostile.pop(name)
    return root, sum(not ok for ok in hostile.values())


def _snapshot(index: Path) -> dict:
    store = IndexStore.open(index)
    try:
        keys, vectors = store.embeddings()
        queries = vectors[:3] + 0.05
        hits = [[(h.key, round(h.score, 4)) for h in row] for row in store.search(queries, k=5)]
        failures = sorted((f["path"], f["reason"]) for f in store.failures())
        return {"keys": keys, "vectors": vectors, "hits": hits, "failures": failures, "stats": store.stats()}
    finally:
        store.close()


def test_ray_build_equals_single_process_build(cluster: None, encoder: Encoder, tmp_path: Path) -> None:
    """Same keys, embeddings, failures and hits; with a factory that needs training (IVF1,Flat: 39
    vectors), trained once on everything at the final flush, as the local build's last flush does."""
    photos, bad = _catalog_folder(tmp_path / "photos", n=40)
    catalog = open_catalog(str(photos))
    local = IndexStore.create(tmp_path / "local", encoder_fingerprint(encoder), factory="IVF1,Flat")
    want = run_build(local, encoder, catalog)
    local.close()
    distributed = IndexStore.create(tmp_path / "ray", encoder_fingerprint(encoder), factory="IVF1,Flat")
    opts = RayOptions(shard_size=16)
    got, run = build_with_ray(distributed, encoder, catalog, opts, encoder_kwargs=ENCODER)
    distributed.close()
    assert run.written == len(run.plans) == -(-len(catalog) // 16) and run.skipped == 0
    assert {**got.to_dict(), "seconds": 0} == {**want.to_dict(), "seconds": 0}
    a, b = _snapshot(tmp_path / "local"), _snapshot(tmp_path / "ray")
    assert a["keys"] == b["keys"] and len(a["keys"]) == len(catalog) - bad
    np.testing.assert_allclose(a["vectors"], b["vectors"], atol=1e-5)
    assert a["hits"] == b["hits"]
    assert a["failures"] == b["failures"] and len(a["failures"]) == bad > 0
    assert a["stats"]["effective_factory"] == b["stats"]["effective_factory"] == "IVF1,Flat"
    assert not run.folder.exists()  # shards are deleted once the index holds them

    again = IndexStore.open(tmp_path / "ray", writable=True)  # nothing changed: nothing planned
    report, rerun = build_with_ray(again, encoder, catalog, RayOptions(shard_size=16), encoder_kwargs=ENCODER)
    again.close()
    assert report.unchanged == len(catalog) - bad and report.added == 0
    assert sum(len(p.rows) for p in rerun.plans) == bad  # failed files are retried, as locally


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "indexer", "build", *args, "--engine", "ray", "--no-progress", "--json"]


@pytest.mark.slow
def test_killed_ray_build_resumes_from_finished_shards(
    cluster: None, clip_path: Path, encoder: Encoder, tmp_path: Path
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(N_KILL):
        pattern_image(i, size=(640, 480)).save(photos / f"img_{i:03d}.jpg", quality=92)
    index = tmp_path / "index"
    address = ray.get_runtime_context().gcs_address  # a second driver on the module's cluster
    # windows of 4 shards: shards land a few at a time, so the kill falls mid-way even on a fast machine
    args = _cli(
        str(photos),
        "--index",
        str(index),
        "--model",
        str(clip_path),
        "--shard-size",
        "2",
        "--window-shards",
        "4",
    )
    args += ["--address", address]
    env = {**os.environ, "PYTHONPATH": str(REPO), "VITRINE_BATCH_SIZE": "2"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, stderr=subprocess.DEVNULL)
    shards = index / "shards"
    deadline = time.monotonic() + 150
    try:
        while time.monotonic() < deadline and len(list(shards.rglob("shard-*.parquet"))) < 3:
            assert proc.poll() is None, "the build ended before it could be killed"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver (its session only: the cluster is ours)
        proc.wait()
    done = {p.name for p in shards.rglob("shard-*.parquet")}
    assert 3 <= len(done) < N_KILL // 2, "the kill should land mid-way"

    store = IndexStore.open(index, writable=True)
    report, run = build_with_ray(
        store, encoder, open_catalog(str(photos)), RayOptions(shard_size=2), encoder_kwargs=ENCODER
    )
    store.close()
    assert run.skipped >= len(done) and run.skipped + run.written == N_KILL // 2
    assert report.added == N_KILL and report.failed == 0 and report.count == N_KILL
    assert json.dumps(report.to_dict())  # a plain report, as the CLI prints it
