"""``indexer build --engine ray``: encode a catalog on a Ray cluster, then index it like the default engine.

Pipeline (Ray Data, streaming): the driver walks the catalog and plans shards of the records that need
work (:mod:`vitrine.build.shards`); per window of shards, ``from_items`` → ``prepare_batch`` tasks on CPU
workers (read, sha256, decode, preprocess) → ``EncodeStage`` actors (one model each, on a GPU when
``num_gpus_per_worker`` > 0) → the driver, which writes each shard to Parquet as soon as all its rows
arrived. Finished shards are skipped on a re-run. Then :class:`vitrine.build.shards.ShardReplay` feeds the
shards through the ordinary Ingestor into the index writer (one FAISS training, at the final flush),
and the shard folder is deleted.

Ray is imported lazily: without it, ``--engine ray`` fails with one line saying what to install.
Workers must be able to import ``vitrine`` (installed on every node, or ``PYTHONPATH`` for a local
cluster, which this module sets) and read the catalog's paths and the model folder.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

import vitrine
from vitrine.build.ingest import BuildReport, catalog_source
from vitrine.build.shards import (
    EncodeStage,
    PixelPrep,
    ShardPlan,
    ShardReplay,
    finished_shards,
    pending_records,
    plan_shards,
    prepare_batch,
    shard_folder,
    shard_row,
    write_shard,
)
from vitrine.catalog.readers import Catalog
from vitrine.errors import MissingDependency, StoreError
from vitrine.files import DEFAULT_MAX_FILE_BYTES
from vitrine.index.store import IndexWriter
from vitrine.model.encoder import Encoder
from vitrine.open_index import run_build

INSTALL_HINT = 'pip install "ray[data]==2.60.0" (or: pip install ".[dist]")'


@dataclass
class RayOptions:
    """Knobs of the Ray engine (the CLI's ``--address``, ``--num-gpus-per-worker`` ... map onto these).

    ``encode_workers``: encoder actors (None: one per GPU group when GPUs are asked for, else 1).
    ``cpus_per_worker``: CPUs each actor reserves (and torch threads it uses). ``shard_size``: records
    per shard file. ``window_shards``: shards per Ray Data run, which bounds driver memory on huge
    catalogs. ``prep_batch``: records per decode task. ``max_file_bytes``: larger files are failures.
    """

    address: str | None = None
    num_gpus_per_worker: float = 0.0
    encode_workers: int | None = None
    cpus_per_worker: float = 1.0
    shard_size: int = 1024
    window_shards: int = 256
    prep_batch: int = 64
    keep_shards: bool = False
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    init_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ShardRun:
    """What the Ray stage did: the plan, where the shards are, how many were written or reused."""

    plans: list[ShardPlan]
    folder: Path
    written: int = 0
    skipped: int = 0
    items: int = 0
    seconds: float = 0.0


def require_ray() -> ModuleType:
    """The ``ray`` module, or MissingDependency naming the package to install."""
    try:
        import ray
        import ray.data  # the Data library is the part needed
    except ImportError as exc:
        raise MissingDependency(
            f"--engine ray needs Ray Data, which is not installed: {INSTALL_HINT}"
        ) from exc
    return ray


def connect(ray: ModuleType, opts: RayOptions) -> bool:
    """Join ``opts.address`` (``auto``, ``ray://host:10001``) or start a local cluster; True when this
    call started the connection (so the caller shuts it down). The job's workers get this checkout on
    their PYTHONPATH (enough on one machine; on a real cluster install vitrine on every node, and the
    path, absent there, is ignored)."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, **opts.init_kwargs}
    root = str(Path(vitrine.__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    kwargs.setdefault("runtime_env", {"env_vars": {"PYTHONPATH": path}})
    if opts.address is not None:
        kwargs.pop("include_dashboard")  # only for a cluster started here
    ray.init(address=opts.address, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-10s progress lines drown the CLI's
    return True


def _actor_count(ray: ModuleType, opts: RayOptions) -> int:
    if opts.encode_workers:
        return opts.encode_workers
    if opts.num_gpus_per_worker > 0:
        gpus = float(ray.cluster_resources().get("GPU", 0))
        return max(1, int(gpus // opts.num_gpus_per_worker))
    return 1


def encode_shards(
    ray: ModuleType,
    catalog: Catalog,
    store: IndexWriter,
    encoder: Encoder,
    opts: RayOptions,
    encoder_kwargs: dict[str, Any],
    progress: Callable[[int], None] = lambda n: None,
) -> ShardRun:
    """Plan shards for the records ``store`` does not hold yet and write the missing ones."""
    start = time.perf_counter()
    source = catalog_source(catalog)
    plans = plan_shards(pending_records(catalog, store.item_states(source)), opts.shard_size)
    folder = shard_folder(store.root, str(store.fingerprint.get("id")), source)
    done = finished_shards(folder)
    todo = [p for p in plans if p.name not in done]
    run = ShardRun(plans, folder, skipped=len(plans) - len(todo))
    progress(sum(len(p.rows) for p in plans if p.name in done))
    actor_kwargs = {
        **encoder_kwargs,
        "device": "cuda" if opts.num_gpus_per_worker > 0 else "cpu",
        "draft_size": encoder.draft_size,
    }
    prep = PixelPrep.of(encoder, opts.max_file_bytes)
    for begin in range(0, len(todo), opts.window_shards):
        window = todo[begin : begin + opts.window_shards]
        _run_window(ray, window, prep, encoder, actor_kwargs, opts, run, progress)
    run.seconds = round(time.perf_counter() - start, 3)
    return run


def _run_window(
    ray: ModuleType,
    window: list[ShardPlan],
    prep: PixelPrep,
    encoder: Encoder,
    actor_kwargs: dict[str, Any],
    opts: RayOptions,
    run: ShardRun,
    progress: Callable[[int], None],
) -> None:
    rows = [row for plan in window for row in plan.rows]
    expected = {plan.name: len(plan.rows) for plan in window}
    # At least one block per shard, so shards stream back (and get written) one by one.
    blocks = max(len(window), math.ceil(len(rows) / opts.prep_batch))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    ds = ds.map_batches(
        prepare_batch, fn_kwargs={"prep": prep}, batch_size=opts.prep_batch, batch_format="numpy", num_cpus=1
    )
    ds = ds.map_batches(
        EncodeStage,
        fn_constructor_kwargs={
            "model": str(encoder.fingerprint["model"]),
            "encoder_kwargs": actor_kwargs,
            "threads": max(1, int(opts.cpus_per_worker)),
            "expected_id": encoder.version,
        },
        batch_size=encoder.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=_actor_count(ray, opts)),
        num_cpus=opts.cpus_per_worker,
        num_gpus=opts.num_gpus_per_worker or None,
    )
    pending: dict[str, list[dict[str, Any]]] = {}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for i in range(len(batch["key"])):
            row = shard_row({c: _scalar(batch[c][i]) for c in batch})
            name = str(batch["shard"][i])
            pending.setdefault(name, []).append(row)
            if len(pending[name]) == expected[name]:
                write_shard(run.folder, name, pending.pop(name))
                run.written += 1
                run.items += expected[name]
                progress(expected[name])
    if pending:
        raise StoreError(f"Ray returned incomplete shards {sorted(pending)[:3]}; re-run to redo them")


def _scalar(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def build_with_ray(
    store: IndexWriter,
    encoder: Encoder,
    catalog: Catalog,
    opts: RayOptions,
    *,
    encoder_kwargs: dict[str, Any] | None = None,
    commit_every: int = 256,
    prune: bool = True,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[BuildReport, ShardRun]:
    """The whole ``--engine ray`` build: shards on the cluster, then the store from the shards.

    ``encoder_kwargs`` are the actors' Encoder knobs (batch size, bf16 ...); ``device`` follows
    ``opts.num_gpus_per_worker``. The report is the Ingestor's, as for the default engine.
    """
    ray = require_ray()
    started = connect(ray, opts)
    try:
        run = encode_shards(ray, catalog, store, encoder, opts, dict(encoder_kwargs or {}), progress)
    finally:
        if started:
            ray.shutdown()
    replay = ShardReplay(store, encoder, run.plans, run.folder)
    # ShardReplay stands in for the Encoder; flush_seconds=inf: FAISS is (re)trained once, at the end.
    options = {
        "commit_every": commit_every,
        "prune": prune,
        "flush_seconds": math.inf,
        "max_file_bytes": opts.max_file_bytes,
    }
    report = run_build(store, replay, catalog, **options)  # type: ignore[arg-type]
    if not opts.keep_shards:
        shutil.rmtree(run.folder, ignore_errors=True)
    return report, run
