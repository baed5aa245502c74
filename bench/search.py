"""Text-query latency end to end (tokenize + encode + ANN search + hit lookup), k=10, per FAISS factory.

Data: clustered, CLIP-like unit vectors (a few thousand anisotropic Gaussian clusters of uneven size and
spread on the 512-d sphere; see :func:`clustered`). For each size and factory the benchmark reports
build time, bytes per vector (serialized FAISS size / n, which includes the 8-byte id map), latency of
real text queries through the ViT-B/32-sized random CLIP text tower, and recall@10 against exact search
(``faiss.IndexFlatIP``) on query vectors drawn near the data (perturbed data points; a random model's
text vectors are not near anything, so they cannot measure recall).

End to end means: at ``n <= --store-max`` (default 100k) the vectors are written into a real
:class:`~vitrine.index.store.IndexStore` (SQLite) and every query goes through
:meth:`vitrine.search.searcher.Searcher.search_text`; each factory's
:class:`~vitrine.index.ann.AnnIndex` is built with
``rebuild`` (what the store's flush does) and swapped into the open store. Above that (1M), writing the
rows into SQLite would dominate the run, so the FAISS part is built directly via ``AnnIndex`` and a
query is ``Searcher.text_vector`` (tokenize + encode) followed by ``AnnIndex.search``, without the SQLite
hit lookup (about 1 ms at 100k, see the store rows).

    .venv/bin/python bench/search.py --sizes 100000 1000000
    .venv/bin/python bench/search.py --sizes 100000 --factories Flat HNSW32   # quicker
"""

from __future__ import annotations

import dataclasses
import gc
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss
import numpy as np
import torch

from bench.common import base_checkpoint, loadavg, machine, table, timed, write_section
from vitrine.config import arg, parse_args, quiet_libraries
from vitrine.index.ann import AnnIndex
from vitrine.index.factories import choose_factory
from vitrine.index.store import IndexStore, NewItem
from vitrine.model.encoder import Encoder
from vitrine.search.searcher import Searcher

HEADING = "## Search latency (bench/search.py)"
K = 10


@dataclasses.dataclass
class Args:
    """Text-query latency and recall@10 per FAISS factory on clustered data."""

    sizes: list[int] = arg([100_000, 1_000_000], "collection sizes")
    dim: int = arg(512, "vector dimension (the ViT-B/32 projection)")
    clusters: int = arg(4000, "Gaussian clusters in the data")
    factories: list[str] = arg(
        ["Flat", "HNSW32", "IVF2048,SQ8", "IVF2048,PQ64,RFlat", "auto"],
        "FAISS factories; 'auto' is what choose_factory picks for n (reused when already measured)",
    )
    text_queries: int = arg(30, "text queries timed end to end per factory")
    near_queries: int = arg(200, "near-data queries for recall@10 and search-only latency")
    torch_threads: int = arg(
        1,
        "torch threads for the text tower (1 avoids OpenMP spin-waits on a "
        "shared, oversubscribed machine; 0 = torch's default)",
    )
    store_max: int = arg(100_000, "largest n written into a real SQLite IndexStore")
    hnsw_cap_s: float = arg(180.0, "stop building an HNSW graph after this long and extrapolate")
    search_threads: int = arg(
        1,
        "FAISS OpenMP threads while timing queries (builds use all cores); one "
        "query per thread is how a server runs concurrent queries, and avoids "
        "OpenMP spin-waits on a shared machine",
    )
    sweep: bool = arg(True, "also sweep nprobe / efSearch / k_factor (search-only, no rebuild)")
    write_results: bool = arg(False, "replace this benchmark's section of bench/RESULTS.md")


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """CLIP-like unit vectors: cluster centres share a common direction (unrelated items have cosine
    ~0.3, as CLIP embeddings do), cluster sizes are log-normal (a few big categories, a long tail) and
    each cluster has its own spread (cosine to the centre ~0.65-0.9)."""
    rng = np.random.default_rng(seed)
    common = _unit(rng.standard_normal((1, dim), dtype=np.float32))
    centres = _unit(0.7 * common + _unit(rng.standard_normal((clusters, dim), dtype=np.float32)))
    weights = rng.lognormal(0.0, 1.0, clusters)
    assign = rng.choice(clusters, size=n, p=weights / weights.sum())
    spread = rng.uniform(0.5, 1.15, clusters).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        a = assign[start : start + 100_000]
        noise = rng.standard_normal((len(a), dim), dtype=np.float32) / np.sqrt(dim, dtype=np.float32)
        out[start : start + len(a)] = _unit(centres[a] + spread[a, None] * noise)
    return out


