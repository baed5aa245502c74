"""FAISS and torch share one OpenMP runtime, so a search's thread setting is also the model's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Run in a fresh interpreter that loads torch before FAISS, as the server and the indexer do: FAISS's
# OpenMP calls then reach torch's runtime (a pytest process may have loaded FAISS first).
SCRIPT = """
import threading
import numpy as np
import torch
from vitrine.index.ann import SMALL_QUERY_BATCH, AnnIndex

vectors = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
ann = AnnIndex(16, "Flat")
ann.add(np.arange(200, dtype=np.int64), vectors)
seen = []
layer = torch.nn.Linear(64, 64)

def model_thread():
    torch.set_num_threads(1)
    seen.append(torch.get_num_threads())
    layer(torch.randn(8, 64))  # a forward, as the model thread runs before its searches
    ann.search(vectors[:1], 5)
    seen.append(torch.get_num_threads())
    ann.search(vectors[: SMALL_QUERY_BATCH + 1], 5)  # a batch: left to the thread's own setting
    seen.append(torch.get_num_threads())

worker = threading.Thread(target=model_thread)
worker.start()
worker.join(timeout=60)
torch.set_num_threads(1)
torch.get_num_threads()
ann.search(vectors[:1], 5)
print(seen, torch.get_num_threads())
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores to tell 1 thread from the default")
def test_a_small_search_gives_the_calling_thread_its_own_torch_threads_back():
    """A server's model thread runs its forwards on the threads it was given (1 here); a one-query
    search used to reset the OpenMP setting to the process default (every core) on the way out, and the
    thread's next forwards then ran on all cores beside the other model thread."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(os.cpu_count())}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    assert out.stdout.split("\n")[-2] == "[1, 1, 1] 1"
