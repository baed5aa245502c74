"""``indexer import``: embeddings computed elsewhere brought into an index, verified first.

Two inputs are read (:func:`find_parts`): clip-retrieval / img2dataset output (``img_emb/img_emb_N.npy``
beside ``metadata/metadata_N.parquet``, row i of one describing row i of the other; the image path in
``image_path``, the caption in ``caption``, other columns kept as metadata), and Vitrine's own Parquet
embedding shards (:mod:`vitrine.build.shards`).

Why verify: embeddings made by another model, or by the right model behind another preprocessing (raw
0-255 pixels, a missing mean/std normalisation, another resize), still search and still return
plausible-looking photos, only worse; nothing downstream would ever say so. So before anything is
written, a random sample of the images is re-encoded with the declared model and compared with the
given vectors: below ``min_cosine`` (median over the sample) the import is refused, naming both numbers.

Why the paths are hostile: the metadata names files someone else chose. Every path must resolve (links
followed) inside ``--images-root``, and is read as a regular file under the size limit
(:mod:`vitrine.files`); anything else is that item's recorded failure, never a stop. Each file is read
and hashed, so an imported item has the same key (resolved path), sha256 and deduplication as one a
build indexes, and a re-run of the same import skips it while its size and mtime stay the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vitrine.build.shards import read_shard
from vitrine.catalog.readers import jsonable, pick_column
from vitrine.errors import CatalogError, FingerprintMismatch, ImageDecodeError, ImportRefused, StoreError
from vitrine.files import DEFAULT_MAX_FILE_BYTES, read_regular_file
from vitrine.index.store import Failure, IndexWriter, NewItem
from vitrine.model.encoder import Encoder

_EMB_RE = re.compile(r"^img_emb_(\d+)\.npy$")
IMAGE_COLUMNS = ("image_path", "path", "filepath", "file_name", "image")
#: The import's own catalog: a JSONL manifest in INDEX/imports/, with these two columns.
IMPORTS_DIR, IMAGE_FIELD, CAPTION_FIELD = "imports", "vitrine_image", "vitrine_captions"
CAPTION_COLUMNS = ("caption", "text", "captions")


@dataclass(frozen=True)
class ImportSettings:
    """``sample``: images re-encoded for the check; ``min_cosine``: the median cosine they must reach
    (the same model and preprocessing give about 1; a lower precision or another runtime of the same
    model well above the default; another preprocessing or model far below); ``commit_every``: items
    per transaction; ``threads``: files read and hashed at once."""

    images_root: str
    sample: int = 32
    min_cosine: float = 0.95
    commit_every: int = 4096
    threads: int = 8
    seed: int = 0
    image_column: str | None = None
    caption_column: str | None = None
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES


@dataclass
class ImportReport:
    """What one import did; ``count`` is the index size afterwards; ``verification`` the check's numbers."""

    format: str = ""
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    failed: int = 0
    conflicted: int = 0
    count: int = 0
    seconds: float = 0.0
    verification: dict[str, Any] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Part:
    """One input file pair: ``embeddings`` (.npy) is None for Vitrine shards (vectors in the Parquet)."""

    metadata: Path
    embeddings: Path | None = None


@dataclass
class Row:
    """One item as the input gives it: ``value`` is the image path as written there."""

    value: str
    captions: list[str]
    metadata: dict[str, Any]
    embedding: np.ndarray | None
    reason: str = ""  # failed where it was made (Vitrine shards), or an unusable vector


def find_parts(folder: Path) -> tuple[str, list[Part]]:
    """(format, parts) of an import folder; ImportRefused when it holds neither format."""
    if (folder / "img_emb").is_dir():
        parts = []
        for npy in sorted((folder / "img_emb").iterdir()):
            match = _EMB_RE.match(npy.name)
            if match is None:
                continue
            meta = folder / "metadata" / f"metadata_{match.group(1)}.parquet"
            if not meta.is_file():
                raise ImportRefused(f"{npy} has no metadata file {meta} beside it")
            parts.append(Part(meta, npy))
        if not parts:
            raise ImportRefused(f"{folder / 'img_emb'} holds no img_emb_N.npy files")
        return "clip-retrieval", parts
    shards = sorted(folder.glob("shard-*.parquet"))
    if shards:
        return "vitrine-shards", [Part(p) for p in shards]
    raise ImportRefused(
        f"{folder} is neither clip-retrieval output (img_emb/img_emb_N.npy + metadata/metadata_N.parquet) "
        "nor a folder of Vitrine embedding shards (shard-*.parquet)"
    )


