"""What every indexer subcommand shares: how it reports a fatal error and how it prints its result.

Here rather than in :mod:`indexer.cli` so that subcommand modules (reindex, drift) and the dispatcher
import one small module instead of each other.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from vitrine.config import DEFAULT_INDEX

INDEX_HELP = f"index directory (default: $VITRINE_INDEX or {DEFAULT_INDEX})"


def fail(message: str) -> int:
    """One ``error: ...`` line on stderr; the exit status of a fatal problem."""
    print(f"error: {message}", file=sys.stderr)
    return 1


def emit(payload: dict[str, Any], as_json: bool, text: Callable[[dict[str, Any]], str]) -> None:
    """The command's result on stdout: one JSON object with ``--json``, else its human-readable text."""
    print(json.dumps(payload, ensure_ascii=False) if as_json else text(payload))
