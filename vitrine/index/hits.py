"""Search plumbing between FAISS and SQLite: query validation, and turning FAISS ids into hits.

Pure functions used by :mod:`vitrine.index.searching`: (scores, ids) become results a person reads.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass

import numpy as np

from vitrine.errors import QueryError
from vitrine.index.layout import select_in


@dataclass
class Hit:
    """One result; ``model_version`` (the encoder fingerprint id) and ``generation`` say which embedding
    space produced it."""

    key: str
    path: str
    score: float
    captions: list[str]
    metadata: dict
    model_version: str
    generation: str
    duplicates: list[str]  # other keys with identical content

    @property
    def model(self) -> str:
        """Deprecated: the old name of :attr:`model_version`."""
        return self.model_version

    def to_dict(self) -> dict:
        """The hit as JSON; ``model`` repeats ``model_version`` for existing clients (deprecated)."""
        return {**asdict(self), "model": self.model_version}


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """(n, dim) float32 unit rows; refuses wrong shapes, NaN and zero vectors."""
    q = np.asarray(queries, dtype=np.float32)
    q = q[None, :] if q.ndim == 1 else q
    if q.ndim != 2 or q.shape[1] != dim:
        raise QueryError(f"queries must have shape (n, {dim}) or ({dim},), got {q.shape}")
    norms = np.linalg.norm(q, axis=1, keepdims=True)
    if not np.isfinite(q).all() or (norms == 0).any():
        raise QueryError("queries must be finite, non-zero vectors")
    return np.ascontiguousarray(q / norms)


def assemble_hits(
    conn: sqlite3.Connection,
    generation: str,
    model: str,
    scores: np.ndarray,
    ids: np.ndarray,
    where: str,
    args: list,
) -> list[list[Hit]]:
    """FAISS (scores, ids) → hits: one per vector; the first matching key wins, the rest are duplicates."""
    sql = (
        f"SELECT vector_id, key, path, captions, metadata, {f'({where})' if where else '1'} "
        "FROM items WHERE vector_id IN ({}) ORDER BY vector_id, key"
    )
    groups: dict[int, list[tuple]] = {}
    for row in select_in(conn, sql, np.unique(ids[ids >= 0]).tolist(), args):
        groups.setdefault(row[0], []).append(row[1:])
    out: list[list[Hit]] = []
    for row_scores, row_ids in zip(scores.tolist(), ids.tolist(), strict=True):
        hits = []
        for score, vid in zip(row_scores, row_ids, strict=True):
            group = groups.get(vid, [])
            first = next((g for g in group if g[4]), None)
            if first is not None:  # else: no match, or deleted after this ANN state was taken
                dups = [g[0] for g in group if g is not first]
                hits.append(
                    Hit(
                        first[0],
                        first[1],
                        float(score),
                        json.loads(first[2]),
                        json.loads(first[3]),
                        model,
                        generation,
                        dups,
                    )
                )
        out.append(hits)
    return out
