"""GPU FAISS where it exists (faiss-gpu, requirements-gpu.txt), the CPU everywhere else.

What runs on the GPUs: k-means training of IVF coarse quantizers (the slow part of building an IVF at
millions of vectors: each iteration assigns every training vector to its nearest centroid), through
FAISS' ``clustering_index`` hook with a flat index cloned onto all GPUs; and batch searches of a
structure cloned with :func:`clone_to_gpus`. Indexes are always *saved* from the CPU structure, so a
snapshot written on a GPU machine opens on any machine. With faiss-cpu (no ``get_num_gpus`` GPUs)
every function here is a no-op or returns None, and callers keep their CPU path.

Knob: ``VITRINE_FAISS_GPU=0`` turns GPU use off even where GPUs exist (e.g. the encoder needs them).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import faiss


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