def near_queries(data: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """Perturbed data points (cosine ~0.9 to their source): queries that land where the data is."""
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(data), size=count, replace=False)
    noise = rng.standard_normal((count, data.shape[1]), dtype=np.float32) / np.sqrt(data.shape[1])
    return _unit(data[picks] + 0.45 * noise)


def text_queries(count: int) -> list[str]:
    colours = ["red", "blue", "black", "white", "green", "beige", "striped", "floral", "navy", "pink"]
    things = [
        "summer dress",
        "leather jacket",
        "running shoes",
        "wool sweater",
        "handbag",
        "denim jeans",
        "silk scarf",
        "rain coat",
        "sun hat",
        "linen shirt",
        "ankle boots",
        "backpack",
    ]
    extras = ["", " for kids", " with pockets", " on a model", " in the snow", " flat lay", " size M"]
    out = [f"{c} {t}{e}" for e in extras for t in things for c in colours]
    return out[:: max(1, len(out) // count)][:count]


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------
def percentiles(ms: Sequence[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def latencies(fn: Callable[[Any], Any], inputs: Sequence[Any], warmup: int = 5) -> list[float]:
    for item in inputs[:warmup]:
        fn(item)
    out = []
    for item in inputs:
        start = time.perf_counter()
        fn(item)
        out.append(1000 * (time.perf_counter() - start))
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / K for f, t in zip(found, truth, strict=True)]))


def build(factory: str, ids: np.ndarray, vectors: np.ndarray, cap_s: float) -> tuple[AnnIndex, float, str]:
    """AnnIndex.rebuild (train + add), except HNSW, which is added in chunks so a build that would run
    past ``cap_s`` stops early with an extrapolated total instead of eating the whole run."""
    ann = AnnIndex(vectors.shape[1], factory)
    if not factory.startswith("HNSW"):
        seconds, _ = timed(lambda: ann.rebuild(ids, vectors))
        return ann, seconds, ""
    start, chunk = time.perf_counter(), 25_000
    for lo in range(0, len(ids), chunk):
        ann.add(ids[lo : lo + chunk], vectors[lo : lo + chunk])
        elapsed = time.perf_counter() - start
        if elapsed > cap_s and lo + chunk < len(ids):
            done = lo + chunk
            # HNSW insertion cost grows ~log n per vector: extrapolate n log n.
            total = elapsed * (len(ids) * np.log(len(ids))) / (done * np.log(done))
            return ann, elapsed, f"stopped at {done:,} after {elapsed:.0f} s; ~{total / 60:.0f} min for all"
    return ann, time.perf_counter() - start, ""


def sweep_params(factory: str) -> list[dict[str, float]]:
    if factory.startswith("HNSW"):
        return [{"efSearch": e} for e in (32, 64, 128, 256)]
    if "IVF" in factory:
        grid = [{"nprobe": p} for p in (16, 32, 64, 128)]
        if "RFlat" in factory:
            grid = grid[1:]
        return [{**g, "k_factor": k} for g in grid for k in (4, 8)] if "RFlat" in factory else grid
    return []


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(Args, argv, prog="bench/search.py")
    quiet_libraries()
    all_threads = faiss.omp_get_max_threads()
    started = time.time()
    print(f"machine: {machine()}, faiss {faiss.__version__}\nload average at start: {loadavg()}", flush=True)
    encoder = Encoder.from_pretrained(str(base_checkpoint()), device="cpu")
    texts = text_queries(args.text_queries)
    encode_rows = encode_latencies(encoder, texts[:15])
    encode_table = table(["text tower", "torch threads", "encode p50 ms", "encode p99 ms"], encode_rows)
    print(encode_table, flush=True)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    encode_ms = latencies(lambda t: encoder.encode_texts([t]), texts)

    rows: list[list[Any]] = []
    sweep_rows: list[list[Any]] = []
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="vitrine-search-bench-"))
    try:
        for n in args.sizes:
            seconds, data = timed(lambda n=n: clustered(n, args.dim, args.clusters))
            queries = near_queries(data, args.near_queries)
            exact = faiss.IndexFlatIP(args.dim)
            exact.add(data)
            _, truth = exact.search(queries, K)  # positions; ids below are position + 1
            del exact
            truth = truth + 1
            ids = np.arange(1, n + 1, dtype=np.int64)
            print(f"\nn={n:,}: data {seconds:.0f} s; load {loadavg()}", flush=True)

            store = None
            if n <= args.store_max:
                store = IndexStore.create(tmp / f"store-{n}", encoder.fingerprint, factory="Flat")
                write_s, _ = timed(lambda s=store, d=data: write_store(s, d))
                stored = store._gen.ann.ids()  # vector ids in insertion order
                if not np.array_equal(stored, ids):
                    raise RuntimeError("store vector ids are not 1..n in insertion order")
                notes.append(f"n={n:,}: SQLite store written in {write_s:.0f} s ({n / write_s:,.0f} rows/s)")
                print(f"  store written: {write_s:.0f} s", flush=True)
            measured: dict[str, list[Any]] = {}
            for requested in args.factories:
                factory = choose_factory(n, args.dim) if requested == "auto" else requested
                label = f"auto = {factory}" if requested == "auto" else factory
                if factory in measured:
                    rows.append([f"{n:,}", label, *measured[factory][2:]])
                    continue
                ann, build_s, partial = build(factory, ids, data, args.hnsw_cap_s)
                if partial:
                    rows.append([f"{n:,}", label, f"> {build_s:.0f}", "-", "-", "-", "-", "-", "-", partial])
                    measured[factory] = rows[-1]
                    print(f"  {label}: {partial}", flush=True)
                    del ann
                    gc.collect()
                    continue
                faiss.omp_set_num_threads(args.search_threads or all_threads)
                per_vec = ann.memory_bytes() / n
                if ann.fallback_reason:
                    label += f" (built as {ann.effective_factory}: {ann.fallback_reason})"
                if store is not None:
                    with store._ann_lock:
                        store._gen.ann = ann  # the store searches this structure from now on
                    searcher = Searcher(encoder, store)
                    e2e = latencies(lambda t, s=searcher: s.search_text(t, k=K), texts)
                    found_keys: list[np.ndarray] = []

                    def near(q: np.ndarray, s: IndexStore = store, out: list = found_keys) -> None:
                        out.append(np.array([int(h.key.split("-")[1]) + 1 for h in s.search(q, k=K)[0]]))

                    near_ms = latencies(near, list(queries), warmup=0)
                    found = np.stack([np.pad(f, (0, K - len(f)), constant_values=-1) for f in found_keys])
                    how = "Searcher.search_text over IndexStore"
                else:
                    e2e = latencies(lambda t, a=ann: a.search(encoder.encode_texts([t]), K), texts)
                    found_list: list[np.ndarray] = []
                    near_ms = latencies(
                        lambda q, a=ann, out=found_list: out.append(a.search(q[None], K)[1][0]),
                        list(queries),
                        warmup=0,
                    )
                    found = np.stack(found_list)
                    how = "encode_texts + AnnIndex.search"
                recall = recall_at_k(found, truth)
                (p50, p99), (s50, s99) = percentiles(e2e), percentiles(near_ms)
                row = [
                    f"{n:,}",
                    label,
                    f"{build_s:.1f}",
                    f"{per_vec:.0f}",
                    f"{p50:.1f}",
                    f"{p99:.1f}",
                    f"{recall:.3f}",
                    f"{s50:.2f}",
                    f"{s99:.2f}",
                    f"{how}; {params_text(ann)}",
                ]
                rows.append(row)
                measured[factory] = row
                print("  " + " | ".join(row), flush=True)
                if args.sweep:
                    for params in sweep_params(factory):
                        ann.search_params.clear()
                        ann.search_params.update(params)
                        hits: list[np.ndarray] = []
                        ms = latencies(
                            lambda q, a=ann, out=hits: out.append(a.search(q[None], K)[1][0]),
                            list(queries),
                            warmup=0,
                        )
                        s50, s99 = percentiles(ms)
                        sweep_rows.append(
                            [
                                f"{n:,}",
                                factory,
                                params_text(ann),
                                f"{s50:.2f}",
                                f"{s99:.2f}",
                                f"{recall_at_k(np.stack(hits), truth):.3f}",
                            ]
                        )
                        print("    sweep " + " | ".join(sweep_rows[-1]), flush=True)
                    ann.search_params.clear()
                faiss.omp_set_num_threads(all_threads)
                if store is not None:
                    with store._ann_lock:
                        store._gen.ann = AnnIndex(args.dim, "Flat")
                del ann
                gc.collect()
            if store is not None:
                store.close(flush=False)
                shutil.rmtree(tmp / f"store-{n}", ignore_errors=True)
            del data
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    headers = [
        "n",
        "factory",
        "build s",
        "bytes/vector",
        "p50 ms",
        "p99 ms",
        "recall@10",
        "search-only p50 ms",
        "search-only p99 ms",
        "notes",
    ]
    main_table = table(headers, rows)
    sweep_table = table(
        ["n", "factory", "search params", "search-only p50 ms", "search-only p99 ms", "recall@10"], sweep_rows
    )
    e50, e99 = percentiles(encode_ms)
    summary = (
        f"text encode alone: p50 {e50:.1f} ms, p99 {e99:.1f} ms; load average at end {loadavg()}; "
        f"wall time {time.time() - started:.0f} s"
    )
    print(f"\n{main_table}\n\n{sweep_table}\n\n{summary}\n" + "\n".join(notes))
    if args.write_results:
        given = list(argv) if argv is not None else sys.argv[1:]
        command = shlex.join([".venv/bin/python", "bench/search.py", *given])
        body = "\n\n".join(
            [
                f"Command: `{command.strip()}`  \nMachine: {machine()}, faiss {faiss.__version__}  \n"
                f"{summary}.  \n" + "  \n".join(notes),
                f"p50/p99: {args.text_queries} text queries, one at a time, k={K}, tokenize + encode (random "
                "ViT-B/32-sized CLIP text tower, fp32) + search "
                "(+ SQLite hit lookup where the store is used). "
                f"recall@10 and search-only latency: {args.near_queries} near-data queries (perturbed data "
                "points) vs exact `IndexFlatIP`. Data: clustered CLIP-like unit vectors "
                f"({args.clusters} clusters, dim {args.dim}). bytes/vector = serialized FAISS index / n "
                "(includes 8-byte ids; the in-memory id reverse map adds more).",
                main_table,
                "Text encode alone (tokenize + text tower, one query; the table above used "
                f"{args.torch_threads or 'default'} torch thread(s)):\n\n" + encode_table,
                "Search-parameter sweep (search only, same near-data queries):\n\n" + sweep_table,
            ]
        )
        write_section(HEADING, body)
    return 0


