"""ItemImages: pictures of indexed items, found by key, and nothing else.

What the server may show is exactly the set of indexed items: a client names an item by its ``key``, the
index (SQLite, the source of truth) says where its image is, and only that file is read. No path from a
client is ever opened, and no directory is "allowed" as a whole, so neither a forged hit nor a manifest
row pointing elsewhere makes any other file servable. Only regular files are read (a FIFO or a device
swapped in after indexing is refused without blocking on it), up to ``max_bytes``, and saved-dataset
rows (``<dir>#<row>``): both through :func:`vitrine.catalog.readers.read_source`, as the indexer reads them.

Knobs: ``max_pixels`` bounds decoding (a bomb hidden in a catalog is refused like an upload);
``cache_size`` thumbnails are kept in memory, keyed by key, size and the file's modification time.
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

from PIL import Image

from vitrine.catalog.readers import read_source
from vitrine.errors import ImageDecodeError
from vitrine.images import DEFAULT_MAX_PIXELS, decode_image
from vitrine.index.store import IndexStore

log = logging.getLogger("vitrine.app")

MIN_SIZE, DEFAULT_SIZE, MAX_SIZE = 16, 320, 1024


def clamp_size(size: Any) -> int:
    """A thumbnail edge in pixels from loose input: numbers are clamped, anything else is the default."""
    try:
        value = int(float(size))
    except (TypeError, ValueError, OverflowError):
        return DEFAULT_SIZE
    return min(MAX_SIZE, max(MIN_SIZE, value))


class ItemImages:
    """Read and shrink the images of indexed items, by key; see the module docstring."""

    def __init__(
        self, max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = 512, max_bytes: int = 256 << 20
    ) -> None:
        self.max_pixels, self.cache_size, self.max_bytes = max_pixels, cache_size, max_bytes
        self._thumbs: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._folders: list[str] | None = None
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Drop cached thumbnails and catalog folders (the index changed)."""
        with self._lock:
            self._thumbs.clear()
            self._folders = None

    def folders(self, store: IndexStore) -> list[str]:
        """:func:`catalog_folders` of the store, computed once per index change."""
        folders = self._folders
        if folders is None:
            folders = self._folders = catalog_folders(store.catalogs())
        return folders

    def thumbnail(self, store: IndexStore, key: Any, size: int = DEFAULT_SIZE) -> Image.Image | None:
        """Small RGB picture of the item ``key``, or None when it is not indexed or cannot be shown."""
        item = store.get(key) if isinstance(key, str) and key else None
        if item is None:
            return None
        path = item["path"]
        cache_key = (key, path, _mtime(path), size)
        with self._lock:
            if cache_key in self._thumbs:
                self._thumbs.move_to_end(cache_key)
                return self._thumbs[cache_key]
        try:
            image = decode_image(self._read(path), max_pixels=self.max_pixels, draft_size=size)
        except (ImageDecodeError, OSError) as exc:
            log.warning("no thumbnail for %s: %s", key, getattr(exc, "reason", exc))
            return None
        image.thumbnail((size, size))
        with self._lock:
            self._thumbs[cache_key] = image
            while len(self._thumbs) > self.cache_size:
                self._thumbs.popitem(last=False)
        return image

    def _read(self, path: str) -> bytes:
        """The item's encoded bytes: a regular file within ``max_bytes``, or a saved-dataset row."""
        return read_source(path, self.max_bytes)


def jpeg(image: Image.Image, quality: int = 85) -> bytes:
    """``image`` encoded as a JPEG (what the item-image endpoint serves)."""
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except (OSError, ValueError):
        return 0


def item_url(key: str, size: int | None = None) -> str:
    """Server-relative URL of an item's image (``GET /api/v1/items/{key}/image``)."""
    return f"/api/v1/items/{quote(key, safe='')}/image" + ("" if size is None else f"?size={size}")


def catalog_folders(catalogs: dict[str, dict]) -> list[str]:
    """Real folders of the indexed catalogs (the manifest's folder for a manifest), deepest first."""
    folders = set()
    for source, spec in catalogs.items():
        given = str(spec.get("path") or source)
        folders.add(os.path.realpath(given if os.path.isdir(given) else os.path.dirname(given)))
    return sorted(folders, key=len, reverse=True)


def display_name(path: str, folders: list[str]) -> str:
    """A hit's file name for people: relative to its catalog's folder, else the last path component; never
    the server's absolute path."""
    for folder in folders:
        prefix = folder.rstrip(os.sep) + os.sep
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path.rsplit("/", 1)[-1]


def public_hit(hit: dict, folders: list[str]) -> dict:
    """A hit as clients see it: ``file`` (display name) and ``url`` (its image) instead of ``path``.

    ``gradio_client`` takes any object with a string ``path`` for a file to download (and fails with 403),
    and the absolute path tells strangers how the server's disks are laid out.
    """
    out = {k: v for k, v in hit.items() if k != "path"}
    out["file"] = display_name(hit["path"], folders)
    out["url"] = item_url(hit["key"])
    return out
