"""Takedowns that stay down: paths removed from an index are recorded as exclusions, in the generation's
meta.sqlite (table ``excluded``), and no build, reindex or store write admits them again until they are
restored explicitly (``indexer restore``).

An exclusion is a resolved file path, or a folder that covers everything under it. A reindex copies the
live generation's exclusions into the generation it builds, so they survive a model change.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass

TABLE = "CREATE TABLE IF NOT EXISTS excluded(path TEXT PRIMARY KEY, time REAL NOT NULL)"


@dataclass(frozen=True)
class Exclusions:
    """The excluded paths of one generation; :meth:`covers` is O(depth of the path)."""

    paths: frozenset[str] = frozenset()

    def covers(self, key: str) -> bool:
        """True when ``key`` (a resolved path, or a dataset key) is excluded, itself or by a folder."""
        if not self.paths:
            return False
        if key in self.paths:
            return True
        cut = key.rfind("/")
        while cut > 0:
            if key[:cut] in self.paths:
                return True
            cut = key.rfind("/", 0, cut)
        return False

    def __len__(self) -> int:
        return len(self.paths)


def normalise(paths: Iterable[str]) -> list[str]:
    """Exclusion entries as stored: no trailing slash, no duplicates, order kept."""
    return list(dict.fromkeys(p.rstrip("/") or "/" for p in paths))


def read(conn: sqlite3.Connection) -> Exclusions:
    """The exclusions recorded in a generation (none in one made before exclusions existed)."""
    try:
        return Exclusions(frozenset(r[0] for r in conn.execute("SELECT path FROM excluded")))
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return Exclusions()
        raise


def add(conn: sqlite3.Connection, paths: Iterable[str], now: float) -> None:
    """Record exclusions (inside the caller's write transaction)."""
    conn.execute(TABLE)
    conn.executemany(
        "INSERT OR IGNORE INTO excluded(path, time) VALUES (?, ?)", [(p, now) for p in normalise(paths)]
    )


def remove(conn: sqlite3.Connection, paths: Iterable[str]) -> list[str]:
    """Drop exclusions (inside the caller's write transaction); returns the ones that were recorded."""
    conn.execute(TABLE)
    return [
        p
        for p in normalise(paths)
        if conn.execute("DELETE FROM excluded WHERE path=? RETURNING path", (p,)).fetchall()
    ]
