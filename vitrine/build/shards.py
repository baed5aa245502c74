"""Embedding shards: the hand-off between a distributed encoding job and the index store.

A distributed build (``indexer/ray_engine.py``) splits the records that need work into shards of
``shard_size`` consecutive records (catalogs iterate sorted by key, so a shard is a key range), encodes
them on a cluster and writes one Parquet file per finished shard. The index is then built from the
shards by the ordinary :class:`~vitrine.build.ingest.Ingestor` (via :class:`ShardReplay`), so SQLite and
FAISS end up exactly as the single-process build leaves them: same skips, same dedup, same failures,
same pruning, and one FAISS (re)training at the final flush.

Why the shard name holds a digest of its records' (key, size, mtime_ns): a re-run after a kill
plans the same shards, sees their files and skips them; a file changed in between changes its
shard's name, so that shard is redone instead of replaying stale data. Files are written under a
temporary name and renamed, so a half-written shard is never taken for a finished one.

This module is pure (no Ray): the per-batch stage functions run inside Ray workers but are plain
Python, testable here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from vitrine.catalog.readers import Catalog, Record, read_source
from vitrine.errors import FingerprintMismatch, ImageDecodeError, StoreError
from vitrine.files import DEFAULT_MAX_FILE_BYTES
from vitrine.images import DEFAULT_MAX_PIXELS, decode_image
from vitrine.index.store import IndexWriter
from vitrine.model.encoder import Encoder, FastPreprocess

SHARD_RE_SUFFIX = ".parquet"
#: Columns of a shard file; ``reason`` is set (and ``embedding`` null) for items that failed.
SHARD_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("sha256", pa.string()),
        ("size", pa.int64()),
        ("mtime_ns", pa.int64()),
        ("captions", pa.string()),  # JSON list
        ("metadata", pa.string()),  # JSON object
        ("reason", pa.string()),
        ("embedding", pa.list_(pa.float32())),
    ]
)
#: Columns of the work rows handed to the cluster (one per record).
WORK_COLUMNS = ("key", "path", "captions", "metadata", "size", "mtime_ns", "shard")


@dataclass(frozen=True)
class ShardPlan:
    """One shard: its file name (index + digest) and the work rows it covers, in catalog order."""

    name: str
    rows: list[dict[str, Any]]

    @property
    def first_key(self) -> str:
        return str(self.rows[0]["key"])


def pending_records(catalog: Catalog, states: dict[str, tuple]) -> Iterator[tuple[Record, int, int]]:
    """(record, size, mtime_ns) of records that need reading, with the Ingestor's own skip rule:
    duplicate keys once, and files whose size and mtime match the index are left alone."""
    seen: set[str] = set()
    for record in catalog:
        if record.key in seen:
            continue
        seen.add(record.key)
        size = mtime = 0
        with contextlib.suppress(OSError):  # dataset rows and missing files: decided when read
            stat = os.stat(record.path)
            size, mtime = stat.st_size, stat.st_mtime_ns
        known = states.get(record.key)
        if known and size and (known[0], known[1]) == (size, mtime):
            continue
        yield record, size, mtime


def plan_shards(pending: Iterable[tuple[Record, int, int]], shard_size: int) -> list[ShardPlan]:
    """Cut the pending records into shards of ``shard_size`` (the unit of resumption: a kill redoes at
    most the shards in flight; small shards resume finer, large ones mean fewer files)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    plans: list[ShardPlan] = []
    rows: list[dict[str, Any]] = []
    for record, size, mtime in pending:
        rows.append(_work_row(record, size, mtime))
        if len(rows) == shard_size:
            plans.append(_plan(len(plans), rows))
            rows = []
    if rows:
        plans.append(_plan(len(plans), rows))
    return plans


def _work_row(record: Record, size: int, mtime: int) -> dict[str, Any]:
    return {
        "key": record.key,
        "path": record.path,
        "captions": json.dumps(list(record.captions), ensure_ascii=False),
        "metadata": json.dumps(record.metadata, ensure_ascii=False, sort_keys=True, default=str),
        "size": size,
        "mtime_ns": mtime,
        "shard": "",
    }


def _plan(number: int, rows: list[dict[str, Any]]) -> ShardPlan:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['key']}\0{row['size']}\0{row['mtime_ns']}\n".encode())
    name = f"shard-{number:06d}-{digest.hexdigest()[:16]}"
    return ShardPlan(name, [{**row, "shard": name} for row in rows])


