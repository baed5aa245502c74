"""SharedLock: many readers at once, or one writer.

The store's ANN structure is read by every search and changed only by commits, refreshes and
generation swaps. FAISS searches are safe to run side by side (and release the GIL), so serialising
them behind one mutex made concurrent requests queue for each other, for longer than the search
itself (bench/RESULTS.md, "Serving fixes": shared ANN lock). Readers share this lock; a
writer waits for the readers in flight and, once it is waiting, holds new readers back, so a steady
stream of searches cannot starve an index refresh.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class SharedLock:
    """``with lock.shared():`` for readers, ``with lock.exclusive():`` for writers (not re-entrant)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0
        self._readers_waiting = 0

    def waiting(self) -> tuple[int, int]:
        """``(readers, writers)`` blocked on the lock right now: what a stall is queued behind."""
        with self._cond:
            return self._readers_waiting, self._writers_waiting

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            try:
                while self._writing or self._writers_waiting:
                    self._cond.wait()
            finally:
                self._readers_waiting -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
