"""A generation's reference sample: what "no drift" looks like for the items it was built from.

When a generation is built (the first build of an index, or a reindex before it is published), a
uniform random sample of its item embeddings (``size`` of them, default 5,000: enough for the
two-sample tests, which subsample further, and about 10 MB at 512 dims) is stored beside it in
``gen-NNNNNN/reference.npz`` with each item's metadata and summary statistics (mean embedding,
spread around it), so later batches and catalogs can be compared against it slice by slice. It
belongs to the generation: it is deleted with it and a reindex captures a new one, so a new model
never compares against another model's space.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitrine.drift.twosample import Sample
from vitrine.errors import StoreError
from vitrine.index import layout
from vitrine.index.atomic import write_atomic
from vitrine.index.store import IndexReader

FILE = "reference.npz"
DEFAULT_SIZE = 5000


@dataclass
class Reference:
    """The reference sample of ``generation`` (built with model fingerprint id ``model``)."""

    generation: str
    model: str
    sample: Sample
    index_count: int
    created: float

    def summary(self) -> dict:
        """Numbers shown next to drift scores: sample size, index size, spread around the centroid."""
        emb = self.sample.embeddings
        centroid = emb.mean(0) if len(emb) else np.zeros(emb.shape[1])
        spread = float(np.linalg.norm(emb - centroid, axis=1).mean()) if len(emb) else 0.0
        return {
            "generation": self.generation,
            "model": self.model,
            "size": len(emb),
            "index_count": self.index_count,
            "centroid_norm": round(float(np.linalg.norm(centroid)), 6),
            "spread": round(spread, 6),
            "created": self.created,
        }


def capture(store: IndexReader, size: int = DEFAULT_SIZE, seed: int = 0) -> Reference:
    """Sample ``size`` items of ``store``'s generation uniformly and save them beside it.

    Keys are sorted before sampling and the generator seeded, so capturing the same content twice
    gives the same sample. Works on a read-only store too, as long as the folder is writable.
    """
    keys = sorted(store.keys())
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(keys), min(size, len(keys)), replace=False)) if keys else []
    picked, embeddings = store.embeddings([keys[i] for i in chosen])
    metadata = [(store.get(k) or {}).get("metadata", {}) for k in picked]
    ref = Reference(
        generation=store.generation,
        model=str(store.fingerprint.get("id")),
        sample=Sample(embeddings.astype(np.float32), metadata),
        index_count=len(keys),
        created=time.time(),
    )
    _save(store.root / store.generation / FILE, ref, picked)
    return ref


def _save(path: Path, ref: Reference, keys: list[str]) -> None:
    info = {
        "generation": ref.generation,
        "model": ref.model,
        "index_count": ref.index_count,
        "created": ref.created,
        "summary": ref.summary(),
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        embeddings=ref.sample.embeddings,
        keys=np.array(keys, dtype=str),
        metadata=np.array([json.dumps(m, sort_keys=True) for m in ref.sample.metadata], dtype=str),
        info=np.array(json.dumps(info)),
        mean=ref.sample.embeddings.mean(0) if len(ref.sample) else np.zeros(0, np.float32),
    )
    write_atomic(path, buffer.getvalue())


def load(root: str | Path, generation: str | None = None) -> Reference | None:
    """The stored reference of ``generation`` (default: the live one), or None when none was captured."""
    root = Path(root)
    generation = generation or layout.read_current(root)
    path = root / generation / FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            info = json.loads(str(data["info"]))
            metadata = [json.loads(m) for m in data["metadata"].tolist()]
            sample = Sample(data["embeddings"].astype(np.float32), metadata)
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(
            f"reference sample {path} is unreadable ({exc}); delete it to capture a new one"
        ) from exc
    return Reference(generation, info["model"], sample, int(info["index_count"]), float(info["created"]))


def summary(root: str | Path, generation: str | None = None) -> dict | None:
    """The stored summary of a generation's reference without loading its embeddings (the app shows
    it every few seconds; the sample itself is megabytes). None when no reference was captured."""
    root = Path(root)
    path = root / (generation or layout.read_current(root)) / FILE
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:  # an .npz reads only the members asked for
            info = json.loads(str(data["info"]))
    except (OSError, ValueError, KeyError) as exc:
        raise StoreError(
            f"reference sample {path} is unreadable ({exc}); delete it to capture a new one"
        ) from exc
    if "summary" in info:
        return info["summary"]
    ref = load(root, generation)  # captured before summaries were stored with it
    return None if ref is None else ref.summary()