def encode_latencies(encoder: Encoder, texts: list[str]) -> list[list[Any]]:
    """One-query text encode latency for fp32 and bf16 text towers at 1 and 2 torch threads."""
    import copy

    rows = []
    before = torch.get_num_threads()
    bf16 = copy.copy(encoder)
    bf16.model = copy.deepcopy(encoder.model).to(torch.bfloat16)
    for name, enc in (("fp32", encoder), ("bf16", bf16)):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p50, p99 = percentiles(latencies(lambda t, e=enc: e.encode_texts([t]), texts))
            rows.append([name, threads, f"{p50:.1f}", f"{p99:.1f}"])
            print("  encode " + " | ".join(map(str, rows[-1])), flush=True)
    torch.set_num_threads(before)
    del bf16
    return rows


def params_text(ann: AnnIndex) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(ann.search_params.items())) or "default params"


def write_store(store: IndexStore, data: np.ndarray, batch: int = 5000) -> None:
    for lo in range(0, len(data), batch):
        store.write(
            [
                NewItem(
                    key=f"item-{i}",
                    path=f"/catalog/{i}.jpg",
                    sha256=f"{i:064x}",
                    size=1,
                    mtime_ns=0,
                    metadata={"shard": str(i % 7)},
                    embedding=data[i],
                )
                for i in range(lo, min(lo + batch, len(data)))
            ]
        )


if __name__ == "__main__":
    raise SystemExit(main())
