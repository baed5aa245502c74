"""GPU FAISS where it exists (faiss-gpu, requirements-gpu.txt), the CPU everywhere else.

What runs on the GPUs: k-means training of IVF coarse quantizers (the slow part of building an IVF at
millions of vectors: each iteration assigns every training vector to its nearest centroid), through
FAISS' ``clustering_index`` hook with a flat index cloned onto all GPUs; and the searches of
:class:`~vitrine.index.ann.AnnIndex` that a GPU clone can answer (:class:`GpuSearcher`; which ones:
:func:`cpu_only_reason`). Indexes are always *saved* from the CPU structure, so a snapshot written on a
GPU machine opens on any machine. With faiss-cpu (no ``get_num_gpus`` GPUs) every function here is a
no-op or returns None, and callers keep their CPU path, unchanged.

Knob: ``VITRINE_FAISS_GPU=0`` turns GPU use off even where GPUs exist (e.g. the encoder needs them).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import faiss
import numpy as np

#: GPU FAISS selects at most this many results per query and visits at most this many IVF lists
#: (GPU_MAX_SELECTION_K in faiss 1.15); larger searches stay on the CPU.
GPU_MAX_K = 2048


def gpu_count() -> int:
    """GPUs FAISS can use here: 0 with faiss-cpu, without CUDA devices, or with VITRINE_FAISS_GPU=0."""
    if os.environ.get("VITRINE_FAISS_GPU", "1").strip().lower() in ("0", "false", "no", "off"):
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    try:
        return int(get()) if get is not None else 0
    except RuntimeError:  # a CUDA build without a usable driver
        return 0


def _ivf_levels(index: faiss.Index) -> list[faiss.IndexIVF]:
    """IVF structures inside a (wrapped) index: IDMap, PreTransform (OPQ) and Refine are walked."""
    found, todo = [], [index]
    while todo:
        idx = faiss.downcast_index(todo.pop())
        if isinstance(idx, faiss.IndexIVF):
            found.append(idx)
        elif isinstance(idx, faiss.IndexRefine):
            todo.append(idx.base_index)
        elif isinstance(idx, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            todo.append(idx.index)
    return found


@contextlib.contextmanager
def gpu_training(index: faiss.Index) -> Iterator[bool]:
    """Within the block, ``index.train`` runs its IVF k-means on all GPUs; yields whether it does.

    The clustering index only finds nearest centroids during training; the trained quantizer stays
    the CPU one, so nothing GPU-specific is left in the structure afterwards.
    """
    levels = _ivf_levels(index) if gpu_count() else []
    helpers = []
    for ivf in levels:
        helper = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(ivf.d))
        ivf.clustering_index = helper
        helpers.append(helper)
    try:
        yield bool(levels)
    finally:
        for ivf in levels:
            ivf.clustering_index = None


def clone_to_gpus(index: faiss.Index, shard: bool = True) -> faiss.Index | None:
    """A copy of ``index`` spread over all GPUs (``shard``: each holds a part; else each holds all,
    for more QPS), or None where there are no GPUs or FAISS cannot place this structure on them
    (HNSW and refine wrappers stay on the CPU)."""
    if not gpu_count():
        return None
    options = faiss.GpuMultipleClonerOptions()
    options.shard = shard
    try:
        return faiss.index_cpu_to_all_gpus(index, options)
    except RuntimeError:
        return None


def to_cpu(index: faiss.Index) -> faiss.Index:
    """The CPU form of a (possibly GPU) index: what gets saved, whatever trained or filled it."""
    if gpu_count() and hasattr(faiss, "index_gpu_to_cpu"):
        with contextlib.suppress(RuntimeError):
            return faiss.index_gpu_to_cpu(index)
    return index


def cpu_only_reason(index: faiss.Index, *, filtered: bool, k: int, nprobe: int | None = None) -> str | None:
    """Why a search of ``index`` (an IndexIDMap2 over the structure) must run on the CPU, or None when a
    GPU clone may answer it.

    CPU-only: no GPU; any id selector (a filter, or soft-deleted slots to skip): classic faiss-gpu
    *ignores* ``SearchParameters.sel`` instead of refusing it (faiss issue #3924), so a GPU answer
    would hold filtered-out or deleted ids; HNSW (no GPU form); refine wrappers (the re-ranking reads
    the CPU refine codes; a GPU base under a CPU refine is possible but untested here); k or nprobe
    above :data:`GPU_MAX_K`. Structures the GPU cloner still refuses (e.g. fast-scan PQ) are caught
    when cloning, by :class:`GpuSearcher`.
    """
    if not gpu_count():
        return "no GPU visible to FAISS"
    if filtered:
        return "id selector (filter or soft-deleted slots): faiss-gpu would ignore it"
    parts, todo = [], [index]
    while todo:
        part = faiss.downcast_index(todo.pop())
        parts.append(part)
        if isinstance(part, faiss.IndexRefine):
            todo.append(part.base_index)
        elif isinstance(part, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            todo.append(part.index)
    if any(isinstance(p, faiss.IndexHNSW) for p in parts):
        return "HNSW has no GPU form"
    if any(isinstance(p, faiss.IndexRefine) for p in parts):
        return "refine stage re-ranks from CPU codes"
    if k > GPU_MAX_K or (nprobe or 0) > GPU_MAX_K:
        return f"k or nprobe above {GPU_MAX_K}"
    return None


class GpuSearcher:
    """A GPU clone of one index's structure (what sits under its IndexIDMap2), made by the first search
    :func:`cpu_only_reason` allows and dropped by :meth:`invalidate` whenever the CPU structure
    changes (add, remove, rebuild): the next search re-clones, one host-to-device copy of the codes,
    which is simpler and safer than mirroring every change onto the clone. A structure the cloner
    refuses is remembered (until the next invalidate) so that each search does not retry it.
    """

    def __init__(self) -> None:
        self._clone: faiss.Index | None = None
        self._refused = False
        self._lock = threading.Lock()  # one GPU search at a time: GPU resources are not thread-safe

    def invalidate(self) -> None:
        with self._lock:
            self._clone, self._refused = None, False

    def search(
        self, index: faiss.Index, queries: np.ndarray, k: int, params: faiss.SearchParameters, filtered: bool
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """(scores, external ids) like ``index.search``, from the GPU clone; None: search on the CPU.

        ``params`` are the CPU search parameters; their ``nprobe`` (when IVF) is set on the clone.
        """
        nprobe = getattr(params, "nprobe", None)
        if cpu_only_reason(index, filtered=filtered, k=k, nprobe=nprobe) is not None:
            return None
        with self._lock:
            if self._clone is None and not self._refused:
                self._clone = clone_to_gpus(faiss.downcast_index(index.index))
                if self._clone is not None and nprobe is not None:
                    try:
                        faiss.GpuParameterSpace().set_index_parameter(self._clone, "nprobe", int(nprobe))
                    except RuntimeError:
                        self._clone = None
                self._refused = self._clone is None
            if self._clone is None:
                return None
            if nprobe is not None:  # search_params may differ between calls (autotune sweeps them)
                faiss.GpuParameterSpace().set_index_parameter(self._clone, "nprobe", int(nprobe))
            dist, pos = self._clone.search(queries, k)
        id_map = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())
        return dist, np.where(pos >= 0, id_map[np.maximum(pos, 0)], -1)
