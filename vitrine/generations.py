"""Generation life cycle of an index directory: starting one, publishing it, history, pruning, rollback.

``ROOT/CURRENT`` names the live generation; ``ROOT/HISTORY`` lists the published ones, oldest first,
one name a line, ending with the live one. Both are rewritten atomically, CURRENT first: a kill
between the two leaves a HISTORY that is one step behind, and :func:`history` repairs that on read
(it cuts the list after the live generation, or appends it), so the pair can never disagree for long.

Publishing keeps the last ``keep`` published generations (readers that have not refreshed yet are
still on the previous one, and rollback needs something to return to) and deletes everything else,
leftovers of interrupted or rejected builds included. :func:`rollback` makes the previously published
generation live again and drops the current one from the history, so a second rollback steps one
generation further back; the generation rolled away from stays on disk until the next job deletes it.
Every change happens under the index's writer lock.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from vitrine import indexdir
from vitrine.ann import AnnIndex, write_atomic
from vitrine.errors import ReindexError, StoreError

HISTORY = "HISTORY"
#: Fewest published generations kept: the live one and the one readers may still be using.
MIN_KEEP = 2


def number(name: str) -> int:
    match = indexdir.GEN_RE.match(name)
    if match is None:
        raise StoreError(f"{name!r} is not a generation name")
    return int(match.group(1))


def start(
    root: Path,
    fingerprint: dict,
    factory: str | None,
    search_params: dict | None,
    require_new: bool,
    resume: Callable[[Path], str | None] | None,
) -> tuple[int, str]:
    """(writer lock fd, generation name): a new generation, or the one ``resume`` names (under the lock)."""
    dim = fingerprint.get("dim") if isinstance(fingerprint, dict) else None
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1 or not fingerprint.get("id"):
        raise StoreError(f"fingerprint needs a non-empty 'id' and a positive int 'dim': {fingerprint!r}")
    try:
        AnnIndex(dim, factory, search_params)
        root.mkdir(parents=True, exist_ok=True)
    except (ValueError, OSError) as exc:
        raise StoreError(f"cannot create index at {root}: {exc}") from exc
    lock = indexdir.acquire_lock(root)
    try:
        if require_new and (root / "CURRENT").exists():
            raise StoreError(f"an index already exists at {root}; open it or choose another folder")
        name = (resume and resume(root)) or indexdir.new_generation(root, fingerprint, factory, search_params)
        return lock, name
    except BaseException:
        indexdir.release_lock(lock)
        raise


def history(root: Path) -> list[str]:
    """Published generations still on disk, oldest first, ending with the live one.

    An index made before HISTORY existed gets one reconstructed: generations numbered below the live
    one were published (a build always takes the next number, and publishing deleted older leftovers).
    """
    current = indexdir.read_current(root)
    try:
        names = [n for n in (root / HISTORY).read_text().split() if indexdir.GEN_RE.match(n)]
    except FileNotFoundError:
        names = sorted(p.name for p in root.iterdir() if _published_before(p, current))
    except OSError as exc:
        raise StoreError(f"cannot read {root / HISTORY}: {exc.strerror or exc}") from exc
    names = [n for n in dict.fromkeys(names) if (root / n).is_dir()]
    return names[: names.index(current) + 1] if current in names else [*names, current]


def _published_before(path: Path, current: str) -> bool:
    return (
        indexdir.GEN_RE.match(path.name) is not None
        and number(path.name) < number(current)
        and (path / "manifest.json").is_file()
    )


def unpublished(root: Path) -> list[str]:
    """Generation folders that are not in the published history: builds in progress, rejected or
    interrupted ones, and generations rolled away from."""
    published = set(history(root))
    return sorted(p.name for p in root.iterdir() if indexdir.GEN_RE.match(p.name) and p.name not in published)


def publish(root: Path, name: str, keep: int = MIN_KEEP) -> None:
    """Make ``name`` live (the caller holds the writer lock and has flushed it), record it, prune."""
    if keep < MIN_KEEP:
        raise StoreError(f"keep must be at least {MIN_KEEP} (the live generation and the previous one)")
    fresh = not (root / "CURRENT").exists()
    write_atomic(root / "CURRENT", name.encode())
    names = [name] if fresh else history(root)
    _write_history(root, names)
    prune(root, names, keep)


def prune(root: Path, names: list[str], keep: int) -> None:
    """Delete every generation folder except the last ``keep`` of ``names`` (the published history)."""
    kept = set(names[-keep:])
    for path in root.iterdir():
        if indexdir.GEN_RE.match(path.name) and path.name not in kept:
            shutil.rmtree(path, ignore_errors=True)


def rollback(root: Path) -> tuple[str, str]:
    """Make the previously published generation live again; returns (from, to).

    Takes the writer lock (refused while a build or reindex is writing). Raises ReindexError when
    the live generation is the only published one left.
    """
    lock = indexdir.acquire_lock(root)
    try:
        names = history(root)
        if len(names) < 2:
            raise ReindexError(
                f"nothing to roll back to: {names[-1]} is the only published generation kept in {root}"
            )
        target = names[-2]
        indexdir.read_manifest(root / target)  # a damaged target is refused before readers move
        if not (root / target / "meta.sqlite").is_file():
            raise ReindexError(f"cannot roll back to {target}: its meta.sqlite is missing")
        write_atomic(root / "CURRENT", target.encode())
        _write_history(root, names[:-1])
        return names[-1], target
    finally:
        indexdir.release_lock(lock)


def _write_history(root: Path, names: list[str]) -> None:
    write_atomic(root / HISTORY, "".join(f"{n}\n" for n in names).encode())