def read_part(part: Part, dim: int, settings: ImportSettings) -> list[Row]:
    """Every row of one part, embeddings checked against the index's ``dim``."""
    if part.embeddings is None:
        return _shard_rows(part.metadata, dim)
    try:
        vectors = np.load(part.embeddings, mmap_mode="r", allow_pickle=False)
        table = pq.read_table(part.metadata)
    except (OSError, ValueError) as exc:
        raise ImportRefused(f"cannot read {part.embeddings.name} / {part.metadata.name}: {exc}") from exc
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ImportRefused(
            f"{part.embeddings} holds vectors of shape {vectors.shape}; the index's model has dim {dim}"
        )
    if len(vectors) != table.num_rows:
        raise ImportRefused(
            f"{part.embeddings.name} has {len(vectors)} vectors but {part.metadata.name} "
            f"{table.num_rows} rows: row i of one must describe row i of the other"
        )
    image = _column(table.column_names, settings.image_column, IMAGE_COLUMNS, "image", part.metadata)
    caption = _column(table.column_names, settings.caption_column, CAPTION_COLUMNS, "caption", part.metadata)
    vectors = np.asarray(vectors, dtype=np.float32)
    rows = []
    for i, record in enumerate(table.to_pylist()):
        value = record.pop(image)
        captions = _captions(record.pop(caption) if caption else None)
        metadata = {k: jsonable(v) for k, v in record.items()}  # as a manifest catalog keeps them
        rows.append(Row(str(value or ""), captions, metadata, vectors[i]))
    return _check_vectors(rows)


def _shard_rows(path: Path, dim: int) -> list[Row]:
    try:
        shard = read_shard(path)
        decoded = [
            (json.loads(r["captions"] or "[]"), json.loads(r["metadata"] or "{}")) for r in shard.values()
        ]
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ImportRefused(f"cannot read shard {path}: {exc}") from exc
    rows = []
    for record, (captions, meta) in zip(shard.values(), decoded, strict=True):
        vec = record["embedding"]
        if vec is not None and vec.size != dim:
            raise ImportRefused(
                f"shard {path.name} holds vectors of dim {vec.size}; the index's model has {dim}"
            )
        row = Row(record["path"] or "", _captions(captions), meta if isinstance(meta, dict) else {}, vec)
        row.reason = record["reason"] or ("" if vec is not None else "no embedding in the shard")
        rows.append(row)
    return _check_vectors(rows)


def _check_vectors(rows: list[Row]) -> list[Row]:
    for row in rows:
        if row.embedding is not None and not row.reason:
            norm = float(np.linalg.norm(row.embedding))
            if not np.isfinite(norm) or norm == 0.0:
                row.reason = "the given embedding is not a finite non-zero vector"
    return rows


def _column(names: list[str], given: str | None, defaults: tuple, role: str, path: Path) -> str | None:
    """The catalogs' column rule (:func:`~vitrine.catalog.readers.pick_column`), refusing the import."""
    try:
        return pick_column(names, given, defaults, role, path)
    except CatalogError as exc:
        raise ImportRefused(str(exc)) from exc


def _captions(cell: Any) -> list[str]:
    if cell is None:
        return []
    values = cell if isinstance(cell, list) else [cell]
    return [str(v) for v in values if v is not None and str(v).strip()]


# ---------------------------------------------------------------------- the import as a catalog
def catalog_manifest(index: Path, folder: Path) -> Path:
    """Where the catalog of the items imported from ``folder`` is kept: inside the index directory."""
    tag = hashlib.sha256(folder.as_posix().encode()).hexdigest()[:12]
    return Path(index).resolve() / IMPORTS_DIR / f"{folder.name}-{tag}.jsonl"


def catalog_spec(manifest: Path) -> dict[str, Any]:
    """How :func:`vitrine.catalog.readers.open_catalog` reopens it (columns named apart from metadata)."""
    return {"path": manifest.as_posix(), "image_column": IMAGE_FIELD, "caption_column": CAPTION_FIELD}


