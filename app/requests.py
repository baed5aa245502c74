"""Request validation: the refusals every endpoint shares, and the parsing of loose client input.

Each refusal is a :class:`RequestRefused` whose ``reason`` is the ``errors_total`` metric label and whose
message tells a person what to change. Clients send loosely typed values (a slider's float for ``k``,
filters as an object, a JSON string or ``"k=v"`` pairs), so they are normalised here before the core
sees them; the core's own errors are mapped to reasons by :func:`translate`.
"""

from __future__ import annotations

import json
import os
import reprlib
from collections.abc import Callable
from typing import Any

from vitrine.errors import ImageDecodeError, QueryError, StoreError, VitrineError
from vitrine.search.searcher import parse_filters


class RequestRefused(VitrineError):
    """A request the service will not answer; ``reason`` is the metric label, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def normalise_filters(filters: Any) -> dict[str, str]:
    """Accept ``{"k": "v"}``, a JSON object string, ``"k=v, k2=v2"`` or ``["k=v"]``; values as strings."""
    if filters is None or filters == "" or filters == {} or filters == []:
        return {}
    if isinstance(filters, str):
        text = filters.strip()
        if text.startswith("{"):
            try:
                filters = json.loads(text)
            except json.JSONDecodeError as exc:
                raise RequestRefused("bad_filter", f"filters are not valid JSON: {exc.msg}") from None
        else:
            filters = [p for p in (s.strip() for s in text.replace(";", ",").split(",")) if p]
    if isinstance(filters, list):
        try:
            return parse_filters([str(p) for p in filters])
        except QueryError as exc:
            raise RequestRefused("bad_filter", str(exc)) from None
    if isinstance(filters, dict):
        out: dict[str, str] = {}
        for key, value in filters.items():
            if value is None or value == "":
                continue
            if isinstance(value, dict | list):
                raise RequestRefused("bad_filter", f"filter {short(key)} must be a single value")
            out[str(key)] = str(value).lower() if isinstance(value, bool) else str(value)
        return out
    raise RequestRefused("bad_filter", 'filters must be an object such as {"folder": "red"}')


def known_filters(parsed: dict[str, str], known: dict[str, list[str]]) -> dict[str, str]:
    """``parsed`` when every key is a known metadata field, else an error that lists the known ones."""
    unknown = sorted(set(parsed) - set(known))
    if unknown:
        raise RequestRefused(
            "unknown_filter",
            f"unknown filter key(s) {', '.join(short(u)[1:-1] for u in unknown[:5])}; "
            f"known keys: {', '.join(sorted(known)) or 'none'}",
        )
    return parsed


def translate(call: Callable[[], list]) -> list:
    """Core errors → RequestRefused with a reason label."""
    try:
        return call()
    except ImageDecodeError as exc:
        raise RequestRefused("bad_image", f"cannot read the uploaded image: {exc.reason}") from None
    except QueryError as exc:
        raise RequestRefused(exc.reason, str(exc)) from None
    except StoreError as exc:
        raise RequestRefused("index_unavailable", str(exc)) from None


def number(value: Any, name: str, kind: type) -> Any:
    if isinstance(value, bool):
        raise RequestRefused(f"bad_{name}", f"{name} must be a number, got {short(value)}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON's Infinity as an int
        raise RequestRefused(f"bad_{name}", f"{name} must be a number, got {short(value)}") from None
    if kind is int and isinstance(value, float) and value != number:  # never float() a 400-digit int
        raise RequestRefused(f"bad_{name}", f"{name} must be a whole number, got {short(value)}")
    return number


def optional_text(text: Any) -> str | None:
    """The text of a query as sent, refused unless it is a string (a list is not stringified)."""
    if text is None or isinstance(text, str):
        return text
    raise RequestRefused("bad_text", f"the text query must be a string, got {type(text).__name__}")


def short(value: Any) -> str:
    """``repr`` cut to a readable length: messages echo what the client sent, not a megabyte of it."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlong = 40


def file_size(path: Any) -> int:
    try:
        return os.path.getsize(os.fspath(path))
    except (OSError, TypeError):
        return 0  # missing/odd paths fail in decoding with a clear reason
