"""Whole-build throughput: ``indexer build`` of real photos end to end against the naive loop, same run.

Rows, all on the same Flickr8k photos (``--images``, a folder of symlinks is made for the first ``--n``)
with a random ViT-B/32-sized CLIP (``tests/checkpoints.py``; random weights cost what trained ones do):

* ``naive``: PIL open -> the checkpoint's processor -> fp32 ``get_image_features``, batch 32, nothing
  overlapped, model already loaded (so its start-up is not counted: the comparison favours it);
* ``indexer build`` as a user runs it, a fresh process into a new index: start-up (imports, model load),
  decode, preprocess, model, SQLite and FAISS, all counted; with ``--num-workers 0`` (the default: the
  split of the cores measured while it runs) and ``--num-workers 2`` (the former fixed default);
* the build phase alone (the report's ``seconds``) beside it, so start-up is visible.

Then one in-process build of the same photos reports where the time went (the pipeline's per-stage
times: decode and preprocess CPU in the workers, the model's wall time, the model waiting for input,
the store), and the text query encoding latency (one query, as a server encodes it).

    .venv/bin/python -m bench.build                      # 1000 photos, 2 rounds, ~3 min on 2 cores
    .venv/bin/python -m bench.build --n 2000 --images ../shared/datasets/flickr8k/train/images
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import CACHE_DIR, base_checkpoint, loadavg, machine, table
from bench.load import QUERIES
from vitrine.config import arg, parse_args, quiet_libraries

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "flickr8k" / "dev" / "images"


@dataclass(kw_only=True)
class BuildBenchArgs:
    """`indexer build` of real photos end to end (start-up included) vs the naive Hugging Face loop."""

    images: str = arg(str(DEFAULT_IMAGES), "folder of photos (Flickr8k)")
    n: int = arg(1000, "photos indexed by each build")
    naive_n: int = arg(256, "photos through the naive loop (its rate does not depend on the count)")
    model: str = arg("", "checkpoint folder (default: a random ViT-B/32-sized CLIP, built once)")
    rounds: int = arg(2, "builds per variant, alternating which runs first; medians are reported")
    profile: bool = arg(True, "also run one in-process build for the per-stage profile")
    runtimes: str = arg(
        "openvino:auto,onnx:int8",
        "extra `indexer build` rows, RUNTIME:PRECISION comma-separated (also profiled); '' for none",
    )


def catalog(images: Path, n: int) -> Path:
    """A folder of symlinks to the first ``n`` photos (sorted), made once."""
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
    if len(files) < n:
        raise SystemExit(f"{images} has {len(files)} photos, fewer than --n {n}")
    out = CACHE_DIR / f"build-catalog-{images.parent.name}-{n}"
    if not out.is_dir():
        tmp = Path(tempfile.mkdtemp(dir=CACHE_DIR))
        for f in files:
            (tmp / f.name).symlink_to(f.resolve())
        os.replace(tmp, out)
    return out


def naive(model: Path, files: list[Path]) -> float:
    """Images/s of PIL -> processor -> fp32 get_image_features in batches of 32 (model loaded first)."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    net = AutoModel.from_pretrained(model).float().eval()
    processor = AutoImageProcessor.from_pretrained(model)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(files), 32):
            images = [Image.open(f).convert("RGB") for f in files[i : i + 32]]
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            net.get_image_features(pixel_values=pixels)
    return len(files) / (time.perf_counter() - start)


