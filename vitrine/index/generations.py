"""Generation life cycle of an index directory: starting one, publishing it, history, pruning, rollback.

``ROOT/CURRENT`` names the live generation; ``ROOT/HISTORY`` lists the published ones, oldest first,
one name a line, ending with the live one. Both are rewritten atomically, CURRENT first: a kill
between the two leaves a HISTORY that is one step behind, and :func:`history` repairs that on read
(it cuts the list after the live generation, or appends it), so the pair can never disagree for long.

Publishing keeps the last ``keep`` published generations (readers that have not refreshed yet are
still on the previous one, and rollback needs something to return to): HISTORY is cut to them first,
then the generations that fell out of it are deleted, and so are folders that hold no items (a build
killed before its first commit). Pruning never deletes a generation HISTORY names, nor an unpublished
one that holds items (a lost CURRENT must not turn the whole history into "leftovers"): reindex jobs
discard their own rejected or rolled-away builds (:mod:`vitrine.build.reindex`).

:func:`rollback` makes the previously published generation live again and drops the current one from
the history, so a second rollback steps one generation further back; the generation rolled away from
stays on disk until the next reindex job deletes it.
Every change happens under the index's writer lock.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vitrine.errors import ReindexError, StoreError
from vitrine.index import embeddings, layout
from vitrine.index.ann import AnnIndex
from vitrine.index.atomic import write_atomic

HISTORY = "HISTORY"
JOB_FILE = "reindex-job.json"
#: Job state of a generation rolled away from: unpublished on purpose, so the next publish deletes it.
ROLLED_BACK = "rolled_back"
#: Fewest published generations kept: the live one and the one readers may still be using.
MIN_KEEP = 2


def number(name: str) -> int:
    match = layout.GEN_RE.match(name)
    if match is None:
        raise StoreError(f"{name!r} is not a generation name")
    return int(match.group(1))


def start(
    root: Path,
    fingerprint: dict,
    factory: str | None,
    search_params: dict | None,
    require_absent: Callable[[Path], None] | None,
    resume: Callable[[Path], str | None] | None,
    embedding_dtype: str = embeddings.DEFAULT,
) -> tuple[int, str]:
    """(writer lock fd, generation name): a new generation, or the one ``resume`` names (under the lock).

    ``require_absent`` (a new index) raises, under the lock, when ``root`` already holds an index.
    ``embedding_dtype``: how a new generation stores embeddings (:mod:`vitrine.index.embeddings`)."""
    dim = fingerprint.get("dim") if isinstance(fingerprint, dict) else None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or not fingerprint.get("id"):
        raise StoreError(f"fingerprint needs a non-empty 'id' and a positive int 'dim': {fingerprint!r}")
    embeddings.check_dtype(embedding_dtype)
    try:
        AnnIndex(dim, factory, search_params)
        root.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise StoreError(f"cannot create index at {root}: {exc}") from exc
    lock = layout.acquire_lock(root)
    try:
        if require_absent is not None:
            require_absent(root)
        name = (resume and resume(root)) or layout.new_generation(
            root, fingerprint, factory, search_params, embedding_dtype
        )
        return lock, name
    except BaseException:
        layout.release_lock(lock)
        raise


def history(root: Path) -> list[str]:
    """Published generations still on disk, oldest first, ending with the live one.

    An index made before HISTORY existed gets one reconstructed: generations numbered below the live
    one were published (a build always takes the next number, and publishing deleted older leftovers).
    """
    current = layout.read_current(root)
    try:
        names = [n for n in (root / HISTORY).read_text().split() if layout.GEN_RE.match(n)]
    except FileNotFoundError:
        names = sorted(p.name for p in root.iterdir() if _published_before(p, current))
    except OSError as exc:
        raise StoreError(f"cannot read {root / HISTORY}: {exc.strerror or exc}") from exc
    names = [n for n in dict.fromkeys(names) if (root / n).is_dir()]
    return names[: names.index(current) + 1] if current in names else [*names, current]


def _published_before(path: Path, current: str) -> bool:
    return (
        layout.GEN_RE.match(path.name) is not None
        and number(path.name) < number(current)
        and (path / "manifest.json").is_file()
    )


def unpublished(root: Path) -> list[str]:
    """Generation folders that are not in the published history: builds in progress, rejected or
    interrupted ones, and generations rolled away from."""
    published = set(history(root))
    return sorted(p.name for p in root.iterdir() if layout.GEN_RE.match(p.name) and p.name not in published)


def publish(root: Path, name: str, keep: int = MIN_KEEP) -> None:
    """Make ``name`` live (the caller holds the writer lock and has flushed it), record it, prune."""
    if keep < MIN_KEEP:
        raise StoreError(f"keep must be at least {MIN_KEEP} (the live generation and the previous one)")
    names = [n for n in _published(root) if n != name] + [name]
    write_atomic(root / "CURRENT", name.encode())
    _write_history(root, names[-keep:])
    prune(root, set(names[:-keep]))


def _published(root: Path) -> list[str]:
    """The published history before a publish: from CURRENT and HISTORY, or HISTORY alone."""
    if (root / "CURRENT").exists():
        return history(root)
    return [n for n in recorded_history(root) if (root / n).is_dir()]


def recorded_history(root: Path) -> list[str]:
    """Generation names HISTORY lists (empty when it is missing or unreadable), oldest first."""
    try:
        text = (root / HISTORY).read_text(errors="replace")
    except OSError:
        return []
    return list(dict.fromkeys(n for n in text.split() if layout.GEN_RE.match(n)))


def prune(root: Path, expired: set[str]) -> None:
    """Delete the generations in ``expired`` (they fell out of the kept history), those rolled away from,
    and folders holding no items; never one that HISTORY names, nor any other that holds items."""
    named = set(recorded_history(root))
    for path in root.iterdir():
        if not layout.GEN_RE.match(path.name) or path.name in named:
            continue
        retired = (read_job(path) or {}).get("state") == ROLLED_BACK
        if path.name in expired or retired or holds_items(path) is False:
            shutil.rmtree(path, ignore_errors=True)


def holds_items(path: Path) -> bool | None:
    """Whether a generation folder's meta.sqlite holds any item; None when it cannot be read."""
    db = path / "meta.sqlite"
    if not db.is_file() or db.stat().st_size == 0:
        return False
    try:
        conn = layout.connect(db, readonly=True)
        try:
            return conn.execute("SELECT 1 FROM items LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except (sqlite3.Error, StoreError) as exc:
        return False if "no such table" in str(exc) else None  # killed before its schema was written


def read_job(folder: Path) -> dict[str, Any] | None:
    """The reindex job recorded in a generation folder, or None (none, or unreadable)."""
    try:
        job = json.loads((folder / JOB_FILE).read_text())
    except (OSError, ValueError):
        return None
    return job if isinstance(job, dict) else None


def rollback(root: Path) -> tuple[str, str]:
    """Make the previously published generation live again; returns (from, to).

    Takes the writer lock (refused while a build or reindex is writing). Raises ReindexError when
    the live generation is the only published one left.
    """
    lock = layout.acquire_lock(root)
    try:
        names = history(root)
        if len(names) < 2:
            raise ReindexError(
                f"nothing to roll back to: {names[-1]} is the only published generation kept in {root}"
            )
        target = names[-2]
        layout.read_manifest(root / target)  # a damaged target is refused before readers move
        if not (root / target / "meta.sqlite").is_file():
            raise ReindexError(f"cannot roll back to {target}: its meta.sqlite is missing")
        job = {**(read_job(root / names[-1]) or {}), "state": ROLLED_BACK}
        write_atomic(root / names[-1] / JOB_FILE, json.dumps(job, indent=2, sort_keys=True).encode())
        write_atomic(root / "CURRENT", target.encode())
        _write_history(root, names[:-1])
        return names[-1], target
    finally:
        layout.release_lock(lock)


def _write_history(root: Path, names: list[str]) -> None:
    write_atomic(root / HISTORY, "".join(f"{n}\n" for n in names).encode())
