"""The ASR worker pool runs end-of-turn work before queued partials."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from agent.speech.workers import Priority, PriorityPool


@pytest.fixture
def pool():
    pool = PriorityPool(1, "test")
    yield pool
    pool.shutdown()


def test_most_urgent_job_runs_first(pool):
    gate, order = threading.Event(), []
    busy = pool.submit(Priority.PARTIAL, gate.wait, 5)
    jobs = [pool.submit(priority, order.append, name) for priority, name in [
        (Priority.PARTIAL, "partial 1"), (Priority.BATCH, "batch"),
        (Priority.PARTIAL, "partial 2"), (Priority.FINAL, "final"),
    ]]
    gate.set()
    for job in [busy, *jobs]:
        job.result(timeout=5)
    assert order == ["final", "batch", "partial 1", "partial 2"]


def test_errors_reach_the_caller(pool):
    def fail() -> None:
        raise ValueError("bad clip")

    with pytest.raises(ValueError, match="bad clip"):
        pool.submit(Priority.BATCH, fail).result(timeout=5)
    assert pool.submit(Priority.BATCH, sum, [1, 2]).result(timeout=5) == 3


async def test_a_cancelled_waiter_drops_its_queued_job(pool):
    gate, ran = threading.Event(), []
    busy = pool.submit(Priority.FINAL, gate.wait, 5)
    waiter = asyncio.ensure_future(asyncio.wrap_future(
        pool.submit(Priority.PARTIAL, ran.append, "partial")))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.sleep(0)
    gate.set()
    busy.result(timeout=5)
    assert pool.submit(Priority.PARTIAL, ran.append, "next").result(timeout=5) is None
    assert ran == ["next"]


def test_shutdown_cancels_queued_jobs():
    pool = PriorityPool(1, "test")
    started, gate = threading.Event(), threading.Event()

    def hold() -> bool:
        started.set()
        return gate.wait(5)

    busy = pool.submit(Priority.FINAL, hold)
    assert started.wait(5)
    queued = pool.submit(Priority.PARTIAL, sum, [1])
    pool.shutdown()
    gate.set()
    assert busy.result(timeout=5) is True
    assert queued.cancelled()
    with pytest.raises(RuntimeError):
        pool.submit(Priority.FINAL, sum, [1])


def test_a_partial_gives_way_when_others_wait_behind_it(pool):
    gate, ran = threading.Event(), []
    busy = pool.submit(Priority.FINAL, gate.wait, 5)
    partial = pool.submit_skippable(Priority.PARTIAL, "skipped", ran.append, "partial")
    behind = [pool.submit(Priority.PARTIAL + 1, ran.append, n) for n in ("a", "b")]
    gate.set()
    busy.result(timeout=5)
    assert partial.result(timeout=5) == "skipped"
    for job in behind:
        job.result(timeout=5)
    assert ran == ["a", "b"] and pool.skipped == 1


def test_a_partial_with_nothing_behind_it_runs(pool):
    assert pool.submit_skippable(Priority.PARTIAL, "skipped", sum, [2, 3]).result(5) == 5
    assert pool.skipped == 0


async def test_silence_beginning_withdraws_the_turns_queued_partial():
    from agent.speech.asr_stream import RATE, ASRStream

    class Engine:
        """A transcriber whose partial passes wait in a queue that never moves."""

        def __init__(self) -> None:
            self.partials: list[asyncio.Future] = []

        def resolve_language(self, language):
            return language

        async def transcribe_partial_async(self, audio, *, language=None):
            future = asyncio.get_running_loop().create_future()
            self.partials.append(future)
            return await future

        async def transcribe_async(self, audio, *, language=None, words=True,
                                   priority=Priority.BATCH):
            from agent.speech.transcript import Transcript

            return Transcript.empty("en", len(audio) / RATE)

    engine = Engine()
    stream = ASRStream(engine, partial_interval=0.5)
    stream.feed(np.zeros(RATE, np.float32))
    await asyncio.sleep(0)
    assert len(engine.partials) == 1 and not engine.partials[0].done()
    stream.speculate(RATE)
    await asyncio.sleep(0)
    assert engine.partials[0].cancelled()
    await stream.finish(RATE)
