"""SourceGuard: read catalog images for display, and nothing else.

Hit paths come from the index, and the index's metadata came from catalogs that other people wrote, so
a path is never trusted: it is resolved (``..`` and symlinks followed) and served only when the real
location lies under the root of one of the catalogs the index was built from (``Catalog.root``, found by
reopening each recorded catalog spec). Saved-dataset rows (``<dir>#<row>``) are checked by their folder.
Gradio itself is given no ``allowed_paths``, so it serves only its own upload cache.

Knobs: ``max_pixels`` bounds decoding (a bomb hidden in a catalog is refused like an upload);
``cache_size`` thumbnails are kept in memory, keyed by path and modification time.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from vitrine.catalog import open_catalog, read_source
from vitrine.errors import ImageDecodeError, VitrineError
from vitrine.images import DEFAULT_MAX_PIXELS, decode_image

log = logging.getLogger("vitrine.app")


class PathRefused(VitrineError):
    """A path outside every catalog root (``reason`` is the metric label)."""

    reason = "forbidden_path"


class SourceGuard:
    """Resolve, check and read catalog files; see the module docstring."""

    def __init__(self, max_pixels: int = DEFAULT_MAX_PIXELS, cache_size: int = 512) -> None:
        self.max_pixels = max_pixels
        self.cache_size = cache_size
        self._roots: tuple[frozenset, list[Path]] | None = None
        self._thumbs: OrderedDict[tuple, Image.Image] = OrderedDict()
        self._lock = threading.Lock()

    def forget(self) -> None:
        """Drop cached roots and thumbnails (the index changed)."""
        with self._lock:
            self._roots = None
            self._thumbs.clear()

    def roots(self, catalogs: dict[str, dict]) -> list[Path]:
        """Real root folders of ``catalogs`` (source -> spec), computed once per set of catalogs."""
        ident = frozenset(catalogs)
        cached = self._roots
        if cached is not None and cached[0] == ident:
            return cached[1]
        roots = [_catalog_root(source, spec) for source, spec in sorted(catalogs.items())]
        with self._lock:
            self._roots = (ident, roots)
        return roots

    def check(self, path: str, catalogs: dict[str, dict]) -> str:
        """``path`` if its real location is under a catalog root, else PathRefused."""
        if not path or "\x00" in path:
            raise PathRefused("empty or invalid path")
        real = os.path.realpath(_file_part(path))
        for root in self.roots(catalogs):
            if real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep):
                return path
        raise PathRefused(f"{path!r} is not inside any indexed catalog: refused")

    def read(self, path: str, catalogs: dict[str, dict]) -> bytes:
        """Encoded bytes of a catalog file (PathRefused outside the roots, ImageDecodeError if unreadable)."""
        return read_source(self.check(path, catalogs))

    def thumbnail(self, path: str, catalogs: dict[str, dict], size: int = 320) -> Image.Image | None:
        """Small RGB picture, or None when the file is refused, missing or undecodable (logged)."""
        try:
            self.check(path, catalogs)
            stamp = os.stat(_file_part(path)).st_mtime_ns
        except PathRefused as exc:
            log.warning("no thumbnail for %r: %s", path, exc)
            return None
        except (OSError, ValueError):
            stamp = 0
        key = (path, stamp, size)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        try:
            data = self.read(path, catalogs)
            image = decode_image(data, max_pixels=self.max_pixels, draft_size=size)
        except (PathRefused, ImageDecodeError, OSError) as exc:
            log.warning("no thumbnail for %s: %s", path, exc)
            return None
        image.thumbnail((size, size))
        with self._lock:
            self._thumbs[key] = image
            while len(self._thumbs) > self.cache_size:
                self._thumbs.popitem(last=False)
        return image


def _file_part(path: str) -> str:
    """The filesystem part of a hit path: ``<dataset dir>#<row>`` → ``<dataset dir>``."""
    if "#" in path and not os.path.exists(path):
        return path.split("#", 1)[0]
    return path


def _catalog_root(source: str, spec: dict) -> Path:
    """The real folder a catalog's images live under; the spec's own folder when it cannot be reopened."""
    try:
        args = {k: spec.get(k) for k in ("image_column", "caption_column")}
        root = open_catalog(spec.get("path", source), **args).root
    except (VitrineError, OSError, ValueError) as exc:
        log.warning("catalog %s cannot be reopened (%s): serving its own folder only", source, exc)
        given = Path(spec.get("path", source))
        root = given if given.is_dir() else given.parent
    return Path(os.path.realpath(root))
