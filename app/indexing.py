"""IndexBuilder: index photos uploaded through the page, so a first visit needs no command line.

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
from pathlib import Path
from typing import Any

from vitrine.catalog import open_catalog
from vitrine.errors import VitrineError
from vitrine.images import IMAGE_EXTENSIONS
from vitrine.search import Searcher
from vitrine.workspace import load_encoder, open_for_build, run_build


class BuildRefused(VitrineError):
    reason = "build_refused"


class IndexBuilder:
    """Copy uploads beside the index and ingest them; see the module docstring."""

    def __init__(self, index: str, model: str | None, encoder_kwargs: dict[str, Any], max_files: int = 5000):
        self.index = Path(index)
        self.model = model
        self.encoder_kwargs = encoder_kwargs
        self.max_files = max_files
        self._lock = threading.Lock()

    def build(
        self, files: list[str], searcher: Searcher | None, progress: Callable[[int, int], None] | None = None
    ) -> dict:
        images = [f for f in files or [] if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if not images:
            raise BuildRefused("no image files among the uploads (expected .jpg, .png, .webp, …)")
        if len(images) > self.max_files:
            raise BuildRefused(f"{len(images)} files uploaded; index at most {self.max_files} at once here")
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
