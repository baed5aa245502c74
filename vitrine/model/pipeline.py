"""The image pipeline: decode and preprocess in worker threads while the model runs, with the split of the
CPU between the two chosen from costs measured while it runs.

On a CPU the decode/preprocess workers and torch's intra-op threads share the same cores, and the best
split depends on costs known only at run time: a 224-px thumbnail decodes ten times faster than a phone
photo, a bf16 forward on AMX or an int8 runtime costs a fraction of fp32, and other processes take
cores away. So the pipeline measures, per item, the CPU seconds a worker spends decoding and
preprocessing and the core-seconds of the forward; its cost model (:func:`propose`) turns them into at
most two candidate splits (torch on every core with the workers filling its gaps, or the cores divided
so that both stages keep pace); each candidate runs for a few batches, the one with the highest
measured throughput is kept, and the choice is made again every ``replan_batches`` batches from the
costs measured since. Items are prepared at most two batches ahead, so the model never waits while a
worker is idle, and memory stays bounded.

Results come back in input order. A failure of ``load`` or ``preprocess`` is that item's result (turned
into an error by ``fail``) and never stops the stream.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np
import torch

T = TypeVar("T")
_END = object()


@dataclass(frozen=True)
class Split:
    """``torch_threads`` intra-op threads for the forward; ``workers`` decoding/preprocessing at once."""

    torch_threads: int
    workers: int


@dataclass(frozen=True)
class Costs:
    """Measured per item: ``prepare`` CPU seconds of one worker (decode + preprocess), ``forward``
    core-seconds of the model (wall time x torch threads)."""

    prepare: float
    forward: float


def propose(cores: int, costs: Costs) -> list[Split]:
    """The splits worth trying, best guess first.

    ``shared``: torch takes every core and the workers run in its gaps (no core idles, but a worker
    preempting a torch thread stalls the whole team at its next barrier). ``dedicated``: the cores are
    divided in proportion to the two stages' costs, so each keeps pace with the other (no
    interference, but a stage that finishes early leaves its cores idle). Which wins depends on how
    badly the forward suffers from preemption, so both are measured.
    """
    if cores <= 1:
        return [Split(1, 1)]
    share = costs.prepare / max(costs.prepare + costs.forward, 1e-12)  # of the CPU, for the workers
    workers = min(cores - 1, max(1, round(cores * share)))
    shared = Split(cores, max(1, math.ceil(cores * share)))
    dedicated = Split(cores - workers, workers)
    return [shared] if shared == dedicated else [shared, dedicated]


def predicted_rate(cores: int, split: Split, costs: Costs) -> float:
    """Items per second the cost model expects of ``split`` (linear scaling, no interference)."""
    prepare = split.workers / max(costs.prepare, 1e-12)
    if split.torch_threads + split.workers <= cores:
        return min(prepare, split.torch_threads / max(costs.forward, 1e-12))
    return min(prepare, cores / max(costs.prepare + costs.forward, 1e-12))


@dataclass
class PipelineStats:
    """Where a stream's time went (seconds), and the splits tried with their measured items/s."""

    items: int = 0
    batches: int = 0
    wall: float = 0.0
    decode_cpu: float = 0.0  # in the workers: reading, hashing, decoding (``load``)
    preprocess_cpu: float = 0.0  # in the workers: resize, crop, normalise
    forward: float = 0.0  # wall time of the model calls
    model_waited: float = 0.0  # the model thread waiting for prepared items
    consumer: float = 0.0  # the caller's time between results (storing them)
    trials: list[tuple[Split, float]] = field(default_factory=list)
    split: Split | None = None
    encoded: int = 0  # items that went through the model
    forward_core: float = 0.0  # forward wall time x torch threads

    def costs(self) -> Costs | None:
        """Mean costs per item so far (None before the first forward)."""
        if not self.items or not self.encoded:
            return None
        return Costs((self.decode_cpu + self.preprocess_cpu) / self.items, self.forward_core / self.encoded)

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "batches": self.batches,
            "wall_s": round(self.wall, 3),
            "decode_cpu_s": round(self.decode_cpu, 3),
            "preprocess_cpu_s": round(self.preprocess_cpu, 3),
            "forward_s": round(self.forward, 3),
            "model_waited_s": round(self.model_waited, 3),
            "consumer_s": round(self.consumer, 3),
            "split": None if self.split is None else vars(self.split),
            "trials": [{**vars(s), "items_per_s": round(r, 1)} for s, r in self.trials],
        }