def write_manifest(store: IndexWriter, source: str, path: Path) -> None:
    """The imported items as a JSONL manifest (path, captions, metadata), replaced atomically.

    Why: a reindex rebuilds an index from its recorded catalogs; with this one the imported items are
    rebuilt too (their vectors copied when the model stays, re-encoded from the files when it changes)
    instead of being left out, and a build of the manifest treats them like any catalog's items."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    rows = store.connection().execute(
        "SELECT key, captions, metadata FROM items WHERE source=? ORDER BY key", (source,)
    )
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for key, captions, metadata in rows:
                row = {**json.loads(metadata), IMAGE_FIELD: key, CAPTION_FIELD: json.loads(captions)}
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write the import's catalog {path}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------------- paths and files
def locate(value: str, root: str) -> str:
    """The resolved path of ``value`` (relative ones are taken from ``root``), if it lies inside ``root``
    once links are followed; ImageDecodeError with the reason otherwise."""
    if not value or "\0" in value:
        raise ImageDecodeError("no usable image path in the metadata", value)
    resolved = os.path.realpath(value if os.path.isabs(value) else os.path.join(root, value))
    if not resolved.startswith(root.rstrip("/") + "/"):
        raise ImageDecodeError(f"resolves outside --images-root {root}", value)
    return resolved


def _read(value: str, root: str, max_bytes: int) -> tuple[str, bytes, int]:
    """(key, bytes, mtime_ns) of a row's file: inside the root, a regular file under the limit."""
    key = locate(value, root)
    data = read_regular_file(key, max_bytes)
    try:
        mtime = os.stat(key).st_mtime_ns
    except OSError as exc:
        raise ImageDecodeError(f"cannot read file ({exc.strerror or exc})", value) from None
    return key, data, mtime


# ---------------------------------------------------------------------- the check
def verify(encoder: Encoder, rows: list[Row], settings: ImportSettings, root: str) -> dict[str, Any]:
    """Re-encode up to ``settings.sample`` of ``rows`` (a random choice among those that can be read)
    and compare; ImportRefused when the median cosine is below ``settings.min_cosine``."""
    order = np.random.default_rng(settings.seed).permutation(len(rows))
    images, given, problems = [], [], []
    for i in order:
        if len(images) >= settings.sample:
            break
        row = rows[int(i)]
        if row.reason or row.embedding is None:
            continue
        try:
            _, data, _ = _read(row.value, root, settings.max_file_bytes)
            images.append(encoder.load_image(data))
            given.append(row.embedding)
        except ImageDecodeError as exc:
            problems.append(f"{row.value}: {exc.reason}")
    if not images:
        shown = "; ".join(problems[:3]) or "no row has an embedding"
        raise ImportRefused(f"none of the sampled images could be read to verify the import ({shown})")
    mine = encoder.encode_images(images)
    theirs = np.stack(given) / np.linalg.norm(np.stack(given), axis=1, keepdims=True)
    cosines = np.sum(mine * theirs, axis=1)
    result = {
        "sampled": len(images),
        "median_cosine": round(float(np.median(cosines)), 4),
        "lowest_cosine": round(float(cosines.min()), 4),
        "threshold": settings.min_cosine,
        "model": encoder.version,
    }
    if result["median_cosine"] < settings.min_cosine:
        raise ImportRefused(
            f"import refused: the given embeddings disagree with {encoder.fingerprint.get('model')} "
            f"(id {encoder.version}) re-encoding {len(images)} sampled images: median cosine "
            f"{result['median_cosine']:.4f} (lowest {result['lowest_cosine']:.4f}) is below the threshold "
            f"{settings.min_cosine:g}; they were made by another model or another preprocessing "
            "(e.g. raw 0-255 pixels, a missing normalisation); re-encode with `indexer build` instead",
            result["median_cosine"],
            settings.min_cosine,
        )
    return result


# ---------------------------------------------------------------------- the import
@dataclass(frozen=True)
class Checked:
    """An import folder that passed the check: what :meth:`Importer.write` needs."""

    folder: Path
    format: str
    parts: list[Part]
    verification: dict[str, Any]


