"""Pick a FAISS factory and its search parameters from a memory budget and a latency target, by measuring.

As autofaiss does, the choice is made on the index's *own* vectors: a random sample is split into
held-out queries and a base; each candidate structure is built on the base with :class:`AnnIndex`
(so what is measured is what will be served), its search knob swept upward (``nprobe`` / ``efSearch``;
for refine structures each ``nprobe`` with ``k_factor`` in :data:`K_FACTORS`) until recall@k against
exact search reaches ``target_recall``, and its single-query latency timed.

Scaling from the sample to the full collection (documented, not hidden): memory is estimated per
vector from each structure's code size (:func:`bytes_per_vector`) times the full count; an IVF's
``nlist`` is scaled to the full count (~4 sqrt(n), a power of two) and ``nprobe`` by the same ratio,
keeping the fraction of lists visited; a refine's ``k_factor`` linearly with n / base size
(:data:`K_FACTOR_MAX`); latency of the scanning structures (Flat, IVF) is scaled linearly with
n / base size, HNSW's by log(n) / log(base). Choice: among candidates that fit the
budget, reach the recall and meet the latency target, the smallest when a latency target is given,
else the fastest; when none qualifies, the best recall that fits (``met`` False, ``reason`` says why).

Knobs (:class:`TuneRequest`): ``target_recall`` (0.95), ``k`` (10), ``queries`` held out (200),
``max_base`` vectors the candidates are built on (50k: OPQ/PQ training dominates tuning time).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from vitrine.errors import VitrineError
from vitrine.index.ann import AnnIndex
from vitrine.index.atomic import write_atomic
from vitrine.index.factories import min_train_size
from vitrine.index.store import IndexWriter

_SWEEPS = {"nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512), "efSearch": (16, 32, 64, 128, 256, 512)}
#: Refine structures (``,RFlat``): k_factor values tried at each nprobe, smallest first. Their recall is
#: capped by how far down the coarse codes' ranking the true neighbours fall, which only k_factor
#: reaches (at 1M, IVF-PQ + RFlat stayed far below the target for every nprobe with the default 8).
#: Raising k_factor is tried before raising nprobe: re-ranking k x k_factor candidates costs
#: k x k_factor x dim flops, a fraction of scanning more lists.
K_FACTORS = (8, 16, 32, 64, 128, 256)
#: The chosen k_factor is scaled like the collection (x n / sample size, at most this): with n times
#: more points, about n times more of them fall within the code's error of a true neighbour and get
#: ranked ahead of it: 10x the vectors needed about 10x the k_factor for the same recall
#: (bench/RESULTS.md, "Scale", IVF-PQ + RFlat with k_factor swept).
K_FACTOR_MAX = 2048
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1e3,
    "kb": 1e3,
    "m": 1e6,
    "mb": 1e6,
    "g": 1e9,
    "gb": 1e9,
    "t": 1e12,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


class TuningError(VitrineError):
    """Auto-tuning was asked for something it cannot do (bad budget text, too few vectors)."""


def parse_bytes(text: str) -> int:
    """Bytes in ``2GB``, ``512MiB``, ``1.5g`` or a plain number."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = _UNITS.get(m.group(2).lower()) if m else None
    if not m or unit is None:
        raise TuningError(f"invalid memory budget {text!r}: use e.g. 2GB, 512MB or 1GiB")
    return int(float(m.group(1)) * unit)


