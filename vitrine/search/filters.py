"""Metadata filters as clients send them, turned into one filter object of the filter language.

The language itself (``{"color": "red"}``, ``{"price": {"$lt": 50}}``, ``$and``/``$or``...) is
:mod:`vitrine.index.filters`, which parses an object against the index's schema into the expression the
store and the full-text side search with. Clients send filters loosely: an object, a JSON object string,
``"k=v, k2=v2"`` pairs, or a list of pairs and JSON objects (the CLI's repeated ``--filter``). This module
turns all of them into one object; :func:`vitrine.search.query.parse_query` then parses it once.
"""

from __future__ import annotations

import json
import reprlib
from typing import Any

from vitrine.errors import QueryError

FilterObject = dict[str, Any]


def filter_object(filters: Any) -> FilterObject:
    """Accept a filter object, a JSON object string, ``"k=v, k2=v2"`` or a list of ``"k=v"`` pairs and
    JSON object strings (all ANDed). ``k=v`` is text equality, as filters always were. A top-level field
    whose value is None or "" means "any" (an unset dropdown) and is left out."""
    if filters is None or filters == "" or filters == {} or filters == []:
        return {}
    if isinstance(filters, str):
        text = filters.strip()
        if text.startswith("{"):
            return _unset_dropped(_json_object(text))
        filters = [p for p in (s.strip() for s in text.replace(";", ",").split(",")) if p]
    if isinstance(filters, list | tuple) and all(isinstance(p, str) for p in filters):
        return _pairs(list(filters))
    if isinstance(filters, dict):
        return _unset_dropped(filters)
    raise QueryError('filters must be an object such as {"color": "red"}', "bad_filter")


def _pairs(items: list[str]) -> FilterObject:
    """``["color=red", "a=b=c", '{"price": {"$lt": 5}}']`` → one object (values may contain '=');
    a JSON object is the form for fields containing '=' and for operators."""
    pairs: FilterObject = {}
    objects: list[FilterObject] = []
    for item in items:
        if item.lstrip().startswith("{"):
            objects.append(_unset_dropped(_json_object(item)))
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise QueryError(
                f'filter {short(item)} is not of the form key=value or {{"key": "value"}}', "bad_filter"
            )
        pairs[key.strip()] = value
    parts = [p for p in ([pairs] if pairs else []) + objects if p]
    return {} if not parts else parts[0] if len(parts) == 1 else {"$and": parts}


def _json_object(text: str) -> Any:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise QueryError(f"filter {short(text)} is not valid JSON: {exc.msg}", "bad_filter") from None
    if not isinstance(obj, dict):
        message = f'filter {short(text)} must be a JSON object such as {{"color": "red"}}'
        raise QueryError(message, "bad_filter")
    return obj


def _unset_dropped(obj: dict) -> FilterObject:
    return {str(k): v for k, v in obj.items() if str(k).startswith("$") or (v is not None and v != "")}


def short(value: Any) -> str:
    """``repr`` cut to a readable length: messages echo what the client sent, not a megabyte of it."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40
