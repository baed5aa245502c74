"""kill -9 a writing process at random moments; the index must reopen holding exactly the committed items.

A child process appends batches (adds, content changes that orphan vectors, removals, duplicates) and
prints each batch before writing it and the seq after the commit. The parent SIGKILLs it, then checks
that the store holds the reported state (or that plus the batch in flight, when the kill landed
between the commit and the print), that FAISS agrees with SQLite, and that stored embeddings find
their own items. The next trial's child reopens the same index as writer, so recovery is exercised
repeatedly.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from vitrine.index.store import IndexStore

CHILD = r"""
import hashlib, json, sys
import numpy as np
from vitrine.index.store import IndexStore, NewItem

root, trial = sys.argv[1], int(sys.argv[2])
store = IndexStore.open(root, writable=True) if IndexStore.exists(root) else \
    IndexStore.create(root, {"id": "crash-model", "dim": 32})
rng = np.random.default_rng(trial)
print("READY", flush=True)

def new(key, content, shared=False):
    sha = hashlib.sha256(content.encode()).hexdigest()
    return NewItem(key=key, path="/" + key, sha256=sha, size=1, mtime_ns=1, metadata={"trial": trial},
                   embedding=None if shared else rng.standard_normal(32))

batch = 0
while True:
    keys = [f"t{trial}-b{batch}-i{i}" for i in range(20)]
    items = [new(k, k) for k in keys[:-1]] + [new(keys[-1], keys[-2], shared=True)]  # a duplicate
    if batch:
        changed = f"t{trial}-b{batch - 1}-i10"
        items.append(new(changed, changed + "-v2"))  # new content: the old vector is orphaned
    removed = [f"t{trial}-b{batch - 1}-i{i}" for i in range(5)] if batch % 3 == 2 else []
    print("PENDING " + json.dumps({"add": keys, "remove": removed}), flush=True)
    seq = store.write(items, remove_keys=removed)
    print(f"COMMITTED {seq}", flush=True)
    if batch % 4 == 3:
        store.flush()
    batch += 1
"""


class Child:
    """The writer process, with its stdout collected line by line on a thread."""

    def __init__(self, root: Path, trial: int) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.log = root.parent / f"child-{trial}.log"  # a file, so a chatty stderr can never block it
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(root), str(trial)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.strip())
            if line.startswith("READY"):
                self.ready.set()

    def kill_after(self, delay: float) -> None:
        if not self.ready.wait(60):
            self.proc.kill()
            pytest.fail(f"the writer child never got ready: {self.log.read_text()}")
        time.sleep(delay)
        self.proc.kill()
        self.proc.wait()
        self.reader.join(10)


def replay(keys: set[str], batch: dict) -> set[str]:
    return (keys | set(batch["add"])) - set(batch["remove"])


def expected_states(before: set[str], lines: list[str]) -> tuple[set[str], set[str], int]:
    """(committed keys, committed keys + the batch in flight, batches committed)."""
    keys, pending, committed = set(before), None, 0
    for line in lines:
        if line.startswith("PENDING "):
            pending = json.loads(line[len("PENDING ") :])
        elif line.startswith("COMMITTED "):
            keys, pending, committed = replay(keys, pending), None, committed + 1
    return keys, (replay(keys, pending) if pending else keys), committed


def check_store(root: Path, allowed: tuple[set[str], set[str]], context: str) -> set[str]:
    with IndexStore.open(root) as store:
        keys = store.keys()
        assert keys in allowed, f"{context}: {len(keys)} keys, expected {[len(a) for a in allowed]}"
        stats = store.stats()
        assert stats["count"] == len(keys)
        assert stats["indexed"] == stats["vectors"], f"{context}: FAISS and SQLite disagree: {stats}"
        sample = sorted(keys)[:: max(1, len(keys) // 25)]
        names, embeddings = store.embeddings(sample)
        for key, hits in zip(names, store.search(embeddings, k=1), strict=True):
            assert hits and (hits[0].key == key or key in hits[0].duplicates), f"{context}: {key} lost"
    return keys


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_committed_items(tmp_path: Path) -> None:
    root = tmp_path / "index"
    seed = int(time.time())
    rng = random.Random(seed)
    keys: set[str] = set()
    total_batches = 0
    for trial in range(5):
        delay = rng.uniform(0.05, 1.5)
        child = Child(root, trial)
        child.kill_after(delay)
        context = f"seed {seed}, trial {trial}, killed after {delay:.2f}s"
        committed, with_pending, batches = expected_states(keys, child.lines)
        total_batches += batches
        if not IndexStore.exists(root):  # killed before the index was first created
            assert not keys and batches == 0, context
            continue
        keys = check_store(root, (committed, with_pending), context)
    assert total_batches > 0, f"seed {seed}: no batch was ever committed; the child is too slow to test"
    with IndexStore.open(root, writable=True) as store:  # the lock was released by the dead writers
        assert store.keys() == keys