class Gate:
    """A semaphore whose size can change while threads wait on it (the number of active workers)."""

    def __init__(self, size: int) -> None:
        self.size, self.active = size, 0
        self._cond = threading.Condition()

    def resize(self, size: int) -> None:
        with self._cond:
            self.size = max(1, size)
            self._cond.notify_all()

    def __enter__(self) -> Gate:
        with self._cond:
            self._cond.wait_for(lambda: self.active < self.size)
            self.active += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self.active -= 1
            self._cond.notify_all()


class Tuner:
    """Chooses the split for each batch: one warm-up batch, then ``trial_batches`` per candidate
    (the first after a switch is not counted: it was prepared under the previous split), then the
    best measured one for ``replan_batches`` batches, then a new plan from the costs measured since."""

    def __init__(self, cores: int, start: Split, trial_batches: int = 3, replan_batches: int = 48) -> None:
        self.cores, self.current = cores, start
        self.trial_batches, self.replan_batches = max(2, trial_batches), replan_batches
        self._queue: deque[Split] = deque()
        self._rates: dict[Split, list[float]] = {}
        self._left = 1  # the warm-up batch (one-time costs: kernels chosen, caches filled)
        self._counted = False
        self.trials: list[tuple[Split, float]] = []

    def next_split(self, costs: Costs | None) -> Split:
        """The split for the next batch, given the costs measured so far."""
        if self._left > 0:
            self._left -= 1
            return self.current
        if self._queue:
            self.current = self._queue.popleft()
            self._left, self._counted = self.trial_batches - 1, True
            return self.current
        if self._counted:  # the trials are over: keep the best
            self._decide()
            return self.current
        if costs is not None:  # warm-up or a period of exploitation is over: plan again
            self._queue.extend(propose(self.cores, costs))
            self._rates = {}
            return self.next_split(None)
        return self.current

    def record(self, split: Split, items_per_s: float, first_after_switch: bool) -> None:
        if self._counted and not first_after_switch:
            self._rates.setdefault(split, []).append(items_per_s)

    def _decide(self) -> None:
        measured = {s: float(np.median(r)) for s, r in self._rates.items() if r}
        if measured:
            self.current = max(measured, key=lambda s: measured[s])
            self.trials.extend(measured.items())
        self._counted = False
        self._left = self.replan_batches


@dataclass
class _Prepared:
    value: Any  # the tensor, None (nothing to encode) or the exception the item failed with
    decode: float = 0.0
    preprocess: float = 0.0


