"""MicroBatcher: one background task owns a bounded queue and feeds the engine, one batch at a time.

No timer: a request that reaches an idle engine runs at once, alone. While the
engine is busy (in a worker thread, so the event loop keeps accepting calls),
new requests queue up; when the engine frees, everything queued (up to
`max_batch_size`) becomes the next batch. Batch size thus tracks load by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

from router import metrics

log = logging.getLogger(__name__)

Q = TypeVar("Q")
R = TypeVar("R")


class Overloaded(Exception):
    """The queue is full: the caller should back off (RESOURCE_EXHAUSTED)."""


class ShuttingDown(Exception):
    """The batcher is stopping and takes no new work (UNAVAILABLE)."""


class MicroBatcher(Generic[Q, R]):
    def __init__(
        self,
        run_batch: Callable[[Sequence[Q]], Sequence[R]],
        *,
        max_batch_size: int,
        max_queue: int,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self._queue: deque[tuple[Q, asyncio.Future[R]]] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._running = False  # a batch is in the engine thread
        # Counters for metrics and the benchmark's "mean batch size formed".
        self.batches = 0
        self.batched_items = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def count_batch(self, n: int) -> None:
        """Count a batch of `n` the engine ran: the worker's own, or one a caller ran itself while
        the batcher was idle (RouterServer._route_now)."""
        self.batches += 1
        self.batched_items += n
        metrics.BATCH_SIZE.observe(n)

    @property
    def idle(self) -> bool:
        """Started, not stopping, nothing queued and no batch in the engine: work the caller
        runs itself now, on the loop, can neither overtake a queued request nor overlap a batch."""
        return self._task is not None and not self._closing and not self._running and not self._queue

    def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("MicroBatcher.start() called twice")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task = asyncio.get_running_loop().create_task(self._worker(), name="micro-batcher")

    async def submit(self, query: Q) -> R:
        """Route one query through the next batch; raises Overloaded at once if the queue is full."""
        return (await self.submit_many([query]))[0]

    async def submit_many(self, queries: Sequence[Q]) -> list[R]:
        """Admit all of `queries` or none of them, then await every answer (in order)."""
        if self._closing or self._task is None:
            raise ShuttingDown("the router is shutting down")
        if len(self._queue) + len(queries) > self.max_queue:
            raise Overloaded(
                f"queue full ({len(self._queue)} waiting, limit {self.max_queue}); retry later"
            )
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[R]] = []
        for q in queries:
            fut: asyncio.Future[R] = loop.create_future()
            self._queue.append((q, fut))
            futures.append(fut)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        self._wakeup.set()
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for f in futures:  # a cancelled caller: its queued items are skipped, not run
                f.cancel()
            raise

    def _take_batch(self) -> list[tuple[Q, asyncio.Future[R]]]:
        batch: list[tuple[Q, asyncio.Future[R]]] = []
        while self._queue and len(batch) < self.max_batch_size:
            item = self._queue.popleft()
            if not item[1].done():  # skip callers who have gone (cancelled / timed out)
                batch.append(item)
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return  # stop() asked, and everything admitted has been answered
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._take_batch()
            metrics.QUEUE_DEPTH.set(len(self._queue))
            if not batch:
                continue
            self.count_batch(len(batch))
            self._running = True
            try:
                results = await loop.run_in_executor(
                    self._executor, self._run_batch, [q for q, _ in batch]
                )
                if len(results) != len(batch):
                    raise RuntimeError(
                        f"engine returned {len(results)} results for {len(batch)} queries. This is a bug."
                    )
            except Exception as e:  # one failure answers every caller in the batch
                log.exception("batch of %d failed", len(batch))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            finally:
                self._running = False
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def stop(self) -> None:
        """Finish everything already queued, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task  # returns once the queue is drained and the last batch answered
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
