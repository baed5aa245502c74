"""Where exported models live, and when a cached one may be reused instead of exporting again.

An entry is a folder named by the hash of its ``parts`` (the model's fingerprint id and weights
revision, what was exported or quantized, the calibration, and the versions of every library that
wrote it); ``meta.json``, written last, holds the parts and makes the entry valid. An entry is
built in a temporary folder and renamed into place, so a crash or a concurrent build never leaves a
half-written model that looks valid. Entries go beside the checkpoint (``.vitrine-runtimes/``) when
its folder is writable, else under ``$VITRINE_CACHE_DIR`` (default ``~/.cache/vitrine``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

BESIDE = ".vitrine-runtimes"
META = "meta.json"
_LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "openvino")


def versions() -> dict[str, str]:
    """Versions of the libraries that export, quantize or run a model (absent ones left out)."""
    found = {}
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def root_for(model_id: str) -> Path:
    """Beside a writable checkpoint folder; else the user's cache folder (hub ids, read-only folders)."""
    local = Path(model_id).expanduser()
    if local.is_dir() and os.access(local, os.W_OK | os.X_OK):
        return local / BESIDE
    base = os.environ.get("VITRINE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "vitrine"
    )
    return Path(base) / "runtimes"


def key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def lookup(root: Path, parts: dict[str, Any]) -> Path | None:
    """The valid entry for ``parts``, or None (absent, half-written, or written for other parts)."""
    folder = root / key(parts)
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return folder if meta.get("parts") == json.loads(json.dumps(parts, default=str)) else None


def read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / META).read_text())


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Replace an entry's meta.json atomically (validation results are added after the entry exists)."""
    tmp = folder / f".{META}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True, default=str))
    os.replace(tmp, folder / META)


def build(root: Path, parts: dict[str, Any], make: Callable[[Path], dict[str, Any]]) -> Path:
    """The entry for ``parts``, made by ``make(folder)`` (which writes the files and returns extra meta)
    unless a valid one exists. A concurrent builder that finished first wins; ours is discarded."""
    found = lookup(root, parts)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    final = root / key(parts)
    tmp = root / f".tmp-{key(parts)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        extra = make(tmp)
        write_meta(tmp, {**extra, "parts": parts})
        if final.exists():  # stale (invalid) entry, or one a concurrent builder just finished
            if lookup(root, parts) is not None:
                return final
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
