"""Metadata filters as clients send them, parsed into the one form the store searches with.

Today a filter is a set of exact matches, ``field -> value`` compared as strings and ANDed. Clients send
it loosely (an object, a JSON object string, ``"k=v, k2=v2"`` pairs, or a list of pairs), so it is parsed
once, here, and every key is checked against the index's own metadata fields before any search runs.
Operator objects (``{"price": {"$lt": 50}}``) are refused as ``unsupported`` until the store's filter
language lands; the parsed form is what :class:`vitrine.search.query.Query` carries.
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping
from typing import Any

from vitrine.errors import QueryError

Filters = dict[str, str]


def normalise_filters(filters: Any) -> Filters:
    """Accept ``{"k": "v"}``, a JSON object string, ``"k=v, k2=v2"`` or ``["k=v"]``; values as strings."""
    if filters is None or filters == "" or filters == {} or filters == []:
        return {}
    if isinstance(filters, str):
        text = filters.strip()
        if text.startswith("{"):
            filters = _json_object(text)
        else:
            filters = [p for p in (s.strip() for s in text.replace(";", ",").split(",")) if p]
    if isinstance(filters, list):
        return parse_filters([str(p) for p in filters])
    if isinstance(filters, dict):
        return _scalars(filters)
    raise QueryError('filters must be an object such as {"folder": "red"}', "bad_filter")


def parse_filters(pairs: list[str] | None) -> Filters:
    """``["color=red", "size=M"]`` → ``{"color": "red", "size": "M"}`` (values may contain '=').

    An item that starts with ``{`` is a JSON object of fields and values, the form for keys that contain
    ``=`` (``{"a=b": "c"}``).
    """
    filters: Filters = {}
    for pair in pairs or []:
        if pair.lstrip().startswith("{"):
            filters.update(filter_object(pair))
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise QueryError(
                f'filter {pair!r} is not of the form key=value or {{"key": "value"}}', "bad_filter"
            )
        filters[key.strip()] = value
    return filters


def filter_object(text: str) -> Filters:
    """A JSON object of field -> scalar value, as the strings filters compare (booleans as true/false)."""
    out: Filters = {}
    for key, value in _json_object(text).items():
        if isinstance(value, dict | list) or value is None:
            raise QueryError(
                f"filter field {key!r} must have a single text, number or boolean value", "bad_filter"
            )
        out[key] = _text(value)
    return out


def check_known(filters: Filters, known: Mapping[str, Any]) -> Filters:
    """``filters`` when every key is a known metadata field, else an error that lists the known ones."""
    unknown = sorted(set(filters) - set(known))
    if unknown:
        raise QueryError(
            f"unknown filter key(s) {', '.join(short(u)[1:-1] for u in unknown[:5])}; "
            f"known keys: {', '.join(sorted(known)) or 'none'}",
            "unknown_filter",
        )
    return filters


def _json_object(text: str) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(f"filters are not valid JSON: {exc.msg}", "bad_filter") from None
    if not isinstance(obj, dict):
        message = f'filter {short(text)} must be a JSON object such as {{"color": "red"}}'
        raise QueryError(message, "bad_filter")
    return obj


def _scalars(obj: dict) -> Filters:
    """A client's filter object: empty values mean "any" (an unset dropdown), operators are refused."""
    out: Filters = {}
    for key, value in obj.items():
        if value is None or value == "":
            continue
        if isinstance(value, dict) and any(str(op).startswith("$") for op in value):
            raise QueryError(
                f"filter {short(key)} uses operators ({', '.join(map(str, value))}), which this index "
                "cannot apply yet: give one exact value",
                "unsupported",
            )
        if isinstance(value, dict | list) or value is None:
            raise QueryError(f"filter {short(key)} must be a single value", "bad_filter")
        out[str(key)] = _text(value)
    return out


def _text(value: Any) -> str:
    """The string a metadata value compares as (JSON booleans as true/false, like SQLite's json)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def short(value: Any) -> str:
    """``repr`` cut to a readable length: messages echo what the client sent, not a megabyte of it."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
