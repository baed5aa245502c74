"""Which FAISS structure: the automatic choice by collection size, what a factory needs to train, the
search knobs it accepts, and the names of built structures (a snapshot file stores no factory string,
so the structure that was loaded is described in factory syntax: ``HNSW32``, ``IVF1024,SQ8``,
``OPQ16,IVF256,PQ16,RFlat``...).

The size tiers and knob defaults were chosen from measurements on a 2-core CPU at 100k-1M vectors;
the figures behind each choice are in bench/RESULTS.md ("Search latency" and "Scale").
"""

from __future__ import annotations

import re

import faiss

#: Auto choice by size. Up to FLAT_MAX: exact ``Flat`` (a scan of that many vectors is a few ms per
#: query and needs no training, so approximation would only cost recall). Up to HNSW_MAX: ``HNSW32``
#: (no training; insertion cost grows with n, so past HNSW_MAX an IVF builds faster, holds less and
#: recalls as well). Up to SQ8_MAX: ``IVF2048,SQ8``. Above: IVF_NLIST_LARGE lists scanned by 4-bit
#: fast-scan PQ (32 bytes a vector, scanned many times faster than SQ8's 512: queries land in the
#: densest lists, which at millions of vectors hold far more than n / nlist), the shortlist re-ranked by
#: SQ8 codes (``Refine(SQ8)``, :data:`FASTSCAN_K_FACTOR` candidates per result), so recall stays SQ8's.
#: Not more lists: a build costs n x nlist x dim for the coarse assignment plus k-means over ~78 x
#: nlist points, the bulk of a 10M build on 2 cores. Unrefined PQ and OPQ are left to explicit
#: requests: their recall on clustered data is poor and OPQ trains slowly (bench/RESULTS.md, "Scale").
#: Readers map large snapshots instead of reading them (ann.MMAP_MIN_BYTES), so an index may exceed RAM.
FLAT_MAX, HNSW_MAX, SQ8_MAX = 50_000, 200_000, 5_000_000
IVF_NLIST_SMALL, IVF_NLIST_LARGE = 2048, 4096
#: Auto mode steps *down* a tier only once n is below half the boundary (no rebuild ping-pong).
SHRINK_HYSTERESIS = 0.5
#: ``search_params`` knobs. ``nprobe``: IVF lists visited per query, default ``clamp(nlist // 64, 16,
#: 512)``. ``efSearch``: HNSW query beam (never below k). ``efConstruction``: HNSW build beam.
#: ``k_factor``: candidates re-ranked per result by refine indexes (``,RFlat`` / ``Refine(...)``); it
#: must grow with n, so autotune sweeps it and scales it to the collection (vitrine/index/autotune.py).
#: The defaults aim at recall@10 >= 0.95 on clustered, CLIP-like data (bench/RESULTS.md).
DEFAULT_EF_SEARCH, DEFAULT_EF_CONSTRUCTION, DEFAULT_K_FACTOR = 256, 40, 8.0
#: ``k_factor`` default for refined 4-bit fast-scan PQ (``PQ{m}x4fs``): FASTSCAN_K_FACTOR per
#: FASTSCAN_K_FACTOR_N vectors, at least that, at most FASTSCAN_K_FACTOR_MAX. 16 centroids per sub-vector
#: rank coarsely, so the true neighbours sit deep in the shortlist, and n times the vectors put about n
#: times as many ahead of them (bench/RESULTS.md: recall@10 at 1M saturated from k_factor 64-128; the
#: re-ranking of k x k_factor SQ8 codes costs about 1 ms per 1000 candidates).
FASTSCAN_K_FACTOR, FASTSCAN_K_FACTOR_N, FASTSCAN_K_FACTOR_MAX = 128.0, 1_000_000, 1024.0
PARAM_KEYS = frozenset({"nprobe", "efSearch", "efConstruction", "k_factor"})

_SQ_NAMES = {
    faiss.ScalarQuantizer.QT_8bit: "SQ8",
    faiss.ScalarQuantizer.QT_4bit: "SQ4",
    faiss.ScalarQuantizer.QT_6bit: "SQ6",
    faiss.ScalarQuantizer.QT_fp16: "SQfp16",
}


def choose_factory(n: int, dim: int) -> str:
    """The factory used when none was requested, by collection size (see FLAT_MAX and friends).

    ``dim`` sets the PQ sub-vectors of the largest tier (one per 8 dimensions, 4 bits each).
    """
    if n <= FLAT_MAX:
        return "Flat"
    if n <= HNSW_MAX:
        return "HNSW32"
    if n <= SQ8_MAX:
        return f"IVF{IVF_NLIST_SMALL},SQ8"
    return (
        f"IVF{IVF_NLIST_LARGE},PQ{dim // 8}x4fs,Refine(SQ8)" if dim % 8 == 0 else f"IVF{IVF_NLIST_LARGE},SQ8"
    )


