"""Catalogs stored as Hugging Face ``datasets`` folders (``save_to_disk``), images inside the Arrow files.

Split from :mod:`vitrine.catalog.readers` so that only these catalogs import ``datasets``. Keys are
``<split dir>#<row>``; :func:`read_dataset_image` fetches one image's encoded bytes by key.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vitrine.catalog.readers import (
    BATCH_ROWS,
    CAPTION_COLUMN_CANDIDATES,
    Catalog,
    Record,
    caption_values,
    jsonable,
    pick_column,
)
from vitrine.errors import CatalogError, ImageDecodeError
from vitrine.files import read_regular_file


class DatasetCatalog(Catalog):
    """A folder written by ``datasets`` ``save_to_disk``; records come in row order.

    Captions come from the caption column; other scalar columns (``Value``, and ``ClassLabel`` as its label
    name) become metadata. The images stay in the Arrow files; :func:`read_source` fetches them by key.
    """

    kind = "dataset"

    def __init__(self, root: Path, image_column: str | None, caption_column: str | None) -> None:
        split_dir = _dataset_split_dir(root)
        self._split_dir = split_dir.as_posix()
        self._dataset = _load_dataset(self._split_dir)
        features = self._dataset.features
        self.image_column = _dataset_image_column(features, image_column, split_dir)
        caption = pick_column(list(features), caption_column, CAPTION_COLUMN_CANDIDATES, "caption", split_dir)
        self.caption_column = caption
        super().__init__(
            root, {"path": root.as_posix(), "image_column": self.image_column, "caption_column": caption}
        )
        skip = (self.image_column, caption)
        self._meta_columns = [c for c in features if c not in skip and _is_scalar_feature(features[c])]
        default = _first_image_column(features)
        self._path_suffix = "" if self.image_column == default else f"#{self.image_column}"

    def __len__(self) -> int:
        return int(self._dataset.num_rows)

    def __iter__(self) -> Iterator[Record]:
        wanted = [*self._meta_columns, *([self.caption_column] if self.caption_column else [])]
        if not wanted:
            yield from (self._record(row, {}) for row in range(len(self)))
            return
        row = 0
        for batch in self._dataset.select_columns(wanted).iter(batch_size=BATCH_ROWS):
            for i in range(len(batch[wanted[0]])):
                yield self._record(row, {name: batch[name][i] for name in wanted})
                row += 1

    def _record(self, row: int, values: dict[str, Any]) -> Record:
        features = self._dataset.features
        metadata = {name: jsonable(_label_name(features[name], values[name])) for name in self._meta_columns}
        captions = caption_values(values[self.caption_column]) if self.caption_column else []
        key = f"{self._split_dir}#{row}"
        return Record(key=key, path=key + self._path_suffix, captions=tuple(captions), metadata=metadata)


def _dataset_split_dir(root: Path) -> Path:
    """The folder of the split to use: ``train`` of a DatasetDict if present, else its first split."""
    listing = root / "dataset_dict.json"
    if not listing.is_file():
        return root
    try:
        splits = list(json.loads(listing.read_text(encoding="utf-8"))["splits"])
        return root / ("train" if "train" in splits else splits[0])
    except (OSError, ValueError, LookupError, TypeError) as exc:
        raise CatalogError(f"cannot read the splits listed in {listing}: {exc!r}") from None


def _dataset_image_column(features: Any, given: str | None, split_dir: Path) -> str:
    found = _first_image_column(features) if given is None else given
    if found is None:
        raise CatalogError(f"dataset {split_dir} has no Image column; columns: {', '.join(features)}")
    pick_column(list(features), found, (), "image", split_dir)
    if not isinstance(features[found], _hf().Image):
        raise CatalogError(f"column {found!r} of dataset {split_dir} is not an Image feature")
    if "#" in found:
        raise CatalogError(f"image column names containing '#' are not supported: {found!r}")
    return found


@functools.lru_cache(maxsize=16)
def _load_dataset(split_dir: str) -> Any:
    """Open (memory-map) a saved dataset once per process; reads are safe from several threads."""
    try:
        return _hf().Dataset.load_from_disk(split_dir)
    except ImportError:
        raise CatalogError("reading a saved dataset needs the 'datasets' package") from None
    except Exception as exc:
        raise CatalogError(f"cannot open dataset {split_dir}: {exc}") from None


@functools.lru_cache(maxsize=16)
def _raw_image_column(split_dir: str, column: str) -> Any:
    """That one column with decoding off, so rows give ``{"bytes", "path"}`` instead of PIL images."""
    raw = _hf().Image(decode=False)
    return _load_dataset(split_dir).select_columns([column]).cast_column(column, raw)


def _hf() -> Any:
    """The ``datasets`` package, imported lazily: only dataset catalogs pay for it."""
    import datasets

    return datasets


def _first_image_column(features: Any) -> str | None:
    return next((name for name, feature in features.items() if isinstance(feature, _hf().Image)), None)


def _is_scalar_feature(feature: Any) -> bool:
    hf = _hf()
    return isinstance(feature, hf.ClassLabel) or (
        isinstance(feature, hf.Value) and "binary" not in feature.dtype
    )


def _label_name(feature: Any, value: Any) -> Any:
    if isinstance(feature, _hf().ClassLabel) and isinstance(value, int) and 0 <= value < feature.num_classes:
        return feature.int2str(value)
    return value


def read_dataset_image(split_dir: str, row: int, column: str | None, source: str, max_bytes: int) -> bytes:
    try:
        dataset = _load_dataset(split_dir)
        column = column or _first_image_column(dataset.features)
        if column is None or column not in dataset.features:
            raise ImageDecodeError("no image column in dataset", source)
        if row >= dataset.num_rows:
            raise ImageDecodeError(f"row {row} not in dataset ({dataset.num_rows} rows)", source)
        cell = _raw_image_column(split_dir, column)[row][column]
    except CatalogError as exc:
        raise ImageDecodeError(str(exc), source) from None
    if cell and cell.get("bytes") is not None:
        return bytes(cell["bytes"])
    if cell and cell.get("path"):
        return read_regular_file(cell["path"], max_bytes)
    raise ImageDecodeError("no image in this row", source)
