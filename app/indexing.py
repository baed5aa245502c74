"""IndexBuilder: index photos uploaded through the page, so a first visit needs no command line.

Only for an operator: indexing writes to the index and to disk, so it is refused unless the app runs
with ``--admin`` (and behind the login where ``--auth`` is set, which Gradio enforces on every route).
Each request is checked before anything is read: a ``write`` token of the client's rate limit
(:mod:`app.ratelimit`), then every file must be one this server received as an upload
(:mod:`app.uploads`: a client-sent path naming any other file is refused), within the caps of
:class:`IndexLimits` (files per request, bytes per file, bytes in all).

Uploads land in Gradio's temporary cache, which is cleaned up; they are copied first into
``<index>/../uploads/<timestamp>/`` (beside the index, so the catalog root stays valid and its files stay
servable) and that folder is indexed as an ordinary folder catalog with the same ``Ingestor`` the indexer
uses. The model is the index's own when one exists, else ``--model`` / ``$VITRINE_MODEL`` / the default.
Only one build runs at a time; a build by another process holding the index's write lock is refused with
that message rather than waited for.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ratelimit import RateLimiter
from app.uploads import Uploads, upload_bytes
from vitrine.catalog.readers import open_catalog
from vitrine.errors import VitrineError
from vitrine.images import IMAGE_EXTENSIONS
from vitrine.open_index import load_encoder, open_for_build, run_build
from vitrine.search.searcher import Searcher

Progress = Callable[[int, int], None]


class BuildRefused(VitrineError):
    reason = "build_refused"


class BuildForbidden(BuildRefused):
    reason = "forbidden"


@dataclass(frozen=True)
class IndexLimits:
    """Caps on one "Index photos" request (the per-file cap is ``--max-upload-mb``)."""

    max_files: int = 1000
    max_total_mb: float = 2000.0


class IndexBuilder:
    """Check uploads, copy them beside the index and ingest them; see the module docstring.

    ``settings`` is the service's (:class:`app.service.ServiceSettings`): index, model, encoder_kwargs,
    admin, max_upload_mb and index_limits are read from it.
    """

    def __init__(self, settings: Any, limiter: RateLimiter, uploads: Uploads) -> None:
        self.index = Path(settings.index)
        self.model, self.encoder_kwargs = settings.model, settings.encoder_kwargs
        self.settings, self.limiter, self.uploads = settings, limiter, uploads
        self._lock = threading.Lock()

    def check(self, files: Any, client: str) -> list[str]:
        """The image uploads of one request, or BuildRefused/RateLimited/UploadRefused (nothing read)."""
        if not self.settings.admin:
            raise BuildForbidden("indexing from the page is disabled: start the app with --admin")
        self.limiter.take("write", client)
        limits = self.settings.index_limits
        if not isinstance(files, list) or len(files) > limits.max_files:
            count = len(files) if isinstance(files, list) else type(files).__name__
            raise BuildRefused(f"{count} files sent; index at most {limits.max_files} at once here")
        uploads = [self.uploads.check(f) for f in files]
        images = [f for f in uploads if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise BuildRefused("no image files among the uploads (expected .jpg, .png, .webp, …)")
        cap = self.settings.max_upload_mb * 1024 * 1024
        if any(upload_bytes([f]) > cap for f in images):
            raise BuildRefused(f"an upload is larger than the {self.settings.max_upload_mb:g} MB limit")
        if upload_bytes(images) > limits.max_total_mb * 1024 * 1024:
            raise BuildRefused(f"the uploads exceed {limits.max_total_mb:g} MB in all: send fewer at once")
        return images

    def build(
        self, files: Any, searcher: Searcher | None, progress: Progress | None = None, client: str = ""
    ) -> dict:
        images = self.check(files, client)
        if not self._lock.acquire(blocking=False):
            raise BuildRefused("another upload is being indexed: try again when it finishes")
        try:
            folder = self._copy(images)
            encoder = (
                searcher.encoder
                if searcher is not None
                else load_encoder(self.index, self.model, **self.encoder_kwargs)
            )
            catalog = open_catalog(folder)
            done = [0]

            def step(n: int) -> None:
                done[0] += n
                if progress is not None:
                    progress(done[0], len(catalog))

            store = open_for_build(self.index, encoder)
            try:
                report = run_build(store, encoder, catalog, progress=step)
            finally:
                store.close()
            return {**report.to_dict(), "folder": str(folder)}
        finally:
            self._lock.release()

    def _copy(self, files: list[str]) -> Path:
        folder = self.index.resolve().parent / "uploads" / time.strftime("%Y%m%d-%H%M%S")
        folder.mkdir(parents=True, exist_ok=True)
        for i, src in enumerate(files):
            name = os.path.basename(src) or f"upload-{i}"
            target = folder / name
            if target.exists():
                target = folder / f"{target.stem}-{i}{target.suffix}"
            shutil.copyfile(src, target)
        return folder
