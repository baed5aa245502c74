"""The metadata filter language (Chroma/Mongo style), parsed once against the index's schema into a
:data:`FilterExpr` and compiled to parameterised SQL over SQLite's JSON functions.

Forms: ``{"color": "red"}`` (equality), ``{"price": {"$lt": 50, "$gte": 10}}`` (operators, ANDed),
``{"$and": [...]}``, ``{"$or": [...]}``; several fields in one object are ANDed. Operators: ``$eq $ne $gt
$gte $lt $lte $in $nin $exists``. How a field compares follows its schema type
(:mod:`vitrine.index.schema`): numbers as numbers, dates as dates (``julianday``, so time zones and
date vs date-time forms compare by the moment), booleans as booleans, strings as text. A *string*
operand of an equality (``$eq $ne $in $nin`` and the bare form) compares as text against any field,
as every filter did before metadata was typed (``year=2021`` keeps matching the number 2021).
Like MongoDB, ``$ne`` and ``$nin`` also match items without the field; a null value (a blank manifest
cell) counts as no value, for ``$exists`` too.

Refused with :class:`QueryError`, naming the known fields and their types: unknown fields, unknown
operators, operands of the wrong type, nesting deeper than :data:`MAX_NESTING`, more than
:data:`MAX_CONDITIONS` conditions or :data:`MAX_IN` values in one ``$in``. Field names reach SQL only
inside a bound JSON path argument, and values only as bound arguments: nothing a user sends is
interpolated into SQL text.
"""

from __future__ import annotations

import json
import re
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from vitrine.errors import QueryError
from vitrine.index.schema import FieldInfo

MAX_NESTING = 4
MAX_CONDITIONS = 64
MAX_IN = 1000
RANGE_OPS = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}
EQUALITY_OPS = {"$eq", "$ne", "$in", "$nin"}
OPERATORS = sorted({*RANGE_OPS, *EQUALITY_OPS, "$exists"})
#: 'null' for a field that is absent or null (a blank manifest cell): both count as "no value".
_MISSING = "COALESCE(json_type(metadata, ?), 'null')"
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?")


@dataclass(frozen=True)
class Condition:
    """One checked comparison; ``compare`` is how: ``number``, ``boolean``, ``date`` or ``text``."""

    field: str
    op: str
    value: Any  # a tuple for $in / $nin
    compare: str


@dataclass(frozen=True)
class Group:
    """``$and`` / ``$or`` over parts."""

    op: str
    parts: tuple[Condition | Group, ...]


FilterExpr = Condition | Group


def parse_filter(obj: Any, schema: Mapping[str, FieldInfo]) -> FilterExpr | None:
    """The filter object ``obj`` checked against ``schema``; None for an empty filter (QueryError)."""
    if obj is None or obj == {}:
        return None
    parser = _Parser(schema)
    expr = parser.object(obj, 0)
    if parser.conditions > MAX_CONDITIONS:
        raise QueryError(
            f"a filter may hold at most {MAX_CONDITIONS} conditions, got {parser.conditions}", "bad_filter"
        )
    return expr


def to_sql(expr: FilterExpr) -> tuple[str, list]:
    """A SQL condition over ``items.metadata`` and its arguments (every value a bound argument)."""
    if isinstance(expr, Group):
        parts = [to_sql(p) for p in expr.parts]
        joiner = " AND " if expr.op == "$and" else " OR "
        return "(" + joiner.join(sql for sql, _ in parts) + ")", [a for _, args in parts for a in args]
    return _condition_sql(expr)


def cli_filter_object(items: list[str]) -> dict:
    """``--filter`` values as one filter object: ``key=value`` pairs (text equality, the old form) and
    JSON objects (the filter language), ANDed."""
    parts: list[dict] = []
    for item in items:
        if item.lstrip().startswith("{"):
            try:
                obj = json.loads(item)
            except json.JSONDecodeError as exc:
                raise QueryError(
                    f"filter {_short(item)} is not valid JSON: {exc.msg}", "bad_filter"
                ) from None
            if not isinstance(obj, dict):
                raise QueryError(
                    f'filter {_short(item)} must be a JSON object such as {{"color": "red"}}', "bad_filter"
                )
            parts.append(obj)
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QueryError(
                f'filter {_short(item)} is not of the form key=value or {{"key": "value"}}', "bad_filter"
            )
        parts.append({key.strip(): value})
    return {} if not parts else parts[0] if len(parts) == 1 else {"$and": parts}