def default_k_factor(factory: str, n: int) -> float:
    """Candidates re-ranked per result by a refine structure of n vectors (unless ``search_params`` say)."""
    if not re.search(r"PQ\d+x4fs", factory):
        return DEFAULT_K_FACTOR
    return min(FASTSCAN_K_FACTOR_MAX, max(FASTSCAN_K_FACTOR, FASTSCAN_K_FACTOR * n / FASTSCAN_K_FACTOR_N))


def auto_tier(n: int) -> int:
    """0 (Flat), 1 (HNSW), 2 (IVF, small nlist) or 3 (IVF, large nlist): the tier of n vectors."""
    return sum(n > limit for limit in (FLAT_MAX, HNSW_MAX, SQ8_MAX))


def auto_tiers(dim: int) -> list[str]:
    """The factory of each auto tier, lowest first."""
    return [choose_factory(t, dim) for t in (0, FLAT_MAX + 1, HNSW_MAX + 1, SQ8_MAX + 1)]


def min_train_size(factory: str, dim: int) -> int:
    """Vectors a factory needs to train usable (and warning-free) quantizers; 0 when it needs none.

    FAISS wants 39 points per k-means centroid: ``nlist`` for IVF, ``2**nbits`` per PQ sub-quantizer.
    """
    if faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT).is_trained:
        return 0
    need = [39 * int(n) for n in re.findall(r"IVF(\d+)", factory)]
    need += [39 * 2 ** int(bits or 8) for _m, bits in re.findall(r"PQ(\d+)(?:x(\d+))?", factory)]
    return max(need, default=1000)


def validate_factory(dim: int, factory: str) -> int:
    """ValueError unless FAISS can build ``factory`` (given without IDMap); returns its training need."""
    if factory.upper().startswith("IDMAP"):
        raise ValueError("give the factory without IDMap: ids are always mapped")
    try:
        return min_train_size(factory, dim)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise ValueError(f"FAISS cannot build factory {factory!r} for dim {dim}: {detail}") from exc


def check_params(params: dict | None) -> dict:
    """A copy of ``search_params`` with only known knobs, each a positive number (else ValueError)."""
    params = dict(params or {})
    if set(params) - PARAM_KEYS:
        raise ValueError(
            f"unknown search_params {sorted(set(params) - PARAM_KEYS)}; known: {sorted(PARAM_KEYS)}"
        )
    bad = {
        k: v for k, v in params.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0
    }
    if bad:
        raise ValueError(f"search_params must be positive numbers, got {bad}")
    return params


def describe(index: faiss.Index) -> str:
    """Factory-like name of a built structure (a snapshot file stores no factory string)."""
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexIDMap):
        return describe(idx.index)
    if isinstance(idx, faiss.IndexRefine):
        tail = "RFlat" if isinstance(idx, faiss.IndexRefineFlat) else f"Refine({describe(idx.refine_index)})"
        return f"{describe(idx.base_index)},{tail}"
    if isinstance(idx, faiss.IndexPreTransform):
        steps = [faiss.downcast_VectorTransform(idx.chain.at(i)) for i in range(idx.chain.size())]
        names = [f"OPQ{t.M}" if isinstance(t, faiss.OPQMatrix) else type(t).__name__ for t in steps]
        return ",".join([*names, describe(idx.index)])
    if isinstance(idx, faiss.IndexHNSWFlat):
        return f"HNSW{idx.hnsw.nb_neighbors(1)}"
    prefix = f"IVF{idx.nlist}," if isinstance(idx, faiss.IndexIVF) else ""
    if isinstance(idx, (faiss.IndexFlat, faiss.IndexIVFFlat)):
        return prefix + "Flat"
    if isinstance(idx, (faiss.IndexScalarQuantizer, faiss.IndexIVFScalarQuantizer)):
        return prefix + _SQ_NAMES.get(idx.sq.qtype, "SQ")
    if isinstance(idx, (faiss.IndexPQFastScan, faiss.IndexIVFPQFastScan)):
        return prefix + f"PQ{idx.pq.M}x{idx.pq.nbits}fs"
    if isinstance(idx, (faiss.IndexPQ, faiss.IndexIVFPQ)):
        return prefix + f"PQ{idx.pq.M}" + ("" if idx.pq.nbits == 8 else f"x{idx.pq.nbits}")
    return prefix + type(idx).__name__