class Pipeline(Generic[T]):
    """Runs ``load`` (item → image or None) and ``preprocess`` (image → pixels tensor, batch of one) in
    workers and ``forward`` (pixels → normalised rows) in the caller's thread; see the module docstring.

    ``workers``: a fixed number of workers (torch threads are then left alone), or None to choose the
    split by measurement. ``adapt_threads`` False (a GPU forward) keeps torch's threads and gives the
    workers every core. ``fail(item, exc)`` turns a worker's exception into the item's result.
    """

    def __init__(
        self,
        load: Callable[[T], Any],
        preprocess: Callable[[Any], torch.Tensor],
        forward: Callable[[torch.Tensor], np.ndarray],
        fail: Callable[[T, Exception], Any],
        *,
        batch_size: int,
        workers: int | None = None,
        adapt_threads: bool = True,
        cores: int | None = None,
    ) -> None:
        self.load, self.preprocess, self.forward, self.fail = load, preprocess, forward, fail
        self.batch_size = max(1, batch_size)
        self.cores = cores or len(os.sched_getaffinity(0))
        self.adapt = workers is None and adapt_threads
        pool = workers or self.cores
        # the warm-up batch runs with torch's threads as they are: a stream too short to try splits (a
        # query, a few uploads) must not pay for changing them
        start = Split(torch.get_num_threads(), 1 if self.adapt else pool)
        self.tuner = Tuner(self.cores, start)
        self.gate = Gate(start.workers)
        self.pool_size = pool
        self.stats = PipelineStats()

    def run(self, items: Iterable[T]) -> Iterator[tuple[T, Any]]:
        """Yield ``(item, row | fail(...) | None)`` in input order."""
        before = torch.get_num_threads()
        start = time.perf_counter()
        try:
            with ThreadPoolExecutor(self.pool_size, thread_name_prefix="vitrine-decode") as pool:
                yield from self._batches(iter(items), pool)
        finally:
            if self.adapt:
                torch.set_num_threads(before)
            self.stats.wall = time.perf_counter() - start

    def _batches(self, iterator: Iterator[T], pool: ThreadPoolExecutor) -> Iterator[tuple[T, Any]]:
        pending: deque[tuple[T, Future]] = deque()
        last_end, previous = time.perf_counter(), None
        while True:
            split = self._apply(
                self.tuner.next_split(self.stats.costs()) if self.adapt else self.tuner.current
            )
            ahead = self.batch_size * 2 + split.workers
            while len(pending) < ahead and (item := next(iterator, _END)) is not _END:
                pending.append((item, pool.submit(self._prepare, item)))
            if not pending:
                return
            batch = [pending.popleft() for _ in range(min(self.batch_size, len(pending)))]
            results = self._encode(batch)
            now = time.perf_counter()
            self.tuner.record(split, len(batch) / max(now - last_end, 1e-9), split != previous)
            previous = split
            yield from results
            last_end = time.perf_counter()
            self.stats.consumer += last_end - now

    def _apply(self, split: Split) -> Split:
        if self.adapt and split != self.stats.split:
            torch.set_num_threads(split.torch_threads)
            self.gate.resize(split.workers)
        self.stats.split = split
        self.stats.trials = list(self.tuner.trials)
        return split

    def _prepare(self, item: T) -> _Prepared:
        with self.gate:
            start = time.thread_time()
            try:
                image = self.load(item)
                loaded = time.thread_time()
                pixels = None if image is None else self.preprocess(image)
            except Exception as exc:  # the item's own result, reported in order
                return _Prepared(exc, time.thread_time() - start)
            return _Prepared(pixels, loaded - start, time.thread_time() - loaded)

    def _encode(self, batch: list[tuple[T, Future]]) -> list[tuple[T, Any]]:
        """Wait for a batch's prepared items; one forward for every item that has pixels."""
        waited = time.perf_counter()
        prepared: list[_Prepared] = [future.result() for _, future in batch]
        started = time.perf_counter()
        stats = self.stats
        stats.model_waited += started - waited
        tensors = [p.value for p in prepared if isinstance(p.value, torch.Tensor)]
        rows = iter(self.forward(torch.cat(tensors)) if tensors else [])
        took = time.perf_counter() - started
        stats.forward += took
        stats.forward_core += took * (stats.split or self.tuner.current).torch_threads
        stats.encoded += len(tensors)
        stats.items += len(batch)
        stats.batches += 1
        out = []
        for (item, _), p in zip(batch, prepared, strict=True):
            stats.decode_cpu += p.decode
            stats.preprocess_cpu += p.preprocess
            if isinstance(p.value, Exception):
                out.append((item, self.fail(item, p.value)))
            else:
                out.append((item, next(rows) if p.value is not None else None))
        return out
