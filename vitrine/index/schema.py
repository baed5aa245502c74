"""The inferred schema of an index's metadata: per field, its type, how many items have it, and its range.

Types come from the stored JSON values (manifest readers store numbers and booleans typed, and ISO dates
as ISO text, :mod:`vitrine.catalog.readers`): ``number`` (integers and reals), ``boolean``, ``date`` (text
that is an ISO 8601 date or date-time, every value of the field), ``string``, ``mixed`` (several of
these: compared as text, as every value was before metadata was typed), ``json`` (lists or objects:
only ``$exists`` applies). Inferring from the values, not from a stored declaration, keeps indexes built
before typed metadata working: their fields read as ``string`` (or ``number`` where the JSON held numbers).
"""

from __future__ import annotations

import sqlite3
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone

#: SQLite's date functions accept these ISO forms; the GLOB keeps "2024" or "12-05" from passing as dates.
_DATE_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*"
_UNIX_EPOCH_JULIAN = 2440587.5
_SQL = f"""
SELECT je.key, je.type, COUNT(*),
       MIN(CASE WHEN je.type IN ('integer', 'real') THEN je.value END),
       MAX(CASE WHEN je.type IN ('integer', 'real') THEN je.value END),
       SUM(je.type = 'text' AND je.value GLOB '{_DATE_GLOB}' AND julianday(je.value) IS NOT NULL),
       MIN(CASE WHEN je.type = 'text' THEN julianday(je.value) END),
       MAX(CASE WHEN je.type = 'text' THEN julianday(je.value) END)
FROM items, json_each(items.metadata) AS je GROUP BY 1, 2 ORDER BY 1, 2
"""


@dataclass(frozen=True)
class FieldInfo:
    """One metadata field: ``type`` (see the module docstring), items holding a non-null value, and for
    numbers and dates the smallest and largest value (dates as UTC ISO text)."""

    type: str
    count: int
    min: float | str | None = None
    max: float | str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("type", "count")}


def infer_schema(conn: sqlite3.Connection) -> dict[str, FieldInfo]:
    """field -> :class:`FieldInfo`, over every item of the generation (one scan of the metadata)."""
    rows: dict[str, list[tuple]] = {}
    for name, *rest in conn.execute(_SQL):
        rows.setdefault(name, []).append(tuple(rest))
    return {name: _field(parts) for name, parts in rows.items()}


def _field(parts: list[tuple]) -> FieldInfo:
    by_type = {row[0]: row for row in parts if row[0] != "null"}
    count = sum(row[1] for row in by_type.values())
    kinds = set(by_type)
    if not kinds:
        return FieldInfo("null", 0)
    if kinds <= {"integer", "real"}:
        lows = [row[2] for row in by_type.values()]
        highs = [row[3] for row in by_type.values()]
        return FieldInfo("number", count, min(lows), max(highs))
    if kinds <= {"true", "false"}:
        return FieldInfo("boolean", count)
    if kinds == {"text"}:
        text = by_type["text"]
        if text[4] == text[1]:
            return FieldInfo("date", count, _iso(text[5]), _iso(text[6]))
        return FieldInfo("string", count)
    if kinds <= {"array", "object"}:
        return FieldInfo("json", count)
    return FieldInfo("mixed", count)


def _iso(julian: float | None) -> str | None:
    if julian is None:
        return None
    seconds = round((julian - _UNIX_EPOCH_JULIAN) * 86400)  # julianday is a float: whole seconds
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return moment.isoformat(timespec="seconds")
