"""GPU FAISS paths fall back to the CPU cleanly; their GPU side runs only where faiss-gpu sees a GPU.
Memory-mapped snapshots search exactly like loaded ones."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from vitrine import gpu
from vitrine.ann import AnnIndex

needs_gpu = pytest.mark.skipif(
    gpu.gpu_count() == 0,
    reason="no GPU visible to FAISS (faiss-cpu installed, or no CUDA device): see requirements-gpu.txt",
)


def _data(n: int = 4000, dim: int = 32) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_cpu_fallback_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITRINE_FAISS_GPU", "0")
    assert gpu.gpu_count() == 0
    index = faiss.index_factory(32, "IDMap2,IVF16,SQ8", faiss.METRIC_INNER_PRODUCT)
    with gpu.gpu_training(index) as on_gpu:
        index.train(_data())
    assert on_gpu is False and index.is_trained
    assert gpu.clone_to_gpus(index) is None and gpu.to_cpu(index) is index


def test_ivf_levels_are_found_through_wrappers() -> None:
    index = faiss.index_factory(32, "IDMap2,OPQ8_32,IVF16,PQ8,RFlat", faiss.METRIC_INNER_PRODUCT)
    levels = gpu._ivf_levels(index)
    assert len(levels) == 1 and levels[0].nlist == 16


@needs_gpu
def test_gpu_training_and_search_match_the_cpu(tmp_path: Path) -> None:
    data = _data(20000, 64)
    ann = AnnIndex(64, "IVF64,Flat", {"nprobe": 64})  # every list: exact, so CPU and GPU must agree
    ann.rebuild(np.arange(len(data)), data)
    ann.save(tmp_path / "index.faiss")  # saved in the CPU format after GPU training
    cpu = faiss.read_index(str(tmp_path / "index.faiss"))
    clone = gpu.clone_to_gpus(faiss.downcast_index(cpu.index))
    assert clone is not None
    faiss.ParameterSpace().set_index_parameter(clone, "nprobe", 64)
    want = ann.search(data[:20], 5)[1]
    got = faiss.vector_to_array(cpu.id_map)[clone.search(data[:20], 5)[1]]
    assert (got == want).mean() > 0.99


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "HNSW16"])
def test_mmap_snapshot_searches_like_a_loaded_one(tmp_path: Path, factory: str) -> None:
    data = _data()
    ann = AnnIndex(32, factory, {"nprobe": 4})
    ann.rebuild(np.arange(len(data)), data)
    ann.save(tmp_path / "index.1.faiss")
    loaded = AnnIndex.load(tmp_path / "index.1.faiss", {"nprobe": 4}, factory)
    mapped = AnnIndex.load(tmp_path / "index.1.faiss", {"nprobe": 4}, factory, mmap=True)
    assert mapped.effective_factory == loaded.effective_factory
    np.testing.assert_array_equal(mapped.search(data[:50], 10)[1], loaded.search(data[:50], 10)[1])


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8", "HNSW16"])
def test_mapped_index_copies_itself_before_the_first_write(tmp_path: Path, factory: str) -> None:
    """Growing or compacting mapped codes aborts the process inside FAISS: add/remove must copy first."""
    data = _data()
    ann = AnnIndex(32, factory, {"nprobe": 16})
    ann.rebuild(np.arange(3000), data[:3000])
    ann.save(tmp_path / "index.1.faiss")
    mapped = AnnIndex.load(tmp_path / "index.1.faiss", {"nprobe": 16}, factory, mmap=True)
    mapped.remove(np.arange(10))  # soft delete (no copy) or, for Flat, a compacting one (copy)
    assert mapped.mapped == (factory != "Flat")
    mapped.add(np.arange(3000, 4000), data[3000:])
    ann.remove(np.arange(10))
    ann.add(np.arange(3000, 4000), data[3000:])
    assert not mapped.mapped and mapped.ntotal == ann.ntotal == 3990
    np.testing.assert_array_equal(mapped.search(data[::40], 10)[1], ann.search(data[::40], 10)[1])
