"""Bulk ingest: items/s of the per-item write path (the writer before set-based batches) and of
``IndexWriter.write`` in the same run, bytes on disk with float32 and float16 embeddings, and top-10
agreement of float16 storage with float32.

    .venv/bin/python -m bench.ingest --items 200000 --dim 512
    .venv/bin/python -m bench.ingest --items 20000 --quick      # a smoke run

Data: synthetic clustered unit vectors (CLIP-like), one caption and one metadata field per item, real
SQLite in a temporary folder on disk (``--dir``), full-text triggers and FAISS (Flat) included: what a
shard replay, a re-encode or an import hands to the store. Each path writes into its own new index.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import loadavg, machine, table
from vitrine.build.imports import Checked, Importer, ImportSettings, find_parts
from vitrine.build.ingest import Ingestor
from vitrine.build.shards import ShardPlan, ShardReplay, pending_records, plan_shards, write_shard
from vitrine.catalog.readers import Catalog, open_catalog
from vitrine.errors import StoreError
from vitrine.index import exclusions, layout
from vitrine.index.store import IndexStore, IndexWriter, NewItem

FP = {"id": "bench@ingest", "model": "bench", "dim": 0}


def clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 50, 1), dim)).astype(np.float32)
    data = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, dim)).astype(np.float32)
    return data / np.linalg.norm(data, axis=1, keepdims=True)


def items(vectors: np.ndarray) -> list[NewItem]:
    return [
        NewItem(
            key=f"/photos/{i // 1000:04d}/{i:08d}.jpg",
            path=f"/photos/{i // 1000:04d}/{i:08d}.jpg",
            sha256=f"{i:064x}",
            size=100_000 + i,
            mtime_ns=1_700_000_000_000_000_000 + i,
            captions=[f"a photo of thing {i % 997} in place {i % 113}"],
            metadata={"n": i, "album": f"album {i % 50}"},
            source="/photos",
            embedding=vectors[i],
        )
        for i in range(len(vectors))
    ]


# ------------------------------------------------------------- the per-item path, as the writer had it
_OLD_UPSERT = (
    f"INSERT INTO items({', '.join(layout.COLS)}) VALUES ({','.join('?' * len(layout.COLS))}) "
    "ON CONFLICT(key) DO UPDATE SET " + ", ".join(f"{c}=excluded.{c}" for c in layout.COLS[1:-1])
)


def per_item_write(store: IndexWriter, batch: list[NewItem]) -> None:
    """The writer's ``write`` before set-based batches: two SELECTs, an INSERT, an UPSERT and a DELETE
    per item, orphans checked one by one, float32 blobs."""
    now, added, candidates = time.time(), {}, set()
    conn = store._conn()
    with layout.writing(conn, store.root):
        seq = layout.scalar(conn, "SELECT value FROM state WHERE name='seq'") + 1
        exclusions.add(conn, (), now)
        excluded = exclusions.read(conn)
        for item in batch:
            if not excluded.covers(item.key):
                _old_upsert_item(conn, item, seq, now, added, candidates)
        for vid in sorted(candidates):
            if conn.execute("SELECT 1 FROM items WHERE vector_id=? LIMIT 1", (vid,)).fetchone() is None:
                conn.execute("DELETE FROM vectors WHERE id=?", (vid,))
        conn.execute("UPDATE state SET value=? WHERE name='seq'", (seq,))
    store._apply(added, [], seq)


def _old_upsert_item(conn, item: NewItem, seq: int, now: float, added: dict, candidates: set) -> None:
    if not item.key or not item.sha256:
        raise StoreError("key and sha256 must be non-empty")
    old = conn.execute("SELECT vector_id FROM items WHERE key=?", (item.key,)).fetchone()
    row = conn.execute("SELECT id FROM vectors WHERE sha256=?", (item.sha256,)).fetchone()
    if row is not None:
        vid = row[0]
    else:
        vec = np.asarray(item.embedding, dtype=np.float32).reshape(-1)
        vec = vec / float(np.linalg.norm(vec))
        sql = "INSERT INTO vectors(sha256, embedding, seq) VALUES (?,?,?)"
        vid = conn.execute(sql, (item.sha256, vec.tobytes(), seq)).lastrowid
        added[vid] = vec
    captions = json.dumps(list(item.captions), ensure_ascii=False)
    metadata = json.dumps(item.metadata, ensure_ascii=False, sort_keys=True, default=str)
    row = (
        item.key,
        item.path,
        vid,
        item.sha256,
        item.size,
        item.mtime_ns,
        captions,
        metadata,
        item.source,
        now,
    )
    conn.execute(_OLD_UPSERT, row)
    conn.execute("DELETE FROM failures WHERE key=?", (item.key,))
    if old is not None and old[0] != vid:
        candidates.add(old[0])


# ------------------------------------------------------------- measuring
def run_path(root: Path, data: list[NewItem], dim: int, batch: int, dtype: str, per_item: bool) -> dict:
    fp = {**FP, "dim": dim}
    with IndexStore.create(root, fp, factory="Flat", embedding_dtype=dtype) as store:
        start, cpu = time.perf_counter(), time.process_time()
        for i in range(0, len(data), batch):
            chunk = data[i : i + batch]
            per_item_write(store, chunk) if per_item else store.write(chunk)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        store.flush()
        store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db = root / "gen-000001" / "meta.sqlite"
    return {
        "seconds": seconds,
        "items_s": len(data) / seconds,
        "items_cpu_s": len(data) / cpu,
        "db_bytes": db.stat().st_size,
    }


def replay_fixture(folder: Path, n: int, vectors: np.ndarray) -> tuple[Catalog, list[ShardPlan], Path]:
    """n small files in a folder catalog, and finished Ray shards for all of them (as --engine ray leaves
    them before its replay): the replay reads no image and runs no model."""
    photos = folder / "photos"
    for i in range(n):
        sub = photos / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True)
        (sub / f"{i:08d}.jpg").write_bytes(i.to_bytes(8, "little"))
    catalog = open_catalog(photos)
    plans = plan_shards(pending_records(catalog, {}), 1024)
    shards, done = folder / "shards", 0
    for plan in plans:
        rows = [
            {
                **row,
                "sha256": hashlib.sha256(row["key"].encode()).hexdigest(),
                "reason": None,
                "embedding": vec,
            }
            for row, vec in zip(plan.rows, vectors[done : done + len(plan.rows)].tolist(), strict=True)
        ]
        write_shard(shards, plan.name, rows)
        done += len(rows)
    return catalog, plans, shards


def run_replay(root: Path, fixture: tuple, dim: int, commit_every: int, per_item: bool) -> dict:
    catalog, plans, shards = fixture
    with IndexStore.create(root, {**FP, "dim": dim}, factory="Flat") as store:
        if per_item:
            store.write = lambda items=(), failures=(), **_: per_item_write(store, list(items))
        replay = ShardReplay(store, None, plans, shards)
        start, cpu = time.perf_counter(), time.process_time()
        report = Ingestor(store, replay, commit_every=commit_every, flush_seconds=float("inf")).run(catalog)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert report.added == len(catalog) and replay.missed == 0, (report.added, replay.missed)
    return {"seconds": seconds, "items_s": len(catalog) / seconds, "items_cpu_s": len(catalog) / cpu}


def run_import(root: Path, fixture: tuple, vectors: np.ndarray, dim: int) -> dict:
    """``indexer import`` after its check (which needs real photos and a model): every file located
    inside the images root, read, hashed, then written in batches of 4096."""
    catalog, _, _ = fixture
    photos, out = Path(catalog.root), root.parent / f"{root.name}-input"
    (out / "img_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    np.save(out / "img_emb" / "img_emb_0.npy", vectors[: len(catalog)].astype(np.float16))
    paths = [
        {"image_path": os.path.relpath(r.path, photos), "caption": f"photo {i}"}
        for i, r in enumerate(catalog)
    ]
    pq.write_table(pa.Table.from_pylist(paths), out / "metadata" / "metadata_0.parquet")
    encoder = SimpleNamespace(dim=dim, version=FP["id"], fingerprint={**FP, "dim": dim})
    importer = Importer(encoder, ImportSettings(images_root=str(photos)))
    with IndexStore.create(root, {**FP, "dim": dim}, factory="Flat") as store:
        start, cpu = time.perf_counter(), time.process_time()
        kind, parts = find_parts(out)
        report = importer.write(store, Checked(out, kind, parts, {}))
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert report.added == len(catalog), report
    return {"seconds": seconds, "items_s": len(catalog) / seconds, "items_cpu_s": len(catalog) / cpu}


def agreement(folder: Path, vectors: np.ndarray, queries: int) -> float:
    """Mean overlap of the top-10 keys (exact search) between float16 and float32 storage."""
    rng = np.random.default_rng(1)
    picked = vectors[rng.choice(len(vectors), queries, replace=False)]
    q = picked + 0.05 * rng.standard_normal(picked.shape).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    found = []
    for name in ("new-f16", "new-f32"):
        with IndexStore.open(folder / name) as store:
            found.append([{h.key for h in hits} for hits in store.search(q, k=10)])
    return float(np.mean([len(a & b) / 10 for a, b in zip(*found, strict=True)]))


def replay_table(folder: Path, args: argparse.Namespace, vectors: np.ndarray) -> None:
    fixture = replay_fixture(folder / "replay", args.replay, vectors[: args.replay])
    rows = []
    runs = [] if args.quick else [("replay, per-item writes (old)", 256, True)]
    runs += [("replay, set-based writes", 256, False), ("replay, set-based writes", args.batch, False)]
    for n, (label, every, per_item) in enumerate(runs):
        r = run_replay(folder / f"replay-{n}", fixture, args.dim, every, per_item)
        rows.append([label, every, f"{r['seconds']:.1f}", f"{r['items_s']:,.0f}", f"{r['items_cpu_s']:,.0f}"])
        print(f"  {label}, commit every {every}: {r['items_s']:,.0f} items/s", flush=True)
    r = run_import(folder / "import", fixture, vectors, args.dim)
    rows.append(
        [
            "import (read + hash each file)",
            4096,
            f"{r['seconds']:.1f}",
            f"{r['items_s']:,.0f}",
            f"{r['items_cpu_s']:,.0f}",
        ]
    )
    print(
        f"Shard replay (Ingestor + ShardReplay: stat each file, shards of 1024) and import, {args.replay:,} "
        "files, float16 storage:"
    )
    print(table(["path", "items/commit", "seconds", "items/s", "items/CPU-s"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000, help="synthetic items per path")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4096, help="items per write (one transaction)")
    parser.add_argument("--old-batch", type=int, default=256, help="items per write on the per-item path")
    parser.add_argument("--queries", type=int, default=200, help="queries of the top-10 agreement check")
    parser.add_argument("--dir", default=None, help="folder for the indexes (default: a temporary one)")
    parser.add_argument("--replay", type=int, default=50_000, help="files of the shard-replay run (0: none)")
    parser.add_argument("--quick", action="store_true", help="skip the per-item path")
    args = parser.parse_args()
    print(machine())
    print(f"load at start: {loadavg()}")
    folder = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=args.dir))
    try:
        vectors = clustered(args.items, args.dim)
        data = items(vectors)
        rows = []
        paths = [("per-item (old)", "old-f32", args.old_batch, "float32", True)] if not args.quick else []
        paths += [
            ("set-based, float32", "new-f32", args.batch, "float32", False),
            ("set-based, float16", "new-f16", args.batch, "float16", False),
            ("set-based, float16", "new-f16-256", args.old_batch, "float16", False),
        ]
        for label, name, batch, dtype, per_item in paths:
            r = run_path(folder / name, data, args.dim, batch, dtype, per_item)
            speed = [f"{r['seconds']:.1f}", f"{r['items_s']:,.0f}", f"{r['items_cpu_s']:,.0f}"]
            rows.append([label, batch, dtype, *speed, f"{r['db_bytes']:,}"])
            print(f"  {label} batch {batch}: {r['items_s']:,.0f} items/s", flush=True)
        headers = [
            "path",
            "items/write",
            "stored as",
            "seconds",
            "items/s",
            "items/CPU-s",
            "meta.sqlite bytes",
        ]
        print(table(headers, rows))
        print(
            f"top-10 agreement float16 vs float32 storage ({args.queries} queries, exact search): "
            f"{agreement(folder, vectors, args.queries):.4f}"
        )
        if args.replay:
            replay_table(folder, args, vectors)
        print(f"load at end: {loadavg()}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
