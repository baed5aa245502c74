"""Replacing a file so that a crash at any instant leaves either its old or its new content.

Every file of an index directory that is not SQLite (CURRENT, HISTORY, manifests, FAISS snapshots and
their checksums, reference samples) is written through here: a temporary name in the same folder,
fsync, rename over the target, fsync of the folder (so the rename itself survives power loss).
A killed writer leaves ``*.tmp-<pid>`` files, which the next writer deletes on opening.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitrine.errors import StoreError


def temporary(path: Path) -> Path:
    """The temporary name a new version of ``path`` is written under before :func:`durable_replace`."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content."""
    tmp = temporary(path)
    try:
        tmp.write_bytes(data)
        durable_replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StoreError(f"cannot write {path}: {exc}") from exc


def durable_replace(tmp: Path, path: Path) -> None:
    """fsync ``tmp``, rename it over ``path``, fsync the folder (makes the rename itself durable)."""
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
