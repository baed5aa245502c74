"""Auto-tuning picks a factory that reaches the requested recall on held-out vectors, within the budget."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from vitrine.index import autotune
from vitrine.index.ann import AnnIndex
from vitrine.index.autotune import (
    TuneRequest,
    TuningError,
    bytes_per_vector,
    parse_bytes,
    parse_ms,
    tune,
    tune_store,
)
from vitrine.index.store import IndexStore, NewItem


def clustered(n: int, dim: int, seed: int = 0, clusters: int = 30) -> np.ndarray:
    """A Gaussian mixture on the unit sphere (CLIP-like: clustered, normalised)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_parsers() -> None:
    assert parse_bytes("2GB") == 2_000_000_000 and parse_bytes("1GiB") == 2**30 and parse_bytes("512") == 512
    assert parse_ms("10ms") == 10.0 and parse_ms("0.5s") == 500.0 and parse_ms("7") == 7.0
    for bad in ("lots", "-1GB"):
        with pytest.raises(TuningError, match=f"invalid memory budget '{bad}'"):
            parse_bytes(bad)
    with pytest.raises(TuningError, match="invalid latency target 'fast'"):
        parse_ms("fast")


def _independent_recall(factory: str, params: dict, data: np.ndarray, k: int = 10) -> float:
    """Recall of the choice on queries that tuning never saw (the last 100 rows)."""
    base, queries = data[:-100], data[-100:]
    ann = AnnIndex(data.shape[1], factory, params)
    ann.rebuild(np.arange(len(base)), base)
    exact = faiss.IndexFlatIP(data.shape[1])
    exact.add(base)
    truth, found = exact.search(queries, k)[1], ann.search(queries, k)[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)]))


def test_choice_meets_the_requested_recall_on_held_out_queries() -> None:
    data = clustered(6100, 32)
    result = tune(data[:-100], 6000, TuneRequest(latency_ms=1000.0, target_recall=0.9, queries=100))
    assert result.met, result.reason
    chosen = next(c for c in result.candidates if c.factory == result.factory)
    assert chosen.recall >= 0.9
    assert _independent_recall(result.factory, result.search_params, data) >= 0.85  # fresh queries, noise
    # with a latency target, the smallest structure that qualifies wins
    qualifying = [c for c in result.candidates if c.recall >= 0.9 and c.latency_ms <= 1000.0]
    assert chosen.estimated_bytes == min(c.estimated_bytes for c in qualifying)


def test_memory_budget_is_respected() -> None:
    data = clustered(6000, 32, seed=1)
    budget = int(6000 * bytes_per_vector("IVF64,SQ8", 32) + 64 * 32 * 4 * 2)  # room for SQ8, not floats
    result = tune(data, 6000, TuneRequest(memory_budget=budget, target_recall=0.8, queries=100))
    assert result.factory.startswith("IVF") and result.factory.endswith("SQ8"), result
    chosen = next(c for c in result.candidates if c.factory == result.factory)
    assert chosen.estimated_bytes <= budget and "nprobe" in result.search_params
    assert {c.factory for c in result.candidates} >= {"Flat", "HNSW32"}  # measured, but too big


def test_too_few_vectors_is_a_clear_error() -> None:
    with pytest.raises(TuningError, match="at least"):
        tune(clustered(50, 8), 50, TuneRequest())


def test_tune_store_records_the_choice_in_the_manifest(tmp_path: Path) -> None:
    data = clustered(3000, 16, seed=2)
    fp = {"id": "m", "model": "m", "dim": 16}
    store = IndexStore.create(tmp_path / "idx", fp)
    store.write(
        items=[NewItem(f"k{i:05d}", f"/p/{i}", f"s{i}", 1, 1, embedding=v) for i, v in enumerate(data)]
    )
    result = tune_store(store, TuneRequest(memory_budget=3000 * 60, target_recall=0.8, queries=100))
    store.close()
    manifest = IndexStore.read_manifest(tmp_path / "idx")
    assert manifest["factory"] == result.factory and manifest["search_params"] == result.search_params
    assert manifest["autotune"]["met"] == result.met
    reopened = IndexStore.open(tmp_path / "idx")
    stats = reopened.stats()
    reopened.close()
    assert stats["effective_factory"] == result.factory and 0 < stats["bytes_per_vector"] < 16 * 4


def test_refine_structures_sweep_k_factor_with_nprobe(monkeypatch: pytest.MonkeyPatch) -> None:
    """Coarse 4-bit PQ codes rank the true neighbours too low for the default k_factor 8 (recall@10
    ~0.79 here whatever nprobe); sweeping k_factor reaches the target and records it."""
    monkeypatch.setattr(autotune, "candidates", lambda n, dim: ["IVF{nlist},PQ4x4,RFlat"])
    data = clustered(6100, 32)
    result = tune(data[:-100], 5900, TuneRequest(target_recall=0.95, queries=100))  # n = the base: unscaled
    assert result.met and result.factory == "IVF128,PQ4x4,RFlat", result
    assert result.search_params["k_factor"] > 8 and "nprobe" in result.search_params
    assert _independent_recall(result.factory, result.search_params, data) >= 0.9
    # for a 10x larger collection, k_factor grows 10x with it (capped), like the impostors ahead of a hit
    bigger = tune(data[:-100], 59_000, TuneRequest(target_recall=0.95, queries=100))
    want = min(autotune.K_FACTOR_MAX, 10 * result.search_params["k_factor"])
    assert bigger.search_params["k_factor"] == want
    monkeypatch.setattr(autotune, "K_FACTORS", (8,))
    capped = tune(data[:-100], 6000, TuneRequest(target_recall=0.95, queries=100))
    assert not capped.met and capped.candidates[0].recall < 0.9


def test_opq_refine_candidate_is_measured_and_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default candidates include OPQ + IVF-PQ + RFlat; alone, it is built, swept and qualifies."""
    assert "OPQ8_32,IVF{nlist},PQ8,RFlat" in autotune.candidates(10**6, 32)
    monkeypatch.setattr(autotune, "candidates", lambda n, dim: ["OPQ8_16,IVF{nlist},PQ8,RFlat"])
    data = clustered(10_200, 32)
    result = tune(data[:-100], 10_000, TuneRequest(target_recall=0.95, queries=100))
    assert result.met and result.factory == "OPQ8_16,IVF256,PQ8,RFlat", result
    with pytest.raises(autotune.TuningError, match="can be trained"):  # OPQ's 8-bit PQ needs 9,984
        tune(data[:6000], 5900, TuneRequest(target_recall=0.95, queries=100))
