"""``indexer repair``: the way out of the states :mod:`vitrine.index.diagnosis` reports, where one exists.

Under the writer lock: a lost or broken CURRENT is pointed again at the generation the diagnosis names
(the last published one that opens, from HISTORY, else the newest complete one); a lost manifest.json is
rewritten from its copy in meta.sqlite, and only then (an exact copy, or nothing). Then the live
generation is opened as a writer, which rebuilds a damaged FAISS snapshot from SQLite and saves it with
its checksum. What cannot be recovered (no copy of the manifest, an unreadable meta.sqlite) is refused,
saying what is missing; SQLite files are never modified or deleted here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from vitrine.errors import IndexDamaged, StoreError
from vitrine.index import diagnosis, generations, layout
from vitrine.index.atomic import write_atomic
from vitrine.index.snapshots import mirrored_manifest
from vitrine.index.store import IndexStore


@dataclass
class RepairReport:
    """What repair did (``actions``, empty when nothing needed it) and the state it left."""

    root: Path
    actions: list[str] = field(default_factory=list)
    state: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"index": str(self.root), "actions": self.actions, **self.state}


def repair(root: str | Path) -> RepairReport:
    """Repair what can be repaired exactly; IndexDamaged (with what is missing) for the rest."""
    root, report = Path(root), RepairReport(Path(root))
    state = diagnosis.diagnose(root)
    if state.kind == diagnosis.ABSENT:
        raise StoreError(state.message())
    lock = layout.acquire_lock(root)
    try:
        name = _repair_current(root, report)
        _repair_manifest(root, name, report)
    finally:
        layout.release_lock(lock)
    state = diagnosis.diagnose(root)
    if state.kind != diagnosis.OK:
        raise IndexDamaged(state)
    with IndexStore.open_writer(root) as store:
        damage = store.snapshot_damage
        store.flush()  # saves a snapshot (with its checksum) over one that failed its checks
        if damage:
            report.actions.append(f"rebuilt the FAISS snapshot from meta.sqlite ({'; '.join(damage)})")
    report.state = diagnosis.diagnose(root).to_dict()
    return report


def _repair_current(root: Path, report: RepairReport) -> str:
    name, problem = diagnosis.current(root)
    if problem is None:
        return name
    target = diagnosis.recovery_target(root)
    if target is None:
        raise IndexDamaged(diagnosis.diagnose(root))
    write_atomic(root / "CURRENT", target.encode())
    published = generations.recorded_history(root)
    if target not in published:  # HISTORY lost too: the recovered generation starts it again
        write_atomic(root / generations.HISTORY, f"{target}\n".encode())
    report.actions.append(f"{problem}: made {target} live again")
    return target


def _repair_manifest(root: Path, name: str, report: RepairReport) -> None:
    path = root / name
    try:
        layout.read_manifest(path)
        return
    except StoreError:
        pass
    manifest = mirrored_manifest(path / "meta.sqlite")
    if manifest is None or manifest.get("generation") != name:
        raise IndexDamaged(diagnosis.diagnose(root))
    write_atomic(path / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    report.actions.append(f"rewrote {name}/manifest.json from its copy in meta.sqlite")
