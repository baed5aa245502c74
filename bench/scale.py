"""Scale benchmark: ANN build time, peak memory, QPS / p99 vs recall@10; Ray vs single-process throughput.

    python bench/scale.py            # 100k and 1M synthetic vectors (dim 256), flickr8k embeddings, Ray
    python bench/scale.py --quick    # 20k vectors, 60 photos: a smoke run in a couple of minutes
    python bench/scale.py --sizes 100000 --factories RFlat --no-photos --no-write   # one family only
    python bench/scale.py --autotune-check 1000000   # does autotune's IVF-PQ+RFlat choice hold at 1M?

Each (data, size, factory) runs in its own child process, so ``ru_maxrss`` is that config's peak
(it includes the float32 data itself: n x dim x 4 bytes, listed as ``data MB``). Recall@10 is against
exact inner-product search over the same vectors, for 200 held-out queries drawn from the same
mixture. QPS: all queries in one batch (FAISS threads: both cores); p99: one query at a time.
Synthetic data: a Gaussian mixture on the unit sphere (1000 clusters), dim 256 to keep the 1M run
in ~20 minutes on 2 cores (512 doubles memory and scan time). Real data: ../shared flickr8k photos
embedded once with the DeiT-tiny + MiniLM dual encoder (cached under the bench cache dir).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE_DIR, loadavg, machine, table, write_section

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parents[1] / "shared" / "datasets" / "flickr8k"
OPQ_NOTE = (
    "OPQ32_128 rotates and reduces to 128-d before PQ32; whole builds took 47 s at 100k, 58 s at "
    "1M and 111 s at 20k on a quiet 2-core machine: OPQ's iterations, not n, set the time"
)
SWEEPS = {"HNSW": ("efSearch", (16, 32, 64, 128, 256, 512, 1024)), "IVF": ("nprobe", (4, 8, 16, 32, 64, 128))}
#: Refine structures (",RFlat" / "Refine(...)") sweep k_factor (candidates re-ranked per result) crossed
#: with fewer nprobe values: their recall is bounded by how far down the PQ ranking the true neighbours
#: fall, which only k_factor reaches (nprobe alone left IVF1024,PQ32,RFlat at 0.606 at 1M).
REFINE_SWEEP = (("nprobe", (4, 16, 64)), ("k_factor", (8, 32, 128, 512)))


def mixture(n: int, dim: int, seed: int = 0, clusters: int = 1000) -> np.ndarray:
    """n points of a Gaussian mixture on the unit sphere (clustered like real embeddings)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        x = centres[rng.integers(0, clusters, stop - start)] + 0.7 * rng.standard_normal(
            (stop - start, dim), dtype=np.float32
        )
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def load_data(name: str, n: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(base, queries) for a config: synthetic mixture, or the cached photo embeddings."""
    if name == "flickr":
        data = np.load(CACHE_DIR / "scale-flickr.npy")
        rng = np.random.default_rng(0)
        order = rng.permutation(len(data))
        return data[order[200:]], data[order[:200]]
    data = mixture(n + 200, dim)
    return data[:n], data[n:]


def child(config: dict) -> dict:
    """One config in this process: build, then sweep the search knob; returns the row data."""
    import faiss

    from vitrine.index.ann import AnnIndex

    base, queries = load_data(config["data"], config["n"], config["dim"])
    data_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    truth = exact.search(queries, 10)[1]
    del exact
    ann, start = AnnIndex(base.shape[1], config["factory"]), time.perf_counter()
    ann.rebuild(np.arange(len(base), dtype=np.int64), base)
    build = time.perf_counter() - start
    knob, values = next((v for k, v in SWEEPS.items() if k in config["factory"]), (None, (0,)))
    grid = [{knob: v} if knob else {} for v in values]
    if "RFlat" in config["factory"] or "Refine" in config["factory"]:
        (k1, v1), (k2, v2) = REFINE_SWEEP
        grid = [{k1: a, k2: b} for a in v1 for b in v2]
    points = []
    for params in grid:
        ann.search_params = params
        start = time.perf_counter()
        found = ann.search(queries, 10)[1]
        qps = len(queries) / (time.perf_counter() - start)
        single = []
        for q in queries:
            t0 = time.perf_counter()
            ann.search(q[None, :], 10)
            single.append(time.perf_counter() - t0)
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        points.append(
            {
                "param": " ".join(f"{k}={v}" for k, v in params.items()) or "-",
                "recall": recall,
                "qps": qps,
                "p99_ms": 1000 * float(np.percentile(single, 99)),
            }
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        **config,
        "n": len(base),
        "build_s": build,
        "peak_mb": peak / 1024,
        "data_mb": data_rss / 1024,
        "bytes_per_vector": ann.memory_bytes() / len(base),
        "points": points,
    }


def autotune_check(n: int, target: float = 0.95) -> dict:
    """Tune IVF-PQ32+RFlat alone on a 50k sample of the n-vector mixture, build the choice on all n and
    measure it on the held-out queries, with the tuned k_factor and with the sample's unscaled one."""
    import faiss

    from vitrine.index import autotune
    from vitrine.index.ann import AnnIndex

    base, queries = load_data("mixture", n, 256)
    take = min(n, 50_200)  # autotune's default: 200 held-out queries + a 50k base
    sample = base[np.sort(np.random.default_rng(0).choice(n, take, replace=False))]
    autotune.candidates = lambda n, dim: ["IVF{nlist},PQ32,RFlat"]  # this process only
    start = time.perf_counter()
    tuned = autotune.tune(sample, n, autotune.TuneRequest(target_recall=target))
    tune_s, exact = time.perf_counter() - start, faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    truth = exact.search(queries, 10)[1]
    ann, start = AnnIndex(base.shape[1], tuned.factory), time.perf_counter()
    ann.rebuild(np.arange(n, dtype=np.int64), base)
    out = {
        "factory": tuned.factory,
        "sample_recall": tuned.candidates[0].recall,
        "tune_s": round(tune_s, 1),
        "build_s": round(time.perf_counter() - start, 1),
    }
    unscaled = {**tuned.search_params, "k_factor": tuned.search_params["k_factor"] * (take - 200) / n}
    for name, params in (("tuned", tuned.search_params), ("unscaled", unscaled)):
        ann.search_params = params
        found = ann.search(queries, 10)[1]
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)]))
        out[name] = {"params": params, "recall": recall}
    return out


