"""Catalogs: where the images of an index come from, as a deterministic stream of :class:`Record` s.

:func:`open_catalog` detects one of four kinds from a path:

* ``folder``: a directory walked recursively (extensions case-insensitive, hidden entries skipped, each real
  directory entered once so symlink loops end).
* ``manifest``: a CSV/TSV/JSONL/JSON/Parquet table with an image column and optionally captions. Rows of
  the same image collapse into one record with every distinct caption; rows whose file is missing are
  kept, so the indexer reports them as failures instead of losing them silently.
* ``imagefolder``: Hugging Face's convention, a directory with ``metadata.csv``/``.jsonl``/``.parquet``
  whose ``file_name`` is relative to it; read like a manifest, unlisted files ignored.
* ``dataset``: a ``datasets`` ``save_to_disk`` folder (``DatasetDict``: split ``train``, else the first)
  with an ``Image`` column; keys are ``<split dir>#<row>``. ``datasets`` is imported on this path only.

Keys identify images in an index, so they are absolute, resolved POSIX paths: one file reached by two
routes is one record.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitrine.errors import CatalogError
from vitrine.files import DEFAULT_MAX_FILE_BYTES, read_regular_file
from vitrine.images import IMAGE_EXTENSIONS

# Columns tried in order (case-insensitively) when none is given; a caption column is optional.
IMAGE_COLUMN_CANDIDATES = ("image", "file_name", "filename", "path", "image_path", "filepath")
CAPTION_COLUMN_CANDIDATES = ("caption", "text", "captions", "title")
MANIFEST_FORMATS: dict[str, str] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
}
_IMAGEFOLDER_METADATA = ("metadata.csv", "metadata.jsonl", "metadata.parquet")
_DATASET_KEY = re.compile(r"(?P<dir>.+)#(?P<row>\d+)(?:#(?P<column>[^#]+))?")
BATCH_ROWS = 1000

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Record:
    """One image of a catalog.

    ``key`` is its identity in the index; ``path`` is what :func:`read_source` needs to get its bytes
    (equal to ``key`` except for a dataset image column other than the first Image column). ``metadata``
    holds JSON-able values only, so it can be stored and filtered on without further conversion.
    """

    key: str
    path: str
    captions: tuple[str, ...] = ()
    metadata: dict[str, Any] = field(default_factory=dict)


class Catalog:
    """Base class of all catalogs: iterate to get records in a deterministic order (sorted by key).

    ``root`` is the resolved folder holding the images; the web app refuses to serve files outside it.
    ``spec`` is JSON-able and reopens the same catalog: ``open_catalog(**catalog.spec)``. ``notes`` lists
    non-fatal things a user should hear about (unreadable sub-folders, rows without an image).
    """

    kind: str = ""

    def __init__(self, root: Path, spec: dict[str, Any]) -> None:
        self.root = root
        self.spec = spec
        self.notes: list[str] = []
        self._records: list[Record] = []

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec['path']!r}, {len(self)} records)"


def open_catalog(
    path: str | os.PathLike, *, image_column: str | None = None, caption_column: str | None = None
) -> Catalog:
    """Open the catalog at ``path``, detecting its kind (see the module docstring).

    ``image_column``/``caption_column`` override the automatic column choice of manifests, image folders
    with metadata and datasets; naming a column that does not exist is an error that lists the columns.
    They are refused for a plain folder, which has no columns.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise CatalogError(f"catalog not found: {given} (expected a folder of images or a manifest file)")
    resolved = given.resolve()
    if resolved.is_dir():
        if _is_saved_dataset(resolved):
            from vitrine.catalog.datasets import DatasetCatalog

            return DatasetCatalog(resolved, image_column, caption_column)
        metadata = next((resolved / n for n in _IMAGEFOLDER_METADATA if (resolved / n).is_file()), None)
        if metadata is not None:
            return ManifestCatalog(metadata, "imagefolder", image_column, caption_column)
        if image_column or caption_column:
            raise CatalogError(f"{resolved} is a plain folder of images: it has no columns to choose")
        return FolderCatalog(resolved)
    if not resolved.is_file():  # a FIFO named list.csv would block the reader forever
        raise CatalogError(f"catalog {resolved} is neither a folder nor a regular file")
    if resolved.suffix.lower() not in MANIFEST_FORMATS:
        expected = ", ".join(MANIFEST_FORMATS)
        raise CatalogError(
            f"unsupported catalog file {resolved.name!r}: expected a folder or a {expected} file"
        )
    return ManifestCatalog(resolved, "manifest", image_column, caption_column)