class Importer:
    """Check an import folder against ``encoder`` (:meth:`check`, before any index is opened or made),
    then write every row into a store in batches of ``commit_every`` (:meth:`write`).

    Items keep the ownership rule of builds: a key another catalog already holds is left alone and
    counted as ``conflicted``. ``progress`` gets the number of rows handled.
    """

    def __init__(
        self, encoder: Encoder, settings: ImportSettings, progress: Callable[[int], None] | None = None
    ) -> None:
        self.encoder, self.settings, self.dim = encoder, settings, encoder.dim
        self.progress = progress or (lambda n: None)
        root = Path(settings.images_root).expanduser()
        if not root.is_dir():
            raise ImportRefused(f"--images-root {root} is not a folder")
        self.root = os.path.realpath(root)

    def run(self, store: IndexWriter, folder: str | Path) -> ImportReport:
        """:meth:`check`, then :meth:`write`."""
        return self.write(store, self.check(folder))

    def check(self, folder: str | Path) -> Checked:
        """Find the input's parts and verify a sample (ImportRefused, with the numbers, when it fails)."""
        folder = Path(folder).expanduser().resolve()
        kind, parts = find_parts(folder)
        verification = verify(self.encoder, self._candidates(parts), self.settings, self.root)
        return Checked(folder, kind, parts, verification)

    def write(self, store: IndexWriter, checked: Checked) -> ImportReport:
        """Write every row (see the class docstring), then the import's catalog manifest."""
        if store.fingerprint.get("id") != self.encoder.version:
            raise FingerprintMismatch(store.fingerprint, self.encoder.fingerprint)
        start, self.store = time.perf_counter(), store
        manifest = catalog_manifest(store.root, checked.folder)
        source = manifest.as_posix()
        # Recorded first: a reindex after a killed import then fails on the missing manifest, loudly.
        store.record_catalog(source, catalog_spec(manifest))
        report = ImportReport(format=checked.format, verification=checked.verification)
        states = store.item_states(source)
        step = self.settings.commit_every
        with ThreadPoolExecutor(self.settings.threads) as pool:
            for part in checked.parts:
                rows = read_part(part, self.dim, self.settings)
                for i in range(0, len(rows), step):
                    prepared = pool.map(lambda r: self._prepare(r, source, states), rows[i : i + step])
                    self._commit(prepared, report)
                    self.progress(len(rows[i : i + step]))
        write_manifest(store, source, manifest)
        store.flush()
        report.count = len(store)
        report.seconds = round(time.perf_counter() - start, 3)
        return report

    def _candidates(self, parts: list[Part]) -> list[Row]:
        """Rows the check may pick: a random few of every part (twice the sample, spread evenly)."""
        rng = np.random.default_rng(self.settings.seed)
        per_part = -(-2 * self.settings.sample // len(parts))
        rows: list[Row] = []
        for part in parts:
            every = read_part(part, self.dim, self.settings)
            rows += [every[int(i)] for i in rng.permutation(len(every))[:per_part]]
        return rows

    def _prepare(self, row: Row, source: str, states: dict) -> NewItem | Failure | None:
        """Worker thread: locate, stat, read and hash one row's file (None: unchanged since indexed)."""
        try:
            if row.reason:
                raise ImageDecodeError(row.reason, row.value)
            key = locate(row.value, self.root)
            known = states.get(key)
            stat = os.stat(key) if known else None
            if known and stat is not None and (known[0], known[1]) == (stat.st_size, stat.st_mtime_ns):
                return None
            key, data, mtime = _read(row.value, self.root, self.settings.max_file_bytes)
        except ImageDecodeError as exc:
            return Failure(row.value, row.value, exc.reason, source)
        except OSError as exc:
            return Failure(row.value, row.value, f"cannot read file ({exc.strerror or exc})", source)
        digest = hashlib.sha256(data).hexdigest()
        return NewItem(key, key, digest, len(data), mtime, row.captions, row.metadata, source, row.embedding)

    def _commit(self, prepared: Iterator[NewItem | Failure | None], report: ImportReport) -> None:
        items, failures = [], []
        for result in prepared:
            if result is None:
                report.unchanged += 1
            elif isinstance(result, Failure):
                failures.append(result)
            else:
                items.append(result)
        owners = self.store.sources([item.key for item in items])
        mine = [item for item in items if owners.get(item.key, item.source) == item.source]
        report.conflicted += len(items) - len(mine)
        report.updated += sum(item.key in owners for item in mine)
        report.added += sum(item.key not in owners for item in mine)
        report.failed += len(failures)
        report.failures.extend({"path": f.path, "reason": f.reason} for f in failures)
        if mine or failures:
            self.store.write(items=mine, failures=failures)
