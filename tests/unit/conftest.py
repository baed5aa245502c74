"""Unit-test fixtures."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import pytest


@pytest.fixture(autouse=True, scope="module")
def single_threaded_faiss() -> Iterator[None]:
    """FAISS's OpenMP threads spin-wait when the 2 cores are shared (pytest, other suites): one thread
    made these tests 4x faster here, with identical results. The library itself keeps all cores."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
