"""GPU FAISS paths fall back to the CPU cleanly; their GPU side runs only where faiss-gpu sees a GPU.
Memory-mapped snapshots search exactly like loaded ones."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from vitrine.index import gpu
from vitrine.index.ann import AnnIndex

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


def _ann(factory: str, n: int = 3000) -> tuple[AnnIndex, np.ndarray]:
    data = _data(n)
    ann = AnnIndex(32, factory, {"nprobe": 16})
    ann.rebuild(np.arange(n) * 7, data)  # ids are not positions: the GPU answer must be mapped back
    return ann, data


def test_cpu_only_reason_decides_per_structure_and_search(monkeypatch: pytest.MonkeyPatch) -> None:
    flat, ivf_sq, ivf_flat, hnsw = (_ann(f)[0]._index for f in ("Flat", "IVF16,SQ8", "IVF16,Flat", "HNSW16"))
    refine = faiss.index_factory(32, "IDMap2,IVF16,PQ8,RFlat", faiss.METRIC_INNER_PRODUCT)
    assert gpu.cpu_only_reason(flat, filtered=False, k=10) == "no GPU visible to FAISS"
    monkeypatch.setattr(gpu, "gpu_count", lambda: 1)
    for index in (flat, ivf_sq, ivf_flat):
        assert gpu.cpu_only_reason(index, filtered=False, k=10, nprobe=16) is None
    assert "selector" in gpu.cpu_only_reason(flat, filtered=True, k=10)
    assert "2048" in gpu.cpu_only_reason(flat, filtered=False, k=4096)
    assert "2048" in gpu.cpu_only_reason(ivf_sq, filtered=False, k=10, nprobe=4096)
    assert "HNSW" in gpu.cpu_only_reason(hnsw, filtered=False, k=10)
    assert "refine" in gpu.cpu_only_reason(refine, filtered=False, k=10)


def test_search_uses_the_clone_only_when_allowed_and_reclones_after_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The GPU path's bookkeeping on the CPU: a CPU copy stands in for the GPU clone."""
    (ann, data), (ann2, data2), (ann3, data3) = _ann("Flat"), _ann("IVF16,SQ8"), _ann("Flat")
    want = ann.search(data[:20], 10)  # no GPU: plain CPU search
    assert ann._gpu._clone is None and not ann._gpu._refused
    clones: list[faiss.Index] = []

    def fake_clone(index: faiss.Index) -> faiss.Index:
        clones.append(faiss.clone_index(index))
        return clones[-1]

    monkeypatch.setattr(gpu, "gpu_count", lambda: 1)
    monkeypatch.setattr(gpu, "clone_to_gpus", fake_clone)
    got = ann.search(data[:20], 10)
    assert len(clones) == 1
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    ann.search(data[:5], 3)
    assert len(clones) == 1  # reused
    filtered = ann.search(data[:5], 3, allowed_ids=np.arange(0, 21000, 14))
    assert len(clones) == 1 and (filtered[1] % 14 == 0).all()  # the CPU answered the filtered search
    ann.add(np.array([1]), data[:1])
    assert set(ann.search(data[:1], 2)[1][0]) == {0, 1} and len(clones) == 2  # re-cloned after add
    ann2.remove(np.array([7]))
    assert 7 not in ann2.search(data2[:5], 3)[1]
    assert len(clones) == 2  # soft-deleted slots need a selector: CPU
    monkeypatch.setattr(gpu, "clone_to_gpus", lambda index: None)  # a structure the cloner refuses
    np.testing.assert_array_equal(ann3.search(data3[:5], 3)[1], want[1][:5, :3])
    assert ann3._gpu._refused


@needs_gpu
def test_gpu_search_matches_the_cpu_and_filters_stay_exact() -> None:
    data = _data(20000, 64)
    ann = AnnIndex(64, "IVF64,Flat", {"nprobe": 64})  # every list: exact on both sides
    ann.rebuild(np.arange(len(data)) * 3, data)
    gpu_scores, gpu_ids = ann.search(data[:50], 10)
    assert ann._gpu._clone is not None
    ann._gpu._refused, clone, ann._gpu._clone = True, ann._gpu._clone, None  # force the CPU path
    cpu_scores, cpu_ids = ann.search(data[:50], 10)
    ann._gpu._refused, ann._gpu._clone = False, clone
    assert (gpu_ids == cpu_ids).mean() > 0.99
    np.testing.assert_allclose(gpu_scores, cpu_scores, atol=1e-4)
    allowed = np.arange(0, 60000, 6)
    assert (ann.search(data[:50], 10, allowed_ids=allowed)[1] % 6 == 0).all()