def parse_ms(text: str) -> float:
    """Milliseconds in ``10ms``, ``0.5s``, ``250us`` or a plain number (ms)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|us)?\s*", str(text))
    if not m or float(m.group(1)) <= 0:
        raise TuningError(f"invalid latency target {text!r}: use e.g. 10ms or 0.5s")
    return float(m.group(1)) * {"ms": 1.0, "s": 1000.0, "us": 0.001, None: 1.0}[m.group(2)]


@dataclass
class TuneRequest:
    """What to optimise for; see the module docstring for the knobs."""

    memory_budget: int | None = None
    latency_ms: float | None = None
    target_recall: float = 0.95
    k: int = 10
    queries: int = 200
    max_base: int = 50_000
    seed: int = 0


@dataclass
class Candidate:
    """One measured structure: the factory for the full collection, and its numbers."""

    factory: str
    search_params: dict
    recall: float
    latency_ms: float
    bytes_per_vector: float
    estimated_bytes: int
    build_seconds: float


@dataclass
class TuneResult:
    """The choice, whether it met every constraint, and every candidate measured (for the manifest)."""

    factory: str
    search_params: dict
    met: bool
    reason: str
    n: int
    sample: int
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: ~4 sqrt(n) as a power of two, >= 16, at most n / 39 (FAISS' minimum)."""
    want = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(max(n, 1)))))
    return int(max(1, min(want, 2 ** int(math.log2(max(n // 39, 1))))))


def pq_m(dim: int) -> int:
    """PQ sub-quantizers: 32 where the dimension allows (dim/4 otherwise), dividing dim."""
    m = min(32, max(1, dim // 4))
    while dim % m:
        m -= 1
    return m


def candidates(n: int, dim: int) -> list[str]:
    """Factories tried for n vectors (with ``{nlist}`` left to fill in for the size built).

    OPQ + PQ + RFlat rotates (and, past ``4 m`` dimensions, reduces) the vectors before PQ: at 1M it
    reached full recall faster than plain PQ + RFlat for the same memory, though its training makes a
    build slow whatever the sample size (bench/RESULTS.md, "Scale").
    """
    m = pq_m(dim)
    return [
        "Flat",
        "HNSW32",
        "IVF{nlist},SQ8",
        f"IVF{{nlist}},PQ{m},RFlat",
        f"OPQ{m}_{min(dim, 4 * m)},IVF{{nlist}},PQ{m},RFlat",
        f"IVF{{nlist}},PQ{m}",
    ]


def bytes_per_vector(factory: str, dim: int) -> float:
    """Estimated resident bytes per vector: codes + 8 (id in lists / id map) + 16 (id map's reverse map)."""
    base = 24.0
    if factory.startswith("HNSW"):
        return base + 4 * dim + 8 * int(re.findall(r"HNSW(\d+)", factory)[0]) + 16
    pq = re.findall(r"PQ(\d+)", factory)
    codes = float(pq[0]) if pq else dim if "SQ8" in factory else 4 * dim
    if "RFlat" in factory:
        codes += 4 * dim
    return base + codes + (8 if "IVF" in factory else 0)


def _fixed_bytes(factory: str, dim: int) -> int:
    lists = re.findall(r"IVF(\d+)", factory)
    rotation = re.findall(r"^OPQ\d+_(\d+)", factory)
    return 4 * dim * (int(lists[0]) if lists else 0) + (4 * dim * int(rotation[0]) if rotation else 0)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[f >= 0]) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def _latency_ms(ann: AnnIndex, queries: np.ndarray, k: int) -> float:
    times = []
    for q in queries[: min(len(queries), 100)]:
        start = time.perf_counter()
        ann.search(q[None, :], k)
        times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def _measure(
    template: str, base: np.ndarray, queries: np.ndarray, truth: np.ndarray, n: int, req: TuneRequest
) -> Candidate | None:
    dim = base.shape[1]
    built = template.format(nlist=nlist_for(len(base)))
    if min_train_size(built, dim) > len(base):
        return None  # too few vectors to train this structure on the sample
    full = template.format(nlist=nlist_for(n))
    ann, start = AnnIndex(dim, built), time.perf_counter()
    ann.rebuild(np.arange(len(base), dtype=np.int64), base)
    build_seconds = time.perf_counter() - start
    knob = "nprobe" if "IVF" in built else "efSearch" if built.startswith("HNSW") else None
    values = [v for v in _SWEEPS.get(knob, (0,)) if knob != "nprobe" or v <= nlist_for(len(base))]
    factors = K_FACTORS if "RFlat" in built or "Refine" in built else (None,)
    grid = [{knob: v} if knob else {} for v in values]
    grid = [{**p, "k_factor": f} if f else p for p in grid for f in factors]
    for params in grid:
        ann.search_params = params
        recall = _recall(ann.search(queries, req.k)[1], truth)
        if recall >= req.target_recall:
            break
    params = dict(ann.search_params)
    if knob == "nprobe":
        params["nprobe"] = max(1, round(params["nprobe"] * nlist_for(n) / nlist_for(len(base))))
    if "k_factor" in params and n > len(base):
        params["k_factor"] = min(K_FACTOR_MAX, math.ceil(params["k_factor"] * n / len(base)))
    scale = (
        1.0 if n <= len(base) else math.log(n) / math.log(len(base)) if knob == "efSearch" else n / len(base)
    )
    per = bytes_per_vector(full, dim)
    return Candidate(
        full,
        params,
        round(recall, 4),
        round(_latency_ms(ann, queries, req.k) * scale, 3),
        per,
        int(per * n + _fixed_bytes(full, dim)),
        round(build_seconds, 2),
    )


def tune(vectors: np.ndarray, n: int, req: TuneRequest) -> TuneResult:
    """Choose for a collection of ``n`` vectors, measuring on ``vectors`` (a random sample of it)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(vectors) < req.queries + 10 * req.k:
        raise TuningError(
            f"auto-tuning needs at least {req.queries + 10 * req.k} vectors, has {len(vectors)}"
        )
    order = np.random.default_rng(req.seed).permutation(len(vectors))
    queries = vectors[order[: req.queries]]
    base = vectors[order[req.queries : req.queries + req.max_base]]
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    truth = exact.search(queries, req.k)[1]
    measured = [c for t in candidates(n, base.shape[1]) if (c := _measure(t, base, queries, truth, n, req))]
    if not measured:
        raise TuningError(f"no candidate structure can be trained on {len(base)} vectors")
    return _choose(measured, n, len(base), req)


def _choose(measured: list[Candidate], n: int, sample: int, req: TuneRequest) -> TuneResult:
    fits = [c for c in measured if req.memory_budget is None or c.estimated_bytes <= req.memory_budget]
    good = [c for c in fits if c.recall >= req.target_recall]
    fast = [c for c in good if req.latency_ms is None or c.latency_ms <= req.latency_ms]
    if fast:
        key = (lambda c: (c.estimated_bytes, c.latency_ms)) if req.latency_ms else (lambda c: c.latency_ms)
        best, met, reason = min(fast, key=key), True, "meets the budget, recall and latency"
    elif good:
        best, met = min(good, key=lambda c: c.latency_ms), False
        reason = f"nothing within {req.latency_ms} ms at recall {req.target_recall}: the fastest that fits"
    elif fits:
        best, met = max(fits, key=lambda c: c.recall), False
        reason = f"nothing reaches recall@{req.k} {req.target_recall} within the budget: the best recall"
    else:
        best, met = min(measured, key=lambda c: c.estimated_bytes), False
        reason = f"nothing fits {req.memory_budget} bytes: the smallest structure"
    return TuneResult(best.factory, best.search_params, met, reason, n, sample, measured)


def tune_store(store: IndexWriter, req: TuneRequest) -> TuneResult:
    """Tune on a sample of the store's own vectors, record the choice in the manifest (``factory``,
    ``search_params``, ``autotune``) and rebuild the ANN with it (one training on all vectors)."""
    keys = sorted(store.keys())
    rng = np.random.default_rng(req.seed)
    take = min(len(keys), req.queries + req.max_base)
    sample = [keys[i] for i in np.sort(rng.choice(len(keys), size=take, replace=False))] if keys else []
    _, vectors = store.embeddings(sample)
    result = tune(vectors, len(keys), req)
    manifest = store.manifest  # the live dict: flush() reads factory/search_params from it
    manifest.update(factory=result.factory, search_params=result.search_params, autotune=result.to_dict())
    path = store.root / store.generation / "manifest.json"
    write_atomic(path, _manifest_json(manifest))
    store.flush(retrain=True)
    return result


def _manifest_json(manifest: dict) -> bytes:
    import json

    return json.dumps(manifest, indent=2, sort_keys=True).encode()
