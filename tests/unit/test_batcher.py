"""The micro-batcher with a fake engine that echoes its input (each caller must get its own answer)."""

import asyncio
import threading
import time

import pytest

from router.batcher import MicroBatcher, Overloaded, ShuttingDown


class EchoEngine:
    """Obeys route_batch's interface; each result carries its query, so mix-ups show."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batch_sizes: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def route_batch(self, queries):
        self.gate.wait(5)
        self.batch_sizes.append(len(queries))
        if self.delay:
            time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in queries:
            raise RuntimeError(f"engine failed on {self.fail_on!r}")
        return [f"echo:{q}:{len(q)}" for q in queries]


async def started(engine, **kw):
    b = MicroBatcher(
        engine.route_batch, max_batch_size=kw.get("max_batch_size", 32), max_queue=kw.get("max_queue", 1000)
    )
    b.start()
    return b


async def test_each_caller_gets_its_own_answer_under_load():
    engine = EchoEngine(delay=0.01)
    b = await started(engine, max_batch_size=8)
    queries = [f"q{i}" * (i % 5 + 1) for i in range(100)]
    results = await asyncio.gather(*(b.submit(q) for q in queries))
    assert results == [f"echo:{q}:{len(q)}" for q in queries]
    assert max(engine.batch_sizes) > 1, "batches should form while the engine is busy"
    assert max(engine.batch_sizes) <= 8
    assert sum(engine.batch_sizes) == 100
    await b.stop()


async def test_idle_engine_runs_a_lone_request_at_once():
    engine = EchoEngine()
    b = await started(engine)
    await b.submit("warm")
    t0 = time.perf_counter()
    assert await b.submit("x") == "echo:x:1"
    # No timer wait: a lone request is not held back to wait for company.
    assert time.perf_counter() - t0 < 0.05
    assert engine.batch_sizes[-1] == 1
    await b.stop()


async def test_batch_failure_reaches_every_caller_in_it_and_only_them():
    engine = EchoEngine(fail_on="bad")
    engine.gate.clear()  # hold the engine so the next three queue up into one batch
    b = await started(engine)
    first = asyncio.create_task(b.submit("first"))
    await asyncio.sleep(0.02)
    batch = [asyncio.create_task(b.submit(q)) for q in ("a", "bad", "c")]
    await asyncio.sleep(0.02)
    engine.gate.set()
    assert await first == "echo:first:5"
    for t in batch:
        with pytest.raises(RuntimeError, match="engine failed on 'bad'"):
            await t
    assert await b.submit("after") == "echo:after:5"  # the worker survived
    await b.stop()


async def test_full_queue_is_rejected_at_once():
    engine = EchoEngine()
    engine.gate.clear()
    b = await started(engine, max_queue=2)
    running = asyncio.create_task(b.submit("running"))  # taken by the worker
    await asyncio.sleep(0.02)
    waiting = [asyncio.create_task(b.submit(f"w{i}")) for i in range(2)]
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    with pytest.raises(Overloaded):
        await b.submit("one too many")
    assert time.perf_counter() - t0 < 0.01
    with pytest.raises(Overloaded):  # all-or-nothing for a batch call
        await b.submit_many(["x"])
    engine.gate.set()
    assert await running == "echo:running:7"
    assert [await w for w in waiting] == ["echo:w0:2", "echo:w1:2"]
    await b.stop()


async def test_cancelled_callers_are_skipped():
    engine = EchoEngine()
    engine.gate.clear()
    b = await started(engine)
    running = asyncio.create_task(b.submit("running"))
    await asyncio.sleep(0.02)
    gone = asyncio.create_task(b.submit("gone"))
    kept = asyncio.create_task(b.submit("kept"))
    await asyncio.sleep(0.01)
    gone.cancel()
    engine.gate.set()
    await running
    assert await kept == "echo:kept:4"
    assert sum(engine.batch_sizes) == 2, "the cancelled query must not reach the engine"
    await b.stop()


async def test_stop_answers_everything_admitted_then_refuses():
    engine = EchoEngine(delay=0.01)
    b = await started(engine, max_batch_size=4)
    tasks = [asyncio.create_task(b.submit(f"q{i}")) for i in range(10)]
    await asyncio.sleep(0)
    await b.stop()
    # stop() returned only after every admitted query was answered, so this cannot hang
    assert await asyncio.wait_for(asyncio.gather(*tasks), 1) == [f"echo:q{i}:{len(f'q{i}')}" for i in range(10)]
    with pytest.raises(ShuttingDown):
        await b.submit("late")
