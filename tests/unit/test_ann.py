"""AnnIndex against real FAISS: exactness of each family, recall of the approximate ones with default
knobs, id filtering, removal, persistence, the too-little-data fallback and the auto thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vitrine.errors import StoreError
from vitrine.index.ann import AnnIndex, exact_search
from vitrine.index.factories import (
    DEFAULT_K_FACTOR,
    FASTSCAN_K_FACTOR,
    FASTSCAN_K_FACTOR_MAX,
    FASTSCAN_K_FACTOR_N,
    FLAT_MAX,
    HNSW_MAX,
    IVF_NLIST_LARGE,
    SQ8_MAX,
    choose_factory,
    default_k_factor,
    min_train_size,
)

DIM = 64


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def clustered(n: int, nq: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mixture of Gaussians on a 16-d subspace plus a little isotropic noise, normalised: anisotropic
    and clustered like real image embeddings (and as hard for quantizers as that)."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((DIM, 16)))[0].T
    centres = rng.standard_normal((100, 16))

    def draw(m: int) -> np.ndarray:
        z = centres[rng.integers(0, 100, m)] + 0.35 * rng.standard_normal((m, 16))
        return normalised(z @ basis + 0.05 * rng.standard_normal((m, DIM)))

    return draw(n), draw(nq)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """20k vectors with sparse, non-contiguous ids, 100 queries and their exact top-10 ids."""
    x, q = clustered(20_000, 100)
    ids = np.arange(len(x), dtype=np.int64) * 7 + 3
    truth = ids[np.argsort(-(q @ x.T), axis=1)[:, :10]]
    return ids, x, q, truth


@pytest.fixture(scope="module")
def random_data() -> tuple[np.ndarray, np.ndarray]:
    """3000 well-separated vectors: enough to train the small test factories (4-bit PQ: 39 x 16)."""
    x = normalised(np.random.default_rng(1).standard_normal((3000, DIM)))
    return np.arange(3000, dtype=np.int64) + 100, x


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / truth.shape[1] for f, t in zip(found, truth, strict=True)]))


FAMILIES = ["Flat", "HNSW32", "IVF16,Flat", "IVF16,SQ8", "IVF16,PQ32x4fs,RFlat", "IVF16,PQ16x4,Refine(SQ8)"]


@pytest.mark.parametrize("factory", FAMILIES)
def test_each_family_returns_the_stored_vector_first(factory: str, random_data: tuple) -> None:
    ids, x = random_data
    index = AnnIndex(DIM, factory)
    index.rebuild(ids, x)
    assert index.effective_factory == factory and index.fallback_reason is None
    scores, found = index.search(x[:50], 5)
    assert found.shape == scores.shape == (50, 5)
    assert (found[:, 0] == ids[:50]).all()
    assert np.allclose(scores[:, 0], 1.0, atol=0.05)


@pytest.mark.parametrize("factory", ["HNSW32", "IVF64,SQ8", "IVF64,PQ64x4fs,RFlat"])
def test_recall_at_10_with_default_knobs(factory: str, data: tuple) -> None:
    ids, x, q, truth = data
    index = AnnIndex(DIM, factory)
    index.rebuild(ids, x)
    assert recall(index.search(q, 10)[1], truth) >= 0.9


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,SQ8", "IVF16,PQ32x4fs,RFlat"])
def test_allowed_ids_restrict_results(factory: str, random_data: tuple) -> None:
    ids, x = random_data
    index = AnnIndex(DIM, factory)
    index.rebuild(ids, x)
    allowed = ids[::10]
    found = index.search(x[:20], 10, allowed_ids=allowed)[1]
    assert np.isin(found, allowed).all()  # 300 allowed ids: every slot is filled
    assert (found[::10, 0] == ids[:20:10]).all()  # an allowed query vector finds itself
    _, few = index.search(x[:3], 10, allowed_ids=ids[[5, 6, 7]])
    assert set(few[0][few[0] >= 0]) <= {ids[5], ids[6], ids[7]}
    assert (index.search(x[:2], 4, allowed_ids=np.array([], dtype=np.int64))[1] == -1).all()


@pytest.mark.parametrize("factory", ["Flat", "HNSW32", "IVF16,SQ8", "IVF16,PQ32x4fs,RFlat"])
def test_add_remove_save_load_round_trip(factory: str, random_data: tuple, tmp_path: Path) -> None:
    ids, x = random_data
    index = AnnIndex(DIM, factory)
    index.rebuild(ids[:2500], x[:2500])
    index.add(ids[2500:], x[2500:])
    index.add(ids[2990:], x[2990:])  # replays are ignored
    assert index.ntotal == 3000
    gone = ids[:100]
    index.remove(np.concatenate([gone, [10**9]]))  # an absent id is ignored
    assert index.ntotal == 2900
    assert not np.isin(index.search(x[:100], 3)[1], gone).any()
    path = tmp_path / "index.7.faiss"
    index.save(path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
    loaded = AnnIndex.load(path, factory=factory)
    assert loaded.effective_factory == factory and loaded.ntotal == 2900
    assert set(loaded.ids().tolist()) == set(ids[100:].tolist())
    _, found = loaded.search(x[100:150], 1)
    assert (found[:, 0] == ids[100:150]).all()
    assert not np.isin(loaded.search(x[:100], 3)[1], gone).any()
    assert loaded.memory_bytes() > 0


@pytest.mark.parametrize("factory", ["Flat", "IVF16,SQ8"])
def test_add_skips_held_and_repeated_ids_on_both_paths(
    factory: str, random_data: tuple, tmp_path: Path
) -> None:
    """Ids beyond every held one take the path that skips the pass over all held ids; the others are
    compared with them. Either way each id is held once."""
    ids, x = random_data
    index = AnnIndex(DIM, factory)
    index.rebuild(ids[:2000], x[:2000])
    index.add(ids[[2000, 2001, 2000]], x[[2000, 2001, 2000]])  # beyond all held, one repeated
    index.add(ids[1990:2100], x[1990:2100])  # overlapping a replay
    index.remove(ids[2050:2100])
    index.add(ids[2050:2060], x[2050:2060])  # below the highest id ever held: compared, added again
    index.save(tmp_path / "index.1.faiss")
    loaded = AnnIndex.load(tmp_path / "index.1.faiss", factory=factory)
    loaded.add(ids[2099:2200], x[2099:2200])  # after a load
    for held in (index, loaded):
        live = held.ids()
        assert live.size == np.unique(live).size
    assert sorted(loaded.ids().tolist()) == sorted(ids[:2060].tolist() + ids[2099:2200].tolist())
    assert (loaded.search(x[2150:2160], 1)[1][:, 0] == ids[2150:2160]).all()


def test_the_largest_tier_structure_serves_mapped_and_re_ranks_deep(data: tuple, tmp_path: Path) -> None:
    """The auto choice past SQ8_MAX (here with 16 lists): fast-scan PQ shortlist re-ranked by SQ8 with the
    deep default k_factor, read from a mapped snapshot exactly as from memory, soft deletes honoured."""
    ids, x, q, truth = data
    factory = choose_factory(SQ8_MAX + 1, DIM).replace(f"IVF{IVF_NLIST_LARGE}", "IVF16")
    index = AnnIndex(DIM, factory, {"nprobe": 16})
    index.rebuild(ids, x)
    assert index.effective_factory == factory == "IVF16,PQ8x4fs,Refine(SQ8)"
    assert default_k_factor(factory, len(ids)) == FASTSCAN_K_FACTOR > DEFAULT_K_FACTOR
    assert default_k_factor("IVF16,PQ8,RFlat", 10**7) == DEFAULT_K_FACTOR  # 8-bit codes rank finely
    assert default_k_factor(factory, 5 * FASTSCAN_K_FACTOR_N) == 5 * FASTSCAN_K_FACTOR  # deeper with n
    assert default_k_factor(factory, 10**9) == FASTSCAN_K_FACTOR_MAX
    assert recall(index.search(q, 10)[1], truth) >= 0.95
    index.remove(ids[:50])
    index.save(tmp_path / "index.1.faiss")
    mapped = AnnIndex.load(tmp_path / "index.1.faiss", {"nprobe": 16}, factory, mmap=True)
    loaded = AnnIndex.load(tmp_path / "index.1.faiss", {"nprobe": 16}, factory)
    assert mapped.mapped and mapped.deleted == 50
    for a, b in zip(mapped.search(q, 10), loaded.search(q, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.isin(mapped.search(x[:50], 10)[1], ids[:50]).any()


def test_soft_deletes_ask_for_compaction(random_data: tuple) -> None:
    ids, x = random_data
    index = AnnIndex(DIM, "HNSW32")
    index.rebuild(ids[:2000], x[:2000])
    index.remove(ids[:300])
    assert index.deleted == 300 and not index.needs_rebuild(1700)
    index.remove(ids[300:500])
    assert index.needs_rebuild(1500)
    index.rebuild(index.ids(), x[500:2000])
    assert index.deleted == 0 and index.ntotal == 1500


def test_k_larger_than_ntotal_pads_with_minus_one() -> None:
    index = AnnIndex(8)
    assert (index.search(np.ones((2, 8), np.float32), 3)[1] == -1).all()  # empty index
    x = normalised(np.random.default_rng(2).standard_normal((3, 8)))
    index.add(np.array([10, 11, 12]), x)
    scores, found = index.search(x, 5)
    assert found.shape == (3, 5) and (found[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    assert sorted(found[0, :3].tolist()) == [10, 11, 12]


def test_trained_factory_falls_back_to_flat_until_enough_data(random_data: tuple, tmp_path: Path) -> None:
    ids, x = random_data
    index = AnnIndex(DIM, "IVF64,SQ8")
    need = min_train_size("IVF64,SQ8", DIM)
    assert need == 39 * 64
    index.rebuild(ids[:100], x[:100])
    assert index.effective_factory == "Flat" and "IVF64,SQ8" in index.fallback_reason
    assert (index.search(x[:5], 1)[1][:, 0] == ids[:5]).all()
    index.add(ids[100:need], x[100:need])
    assert not index.needs_rebuild(need - 1) and index.needs_rebuild(need)
    index.save(tmp_path / "index.1.faiss")
    loaded = AnnIndex.load(tmp_path / "index.1.faiss", factory="IVF64,SQ8")
    assert loaded.effective_factory == "Flat" and loaded.needs_rebuild(need)
    loaded.rebuild(ids[:need], x[:need])
    assert loaded.effective_factory == "IVF64,SQ8" and not loaded.needs_rebuild(need)
    assert min_train_size("OPQ8,IVF16,PQ8", DIM) == 39 * 256 and min_train_size("HNSW32", DIM) == 0


def test_choose_factory_thresholds() -> None:
    assert choose_factory(0, 512) == choose_factory(FLAT_MAX, 512) == "Flat"
    assert choose_factory(FLAT_MAX + 1, 512) == choose_factory(HNSW_MAX, 512) == "HNSW32"
    assert choose_factory(HNSW_MAX + 1, 512) == choose_factory(SQ8_MAX, 512) == "IVF2048,SQ8"
    assert choose_factory(SQ8_MAX + 1, 512) == "IVF4096,PQ64x4fs,Refine(SQ8)"
    assert choose_factory(SQ8_MAX + 1, 100) == "IVF4096,SQ8"  # no whole 8-dimension sub-vectors
    for n in (HNSW_MAX + 1, SQ8_MAX + 1):  # every auto tier has the data it trains on
        assert min_train_size(choose_factory(n, 64), 64) <= n


def test_auto_mode_rebuilds_when_a_tier_is_crossed(random_data: tuple) -> None:
    ids, x = random_data
    index = AnnIndex(DIM)
    index.rebuild(ids, x)
    assert index.factory is None and index.effective_factory == "Flat"
    assert not index.needs_rebuild(FLAT_MAX) and index.needs_rebuild(FLAT_MAX + 1)
    index._index = AnnIndex(DIM, "HNSW32")._index  # pretend it was built above the threshold
    index.effective_factory = "HNSW32"
    assert not index.needs_rebuild(FLAT_MAX - 1)  # hysteresis: no ping-pong around the boundary
    assert index.needs_rebuild(FLAT_MAX // 2 - 1)


def test_bad_factory_and_params_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot build factory"):
        AnnIndex(DIM, "NoSuchIndex123")
    with pytest.raises(ValueError, match="unknown search_params"):
        AnnIndex(DIM, "HNSW32", {"ef": 3})
    (tmp_path / "junk.faiss").write_bytes(b"not an index")
    with pytest.raises(StoreError, match=r"cannot read ANN snapshot .*junk\.faiss"):
        AnnIndex.load(tmp_path / "junk.faiss")


def test_exact_search_matches_brute_force() -> None:
    x = normalised(np.random.default_rng(3).standard_normal((30, 8)))
    scores, found = exact_search(x[:4], 40, np.arange(30) + 1, x)
    assert (found[:, 0] == np.arange(4) + 1).all() and (found[:, 30:] == -1).all()
    assert np.all(np.diff(scores[:, :30], axis=1) <= 0)
