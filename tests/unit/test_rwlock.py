"""SharedLock: readers overlap, a writer is alone, and a waiting writer is not starved by readers."""

from __future__ import annotations

import threading
import time

from vitrine.index.rwlock import SharedLock


def test_readers_overlap() -> None:
    lock, inside, both = SharedLock(), threading.Barrier(2, timeout=5), []

    def reader() -> None:
        with lock.shared():
            inside.wait()  # only returns if both readers hold the lock at once
            both.append(True)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert both == [True, True]


def _until(condition, what: str, timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.001)


def test_writer_excludes_readers_and_is_not_starved() -> None:
    lock, events = SharedLock(), []
    reading, release = threading.Event(), threading.Event()
    writing, finish = threading.Event(), threading.Event()

    def first_reader() -> None:
        with lock.shared():
            reading.set()
            release.wait(5)
            events.append("reader-1 out")

    def writer() -> None:
        with lock.exclusive():
            events.append("writer in")
            writing.set()
            finish.wait(5)
            events.append("writer out")

    def late_reader() -> None:
        with lock.shared():
            events.append("reader-2 in")

    r1 = threading.Thread(target=first_reader)
    r1.start()
    reading.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    _until(lambda: lock.waiting() == (0, 1), "the writer waits for reader 1")
    r2 = threading.Thread(target=late_reader)
    r2.start()
    _until(lambda: lock.waiting() == (1, 1), "reader 2 queues behind the waiting writer")
    assert events == []
    release.set()
    writing.wait(5)
    assert lock.waiting() == (1, 0) and events == ["reader-1 out", "writer in"]  # reader 2 still out
    finish.set()
    for t in (r1, w, r2):
        t.join(5)
    assert events == ["reader-1 out", "writer in", "writer out", "reader-2 in"]
    assert lock.waiting() == (0, 0)
