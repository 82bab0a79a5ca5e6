"""The ASR worker pool runs end-of-turn work before queued partials."""

from __future__ import annotations

import asyncio
import threading

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
