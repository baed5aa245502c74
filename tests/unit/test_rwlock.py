"""SharedLock: readers overlap, a writer is alone, and a waiting writer is not starved by readers."""

from __future__ import annotations

import threading
import time

from vitrine.rwlock import SharedLock


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


def test_writer_excludes_readers_and_is_not_starved() -> None:
    lock, events = SharedLock(), []
    reading = threading.Event()
    release = threading.Event()

    def first_reader() -> None:
        with lock.shared():
            reading.set()
            release.wait(5)
            events.append("reader-1 out")

    def writer() -> None:
        with lock.exclusive():
            events.append("writer in")
            time.sleep(0.05)
            events.append("writer out")

    def late_reader() -> None:
        with lock.shared():
            events.append("reader-2 in")

    r1 = threading.Thread(target=first_reader)
    r1.start()
    reading.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    deadline = time.monotonic() + 5
    while not lock._writers_waiting and time.monotonic() < deadline:  # the writer waits for reader 1
        time.sleep(0.001)
    r2 = threading.Thread(target=late_reader)
    r2.start()
    time.sleep(0.05)
    assert events == []  # reader 2 queues behind the waiting writer, the writer behind reader 1
    release.set()
    for t in (r1, w, r2):
        t.join(5)
    assert events == ["reader-1 out", "writer in", "writer out", "reader-2 in"]