def indexer_build(model: Path, cat: Path, flags: tuple[str, ...]) -> tuple[float, float, float]:
    """(wall seconds of the whole process, the build's own seconds, the process's CPU seconds)."""
    index = Path(tempfile.mkdtemp(dir=CACHE_DIR)) / "index"
    cmd = [sys.executable, "-m", "indexer", "build", str(cat), "--index", str(index), "--model", str(model)]
    cmd += [*flags, "--json", "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(index.parent, ignore_errors=True)
    if out.returncode:
        raise SystemExit(f"indexer build failed: {out.stderr[-2000:]}")
    report = json.loads(out.stdout.strip().splitlines()[-1])
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return wall, float(report["seconds"]), cpu


def runtime_pairs(runtimes: str) -> list[tuple[str, str]]:
    """``"openvino:auto,onnx:int8"`` -> [(runtime, precision), ...]."""
    return [tuple(v.strip().split(":")) for v in runtimes.split(",") if v.strip()]


def variant_flags(runtimes: str) -> dict[str, tuple[str, ...]]:
    """Row name -> the `indexer build` flags: torch with the measured split and the former fixed two
    workers, then one row per RUNTIME:PRECISION (measured split)."""
    variants = {
        "torch, measured split (default)": ("--num-workers", "0"),
        "torch, --num-workers 2 (former default)": ("--num-workers", "2"),
    }
    for runtime, precision in runtime_pairs(runtimes):
        variants[f"{runtime} {precision}"] = ("--runtime", runtime, "--precision", precision)
    return variants


def build_rows(name: str, n: int, runs: list, base: float, cores: int) -> list[list]:
    """The end-to-end row and the build-phase row of one variant: medians over its runs."""
    wall, seconds, cpu = (statistics.median(r[i] for r in runs) for i in range(3))
    rate, phase = n / wall, n / seconds
    return [
        [
            f"indexer build, {name}",
            n,
            f"{wall:.1f}",
            f"{wall - seconds:.1f}",
            f"{rate:.1f}",
            f"{rate / base:.2f}",
            f"{n / (cpu / cores):.1f}",
        ],
        [
            f"  build phase only ({name})",
            n,
            f"{seconds:.1f}",
            "-",
            f"{phase:.1f}",
            f"{phase / base:.2f}",
            "-",
        ],
    ]


def profile(model: Path, cat: Path, **runtime: str) -> tuple[dict, float]:
    """One in-process build's pipeline stats (and its images/s); then text query p50 in ms."""
    from vitrine.catalog.readers import open_catalog
    from vitrine.open_index import load_encoder, open_for_build, run_build

    index = Path(tempfile.mkdtemp(dir=CACHE_DIR)) / "index"
    encoder = load_encoder(index, str(model), catalog=open_catalog(str(cat)), **runtime)
    store = open_for_build(index, encoder)
    try:
        report = run_build(store, encoder, open_catalog(str(cat)))
    finally:
        store.close()
        shutil.rmtree(index.parent, ignore_errors=True)
    stats = {
        **encoder.pipeline_stats.to_dict(),
        "build_seconds": report.seconds,
        "encoder": f"{encoder.runtime.runtime} {encoder.runtime.precision}",
    }
    encoder.trace()  # as a server runs it
    latencies = []
    for i in range(5 + 4 * len(QUERIES)):
        start = time.perf_counter()
        encoder.encode_texts([QUERIES[i % len(QUERIES)]])
        if i >= 5:
            latencies.append(time.perf_counter() - start)
    return stats, statistics.median(latencies) * 1000


def main(argv: list[str] | None = None) -> int:
    a = parse_args(BuildBenchArgs, argv, prog="python -m bench.build")
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    model = Path(a.model) if a.model else base_checkpoint("base")
    cat = catalog(Path(a.images), a.n)
    print(f"{machine()}\nload average at start: {loadavg()}", flush=True)
    cores = len(os.sched_getaffinity(0))
    base = naive(model, sorted(cat.iterdir())[: a.naive_n])
    rows = [["naive loop (fp32, batch 32, model loaded)", a.naive_n, "-", "-", f"{base:.1f}", "1.00", "-"]]
    variants = variant_flags(a.runtimes)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    for r in range(a.rounds):  # A B, then B A: neither variant always runs first (page cache, load)
        for name in list(variants)[:: 1 if r % 2 == 0 else -1]:
            runs[name].append(indexer_build(model, cat, variants[name]))
    for name in variants:
        rows += build_rows(name, a.n, runs[name], base, cores)
    headers = [
        "row",
        "images",
        "wall s",
        "start-up + exit s",
        "images/s",
        "x naive",
        f"images per {cores} CPU-s",
    ]
    print(table(headers, rows), flush=True)
    if a.profile:
        for pair in [None, *runtime_pairs(a.runtimes)]:
            kwargs = {} if pair is None else {"runtime": pair[0], "precision": pair[1]}
            stats, text_p50 = profile(model, cat, **kwargs)
            print(f"profile of one in-process build ({stats['encoder']}):", json.dumps(stats))
            print(f"text query encode p50 ({stats['encoder']}): {text_p50:.2f} ms (one query)")
    print(f"load average at end: {loadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
