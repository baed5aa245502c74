"""The FAISS part of an index: one ANN structure over L2-normalised vectors, compared by inner product.

All of it is derived state: the store keeps every embedding in SQLite and can rebuild an
:class:`AnnIndex` at any time, so this module optimises for speed and memory, not durability.

Ids are the store's ``vectors.id``; every factory is wrapped in ``IndexIDMap2``. Removal is FAISS's
awkward part: only a flat index compacts correctly under ``IndexIDMap2`` (HNSW and refine indexes have
no ``remove_ids``, and IVF removes the codes while the id map shifts under them). So except for
``Flat`` a removal is a *soft* delete: the id-map slot gets a unique negative sentinel, which is saved
with the snapshot, excluded from every search by an id selector, and dropped by the next
:meth:`AnnIndex.rebuild` (requested via :meth:`AnnIndex.needs_rebuild` past :data:`COMPACT_FRACTION`).

The structure is chosen and named in :mod:`vitrine.index.factories` (size tiers, training needs,
``search_params`` knobs and their defaults).
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import faiss
import numpy as np

from vitrine.errors import StoreError
from vitrine.index.atomic import durable_replace, temporary
from vitrine.index.factories import (
    DEFAULT_EF_CONSTRUCTION,
    DEFAULT_EF_SEARCH,
    SHRINK_HYSTERESIS,
    auto_tier,
    auto_tiers,
    check_params,
    choose_factory,
    default_k_factor,
    describe,
    min_train_size,
    validate_factory,
)
from vitrine.index.gpu import GpuSearcher, gpu_training

# Searches of at most this many queries run on one FAISS thread: waking an OpenMP team for a single
# query cost more than it saved next to the text encoder's own threads (bench/RESULTS.md, "Load").
# Batches keep the calling thread's setting.
SMALL_QUERY_BATCH = 4


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """FAISS OpenMP threads for one call, then the calling thread's own setting again.

    The setting is OpenMP's per-thread ``nthreads`` value, and torch's intra-op thread count is that
    same value (one OpenMP runtime serves both): restoring anything but what this thread had on entry
    silently changed the threads of the model calls that thread makes next (a server's model thread
    set to one thread ran its forwards on every core after its first search, under load many times
    slower). Being per thread, other threads' calls cannot interleave with it.
    """
    if n is None:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


#: Soft-deleted slots beyond this fraction of the structure make a rebuild worthwhile.
COMPACT_FRACTION = 0.2
#: Training sample: at most max(FACTOR x the FAISS minimum, FLOOR) vectors; k-means cost is linear in
#: it and 2x the minimum of 39 points per centroid gives stable centroids.
TRAIN_SAMPLE_FACTOR, TRAIN_SAMPLE_FLOOR = 2, 100_000
#: Read-only openers (store readers, via snapshots.load_ann) map snapshots of at least this many bytes
#: instead of reading them: opening no longer reads the whole file, every reader process of a snapshot
#: shares the OS page cache instead of holding a private copy, and a snapshot larger than RAM stays
#: searchable. Below it a private copy is cheap (read from the page cache) while mapping still costs:
#: cold-cache queries fault pages in from disk, and the first add or compacting remove copies the mapped
#: structure into memory (see AnnIndex.load). Writers never map.
MMAP_MIN_BYTES = 256 << 20


def _chain(index: faiss.Index) -> list[faiss.Index]:
    """Wrappers from the outermost to the innermost searching structure (IDMap, PreTransform, Refine)."""
    out = [faiss.downcast_index(index)]
    while isinstance(out[-1], (faiss.IndexIDMap, faiss.IndexPreTransform, faiss.IndexRefine)):
        inner = out[-1].base_index if isinstance(out[-1], faiss.IndexRefine) else out[-1].index
        out.append(faiss.downcast_index(inner))
    return out


class AnnIndex:
    """FAISS index with int64 ids (IndexIDMap2 around the factory) over normalised vectors, inner product.

    ``factory`` is what was requested (None = auto by size, :func:`choose_factory`);
    ``effective_factory`` is what is built. A factory that needs training stays exact ``Flat`` while
    there are fewer vectors than :func:`min_train_size` (``fallback_reason`` says so); the caller
    retrains with :meth:`rebuild` once :meth:`needs_rebuild` says the data allows better.
    Not thread-safe: the store serialises mutation against search.
    """

    def __init__(self, dim: int, factory: str | None = None, search_params: dict | None = None) -> None:
        if dim < 1:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim, self.factory = dim, (factory or "").strip() or None
        self.search_params = check_params(search_params)
        self.fallback_reason: str | None = None
        self._min_train = validate_factory(dim, self.factory) if self.factory else 0
        self._index = self._fresh(self._target(0))
        self._n_deleted = 0
        self._mem: tuple[int, int] | None = None  # (bytes, structure size) when last measured
        self._top: int | None = (
            None  # >= every id held (None: not computed yet); removals keep it an upper bound
        )
        self.mapped = False  # codes mapped from a snapshot file (load(mmap=True)): read-only until _own()
        self._gpu = GpuSearcher()  # GPU clone for the searches it can answer (vitrine.index.gpu); else CPU

    def _target(self, n: int) -> str:
        """The factory to build for n vectors, with the too-little-data fallback applied."""
        self.fallback_reason = None
        if self.factory is None:
            return choose_factory(n, self.dim)
        if n < self._min_train:
            self.fallback_reason = (
                f"{self.factory!r} needs >= {self._min_train} vectors to train, "
                f"has {n}: exact Flat until then"
            )
            return "Flat"
        return self.factory

    def _fresh(self, factory: str) -> faiss.Index:
        index = faiss.index_factory(self.dim, "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT)
        for part in _chain(index):
            if hasattr(part, "do_polysemous_training"):
                part.do_polysemous_training = False  # a Hamming pre-filter we never use; 4x training time
            if isinstance(part, faiss.IndexHNSW):
                ef = self.search_params.get("efConstruction", DEFAULT_EF_CONSTRUCTION)
                part.hnsw.efConstruction = int(ef)
        self.effective_factory = factory
        return index

    def _id_view(self) -> np.ndarray:
        """Writable view of the id map: position -> external id, or a sentinel < 0 once deleted."""
        id_map = self._index.id_map  # factory and read_index hand back the IndexIDMap2 proxy itself
        return faiss.rev_swig_ptr(id_map.data(), id_map.size()) if id_map.size() else np.empty(0, np.int64)

    @property
    def ntotal(self) -> int:
        """Live vectors (soft-deleted slots excluded)."""
        return int(self._index.ntotal) - self._n_deleted

    @property
    def deleted(self) -> int:
        """Soft-deleted slots still occupying the structure."""
        return self._n_deleted

    def ids(self) -> np.ndarray:
        """Live ids, in structure order (a copy)."""
        view = self._id_view()
        return view[view >= 0].copy()

    def needs_rebuild(self, n: int) -> bool:
        """True when rebuilding over n vectors would give a better-suited structure.

        Auto: the size tier moved up (or down, with hysteresis). Requested factory: the exact fallback
        is in place and n now allows training. Either: too many soft-deleted slots.
        """
        if self._n_deleted > COMPACT_FRACTION * max(1, self._index.ntotal):
            return True
        if self.factory is not None:
            return self.effective_factory == "Flat" and self.factory != "Flat" and n >= self._min_train
        tiers = auto_tiers(self.dim)
        if self.effective_factory not in tiers:
            return True
        current, wanted = tiers.index(self.effective_factory), auto_tier(n)
        return wanted > current or (wanted < current and auto_tier(int(n / SHRINK_HYSTERESIS)) < current)

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """(Re)create the structure for exactly these vectors: pick the factory, train if needed, add."""
        ids, vectors = self._check(ids, vectors)
        if np.unique(ids).size != ids.size:
            raise ValueError("rebuild: ids must be unique")
        self.rebuild_from(len(ids), lambda picks: vectors[picks], [(ids, vectors)])

    def rebuild_from(
        self,
        n: int,
        sample: Callable[[np.ndarray], np.ndarray],
        chunks: Iterable[tuple[np.ndarray, np.ndarray]],
    ) -> None:
        """:meth:`rebuild` for collections read in pieces (a store larger than memory): ``n`` vectors in
        all, ``sample(positions)`` the vectors at those sorted positions (0..n-1) for training, ``chunks``
        every (ids, vectors) once, ids unique. Only the training sample and one chunk are held at once."""
        index = self._fresh(self._target(n))
        if not index.is_trained:
            need = min_train_size(self.effective_factory, self.dim)
            cap = max(TRAIN_SAMPLE_FACTOR * need, TRAIN_SAMPLE_FLOOR)
            pick = np.random.default_rng(0).choice(n, size=min(cap, n), replace=False)
            train = self._check(np.zeros(len(pick), np.int64), sample(np.sort(pick)))[1]
            with gpu_training(index):  # IVF k-means on all GPUs where faiss-gpu has them; else CPU
                index.train(train)
            del train
        for ids, vectors in chunks:
            ids, vectors = self._check(ids, vectors)
            if len(ids):
                index.add_with_ids(vectors, ids)
        self._index, self._n_deleted, self._mem, self.mapped, self._top = index, 0, None, False, None
        self._gpu.invalidate()

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors; ids already present are skipped (a catch-up may replay them)."""
        ids, vectors = self._check(ids, vectors)
        if not len(ids):
            return
        first = np.unique(ids, return_index=True)[1]
        if self._top is None:
            view = self._id_view()
            self._top = int(view.max()) if view.size else -1
        if ids.min() > self._top:  # the usual commit: ids beyond every held one (SQLite's autoincrement),
            fresh = np.zeros(len(ids), dtype=bool)  # known fresh without a pass over all held ids
            fresh[first] = True
        else:
            fresh = ~np.isin(ids, self._id_view())
            fresh[np.setdiff1d(np.arange(len(ids)), first)] = False
        if fresh.any():
            self._own()
            self._gpu.invalidate()
            self._index.add_with_ids(np.ascontiguousarray(vectors[fresh]), ids[fresh])
            self._top = max(self._top, int(ids[fresh].max()))

    def remove(self, ids: np.ndarray) -> None:
        """Remove ids (absent ones are ignored): compacting for Flat, a soft delete otherwise."""
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        if ids.size == 0:
            return
        self._gpu.invalidate()
        if isinstance(faiss.downcast_index(self._index.index), faiss.IndexFlat):
            self._own()
            self._index.remove_ids(faiss.IDSelectorBatch(ids.size, faiss.swig_ptr(ids)))
            return
        view = self._id_view()
        hit = np.flatnonzero(np.isin(view, ids[ids >= 0]))
        if hit.size:
            view[hit] = -(hit + 2)  # unique per slot, so the reverse map stays a bijection
            self._index.construct_rev_map()
            self._n_deleted += int(hit.size)

    def stored(self, ids: np.ndarray) -> np.ndarray | None:
        """The vectors held for ``ids`` where the structure keeps them exactly (flat storage), else None."""
        if not re.fullmatch(r"HNSW\d+|(IVF\d+,)?Flat", self.effective_factory):
            return None
        try:
            return self._index.reconstruct_batch(np.ascontiguousarray(ids, dtype=np.int64))
        except RuntimeError:  # e.g. IVF lists without a direct map
            return None

    def _own(self) -> None:
        """Copy a mapped structure into memory before FAISS resizes it: growing or compacting mapped
        codes is a failed C++ assertion that aborts the process (faiss 1.15), not an exception. Costs a
        transient 2x (serialised bytes plus the new structure), once; soft deletes need no copy."""
        if self.mapped:
            self._index, self.mapped = faiss.deserialize_index(faiss.serialize_index(self._index)), False

    def _check(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
        vectors = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim))
        if len(ids) != len(vectors) or (ids < 0).any():
            raise ValueError(f"need one non-negative id per vector, got {len(ids)} ids for {len(vectors)}")
        return ids, vectors

    def search(
        self, queries: np.ndarray, k: int, allowed_ids: np.ndarray | None = None, widen: int = 1
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product: (scores, ids), both (nq, k); id -1 (score -inf) where fewer exist.

        ``allowed_ids`` restricts results to those ids, inside the search (an id selector), so k
        results come back whenever k allowed ones exist, as far as the structure's recall allows.
        ``widen`` multiplies the search beam (``efSearch``, ``nprobe``): a selective filter leaves
        fewer allowed candidates in the lists or graph neighbourhoods visited, so a caller that got
        fewer than k widens instead of giving up.
        """
        queries = np.ascontiguousarray(np.asarray(queries, dtype=np.float32).reshape(-1, self.dim))
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        allowed = None if allowed_ids is None else np.unique(np.asarray(allowed_ids, dtype=np.int64))
        allowed = None if allowed is None else np.ascontiguousarray(allowed[allowed >= 0])
        kk = min(k, int(self._index.ntotal))
        if not len(queries) or not kk or not self.ntotal or (allowed is not None and not allowed.size):
            return scores, labels
        params, _keep_alive = self._params(kk, allowed, widen)
        filtered = allowed is not None or self._n_deleted > 0
        result = self._gpu.search(self._index, queries, kk, params, filtered)
        if result is None:  # what a GPU clone cannot answer, and everything on CPU-only machines
            with _threads(1 if len(queries) <= SMALL_QUERY_BATCH else None):
                result = self._index.search(queries, kk, params=params)
        dist, found = result
        scores[:, :kk], labels[:, :kk] = np.where(found >= 0, dist, -np.inf), np.where(found >= 0, found, -1)
        return scores, labels

    def _params(
        self, k: int, allowed: np.ndarray | None, widen: int = 1
    ) -> tuple[faiss.SearchParameters, list]:
        """Search parameters for the structure, with the id selector where FAISS honours it.

        ``IndexIDMap2`` translates a selector on the *top-level* parameters to external ids and
        ``IndexPreTransform`` passes parameters through, but ``IndexRefine`` only forwards its nested
        ``base_index_params``, which IDMap never translates: below a refine the selector is therefore
        a bitmap over internal positions.
        """
        chain = _chain(self._index)
        refine = any(isinstance(p, faiss.IndexRefine) for p in chain)
        default = default_k_factor(self.effective_factory, int(self._index.ntotal))
        k_factor = float(self.search_params.get("k_factor", default))
        inner = top = self._inner_params(chain[-1], math.ceil(k * k_factor) if refine else k, widen)
        keep: list = [inner]
        for part in reversed(chain[:-1]):
            if isinstance(part, faiss.IndexRefine):
                outer = faiss.IndexRefineSearchParameters()
                outer.k_factor, outer.base_index_params = k_factor, top
                keep.append(outer)
                top = outer
        if refine and (allowed is not None or self._n_deleted):
            view = self._id_view()
            bitmap = np.packbits(view >= 0 if allowed is None else np.isin(view, allowed), bitorder="little")
            keep += [bitmap, faiss.IDSelectorBitmap(len(view), faiss.swig_ptr(bitmap))]
            inner.sel = keep[-1]  # the selector holds raw pointers: `keep` keeps their owners alive
        elif allowed is not None or self._n_deleted:
            keep.append(
                faiss.IDSelectorRange(0, 2**62)
                if allowed is None
                else faiss.IDSelectorBatch(allowed.size, faiss.swig_ptr(allowed))
            )
            top.sel = keep[-1]
        return top, keep

    def _inner_params(self, index: faiss.Index, k: int, widen: int = 1) -> faiss.SearchParameters:
        if isinstance(index, faiss.IndexHNSW):
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(self.search_params.get("efSearch", DEFAULT_EF_SEARCH)) * widen, k)
        elif isinstance(index, faiss.IndexIVF):
            params = faiss.SearchParametersIVF()
            nprobe = self.search_params.get("nprobe", min(max(index.nlist // 64, 16), 512))
            params.nprobe = min(int(nprobe) * widen, index.nlist)
        else:
            params = faiss.SearchParameters()
        return params

    def save(self, path: Path, written: Callable[[Path], None] | None = None) -> None:
        """Write atomically: a temporary file in the same folder, fsync, rename over ``path``;
        ``written`` sees the complete temporary file before the rename (a checksum is taken there)."""
        path = Path(path)
        tmp = temporary(path)
        try:
            faiss.write_index(self._index, str(tmp))
            if written is not None:
                written(tmp)
            durable_replace(tmp, path)
        except (OSError, RuntimeError) as exc:
            tmp.unlink(missing_ok=True)
            raise StoreError(f"cannot write ANN snapshot {path}: {exc}") from exc
        self._mem = (path.stat().st_size, int(self._index.ntotal))

    @classmethod
    def load(
        cls, path: Path, search_params: dict | None = None, factory: str | None = None, mmap: bool = False
    ) -> AnnIndex:
        """Read a snapshot written by :meth:`save`; ``factory`` is the one originally requested.

        ``mmap``: map the vectors/codes (flat codes, IVF lists) from the file instead of reading them
        into memory, so a snapshot larger than RAM can be searched (pages come from the OS cache).
        Meant for searching processes: the first :meth:`add` (or compacting remove) copies the
        structure into memory, so a writer should load without it.
        """
        try:
            index = _read_index(Path(path), mmap)  # already the IndexIDMap2 proxy: no downcast_index,
        except RuntimeError as exc:  # which would hand back a non-owning proxy
            raise StoreError(f"cannot read ANN snapshot {path}: {exc}") from exc
        if not isinstance(index, faiss.IndexIDMap2):
            raise StoreError(f"{path} is not a Vitrine ANN snapshot (no IndexIDMap2)")
        self = cls(index.d, factory, search_params)
        self._index, self.effective_factory = index, describe(index)
        if self.factory and self.factory != "Flat" and self.effective_factory == "Flat":
            self._target(0)  # records the fallback reason
        self._n_deleted, self.mapped = int((self._id_view() < 0).sum()), mmap
        self._mem = (Path(path).stat().st_size, int(index.ntotal))
        return self

    @staticmethod
    def worth_mapping(path: Path) -> bool:
        """Whether a read-only opener should map this snapshot (:data:`MMAP_MIN_BYTES`)."""
        return Path(path).stat().st_size >= MMAP_MIN_BYTES

    def memory_bytes(self) -> int:
        """Approximate bytes held: the serialized size, measured once and extrapolated per vector."""
        now = int(self._index.ntotal)
        if self._mem is None or (self._mem[1] == 0 and now > 0):
            self._mem = (int(faiss.serialize_index(self._index).size), now)
        size, at = self._mem
        return size if at == 0 else int(size + (now - at) * size / at)


def _read_index(path: Path, mmap: bool) -> faiss.Index:
    """faiss.read_index, optionally mapping the file: flat codes (Flat, HNSW storage) map with
    IO_FLAG_MMAP_IFC, which FAISS refuses for IVF lists; those map with IO_FLAG_MMAP instead."""
    if not mmap:
        return faiss.read_index(str(path))
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC)
    except RuntimeError:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)


def exact_search(
    queries: np.ndarray, k: int, ids: np.ndarray, vectors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k over a small candidate set, shaped like :meth:`AnnIndex.search`'s answer."""
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    labels = np.full((len(queries), k), -1, dtype=np.int64)
    kk = min(k, len(ids))
    if kk:
        sims = queries @ vectors.T
        top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
        scores[:, :kk], labels[:, :kk] = np.take_along_axis(sims, top, axis=1), ids[top]
    return scores, labels