class _Parser:
    def __init__(self, schema: Mapping[str, FieldInfo]) -> None:
        self.schema, self.conditions = schema, 0

    def known(self) -> str:
        return ", ".join(f"{n} ({f.type})" for n, f in sorted(self.schema.items())) or "none"

    def object(self, obj: Any, depth: int) -> FilterExpr:
        if not isinstance(obj, dict) or not obj:
            raise QueryError(f"a filter must be a non-empty JSON object, got {_short(obj)}", "bad_filter")
        if depth > MAX_NESTING:
            raise QueryError(f"filters may nest $and/$or at most {MAX_NESTING} deep", "bad_filter")
        unknown = sorted(k for k in obj if not k.startswith("$") and k not in self.schema)
        if unknown:
            names = ", ".join(_short(u)[1:-1] for u in unknown[:5])
            raise QueryError(
                f"unknown filter field(s) {names}; known fields: {self.known()}", "unknown_filter"
            )
        parts = [self.entry(key, value, depth) for key, value in obj.items()]
        return parts[0] if len(parts) == 1 else Group("$and", tuple(parts))

    def entry(self, key: str, value: Any, depth: int) -> FilterExpr:
        if key in ("$and", "$or"):
            if not isinstance(value, list) or not value:
                raise QueryError(f"{key} takes a non-empty list of filter objects", "bad_filter")
            return Group(key, tuple(self.object(v, depth + 1) for v in value))
        if key.startswith("$"):
            raise QueryError(
                f"unknown filter operator {_short(key)} at the top level: use $and or $or", "bad_filter"
            )
        if isinstance(value, dict):
            if not value:
                raise QueryError(f"filter field {_short(key)} has an empty operator object", "bad_filter")
            parts = [self.condition(key, op, operand) for op, operand in value.items()]
            return parts[0] if len(parts) == 1 else Group("$and", tuple(parts))
        if isinstance(value, list) or value is None:
            raise QueryError(
                f"filter field {_short(key)} must have a single text, number or boolean value, "
                'or an operator object such as {"$in": [...]}',
                "bad_filter",
            )
        return self.condition(key, "$eq", value)

    def condition(self, name: str, op: str, operand: Any) -> Condition:
        self.conditions += 1
        if op not in OPERATORS:
            raise QueryError(
                f"unknown filter operator {_short(op)} for field {_short(name)}; known: {OPERATORS}",
                "bad_filter",
            )
        info = self.schema[name]
        if op == "$exists":
            if not isinstance(operand, bool):
                raise QueryError(f"$exists takes true or false, got {_short(operand)}", "bad_filter")
            return Condition(name, op, operand, "exists")
        if op in ("$in", "$nin"):
            if not isinstance(operand, list) or len(operand) > MAX_IN:
                raise QueryError(
                    f"{op} takes a list of at most {MAX_IN} values for field {_short(name)}", "bad_filter"
                )
            checked = [self.operand(name, info, op, v) for v in operand]
            compares = {c for c, _ in checked}
            compare = compares.pop() if len(compares) == 1 else "text"
            values = tuple(v if compare != "text" else _as_text(v) for _, v in checked)
            return Condition(name, op, values, compare)
        compare, value = self.operand(name, info, op, operand)
        return Condition(name, op, value, compare)

    def operand(self, name: str, info: FieldInfo, op: str, value: Any) -> tuple[str, Any]:
        """(how to compare, the checked operand) for one value against a field of type ``info.type``."""
        kind = info.type
        if isinstance(value, str) and op in EQUALITY_OPS:
            if kind == "date" and parse_iso_date(value) is not None:
                return "date", value
            if kind == "boolean" and value.lower() in ("true", "false"):
                return "boolean", value.lower() == "true"
            return "text", value
        if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
            return "number", value
        if kind == "boolean" and isinstance(value, bool) and op in EQUALITY_OPS:
            return "boolean", value
        if kind == "date" and isinstance(value, str) and parse_iso_date(value) is not None:
            return "date", value
        if kind in ("string", "mixed") and isinstance(value, str):
            return "text", value
        if kind in ("string", "mixed") and op in EQUALITY_OPS and isinstance(value, int | float):
            return "text", _as_text(value)
        raise QueryError(
            f"filter field {_short(name)} holds {kind} values: {op} cannot compare it with {_short(value)}; "
            f"known fields: {self.known()}",
            "bad_filter",
        )


def _short(value: Any) -> str:
    """``repr`` cut to a readable length: an error echoes what a client sent, not a megabyte of it."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def parse_iso_date(text: str) -> datetime | None:
    """The moment an ISO 8601 date or date-time names, or None when ``text`` is not one."""
    if not _ISO_DATE.fullmatch(text.strip()):
        return None
    try:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None


def _as_text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _condition_sql(c: Condition) -> tuple[str, list]:
    path = json_path(c.field)
    if c.compare == "exists":
        return f"{_MISSING} {'!=' if c.value else '='} 'null'", [path]
    values = list(c.value) if c.op in ("$in", "$nin") else [c.value]
    if c.compare == "boolean":
        column, slots = "json_type(metadata, ?)", ["?"] * len(values)
        values = ["true" if v else "false" for v in values]
    elif c.compare == "date":
        column, slots = "julianday(json_extract(metadata, ?))", ["julianday(?)"] * len(values)
    elif c.compare == "number":
        column, slots = "json_extract(metadata, ?)", ["?"] * len(values)
    else:
        column, slots = "CAST(json_extract(metadata, ?) AS TEXT)", ["?"] * len(values)
    if c.op in RANGE_OPS:
        return f"{column} {RANGE_OPS[c.op]} {slots[0]}", [path, *values]
    if not values:  # `$in: []` matches nothing, `$nin: []` everything
        return ("0" if c.op == "$in" else "1"), []
    listed = ", ".join(slots)
    if c.op in ("$eq", "$in"):
        return f"{column} IN ({listed})", [path, *values]
    # $ne / $nin match items without the field too (MongoDB's meaning)
    return f"({_MISSING} = 'null' OR {column} NOT IN ({listed}))", [path, path, *values]


def json_path(name: str) -> str:
    """The JSON path of a top-level field, quoted so dots and brackets in names stay part of the name."""
    if '"' in name or "\\" in name:
        raise QueryError("filter field names containing '\"' or '\\' are not supported", "bad_filter")
    return f'$."{name}"'
