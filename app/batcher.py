"""MicroBatcher: concurrent requests share one model forward.

On a CPU the model forward dominates a search, and one forward over 16 short texts costs a few times one
text, not sixteen: so request threads hand their (already validated) input to one worker thread, which
waits at most ``max_wait_ms`` for company, runs up to ``max_batch`` inputs in one call, and hands each
request its own row. Under light traffic a request waits for nobody (the worker starts as soon as it is
idle); under load batches fill up and throughput rises instead of latency. A single worker per model call
also serialises the model, which fast tokenizers need ("Already borrowed" when shared across threads).

If a batched call raises, its inputs are retried one by one so one bad input cannot fail its neighbours.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_STOP = object()


class MicroBatcher(Generic[T]):
    """``submit(x).result()`` is ``fn([x])[0]``, computed together with whatever else is waiting."""

    def __init__(
        self,
        fn: Callable[[list[T]], Sequence[Any]],
        *,
        max_batch: int = 16,
        max_wait_ms: float = 2.0,
        name: str = "batcher",
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.fn = fn
        self.on_batch = on_batch or (lambda n: None)
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def __call__(self, item: T) -> Any:
        return self.submit(item).result()

    def close(self) -> None:
        """Finish what is queued, then stop (submit after close is an error of the caller)."""
        self._queue.put(_STOP)
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            deadline = time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._run(batch)
                    return
                batch.append(nxt)
            self._run(batch)

    def _run(self, batch: list[tuple[T, Future]]) -> None:
        self.batches += 1
        self.items += len(batch)
        self.on_batch(len(batch))
        try:
            rows = self.fn([item for item, _ in batch])
        except Exception as exc:
            if len(batch) > 1:  # isolate the culprit
                for one in batch:
                    self._run([one])
            else:
                batch[0][1].set_exception(exc)
            return
        for (_, future), row in zip(batch, rows, strict=True):
            future.set_result(row)
