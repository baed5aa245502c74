"""Millions of items through the real store: build, open like the server, query with the metadata lookup.

Build (one child process): ``IndexStore.create`` + ``IndexWriter.write`` in batches (one SQLite
transaction each, a caption, a path and metadata per item, as an ingest writes them), ``flush`` every
``--flush-every`` items (the Ingestor flushes on a timer; a flush is where the store retrains and
changes FAISS tier), then ``close`` (the final snapshot and its checksum). Vectors: a chunk-seeded
mixture of anisotropic clusters on the 512-d sphere with a shared direction (CLIP-like, as in
bench/search.py), regenerated chunk by chunk, so 10M vectors never sit in memory at once.

Serve (one child process per variant, so each RSS is its own): open the index with ``IndexStore.open``
(what the app does), then time ``reader.search(vector, k=11)`` one query at a time: FAISS plus the
SQLite hit lookup (keys, paths, captions, metadata), the store call a REST search for 10 hits makes (one
past the page) once the text is encoded (text encoding: bench/search.py, issue 14 item 2). recall@10: the
hits' keys against exact inner-product search over the generated vectors. Variants, baseline first:

* ``in RAM, hashed``: snapshot read into memory, whole sha256 at open (the path before mapping);
* ``mapped, hashed``: IVF lists mapped from the snapshot, whole sha256 at open (before this change);
* ``mapped, stamped``: mapped, checksum checked by recorded size + mtime (now; hashed lazily later).

    .venv/bin/python -m bench.scale10m --n 1000000 --write-results
    .venv/bin/python -m bench.scale10m --n 10000000 --index /big/disk/idx10m --keep --write-results
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import CACHE_DIR, loadavg, machine, table, write_section
from vitrine.config import arg, parse_args, quiet_libraries

HEADING = "## 10M items through the real store: on-disk IVF (bench/scale10m.py)"
K = 10
CHUNK = 100_000
FP = {"id": "synthetic-clip@bench", "model": "synthetic-clip", "revision": "bench"}
VARIANTS = {  # name -> (map the snapshot, hash it whole at open)
    "in RAM, hashed": (False, True),
    "mapped, hashed": (True, True),
    "mapped, stamped": (True, False),
}


@dataclasses.dataclass
class Args:
    """Build an n-item index through IndexWriter, open it like the server, measure queries and memory."""

    n: int = arg(1_000_000, "items written through IndexWriter")
    dim: int = arg(512, "vector dimension (the ViT-B/32 projection)")
    clusters: int = arg(4000, "clusters in the synthetic data")
    factory: str = arg("auto", "FAISS factory; auto = the store's own size tiers (factories.choose_factory)")
    batch: int = arg(5000, "items per IndexWriter.write (one SQLite transaction)")
    flush_every: int = arg(500_000, "items between IndexWriter.flush calls (retraining, tier changes)")
    queries: int = arg(300, "near-data queries, timed one at a time")
    params: list[str] = arg(
        ["nprobe=16", "nprobe=32", "nprobe=64"],
        "search_params measured after the defaults, as k=v[,k=v] (mapped, stamped only)",
    )
    variants: list[str] = arg(list(VARIANTS), "serving variants, baseline first")
    index: str = arg("", "index directory (default: under the bench cache); reused if it holds n items")
    keep: bool = arg(False, "keep the index directory afterwards")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


# ---------------------------------------------------------------------------------------------------
# Data: chunk c holds items [c * CHUNK, (c + 1) * CHUNK), drawn from its own seed
# ---------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Mixture:
    """CLIP-like clustered unit vectors (a shared direction, log-normal cluster sizes, per-cluster
    spread), reproducible per chunk so that build and ground truth regenerate the same items."""

    def __init__(self, dim: int, clusters: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        common = _unit(rng.standard_normal((1, dim), dtype=np.float32))
        self.centres = _unit(0.7 * common + _unit(rng.standard_normal((clusters, dim), dtype=np.float32)))
        weights = rng.lognormal(0.0, 1.0, clusters)
        self.p = weights / weights.sum()
        self.spread = rng.uniform(0.5, 1.15, clusters).astype(np.float32)
        self.dim, self.seed = dim, seed

    def chunk(self, c: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(cluster of each item, vectors) of chunk c, cut at n items in all."""
        size = max(0, min(CHUNK, n - c * CHUNK))
        rng = np.random.default_rng([self.seed, c])
        assign = rng.choice(len(self.centres), size=size, p=self.p)
        noise = rng.standard_normal((size, self.dim), dtype=np.float32) / np.sqrt(self.dim, dtype=np.float32)
        return assign, _unit(self.centres[assign] + self.spread[assign, None] * noise)

    def chunks(self, n: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        for c in range(-(-n // CHUNK)):
            yield (c * CHUNK, *self.chunk(c, n))

    def queries(self, n: int, count: int) -> np.ndarray:
        """Perturbed items (cosine ~0.9 to their source) from ten chunks spread over the collection."""
        rng = np.random.default_rng(self.seed + 1)
        picked = []
        for c in np.unique(np.linspace(0, -(-n // CHUNK) - 1, 10).astype(int)):
            vecs = self.chunk(int(c), n)[1]
            picked.append(vecs[rng.choice(len(vecs), size=-(-count // 10), replace=False)])
        base = np.concatenate(picked)[:count]
        noise = rng.standard_normal(base.shape, dtype=np.float32) / np.sqrt(self.dim, dtype=np.float32)
        return _unit(base + 0.45 * noise)


def truth(mix: Mixture, n: int, queries: np.ndarray) -> np.ndarray:
    """Exact top-K item numbers per query, merged chunk by chunk."""
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.full((len(queries), K), -1, np.int64)
    for start, _assign, vecs in mix.chunks(n):
        sims = queries @ vecs.T
        top = np.argpartition(-sims, K, axis=1)[:, :K]
        s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :K]
        best_s, best_i = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def key(i: int) -> str:
    return f"item-{i:09d}"


# ---------------------------------------------------------------------------------------------------
# Children
# ---------------------------------------------------------------------------------------------------
def status_mb() -> dict[str, float]:
    """VmRSS, RssAnon (private memory), RssFile (mapped file pages, evictable), VmHWM, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            out[name] = int(value.split()[0]) / 1024
    return out


def build_child(cfg: dict) -> dict:
    from vitrine.index.store import IndexStore, NewItem

    n, root = cfg["n"], Path(cfg["index"])
    mix = Mixture(cfg["dim"], cfg["clusters"])
    factory = None if cfg["factory"] == "auto" else cfg["factory"]
    start, written, flushes = time.perf_counter(), 0, []
    store = IndexStore.create(root, {**FP, "dim": cfg["dim"]}, factory=factory)
    for first, assign, vecs in mix.chunks(n):
        for lo in range(0, len(vecs), cfg["batch"]):
            items = [
                NewItem(
                    key(i),
                    f"/photos/{c:04d}/{i:09d}.jpg",
                    f"{i:064x}",
                    100_000 + i % 900_000,
                    1_700_000_000_000_000_000 + i,
                    captions=[f"synthetic photo {i} of cluster {c}"],
                    metadata={
                        "cluster": int(c),
                        "shard": i % 16,
                        "date": f"2024-{1 + i % 12:02d}-{1 + i % 28:02d}",
                    },
                    source="synthetic",
                    embedding=v,
                )
                for i, c, v in zip(
                    range(first + lo, first + lo + cfg["batch"]),
                    assign[lo : lo + cfg["batch"]].tolist(),
                    vecs[lo : lo + cfg["batch"]],
                    strict=False,
                )
            ]
            store.write(items)
            written += len(items)
            if written % cfg["flush_every"] < cfg["batch"]:
                t0 = time.perf_counter()
                store.flush()
                flushes.append(round(time.perf_counter() - t0, 1))
                print(
                    f"  {written:,} items, {time.perf_counter() - start:.0f} s, load {loadavg()}", flush=True
                )
    t0 = time.perf_counter()
    store.close()
    flushes.append(round(time.perf_counter() - t0, 1))
    return {"build_s": time.perf_counter() - start, "flush_s": flushes, "peak": status_mb()["VmHWM"]}


def serve_child(cfg: dict) -> dict:
    from vitrine.index import ann, snapshots
    from vitrine.index.searching import TIE_MARGIN
    from vitrine.index.store import IndexStore

    mapped, hashed = VARIANTS[cfg["variant"]]
    ann.MMAP_MIN_BYTES = 0 if mapped else 1 << 62
    if hashed:  # the open before this change: every reader hashed the whole snapshot
        load = snapshots.load_generation
        snapshots.load_generation = lambda *a, **kw: load(*a[:4], full=True)
    queries = np.load(cfg["queries"])
    top = np.load(cfg["truth"])
    before = status_mb()
    t0 = time.perf_counter()
    reader = IndexStore.open(cfg["index"])
    opened = {"open_s": time.perf_counter() - t0, "after_open": status_mb(), "before": before}
    stats = reader.stats()
    rows = []
    sweeps = [""] + (cfg["params"] if cfg["sweep"] else [])
    for knobs in sweeps:
        ann_index = reader._gen.ann  # the bench varies the knob on the open store's own structure
        ann_index.search_params = {k: float(v) for k, v in (kv.split("=") for kv in knobs.split(",") if kv)}
        reader.search(queries[:5], k=K)  # first touch of the code paths
        wall, cpu, found = [], [], []
        for q in queries:
            t, c = time.perf_counter(), time.thread_time()
            hits = reader.search(q, k=K + 1)[0][:K]  # Searcher.pages asks one past the page, as REST does
            wall.append(time.perf_counter() - t)
            cpu.append(time.thread_time() - c)  # work done, whatever the neighbours take of the cores
            found.append([int(h.key.split("-")[1]) for h in hits])
        ann_only = []
        for q in queries:  # the FAISS part alone, as many candidates as the store asks for
            t = time.perf_counter()
            ann_index.search(q[None], K + 1 + TIE_MARGIN)
            ann_only.append(time.perf_counter() - t)
        recall = float(np.mean([len(set(f) & set(t.tolist())) / K for f, t in zip(found, top, strict=True)]))
        rows.append(
            {
                "params": knobs or "default",
                "recall": recall,
                **{f"p{p}": float(np.percentile(1000 * np.array(wall), p)) for p in (50, 95, 99)},
                **{f"cpu_p{p}": float(np.percentile(1000 * np.array(cpu), p)) for p in (50, 99)},
                **{f"ann_p{p}": float(np.percentile(1000 * np.array(ann_only), p)) for p in (50, 99)},
                "rss": status_mb(),
            }
        )
    reader.close()
    return {**opened, "rows": rows, "factory": stats["effective_factory"], "count": stats["count"]}


def run_child(kind: str, cfg: dict) -> dict:
    cmd = [sys.executable, "-m", "bench.scale10m", "--child", kind, json.dumps(cfg)]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        cmd, cwd=repo, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(repo)}
    )
    if proc.returncode:
        raise SystemExit(f"{kind} child failed ({proc.returncode}); its output:\n{proc.stdout[-3000:]}")
    print(proc.stdout.strip().rpartition("\n")[0], flush=True)  # progress lines; the last is the answer
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------
def sizes(root: Path) -> tuple[float, float]:
    """(SQLite MB incl. WAL, FAISS snapshot MB) of the live generation."""
    gen = root / (root / "CURRENT").read_text().strip()
    db = sum(p.stat().st_size for p in gen.glob("meta.sqlite*"))
    snap = sum(p.stat().st_size for p in gen.glob("index.*.faiss"))
    return db / 2**20, snap / 2**20


def existing_count(root: Path) -> int:
    import sqlite3

    try:
        gen = root / (root / "CURRENT").read_text().strip()
        conn = sqlite3.connect(f"file:{gen / 'meta.sqlite'}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM items").fetchone()[0])
        finally:
            conn.close()
    except (OSError, sqlite3.Error):
        return -1


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, cfg = sys.argv[2], json.loads(sys.argv[3])
        quiet_libraries()
        print(json.dumps(build_child(cfg) if kind == "build" else serve_child(cfg)))
        return 0
    args = parse_args(Args, argv, prog="python -m bench.scale10m")
    root = Path(args.index) if args.index else CACHE_DIR / f"scale10m-{args.n}"
    started, load_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), loadavg()
    print(f"machine: {machine()}\nload at start: {load_start}", flush=True)
    cfg: dict[str, Any] = {**dataclasses.asdict(args), "index": str(root)}
    build: dict[str, Any] = {"build_s": float("nan"), "flush_s": [], "peak": float("nan"), "reused": True}
    if existing_count(root) != args.n:
        shutil.rmtree(root, ignore_errors=True)
        build = {**run_child("build", cfg), "reused": False}
    db_mb, snap_mb = sizes(root)
    mix = Mixture(args.dim, args.clusters)
    queries = mix.queries(args.n, args.queries)
    t0 = time.perf_counter()
    top = truth(mix, args.n, queries)
    print(f"ground truth in {time.perf_counter() - t0:.0f} s", flush=True)
    tmp = CACHE_DIR / f"scale10m-q-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "q.npy", queries)
    np.save(tmp / "t.npy", top)
    served = {}
    for variant in args.variants:
        sweep = variant == "mapped, stamped"
        served[variant] = run_child(
            "serve",
            {
                **cfg,
                "variant": variant,
                "queries": str(tmp / "q.npy"),
                "truth": str(tmp / "t.npy"),
                "sweep": sweep,
            },
        )
    shutil.rmtree(tmp, ignore_errors=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    text = report(args, argv, build, db_mb, snap_mb, served, started, load_start)
    print(text)
    if args.write_results:
        write_section(HEADING, text)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(
    args: Args,
    argv: Sequence[str],
    build: dict,
    db_mb: float,
    snap_mb: float,
    served: dict,
    started: str,
    load_start: str,
) -> str:
    command = f"`.venv/bin/python -m bench.scale10m {shlex.join(argv)}`"
    rate = args.n / build["build_s"] if build["build_s"] == build["build_s"] else float("nan")
    head = [
        f"Command: {command}  ",
        f"Run: {started}; machine: {machine()}  ",
        f"Load average at start {load_start}, at end {loadavg()}. The 2 cores were shared with other "
        "agents' builds and tests during the run: timings are provisional (the coordinator re-runs on a "
        "quieter machine).",
        "",
        f"Build through IndexWriter: {args.n:,} items in {build['build_s']:.0f} s ({rate:,.0f} items/s, "
        f"batches of {args.batch}, flush every {args.flush_every:,}; "
        f"flush/close seconds {build['flush_s']}); "
        f"build process peak RSS {build['peak']:.0f} MB"
        + (" (index reused from an earlier build)" if build.get("reused") else "")
        + f". On disk: meta.sqlite {db_mb:,.0f} MB, FAISS snapshot {snap_mb:,.0f} MB.",
        "",
    ]
    rows = []
    for variant, out in served.items():
        for r in out["rows"]:
            rss = r["rss"]
            rows.append(
                [
                    variant,
                    out["factory"],
                    r["params"],
                    f"{out['open_s']:.1f}",
                    f"{out['after_open']['RssAnon']:.0f}",
                    f"{rss['RssAnon']:.0f}",
                    f"{rss['RssFile']:.0f}",
                    f"{r['p50']:.1f}",
                    f"{r['p95']:.1f}",
                    f"{r['p99']:.1f}",
                    f"{r['cpu_p50']:.1f} / {r['cpu_p99']:.1f}",
                    f"{r['ann_p50']:.1f} / {r['ann_p99']:.1f}",
                    f"{r['recall']:.3f}",
                ]
            )
    headers = [
        "serving",
        "structure",
        "search params",
        "open s",
        "anon MB open",
        "anon MB served",
        "file MB served",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "CPU p50/p99 ms",
        "FAISS only p50/p99 ms",
        "recall@10",
    ]
    notes = [
        "",
        f"Queries: {args.queries} near-data vectors one at a time, `reader.search(v, k=11)` (the store call "
        "of a REST search for 10 hits: one past the page) = FAISS + "
        "SQLite hit lookup (keys, paths, captions, metadata JSON); text encoding not included. CPU: the "
        "querying thread's CPU time per query (what the query costs, without the waits for a core that "
        "the other agents' load adds to the wall-clock p50/p95/p99). FAISS only: `AnnIndex.search` of the "
        "same queries alone (k + tie margin candidates), wall-clock. "
        "anon MB: the process's private memory (RssAnon) after open and after the queries; "
        "file MB: snapshot pages mapped in (RssFile: the OS page cache, shared by every reader and "
        "evictable). Variants ran one after the other without dropping the page cache, so later ones "
        "may find the snapshot cached.",
    ]
    return "\n".join([*head, table(headers, rows), *notes])


if __name__ == "__main__":
    raise SystemExit(main())