def read_source(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """Return the encoded bytes behind a :attr:`Record.path`, at most ``max_bytes`` of them.

    Plain files are read from disk, regular files only (:mod:`vitrine.files`: never a device, FIFO or
    socket); ``<dataset dir>#<row>[#<column>]`` reads one image out of a saved dataset. Failures raise
    :class:`ImageDecodeError` with a short reason ("file not found", "not a regular file (a FIFO)", ...),
    as :func:`~vitrine.images.decode_image` does, so the indexer records them per item and goes on.
    """
    if not os.path.lexists(path):
        match = _DATASET_KEY.fullmatch(path)
        if match and _is_saved_dataset(Path(match["dir"])):
            from vitrine.catalog.datasets import read_dataset_image

            return read_dataset_image(match["dir"], int(match["row"]), match["column"], path, max_bytes)
    return read_regular_file(path, max_bytes)


class FolderCatalog(Catalog):
    """A directory of image files. Metadata: ``folder`` (relative parent, "" at the root), ``filename``."""

    kind = "folder"

    def __init__(self, root: Path) -> None:
        super().__init__(root, {"path": root.as_posix(), "image_column": None, "caption_column": None})
        folders: dict[str, str] = {}
        by_key: dict[str, Record] = {}
        for file in _walk_images(root, self.notes):
            key = _resolve_key(str(file), folders)
            parent = file.relative_to(root).parent.as_posix()
            metadata = {"folder": "" if parent == "." else parent, "filename": file.name}
            by_key.setdefault(key, Record(key=key, path=key, metadata=metadata))
        self._records = [by_key[k] for k in sorted(by_key)]


def _walk_images(root: Path, notes: list[str]) -> list[Path]:
    """Image files under ``root``, hidden entries skipped; each real directory is entered once (no loops)."""
    found: list[Path] = []
    visited: set[str] = set()
    for folder, dirs, files in os.walk(root, followlinks=True, onerror=lambda e: notes.append(str(e))):
        real = os.path.realpath(folder)
        dirs[:] = [] if real in visited else [d for d in dirs if not d.startswith(".")]
        if real in visited:
            continue
        visited.add(real)
        images = [f for f in files if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        found.extend(Path(folder, name) for name in images if not name.startswith("."))
    return found


def _resolve_key(path: str, folders: dict[str, str]) -> str:
    """Resolved absolute POSIX path; ``folders`` caches resolved parents across calls.

    ``Path.resolve`` per file dominated opening a large manifest; the last component needs resolving only
    when it is itself a symlink.
    """
    folder, name = os.path.split(os.path.join(os.getcwd(), path))
    if name in ("", ".", "..") or os.path.islink(path):
        real = os.path.realpath(path)
    else:
        real = os.path.join(folders.get(folder) or folders.setdefault(folder, os.path.realpath(folder)), name)
    return Path(real).as_posix() if os.sep != "/" else real


class ManifestCatalog(Catalog):
    """A table of image paths with optional captions; kind ``manifest`` or ``imagefolder``.

    Relative paths resolve against the manifest's folder, then its ``images/`` sub-folder (the Flickr8k
    layout); absolute paths are kept. Columns other than image and caption become metadata (first non-null
    value per image). ``root`` is the deepest folder holding the manifest and every image.
    """

    def __init__(self, manifest: Path, kind: str, image_col: str | None, caption_col: str | None) -> None:
        self.kind = kind
        columns, rows = _read_manifest(manifest, (image_col, caption_col))
        image_col = pick_column(columns, image_col, IMAGE_COLUMN_CANDIDATES, "image", manifest)
        caption_col = pick_column(columns, caption_col, CAPTION_COLUMN_CANDIDATES, "caption", manifest)
        spec_path = (manifest.parent if kind == "imagefolder" else manifest).as_posix()
        super().__init__(
            manifest.parent, {"path": spec_path, "image_column": image_col, "caption_column": caption_col}
        )
        meta_cols = [c for c in columns if c not in (image_col, caption_col)]
        groups, skipped = _group_rows(rows, manifest.parent, image_col, caption_col, meta_cols)
        if skipped:
            self.notes.append(f"{skipped} row(s) of {manifest.name} have no value in column {image_col!r}")
        self._records = [
            Record(key=k, path=k, captions=tuple(g.captions), metadata=g.metadata)
            for k, g in sorted(groups.items())
        ]
        if self._records:
            parents = [manifest.parent.as_posix(), *(os.path.dirname(r.key) for r in self._records)]
            self.root = Path(os.path.commonpath(parents))


@dataclass
class _Group:
    captions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    def add(self, captions: Iterable[str], metadata: dict[str, Any]) -> None:
        self.captions.extend(c for c in captions if c not in self.captions)
        for name, value in metadata.items():
            if self.metadata.get(name) is None:
                self.metadata[name] = value


def _group_rows(
    rows: Rows, base: Path, image_col: str, caption_col: str | None, meta_cols: list[str]
) -> tuple[dict[str, _Group], int]:
    """Collapse rows by resolved image key: distinct captions in order, first non-null metadata."""
    groups: dict[str, _Group] = {}
    keys: dict[str, str] = {}  # raw cell -> key: each distinct image is located once
    folders: dict[str, str] = {}
    skipped = 0
    for row in rows:
        image = _image_value(row.get(image_col))
        if image is None:
            skipped += 1
            continue
        if image not in keys:
            keys[image] = _resolve_key(_locate_image(image, str(base)), folders)
        captions = caption_values(row.get(caption_col)) if caption_col else []
        metadata = {name: jsonable(row.get(name)) for name in meta_cols}
        groups.setdefault(keys[image], _Group()).add(captions, metadata)
    return groups, skipped


def _locate_image(value: str, base: str) -> str:
    """Absolute paths are kept; relative ones are tried in ``base``, then ``base/images``."""
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return path
    direct = os.path.join(base, path)
    nested = os.path.join(base, "images", path)
    return nested if not os.path.exists(direct) and os.path.exists(nested) else direct


def _read_manifest(path: Path, given: tuple[str | None, str | None]) -> tuple[list[str], Rows]:
    """Columns (in file order) and rows of a manifest file, as plain Python values."""
    fmt = MANIFEST_FORMATS.get(path.suffix.lower(), "csv")
    try:
        if fmt in ("csv", "tsv"):
            return _read_delimited(path, "\t" if fmt == "tsv" else ",", given)
        if fmt == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            return list(table.column_names), table.to_pylist()
        return _json_rows(path, path.read_text(encoding="utf-8-sig"), lines=fmt == "jsonl")
    except CatalogError:
        raise
    except Exception as exc:
        raise CatalogError(f"cannot read manifest {path}: {exc}") from None


def _read_delimited(path: Path, sep: str, given: tuple[str | None, ...]) -> tuple[list[str], Rows]:
    """CSV/TSV through pandas; image and caption columns stay text (``0001.jpg`` must not become 1)."""
    import pandas as pd

    options: dict[str, Any] = dict(sep=sep, encoding="utf-8-sig", keep_default_na=False, na_values=[""])
    try:
        header = [str(c) for c in pd.read_csv(path, nrows=0, **options).columns]
    except pd.errors.EmptyDataError:
        raise CatalogError(f"manifest {path} is empty (no header row)") from None
    text_columns = {*IMAGE_COLUMN_CANDIDATES, *CAPTION_COLUMN_CANDIDATES, *given}
    text_dtypes = {c: str for c in header if c in text_columns or c.lower() in text_columns}
    frame = pd.read_csv(path, dtype=text_dtypes, **options)
    frame.columns = header
    for name in header:
        if name not in text_dtypes:
            frame[name] = _typed_column(frame[name])
    return header, frame.to_dict("records")


def _typed_column(column: Any) -> Any:
    """Metadata columns stored typed: pandas has parsed numbers and true/false; a number column with
    blanks (float because of NaN) goes back to integers where every value is whole, and text cells
    that read as booleans in any case become booleans. ISO dates stay ISO text, which the index
    schema recognises as dates (:mod:`vitrine.index.schema`)."""
    import pandas as pd

    values = column.dropna()
    if column.dtype.kind == "f" and len(values) and (values == values.round()).all():
        return column.astype("Int64").astype(object).where(column.notna(), None)
    if column.dtype == object and len(values):
        lowered = {str(v).strip().lower() for v in values}
        if lowered <= {"true", "false"}:
            return column.map(lambda v: None if pd.isna(v) else str(v).strip().lower() == "true")
    return column


def _json_rows(path: Path, text: str, *, lines: bool) -> tuple[list[str], Rows]:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()] if lines else json.loads(text)
    if not isinstance(rows, list):
        raise CatalogError(f"manifest {path} must hold a JSON list of objects, one per image")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise CatalogError(f"manifest {path}: entry {bad + 1} is not a JSON object")
    return list(dict.fromkeys(name for row in rows for name in row)), rows


def pick_column(
    columns: list[str], given: str | None, candidates: tuple[str, ...], role: str, source: Path
) -> str | None:
    """The explicit column (which must exist) or the first candidate present; ``None`` for no caption."""
    available = f"available columns: {', '.join(columns) or '(none)'}"
    if given is not None:
        if given not in columns:
            raise CatalogError(f"{role} column {given!r} not found in {source}; {available}")
        return given
    lowered = {c.lower(): c for c in reversed(columns)}
    found = next((lowered[c] for c in candidates if c in lowered), None)
    if found is None and role == "image":
        raise CatalogError(
            f"no image column in {source}: expected one of {', '.join(candidates)} "
            f"(or pass --image-column); {available}"
        )
    return found


def _image_value(cell: Any) -> str | None:
    """The path in an image cell: a string, or a ``{"path": ...}`` struct as Hugging Face exports it."""
    if isinstance(cell, dict):
        cell = cell.get("path")
    return (cell.strip() or None) if isinstance(cell, str) else None


def caption_values(cell: Any) -> list[str]:
    """Captions in one cell: a string, or a list/array of strings (JSONL, Parquet, datasets)."""
    if cell is None or (isinstance(cell, float) and math.isnan(cell)):
        return []
    if isinstance(cell, str):
        return [cell.strip()] if cell.strip() else []
    if hasattr(cell, "tolist") and not isinstance(cell, int | float):
        cell = cell.tolist()
    if isinstance(cell, list | tuple):
        return [c for item in cell for c in caption_values(item)]
    return [str(cell)]


def jsonable(value: Any) -> Any:
    """Plain JSON value for metadata: numpy/pandas scalars unboxed, NaN/NaT/NA -> None, dates -> ISO text."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if type(value).__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return jsonable(value.tolist())
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v) for v in value]
    return None if isinstance(value, bytes | bytearray) else str(value)


def _is_saved_dataset(path: Path) -> bool:
    has_dataset = (path / "dataset_info.json").is_file() and (path / "state.json").is_file()
    return has_dataset or (path / "dataset_dict.json").is_file()