def run_child(config: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(config)], capture_output=True, text=True
    )
    if out.returncode:
        raise SystemExit(f"config {config} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def embed_photos(limit: int) -> tuple[np.ndarray, float]:
    """Embed (once) up to ``limit`` flickr8k photos with the single-process engine; (embeddings, img/s)."""
    from bench.load import checkpoint
    from vitrine.catalog.readers import open_catalog
    from vitrine.model.encoder import Encoder
    from vitrine.open_index import open_for_build, run_build

    cache = CACHE_DIR / "scale-flickr.npy"
    folder = photo_folder(limit)
    encoder = Encoder.from_pretrained(str(checkpoint("deit-minilm")), device="cpu")
    index = CACHE_DIR / f"scale-local-{limit}"
    _rm(index)
    store = open_for_build(index, encoder)
    report = run_build(store, encoder, open_catalog(str(folder)))
    _, vectors = store.embeddings()
    store.close()
    if not cache.exists() or len(np.load(cache, mmap_mode="r")) < len(vectors):
        np.save(cache, vectors)
    return vectors, report.added / report.seconds


def photo_folder(limit: int) -> Path:
    """A folder of symlinks to the first ``limit`` flickr8k photos (train + dev)."""
    folder = CACHE_DIR / f"scale-photos-{limit}"
    if not folder.is_dir():
        folder.mkdir(parents=True)
        photos = sorted((PHOTOS / "train" / "images").glob("*.jpg")) + sorted(
            (PHOTOS / "dev" / "images").glob("*.jpg")
        )
        for p in photos[:limit]:
            (folder / p.name).symlink_to(p)
    return folder


def ray_throughput(limit: int) -> dict:
    """Images/s of --engine ray (local 2-CPU cluster, one CPU encoder actor) on the same photos."""
    from bench.load import checkpoint
    from indexer.ray_engine import RayOptions, build_with_ray
    from vitrine.catalog.readers import open_catalog
    from vitrine.model.encoder import Encoder
    from vitrine.open_index import open_for_build

    encoder = Encoder.from_pretrained(str(checkpoint("deit-minilm")), device="cpu")
    index = CACHE_DIR / f"scale-ray-{limit}"
    _rm(index)
    store = open_for_build(index, encoder)
    start = time.perf_counter()
    opts = RayOptions(shard_size=64, cpus_per_worker=1, init_kwargs={"num_cpus": 2})
    report, run = build_with_ray(store, encoder, open_catalog(str(photo_folder(limit))), opts)
    total = time.perf_counter() - start
    store.close()
    return {"images": report.added, "total_s": total, "ray_s": run.seconds}


def _rm(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20k vectors and 60 photos (smoke run)")
    parser.add_argument("--dim", type=int, default=256, help="synthetic dimension")
    parser.add_argument("--photos", type=int, default=None, help="flickr8k photos to embed (default 7000)")
    parser.add_argument("--sizes", help="comma-separated synthetic sizes (default 100000,1000000)")
    parser.add_argument("--factories", help="comma-separated substrings: run only factories containing one")
    parser.add_argument("--no-photos", action="store_true", help="skip the flickr8k rows and the Ray run")
    parser.add_argument("--autotune-check", type=int, metavar="N", help="only check autotune's PQ+RFlat at N")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args(argv)
    if args.child or args.autotune_check:
        out = child(json.loads(args.child)) if args.child else autotune_check(args.autotune_check)
        print(json.dumps(out))
        return 0
    sizes = [20_000] if args.quick else [100_000, 1_000_000]
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else sizes
    wanted = args.factories.split(",") if args.factories else [""]
    photos = args.photos or (60 if args.quick else 3000)
    rows, notes = [], [OPQ_NOTE]
    pipeline = []
    if args.no_photos:
        configs = []
    elif PHOTOS.is_dir():
        vectors, local_rate = embed_photos(photos)
        ray = ray_throughput(min(photos, 60 if args.quick else 600))
        pipeline = [
            ["single process", photos, f"{local_rate:.1f}", "-"],
            [
                "ray (2 CPUs, 1 actor)",
                ray["images"],
                f"{ray['images'] / ray['total_s']:.1f}",
                f"{ray['images'] / ray['ray_s']:.1f} (startup incl.)",
            ],
        ]
        cached = len(np.load(CACHE_DIR / "scale-flickr.npy", mmap_mode="r"))
        configs = [
            {"data": "flickr", "n": cached - 200, "dim": vectors.shape[1], "factory": f}
            for f in ("Flat", "HNSW32", "IVF64,SQ8")
            if cached >= 3000
        ]
    else:
        configs, notes = [], [f"{PHOTOS} absent: no real-photo rows"]
    for n in sizes:
        nlist = 1024 if n >= 1_000_000 else 256
        factories = (
            "Flat",
            "HNSW32",
            f"IVF{nlist},PQ32,RFlat",
            f"OPQ32_128,IVF{nlist},PQ32,RFlat",
            f"IVF{nlist},SQ8",
        )
        for factory in factories:
            configs.append({"data": "mixture", "n": n, "dim": args.dim, "factory": factory})
    for config in [c for c in configs if any(w in c["factory"] for w in wanted)]:
        result = run_child(config)
        print(json.dumps(result), flush=True)
        for p in result["points"]:
            rows.append(
                [
                    result["data"],
                    result["n"],
                    result["factory"],
                    f"{result['build_s']:.1f}",
                    f"{result['peak_mb']:.0f}",
                    f"{result['data_mb']:.0f}",
                    f"{result['bytes_per_vector']:.0f}",
                    p["param"],
                    f"{p['recall']:.3f}",
                    f"{p['qps']:.0f}",
                    f"{p['p99_ms']:.2f}",
                ]
            )
    report(args, rows, pipeline, notes)
    return 0


def report(args: argparse.Namespace, rows: list, pipeline: list, notes: list[str]) -> None:
    headers = [
        "data",
        "n",
        "factory",
        "build s",
        "peak MB",
        "data MB",
        "B/vec",
        "param",
        "recall@10",
        "QPS",
        "p99 ms",
    ]
    body = [
        f"`python bench/scale.py{' --quick' if args.quick else ''}` — {machine()}; load {loadavg()}",
        "",
        table(headers, rows),
    ]
    if pipeline:
        body += [
            "",
            "Pipeline throughput, same photos and model (DeiT-tiny + MiniLM, CPU):",
            "",
            table(["engine", "images", "img/s end to end", "img/s Ray stage"], pipeline),
        ]
    body += [f"\nNote: {n}" for n in notes] + ["", "![recall vs QPS](scale.png)"]
    text = "\n".join(body)
    print(text)
    if not args.no_write and not args.quick and not (args.sizes or args.factories or args.no_photos):
        plot(rows)  # partial runs leave the full run's plot and section alone
        write_section("## Scale: ANN structures at 100k-1M, Ray pipeline (bench/scale.py)", text)


def plot(rows: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in dict.fromkeys((r[0], r[1], r[2]) for r in rows):
        pts = [(float(r[8]), float(r[9])) for r in rows if (r[0], r[1], r[2]) == key]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{key[0]} {key[1]} {key[2]}")
    ax.set(xlabel="recall@10", ylabel="QPS (batch of 200)", yscale="log", title="bench/scale.py")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(HERE / "scale.png", dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