def shard_folder(index: str | Path, model_id: str, source: str) -> Path:
    """Where shards of one (index, model, catalog) live: inside the index directory, so they go
    wherever it goes, in a folder the generation machinery never touches."""
    tag = hashlib.sha256(source.encode()).hexdigest()[:12]
    return Path(index) / "shards" / f"{model_id}-{tag}"


def finished_shards(folder: Path) -> set[str]:
    """Names of shards already written completely (temporary files do not count)."""
    if not folder.is_dir():
        return set()
    return {p.name.removesuffix(SHARD_RE_SUFFIX) for p in folder.glob(f"shard-*{SHARD_RE_SUFFIX}")}


def write_shard(folder: Path, name: str, rows: list[dict[str, Any]]) -> Path:
    """Write one shard atomically (temporary name, fsync, rename)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{SHARD_RE_SUFFIX}"
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    table = pa.Table.from_pylist([{c: r.get(c) for c in SHARD_SCHEMA.names} for r in rows], SHARD_SCHEMA)
    try:
        pq.write_table(table, tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write shard {path}: {exc}") from exc
    return path


def read_shard(path: Path) -> dict[str, dict[str, Any]]:
    """key -> row of one shard file, with the embedding as float32 (None where the item failed).

    The embedding column is read as one float32 array and sliced per row (no Python float per value)."""
    table = pq.read_table(path, schema=SHARD_SCHEMA)
    lists = table.column("embedding").combine_chunks()
    values = lists.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    offsets = lists.offsets.to_numpy()
    valid = lists.is_valid().to_numpy(zero_copy_only=False)
    rows = table.drop_columns(["embedding"]).to_pylist()
    for i, row in enumerate(rows):
        row["embedding"] = values[offsets[i] : offsets[i + 1]] if valid[i] else None
    return {row["key"]: row for row in rows}


# ---------------------------------------------------------------------- stages (run inside workers)
@dataclass
class PixelPrep:
    """Read, hash, decode and preprocess exactly as :class:`~vitrine.model.encoder.Encoder` does, without the
    model (so CPU workers stay light): ``image_processor``, ``fast`` (the verified fast path or None),
    ``draft_size`` and ``max_pixels`` come from the driver's encoder; ``max_file_bytes`` from the build."""

    image_processor: Any
    fast: FastPreprocess | None
    draft_size: int | None
    max_pixels: int | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES

    @classmethod
    def of(cls, encoder: Encoder, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> PixelPrep:
        fast = encoder._fast
        return cls(encoder.image_processor, fast, encoder.draft_size, encoder.max_pixels, max_file_bytes)

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One preprocessed (3, H, W) float32 array, same rule as :meth:`Encoder.preprocess`."""
        if self.fast is not None:
            with contextlib.suppress(ValueError):
                return self.fast(image)
        out = self.image_processor(images=[image], return_tensors="np")
        return np.ascontiguousarray(out["pixel_values"][0], dtype=np.float32)

    def one(self, path: str, size: int) -> dict[str, Any]:
        """sha256/size/pixels of one file, or ``reason`` with the single-process build's wording."""
        out: dict[str, Any] = {"sha256": "", "size": size, "reason": "", "pixels": b"", "shape": ""}
        try:
            data = read_source(path, self.max_file_bytes)
            out["size"] = size or len(data)
            out["sha256"] = hashlib.sha256(data).hexdigest()
            limit = self.max_pixels or DEFAULT_MAX_PIXELS
            image = decode_image(data, draft_size=self.draft_size, max_pixels=limit)
            arr = self.pixels(image)
            out["pixels"], out["shape"] = arr.tobytes(), "x".join(map(str, arr.shape))
        except ImageDecodeError as exc:
            out["reason"] = exc.reason
        except OSError as exc:
            out["reason"] = f"cannot read file: {exc.strerror or exc}"
        except Exception as exc:  # a processor failure is still one bad item
            out["reason"] = f"preprocessing failed: {exc}"
        return out


def prepare_batch(batch: dict[str, np.ndarray], prep: PixelPrep) -> dict[str, np.ndarray]:
    """Ray ``map_batches`` function (CPU): work rows in, rows with sha256/size/pixels/reason out."""
    results = [prep.one(str(p), int(s)) for p, s in zip(batch["path"], batch["size"], strict=True)]
    out = {k: v for k, v in batch.items() if k != "size"}
    for column in ("sha256", "size", "reason", "pixels", "shape"):
        values = [r[column] for r in results]
        out[column] = np.asarray(values, dtype=np.int64) if column == "size" else _objects(values)
    return out


class EncodeStage:
    """Ray ``map_batches`` callable class (one model per actor): pixels in, embedding bytes out.

    ``threads`` caps torch's CPU threads to the CPUs Ray reserved for the actor, so actors and decode
    tasks do not oversubscribe the cores.
    """

    def __init__(
        self,
        model: str,
        encoder_kwargs: dict[str, Any],
        threads: int | None = None,
        expected_id: str | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.encoder = Encoder.from_pretrained(model, **encoder_kwargs)
        if expected_id and self.encoder.version != expected_id:  # another copy of the model on this node
            raise FingerprintMismatch({"id": expected_id}, self.encoder.fingerprint)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = [i for i, reason in enumerate(batch["reason"]) if not reason]
        embeddings = [b""] * len(batch["reason"])
        if ok:
            arrays = [_unpack(batch["pixels"][i], batch["shape"][i]) for i in ok]
            vectors = self.encoder.encode_pixels(torch.from_numpy(np.stack(arrays)))
            for i, vec in zip(ok, vectors, strict=True):
                embeddings[i] = vec.astype(np.float32).tobytes()
        out = {k: v for k, v in batch.items() if k not in ("pixels", "shape")}
        out["embedding"] = _objects(embeddings)
        return out


def _unpack(data: bytes, shape: str) -> np.ndarray:
    return np.frombuffer(data, dtype=np.float32).reshape([int(s) for s in shape.split("x")])


def _objects(values: list) -> np.ndarray:
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


def shard_row(row: dict[str, Any]) -> dict[str, Any]:
    """A finished work row (from the encode stage) in the shard file's layout."""
    emb = row.get("embedding") or b""
    return {
        **{c: row[c] for c in ("key", "path", "sha256", "captions", "metadata")},
        "size": int(row["size"]),
        "mtime_ns": int(row["mtime_ns"]),
        "reason": row["reason"] or None,
        "embedding": np.frombuffer(emb, dtype=np.float32).tolist() if emb and not row["reason"] else None,
    }


# ---------------------------------------------------------------------- replay into the store
class ShardReplay:
    """Stands in for the :class:`Encoder` inside :class:`~vitrine.build.ingest.Ingestor`: each job is answered
    from its shard row (hash, size, embedding or failure reason) instead of being read and encoded.

    Shards are read one at a time in plan order (jobs arrive in the same sorted-key order), so memory
    holds one shard. A job with no matching row (the file changed after planning) is encoded here
    with the driver's ``encoder``; ``missed`` counts those.
    """

    def __init__(self, store: IndexWriter, encoder: Encoder, plans: list[ShardPlan], folder: Path) -> None:
        self.store, self.encoder, self.folder = store, encoder, folder
        self.plans, self._next, self._rows, self._known = plans, 0, {}, set()
        self.missed = 0

    def load_image(self, source: Any) -> Image.Image:
        return self.encoder.load_image(source)

    def encode_stream(
        self, jobs: Iterable[Any], load: Callable[[Any], Image.Image | None]
    ) -> Iterator[tuple]:
        for job in jobs:
            row = self._row(job.record.key)
            if row is None or (job.size and (row["size"], row["mtime_ns"]) != (job.size, job.mtime_ns)):
                self.missed += 1
                yield from self.encoder.encode_stream([job], load)
            elif row["reason"]:
                yield job, ImageDecodeError(row["reason"], row["path"])
            else:
                job.sha256, job.size = row["sha256"], job.size or int(row["size"])
                # Content the index holds: the store keeps its own vector whatever the item carries.
                job.stored = row["embedding"] if job.sha256 in self._known else None
                yield job, row["embedding"]

    def _row(self, key: str) -> dict[str, Any] | None:
        while self._next < len(self.plans) and self.plans[self._next].first_key <= key:
            path = self.folder / f"{self.plans[self._next].name}{SHARD_RE_SUFFIX}"
            self._rows = read_shard(path) if path.is_file() else {}
            self._known = self.store.known_content([r["sha256"] for r in self._rows.values() if r["sha256"]])
            self._next += 1
        return self._rows.get(key)
