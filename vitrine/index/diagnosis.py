"""One diagnosis of an index directory, shared by every command and the app.

:func:`diagnose` inspects a directory without changing it and returns an :class:`IndexState`: ``absent``
(nothing index-like: a build may create one), ``ok``, or ``damaged`` with the reasons and the way out.
Every entry point reports the same state the same way, so a damaged index is never mistaken for a
missing one (which would start a new index, or fetch a default model) nor for a healthy one.

Damage covered: CURRENT missing, empty, garbled or naming a generation that is gone (the way out:
``indexer repair`` makes the last published generation that opens live again, from HISTORY, or the
newest complete one); the live generation's manifest.json missing or unreadable (repair rewrites it
when meta.sqlite holds its copy); meta.sqlite missing or unreadable (the items are gone: restore a
backup, or roll back). A damaged FAISS snapshot is not a state here: opening rebuilds it from SQLite.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from vitrine.errors import IndexDamaged, StoreError
from vitrine.index import generations, layout
from vitrine.index.snapshots import mirrored_manifest

ABSENT, OK, DAMAGED = "absent", "ok", "damaged"


@dataclass(frozen=True)
class IndexState:
    """What :func:`diagnose` found: ``kind`` (absent / ok / damaged), the live ``generation`` (or the one
    repair would make live), ``reasons`` and ``remedy`` (the way out) when damaged."""

    root: Path
    kind: str
    generation: str | None = None
    reasons: tuple[str, ...] = ()
    remedy: str = ""

    def message(self) -> str:
        if self.kind == ABSENT:
            create = "create one with `python -m indexer build CATALOG --index DIR`"
            return f"no index at {str(self.root)!r}: {create}"
        if self.kind == OK:
            return f"index {self.root} is ok (generation {self.generation})"
        return f"index {self.root} is damaged: {'; '.join(self.reasons)}; {self.remedy}"

    def to_dict(self) -> dict:
        return {
            "state": self.kind,
            "generation": self.generation,
            "reasons": list(self.reasons),
            "remedy": self.remedy,
        }


def diagnose(root: str | Path) -> IndexState:
    """The state of the index directory ``root`` (reads only; never raises for a damaged directory)."""
    root = Path(root)
    if not root.is_dir():
        return IndexState(root, ABSENT)
    name, problem = current(root)
    if problem is not None:
        if not (root / "CURRENT").exists() and not _holds_anything(root):
            return IndexState(root, ABSENT)  # empty, or a first build killed before it was published
        target = recovery_target(root)
        if target is None:
            remedy = "no complete generation is left to make live: build the index again into a new folder"
        else:
            remedy = f"run `python -m indexer repair --index {root}` to make {target} live again"
        return IndexState(root, DAMAGED, target, (problem,), remedy)
    reasons, remedies = generation_problems(root, name)
    if not reasons:
        return IndexState(root, OK, name)
    return IndexState(root, DAMAGED, name, tuple(reasons), "; ".join(dict.fromkeys(remedies)))


def explain(root: Path, exc: StoreError) -> StoreError:
    """The error to raise for a store that failed to open: the diagnosis when the directory is damaged,
    else ``exc`` itself (a wrong model, a busy writer lock, a missing index keep their own message)."""
    state = diagnose(root)
    return IndexDamaged(state) if state.kind == DAMAGED else exc


def require_absent(root: Path) -> None:
    """Raise unless ``root`` is free for a new index (it must not hold one, healthy or damaged)."""
    state = diagnose(root)
    if state.kind == DAMAGED:
        raise IndexDamaged(state)
    if state.kind == OK:
        raise StoreError(f"an index already exists at {root}; open it or choose another folder")


def current(root: Path) -> tuple[str, str | None]:
    """(live generation name, None), or ("", what is wrong with CURRENT)."""
    try:
        text = (root / "CURRENT").read_bytes().decode("utf-8", errors="replace").strip()
    except FileNotFoundError:
        return "", "CURRENT is missing"
    except OSError as exc:
        return "", f"CURRENT is unreadable ({exc.strerror or exc})"
    if not text:
        return "", "CURRENT is empty"
    if not layout.GEN_RE.match(text):
        return "", f"CURRENT names {text[:40]!r}, not a generation"
    if not (root / text).is_dir():
        return "", f"CURRENT names {text}, which does not exist"
    return text, None


def generation_problems(root: Path, name: str) -> tuple[list[str], list[str]]:
    """(reasons, remedies) for the generation ``name``; both empty when it opens."""
    reasons, remedies = [], []
    path = root / name
    try:
        layout.read_manifest(path)
    except StoreError:
        reasons.append(f"{name}/manifest.json is missing or unreadable")
        if mirrored_manifest(path / "meta.sqlite") is not None:
            remedies.append(f"run `python -m indexer repair --index {root}` to rewrite it from meta.sqlite")
        else:
            remedies.append(
                "meta.sqlite holds no copy of it to rewrite it from (an index made by an older version): "
                "restore it from a backup, or build the catalogs again into a new folder"
            )
    problem = _database_problem(path / "meta.sqlite")
    if problem is not None:
        reasons.append(f"{name}/meta.sqlite {problem}")
        remedies.append(
            f"restore {name}/meta.sqlite from a backup, or make the previous generation live with "
            f"`python -m indexer reindex --index {root} --rollback`"
        )
    return reasons, remedies


def recovery_target(root: Path) -> str | None:
    """The generation to make live when CURRENT is lost: the last one HISTORY names that opens, else the
    newest complete one (a finished build, not an unfinished or rejected reindex job)."""
    for name in reversed(generations.recorded_history(root)):
        if _opens(root / name):
            return name
    folders = sorted((p for p in root.iterdir() if layout.GEN_RE.match(p.name)), reverse=True)
    for path in folders:
        job = generations.read_job(path)
        if (job is None or job.get("state") == "published") and _opens(path):
            return path.name
    return None


def _opens(path: Path) -> bool:
    if not path.is_dir() or _database_problem(path / "meta.sqlite") is not None:
        return False
    try:
        layout.read_manifest(path)
    except StoreError:
        return mirrored_manifest(path / "meta.sqlite") is not None
    return True


def _database_problem(db: Path) -> str | None:
    if not db.is_file():
        return "is missing"
    try:
        conn = layout.connect(db, readonly=True)
        try:
            conn.execute("SELECT value FROM state WHERE name='seq'").fetchone()
            for table in ("items", "vectors", "failures", "catalogs"):  # what every command reads
                conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        finally:
            conn.close()
    except (sqlite3.Error, StoreError) as exc:
        return f"is unreadable ({str(exc).split(': ')[-1]})"
    return None


def _holds_anything(root: Path) -> bool:
    """Whether a directory without CURRENT still holds published history or items worth keeping."""
    if generations.recorded_history(root):
        return True
    return any(generations.holds_items(p) is not False for p in root.iterdir() if layout.GEN_RE.match(p.name))
