"""Refusals: how the web app says no. Every refusal is a :class:`RequestRefused` whose ``reason`` is the
``errors_total`` metric label and whose message tells a person what to change.

Client values are validated in the core, once (:func:`vitrine.search.query.parse_query`); the core's
typed errors become refusals here (:func:`translate`), keeping their reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

from vitrine.errors import ImageDecodeError, QueryError, StoreError, VitrineError
from vitrine.search import filters

_T = TypeVar("_T")


class RequestRefused(VitrineError):
    """A request the service will not answer; ``reason`` is the metric label, the message is for people."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def translate(call: Callable[[], _T]) -> _T:
    """Core errors → RequestRefused with a reason label."""
    try:
        return call()
    except ImageDecodeError as exc:
        raise RequestRefused("bad_image", f"cannot read the uploaded image: {exc.reason}") from None
    except QueryError as exc:
        raise RequestRefused(exc.reason, str(exc)) from None
    except StoreError as exc:
        raise RequestRefused("index_unavailable", str(exc)) from None


def normalise_filters(value: Any) -> dict[str, Any]:
    """A client's filters as one filter object (``vitrine.search.filters.filter_object``)."""
    return translate(lambda: filters.filter_object(value))


def file_size(path: Any) -> int:
    try:
        return os.path.getsize(os.fspath(path))
    except (OSError, TypeError):
        return 0  # missing/odd paths fail in decoding with a clear reason
